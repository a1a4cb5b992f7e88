"""plt-serve over real sockets (a Unix socket and TCP, uvicorn, httpx): the editor clients'
request shapes on each protocol, streaming, cache reuse, cancellation, superseding, limits and
errors. The model is the default one exported to ONNX Runtime, as a user would serve it."""

import json
import os
import socket
import stat
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
from serving import HANG, Running, held, wait_idle

from pltkit.serve.loading import open_model
from pltkit.serve.protocols import OLLAMA_DEFAULTS, LlamaCpp, OpenAI
from pltkit.serve.server import Limits, Server

PREFIX = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"
SUFFIX = "\n\ndef main():\n    print(read_lines('x'))\n"


@pytest.fixture(scope="module")
def artifact(served_artifact):
    return served_artifact


@pytest.fixture(scope="module")
def srv(artifact, tmp_path_factory):
    server = Server(partial(open_model, artifact, threads=2), Limits(max_predict=600, slots=8, max_body=64 << 10))
    running = Running(server, tmp_path_factory.mktemp("sock") / "s.sock")
    yield running
    running.stop()


def sse_events(text: str) -> list:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


@pytest.mark.parametrize("via", ["uds", "tcp"])
def test_llama_vim_infill_and_cache_reuse(srv, via):
    """llama.vim's request (its defaults), then the next one after typing: the prefix is reused."""
    c = srv.clients[via]
    body = {"id_slot": {"uds": 0, "tcp": 3}[via], "input_prefix": PREFIX * 4, "input_suffix": SUFFIX, "prompt": "        ",
            "input_extra": [{"filename": "util.py", "text": "def helper():\n    return 1\n"}],
            "n_predict": 128, "n_indent": 8, "top_k": 40, "top_p": 0.90, "samplers": ["top_k", "top_p", "infill"], "seed": 1,
            "stream": False, "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
            "response_fields": ["content", "timings/prompt_n", "timings/predicted_n", "timings/predicted_ms",
                                "truncated", "tokens_cached"]}
    r = c.post("/infill", json=body)
    assert r.status_code == 200, r.text
    first = r.json()
    assert set(first) == set(body["response_fields"]) and isinstance(first["content"], str)
    # the same completion as the engine gives directly (the same seed)
    engine = open_model(srv.server.model.engine.backend.artifact.path, threads=1).engine
    want = engine.complete(replace(LlamaCpp(infill=True).parse(body).req, t_max_predict_ms=0))
    # t_max_predict_ms may cut the served completion after a newline on a loaded machine, never before
    cut = first["timings/predicted_ms"] > body["t_max_predict_ms"] and "\n" in first["content"]
    assert first["content"] == want.text or (cut and want.text.startswith(first["content"])), first
    body["prompt"] = "        return"  # the user typed on the same line
    second = c.post("/infill", json=body).json()
    print(f"{via}: first prompt_n {first['timings/prompt_n']}, then {second['timings/prompt_n']} evaluated and "
          f"{second['tokens_cached']} cached")
    assert first["tokens_cached"] == 0 and second["tokens_cached"] > 0
    assert second["timings/prompt_n"] < first["timings/prompt_n"]


def test_llama_vscode_n_cmpl(srv):
    c = srv.clients["tcp"]
    r = c.post("/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "", "n_predict": 16,
                                "n_cmpl": 3, "temperature": 0.9, "top_k": 40, "seed": 7, "t_max_prompt_ms": 500,
                                "id_slot": 1})  # llama.vscode's t_max_predict_ms left out: it could cut all 3 alike
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["index"] for o in out] == [0, 1, 2] and all(o["tokens_predicted"] <= 16 for o in out)
    assert len({o["content"] for o in out}) > 1  # different seeds


def stream_text(c, path, body, piece) -> tuple[str, list]:
    with c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    if path == "/api/generate":
        events = [json.loads(line) for line in raw.splitlines() if line]
    else:
        events = [e for e in sse_events(raw)]
        if path == "/v1/completions":
            assert events[-1] == "[DONE]"
            events = events[:-1]
        events = [json.loads(e) for e in events]
    return "".join(piece(e) for e in events[:-1]), events


PROTOCOLS = {  # route: (body, text of a response, text of a streamed event)
    "/completion": ({"prompt": PREFIX, "n_predict": 24, "frequency_penalty": 0, "presence_penalty": 0,  # Continue
                     "seed": 1}, lambda o: o["content"], lambda e: e["content"]),
    "/infill": ({"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 24, "temperature": 0},
                lambda o: o["content"], lambda e: e["content"]),
    "/v1/completions": ({"model": "x", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 24, "temperature": 0},
                        lambda o: o["choices"][0]["text"], lambda e: e["choices"][0]["text"]),
    "/api/generate": ({"model": "default-fp32", "prompt": PREFIX, "suffix": SUFFIX,
                       "options": {"num_predict": 24, "seed": 1}}, lambda o: o["response"], lambda e: e["response"]),
}


@pytest.mark.parametrize("path", list(PROTOCOLS))
@pytest.mark.parametrize("via", ["uds", "tcp"])
def test_streaming_equals_the_whole_response(srv, path, via):
    body, text, piece = PROTOCOLS[path]
    c = srv.clients[via]
    whole = c.post(path, json={**body, "stream": False})
    assert whole.status_code == 200, whole.text
    streamed, events = stream_text(c, path, {**body, "stream": True}, piece)
    last = events[-1]
    print(f"{path} via {via}: {len(events)} events, {text(whole.json())!r}")
    assert streamed == text(whole.json()) and len(events) > 2
    if path == "/api/generate":
        assert last["done"] is True and last["eval_count"] > 0
    elif path == "/v1/completions":
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert last["stop"] is True and last["stop_type"] in ("eos", "limit", "word")


def test_openai_and_ollama_shapes(srv):
    c = srv.clients["uds"]
    o = c.post("/v1/completions", json={"model": "m", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8}).json()
    assert o["object"] == "text_completion" and o["usage"]["completion_tokens"] <= 8
    assert o["choices"][0]["finish_reason"] in ("stop", "length")
    g = c.post("/api/generate", json={"model": "default-fp32", "prompt": "def f(", "suffix": "):\n", "stream": False,
                                      "options": {"num_predict": 4}}).json()
    assert g["done"] is True and g["eval_count"] <= 4
    show = c.post("/api/show", json={"model": "default-fp32"}).json()
    assert ".Suffix" in show["template"] and "insert" in show["capabilities"]
    assert c.get("/api/tags").json()["models"][0]["name"] == srv.server.model.name
    assert c.get("/v1/models").json()["data"][0]["id"] == srv.server.model.name
    # the model folder's time, not placeholders (0, 1970-01-01)
    folder = Path(srv.server.model.engine.backend.artifact.path)
    newest = max(f.stat().st_mtime for f in folder.iterdir() if f.is_file())
    assert c.get("/v1/models").json()["data"][0]["created"] == int(newest)
    assert c.get("/api/tags").json()["models"][0]["modified_at"] == \
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(newest)))
    assert c.get("/props").json()["n_ctx"] == 512
    ids = c.post("/tokenize", json={"content": "def f(x):"}).json()["tokens"]
    assert c.post("/detokenize", json={"tokens": ids}).json()["content"] == "def f(x):"


def test_a_fim_template_in_a_plain_prompt_equals_infill(srv):
    """Tabby's llama.cpp backend and others send FIM prompts to /completion as text with the
    model's special tokens (llama.cpp parses them there); /infill's fields stay plain text."""
    c = srv.clients["tcp"]
    templated = c.post("/completion", json={"prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
                                            "n_predict": 12, "id_slot": 4, "seed": 5}).json()
    infill = c.post("/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 12,
                                     "id_slot": 4, "seed": 5}).json()
    assert templated["content"] == infill["content"]
    assert templated["tokens_evaluated"] + templated["tokens_cached"] == \
        infill["tokens_evaluated"] + infill["tokens_cached"]
    literal = c.post("/infill", json={"input_prefix": "<|fim_prefix|>", "input_suffix": "", "n_predict": 1,
                                      "id_slot": 4}).json()
    assert literal["tokens_evaluated"] + literal["tokens_cached"] > 4  # the name is text there, not one token


def test_cache_warming_and_metrics(srv):
    c = srv.clients["tcp"]
    warm = c.post("/infill", json={"id_slot": 2, "input_prefix": PREFIX * 3, "input_suffix": "", "n_predict": 0})
    assert warm.json()["tokens_predicted"] == 0 and warm.json()["content"] == ""
    hit = c.post("/infill", json={"id_slot": 2, "input_prefix": PREFIX * 3, "input_suffix": "", "n_predict": 4,
                                  "prompt": "x"}).json()
    assert hit["tokens_cached"] >= 64
    metrics = c.get("/metrics").text
    assert 'pltkit_requests_total{route="/infill",status="200"}' in metrics
    assert "pltkit_cache_hits_total" in metrics and "pltkit_request_seconds_bucket" in metrics


def test_the_engine_keeps_the_numbered_slots_and_64_clients(srv):
    assert srv.server.model.engine.max_slots == 8 + 64  # Limits(slots=8)


def test_each_protocol_states_its_servers_defaults():
    """The values of llama.cpp's common_params_sampling, OpenAI's API reference and Ollama's
    DefaultOptions, whichever of them the protocol takes from CompletionRequest's own defaults."""
    penalties = {"repeat_penalty": 1.0, "repeat_last_n": 64, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    assert LlamaCpp.defaults == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, **penalties,
                                 "n_predict": -1}
    assert OpenAI.defaults == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **penalties,
                               "n_predict": 16}
    assert OLLAMA_DEFAULTS == {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, **penalties,
                               "n_predict": -1}


def completions(server, stop_type: str) -> float:
    return server.metrics.completions.labels(stop_type)._value.get()


def test_a_job_is_accounted_for_before_it_is_answered_or_the_worker_idles(srv):
    """Whoever sees the answer or an idle worker sees the job's metrics too (the race that made
    the disconnect test flaky: `idle` was set before the counters were raised)."""
    worker, seen = srv.server.worker, []
    real = worker.on_finish

    def on_finish(job, start, results):
        seen.append({"idle": worker.idle.is_set(), "answered": job.done.done()})
        real(job, start, results)

    wait_idle(srv.server)
    worker.on_finish = on_finish
    try:
        r = srv.clients["tcp"].post("/completion", json={"prompt": "def", "n_predict": 2})
    finally:
        worker.on_finish = real
    assert r.status_code == 200 and seen == [{"idle": False, "answered": False}]


@pytest.mark.parametrize("path", ["/completion", "/v1/completions", "/api/generate"])
def test_disconnect_cancels_the_work(srv, path):
    body = {"/completion": {"prompt": "def f(x):\n", "n_predict": -1, "temperature": 0},  # greedy: not ended at once
            "/v1/completions": {"prompt": "def f(x):\n", "max_tokens": 500, "temperature": 0},
            "/api/generate": {"model": "default-fp32", "prompt": "def f(x):\n",
                              "options": {"num_predict": 500, "temperature": 0}}}[path]
    wait_idle(srv.server)
    before = completions(srv.server, "cancelled")
    c = srv.client("tcp")
    with held(srv.server):
        with c.stream("POST", path, json={**body, "stream": True}) as r:
            next(r.iter_bytes())
        c.close()  # leaving the stream unread closes the connection
        idle = wait_idle(srv.server)
    print(f"{path}: worker idle {idle * 1e3:.1f} ms after the disconnect")
    assert completions(srv.server, "cancelled") == before + 1


def test_non_streaming_disconnect_cancels_too(srv):
    wait_idle(srv.server)
    before = completions(srv.server, "cancelled")
    body = json.dumps({"prompt": "def f(x):\n", "n_predict": -1, "temperature": 0}).encode()
    with held(srv.server), socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /completion HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert srv.server.worker.wait_for(lambda w: w.running is not None, HANG)
        s.close()  # the client gives up while its job runs
        wait_idle(srv.server)
    assert completions(srv.server, "cancelled") == before + 1


BAD = [  # (route, body bytes, status, words in the message)
    ("/infill", b"{not json", 400, "malformed JSON"),
    ("/infill", b"[1, 2]", 400, "JSON object"),
    ("/infill", b'{"n_predict": "many"}', 400, "n_predict"),
    ("/infill", b'{"id_slot": 99}', 400, "id_slot"),
    ("/infill", b'{"n_predict": 100000}', 400, "limit"),
    ("/completion", b'{"prompt": "a", "grammar": "root ::= x"}', 400, "grammar"),
    ("/completion", b'{"prompt": ""}', 400, "empty"),
    ("/completion", json.dumps({"prompt": "x = 1\n" * 400}).encode(), 400, "exceeds the context"),
    ("/completion", b'{"prompt": [1, 2, 999999]}', 400, "token ids"),
    ("/v1/completions", b'{"prompt": "a", "echo": true}', 400, "echo"),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "prompt"),
    ("/api/generate", b'{"prompt": 5}', 400, "prompt"),
    ("/tokenize", b'{"content": 5}', 400, "content"),
    ("/detokenize", b'{"tokens": [-1]}', 400, "tokens"),
    ("/completion", b'{"prompt": "' + b"a" * (70 << 10) + b'"}', 413, "exceeds the limit"),
]


@pytest.mark.parametrize("path,body,status,words", BAD)
def test_bad_requests_get_json_errors(srv, path, body, status, words):
    r = srv.clients["tcp"].post(path, content=body, headers={"content-type": "application/json"})
    err = r.json()["error"]
    message = err if isinstance(err, str) else err["message"]
    assert r.status_code == status and words in message, r.text
    if path.startswith("/api/"):
        assert isinstance(err, str)  # Ollama's error shape
    else:
        assert err["code"] == status


@pytest.mark.parametrize("path,body,words", [("/completion", {"prompt": ""}, "empty"),
                                              ("/completion", {"prompt": "x = 1\n" * 400}, "exceeds the context"),
                                              ("/v1/completions", {"prompt": [7, -1]}, "prompt")])
def test_a_bad_streaming_request_is_refused_before_the_stream_starts(srv, path, body, words):
    r = srv.clients["tcp"].post(path, json={**body, "stream": True})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_unknown_routes_and_methods(srv):
    c = srv.clients["uds"]
    assert c.get("/nope").status_code == 404 and c.get("/nope").json()["error"]["code"] == 404
    assert c.get("/infill").status_code == 405 and "error" in c.get("/infill").json()


def test_a_failure_inside_generation_is_a_500_and_the_next_request_works(srv):
    backend = srv.server.model.engine.backend
    real = backend.decode

    def failing(*a, **kw):
        backend.decode = real  # fail once
        raise RuntimeError("boom")

    wait_idle(srv.server)
    backend.decode = failing
    try:
        r = srv.clients["tcp"].post("/completion", json={"prompt": "def", "n_predict": 4, "id_slot": 6,
                                                                     "temperature": 0})
    finally:
        backend.decode = real
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    ok = srv.clients["tcp"].post("/completion", json={"prompt": "def", "n_predict": 4, "id_slot": 6,
                                                                     "temperature": 0})
    assert ok.status_code == 200 and ok.json()["tokens_predicted"] == 4


def test_infill_on_a_model_without_fim_tokens_continues_the_prefix(artifact, tmp_path):
    """Served as a plain completion of the prefix, cut where it reaches the suffix's text, and
    marked as such."""
    def load(max_slots):
        model = open_model(artifact, threads=1, max_slots=max_slots)
        model.engine.tok.fim = None
        return model

    running = Running(Server(load), tmp_path / "nofim.sock")
    try:
        c = running.clients["tcp"]
        body = {"input_prefix": PREFIX, "prompt": "        ", "input_suffix": SUFFIX, "n_predict": 24, "temperature": 0}
        r = c.post("/infill", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        plain = c.post("/completion", json={"prompt": PREFIX + "        ", "n_predict": 24, "temperature": 0}).json()
        assert out["infill"] == "prefix-only" and "infill" not in plain
        assert plain["content"].startswith(out["content"])  # the same continuation, maybe cut
        assert not any(line.strip().startswith("def main") for line in out["content"].split("\n"))
        streamed = c.post("/infill", json={**body, "stream": True}).text
        pieces = [json.loads(e) for e in sse_events(streamed)]
        assert "".join(p["content"] for p in pieces[:-1]) == out["content"] and pieces[-1]["infill"] == "prefix-only"
        assert running.clients["tcp"].get("/props").json()["infill"] is False
        o = c.post("/v1/completions", json={"prompt": "a", "suffix": "b", "max_tokens": 2})
        assert o.status_code == 200, o.text
    finally:
        running.stop()


def test_api_key(artifact, tmp_path):
    running = Running(Server(partial(open_model, artifact, threads=1), api_key="s3cret"), tmp_path / "key.sock")
    try:
        c = running.clients["tcp"]
        assert c.get("/health").status_code == 200
        r = c.post("/completion", json={"prompt": "a", "n_predict": 2})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        ok = c.post("/completion", json={"prompt": "a", "n_predict": 2}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    finally:
        running.stop()


def test_eight_concurrent_clients(srv):
    """Every request answered (200) or cleanly refused (503); never a 500."""
    statuses = []

    def client(i):
        with srv.client("tcp") as c:
            for n in range(6):
                r = c.post("/infill", json={"id_slot": i % 8, "input_prefix": PREFIX * (1 + n % 3),
                                            "input_suffix": SUFFIX, "prompt": "    " + "x" * n, "n_predict": 8})
                statuses.append(r.status_code)
                assert r.headers["content-type"].startswith("application/json")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print({s: statuses.count(s) for s in set(statuses)})
    assert statuses and set(statuses) <= {200, 503} and statuses.count(200) > 0


def test_socket_file_is_private(srv):
    mode = stat.S_IMODE(os.stat(srv.socket_path).st_mode)
    assert mode == 0o600, oct(mode)
