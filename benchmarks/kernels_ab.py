"""Decode with ONNX Runtime's kernels against pltkit's (pltkit.runtime.kernels), for plain and PLT-2 artifacts
of the same weights, in one process: ms per token at each context, interleaved rounds, medians.

Prints, per context, each artifact's step on both kernel sets, PLT-2 / plain on each, and pltkit / ort on each
artifact (below 1: pltkit's kernels are faster); then one JSON line.

    python benchmarks/kernels_ab.py .bench/large-plain-4160-int8-STAMP .bench/large-plt2-4160-int8-STAMP
    python benchmarks/kernels_ab.py PLAIN PLT2 --contexts 256 1024 4096 --rounds 7 --cpu-time

--cpu-time measures process CPU time with ONNX Runtime's thread spinning off (steadier on a shared machine);
without it, wall time as the runtime runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np

from decode_ab import prefilled, step_ms
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.ort_backend import OrtBackend

KERNELS = ("ort", "pltkit")


def no_spinning():
    """Every session opened from here on without spinning threads, whose waiting would count as CPU time."""
    import onnxruntime as ort

    class Options(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.add_session_config_entry("session.intra_op.allow_spinning", "0")

    ort.SessionOptions = Options


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plain")
    ap.add_argument("plt2")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time, spinning off (shared machines)")
    args = ap.parse_args(argv)
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.cpu_time:
        no_spinning()
    backends = {(m, k): OrtBackend(Artifact.open(getattr(args, m)), args.threads, kernels=k)
                for m, k in itertools.product(("plain", "plt2"), KERNELS)}
    out = {}
    for ctx in args.contexts:
        vocab = backends["plain", "ort"].config.vocab_size
        ids = np.random.default_rng(0).integers(10, min(4000, vocab), (1, ctx))
        states = {key: prefilled(be, ids, args.steps + 1) for key, be in backends.items()}
        times = {key: [] for key in backends}
        for r in range(args.rounds):
            order = list(backends) if r % 2 == 0 else list(reversed(backends))
            for key in order:
                times[key].append(step_ms(backends[key], states[key], args.steps, clock))
        ms = {key: statistics.median(t) for key, t in times.items()}
        row = {f"{m}_{k}_ms": round(ms[m, k], 2) for m, k in backends}
        row.update({f"plt2_over_plain_{k}": round(ms["plt2", k] / ms["plain", k], 3) for k in KERNELS})
        row.update({f"pltkit_over_ort_{m}": round(ms[m, "pltkit"] / ms[m, "ort"], 3) for m in ("plain", "plt2")})
        out[ctx] = row
        print(f"context {ctx:>5}: " + "  ".join(f"{m}/{k} {ms[m, k]:.2f}" for m, k in backends) + " ms;  PLT-2/plain "
              + "  ".join(f"{k} {row[f'plt2_over_plain_{k}']:.3f}" for k in KERNELS) + ";  pltkit/ort "
              + "  ".join(f"{m} {row[f'pltkit_over_ort_{m}']:.3f}" for m in ("plain", "plt2")), flush=True)
    print(json.dumps({"plain": args.plain, "plt2": args.plt2, "steps": args.steps, "rounds": args.rounds,
                      "cpu_time": args.cpu_time, "contexts": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
