"""plt-serve: the code-completion backend for editor plugins, on a local socket. Speaks
llama.cpp's server API (/infill, /completion, ...), OpenAI's /v1/completions and Ollama's
/api/generate. See docs/serve.md for pointing llama.vim, llama.vscode, Continue and Tabby at it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pltkit.runtime.backends import BACKENDS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plt-serve", description=__doc__)
    p.add_argument("--model", default="default", help="artifact or checkpoint folder, or 'default'")
    p.add_argument("--backend", choices=list(BACKENDS),
                   help="default: ort for an artifact, torch for a checkpoint; ort-cuda and trt need an NVIDIA GPU; "
                        "onnx-reference is slow, for bfloat16 artifacts on a CPU")
    p.add_argument("--socket", type=Path, help="Unix socket path (the default when --port is not given: "
                                               "$XDG_RUNTIME_DIR/pltkit/plt-serve.sock)")
    p.add_argument("--port", type=int, help="also (or only) listen on TCP; llama.vim and llama.vscode expect 8012")
    p.add_argument("--host", default="127.0.0.1", help="TCP host (a non-loopback host needs --api-key)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health")
    p.add_argument("--threads", type=int, help="decode threads (default: the physical cores)")
    p.add_argument("--slots", type=int, default=16, help="id_slot values a client may use (0..N-1)")
    p.add_argument("--max-predict", type=int, default=4096, help="largest n_predict accepted")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting before new ones get 503")
    p.add_argument("--cache-mb", type=int, default=256, help="memory for prefix states of earlier prompts")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    from pltkit.model.paths import CheckpointError, resolve_model_path
    from pltkit.serve.app import Limits, Server, create_app
    from pltkit.serve.listen import ListenError, bind_tcp, bind_unix, default_socket_path, is_loopback, serve
    from pltkit.serve.model import open_model

    if args.port is not None and not is_loopback(args.host) and not args.api_key:
        print(f"plt-serve: listening on {args.host} (not loopback) needs --api-key", file=sys.stderr)
        return 2
    try:
        resolve_model_path(args.model)  # a bad path fails now, not in the background
        sockets = []
        if args.socket is not None or args.port is None:
            path = args.socket or default_socket_path()
            sockets.append(bind_unix(path))
            print(f"plt-serve: listening on unix:{path}", file=sys.stderr)
        if args.port is not None:
            sockets.append(bind_tcp(args.host, args.port))
            print(f"plt-serve: listening on http://{args.host}:{args.port}", file=sys.stderr)
    except (ListenError, CheckpointError, OSError) as e:
        print(f"plt-serve: {e}", file=sys.stderr)
        return 2
    limits = Limits(max_body=args.max_body, max_predict=args.max_predict, slots=args.slots, max_queue=args.max_queue)
    server = Server(lambda: open_model(args.model, args.backend, args.threads, args.cache_mb << 20), limits,
                    args.api_key)
    serve(create_app(server), sockets, "info" if args.verbose else "warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
