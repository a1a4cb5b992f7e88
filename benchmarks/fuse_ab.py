"""Decode steps with and without pltkit's folds (pltkit/runtime/kernels/fuse.py), in one process: the same artifacts
and library, each opened twice (kernel_model with fuse on and off), all sessions' blocks of steps interleaved.

    python benchmarks/fuse_ab.py PLAIN_ARTIFACT PLT2_ARTIFACT [--context 256] [--rounds 15] [--steps 16]

Prints ms a token (medians), fused / unfused for each artifact and PLT-2 / plain both ways, then one JSON line.
Also the largest difference of the first step's logits, fused against unfused: the folds round differently at the
last bit (ONNX Runtime's SimplifiedLayerNormalization sums the squares in another order), so a value may round to
the next int8 code.
"""

from __future__ import annotations

import argparse
import functools
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plain")
    ap.add_argument("plt2")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    args = ap.parse_args(argv)
    ids = np.random.default_rng(0).integers(10, 4000, (1, args.context))
    backends, states, original = {}, {}, kernels.kernel_model
    try:
        for name in ("plain", "plt2"):
            for fuse in (False, True):
                kernels.kernel_model = functools.partial(original, fuse=fuse)
                be = OrtBackend(Artifact.open(getattr(args, name)), args.threads, kernels="pltkit")
                backends[name, fuse], states[name, fuse] = be, prefilled(be, ids, args.steps + 1)
    finally:
        kernels.kernel_model = original
    logits = {k: be.decode(np.array([5]), states[k].clone())[0] for k, be in backends.items()}
    keys, times = list(backends), {k: [] for k in backends}
    for r in range(args.rounds):
        for k in keys if r % 2 else keys[::-1]:
            times[k].append(step_ms(backends[k], states[k], args.steps))
    ms = {k: statistics.median(v) for k, v in times.items()}
    out = {"context": args.context, "rounds": args.rounds,
           "ms": {f"{name} {'fused' if fuse else 'unfused'}": round(v, 3) for (name, fuse), v in ms.items()}}
    for name in ("plain", "plt2"):
        out[f"{name}_fused_over_unfused"] = round(ms[name, True] / ms[name, False], 3)
        out[f"{name}_max_logit_diff"] = float(np.abs(logits[name, True] - logits[name, False]).max())
    for fuse in (False, True):
        out[f"plt2_over_plain_{'fused' if fuse else 'unfused'}"] = round(ms["plt2", fuse] / ms["plain", fuse], 3)
    for key, v in out["ms"].items():
        print(f"{key:>16}: {v:7.2f} ms a token")
    print(f"fused / unfused: plain {out['plain_fused_over_unfused']}, PLT-2 {out['plt2_fused_over_unfused']}; "
          f"PLT-2 / plain: unfused {out['plt2_over_plain_unfused']}, fused {out['plt2_over_plain_fused']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
