"""Chat templates: found in a model folder, rendered exactly as transformers' apply_chat_template
renders them (ChatML with tools, Llama-3 style, a template using raise_exception, strftime_now
and tojson's arguments), in a sandbox; end-of-turn tokens; tool calls in a reply."""

import json
import shutil

import pytest
from tokenizers import Tokenizer, models

import pltkit
from pltkit.model.tokenizer import PLTTokenizer
from pltkit.runtime.chat import (ChatTemplate, ChatTemplateError, end_of_turn_ids, held_for_tools, parse_tool_calls,
                                 prompt_ids)

DEFAULT = pltkit.__path__[0] + "/models/default"

CHATML_TOOLS = """{%- if tools %}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions to assist with the user query.
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>

Return each call as <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}
<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{% endfor %}
<|im_end|>
{% elif message.role == 'tool' %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}

<tool_response>
{{ message.content }}
</tool_response>
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif %}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

LLAMA3 = """{{- bos_token }}
{%- set date_string = strftime_now("%d %b %Y") %}
{%- if messages[0].role == 'system' %}{% set system = messages[0].content %}{% set messages = messages[1:] %}
{%- else %}{% set system = "" %}{% endif %}
<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: {{ date_string }}

{% if tools is not none %}You have these functions:
{% for t in tools %}{{ t | tojson(indent=4) }}

{% endfor %}{% endif %}
{{- system }}<|eot_id|>
{%- for message in messages %}
<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

STRICT = """{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif %}
[SYS {{ strftime_now('%Y') }}] {{ message.content }}
{% else %}
{%- if (message.role == 'user') != (ns.turns % 2 == 0) %}
{{ raise_exception('roles must alternate user/assistant') }}
{%- endif %}
{%- set ns.turns = ns.turns + 1 %}
{{ message.role | upper }}: {{ message.content }}
{%- if message.meta %} {{ message.meta | tojson(separators=(',', ':'), sort_keys=true) }}{% endif %}

{% endif %}
{%- if ns.turns > 6 %}{% break %}{% endif %}
{%- endfor %}
{%- if tools %}TOOLS {{ tools | tojson(sort_keys=true) }} ({{ tools | length }}, ünïcode ok)
{% endif %}
{%- if add_generation_prompt %}ASSISTANT:{% else %}{{ eos_token }}{% endif %}"""

# transformers' {% generation %} block (marks assistant text for training masks): rendered as its body
MARKED = """{% for m in messages %}{% if m.role == 'assistant' %}<|fim_middle|>{% generation %}
{{ m.content }}{{ eos_token }}
{% endgeneration %}{% else %}<|fim_prefix|>{{ m.role }}: {{ m.content }}
{% endif %}{% endfor %}{% if add_generation_prompt %}<|fim_middle|>{% endif %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city, °C",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time",
                                          "parameters": {"type": "object", "properties": {}}}}


def conversations():
    """(messages, tools) pairs: plain, system, multi-turn, tools, tool calls and results, unicode."""
    sys_ = {"role": "system", "content": "You are a careful coding assistant."}
    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    a = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]}
    result = {"role": "tool", "content": json.dumps({"temp": 21}), "name": "get_weather"}
    convs = [
        ([u("Write a function that reverses a string.")], None),
        ([sys_, u("hi")], None),
        ([u("def f(x):\n    return x"), a("That is the identity."), u("Make it double x.")], None),
        ([sys_, u("1"), a("2"), u("3"), a("4"), u("5")], None),
        ([u("  spaces around  ")], None),
        ([u("ünïcödé ✓ 中文 {{ not a template }}")], None),
        ([sys_, u("What's the weather in Zürich?")], [WEATHER]),
        ([u("What's the weather in Zürich?")], [WEATHER, CLOCK]),
        ([u("What's the weather in Zürich?"), call, result], [WEATHER]),
        ([sys_, u("Weather?"), call, result, result, a("It is 21 °C."), u("And now?")], [WEATHER, CLOCK]),
        ([u("a"), a("b"), u("c"), a("d"), u("e"), a("f"), u("g"), a("h"), u("i")], None),
        ([u("<|im_end|> in user text")], None),
        ([{**u("with meta"), "meta": {"b": [1, 2], "a": "x"}}], None),
        ([sys_, {**u("meta and none"), "meta": {"z": None, "y": True}, "name": None}], [CLOCK]),
        ([u("")], None),
        ([u("tabs\tand\nnewlines\n\n")], None),
        ([sys_, u("only tools, no call")], [CLOCK]),
        ([u("x" * 300)], None),
        ([u("q1"), a("a1"), u("q2")], [WEATHER]),
        ([sys_, u("q"), a("reply\n  with indent")], None),
        ([{**a("assistant first")}], None),
        ([sys_, u("last"), a("")], None),
    ]
    return convs


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers


def model_dir(tmp_path, template, name="m", form="string"):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(f"{DEFAULT}/tokenizer.json", d / "tokenizer.json")
    eos = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    cfg = {"bos_token": "<|endoftext|>", "eos_token": eos,
           "pad_token": "<|fim_pad|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if form == "string":
        cfg["chat_template"] = template
    elif form == "list":
        cfg["chat_template"] = [{"name": "default", "template": template}, {"name": "rag", "template": "x"}]
    else:
        (d / "chat_template.jinja").write_text(template)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name, template, form", [("chatml-tools", CHATML_TOOLS, "string"),
                                                  ("llama3", LLAMA3, "jinja"), ("strict", STRICT, "list"),
                                                  ("generation", MARKED, "string")],
                         ids=["chatml-tools", "llama3", "strict", "generation"])
def test_rendering_equals_transformers_apply_chat_template(hf, tmp_path, name, template, form):
    d = model_dir(tmp_path, template, name, form)
    ours = ChatTemplate.from_dir(d)
    theirs = hf.AutoTokenizer.from_pretrained(str(d))
    compared = 0
    for messages, tools in conversations():
        for gen in (True, False):
            try:
                want = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
            except Exception as e:  # the template refused the conversation: ours refuses it too
                with pytest.raises(ChatTemplateError, match="roles must alternate|system message"):
                    ours.render(messages, tools, add_generation_prompt=gen)
                assert "alternate" in str(e) or "system message" in str(e)
                continue
            got = ours.render(messages, tools, add_generation_prompt=gen)
            assert got == want, (messages, tools, gen)
            compared += 1
    print(f"{name}: {compared} renderings equal to transformers'")
    assert compared >= 20


def test_a_model_without_a_template_has_no_chat(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert ChatTemplate.from_dir(d) is None and ChatTemplate.from_dir(DEFAULT) is None


def test_the_sandbox_refuses_unsafe_templates(tmp_path):
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):  # immutable: no appending to the caller's lists
        ChatTemplate("{{ messages.append(1) }}").render([{"role": "user", "content": "x"}])


def test_sampling_defaults_and_tool_template_from_the_folder(tmp_path):
    d = model_dir(tmp_path, LLAMA3, "gen")
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.85, "top_k": 20,
                                                          "do_sample": True, "eos_token_id": [0]}))
    t = ChatTemplate.from_dir(d)
    assert t.sampling == {"temperature": 0.6, "top_p": 0.85, "top_k": 20}
    assert t.special["eos_token"] == "<|endoftext|>" and t.special["pad_token"] == "<|fim_pad|>"
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = ChatTemplate.from_dir(d)
    assert t.render([{"role": "user", "content": ""}]) == "plain"
    assert t.render([{"role": "user", "content": ""}], [CLOCK]) == "tools"


def test_prompt_ids_parse_special_tokens_and_keep_one_bos():
    tok = PLTTokenizer.from_dir(DEFAULT)
    ids = prompt_ids(tok, "<|fim_prefix|>a")
    assert ids[0] == tok.token_to_id("<|fim_prefix|>") and tok.decode(ids[1:]) == "a"
    tok.bos_id = bos = tok.token_to_id("<|endoftext|>")
    assert prompt_ids(tok, "<|endoftext|><|endoftext|>a") == prompt_ids(tok, "<|endoftext|>a")
    tok.add_bos = True  # a tokenizer that adds BOS: once, whether the template wrote it or not
    assert prompt_ids(tok, "<|endoftext|>a") == prompt_ids(tok, "a") == [bos, *tok.encode("a")]


def test_end_of_turn_tokens(tmp_path):
    raw = Tokenizer(models.WordLevel({"a": 0, "<|im_end|>": 1, "<|eot_id|>": 2, "</s>": 3}, unk_token="a"))
    raw.add_special_tokens(["<|im_end|>", "<|eot_id|>", "</s>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert end_of_turn_ids(PLTTokenizer.from_dir(tmp_path)) == (3, 1, 2)


def test_tool_calls_in_a_reply():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
            '<tool_call>{"name": "now", "arguments": "{}"}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check." and calls == [{"name": "get_weather", "arguments": {"city": "Zürich"}},
                                                     {"name": "now", "arguments": {}}]
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])
    assert held_for_tools("abc<tool_c") == 3 and held_for_tools("abc <tool_call>{") == 4
    assert held_for_tools("a < b") == 5
