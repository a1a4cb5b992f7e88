"""Where a decode step's time goes: each of pltkit's kernels (RowsMatMulNBits, StepAttention, RingMix) as
counted by the kernels themselves (kernels.cycles), and the rest (ONNX Runtime's own nodes, the Python of the
step), in ms per token. ONNX Runtime's profiler cannot say: it slows some kernels more than others.

    python benchmarks/kernel_time.py PLAIN_ARTIFACT PLT2_ARTIFACT [--context 256] [--steps 32] [--rounds 5]

The artifacts take turns, a block of --steps tokens each round from a copy of the state prefilled to the
context; each figure is a median over the rounds. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pltkit.runtime import kernels
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.ort_backend import OrtBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ab import prefilled  # noqa: E402


def block(backend, state, steps: int, hz: float) -> dict[str, float]:
    """ms per token over `steps` decode steps from a copy of `state`: the whole step and each op's share."""
    state = state.clone()
    backend.decode(np.array([5]), state)  # (binds the state's buffers)
    kernels.cycles(reset=True)
    start = time.perf_counter()
    for t in range(steps):
        _, state = backend.decode(np.array([10 + t]), state)
    ms = {"step": (time.perf_counter() - start) * 1e3 / steps}
    ms.update({op: c * 1e3 / hz / steps for op, (_, c) in kernels.cycles().items()})
    ms["other"] = ms["step"] - sum(ms[op] for op in kernels.TIMED_OPS)
    return ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    backends = {a.name: OrtBackend(Artifact.open(a), args.threads, kernels="pltkit") for a in args.artifacts}
    ids = np.random.default_rng(0).integers(10, 4000, (1, args.context))
    states = {n: prefilled(b, ids, args.steps + 2) for n, b in backends.items()}
    hz = kernels.counter_hz()
    runs = {n: [] for n in backends}
    for r in range(args.rounds):
        for n in (list(backends) if r % 2 == 0 else list(backends)[::-1]):
            runs[n].append(block(backends[n], states[n], args.steps, hz))
    cols = ("step", *kernels.TIMED_OPS, "other")
    out = {n: {c: round(statistics.median(b[c] for b in blocks), 3) for c in cols} for n, blocks in runs.items()}
    width = max(map(len, out))
    print(f"ms per token at {args.context} tokens (medians of {args.rounds} blocks of {args.steps} steps)")
    print(f"{'':>{width}}  " + "  ".join(f"{c:>15}" for c in cols))
    for n, ms in out.items():
        print(f"{n:>{width}}  " + "  ".join(f"{ms[c]:>15.3f}" for c in cols))
    print(json.dumps({"context": args.context, "steps": args.steps, "rounds": args.rounds, "ms": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
