"""plt-serve as a user starts it: a private socket, a stale socket file replaced, a live one not
taken, a non-loopback host refused without an API key, one line when it is ready, and a clean
exit on SIGINT or SIGTERM at any moment of its start and under load."""

import os
import queue
import signal
import stat
import subprocess
import threading

import httpx
import pytest
from serving import HANG, torch_hidden

from pltkit.model.paths import resolve_model_path
from pltkit.runtime.backends import cached_artifact


class Serve:
    """plt-serve in a subprocess; its stderr lines are read as they come, so tests wait on them."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen(["plt-serve", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines, self._seen = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, words: str) -> str:
        while (line := self.lines.get(timeout=HANG)) is not None:
            self._seen.append(line)
            if words in line:
                return line
        raise AssertionError(f"plt-serve ended (rc {self.proc.wait()}) without {words!r}: {''.join(self._seen)}")

    def stop(self, sig) -> tuple[int, str]:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=HANG)
        while (line := self.lines.get(timeout=HANG)) is not None:
            self._seen.append(line)
        return rc, "".join(self._seen)


def uds_client(sock, **kw):
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://plt", timeout=HANG, **kw)


def test_socket_lifecycle(tmp_path):
    sock = tmp_path / "run" / "plt.sock"
    first = Serve("--socket", str(sock))
    try:
        ready = first.wait_line("plt-serve: ready:")
        print(ready)
        assert f"unix:{sock}" in ready and "backend ort" in ready and "threads" in ready
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        client = uds_client(sock)
        r = client.post("/infill", json={"input_prefix": "def add(a, b):\n", "input_suffix": "", "n_predict": 4})
        assert r.status_code == 200 and r.json()["tokens_predicted"] <= 4
        second = subprocess.run(["plt-serve", "--socket", str(sock)], capture_output=True, text=True, timeout=HANG)
        assert second.returncode == 2 and "already listening" in second.stderr
    finally:
        first.proc.send_signal(signal.SIGKILL)  # dies without removing its socket file
        first.proc.wait()
    assert sock.exists()
    third = Serve("--socket", str(sock))
    third.wait_line("plt-serve: ready:")  # the stale file was replaced
    rc, _ = third.stop(signal.SIGTERM)
    assert rc == 143 and not sock.exists()  # a clean exit removes its socket


def test_refusals(tmp_path):
    public = subprocess.run(["plt-serve", "--host", "0.0.0.0", "--port", "8013"], capture_output=True, text=True)
    assert public.returncode == 2 and "--api-key" in public.stderr
    bad = subprocess.run(["plt-serve", "--model", str(tmp_path / "nothing"), "--socket", str(tmp_path / "s")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a model folder" in bad.stderr
    (tmp_path / "file").write_text("x")
    taken = subprocess.run(["plt-serve", "--socket", str(tmp_path / "file")], capture_output=True, text=True)
    assert taken.returncode == 2 and "not a socket" in taken.stderr and (tmp_path / "file").read_text() == "x"


def test_ray_refusals(tmp_path):
    """plt-serve --ray: TCP only, the same guards, a bad model before Ray starts, and Ray missing."""
    cases = [(["--ray"], "give --port"), (["--ray", "--port", "8013", "--socket", str(tmp_path / "s")], "give --port"),
             (["--ray", "--host", "0.0.0.0", "--port", "8013"], "--api-key"),
             (["--ray", "--port", "8013", "--model", str(tmp_path / "nothing")], "not a model folder")]
    for args, message in cases:
        r = subprocess.run(["plt-serve", *args], capture_output=True, text=True, timeout=HANG)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    hidden = tmp_path / "no-ray"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(
        "import sys\nclass _NoRay:\n    def find_spec(self, name, *a):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n"
        "sys.meta_path.insert(0, _NoRay())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(["plt-serve", "--ray", "--port", "8013"], capture_output=True, text=True, env=env, timeout=HANG)
    assert r.returncode == 2 and "pip install 'pltkit[ray]'" in r.stderr, r.stderr


def test_a_model_that_cannot_load_exits_2_with_one_line(tmp_path):
    """Without torch a checkpoint cannot be exported: plt-serve says so and exits, rather than
    answering every request with 500. (Here torch is hidden from the child process.)"""
    env = {**os.environ, "PYTHONPATH": torch_hidden(tmp_path / "blocker"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run(["plt-serve", "--socket", str(tmp_path / "s.sock")], capture_output=True, text=True,
                       env=env, timeout=HANG)
    print(r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "torch" in r.stderr.strip().splitlines()[-1].lower() and not (tmp_path / "s.sock").exists()


@pytest.fixture(scope="module")
def cached():
    """The default model's artifact in the user cache that plt-serve uses (see conftest.py)."""
    return cached_artifact(resolve_model_path("default"))


def stream_under_way(sock):
    """A streaming completion whose first bytes have arrived; the connection stays open."""
    client = uds_client(sock)
    ctx = client.stream("POST", "/completion", json={"prompt": "def f(x):\n", "n_predict": 500, "stream": True})
    r = ctx.__enter__()
    next(r.iter_bytes())
    return client


def clients_in_flight(sock):
    """Four clients, each with requests in flight; they end by themselves when the server goes."""
    started = threading.Barrier(5)

    def client(i):
        with uds_client(sock) as c:
            started.wait()
            for _ in range(50):
                try:
                    c.post("/infill", json={"input_prefix": "import os\n" * (i + 1), "input_suffix": "",
                                            "n_predict": 64, "id_slot": i})
                except httpx.TransportError:
                    return

    for i in range(4):
        threading.Thread(target=client, args=(i,), daemon=True).start()
    started.wait()


MOMENTS = [  # what has happened when the signal comes, after the server printed its loading line
    "starting",  # sockets bound, the model about to load
    "exporting",  # a fresh cache: the checkpoint is being exported to ONNX
    "ready",
    "streaming",  # a streaming completion under way
    "under load",  # four clients with requests in flight
]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", MOMENTS)
def test_a_signal_at_any_moment_exits_cleanly(tmp_path, cached, moment, sig):
    sock = tmp_path / "s.sock"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "fresh")} if moment == "exporting" else None
    server = Serve("--socket", str(sock), env=env)
    server.wait_line("plt-serve: loading")
    if moment == "exporting":
        server.wait_line("for ONNX Runtime (once")
    if moment in ("ready", "streaming", "under load"):
        server.wait_line("plt-serve: ready:")
    if moment == "streaming":
        stream_under_way(sock)
    if moment == "under load":
        clients_in_flight(sock)
    rc, err = server.stop(sig)
    print(f"{moment}, {sig.name}: rc {rc}")
    assert rc == {signal.SIGINT: 0, signal.SIGTERM: 143}[sig], err
    assert "Traceback" not in err and "terminate called" not in err, err
    assert not sock.exists()
    if moment == "exporting":  # an interrupted export leaves no artifact and no partial folder behind
        leftovers = [p for p in (tmp_path / "fresh").rglob("*") if "partial" in p.name]
        assert not leftovers, leftovers
