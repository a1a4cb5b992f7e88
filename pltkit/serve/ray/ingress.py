"""The team server's HTTP front: plt-serve's Gate (Host and Origin checks, the API key), routes and
body limits, then each request forwarded to an engine replica (pltkit.serve.ray.replica) with its
prompt's key for the router, and the replica's response relayed.

- A replica that is gone before it answers (killed, restarting): the request goes to another one.
- A replica that dies while it streams: the client gets an error event in its protocol's format
  and the end of the response, not a hang. A whole response comes in one message, after the job:
  a replica that dies before it is gone before answering.
- A client that disconnects: the call to the replica is cancelled, and the replica cancels the job.
- No replica free and Ray's queue for them full (max_queued_requests), or none deployed: 503.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ray.exceptions import ActorDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pltkit.serve.access import Access
from pltkit.serve.affinity import PromptKey, prompt_text
from pltkit.serve.app import KNOWN_PATHS, ROUTES
from pltkit.serve.body import off_loop, read_body
from pltkit.serve.completions import PROTOCOLS, error_event
from pltkit.serve.errors import EXCEPTION_HANDLERS, HTTPError, handler
from pltkit.serve.metrics import Metrics
from pltkit.serve.middleware import Gate
from pltkit.serve.ray.replica import REPLICA_HEADER
from pltkit.serve.server import Limits

log = logging.getLogger(__name__)
TRIES = 3  # replicas tried for a request whose replica died before answering
METHODS = ["GET", "HEAD", "POST"]  # the replica answers a method its route does not take with 405
RAY_ANSWERS = {BackPressureError: lambda e: (503, f"server busy: {e.message}"),
               DeploymentUnavailableError: lambda e: (503, f"no engine replica is available: {e.message}")}
DIED = "the engine replica serving this request died"


@dataclass
class Front:
    """What Gate checks a request against (plt-serve's Server has the same fields)."""

    access: Access = Access()
    api_key: str | None = None
    limits: Limits = Limits()
    metrics: Metrics = field(default_factory=Metrics)  # the ingress's request counts (each replica has its own)


def prompt_key(path: str, body: bytes) -> PromptKey | None:
    text = prompt_text(path, body)
    return PromptKey.of(text) if text else None


def create_ingress_app(engine, front: Front) -> Starlette:
    """engine: a DeploymentHandle of the engine deployment."""
    engine = engine.options(stream=True)

    async def forward(request: Request):
        body = await read_body(request, front.limits) if request.method == "POST" else b""
        head = {"method": request.method, "path": request.url.path, "query_string": request.url.query.encode(),
                "headers": [(k, v) for k, v in request.scope["headers"] if k != REPLICA_HEADER.encode()],
                "client": tuple(request.client) if request.client else None}
        kwargs = {"prompt": await off_loop(prompt_key, request.url.path, body),
                  "replica": request.headers.get(REPLICA_HEADER)}
        stream, start = await open_stream(engine, head, body, kwargs)
        if "body" in start:  # a whole response
            response = Response(start["body"], start["status"])
            response.raw_headers = list(start["headers"])
            return response
        return Relay(stream, start, PROTOCOLS.get(request.url.path))

    app = Starlette(routes=[Route(r.path, forward, methods=METHODS) for r in ROUTES],
                    exception_handlers={**EXCEPTION_HANDLERS, **{k: handler(a) for k, a in RAY_ANSWERS.items()}})
    app.add_middleware(Gate, server=front, known_paths=KNOWN_PATHS)
    return app


async def open_stream(engine, head: dict, body: bytes, kwargs: dict):
    """The call to a replica and its first message (a whole response, or a streamed one's status
    and headers), trying another replica when one dies before it answers. A whole response comes
    when the job is done: a client that leaves before then (this task is cancelled) cancels the call."""
    for _ in range(TRIES):
        stream = engine.asgi.remote(head, body, **kwargs)
        try:
            return stream, await stream.__anext__()
        except ActorDiedError as e:  # the job died with its replica: safe to run it again
            log.warning("a replica died before answering (%s); trying another", e.__class__.__name__)
        except BaseException:  # cancelled (Ray cancels the call too), or the replica unreachable but maybe running
            stream.cancel()
            raise
    raise HTTPError(503, "no engine replica could answer; try again")


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
            if not pump.done():  # the client left (or this task was cancelled): the replica cancels the job
                self.stream.cancel()
                pump.cancel()
            gone.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def pump(self, send) -> None:
        try:
            async for message in self.stream:
                await send({"type": "http.response.body", "body": message["body"], "more_body": True})
        except RequestCancelledError:
            pass  # the client left
        except Exception as e:
            self.stream.cancel()
            log.error("relaying a response failed: %s: %s", e.__class__.__name__, e)
            if self.proto is not None:
                status, message = (503, DIED) if isinstance(e, RayActorError) else (500, f"internal error: {e}")
                await send({"type": "http.response.body", "more_body": True,
                            "body": error_event(self.proto, status, message)})


async def until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
