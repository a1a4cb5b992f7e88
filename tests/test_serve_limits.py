"""plt-serve against requests that would freeze or exhaust it (over real sockets): megabyte inputs
are cut to the context before tokenizing and tokenized off the event loop, stop strings are
capped and checked at the tail, slow or idle connections are cut, open connections are capped,
and every client's state lives within --cache-mb."""

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
from functools import partial

import httpx
import pytest
from serving import HANG, Running

from pltkit.serve.listen import AcceptErrors, Connections
from pltkit.serve.loading import open_model
from pltkit.serve.server import Limits, Server

BIG = 4 << 20  # the default --max-body
GUARD = 60  # seconds a well-behaved request may wait before it counts as frozen (a guard, never a measurement)


@pytest.fixture(scope="module")
def srv(served_artifact, tmp_path_factory):
    """The default model with a chat template, taking bodies of 8 MiB."""
    artifact = tmp_path_factory.mktemp("chat") / "artifact"
    shutil.copytree(served_artifact, artifact)
    (artifact / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    running = Running(Server(partial(open_model, artifact, threads=1), Limits(max_body=2 * BIG)),
                      tmp_path_factory.mktemp("sock") / "s.sock")
    assert running.server.model.chat is not None
    yield running
    running.stop()


def big_code(chars: int) -> str:
    lines, n = [], 0
    while n < chars:
        lines.append(f"def f{len(lines)}(x):\n    return x + {len(lines)}\n\n")
        n += len(lines[-1])
    return "".join(lines)[-chars:]


@pytest.fixture
def tokenized(srv, monkeypatch):
    """The lengths of the texts the server's tokenizer is given (the real tokenizer runs)."""
    tok, seen = srv.server.model.engine.tok, []
    for name in ("encode", "encode_continuation", "encode_with_specials"):
        real = getattr(tok, name)
        monkeypatch.setattr(tok, name, lambda text, real=real: seen.append(len(text)) or real(text))
    return seen


def test_a_megabyte_prefix_is_cut_to_the_context_before_tokenizing(srv, tokenized):
    engine = srv.server.model.engine
    limit = engine.context * engine.tok.max_token_chars
    prefix = big_code(BIG - 1000)
    body = {"input_prefix": prefix, "input_suffix": "\n", "n_predict": 4, "temperature": 0}
    r = srv.clients["tcp"].post("/infill", json=body)
    assert r.status_code == 200, r.text
    print(f"{len(prefix):,} characters of prefix; the tokenizer saw at most {max(tokenized):,} (limit {limit:,})")
    assert max(tokenized) <= limit  # the layout is the whole prefix's: test_completion.py, test_clip_leaves_...
    assert r.json()["truncated"] and r.json()["tokens_evaluated"] + r.json()["tokens_cached"] < engine.context


@pytest.mark.parametrize("route, body", [
    ("/completion", {"prompt": big_code(BIG - 1000), "n_predict": 1}),
    ("/v1/completions", {"prompt": big_code(BIG - 1000), "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": big_code(BIG - 1000)}], "max_tokens": 1}),
    ("/tokenize", {"content": big_code(BIG - 1000)}),
])
def test_a_megabyte_prompt_is_refused_without_tokenizing_it(srv, tokenized, route, body):
    engine = srv.server.model.engine
    r = srv.clients["tcp"].post(route, json=body)
    if route == "/tokenize":  # up to 4 contexts' worth of characters
        assert r.status_code == 413 and "(4 contexts of 512 tokens)" in r.text, r.text
        limit = 4 * engine.context * engine.tok.max_token_chars
        assert len(srv.clients["tcp"].post(route, json={"content": body["content"][:limit]}).json()["tokens"]) > 0
        assert max(tokenized) == limit
    else:
        assert r.status_code == 400 and "exceeds the context" in r.text, r.text
        assert max(tokenized, default=0) <= engine.context * engine.tok.max_token_chars


@pytest.mark.parametrize("route, body", [
    ("/infill", {"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "n_predict": 2}),
    ("/completion", {"prompt": "def add(a, b):\n", "n_predict": 2}),
    ("/tokenize", {"content": "def add(a, b):\n"}),
])
def test_tokenizing_runs_off_the_event_loop(srv, monkeypatch, route, body):
    """While a request's text is being tokenized (held inside the tokenizer), /health answers."""
    tok = srv.server.model.engine.tok
    inside, release = threading.Event(), threading.Event()
    for name in ("encode", "encode_with_specials"):
        real = getattr(tok, name)

        def held(text, real=real):
            inside.set()
            assert release.wait(HANG)
            return real(text)
        monkeypatch.setattr(tok, name, held)
    answer = {}
    t = threading.Thread(target=lambda: answer.setdefault("r", srv.client("tcp").post(route, json=body)))
    t.start()
    try:
        assert inside.wait(HANG)
        health = srv.client("tcp", timeout=GUARD).get("/health")  # the old server's loop was stuck in the tokenizer
        assert health.status_code == 200
    finally:
        release.set()
        t.join(HANG)
    assert answer["r"].status_code == 200, answer["r"].text


def test_stop_strings_are_capped(srv):
    tcp = srv.clients["tcp"]
    ok = {"prompt": "def f(x):", "n_predict": 2, "stop": ["s" * 256] * 64}
    assert tcp.post("/completion", json=ok).status_code == 200
    for stop in (["x"] * 65, ["s" * 257], ["s" * 2000] * 2000):
        r = tcp.post("/completion", json={**ok, "stop": stop})
        assert r.status_code == 400 and "at most 64 strings of 1 to 256 characters" in r.text, r.text[:200]
        r = tcp.post("/v1/completions", json={"prompt": "x", "stop": stop})
        assert r.status_code == 400, r.text[:200]


# --- connections --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tight(served_artifact, tmp_path_factory):
    """A server with short timeouts and room for 4 connections."""
    running = Running(Server(partial(open_model, served_artifact, threads=1), Limits(body_timeout=1)),
                      tmp_path_factory.mktemp("sock") / "t.sock", Connections(max_connections=4, head_timeout=1))
    yield running
    running.stop()


def raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=GUARD)  # the timeout: a guard against a hang
    return s


def read_all(s: socket.socket, reset_ok: bool = False) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout: it never did).
    reset_ok: a reset counts as closing too (a server that closes with our unread bytes resets)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        if not reset_ok:
            raise
    return data


@pytest.mark.parametrize("sent", [b"", b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"])
def test_a_connection_that_owes_its_request_head_is_cut(tight, sent):
    with raw(tight.port) as s:
        s.sendall(sent)
        assert read_all(s) == b""  # closed by the server, without an answer


def test_a_kept_alive_connection_must_send_its_next_head_in_time(tight):
    with raw(tight.port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\nHo")
        data = read_all(s)
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1


def test_a_body_that_never_arrives_gets_408(tight):
    with raw(tight.port) as s:
        s.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"input_prefix\": \"")
        data = read_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:200]
    assert "not received within 1 s" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("path, media", [(b"/infill", b"text/plain"), (b"/nowhere", b"application/json")])
def test_a_client_that_trickles_a_body_the_server_refused_is_cut(tight, path, media):
    """The server answers (415; 404 for an unknown route) without reading the body; a client that
    goes on sending it, a byte at a time, is cut after the head timeout."""
    with raw(tight.port) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: 100000\r\n\r\n{"
                  % (path, media))
        done = threading.Event()

        def trickle():
            try:
                while not done.wait(0.2):
                    s.send(b" ")
            except OSError:  # the server closed the connection
                pass
        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            data = read_all(s, reset_ok=True)  # cut while it was sending: the kernel may reset
        finally:
            done.set()
            sender.join(HANG)
    assert data.split(b" ", 2)[1] in (b"415", b"404"), data[:200]


def wait_connections(running, n: int) -> None:
    """Until the server holds n open connections (an event on the server's side, polled)."""
    state = running.uvicorn.server_state
    for _ in range(HANG * 100):
        if len(state.connections) == n:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"the server holds {len(state.connections)} connections, not {n}")


def test_open_connections_are_capped(served_artifact, tmp_path):
    running = Running(Server(partial(open_model, served_artifact, threads=1)), tmp_path / "c.sock",
                      Connections(max_connections=4, head_timeout=HANG))
    try:
        for c in running.clients.values():
            c.close()
        wait_connections(running, 0)
        idle = [raw(running.port) for _ in range(4)]
        wait_connections(running, 4)
        with raw(running.port) as s:  # one too many: answered and closed
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, _, body = read_all(s).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["error"]["message"] == "too many open connections"
        idle.pop().close()
        wait_connections(running, 3)
        with running.client("tcp") as c:
            assert c.get("/health").status_code == 200
        for s in idle:
            s.close()
    finally:
        running.stop()


def test_connections_fit_the_open_file_limit(served_artifact, tmp_path):
    """With 256 open files allowed (512 at most), 250 idle connections: plt-serve raises its limit to
    512 and takes 128 connections; the others get a 503 each instead of exhausting the file
    descriptors (which locked every client out and flooded the log), and the server goes on."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512)); "
            "from pltkit.cli.serve import main; sys.exit(main(sys.argv[1:]))")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", str(served_artifact), "--port", str(port),
                             "--threads", "1"], stderr=subprocess.PIPE, text=True)
    lines, ready = [], threading.Event()

    def read_log():  # all of it, so that a flood could not block the server on a full pipe
        for line in proc.stderr:
            lines.append(line)
            if "ready:" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert ready.wait(HANG) and proc.poll() is None, lines
        assert any("128 connections at most: the open-file limit is 512" in ln for ln in lines), lines
        idle = [raw(port) for _ in range(250)]
        # past the cap each is answered at once; the first 128 wait for their heads (or are cut after
        # the head timeout, which a loaded machine may reach: then later ones may get in and be cut too)
        answers = [read_all(s) for s in idle[128:]]
        for s in idle:
            s.close()
        assert all(a.startswith(b"HTTP/1.1 503") or a == b"" for a in answers)
        refused = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
        print(f"{refused} of {len(answers)} connections past the cap got 503")
        assert refused > 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=GUARD) as c:
            for _ in range(HANG * 10):  # ... once the server has seen the closes
                if (r := c.get("/health")).status_code == 200:
                    break
                threading.Event().wait(0.1)
            assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(HANG)
        reader.join(HANG)
    log = "".join(lines)
    print(f"{len(lines)} log lines")
    assert "Too many open files" not in log and "Traceback" not in log and len(lines) < 20, log[-2000:]


def test_accept_errors_are_logged_once_not_per_retry(caplog):
    """asyncio logs a traceback for each accept() retry out of file descriptors, up to the backlog
    (2048 under uvicorn) per turn of the loop: 169k lines in 40 s. Here: one line per 10 s."""
    loop = asyncio.new_event_loop()
    try:
        handler = AcceptErrors()
        for _ in range(2048):
            handler(loop, {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many")})
        handler(loop, {"message": "something else"})
    finally:
        loop.close()
    accept = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(accept) == 1 and not accept[0].exc_info
    assert any(r.getMessage() == "something else" for r in caplog.records)  # the default handler's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- memory -------------------------------------------------------------------------------
def test_every_clients_state_lives_within_cache_mb(served_artifact, tmp_path):
    """40 clients (distinct user agents, no id_slot) with distinct prompts: the states of all of
    them, live slots included, stay within the cache budget plus the one that ran last."""
    budget = 8 << 20  # a few clients' states
    running = Running(Server(partial(open_model, served_artifact, threads=1, cache_bytes=budget)), tmp_path / "m.sock")
    try:
        engine, tcp = running.server.model.engine, running.clients["tcp"]
        largest = 0
        for i in range(40):
            prefix = big_code(1500 + 37 * i)
            r = tcp.post("/infill", json={"input_prefix": prefix, "input_suffix": "\n", "n_predict": 2},
                         headers={"User-Agent": f"editor-{i}"})
            assert r.status_code == 200
            last = max((s for s in engine.slots.values()), key=lambda s: s.nbytes())
            largest = max(largest, last.nbytes())
            assert engine.state_bytes() <= budget + largest, (i, engine.state_bytes())
        held = len(engine.slots) + len(engine.recent)
        print(f"states held: {held} of 40 clients, {engine.state_bytes():,} bytes (budget {budget:,}, "
              f"one state up to {largest:,})")
        assert 1 < held < 40  # the old engine kept every live slot beyond the budget
    finally:
        running.stop()
