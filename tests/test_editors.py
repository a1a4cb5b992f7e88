"""What editor users get from plt-serve, over real sockets, with the exact requests of llama.vim
(its FIM request and its n_predict 0 warm-up) and llama.vscode (n_cmpl 3, no temperature), and
through the official `openai` and `ollama` client packages: no special-token text in the reply,
no empty reply to a cold prompt, no request costing another client its completion, each
protocol's own sampling defaults and options. The model is the default one, served as
plt-serve serves it (exported to ONNX Runtime)."""

import json
import threading
from functools import partial
from pathlib import Path

import pytest
from serving import HANG, Running, held, wait_idle

from pltkit.serve.loading import open_model
from pltkit.serve.server import Limits, Server

# a real file (a frozen copy of one of pltkit's modules), 356 lines
SOURCE = (Path(__file__).parent / "data" / "buffer.py.txt").read_text().splitlines(keepends=True)


def vim_fim(prefix: str, suffix: str, line: str, indent: int = 0, **over) -> dict:
    """llama.vim's FIM request (autoload/llama.vim, llama#fim) with its default configuration."""
    return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": [], "prompt": line,
            "n_predict": 128, "stop": [], "n_indent": indent, "top_k": 40, "top_p": 0.90,
            "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
            "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                                "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                                "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                                "tokens_cached"], **over}


def vim_warmup(extra: list[dict]) -> dict:
    """llama.vim's cache warm-up (s:ring_update): the extra context only, nothing generated."""
    return {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": extra, "prompt": "",
            "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}


def vscode_fim(prefix: str, suffix: str, line: str, extra=()) -> dict:
    """llama.vscode's FIM request (src/llama-server.ts, createRequestPayload) with its defaults."""
    return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": list(extra),
            "prompt": line, "n_predict": 128, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 2500}


def greedy(body: dict) -> dict:
    """A request for greedy decoding: temperature 0 with llama.cpp's default sampler order (a
    sampler list without "temperature", as llama.vim's, never applies the temperature)."""
    return {**{k: v for k, v in body.items() if k != "samplers"}, "temperature": 0}


def at(lines: list[str], y: int, x: int | None = None) -> tuple[str, str, str]:
    """llama.vim's local context at line y (0-based), column x: 256 lines of prefix, the current
    line up to the cursor, the rest of the line and 64 lines of suffix."""
    line = lines[y].rstrip("\n")
    x = len(line) if x is None else x
    return "".join(lines[max(0, y - 256):y]), "".join([line[x:] + "\n", *lines[y + 1:y + 65]]), line[:x]


@pytest.fixture(scope="module")
def artifact(served_artifact):
    return served_artifact


@pytest.fixture(scope="module")
def srv(artifact, tmp_path_factory):
    server = Server(partial(open_model, artifact, threads=2), Limits(max_predict=256))
    running = Running(server, tmp_path_factory.mktemp("sock") / "s.sock")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def specials(artifact) -> list[str]:
    """The text of every special token of the model."""
    added = json.loads((Path(artifact) / "tokenizer.json").read_text())["added_tokens"]
    return [t["content"] for t in added if t["special"]]


def contents(reply) -> list[str]:
    return [o["content"] for o in (reply if isinstance(reply, list) else [reply])]


# --- 1. special tokens ----------------------------------------------------------------------
# cursors where the model's most likely next token is <|fim_suffix|> or <|endoftext|>
SPOTS = [("import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n", "\n\ndef main():\n    pass\n",
          "        for line in "), ("import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n",
                                   "\n\ndef main():\n    pass\n", "        ")]


def test_no_special_token_text_from_any_route(srv, specials):
    """llama.vim's and llama.vscode's requests, plain /completion, the openai and ollama clients,
    greedy and sampled, whole and streamed: the model's special tokens end the completion or
    render as nothing; none reaches the reply as text."""
    import ollama
    import openai

    c = srv.clients["tcp"]
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", max_retries=0)
    ol = ollama.Client(host=f"http://127.0.0.1:{srv.port}")
    name = srv.server.model.name
    got = []
    for prefix, suffix, line in SPOTS:
        for seed in (1, 2, 3):
            got += contents(c.post("/infill", json=vim_fim(prefix, suffix, line, seed=seed)).json())
            got += contents(c.post("/infill", json={**vscode_fim(prefix, suffix, line), "seed": seed}).json())
            got += contents(c.post("/infill", json=greedy(vim_fim(prefix, suffix, line))).json())
            got += contents(c.post("/completion", json={"prompt": prefix + line, "n_predict": 32, "seed": seed}).json())
            got += [ch.text for ch in oa.completions.create(model=name, prompt=prefix + line, suffix=suffix,
                                                              max_tokens=32, seed=seed, n=2).choices]
            got.append(ol.generate(model=name, prompt=prefix + line, suffix=suffix,
                                   options={"num_predict": 32, "seed": seed}).response)
            got.append("".join(ch.choices[0].text for ch in oa.completions.create(
                model=name, prompt=prefix + line, max_tokens=32, seed=seed, stream=True)))
            got.append("".join(ch.response for ch in ol.generate(
                model=name, prompt=prefix + line, suffix=suffix, options={"num_predict": 32, "seed": seed},
                stream=True)))
    leaked = [(s, text) for text in got for s in specials if s in text]
    print(f"{len(got)} replies, {sum(map(bool, got))} non-empty, {len(leaked)} with special-token text")
    assert got and not leaked, leaked[:3]


def test_a_special_token_ends_the_completion(srv):
    """Greedy at a cursor where the model's first choice is <|fim_suffix|>: the completion ends
    there (stop_type eos), with nothing shown."""
    prefix, suffix, line = SPOTS[0]
    out = srv.clients["tcp"].post("/infill", json={**greedy(vim_fim(prefix, suffix, line)),
                                                   "response_fields": []}).json()
    print(out["content"], out["stop_type"], out["tokens"])
    assert out["stop_type"] == "eos" and out["content"] == ""


def test_special_token_names_typed_as_code_stay_text(srv):
    """The text `<|fim_suffix|>` in the user's code is plain text, in and out."""
    tok = srv.server.model.engine.tok
    code = 'FIM = "<|fim_suffix|>"\n'
    ids = tok.encode(code)
    assert tok.token_to_id("<|fim_suffix|>") not in ids
    assert tok.decode_continuation(ids, skip_special_tokens=True) == code


# --- 2. cold prompts ------------------------------------------------------------------------
@pytest.mark.parametrize("t_max_prompt_ms", [500, 1])
def test_a_cold_llama_vim_request_on_a_300_line_file_is_answered(artifact, tmp_path, t_max_prompt_ms):
    """A fresh server, llama.vim's request on line 278 of a 356-line file, at its default
    t_max_prompt_ms (500 ms) and at 1 ms (its warm-ups' value; any machine takes longer than
    that, so the old server cut every prompt at its first chunk): the whole prompt is processed,
    however long it takes, and the reply is not empty (at a cursor where the model does not
    choose to end at once: 8 of 8 seeds gave text; the seed fixes the draw)."""
    running = Running(Server(partial(open_model, artifact, threads=2)), tmp_path / "cold.sock")
    try:
        prefix, suffix, line = at(SOURCE, 277, 16)  # 256 lines before the cursor, 64 after
        body = vim_fim(prefix, suffix, line, indent=12, seed=0, t_max_prompt_ms=t_max_prompt_ms)
        out = running.clients["tcp"].post("/infill", json=body).json()
    finally:
        running.stop()
    print(f"prompt {out['timings/prompt_n']} tokens in {out['timings/prompt_ms']:.0f} ms: {out['content']!r}")
    assert out["timings/prompt_n"] > 300 and out["tokens_cached"] == 0 and out["content"].strip()


# --- 3. no request cancels another ----------------------------------------------------------
def overlapped(srv, bodies: list[dict], headers=None) -> list[dict]:
    """Sends bodies[0], holds it before its prompt is processed until every other body has been
    submitted to the worker (the old server cancelled it then), then lets everything run."""
    worker, release, submitted = srv.server.worker, threading.Event(), threading.Semaphore(0)
    results = [None] * len(bodies)
    real = worker.submit

    def submit(job):
        try:
            return real(job)
        finally:
            submitted.release()

    def send(i):
        with srv.client("tcp", headers=headers) as c:
            r = c.post("/infill", json=bodies[i])
            assert r.status_code == 200, r.text
            results[i] = r.json()

    first = bodies[0]["input_prefix"]
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    wait_idle(srv.server)
    worker.submit = submit
    try:
        with held(srv.server, lambda job: job.req.prefix == first, lambda job: release, step="prefill"):
            threads[0].start()
            assert submitted.acquire(timeout=HANG) and worker.wait_for(lambda w: w.running is not None, HANG)
            for t in threads[1:]:
                t.start()
                assert submitted.acquire(timeout=HANG)  # in the queue behind the first (or refused)
            release.set()
            for t in threads:
                t.join()
    finally:
        worker.submit = real
    return results


def test_a_warm_up_on_the_same_slot_costs_the_completion_nothing(srv):
    """llama.vim's completion, then its warm-up on id_slot 0 while the completion runs: the
    completion is the one it is alone (the old server cut it short, stop_type "none")."""
    prefix, suffix, line = at(SOURCE, 277, 16)
    extra = [{"filename": "engine.py", "text": "".join(SOURCE[:40])}]
    fim = {**vim_fim(prefix, suffix, line, indent=12, seed=3), "input_extra": extra, "response_fields": [],
           "t_max_predict_ms": 0}  # no time limit: the same completion however loaded the machine is
    alone = srv.clients["tcp"].post("/infill", json=fim).json()
    results = overlapped(srv, [fim, vim_warmup(extra)])
    print(alone["stop_type"], alone["tokens_predicted"], "->", results[0]["stop_type"], results[0]["tokens_predicted"])
    assert (results[0]["content"], results[0]["stop_type"]) == (alone["content"], alone["stop_type"])
    assert alone["tokens_predicted"] > 0 and alone["stop_type"] != "none" and results[1] == {}


@pytest.mark.parametrize("slot", ["user agent", "id_slot 0"])
def test_two_editors_on_one_slot_lose_no_completion(srv, slot):
    """Two editors with the same user agent (or both on id_slot 0, as llama.vim and llama.vscode
    send), each on its own file, alternating 12 times with each request sent while the other's
    runs: all 24 completions run to their end."""
    files_ = [SOURCE, SOURCE[178:] + SOURCE[:178]]  # two files: the second starts elsewhere
    types = []
    for i in range(12):
        bodies = []
        for lines in (files_[i % 2], files_[(i + 1) % 2]):
            y = 40 + 7 * i
            prefix, suffix, line = at(lines, y, 4)
            body = {"input_prefix": prefix, "input_suffix": suffix, "prompt": line, "n_predict": 8, "seed": i}
            bodies.append({**body, "id_slot": 0} if slot == "id_slot 0" else body)
        types += [r["stop_type"] for r in overlapped(srv, bodies, headers={"user-agent": "axios/1.7.9"})]
    print({t: types.count(t) for t in set(types)})
    assert len(types) == 24 and "none" not in types


def test_the_same_clients_stale_completion_is_superseded(srv):
    """The user types on: the completion for the older text is dropped (within a decode step),
    the newer one runs."""
    prefix, suffix, line = at(SOURCE, 299, 12)
    before = srv.server.metrics.superseded._value.get()
    bodies = [vim_fim(prefix, suffix, line, indent=8, response_fields=[]),
              vim_fim(prefix, suffix, line + "x", indent=8, response_fields=[])]
    results = {}

    def old():
        with srv.client("tcp") as c2:
            results["old"] = c2.post("/infill", json=bodies[0]).json()

    wait_idle(srv.server)
    with held(srv.server, lambda job: job.req.prompt == line, step="prefill"):
        th = threading.Thread(target=old)
        th.start()
        assert srv.server.worker.wait_for(lambda w: w.running is not None, HANG)
        new = srv.clients["tcp"].post("/infill", json=bodies[1]).json()
        th.join()
    print(results["old"]["stop_type"], new["stop_type"])
    assert results["old"]["stop_type"] == "none" and new["stop_type"] != "none"
    assert srv.server.metrics.superseded._value.get() == before + 1


# --- 4. sampling defaults -------------------------------------------------------------------
def test_llama_vscode_gets_different_completions(srv):
    """Its exact request (no temperature): llama.cpp's sampling, not greedy, so at a cursor with
    more than one likely continuation the three alternatives differ; asked for greedy, they are
    one. The seed fixes the draws: the infill sampler keeps few candidates, and at most cursors
    this small model's alternatives all end at once, alike (benchmarks/editor_replies.py)."""
    c = srv.clients["tcp"]
    sampled = c.post("/infill", json={**vscode_fim(*at(SOURCE, 107, 16)), "seed": 0}).json()
    one = c.post("/infill", json=greedy(vscode_fim(*at(SOURCE, 107, 16)))).json()
    print(contents(sampled), contents(one))
    assert len(set(contents(sampled))) == 3 and len(set(contents(one))) == 1
    assert {(o["generation_settings"]["temperature"], o["generation_settings"]["top_p"]) for o in sampled} == \
        {(0.8, 0.99)}
    # no seed, no samplers: llama.cpp's temperature 0.8 (alike 0 times in 200 tries at each of these prompts)
    alike = [len(set(contents(c.post("/completion", json={"prompt": "".join(SOURCE[y:y + 21]), "n_predict": 16,
                                                          "n_cmpl": 3}).json()))) == 1 for y in (40, 100, 300)]
    assert alike != [True, True, True]


def test_each_protocol_has_its_servers_defaults(srv):
    import openai

    props = srv.clients["tcp"].get("/props").json()["default_generation_settings"]
    assert props["temperature"] == 0.8 and props["top_k"] == 40 and props["min_p"] == 0.05
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", max_retries=0)
    prompt = "".join(SOURCE[100:121])  # OpenAI's temperature 1: four completions of 12 tokens all alike
    sampled = oa.completions.create(model=srv.server.model.name, prompt=prompt, n=4, max_tokens=12)  # are rare
    greedy = oa.completions.create(model=srv.server.model.name, prompt=prompt, n=4, max_tokens=12, temperature=0)
    print([ch.text for ch in sampled.choices])
    assert len({ch.text for ch in sampled.choices}) > 1 and len({ch.text for ch in greedy.choices}) == 1


# --- 5. options -----------------------------------------------------------------------------
def test_repeat_penalties_and_min_p_change_the_completion(srv):
    c = srv.clients["tcp"]
    base = {"prompt": "x = 1\nx = 1\nx = 1\n", "n_predict": 24, "temperature": 0}
    plain = c.post("/completion", json=base).json()
    changed = {name: c.post("/completion", json={**base, **over}).json()
               for name, over in {"repeat_penalty": {"repeat_penalty": 3.0},
                                  "frequency_penalty": {"frequency_penalty": 3.0},
                                  "presence_penalty": {"presence_penalty": 5.0}}.items()}
    print(repr(plain["content"]), {k: v["content"] for k, v in changed.items()})
    assert all(v["content"] != plain["content"] for v in changed.values())
    for name, v in changed.items():
        assert v["generation_settings"][name] == {"repeat_penalty": 3.0, "frequency_penalty": 3.0,
                                                   "presence_penalty": 5.0}[name]


@pytest.mark.parametrize("path,body,words", [
    ("/completion", {"prompt": "a", "typical_p": 0.5}, "typical_p"),
    ("/completion", {"prompt": "a", "mirostat": 2}, "mirostat"),
    ("/completion", {"prompt": "a", "samplers": ["top_k", "warp"]}, "warp"),
    ("/v1/completions", {"prompt": "a", "typical_p": 0.5}, "typical_p"),
    ("/api/generate", {"model": None, "prompt": "a", "system": "be brief"}, "system"),
    ("/api/generate", {"model": None, "prompt": "a", "template": "{{ .Prompt }}"}, "template"),
    ("/api/generate", {"model": None, "prompt": "a", "options": {"mirostat": 1}}, "mirostat"),
])
def test_options_not_implemented_are_refused_by_name(srv, path, body, words):
    if "model" in body:
        body = {**body, "model": srv.server.model.name}
    r = srv.clients["tcp"].post(path, json=body)
    print(r.status_code, r.text)
    assert r.status_code == 400 and words in json.dumps(r.json())


def test_neutral_options_and_llama_cpps_sampler_list_are_accepted(srv):
    c = srv.clients["tcp"]
    body = {"prompt": "def f(", "n_predict": 4, "typical_p": 1.0, "mirostat": 0, "dry_multiplier": 0.0,
            "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                         "temperature"]}
    assert c.post("/completion", json=body).status_code == 200
    r = c.post("/api/generate", json={"model": srv.server.model.name, "prompt": "def f(", "raw": True,
                                      "stream": False, "options": {"num_predict": 4, "num_ctx": 8192,
                                                                   "num_thread": 4}})
    assert r.status_code == 200, r.text


def test_n_predict_minus_one_is_capped_by_max_predict(srv):
    out = srv.clients["tcp"].post("/completion", json={"prompt": "x = 1\n", "n_predict": -1,
                                                       "ignore_eos": False}).json()
    assert out["generation_settings"]["n_predict"] == 256 and out["tokens_predicted"] <= 256


# --- 6. what clients read -------------------------------------------------------------------
def test_what_llama_vscode_and_llama_vim_read(srv):
    prefix, suffix, line = at(SOURCE, 120, 4)
    c = srv.clients["tcp"]
    out = c.post("/infill", json={**vim_fim(prefix, suffix, line, seed=1), "response_fields": []}).json()
    assert out["generation_settings"]["n_ctx"] == srv.server.model.engine.context
    t = out["timings"]
    assert t["prompt_per_token_ms"] == pytest.approx(t["prompt_ms"] / t["prompt_n"], rel=1e-2)
    if t["predicted_n"]:
        assert t["predicted_per_token_ms"] == pytest.approx(t["predicted_ms"] / t["predicted_n"], rel=1e-2)
    with c.stream("POST", "/completion", json={"prompt": "".join(SOURCE[100:121]), "n_predict": 12,
                                               "stream": True, "temperature": 0}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    partial = events[:-1]
    print(len(partial), "partial events", [(e["tokens_predicted"], e["tokens_evaluated"]) for e in partial][:4])
    assert partial and all(e["tokens_evaluated"] == events[-1]["tokens_evaluated"] for e in partial)
    counts = [e["tokens_predicted"] for e in partial]
    assert counts == sorted(counts) and 1 <= counts[0] and counts[-1] <= events[-1]["tokens_predicted"]


def test_what_ollama_and_openai_clients_read(srv):
    import ollama
    import openai

    name = srv.server.model.name
    c = srv.clients["tcp"]
    ol = ollama.Client(host=f"http://127.0.0.1:{srv.port}")
    loaded = ol.generate(model=name)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert c.post("/api/generate", json={"model": name, "keep_alive": 0}).json()["done_reason"] == "unload"
    assert c.post("/api/chat", json={"model": name + ":latest"}).json()["done_reason"] == "load"
    root = c.get("/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    for call in (lambda: ol.generate(model="nosuch", prompt="a"), lambda: ol.show("nosuch"),
                 lambda: ol.chat(model="nosuch", messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404 and "nosuch" in str(e.value)
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", max_retries=0)
    assert oa.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nosuch")


def test_the_stale_rule():
    """worker.stale, case by case: only an editor's generating request for the same text a
    keystroke later replaces an older one on its slot."""
    from pltkit.runtime.completion import CompletionRequest, Prompt
    from pltkit.serve.worker import Job, stale

    def job(ids, n_predict=8, slot=0, editor=True):
        return Job(CompletionRequest(n_predict=n_predict), slot, Prompt(list(ids)), editor=editor)

    old = job(range(100))
    typed = list(range(99)) + [7, 8]
    assert stale(old, job(typed))
    assert not stale(old, job(typed, n_predict=0))  # a warm-up
    assert not stale(old, job(range(100)))  # the same prompt again
    assert not stale(old, job(typed, slot=1))
    assert not stale(old, job(typed, editor=False)) and not stale(job(range(100), editor=False), job(typed))
    assert not stale(old, job(list(range(40)) + [0] * 60))  # shares less than half: another text
    assert stale(old, job(list(range(50)) + [0] * 60))  # half
