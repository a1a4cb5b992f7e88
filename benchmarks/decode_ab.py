"""Decode A/B of two artifacts of the same model in one process: ms per token at each context,
interleaved rounds, medians, and the ratio B/A (below 1: B decodes faster).

Both artifacts run on this tree's runtime, so export A with the older revision of pltkit and B with
this one, e.g. for a graph change:

    git worktree add /tmp/old REV && PYTHONPATH=/tmp/old plt-export CKPT /tmp/a --int8
    plt-export CKPT /tmp/b --int8
    python benchmarks/decode_ab.py /tmp/a /tmp/b --contexts 256 4096

Each round decodes --steps tokens from a copy of the state prefilled to the context, A then B or
B then A by turns, after one untimed step. Prints one line per context, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from pltkit.runtime.artifact import Artifact
from pltkit.runtime.ort_backend import OrtBackend

CHUNK = 256


def prefilled(backend: OrtBackend, ids: np.ndarray, room: int):
    state = backend.new_state(1)
    for start in range(0, ids.shape[1], CHUNK):
        _, state = backend.prefill(ids[:, start:start + CHUNK], state)
    state.reserve(ids.shape[1] + room, backend.config.max_position_embeddings, backend.writes["decode"])
    return state


def step_ms(backend: OrtBackend, state, steps: int, clock=time.perf_counter) -> float:
    state = state.clone()
    backend.decode(np.array([5]), state)
    start = clock()
    for i in range(steps):
        _, state = backend.decode(np.array([7 + i]), state)
    return (clock() - start) / steps * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    args = ap.parse_args(argv)
    backends = {"a": OrtBackend(Artifact.open(args.a), args.threads), "b": OrtBackend(Artifact.open(args.b), args.threads)}
    out = {}
    for ctx in args.contexts:
        ids = np.random.default_rng(0).integers(10, 4000, (1, ctx))
        states = {n: prefilled(be, ids, args.steps + 1) for n, be in backends.items()}
        times = {n: [] for n in backends}
        for r in range(args.rounds):
            for n in ("a", "b") if r % 2 == 0 else ("b", "a"):
                times[n].append(step_ms(backends[n], states[n], args.steps))
        a, b = (statistics.median(times[n]) for n in ("a", "b"))
        out[ctx] = {"a_ms": round(a, 2), "b_ms": round(b, 2), "b_over_a": round(b / a, 3)}
        print(f"context {ctx:>5}: A {a:.2f} ms  B {b:.2f} ms  B/A {b / a:.3f}", flush=True)
    print(json.dumps({"a": args.a, "b": args.b, "steps": args.steps, "rounds": args.rounds, "contexts": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
