"""plt-eval: held-out quality on the standard library's held-out files (the split the
default model was trained with).

A checkpoint: per-token loss and perplexity with the torch reference. An artifact: its
perplexity, next-token top-1 agreement and mean greedy-match length against a reference
(`--reference`, default: the default model), as written into quantized artifacts at export.

Both measure a fixed sample of held-out windows spread evenly over the set (the same ones every
run; seconds); `--windows all` measures every one (a minute or more). The output says how many
windows and tokens it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pltkit.cli import args as types
from pltkit.cli.args import HelpFormatter, message, one_line_errors
from pltkit.runtime.backends import BACKENDS
from pltkit.train.accuracy import SAMPLE_WINDOWS, accuracy_report


@one_line_errors("plt-eval")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plt-eval", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", default="default", help="checkpoint or artifact folder, or 'default'")
    p.add_argument("--reference", default="default", help="what an artifact is compared with")
    p.add_argument("--seq-len", type=types.positive_int,
                   help="evaluation window of a checkpoint (default: its context)")
    p.add_argument("--threads", type=types.positive_int, help="default: the physical cores")
    p.add_argument("--backend", choices=list(BACKENDS),
                   help="what runs an artifact (default: ort; onnx-reference for bfloat16 on a CPU)")
    p.add_argument("--windows", type=types.window_count, default=SAMPLE_WINDOWS, metavar="N|all",
                   help="held-out windows to measure, spread evenly over the set, or 'all'")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the artifact's files against the sha256s in its manifest (each file is "
                        "hashed once; later runs only stat it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from pltkit.model.paths import resolve_model_path
    from pltkit.runtime.artifact import is_artifact
    from pltkit.runtime.backends import physical_cores

    path = resolve_model_path(args.model)
    if is_artifact(path):
        try:
            report = accuracy_report(path, args.reference, args.threads, args.windows, args.backend,
                                     verify=not args.no_verify)
        except ValueError as e:
            print(f"plt-eval: {message(e)}", file=sys.stderr)
            return 2
        print(json.dumps({"model": str(args.model), "reference": str(args.reference), **report}))
        return 0

    import torch

    from pltkit.train.evaluate import checkpoint_report

    torch.set_num_threads(args.threads or physical_cores())
    print(json.dumps({"model": str(args.model), **checkpoint_report(path, args.seq_len, args.windows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
