"""Property-based bad input against a real server: whatever JSON (or bytes) arrives, the answer
is a JSON error with a 4xx status or a normal answer, never a 500, and the server keeps serving."""

import json
from functools import partial

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from serving import Running

from pltkit.serve.loading import open_model
from pltkit.serve.server import Limits, Server

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
FIELDS = ["prompt", "input_prefix", "input_suffix", "input_extra", "suffix", "n_predict", "max_tokens", "n_indent",
          "stop", "temperature", "top_k", "top_p", "seed", "n_cmpl", "id_slot", "stream", "response_fields",
          "t_max_prompt_ms", "t_max_predict_ms", "samplers", "options", "content", "tokens", "model", "n"]
small = st.integers(-3, 6)  # generation lengths that keep the suite fast
bodies = st.fixed_dictionaries({}, optional={f: (small if f in ("n_predict", "max_tokens") else json_values)
                                             for f in FIELDS}) | json_values
ROUTES = ["/infill", "/completion", "/v1/completions", "/api/generate", "/tokenize", "/detokenize", "/api/show"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(partial(open_model, "default", threads=1), Limits(max_predict=8, max_body=16 << 10))
    running = Running(server, tmp_path_factory.mktemp("fuzz") / "f.sock")
    yield running
    running.stop()


def check(r):
    event(f"status {r.status_code}")
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err if isinstance(err, str) else err["message"]
    elif "json" in r.headers["content-type"]:
        r.json()


# the same examples on every run, and no health check that depends on the machine's speed
STEADY = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=150, **STEADY)
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_any_json_body(srv, route, body):
    if isinstance(body, dict) and "stream" in body:
        body["stream"] = False  # a stream is read below only as JSON lines
    check(srv.clients["tcp"].post(route, content=json.dumps(body), headers={"content-type": "application/json"}))


@settings(max_examples=60, **STEADY)
@given(route=st.sampled_from(ROUTES + ["/health", "/x"]), raw=st.binary(max_size=200))
def test_any_bytes(srv, route, raw):
    check(srv.clients["uds"].post(route, content=raw))


def test_still_serving_afterwards(srv):
    c = srv.clients["tcp"]
    assert c.get("/health").json() == {"status": "ok"}
    r = c.post("/completion", json={"prompt": "def f(x):", "n_predict": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 4
