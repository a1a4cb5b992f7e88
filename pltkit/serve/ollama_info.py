"""Ollama's model listing and metadata: /api/tags, /api/show, /api/version and its root."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from pltkit.serve.body import read_json
from pltkit.serve.info import check_model_name
from pltkit.serve.loading import ServedModel
from pltkit.serve.parsing import json_object, model_name
from pltkit.serve.protocols import ollama_time
from pltkit.serve.server import Server


def ollama_template(model: ServedModel) -> str:
    fim = model.engine.tok.fim
    if fim is None:
        return "{{ .Prompt }}"
    t = model.engine.tok.id_to_token
    return (f"{{{{- if .Suffix }}}}{t(fim.prefix)}{{{{ .Prompt }}}}{t(fim.suffix)}{{{{ .Suffix }}}}"
            f"{t(fim.middle)}{{{{- else }}}}{{{{ .Prompt }}}}{{{{- end }}}}")


def ollama_details(model: ServedModel) -> dict:
    return {"format": model.details.get("format", ""), "family": "plt", "families": ["plt"],
            "parameter_size": model.details.get("parameter_size", ""),
            "quantization_level": model.details.get("precision", "").upper()}


async def ollama_tags(request: Request) -> Response:
    model = request.app.state.server.ready()
    modified = ollama_time(model.details.get("modified", 0))
    return JSONResponse({"models": [{"name": model.name, "model": model.name, "modified_at": modified,
                                     "size": model.details.get("size_bytes", 0), "digest": "",
                                     "details": ollama_details(model)}]})


async def ollama_show(request: Request) -> Response:
    server: Server = request.app.state.server
    model = server.ready()
    body = json_object(await read_json(request, server.limits))
    check_model_name(model_name(body), model)
    caps = ["completion"] + ["insert"] * (model.engine.tok.fim is not None) + \
        ["tools"] * bool(model.chat and model.chat.uses_tools)
    return JSONResponse({"template": ollama_template(model), "capabilities": caps, "parameters": "",
                         "license": "", "modelfile": "", "details": ollama_details(model),
                         "model_info": {"general.architecture": "plt", "plt.context_length": model.engine.context,
                                        **{f"plt.{k}": v for k, v in model.details.items()}}})


async def ollama_root(request: Request) -> Response:
    """Ollama answers its root so; some clients check it to find the server."""
    return PlainTextResponse("Ollama is running")


async def ollama_version(request: Request) -> Response:
    from importlib.metadata import version
    return JSONResponse({"version": version("pltkit")})
