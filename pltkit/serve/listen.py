"""Where plt-serve listens: a Unix domain socket (mode 0600; a stale file from a dead server is
replaced, a live server's is not taken) and/or a TCP port, served by uvicorn."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from pltkit.model.paths import user_cache_dir


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


def serve(app, sockets: list[socket.socket], log_level: str = "warning") -> None:
    """Run uvicorn on already bound sockets until interrupted; remove our socket files after."""
    import uvicorn

    paths = [Path(s.getsockname()) for s in sockets if s.family == socket.AF_UNIX]
    for s in sockets:
        s.listen(128)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: make that an exit that
    # runs the cleanup below rather than a kill
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
