"""A real plt-serve (uvicorn on real sockets, a Unix socket and a TCP port) in a thread."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from pltkit.serve.app import create_app
from pltkit.serve.listen import Connections, bind_tcp, bind_unix, uvicorn_server
from pltkit.serve.server import Server

HANG = 600  # seconds after which a wait for an event counts as a hang: a guard, never a measurement


class Running:
    def __init__(self, server: Server, socket_path, connections: Connections = Connections()):
        self.server, self.socket_path = server, socket_path
        socks = [bind_unix(socket_path), bind_tcp("127.0.0.1", 0)]
        self.port = socks[1].getsockname()[1]
        for s in socks:
            s.listen(64)
        self.uvicorn = uvicorn_server(create_app(server), connections=connections)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": socks}, daemon=True)
        self.thread.start()
        self.clients = {"uds": self.client("uds"), "tcp": self.client("tcp")}
        # the sockets listen already: a request made now waits in the backlog until uvicorn serves it
        assert server.loaded.wait(HANG) and not server.load_error, server.load_error
        assert self.clients["tcp"].get("/health").status_code == 200

    def client(self, kind: str, timeout: float = HANG, **kw) -> httpx.Client:
        if kind == "uds":
            return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://plt",
                                timeout=timeout, **kw)
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=timeout, **kw)

    def stop(self) -> None:
        for c in self.clients.values():
            c.close()
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


def torch_hidden(folder: Path) -> str:
    """A PYTHONPATH entry under which a child process cannot import torch (a sitecustomize.py that
    refuses it), as on a machine without the torch extra."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\nclass _NoTorch:\n    def find_spec(self, name, *a):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
        "sys.meta_path.insert(0, _NoTorch())\n")
    return str(folder)


def wait_idle(server) -> float:
    """Seconds until the worker has answered and accounted for every job."""
    start = time.perf_counter()
    assert server.worker.idle.wait(HANG)
    return time.perf_counter() - start


@contextmanager
def held(server, which=lambda job: True, until=lambda job: job.cancel, step: str = "decode"):
    """Jobs that `which` picks are held at each `step` ("decode", or "prefill": before anything is
    generated) until `until(job)` (an Event, or the job's Cancel: by default they wait to be
    cancelled) is set: whatever the machine's load, they cannot finish before the test
    disconnects, supersedes or releases them."""
    backend, worker = server.model.engine.backend, server.worker
    real = getattr(backend, step)

    def hold(*args, **kw):
        job = worker.running
        if which(job):
            assert until(job).wait(HANG), "a held job was never released"
        return real(*args, **kw)

    setattr(backend, step, hold)
    try:
        yield
    finally:
        setattr(backend, step, real)
