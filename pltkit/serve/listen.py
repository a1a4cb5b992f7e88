"""Where plt-serve listens: a Unix domain socket (mode 0600; a stale file from a dead server is
replaced, a live server's is not taken) and/or a TCP port, served by uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pltkit.model.paths import user_cache_dir

if TYPE_CHECKING:
    import uvicorn


log = logging.getLogger(__name__)


class ListenError(Exception):
    pass


def default_socket_path() -> Path:
    """$XDG_RUNTIME_DIR/pltkit/plt-serve.sock, else the user cache folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return (Path(runtime) / "pltkit" if runtime else user_cache_dir()) / "plt-serve.sock"


def bind_unix(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ListenError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale: its server is gone
        else:
            raise ListenError(f"a server is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the file is created 0600: no window where others could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP (not 0) so that asyncio sets TCP_NODELAY on accepted connections: without
    # it a response's headers and body wait on the client's delayed ACK, 40 ms a request
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def exit_on_signals() -> None:
    """SIGTERM exits with 143 and SIGINT (Ctrl-C) with 0, through SystemExit, so that `finally`
    blocks run: installed first thing, and again by uvicorn around its run, which shuts down
    gracefully and then raises the signal again."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))


@dataclass(frozen=True)
class Connections:
    """Limits on connections that uvicorn does not set: a connection must send its request line
    and headers within head_timeout seconds (each request's, on a kept-alive one; slowloris), and
    at most max_connections are open (one more is answered 503 and closed, so idle ones cannot use
    up the process's file descriptors)."""

    max_connections: int = 256
    head_timeout: float = 10.0


BACKLOG = 64  # connections waiting in the kernel, and accepted at most per event-loop turn
LINGERING = 64  # refused connections kept until their client has read the 503; past it, closed at once


def fitting_connections(wanted: int) -> int:
    """`wanted`, lowered (with a warning) to fit the process's open-file limit, after raising its
    soft limit towards the hard one (as Go's runtime does). Left free: 64 descriptors for the
    process, the refused connections that linger, and the connections of four accept turns,
    which arrive before those over the limit are refused. Past the limit accept() fails, and no
    one can connect."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft != infinite:
        raised = max(soft, 1 << 16 if hard == infinite else min(hard, 1 << 16))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):  # above the system's maximum (macOS)
            pass
    spare = 64 + LINGERING + 4 * BACKLOG
    room = wanted if soft == infinite else min(wanted, max(1, soft - spare))
    if room < wanted:
        print(f"plt-serve: {room} connections at most: the open-file limit is {soft} (ulimit -n)", file=sys.stderr)
    return room


class AcceptErrors:
    """An event loop's exception handler that logs a failed accept() (out of file descriptors) as one
    line at most every 10 s: asyncio logs a traceback for every retry, up to the backlog in each
    turn of the loop, which floods the log. Anything else goes to the default handler."""

    def __init__(self):
        self.last, self.count = -math.inf, 0

    def __call__(self, loop, context) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            return loop.default_exception_handler(context)
        self.count += 1
        if time.monotonic() - self.last >= 10:
            log.warning("cannot accept connections (%s, %d times); asyncio retries every second",
                        context.get("exception"), self.count)
            self.last, self.count = time.monotonic(), 0


_TOO_MANY_BODY = b'{"error": {"code": 503, "message": "too many open connections", "type": "unavailable_error"}}'
TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(_TOO_MANY_BODY), _TOO_MANY_BODY))


class Guard:
    """What guarded_protocol adds to uvicorn's HTTP/1.1 protocol: `limits` (Connections) on the
    number of connections and on how long the server waits for a client."""

    limits: Connections
    refused = False
    _timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        served = sum(not c.refused for c in self.connections)
        if served > self.limits.max_connections:
            self._refuse(lingering=len(self.connections) - served)
        else:
            self._watch()

    def _refuse(self, lingering: int) -> None:
        """A 503 and a half-close. The connection stays until the client closes its side (a
        second at most), and what it sends is dropped: closed with its request unread, the
        kernel would reset it and the client would never see the 503. Past LINGERING refused
        connections at a time, the next is closed at once."""
        self.refused = True
        if lingering >= LINGERING:
            self.transport.close()
            return
        self.transport.write(TOO_MANY)
        self.transport.write_eof()
        self._timer = self.loop.call_later(1.0, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)
            self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def _waiting(self) -> bool:
        """Whether the server waits on the client while nothing runs: for a request head, or
        for the rest of a body the server answered without reading it (an error: the client is
        told, and has head_timeout seconds to stop or close)."""
        return (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing()

    def _watch(self) -> None:
        waiting = self._waiting()
        if waiting and self._timer is None:
            self._timer = self.loop.call_later(self.limits.head_timeout, self._late)
        elif not waiting and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        self._timer = None
        if self._waiting():
            self.transport.close()


def guarded_protocol(limits: Connections) -> type:
    """uvicorn's HTTP/1.1 protocol (h11) under `limits`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return type("Guarded", (Guard, H11Protocol), {"limits": limits})


def uvicorn_server(app, log_level: str = "warning", connections: Connections = Connections(),
                   on_shutdown: Callable[[], None] | None = None) -> uvicorn.Server:
    """A uvicorn server for `app` under `connections`, on asyncio (AcceptErrors knows its messages).
    on_shutdown runs as shutdown begins, before uvicorn waits for the requests in flight."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            asyncio.get_running_loop().set_exception_handler(AcceptErrors())
            await super().startup(sockets)

        async def shutdown(self, sockets=None):
            if on_shutdown is not None:
                on_shutdown()
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2, loop="asyncio",
                                 http=guarded_protocol(connections), backlog=BACKLOG))


def serve(app, sockets: list[socket.socket], log_level: str = "warning",
          on_start: Callable[[uvicorn.Server], None] | None = None,
          on_shutdown: Callable[[], None] | None = None, connections: Connections = Connections()) -> None:
    """Run uvicorn on already bound sockets until a signal (or until whoever on_start gave the
    uvicorn server sets its should_exit). on_shutdown runs as shutdown begins, before uvicorn waits
    for the requests in flight: it should end their work. The caller removes its socket files."""
    for s in sockets:
        s.listen(BACKLOG)
    server = uvicorn_server(app, log_level, connections, on_shutdown)
    if on_start is not None:
        on_start(server)
    server.run(sockets=sockets)
