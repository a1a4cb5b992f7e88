"""Who may talk to plt-serve: the Host and Origin a browser would send (Access) and the API key."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Access:
    """Who may talk to the server over TCP, as a browser would show it. A web page can make the
    browser send requests anywhere: a foreign Host header (DNS rebinding) or a foreign Origin (a
    cross-origin page) gets 403. Host names are compared without their port; "*" allows any. A
    request without an Origin (editors, curl) is not a browser's cross-origin request. Unix-socket
    clients are not checked: browsers cannot reach them, and file permissions guard them."""

    hosts: tuple[str, ...] = LOOPBACK_HOSTS
    origins: tuple[str, ...] = ()  # besides the server's own origin

    def refusal(self, scope) -> str | None:
        """Why a request is refused, or None."""
        if (scope.get("server") or ("", 0))[1] is None:  # a Unix socket
            return None
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if host and "*" not in self.hosts and host_name(host) not in self.hosts:
            return f"Host {host!r} is not allowed (plt-serve --allowed-hosts)"
        origin = headers.get(b"origin", b"").decode("latin-1").strip().lower().rstrip("/")
        if origin and "*" not in self.origins and origin not in self.origins and origin != f"http://{host}":
            return f"Origin {origin!r} is not allowed (plt-serve --allowed-origins)"
        return None


def host_name(host: str) -> str:
    """A Host header's name without its port: 'localhost:8012' -> 'localhost', '[::1]:80' -> '::1'."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def key_matches(authorization: bytes, key: str) -> bool:
    """Whether an Authorization header is 'Bearer KEY' (the scheme in any case, KEY as UTF-8 bytes,
    compared in constant time)."""
    scheme, _, token = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode("utf-8"))
