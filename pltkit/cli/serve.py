"""plt-serve: the code-completion backend for editor plugins, on a local socket. Speaks
llama.cpp's server API (/infill, /completion, ...), OpenAI's /v1/completions and Ollama's
/api/generate. See docs/serve.md for pointing llama.vim, llama.vscode, Continue and Tabby at it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pltkit.cli import args as types
from pltkit.cli import serve_ray
from pltkit.cli.args import HelpFormatter, one_line_errors
from pltkit.runtime.backends import BACKENDS


@one_line_errors("plt-serve")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plt-serve", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="default", help="artifact or checkpoint folder, or 'default'")
    p.add_argument("--backend", choices=list(BACKENDS),
                   help="default: ort (a checkpoint is exported once to an ONNX artifact in the user cache and "
                        "served from there; torch serves it directly); ort-cuda and trt need an NVIDIA GPU; "
                        "onnx-reference is slow, for bfloat16 artifacts on a CPU")
    p.add_argument("--socket", type=Path, help="Unix socket path (the default when --port is not given: "
                                               "$XDG_RUNTIME_DIR/pltkit/plt-serve.sock)")
    p.add_argument("--port", type=types.port,
                   help="also (or only) listen on TCP; llama.vim and llama.vscode expect 8012")
    p.add_argument("--host", default="127.0.0.1", help="TCP host (a non-loopback host needs --api-key)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health (other "
                                     "local users see it in ps: prefer --api-key-file or $PLTKIT_API_KEY)")
    p.add_argument("--api-key-file", type=Path, help="read the API key from this file (its first line)")
    p.add_argument("--allowed-hosts", nargs="+", metavar="HOST", default=[],
                   help="Host names TCP requests may carry besides localhost, 127.0.0.1, ::1 and --host "
                        "('*': any); others get 403 (a guard against DNS rebinding)")
    p.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN", default=[],
                   help="browser origins allowed to call the server, e.g. http://localhost:3000 ('*': any); "
                        "by default a request with a foreign Origin header gets 403")
    p.add_argument("--threads", type=types.positive_int, help="decode threads (default: the physical cores)")
    p.add_argument("--slots", type=types.positive_int, default=16, help="id_slot values a client may use (0..N-1)")
    p.add_argument("--max-predict", type=types.positive_int, default=4096, help="largest n_predict accepted")
    p.add_argument("--max-body", type=types.positive_int, default=4 << 20, help="largest request body in bytes")
    p.add_argument("--max-queue", type=types.nonneg_int, default=16, help="requests waiting before new ones get 503")
    p.add_argument("--cache-mb", type=types.nonneg_int, default=256,
                   help="memory for the clients' prompt states (prefix caches), live ones included")
    p.add_argument("--max-connections", type=types.positive_int, default=256,
                   help="open connections at most (one more gets 503); lowered to fit the open-file limit")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the artifact's files against the sha256s in its manifest (each file is "
                        "hashed once; later runs only stat it)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    serve_ray.add_arguments(p)
    args = p.parse_args(argv)
    serve_ray.check(p, args)
    try:
        args.api_key = api_key(args)
    except OSError as e:
        p.error(f"--api-key-file: {e.strerror}: {e.filename}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    from pltkit.serve.listen import exit_on_signals, is_loopback

    if args.port is not None and not is_loopback(args.host) and not args.api_key:
        print(f"plt-serve: listening on {args.host} (not loopback) needs --api-key", file=sys.stderr)
        return 2
    exit_on_signals()
    ours: list[Path] = []  # the socket files this process made, removed at any exit
    try:
        return run(args, ours)  # a bad model path or a socket in use: one line and exit 2 (one_line_errors)
    finally:
        for path in ours:
            path.unlink(missing_ok=True)


def api_key(args) -> str | None:
    """--api-key, else the first line of --api-key-file, else $PLTKIT_API_KEY (empty: none)."""
    if args.api_key is None and args.api_key_file is not None:
        lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        return lines[0].strip() if lines else None
    return args.api_key or os.environ.get("PLTKIT_API_KEY") or None


def run(args, ours: list[Path]) -> int:
    from pltkit.model.paths import resolve_model_path
    from pltkit.runtime.backends import physical_cores
    from pltkit.serve.access import LOOPBACK_HOSTS, Access
    from pltkit.serve.app import create_app
    from pltkit.serve.listen import Connections, bind_tcp, bind_unix, default_socket_path, fitting_connections, serve
    from pltkit.serve.loading import open_model
    from pltkit.serve.server import Limits, Server

    resolve_model_path(args.model)  # a bad path fails now, not in the background
    limits = Limits(max_body=args.max_body, max_predict=args.max_predict, slots=args.slots, max_queue=args.max_queue)
    hosts = (*LOOPBACK_HOSTS, args.host.strip("[]").lower(), *(h.lower() for h in args.allowed_hosts))
    access = Access(hosts, tuple(o.lower().rstrip("/") for o in args.allowed_origins))
    if args.ray:
        return serve_ray.run(args, limits, access)
    sockets, where = [], []
    if args.socket is not None or args.port is None:
        path = args.socket or default_socket_path()
        sockets.append(bind_unix(path))
        ours.append(path)
        where.append(f"unix:{path}")
    if args.port is not None:
        sockets.append(bind_tcp(args.host, args.port))
        where.append(f"http://{args.host}:{args.port}")
    print(f"plt-serve: loading {args.model}; listening on {' and '.join(where)} (/health answers 503 until ready)",
          file=sys.stderr, flush=True)
    failed, uv = [], []

    def on_loaded(server: Server) -> None:
        if server.load_error:  # nothing could be served: exit rather than answer every request with 500
            failed.append(server.load_error)
            uv[0].should_exit = True
            return
        m = server.model
        d, serves = m.details, ["completion"]
        serves += ["infill" if m.engine.tok.fim is not None else "infill (prefix only)"]
        serves += ["chat"] if m.chat is not None else []
        print(f"plt-serve: ready: {m.name} ({d['format']} {d['precision']}, backend {d['backend']}, "
              f"{args.threads or physical_cores()} threads, {m.engine.context}-token context; {', '.join(serves)}) "
              f"on {' and '.join(where)}", file=sys.stderr, flush=True)

    server = Server(lambda max_slots: open_model(args.model, args.backend, args.threads, args.cache_mb << 20,
                                                 verify=not args.no_verify, max_slots=max_slots), limits,
                    args.api_key, on_loaded, access)
    connections = Connections(max_connections=fitting_connections(args.max_connections))
    serve(create_app(server), sockets, "info" if args.verbose else "warning", on_start=uv.append,
          on_shutdown=server.stop, connections=connections)  # work in flight ends at once: requests answer
    if failed:
        print(f"plt-serve: {' '.join(failed[0].split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
