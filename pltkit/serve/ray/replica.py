"""The engine deployment: each replica runs plt-serve's own application (pltkit.serve.app: the
same routes, protocols, worker and engine) on one model, and answers the requests the ingress
forwards to it, as the ASGI messages of the response.

A request whose caller goes away (the ingress cancels the call when its client disconnects) is
seen by the application as its client's disconnect: the job is cancelled as in plt-serve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ray import serve

from pltkit.serve.access import Access
from pltkit.serve.app import create_app
from pltkit.serve.loading import open_model
from pltkit.serve.server import Limits, Server

OPEN = Access(hosts=("*",), origins=("*",))  # the ingress checked Host, Origin and the API key
REPLICA_HEADER = "x-pltkit-replica"  # on every response: the replica that answered


class EngineReplica:
    def __init__(self, model: str, backend: str | None, threads: int | None, cache_mb: int, verify: bool,
                 limits: Limits, setup: Callable[[Server], None] | None = None):
        """setup: called with the replica's Server once the model is in (a warm-up, instrumentation)."""
        self.server = Server(lambda max_slots: open_model(model, backend, threads, cache_mb << 20, verify=verify,
                                                          max_slots=max_slots), limits, access=OPEN)
        self.app = create_app(self.server)
        self.server.start()
        self.server.loaded.wait()  # the replica is ready (Ray routes to it) once the model is in
        if self.server.load_error:
            raise RuntimeError(self.server.load_error)
        if setup is not None:
            setup(self.server)
        self.id = serve.get_replica_context().replica_id.unique_id

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose decode worker has stopped is replaced."""
        if not self.server.worker.alive:
            raise RuntimeError("the decode worker has stopped")

    def __del__(self):
        self.server.stop()

    async def asgi(self, head: dict, body: bytes, prompt: str | None = None, replica: str | None = None):
        """The response to one HTTP request: {"status", "headers", "body"} for a whole response
        (one with a Content-Length); for a streamed one, {"status", "headers"}, then one {"body"}
        per chunk. head: the request's method, path, query_string, headers and client.
        prompt and replica are read by the router only (pltkit.serve.ray.router)."""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "scheme": "http", "root_path": "", "raw_path": head["path"].encode(), "server": ("replica", 0),
                 **head}
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await out.put(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda t: out.put_nowait(None) or t.cancelled() or t.exception())  # retrieved
        try:
            whole = None  # a response with a Content-Length: sent as one message, start and body
            while (message := await out.get()) is not None:
                if message["type"] == "http.response.start":
                    start = {"status": message["status"],
                             "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.id.encode())]}
                    if any(k.lower() == b"content-length" for k, _ in start["headers"]):
                        whole = {**start, "body": b""}
                    else:
                        yield start
                elif whole is not None:
                    whole["body"] += message.get("body", b"")
                    if not message.get("more_body"):
                        yield whole
                elif message.get("body"):
                    yield {"body": message["body"]}
            task.result()
        finally:
            gone.set()  # the caller left before the end: the application sees its client disconnect
