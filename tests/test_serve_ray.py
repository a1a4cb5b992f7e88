"""The team server on a local Ray cluster (pltkit.serve.ray): 2 engine replicas of the default
model behind the ingress, driven over real HTTP. Marked slow (a Ray cluster takes about 10 s to
start); needs the ray extra: python -m pytest -m slow tests/test_serve_ray.py

Jobs that must still be running when the test acts (a disconnect, a killed replica) are held in
the replica, in decode, until cancelled (the `hold` setup below): no timing margins."""

import json
import os
import re
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path
import string as stdlib_string
import textwrap as stdlib_textwrap

import httpx
import pytest
from serving import HANG, Running

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'pltkit[ray]'")
from ray import serve  # noqa: E402

from pltkit.serve.loading import open_model  # noqa: E402
from pltkit.serve.ray.app import TeamOptions, build  # noqa: E402
from pltkit.serve.server import Limits, Server  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "team-key"
HOLD = "# held until cancelled\n"
LIMITS = Limits(max_body=64 << 10, max_predict=4096)
VOLATILE = {"timings", "created", "created_at", "id", "total_duration", "load_duration", "prompt_eval_duration",
            "eval_duration", "tokens_cached", "system_fingerprint"}


def hold(server):
    """Replica setup: a job whose prompt starts with HOLD waits in prefill and in decode until it
    is cancelled, so it cannot end before the test acts, whatever it samples."""
    backend, worker = server.model.engine.backend, server.worker

    def holding(real):
        def step(*args, **kw):
            job = worker.running
            if job is not None and (job.req.prefix + job.req.prompt).startswith(HOLD):
                assert job.cancel.wait(600), "a held job was never cancelled"
            return real(*args, **kw)
        return step

    backend.prefill, backend.decode = holding(backend.prefill), holding(backend.decode)


@pytest.fixture(scope="module")
def team(served_artifact):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # `hold` runs in the replicas
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="error")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(TeamOptions(model=str(served_artifact), replicas=2, threads=1, api_key=KEY, limits=LIMITS,
                                setup=hold)), name="pltkit", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"},
                          timeout=HANG)
    yield client
    client.close()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def plain(served_artifact, tmp_path_factory):
    """plt-serve itself on the same model, for comparison."""
    running = Running(Server(partial(open_model, served_artifact, threads=1), LIMITS),
                      tmp_path_factory.mktemp("sock") / "s.sock")
    yield running.clients["tcp"]
    running.stop()


def stable(value):
    """A response without what differs from run to run (times, ids, cache use)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def events(text: str) -> list:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.strip()]
    return [line if line == "[DONE]" else stable(httpx.Response(200, content=line).json()) for line in lines]


ROUTES = [
    ("/infill", {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n\nprint(add(1, 2))\n", "n_predict": 12,
                "temperature": 0}),
    ("/completion", {"prompt": "import os\n\ndef read(path):\n", "n_predict": 12, "temperature": 0}),
    ("/v1/completions", {"model": "default", "prompt": "import os\n\ndef read(path):\n", "max_tokens": 12,
                         "temperature": 0}),
    ("/api/generate", {"model": "default", "prompt": "import os\n\ndef read(path):\n", "options": {"num_predict": 12,
                                                                                                 "temperature": 0}}),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", ROUTES)
def test_each_route_answers_as_plt_serve_does(team, plain, served_artifact, path, body, stream):
    body = {**body, "stream": stream, **({"model": served_artifact.name} if "model" in body else {})}
    got, want = team.post(path, json=body), plain.post(path, json=body)
    assert (got.status_code, got.headers["content-type"]) == (want.status_code, want.headers["content-type"])
    assert got.headers["x-pltkit-replica"]
    if stream:
        assert events(got.text) == events(want.text) and len(events(want.text)) > 2
    else:
        assert stable(got.json()) == stable(want.json())
    print(f"{path} stream={stream}: {len(got.content)} bytes, as plt-serve's")


@pytest.mark.parametrize("path", ["/health", "/props", "/v1/models", "/v1/models/{name}", "/api/tags",
                                  "/api/version", "/", "/nowhere"])
def test_the_other_routes_answer_as_plt_serve_does(team, plain, served_artifact, path):
    path = path.format(name=served_artifact.name)
    got, want = team.get(path), plain.get(path)
    assert (got.status_code, got.headers["content-type"]) == (want.status_code, want.headers["content-type"])
    if want.headers["content-type"].startswith("application/json"):
        assert stable(got.json()) == stable(want.json()), path
    else:
        assert got.text == want.text


def editor_requests(source: str, start: int, n: int):
    """An editor typing on in a file: the prefix grows by a few characters a request."""
    for i in range(n):
        end = start + 7 * i
        yield {"input_prefix": source[:end], "input_suffix": source[end:end + 400], "n_predict": 4,
               "cache_prompt": True, "response_fields": ["tokens_cached"]}


def test_editors_stay_on_the_replica_holding_their_prefix(team):
    files = {"editor-a": Path(stdlib_textwrap.__file__).read_text(), "editor-b": Path(stdlib_string.__file__).read_text()}
    runs = {name: editor_requests(text, 2500, 20) for name, text in files.items()}
    cached, replicas = {name: [] for name in files}, {name: set() for name in files}
    for _ in range(20):  # the two editors' requests interleaved
        for name, run in runs.items():
            r = team.post("/infill", json=next(run), headers={"User-Agent": name})
            assert r.status_code == 200, r.text
            cached[name].append(r.json()["tokens_cached"])
            replicas[name].add(r.headers["x-pltkit-replica"])
    for name, hits in cached.items():
        rate = sum(1 for c in hits[1:] if c > 0) / len(hits[1:])
        print(f"{name}: tokens_cached > 0 on {rate:.0%} of the requests after the first, on replicas {replicas[name]}")
        assert rate >= 0.9, hits
        assert len(replicas[name]) == 1  # all on the replica that holds the prefix


def test_new_files_spread_over_the_replicas(team):
    """Eight editors in eight files: each stays on one replica, and together they use both."""
    names = ["argparse", "shutil", "tempfile", "pathlib", "inspect", "typing", "enum", "locale"]
    homes = {}
    for name in names:
        source = Path(stdlib_textwrap.__file__).with_name(f"{name}.py").read_text()
        for body in editor_requests(source, 1500, 3):
            r = team.post("/infill", json=body, headers={"User-Agent": f"spread-{name}"})
            homes.setdefault(name, set()).add(r.headers["x-pltkit-replica"])
    print("replicas per file:", homes)
    assert all(len(h) == 1 for h in homes.values()) and len(set().union(*homes.values())) == 2


def metric(team, replica: str, name: str) -> float:
    text = team.get("/metrics", headers={"x-pltkit-replica": replica}).text
    return sum(float(v) for v in re.findall(rf"^{name} (\S+)$", text, re.M))


def held_stream(team, name: str):
    """A streamed completion that the replica holds until it is cancelled; returns once the
    response has started."""
    body = {"prompt": f"{HOLD}# {name}\ndef f(x):\n", "n_predict": 64, "stream": True}
    return team.stream("POST", "/completion", json=body)


CANCELLED = re.escape('pltkit_completions_total{stop_type="cancelled"}')


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 60  # a guard against a hang; the wait ends when the condition holds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)  # a poll interval, not a margin


def test_a_disconnect_cancels_the_job_in_its_replica(team):
    with held_stream(team, "disconnect") as r:
        assert r.status_code == 200
        replica = r.headers["x-pltkit-replica"]
        before = metric(team, replica, CANCELLED)
    # the connection is closed: the ingress cancels the call, the replica cancels the job
    wait_for(lambda: metric(team, replica, CANCELLED) > before, "the job was not cancelled")
    print(f"cancelled in replica {replica}")


def test_a_client_leaving_before_a_whole_response_cancels_the_job(team):
    """A completion that is not streamed sends nothing until it is done: the client leaves while
    the job is held in its replica (pinned, so that the test can watch that replica)."""
    replica = team.get("/health").headers["x-pltkit-replica"]
    before = metric(team, replica, CANCELLED)
    body = json.dumps({"prompt": f"{HOLD}# whole\n", "n_predict": 64}).encode()
    head = (f"POST /completion HTTP/1.1\r\nHost: {team.base_url.host}:{team.base_url.port}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\nX-Pltkit-Replica: {replica}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((team.base_url.host, team.base_url.port)) as s:
        s.sendall(head + body)
        wait_for(lambda: metric(team, replica, "pltkit_worker_busy") == 1, "the job never reached its replica")
    wait_for(lambda: metric(team, replica, CANCELLED) > before, "the job was not cancelled")


def live_replicas() -> dict[str, int]:
    """The engine replicas Ray has alive: replica id -> process id."""
    return {a["Name"].rsplit("#", 1)[1]: a["Pid"] for a in ray._private.state.actors().values()
            if "#Engine#" in a["Name"] and a["State"] == "ALIVE"}


def test_a_replica_killed_mid_stream(team):
    with held_stream(team, "killed") as r:
        replica = r.headers["x-pltkit-replica"]
        os.kill(live_replicas()[replica], signal.SIGKILL)
        start = time.monotonic()
        text = "".join(r.iter_text())  # ends: an error event, then the end of the response
        waited = time.monotonic() - start
    print(f"replica {replica} killed: the stream ended {waited:.2f} s later with {text[-160:]!r}")
    assert waited < 5
    assert '"code": 503' in text and "died" in text
    answers = [team.post("/completion", json={"prompt": f"x = {i}\n", "n_predict": 4}) for i in range(10)]
    assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers]
    assert {a.headers["x-pltkit-replica"] for a in answers} - {replica}
    wait_for(lambda: len(live_replicas().keys() - {replica}) == 2, f"no replacement for replica {replica}")
    print(f"replaced after {time.monotonic() - start:.1f} s: replicas {sorted(live_replicas())}")


def test_the_ingress_keeps_plt_serves_guards(team):
    bare = httpx.Client(base_url=team.base_url, timeout=HANG)
    assert bare.get("/health").status_code == 200  # open, as in plt-serve
    cases = [
        (bare.post("/completion", json={"prompt": "x"}), 401),
        (team.get("/health", headers={"Host": "evil.example"}), 403),
        (team.post("/completion", json={"prompt": "x"}, headers={"Origin": "http://evil.example"}), 403),
        (team.post("/completion", json={"prompt": "x" * (65 << 10)}), 413),
        (team.post("/completion", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}), 415),
        (team.post("/nowhere", json={}), 404),
        (team.post("/completion", json={"prompt": "x", "n_predict": 5000}), 400),  # the replica's limit
        (team.post("/api/generate", json={"model": "nonesuch", "prompt": "x"}), 404),  # the replica's answer
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert isinstance(body["error"], (dict, str)), body
    assert team.post("/completion", json={"prompt": "x", "n_predict": 2}).status_code == 200  # and it goes on
