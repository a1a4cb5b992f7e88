"""Decode latency per token against context length: ONNX Runtime artifact vs the torch reference,
same weights, same process, interleaved, medians. Prints a table, then one JSON line.

    python benchmarks/decode_latency.py [--contexts 128 256 512 1024 2048] [--steps 32]

Weights are random at the default model's shape (timing does not depend on them), with
max_position_embeddings raised to the largest context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pltkit.export.artifact import export
from pltkit.model.checkpoint import save_checkpoint
from pltkit.model.config import PLTConfig
from pltkit.model.plt import PLTForCausalLM
from pltkit.runtime.backends import open_backend
from pltkit.train.train import TrainConfig, init_weights


def decode_ms(backend, ctx: int, steps: int, rng) -> float:
    ids = rng.integers(0, backend.config.vocab_size, (1, ctx))
    _, state = backend.prefill(ids, backend.new_state(1))
    times = []
    for t in rng.integers(0, backend.config.vocab_size, steps):
        start = time.perf_counter()
        _, state = backend.decode(np.asarray([t]), state)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


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
        backends = {"torch": open_backend(Path(d) / "ckpt", "torch", args.threads),
                    "ort": open_backend(Path(d) / "art", "ort", args.threads)}
        rng = np.random.default_rng(0)
        rows = {}
        for ctx in args.contexts:
            rows[ctx] = {name: decode_ms(b, ctx, args.steps, rng) for name, b in backends.items()}
    print(f"{'context':>8} {'torch ms/tok':>13} {'ort ms/tok':>11} {'ort speed-up':>13}", file=sys.stderr)
    for ctx, r in rows.items():
        print(f"{ctx:>8} {r['torch']:>13.2f} {r['ort']:>11.2f} {r['torch'] / r['ort']:>12.2f}x", file=sys.stderr)
    first, last = args.contexts[0], args.contexts[-1]
    print(json.dumps({
        "decode_ms": {str(c): {k: round(v, 3) for k, v in r.items()} for c, r in rows.items()},
        "ort_speedup_over_torch": {str(c): round(r["torch"] / r["ort"], 2) for c, r in rows.items()},
        f"ort_decode_growth_{last}_over_{first}": round(rows[last]["ort"] / rows[first]["ort"], 2),
        "threads": args.threads}))


if __name__ == "__main__":
    main()
