"""Decode latency on a CUDA device, torch reference: plain (one loop), serial-loop L=2 (cost
model) and PLT-2 on the same weights (plt-bench's medium shape), at contexts 256 / 1k / 4k.
Prints one JSON line. Part of scripts/gpu_check.sh."""

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
                        _, st[i] = m.decode_step(tok, st[i])
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


if __name__ == "__main__":
    main()
