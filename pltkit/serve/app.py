"""plt-serve's HTTP application (Starlette): the route table, the error handlers and the
middleware around them. The model loads in the background; until it is in, /health answers 503.

Every error is JSON with a 4xx/5xx status, in the shape of the route's protocol; a failure
inside generation is a 500 for that request and the worker goes on with the next.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route

from pltkit.serve.completions import PROTOCOLS, complete
from pltkit.serve.errors import EXCEPTION_HANDLERS
from pltkit.serve.info import detokenize, health, metrics, model_by_id, models, props, tokenize
from pltkit.serve.middleware import Gate
from pltkit.serve.ollama_info import ollama_root, ollama_show, ollama_tags, ollama_version
from pltkit.serve.server import Server

ROUTES = [
    Route("/health", health), Route("/props", props), Route("/v1/models", models), Route("/models", models),
    Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
    Route("/metrics", metrics),
    *(Route(path, complete, methods=["POST"]) for path in PROTOCOLS),
    Route("/api/tags", ollama_tags), Route("/api/show", ollama_show, methods=["POST"]),
    Route("/api/version", ollama_version), Route("/", ollama_root, methods=["GET", "HEAD"]),
    Route("/v1/models/{id:path}", model_by_id),
]
KNOWN_PATHS = {r.path for r in ROUTES}


def create_app(server: Server) -> Starlette:
    @asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        server.stop()

    app = Starlette(routes=ROUTES, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.server = server
    app.add_middleware(Gate, server=server, known_paths=KNOWN_PATHS)
    return app
