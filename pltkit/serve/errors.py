"""Errors as JSON: every refusal and failure is a 4xx/5xx answer in the shape of the route's
protocol (Ollama's under /api/, llama.cpp's elsewhere)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from pltkit.runtime.completion import RequestError
from pltkit.serve.protocols import LlamaCpp, Ollama
from pltkit.serve.worker import Busy


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_response(request: Request, status: int, message: str) -> JSONResponse:
    shape = Ollama if request.url.path.startswith("/api/") else LlamaCpp
    return JSONResponse(shape.error(status, message), status_code=status)


# the exceptions a route may raise, each with its status and message (subclasses included)
ANSWERS = {
    HTTPError: lambda e: (e.status, e.message),
    RequestError: lambda e: (400, str(e)),
    Busy: lambda e: (503, f"server busy: {e}"),
    HTTPException: lambda e: (e.status_code, e.detail or "error"),
}


def handler(answer):
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, *answer(exc))

    return on_error


EXCEPTION_HANDLERS = {kind: handler(answer) for kind, answer in ANSWERS.items()}
