"""Next-token top-1 agreement of quantized artifacts with a float32 artifact, by how the tokens go in:

    prefill   one prefill of each 512-token window (what plt-eval and plt-export's report measure)
    chunks64  prefill chunks of 64 tokens (the completion engine's chunk)
    decode    one token per step (PLT-2's two loops are then the only rows of each linear layer)

A scheme that quantizes activations per tensor at run time (`int8-dq`) shares one scale among all the
rows of a call, so its agreement depends on how many rows there are; weight-only int8 does not.
Same held-out windows for every artifact and mode (spread evenly over the set); prints one JSON line last.

    python benchmarks/quant_modes.py FP32_ARTIFACT NAME=ARTIFACT [NAME=ARTIFACT ...] [--windows 46]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from pltkit.model.paths import resolve_model_path
from pltkit.runtime.backends import open_backend
from pltkit.train.accuracy import heldout_windows

MODES = ("prefill", "chunks64", "decode")
IGNORE = -100


def top1(backend, x: np.ndarray, mode: str) -> np.ndarray:
    """The argmax at every position of window x, its tokens fed as `mode` says."""
    state = backend.new_state(1)
    if mode == "prefill":
        return backend.prefill(x[None], state)[0][0].argmax(-1)
    out = []
    if mode == "chunks64":
        for start in range(0, len(x), 64):
            logits, state = backend.prefill(x[None, start:start + 64], state)
            out.append(logits[0].argmax(-1))
        return np.concatenate(out)
    for t in x:
        logits, state = backend.decode(np.asarray([t]), state)
        out.append(logits[0].argmax(-1))
    return np.stack(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", help="the float32 artifact")
    ap.add_argument("artifacts", nargs="+", metavar="NAME=ARTIFACT")
    ap.add_argument("--windows", type=int, default=46, help="held-out windows of 512 tokens (184 in all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    inputs, targets, _, total = heldout_windows(resolve_model_path("default"), 512, args.windows)
    keep = targets != IGNORE
    ref = open_backend(args.reference, "ort", threads=args.threads)
    want = {m: [top1(ref, x, m) for x in inputs] for m in MODES}
    out = {"windows": len(inputs), "windows_total": total, "tokens": int(keep.sum()), "top1_agreement": {}}
    for name, path in (a.split("=", 1) for a in args.artifacts):
        backend = open_backend(path, "ort", threads=args.threads)
        for m in MODES:
            agree = sum(int((top1(backend, x, m)[k] == w[k]).sum()) for x, k, w in zip(inputs, keep, want[m]))
            out["top1_agreement"][f"{name} {m}"] = round(agree / out["tokens"], 4)
            print(f"{name:>10} {m:>9}: {agree / out['tokens']:.2%}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
