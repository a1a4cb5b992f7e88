"""Decode latency per token against context length, same weights, same process, interleaved,
medians: the torch reference, ONNX Runtime on the LoopAttention function body (the portable
fallback) and ONNX Runtime on GroupQueryAttention kernels (the fast path). Prints a table,
then one JSON line.

    python benchmarks/decode_latency.py [--contexts 128 256 512 1024 2048] [--steps 32]

Weights are random at the default model's shape (timing does not depend on them), with
max_position_embeddings raised to the largest context.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pltkit.bench import loops
from pltkit.export.artifact import export
from pltkit.model.checkpoint import save_checkpoint
from pltkit.model.config import PLTConfig
from pltkit.model.plt import PLTForCausalLM
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.backends import open_backend
from pltkit.runtime.ort_backend import OrtBackend
from pltkit.train.train import TrainConfig, init_weights


def decode_ms(backend, ctx: int, steps: int, rng) -> float:
    ids = rng.integers(0, backend.config.vocab_size, (1, ctx))
    _, state = backend.prefill(ids, backend.new_state(1))
    return loops.decode_ms(backend, state, steps, rng)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg: PLTConfig = TrainConfig().model_config().replace(max_position_embeddings=max(args.contexts) + args.steps + 1)
    model = PLTForCausalLM(cfg)
    init_weights(model)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, Path(d) / "ckpt")
        export(Path(d) / "ckpt", Path(d) / "art")
        art = Artifact.open(Path(d) / "art")
        backends = {"torch": open_backend(Path(d) / "ckpt", "torch", args.threads),
                    "ort-function": OrtBackend(art, args.threads, "function"),
                    "ort-gqa": OrtBackend(art, args.threads, "gqa")}
        rng = np.random.default_rng(0)
        rows = {}
        for ctx in args.contexts:
            rows[ctx] = {name: decode_ms(b, ctx, args.steps, rng) for name, b in backends.items()}
    names = list(next(iter(rows.values())))
    print("ms per decoded token (median)", file=sys.stderr)
    print(f"{'context':>8} " + " ".join(f"{n:>13}" for n in names), file=sys.stderr)
    for ctx, r in rows.items():
        print(f"{ctx:>8} " + " ".join(f"{r[n]:>13.2f}" for n in names), file=sys.stderr)
    first, last = args.contexts[0], args.contexts[-1]
    print(json.dumps({
        "decode_ms": {str(c): {k: round(v, 3) for k, v in r.items()} for c, r in rows.items()},
        "torch_over_ort_gqa_decode_ms": {str(c): round(r["torch"] / r["ort-gqa"], 2) for c, r in rows.items()},
        "function_over_gqa_decode_ms": {str(c): round(r["ort-function"] / r["ort-gqa"], 2) for c, r in rows.items()},
        f"ort_gqa_decode_ms_{last}_over_{first}": round(rows[last]["ort-gqa"] / rows[first]["ort-gqa"], 2),
        "threads": args.threads}))


if __name__ == "__main__":
    main()
