"""plt-serve's chat routes over real sockets: OpenAI's /v1/chat/completions (raw HTTP and the
official `openai` client) and Ollama's /api/chat (raw and the `ollama` client), on the default
model exported with a chat template added to its folder; tool calls; a model without a template.
The toy model's replies are noise: the tests check shapes, stopping and token counts."""

import json
import shutil
from functools import partial

import pytest
from serving import Running

import pltkit
from pltkit.export.artifact import export
from pltkit.runtime.chat import ChatTemplate, prompt_ids
from pltkit.runtime.engine import Result
from pltkit.serve.loading import open_model
from pltkit.serve.parsing import Call
from pltkit.serve.server import Limits, Server

# ChatML-like on the toy tokenizer's own special tokens: <|endoftext|> (its eos) ends a turn
TEMPLATE = """{%- for m in messages %}<|file_sep|>{{ m.role }}
{% if m.role == 'system' and tools %}{{ m.content }}
Tools: {% for t in tools %}{{ t.function.name }} {{ t | tojson }}
{% endfor %}Call them as <tool_call>{"name": ..., "arguments": {...}}</tool_call>
{% else %}{{ m.content }}{% endif %}
{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}<|file_sep|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The default model exported with chat_template.jinja in its folder (it travels into the
    artifact), and the default model as it is, without one."""
    base = tmp_path_factory.mktemp("chat")
    src = base / "checkpoint"
    shutil.copytree(pltkit.__path__[0] + "/models/default", src)
    (src / "chat_template.jinja").write_text(TEMPLATE)
    export(src, base / "chat")
    export("default", base / "plain")
    return base / "chat", base / "plain"


@pytest.fixture(scope="module")
def srv(artifacts, tmp_path_factory):
    server = Server(partial(open_model, artifacts[0], threads=1), Limits(max_predict=256, slots=4))
    running = Running(server, tmp_path_factory.mktemp("sock") / "chat.sock")
    yield running
    running.stop()


def expected_prompt(artifact, messages, tools=None) -> list[int]:
    tok = pltkit.load_tokenizer(artifact)
    return prompt_ids(tok, ChatTemplate.from_dir(artifact).render(messages, tools))


def sse_json(text: str) -> list:
    data = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_openai_chat_completion(srv, artifacts):
    c = srv.clients["tcp"]
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    o = r.json()
    choice = o["choices"][0]
    assert o["object"] == "chat.completion" and o["id"].startswith("chatcmpl-")
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    prompt = expected_prompt(artifacts[0], MESSAGES)
    u = o["usage"]
    assert u["prompt_tokens"] == len(prompt) and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # the end of turn (eos here) stops it before the limit; else the limit does
    assert (choice["finish_reason"], u["completion_tokens"] < 12) in (("stop", True), ("length", False))
    # the same tokens as a plain completion of the rendered prompt (both greedy)
    plain = c.post("/completion", json={"prompt": prompt, "n_predict": 12, "temperature": 0}).json()
    assert plain["content"] == choice["message"]["content"] and plain["tokens_predicted"] == u["completion_tokens"]


def test_openai_chat_streaming_n_and_stop(srv):
    c = srv.clients["uds"]
    body = {"model": "m", "messages": MESSAGES, "max_completion_tokens": 10, "temperature": 0.8, "top_p": 0.9,
            "seed": 3, "n": 2, "stop": ["\n\n"], "stream_options": {"include_usage": True}}
    whole = c.post("/v1/chat/completions", json=body).json()
    assert [ch["index"] for ch in whole["choices"]] == [0, 1]
    events = sse_json(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    first = "".join(e["choices"][0]["delta"].get("content", "") for e in events
                    if e["choices"] and e["choices"][0]["index"] == 0)
    second = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == 1]
    assert first == whole["choices"][0]["message"]["content"]  # the same seeds: the same completions
    assert second[0]["delta"]["content"] == whole["choices"][1]["message"]["content"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert all("\n\n" not in ch["message"]["content"] for ch in whole["choices"])


def fake_reply(srv, text):
    """Makes the engine answer `text` (streamed in two pieces): the toy model never writes tool calls."""
    engine = srv.server.model.engine
    real = engine.run_all

    def run_all(ids, req, slot, cancel=None, on_text=None, *a, **kw):
        engine.run_all = real
        result = Result(text, list(range(7)), "eos", tokens_evaluated=len(ids))
        if on_text is not None:
            on_text(text[:9], result)
            on_text(text[9:], result)
        return [result]

    engine.run_all = run_all


TOOL_REPLY = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_come_back_as_openai_tool_calls(srv, stream):
    c = srv.clients["tcp"]
    fake_reply(srv, TOOL_REPLY)
    r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": [WEATHER], "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        events = sse_json(r.text)
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        last = events[-1]["choices"][0]
        calls, finish = last["delta"]["tool_calls"], last["finish_reason"]
        assert all("<tool_call>" not in (e["choices"][0]["delta"].get("content") or "") for e in events)
    else:
        choice = r.json()["choices"][0]
        content, calls, finish = choice["message"]["content"], choice["message"]["tool_calls"], choice["finish_reason"]
    assert content == "Checking." and finish == "tool_calls"
    assert calls[0]["type"] == "function" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Zürich"}


def test_tools_and_tool_results_reach_the_template(srv, artifacts):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich"})}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 °C"}]
    o = srv.clients["tcp"].post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER],
                                                              "max_tokens": 1}).json()
    rendered = ChatTemplate.from_dir(artifacts[0]).render(
        [*messages[:2], {**messages[2], "tool_calls": [{**call, "function": {**call["function"],
                                                                            "arguments": {"city": "Zürich"}}}]},
         messages[3]], [WEATHER])
    assert 'get_weather {"type": "function"' in rendered and '"arguments": {"city": "Zürich"}' in rendered
    assert o["usage"]["prompt_tokens"] == len(prompt_ids(pltkit.load_tokenizer(artifacts[0]), rendered))


def test_the_openai_client(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", max_retries=0)
    out = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    fake_reply(srv, TOOL_REPLY)
    tools = client.chat.completions.create(model="default", messages=MESSAGES, tools=[WEATHER])
    assert tools.choices[0].finish_reason == "tool_calls"
    assert tools.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_ollama_chat_and_its_client(srv):
    ollama = pytest.importorskip("ollama")
    raw = srv.clients["tcp"].post("/api/chat", json={"model": "chat", "messages": MESSAGES, "stream": False,
                                                     "options": {"num_predict": 6, "seed": 2}}).json()
    assert raw["done"] is True and raw["message"]["role"] == "assistant" and raw["eval_count"] <= 6
    assert raw["done_reason"] in ("stop", "length") and raw["prompt_eval_count"] > 0
    client = ollama.Client(host=f"http://127.0.0.1:{srv.port}")
    whole = client.chat(model="chat", messages=MESSAGES, options={"num_predict": 6, "seed": 2})
    assert whole.message.content == raw["message"]["content"] and whole.done
    parts = list(client.chat(model="chat", messages=MESSAGES, options={"num_predict": 6, "seed": 2}, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content and parts[-1].done
    fake_reply(srv, TOOL_REPLY)
    called = client.chat(model="chat", messages=MESSAGES, tools=[WEATHER])
    assert called.message.tool_calls[0].function.name == "get_weather"
    assert called.message.tool_calls[0].function.arguments == {"city": "Zürich"}


def test_metadata_says_chat(srv):
    c = srv.clients["tcp"]
    assert c.get("/v1/models").json()["data"][0]["meta"]["chat"] is True
    props = c.get("/props").json()
    assert props["chat"] is True and props["infill"] is True and props["chat_template"] == TEMPLATE
    assert "tools" in c.post("/api/show", json={"model": "chat"}).json()["capabilities"]


def test_sampling_defaults_come_from_generation_config(srv):
    model = srv.server.model
    template = ChatTemplate(TEMPLATE, {"eos_token": "<|endoftext|>"}, {"temperature": 0.6, "top_p": 0.85, "top_k": 20})
    call = Call(None, chat={"messages": MESSAGES, "tools": None, "args": {"top_k": 5},
                            "defaults": {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0}})  # the protocol's
    from pltkit.serve.chat import chat_prompt
    chat_prompt(type("M", (), {"chat": template, "engine": model.engine, "name": "m"}), call)
    assert (call.req.temperature, call.req.top_p, call.req.top_k, call.req.min_p) == (0.6, 0.85, 5, 0.0)
    assert 0 in call.req.end_ids and call.ids[-1] != 0


def test_a_model_without_a_chat_template(artifacts, tmp_path):
    running = Running(Server(partial(open_model, artifacts[1], threads=1)), tmp_path / "plain.sock")
    try:
        c = running.clients["tcp"]
        for path, stream in (("/v1/chat/completions", False), ("/v1/chat/completions", True), ("/api/chat", True)):
            r = c.post(path, json={"model": "plain", "messages": MESSAGES, "stream": stream})
            err = r.json()["error"]
            message = err if isinstance(err, str) else err["message"]
            assert r.status_code == 400 and "has no chat template" in message, r.text
        assert c.get("/v1/models").json()["data"][0]["meta"]["chat"] is False
        assert c.get("/props").json()["chat"] is False
    finally:
        running.stop()
