"""plt-serve against web pages (over real sockets): a foreign Host header (DNS rebinding) or a foreign
Origin (a cross-origin page) gets 403 JSON and the server goes on; loopback names, the server's own
origin, editors (no Origin) and Unix-socket clients pass; --allowed-hosts / --allowed-origins widen it."""

import json
import subprocess
import sys
from functools import partial

import pytest
from serving import HANG, Running

from pltkit.serve.access import Access, host_name, key_matches
from pltkit.serve.loading import open_model
from pltkit.serve.server import Server

INFILL = {"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n", "n_predict": 2}


@pytest.fixture(scope="module")
def artifact(served_artifact):
    return served_artifact


@pytest.fixture(scope="module")
def srv(artifact, tmp_path_factory):
    running = Running(Server(partial(open_model, artifact, threads=1)), tmp_path_factory.mktemp("sock") / "s.sock")
    yield running
    running.stop()


def refused(r, what: str) -> None:
    assert r.status_code == 403, (r.status_code, r.text)
    error = r.json()["error"]  # in the route's protocol: Ollama's is a string
    assert what in (error if isinstance(error, str) else error["message"])
    assert isinstance(error, str) or error["type"] == "permission_error"  # llama.cpp's type for 403


@pytest.mark.parametrize("path", ["/health", "/infill", "/v1/completions", "/api/generate", "/props"])
def test_a_foreign_host_is_refused(srv, path):
    tcp = srv.clients["tcp"]
    get = path in ("/health", "/props")
    call = tcp.get if get else tcp.post
    kwargs = {} if get else {"json": {**INFILL, "prompt": "x", "model": "default"}}
    for host in ("evil.example", f"evil.example:{srv.port}", "127.0.0.1.nip.io", "localhost.evil.example"):
        refused(call(path, headers={"Host": host}, **kwargs), "Host")
    assert tcp.get("/health").status_code == 200  # and the server goes on


def test_loopback_names_and_the_unix_socket_pass(srv):
    tcp = srv.clients["tcp"]
    for host in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", f"[::1]:{srv.port}", "LOCALHOST"):
        assert tcp.post("/infill", json=INFILL, headers={"Host": host}).status_code == 200, host
    # a Unix socket's clients name any host (curl --unix-socket ... http://plt/...)
    assert srv.clients["uds"].post("/infill", json=INFILL, headers={"Host": "plt"}).status_code == 200


def test_a_foreign_origin_is_refused(srv):
    tcp = srv.clients["tcp"]
    for origin in ("http://evil.example", "https://evil.example", "null", "http://localhost:3000"):
        refused(tcp.post("/infill", json=INFILL, headers={"Origin": origin}), "Origin")
        refused(tcp.get("/props", headers={"Origin": origin}), "Origin")
    own = f"http://127.0.0.1:{srv.port}"
    assert tcp.post("/infill", json=INFILL, headers={"Origin": own}).status_code == 200
    assert tcp.post("/infill", json=INFILL).status_code == 200  # editors and curl send no Origin


@pytest.mark.parametrize("path", ["/infill", "/completion", "/v1/completions", "/v1/chat/completions",
                                  "/api/generate", "/tokenize", "/api/show"])
def test_only_json_bodies_are_read(srv, path):
    """A page can POST text/plain (or a form) anywhere without a CORS preflight: such bodies get 415."""
    tcp, body = srv.clients["tcp"], json.dumps({**INFILL, "prompt": "x", "content": "x", "model": "default"})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        r = tcp.post(path, content=body, headers=headers)
        assert r.status_code == 415, (ctype, r.status_code, r.text)
        error = r.json()["error"]
        assert "application/json" in (error if isinstance(error, str) else error["message"])
    r = tcp.post(path, content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code != 415, r.text


def test_allowed_hosts_and_origins_widen_it(artifact, tmp_path):
    access = Access(hosts=("127.0.0.1", "devbox.lan"), origins=("http://localhost:3000",))
    running = Running(Server(partial(open_model, artifact, threads=1), access=access), tmp_path / "a.sock")
    try:
        tcp = running.clients["tcp"]
        assert tcp.post("/infill", json=INFILL, headers={"Host": "devbox.lan:8012"}).status_code == 200
        refused(tcp.post("/infill", json=INFILL, headers={"Host": "localhost"}), "Host")  # not listed here
        assert tcp.post("/infill", json=INFILL, headers={"Origin": "http://localhost:3000"}).status_code == 200
        refused(tcp.post("/infill", json=INFILL, headers={"Origin": "http://localhost:3001"}), "Origin")
    finally:
        running.stop()
    anyone = Running(Server(partial(open_model, artifact, threads=1), access=Access(hosts=("*",), origins=("*",))),
                     tmp_path / "b.sock")
    try:
        r = anyone.clients["tcp"].post("/infill", json=INFILL, headers={"Host": "evil.example",
                                                                        "Origin": "http://evil.example"})
        assert r.status_code == 200
    finally:
        anyone.stop()


def test_the_api_key_scheme_any_case_and_any_characters(artifact, tmp_path):
    key = "s3cret-clé-ключ"  # not latin-1: sent as UTF-8 bytes
    running = Running(Server(partial(open_model, artifact, threads=1), api_key=key), tmp_path / "k.sock")
    try:
        tcp = running.clients["tcp"]
        for auth in (b"Bearer " + key.encode(), b"bearer " + key.encode(), b"BEARER  " + key.encode()):
            assert tcp.post("/infill", json=INFILL, headers={"Authorization": auth}).status_code == 200, auth
        for auth in (b"Bearer s3cret", b"Basic " + key.encode(), key.encode(), b"Bearer"):
            r = tcp.post("/infill", json=INFILL, headers={"Authorization": auth})
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"], auth
    finally:
        running.stop()
    assert key_matches(b"bearer abc", "abc") and not key_matches(b"bearer abcd", "abc")


def serve_process(port: int, *args: str, env=None):
    """A real plt-serve on a TCP port, once it says it is ready (or has exited)."""
    import os

    proc = subprocess.Popen([sys.executable, "-m", "pltkit.cli.serve", "--port", str(port), "--threads", "1", *args],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    for line in proc.stderr:  # wait for the event, not a time
        if "ready:" in line:
            break
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_api_key_from_the_environment_or_a_file(tmp_path):
    """--api-key shows in ps: $PLTKIT_API_KEY and --api-key-file keep it out of the command line."""
    import httpx

    (tmp_path / "key").write_text("from-a-file\n")
    for args, env, key in (((), {"PLTKIT_API_KEY": "from-env"}, "from-env"),
                           (("--api-key-file", str(tmp_path / "key")), {"PLTKIT_API_KEY": ""}, "from-a-file")):
        port = free_port()
        proc = serve_process(port, *args, env=env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=HANG) as c:
                assert c.post("/infill", json=INFILL).status_code == 401
                ok = c.post("/infill", json=INFILL, headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code == 200, ok.text
        finally:
            proc.terminate()
            proc.wait(HANG)
    bad = subprocess.run([sys.executable, "-m", "pltkit.cli.serve", "--port", "1", "--api-key-file",
                          str(tmp_path / "missing")], capture_output=True, text=True, timeout=HANG)
    assert bad.returncode == 2 and "--api-key-file" in bad.stderr


def test_host_name_drops_the_port():
    assert [host_name(h) for h in ("localhost:8012", "[::1]:80", "::1", "127.0.0.1", "a.b")] == \
        ["localhost", "::1", "::1", "127.0.0.1", "a.b"]


def test_cli_flags_reach_the_server(tmp_path):
    """plt-serve --allowed-hosts / --allowed-origins, on a real port: the listed host and origin pass."""
    port = free_port()
    proc = serve_process(port, "--allowed-hosts", "devbox.lan", "--allowed-origins", "http://localhost:3000/")
    try:
        import httpx
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=HANG) as c:
            assert c.get("/health", headers={"Host": "devbox.lan"}).status_code == 200
            assert c.get("/health", headers={"Origin": "http://localhost:3000"}).status_code == 200
            r = c.get("/props", headers={"Host": "evil.example"})
            assert r.status_code == 403 and json.loads(r.text)["error"]
    finally:
        proc.terminate()
        proc.wait(HANG)
