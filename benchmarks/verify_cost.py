"""What verifying an artifact at load costs: a ~1 GB artifact (random weights at the bench's large
shape, fewer layers) opened without verification, verified the first time (every file hashed) and
verified again (each file only stat'ed: its sha256 is remembered in the user cache by identity).
Times the check alone (Artifact.open) and a whole load (open_backend on ONNX Runtime), medians of
interleaved repeats, in one process; prints a table, then one JSON line.

    python benchmarks/verify_cost.py [--layers 4] [--repeats 3] [--workdir DIR]

The files are in the page cache after the export, so the first check measures sha256 over memory,
not the disk: a cold read of a multi-GB file adds the disk's read time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pltkit.runtime.artifact import Artifact
from pltkit.runtime.backends import open_backend


def make_artifact(workdir: Path, layers: int) -> Path:
    import torch

    from pltkit.bench.loops import SHAPES
    from pltkit.export.artifact import export
    from pltkit.model.checkpoint import save_checkpoint
    from pltkit.model.config import PLTConfig
    from pltkit.model.paths import resolve_model_path
    from pltkit.model.plt import PLTForCausalLM
    from pltkit.train.train import init_weights

    art = workdir / f"large-{layers}-fp32"
    if (art / "pltkit.json").is_file():
        return art
    src = resolve_model_path("default")
    torch.manual_seed(0)
    model = PLTForCausalLM(PLTConfig.from_json(src / "config.json").replace(**SHAPES["large"]).replace(
        num_hidden_layers=layers))
    init_weights(model)
    save_checkpoint(model, workdir / "ckpt")
    shutil.copy(src / "tokenizer.json", workdir / "ckpt")
    del model
    export(workdir / "ckpt", art, force=True)
    shutil.rmtree(workdir / "ckpt")
    return art


def seconds(fn) -> float:
    start = time.perf_counter()
    result = fn()
    took = time.perf_counter() - start
    del result
    gc.collect()
    return took


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="4: a 1.1 GB weights.bin")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="keep the artifact here between runs (default: a temporary folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        art = make_artifact(workdir, args.layers)
        size = sum(f.stat().st_size for f in art.iterdir())
        cache = Path(tmp) / "cache"
        os.environ["XDG_CACHE_HOME"] = str(cache)  # a private user cache: "first" starts from nothing remembered

        steps = {"check": lambda verify: Artifact.open(art, verify),
                 "load": lambda verify: open_backend(art, "ort", args.threads, verify)}
        times = {(what, run): [] for what in steps for run in ("unverified", "first", "second")}
        for _ in range(args.repeats):
            for what, step in steps.items():
                shutil.rmtree(cache, ignore_errors=True)
                times[what, "unverified"].append(seconds(lambda: step(False)))
                times[what, "first"].append(seconds(lambda: step(True)))
                times[what, "second"].append(seconds(lambda: step(True)))
        med = {f"{what}_{run}_s": round(statistics.median(t), 4) for (what, run), t in times.items()}

    print(f"artifact: {size / 1e9:.2f} GB ({args.layers} layers), {args.repeats} repeats, medians")
    print(f"{'':>8} {'unverified':>11} {'first (hash)':>13} {'second (stat)':>14} {'second - unverified':>20}")
    for what in steps:
        u, f, s = (med[f"{what}_{run}_s"] for run in ("unverified", "first", "second"))
        print(f"{what:>8} {u:>10.3f}s {f:>12.3f}s {s:>13.3f}s {s - u:>+19.3f}s")
    hash_s = med["check_first_s"] - med["check_unverified_s"]
    print(json.dumps({"bytes": size, "layers": args.layers, "repeats": args.repeats, **med,
                      "sha256_gb_per_s": round(size / 1e9 / hash_s, 2),
                      "load_second_minus_unverified_s": round(med["load_second_s"] - med["load_unverified_s"], 4),
                      "load_first_over_unverified": round(med["load_first_s"] / med["load_unverified_s"], 2),
                      "load_second_over_unverified": round(med["load_second_s"] / med["load_unverified_s"], 3)}))


if __name__ == "__main__":
    main()
