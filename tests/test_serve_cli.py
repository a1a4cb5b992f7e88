"""plt-serve as a user starts it: a private socket, a stale socket file replaced, a live one not
taken, a non-loopback host refused without an API key."""

import os
import signal
import stat
import subprocess
import time

import httpx


def start(*args):
    return subprocess.Popen(["plt-serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_healthy(sock, proc, timeout=60):
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://plt", timeout=5)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if client.get("/health").status_code == 200:
                return client
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not come up")


def test_socket_lifecycle(tmp_path):
    sock = tmp_path / "run" / "plt.sock"
    first = start("--socket", str(sock))
    try:
        client = wait_healthy(sock, first)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        r = client.post("/infill", json={"input_prefix": "def add(a, b):\n", "input_suffix": "", "n_predict": 4})
        assert r.status_code == 200 and r.json()["tokens_predicted"] <= 4
        second = subprocess.run(["plt-serve", "--socket", str(sock)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "already listening" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # dies without removing its socket file
        first.wait()
    assert sock.exists()
    third = start("--socket", str(sock))
    try:
        wait_healthy(sock, third)  # the stale file was replaced
    finally:
        third.send_signal(signal.SIGTERM)
        third.wait(timeout=30)
    assert not sock.exists()  # a clean exit removes its socket


def test_refusals(tmp_path):
    public = subprocess.run(["plt-serve", "--host", "0.0.0.0", "--port", "8013"], capture_output=True, text=True)
    assert public.returncode == 2 and "--api-key" in public.stderr
    bad = subprocess.run(["plt-serve", "--model", str(tmp_path / "nothing"), "--socket", str(tmp_path / "s")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a model folder" in bad.stderr
    (tmp_path / "file").write_text("x")
    taken = subprocess.run(["plt-serve", "--socket", str(tmp_path / "file")], capture_output=True, text=True)
    assert taken.returncode == 2 and "not a socket" in taken.stderr and (tmp_path / "file").read_text() == "x"
