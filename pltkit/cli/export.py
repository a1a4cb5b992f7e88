"""plt-export: export a PLT checkpoint to an ONNX artifact folder that ONNX Runtime runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pltkit.cli import args as types
from pltkit.cli.args import HelpFormatter, one_line_errors
from pltkit.model.formats import FLOAT_TYPES
from pltkit.train.accuracy import SAMPLE_WINDOWS, accuracy_report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plt-export", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="default", help="checkpoint folder or 'default'")
    p.add_argument("-o", "--out", type=Path, help="artifact folder (default: ./<checkpoint name>-fp32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--int8", dest="quant", action="store_const", const="int8",
                           help="int8 linear layers: weight-only MatMulNBits for ONNX Runtime (--target ort), "
                                "or calibrated Q/DQ for TensorRT (--target trt)")
    precision.add_argument("--int4", dest="quant", action="store_const", const="int4",
                           help="4-bit block-wise weight-only linear layers (MatMulNBits, block 32)")
    precision.add_argument("--int4-asym", dest="quant", action="store_const", const="int4-asym",
                           help="4-bit min/max blocks with offsets: keeps a llama.cpp Q4_1 import's weights as they "
                                "are (about 1.2x slower decode than --int4)")
    precision.add_argument("--int8-dq", dest="quant", action="store_const", const="int8-dq",
                           help="experimental: int8 weights per output column with activations quantized per tensor "
                                "at run time (DynamicQuantizeMatMul): faster than --int8, but a model with outlier "
                                "activations loses much accuracy (SmolLM2-135M: 64.5 %% top-1 agreement with "
                                "llama.cpp Q8_0, --int8 96.1 %%; docs/quantization.md)")
    precision.add_argument("--int8-dq-sq", dest="quant", action="store_const", const="int8-dq-sq",
                           help="experimental: --int8-dq with SmoothQuant (alpha 0.65; ranges calibrated on code, --calib) "
                                "and down_proj as --int8: activation outlier channels moved into the weights (SmolLM2-135M: "
                                "94.1 %% top-1 agreement with llama.cpp Q8_0)")
    precision.add_argument("--fp8", dest="quant", action="store_const", const="fp8",
                           help="float8e4m3fn Q/DQ for TensorRT on Hopper/Ada (emulated by ONNX Runtime on CPU)")
    p.add_argument("--target", choices=["ort", "trt"], default="ort", help="runtime the int8 form is for")
    p.add_argument("--dtype", choices=list(FLOAT_TYPES), default="float32",
                   help="float type of an unquantized export: weights, activations and cache (half types are for "
                        "GPUs: TensorRT, ONNX Runtime CUDA)")
    p.add_argument("--engine", choices=["trt"], help="also build TensorRT engines for this machine's GPU (needs an "
                                                     "NVIDIA GPU and TensorRT); given an artifact, only build them")
    p.add_argument("--calib", type=types.existing_dir,
                   help="folder of .py files for calibration (default: the held-out split)")
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy report of a quantized export")
    p.add_argument("--eval-windows", type=types.window_count, default=SAMPLE_WINDOWS, metavar="N|all",
                   help="held-out windows the accuracy report measures, spread evenly over the set (the same ones "
                        "every run; seconds); 'all' measures every one (about 94k tokens: a minute or more)")
    return p


@one_line_errors("plt-export")
def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.target == "trt" and args.quant in (None, "int4", "int4-asym", "int8-dq", "int8-dq-sq"):
        p.error("--target trt applies to --int8 (--fp8 is for TensorRT already)")
    if args.quant and args.dtype != "float32":
        p.error("--dtype applies to the unquantized export (quantized forms keep their float parts in float32)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pltkit.model.paths import resolve_model_path
    resolve_model_path(args.checkpoint)  # a bad path fails now, before torch is imported
    if args.engine:
        if args.quant in ("int4", "int4-asym", "int8-dq", "int8-dq-sq"):
            p.error(f"--engine trt builds float (--dtype), --int8 (Q/DQ) or --fp8 engines; {args.quant} is for "
                    f"ONNX Runtime")
        from pltkit.gpu.trt_engine import GpuUnavailable, require
        try:
            require()  # before a long export: say at once what is missing
        except GpuUnavailable as e:
            say(f"--engine trt: {e}")
            return 2
        args.target = "trt"  # --int8 for TensorRT is the Q/DQ form
        from pltkit.runtime.artifact import is_artifact
        if is_artifact(Path(str(args.checkpoint))):
            return build_engines(Path(str(args.checkpoint)))

    try:
        from pltkit.export.artifact import ExportError, check_output, export
    except ImportError as e:
        say(f"needs PyTorch ({e.name} is not installed): pip install 'pltkit[torch]'")
        return 2
    from pltkit.model.config import ConfigError
    from pltkit.model.paths import CheckpointError
    from pltkit.quant.schemes import QDQ_SCHEMES, SCHEMES
    from pltkit.train.calibrate import calibrate

    scheme_name = "int8-qdq" if args.quant == "int8" and args.target == "trt" else args.quant
    out = args.out or Path(f"{Path(str(args.checkpoint)).name}-{scheme_name or FLOAT_TYPES[args.dtype].short}")
    try:
        check_output(out, args.force)  # before calibrating: a busy folder fails now, not minutes later
        scheme = {**SCHEMES, **QDQ_SCHEMES}[scheme_name] if scheme_name else None
        if getattr(scheme, "calibrated", False):
            scheme = scheme.with_calibration(calibrate(args.checkpoint, args.calib, say=say))
        export(args.checkpoint, out, force=args.force, quant=scheme, dtype=args.dtype)
    except (ExportError, CheckpointError, ConfigError, ValueError) as e:
        say(str(e).replace("\n", " "))
        return 2
    except KeyboardInterrupt:
        say("interrupted; nothing was written")
        return 130
    if args.quant and not args.no_eval:
        add_accuracy_report(out, args.checkpoint, args.eval_windows)
    if args.engine and build_engines(out) != 0:
        return 2
    print(out)
    return 0


def say(message: str) -> None:
    """A line to stderr, for the user: progress and errors."""
    print(f"plt-export: {message}", file=sys.stderr)


def build_engines(artifact: Path) -> int:
    from pltkit.gpu.trt_engine import build

    say(f"building TensorRT engines for {artifact}")
    try:
        folder = build(artifact)
    except (RuntimeError, ValueError) as e:
        say(str(e))
        return 2
    print(folder)
    return 0


def add_accuracy_report(artifact: Path, reference, windows: int | None) -> None:
    """Held-out perplexity, top-1 agreement and greedy-match length against the checkpoint (the
    torch reference), printed and stored in the manifest."""
    from pltkit.runtime.artifact import update_manifest

    sample = f"{windows} held-out windows (--eval-windows all: every one)" if windows else "every held-out window"
    say(f"measuring accuracy against the float32 reference on {sample}; --no-eval skips")
    report = accuracy_report(artifact, reference, windows=windows)
    print(json.dumps(report), file=sys.stderr)
    update_manifest(artifact, lambda m: m.update(accuracy={"reference": "float32 checkpoint (torch)", **report}))


if __name__ == "__main__":
    sys.exit(main())
