"""plt-lsp: code completions in any editor that speaks the Language Server Protocol, no plugin:
a language server over stdio (textDocument/inlineCompletion and textDocument/completion) on the
same completion engine as plt-serve, in process. Settings (initializationOptions or the
workspace/configuration section "pltkit"): see pltkit/lsp/options.py and docs/lsp.md."""

from __future__ import annotations

import argparse
import logging
import sys

from pltkit.cli import args as types
from pltkit.cli.args import HelpFormatter, one_line_errors
from pltkit.runtime.backends import BACKENDS


@one_line_errors("plt-lsp")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plt-lsp", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="default", help="artifact or checkpoint folder, or 'default'")
    p.add_argument("--backend", choices=list(BACKENDS),
                   help="default: ort (a checkpoint is exported once to an ONNX artifact in the user cache); "
                        "ort-cuda and trt need an NVIDIA GPU")
    p.add_argument("--threads", type=types.positive_int, help="decode threads (default: the physical cores)")
    p.add_argument("--cache-mb", type=types.nonneg_int, default=256,
                   help="memory for the documents' prompt states (prefix caches)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the artifact's files against the sha256s in its manifest")
    p.add_argument("-v", "--verbose", action="store_true", help="log to stderr what the server does")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")

    from pltkit.lsp.server import create_server
    from pltkit.model.tokenizer import PLTTokenizer
    from pltkit.runtime.backends import open_fastest
    from pltkit.runtime.engine import Engine

    runner, path = open_fastest(args.model, args.backend, args.threads, not args.no_verify)
    engine = Engine(runner, PLTTokenizer.from_dir(path), cache_bytes=args.cache_mb << 20)
    print(f"plt-lsp: ready: {args.model} (backend {engine.backend.name}, {engine.context}-token context); "
          "speaking LSP on stdin/stdout", file=sys.stderr, flush=True)
    server = create_server(engine)
    try:
        server.start_io()
    finally:
        server.worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
