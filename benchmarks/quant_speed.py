"""Decode tokens/s and size of artifacts of the same model at different precisions, measured
in one run, interleaved, medians. Prints a table, then one JSON line.

    python benchmarks/quant_speed.py FP32_ARTIFACT INT8_ARTIFACT [INT4_ARTIFACT ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pltkit.runtime.backends import open_backend


def decode_tps(backend, prompt: np.ndarray, steps: int) -> float:
    _, state = backend.prefill(prompt, backend.new_state(1))
    token = np.array([1])
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = backend.decode(token, state)
        token = logits.argmax(-1)
    return steps / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    backends = {a.name: open_backend(a, threads=args.threads) for a in args.artifacts}
    prompt = np.random.default_rng(0).integers(10, 4000, (1, args.prompt))
    runs = {name: [] for name in backends}
    for _ in range(args.repeats):  # interleaved
        for name, b in backends.items():
            runs[name].append(decode_tps(b, prompt, args.steps))
    tps = {n: statistics.median(r) for n, r in runs.items()}
    size = {a.name: sum(f.stat().st_size for f in a.iterdir() if f.is_file()) for a in args.artifacts}
    base = args.artifacts[0].name
    print(f"{'artifact':>12} {'tokens/s':>9} {'speed-up':>9} {'MB':>7} {'size':>6}", file=sys.stderr)
    for n in backends:
        print(f"{n:>12} {tps[n]:>9.0f} {tps[n] / tps[base]:>8.2f}x {size[n] / 1e6:>7.2f} {size[n] / size[base]:>5.2f}x",
              file=sys.stderr)
    print(json.dumps({"decode_tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
                      "speedup_over_first": {n: round(tps[n] / tps[base], 3) for n in tps},
                      "size_bytes": size, "size_over_first": {n: round(size[n] / size[base], 3) for n in size},
                      "prompt": args.prompt, "steps": args.steps, "threads": args.threads}))


if __name__ == "__main__":
    main()
