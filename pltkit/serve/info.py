"""The routes about the model and the server: /health, /props, the OpenAI model listing,
/tokenize and /detokenize, and the Prometheus /metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pltkit.serve.body import off_loop, read_json
from pltkit.serve.errors import HTTPError
from pltkit.serve.loading import ServedModel
from pltkit.serve.protocols import LlamaCpp
from pltkit.serve.server import Server


async def health(request: Request) -> Response:
    server: Server = request.app.state.server
    server.ready()
    return JSONResponse({"status": "ok"})


def abilities(model: ServedModel) -> dict:
    """What the model can serve: chat (it has a chat template) and infill with FIM tokens."""
    return {"chat": model.chat is not None, "infill": model.engine.tok.fim is not None}


def model_entry(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": model.details.get("modified", 0), "owned_by": "pltkit",
            "meta": {**model.details, **abilities(model)}}


async def models(request: Request) -> Response:
    model = request.app.state.server.ready()
    return JSONResponse({"object": "list", "data": [model_entry(model)]})


async def model_by_id(request: Request) -> Response:
    model = request.app.state.server.ready()
    if request.path_params["id"] != model.name:
        raise HTTPError(404, f"model {request.path_params['id']!r} not found: this server has {model.name!r}")
    return JSONResponse(model_entry(model))


def check_model_name(name: str, model: ServedModel) -> None:
    """Ollama's names carry a tag (":latest" when none is given); an unknown name is a 404, as there."""
    if name not in (model.name, f"{model.name}:latest"):
        raise HTTPError(404, f"model {name!r} not found: this server has {model.name!r}")


async def props(request: Request) -> Response:
    server: Server = request.app.state.server
    model = server.ready()
    return JSONResponse({"model_path": model.name, "total_slots": server.limits.slots,
                         "n_ctx": model.engine.context, "build_info": "pltkit",
                         **abilities(model), "chat_template": model.chat.source if model.chat else "",
                         "default_generation_settings": {"n_ctx": model.engine.context, **LlamaCpp.defaults},
                         "limits": {"max_body": server.limits.max_body, "max_predict": server.limits.max_predict,
                                    "max_queue": server.limits.max_queue}})


TOKENIZE_CONTEXTS = 4  # /tokenize takes texts of up to this many contexts' worth of characters


async def tokenize(request: Request) -> Response:
    server: Server = request.app.state.server
    engine = server.ready().engine
    tok = engine.tok
    body = await read_json(request, server.limits)
    content = body.get("content") if isinstance(body, dict) else None
    if not isinstance(content, str) or any(not isinstance(body.get(k, False), bool)
                                           for k in ("parse_special", "with_pieces")):
        raise HTTPError(400, "tokenize needs {\"content\": string, \"parse_special\"?: bool, \"with_pieces\"?: bool}")
    limit = TOKENIZE_CONTEXTS * engine.context_chars
    if len(content) > limit:  # more tokens than any prompt could use: not worth the time and memory
        raise HTTPError(413, f"content of {len(content)} characters exceeds the limit of {limit} "
                             f"({TOKENIZE_CONTEXTS} contexts of {engine.context} tokens)")

    def run() -> JSONResponse:  # the answer's JSON too: a context's worth of tokens
        ids = tok.encode_with_specials(content) if body.get("parse_special") else tok.encode(content)
        if body.get("with_pieces"):
            return JSONResponse({"tokens": [{"id": i, "piece": tok.decode_continuation([i])} for i in ids]})
        return JSONResponse({"tokens": ids})

    return await off_loop(run)


async def detokenize(request: Request) -> Response:
    server: Server = request.app.state.server
    tok = server.ready().engine.tok
    body = await read_json(request, server.limits)
    ids = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not await off_loop(lambda: all(type(i) is int and 0 <= i < tok.vocab_size
                                                                   for i in ids)):
        raise HTTPError(400, f"detokenize needs {{\"tokens\": [ids in 0..{tok.vocab_size - 1}]}}")
    return await off_loop(lambda: JSONResponse({"content": tok.decode(ids)}))


async def metrics(request: Request) -> Response:
    server: Server = request.app.state.server
    if server.worker is not None:
        server.metrics.queue.set(server.worker.queued)
        server.metrics.busy.set(0 if server.worker.idle.is_set() else 1)
    return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")
