"""A float32 artifact's decode with its products on pltkit.RowsMatMul (rows_f32.c) against the same decode with
them on ONNX Runtime's MatMul (MLAS), both on pltkit's other kernels, in one process: ms per token at each
context, interleaved rounds, medians, and the pairs' ratio new / old (below 1: RowsMatMul is faster).

    python benchmarks/float_rows_ab.py ARTIFACT [--contexts 256 1024] [--rounds 9] [--steps 8]

Each round decodes --steps tokens from a copy of the state prefilled to the context, by turns (decode_ab's
step_ms). Prints one line per context, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from pltkit.runtime import kernels
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.ort_backend import OrtBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ab import prefilled, step_ms  # noqa: E402


def backends(artifact: Path) -> tuple[OrtBackend, OrtBackend]:
    """(MLAS, RowsMatMul): the second opened as the runtime opens it, the first with float_rows_graph off."""
    new = OrtBackend(Artifact.open(artifact), 2, kernels="pltkit")
    real = kernels.float_rows_graph
    kernels.float_rows_graph = lambda model, folder: 0
    try:
        old = OrtBackend(Artifact.open(artifact), 2, kernels="pltkit")
    finally:
        kernels.float_rows_graph = real
    return old, new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    pair = backends(args.artifact)
    ids = np.random.default_rng(0).integers(10, pair[0].config.vocab_size, (1, max(args.contexts)))
    out = {}
    for ctx in args.contexts:
        states = [prefilled(b, ids[:, :ctx], 64) for b in pair]
        ms = [[], []]
        for r in range(args.rounds):
            for k in ((0, 1) if r % 2 else (1, 0)):
                ms[k].append(step_ms(pair[k], states[k], args.steps))
        pairs = np.array(ms[1]) / np.array(ms[0])
        out[ctx] = {"mlas_ms": round(statistics.median(ms[0]), 3), "rows_matmul_ms": round(statistics.median(ms[1]), 3),
                    "new_over_old": round(float(np.median(pairs)), 3),
                    "pairs_quartiles": [round(float(q), 3) for q in np.percentile(pairs, [25, 75])]}
        print(f"{args.artifact.name} at {ctx}: MLAS {out[ctx]['mlas_ms']} ms, RowsMatMul {out[ctx]['rows_matmul_ms']} "
              f"ms, pairs' median {out[ctx]['new_over_old']} (quartiles {out[ctx]['pairs_quartiles']})")
    print(json.dumps({"artifact": args.artifact.name, "contexts": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
