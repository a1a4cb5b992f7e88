"""Gate, plt-serve's ASGI middleware: Host and Origin (Access), the API key (when set; /health
stays open), an error that escapes a route answered as JSON, and per-route request metrics."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from starlette.requests import Request

from pltkit.serve.access import key_matches
from pltkit.serve.errors import error_response

if TYPE_CHECKING:
    from pltkit.serve.server import Server

log = logging.getLogger(__name__)


class Gate:
    """known_paths: the routes' paths, by which requests are counted (any other is "other")."""

    def __init__(self, app, server: Server, known_paths: set[str]):
        self.app, self.server, self.known_paths = app, server, known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.known_paths else "other"
        start, status, started = time.perf_counter(), [500], [False]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            refusal = self.refusal(scope, path)
            if refusal:
                return await error_response(Request(scope), *refusal)(scope, receive, send_status)
            try:
                await self.app(scope, receive, send_status)
            except Exception as e:  # answered here: re-raised, the server would drop the connection
                if started[0]:
                    raise
                log.error("request failed: %s: %s", type(e).__name__, e)
                await error_response(Request(scope), 500, f"internal error: {type(e).__name__}: {e}")(
                    scope, receive, send_status)
        finally:
            m = self.server.metrics
            m.requests.labels(path, str(status[0])).inc()
            m.request_seconds.labels(path).observe(time.perf_counter() - start)

    def refusal(self, scope, path: str) -> tuple[int, str] | None:
        """The status and message of a request refused by Access or for its API key, or None."""
        refusal = self.server.access.refusal(scope)
        if refusal:
            return 403, refusal
        key = self.server.api_key
        if key and path != "/health" and not key_matches(dict(scope["headers"]).get(b"authorization", b""), key):
            return 401, "invalid or missing API key (Authorization: Bearer KEY)"
        return None
