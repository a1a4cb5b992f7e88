"""Where plt-serve listens: a Unix domain socket (mode 0600; a stale file from a dead server is
replaced, a live server's is not taken) and/or a TCP port, served by uvicorn."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pltkit.model.paths import user_cache_dir

if TYPE_CHECKING:
    import uvicorn


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


def serve(app, sockets: list[socket.socket], log_level: str = "warning",
          on_start: Callable[[uvicorn.Server], None] | None = None,
          on_shutdown: Callable[[], None] | None = None) -> None:
    """Run uvicorn on already bound sockets until a signal (or until whoever on_start gave the
    uvicorn server sets its should_exit). on_shutdown runs as shutdown begins, before uvicorn waits
    for the requests in flight: it should end their work. The caller removes its socket files."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            if on_shutdown is not None:
                on_shutdown()
            await super().shutdown(sockets)

    for s in sockets:
        s.listen(128)
    server = Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2))
    if on_start is not None:
        on_start(server)
    server.run(sockets=sockets)
