"""Decode latency on a CUDA device, torch reference: plain (one loop), serial-loop L=2 (cost
model) and PLT-2 on the same weights (plt-bench's medium shape), at contexts 256 / 1k / 4k; then
the Triton LoopAttention kernel at LoopCoder-V2's decode shape (2 rows, 40 query / 8 kv heads of
128, window 64, bfloat16, cache in place) against torch's scaled_dot_product_attention over the
same cache for the same queries (global branch only: a lower bound of any exact kernel's work).
Prints JSON lines. Part of scripts/gpu_check.sh."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pltkit.bench.loops import make_checkpoints
from pltkit.model.checkpoint import load_model
from pltkit.model.plt import PLTState


@torch.inference_mode()
def main(contexts=(256, 1024, 4096), steps=32, dtype=torch.bfloat16):
    work = Path(tempfile.mkdtemp())
    ckpts = make_checkpoints(work, max(contexts) + 64, "medium")
    models = {v: load_model(p).to("cuda", dtype) for v, p in ckpts.items()}
    ids = torch.randint(10, 4000, (1, max(contexts)), device="cuda")
    out = {"device": torch.cuda.get_device_name(), "dtype": str(dtype), "decode_ms": {}}
    for ctx in contexts:
        states = {}
        for v, m in models.items():
            state = m.new_state(1)
            for start in range(0, ctx, 256):
                _, state = m.prefill(ids[:, start:min(ctx, start + 256)], state)
            states[v] = state
        row = {}
        for v, reps in (("plain", 1), ("serial2", 2), ("plt2", 1)):
            m = models["plt2" if v == "plt2" else "plain"]
            runs = []
            for _ in range(3):
                st = [PLTState.clone(states["plt2" if v == "plt2" else "plain"]) for _ in range(reps)]
                tok = torch.tensor([7], device="cuda")
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(steps):
                    for i in range(reps):
                        _, st[i] = m.decode(tok, st[i])
                torch.cuda.synchronize()
                runs.append((time.perf_counter() - t) / steps * 1e3)
            row[v] = round(statistics.median(runs), 3)
        out["decode_ms"][ctx] = row
        print(f"ctx {ctx}: " + "  ".join(f"{k} {v} ms" for k, v in row.items()), flush=True)
    c = max(contexts)
    d = out["decode_ms"][c]
    out.update(plt2_over_plain_decode=round(d["plt2"] / d["plain"], 3),
               serial2_over_plt2_decode=round(d["serial2"] / d["plt2"], 3), context=c)
    print(json.dumps(out))


def loop_attention_us(contexts=(1024, 4096, 16384), reps=50):
    import torch.nn.functional as F

    from pltkit.gpu.triton_loop_attention import loop_attention

    R, H, HKV, D, W = 2, 40, 8, 128, 64
    out = {"shape": f"R={R} H={H} Hkv={HKV} D={D} window={W} bfloat16", "us": {}}
    for ctx in contexts:
        def t(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        q, k, v = t(R, 1, H, 1, D), t(R, 1, HKV, 1, D), t(R, 1, HKV, 1, D)
        cache_k, cache_v = t(1, HKV, ctx + 1, D), t(1, HKV, ctx + 1, D)
        ring_k, ring_v, gate = t(R - 1, 1, HKV, W, D), t(R - 1, 1, HKV, W, D), torch.rand(R - 1, 1, H, 1, device="cuda")
        pos0 = torch.tensor(ctx, device="cuda")
        args = (q, k, v, cache_k, cache_v, ring_k, ring_v, gate.to(torch.bfloat16), pos0)
        qs = q.reshape(1, R * H, 1, D)
        ks, vs = (c[:, :, :ctx + 1].repeat_interleave(H // HKV, 1).repeat(1, R, 1, 1) for c in (cache_k, cache_v))
        row = {}
        for name, fn in (("triton", lambda: loop_attention(*args, first_loop=0, window=W, scale=D ** -0.5, kv_buffer=1)),
                         ("sdpa_global_only", lambda: F.scaled_dot_product_attention(qs, ks, vs))):
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            row[name] = round((time.perf_counter() - start) / reps * 1e6, 1)
        out["us"][ctx] = row
        print(f"LoopAttention ctx {ctx}: " + "  ".join(f"{k} {v} us" for k, v in row.items()), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
    loop_attention_us()
