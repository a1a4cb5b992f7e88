"""What the ONNX Runtime backend spends in Python on a decode step: the step's wall time less the
time inside the graph's run (`run_with_iobinding`), per artifact, medians over rounds.

Each round decodes --steps tokens from a copy of a state prefilled to --context tokens. To compare
two revisions of the runtime on the same artifacts (the script imports whatever pltkit is first on
the path):

    python scripts/ab_bench.py REV --rounds 3 -- python $PWD/benchmarks/step_overhead.py ART [ART ...]

Prints a line per artifact, then one JSON line {artifact folder name: ms per step}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pltkit.runtime.artifact import Artifact
from pltkit.runtime.ort_backend import OrtBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ab import prefilled  # noqa: E402


def overhead_ms(path: str, context: int, steps: int, rounds: int, threads: int) -> float:
    backend = OrtBackend(Artifact.open(path), threads)
    # with room for every step: growing the cache is not a step's cost
    state0 = prefilled(backend, np.random.default_rng(0).integers(10, 4000, (1, context)), steps)
    session, inside = backend.sessions["decode"], [0.0]
    run = session.run_with_iobinding

    def timed_run(io):
        start = time.perf_counter()
        run(io)
        inside[0] += time.perf_counter() - start

    session.run_with_iobinding = timed_run
    per_round = []
    for _ in range(rounds):
        state, inside[0] = state0.clone(), 0.0
        start = time.perf_counter()
        for i in range(steps):
            _, state = backend.decode(np.array([7 + i]), state)
        per_round.append((time.perf_counter() - start - inside[0]) / steps * 1e3)
    return statistics.median(per_round)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = {}
    for path in args.artifacts:
        out[Path(path).name] = round(overhead_ms(path, args.context, args.steps, args.rounds, args.threads), 4)
        print(f"{Path(path).name}: {out[Path(path).name]:.3f} ms per step in Python", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
