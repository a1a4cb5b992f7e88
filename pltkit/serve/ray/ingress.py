"""The team server's HTTP front: plt-serve's Gate (Host and Origin checks, the API key) and body
limits, then each request forwarded to an engine replica (pltkit.serve.ray.replica) with its
prompt text for the router, and the replica's response relayed as it comes.

- A replica that is gone before it answers (killed, restarting): the request goes to another one.
- A replica that dies while it streams: the client gets an error event in its protocol's format
  and the end of the response, not a hang.
- A client that disconnects: the call to the replica is cancelled, and the replica cancels the job.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ray.exceptions import RayActorError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pltkit.serve.access import Access
from pltkit.serve.app import KNOWN_PATHS
from pltkit.serve.affinity import prompt_text
from pltkit.serve.body import off_loop, read_body
from pltkit.serve.completions import PROTOCOLS, error_event
from pltkit.serve.errors import EXCEPTION_HANDLERS, HTTPError
from pltkit.serve.metrics import Metrics
from pltkit.serve.middleware import Gate
from pltkit.serve.ray.replica import REPLICA_HEADER
from pltkit.serve.server import Limits

log = logging.getLogger(__name__)
TRIES = 3  # replicas tried for a request whose replica is gone before answering
METHODS = ["GET", "HEAD", "POST"]


@dataclass
class Front:
    """What Gate checks a request against (plt-serve's Server has the same fields)."""

    access: Access = Access()
    api_key: str | None = None
    limits: Limits = Limits()
    metrics: Metrics = field(default_factory=Metrics)  # the ingress's request counts (each replica has its own)


def create_ingress_app(engine, front: Front) -> Starlette:
    """engine: a DeploymentHandle of the engine deployment."""

    async def forward(request: Request):
        if request.url.path not in KNOWN_PATHS:
            raise HTTPError(404, f"no route {request.url.path}")
        body = await read_body(request, front.limits) if request.method == "POST" else b""
        head = {"method": request.method, "path": request.url.path, "query_string": request.url.query.encode(),
                "headers": [(k, v) for k, v in request.scope["headers"] if k != REPLICA_HEADER.encode()],
                "client": tuple(request.client) if request.client else None}
        kwargs = {"prompt": await off_loop(prompt_text, request.url.path, body),
                  "replica": request.headers.get(REPLICA_HEADER)}
        stream, start = await open_stream(engine, head, body, kwargs)
        if any(k.lower() == b"content-length" for k, _ in start["headers"]):  # a whole response: wait for it
            return await buffered(request, stream, start)
        return Relay(stream, start, PROTOCOLS.get(request.url.path))

    app = Starlette(routes=[Route("/{path:path}", forward, methods=METHODS)], exception_handlers=EXCEPTION_HANDLERS)
    app.add_middleware(Gate, server=front, known_paths=KNOWN_PATHS)
    return app


async def open_stream(engine, head: dict, body: bytes, kwargs: dict):
    """The call to a replica and its first message (the response's status and headers), trying
    another replica when one is gone before it answers."""
    for attempt in range(TRIES):
        stream = engine.options(stream=True).asgi.remote(head, body, **kwargs)
        try:
            return stream, await stream.__anext__()
        except RayActorError as e:
            log.warning("a replica was gone before answering (%s); trying another", type(e).__name__)
            if attempt == TRIES - 1:
                raise HTTPError(503, "no engine replica could answer; try again") from None


async def buffered(request: Request, stream, start: dict) -> Response:
    """A whole (not streamed) response, received before anything is sent: a replica that dies
    before the end gives a 503 in the route's error format."""
    chunks: list[bytes] = []

    async def receive_all():
        async for message in stream:
            chunks.append(message["body"])

    got, gone = asyncio.ensure_future(receive_all()), asyncio.ensure_future(until_disconnect(request.receive))
    try:
        await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not got.done():  # the client left (or this task was cancelled): the replica cancels the job
            stream.cancel()
            got.cancel()
        gone.cancel()
    if got.cancelled():
        return Response(status_code=499)  # nobody reads it
    try:
        got.result()
    except RayActorError as e:
        log.error("the replica died while answering: %s", type(e).__name__)
        raise HTTPError(503, "the engine replica serving this request died; try again") from None
    response = Response(b"".join(chunks), start["status"])
    response.raw_headers = list(start["headers"])
    return response


class Relay:
    """A streamed response of a replica, relayed as it comes (an ASGI response)."""

    def __init__(self, stream, start: dict, proto):
        self.stream, self.start, self.proto = stream, start, proto

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": self.start["status"], "headers": self.start["headers"]})
        pump = asyncio.ensure_future(self.pump(send))
        gone = asyncio.ensure_future(until_disconnect(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pump.done():  # the client left: the replica cancels the job
                self.stream.cancel()
                pump.cancel()
            gone.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def pump(self, send) -> None:
        try:
            async for message in self.stream:
                await send({"type": "http.response.body", "body": message["body"], "more_body": True})
        except RayActorError as e:
            log.error("the replica died while answering: %s", type(e).__name__)
            if self.proto is not None:
                await send({"type": "http.response.body", "more_body": True,
                            "body": error_event(self.proto, 503, "the engine replica serving this request died")})


async def until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
