"""Table-driven hostile and malformed request bodies against a real plt-serve (uvicorn on real
sockets), on every POST route: the completion routes (COMPLETION_ROUTES), the chat routes
(CHAT_ROUTES), /tokenize, /detokenize and /api/show. The complement of test_serve_fuzz.py
(random bodies over a few routes): here each case is named in a table and is its own test.

Every case must get a 4xx with a JSON error body in the route's shape (llama.cpp's
{"error": {"message": ...}}, Ollama's {"error": "..."} on /api/*), never a 500 and never a hang,
and /health must answer 200 after it. A 200 is accepted only where a table marks the input as in
fact valid (allow_200), with the reason next to it.

The bodies are built as JSON text: a field's value can be raw JSON that Python's json module
reads but json.dumps would never write (a lone surrogate escape "\\ud800", Infinity, NaN, 1e400,
10**5 levels of nesting) or raw bytes (invalid UTF-8, a BOM).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from serving import Running

from pltkit.runtime.chat import ChatTemplate
from pltkit.serve.chat import CHAT_ROUTES
from pltkit.serve.loading import open_model
from pltkit.serve.protocols import COMPLETION_ROUTES
from pltkit.serve.server import Limits, Server

GUARD = 120  # seconds without an answer that count as a hang: a guard, never a measurement
MODEL = "plt-test"  # the served model's name, as requests name it
JSON = {"content-type": "application/json"}
RAW = "@@RAW@@"  # where a case's raw JSON text (or bytes) goes in a body
DROP = "@@DROP@@"  # an overlay value that removes the field from the base body

# ChatML-like on the toy tokenizer's own special tokens (as in test_serve_chat.py), with tools
TEMPLATE = """{%- for m in messages %}<|file_sep|>{{ m.role }}
{% if m.role == 'system' and tools %}{{ m.content }}
Tools: {% for t in tools %}{{ t.function.name }} {{ t | tojson }}
{% endfor %}{% else %}{{ m.content }}{% endif %}
{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}<|file_sep|>assistant
{% endif %}"""

USER = [{"role": "user", "content": "def add(a, b):"}]
# a valid body per route (test_base_bodies_are_valid checks each answers 200): each case changes it
BASE = {
    "/infill": {"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n\nprint(add(1, 2))\n",
                "n_predict": 2, "temperature": 0},
    "/completion": {"prompt": "def add(a, b):", "n_predict": 2, "temperature": 0},
    "/v1/completions": {"prompt": "def add(a, b):", "max_tokens": 2, "temperature": 0},
    "/api/generate": {"model": MODEL, "prompt": "def add(a, b):", "stream": False,
                      "options": {"num_predict": 2, "temperature": 0}},
    "/v1/chat/completions": {"messages": USER, "max_tokens": 2, "temperature": 0},
    "/api/chat": {"model": MODEL, "messages": USER, "stream": False, "options": {"num_predict": 2, "temperature": 0}},
    "/tokenize": {"content": "def add(a, b):"},
    "/detokenize": {"tokens": [1, 2, 3]},
    "/api/show": {"model": MODEL},
}
ROUTES = list(BASE)
GENERATING = [*COMPLETION_ROUTES, *CHAT_ROUTES]
assert set(GENERATING) <= set(ROUTES), "a completion or chat route without a base body here"
OLLAMA = ("/api/generate", "/api/chat")


def merge(base: dict, overlay: dict) -> dict:
    """overlay's fields over base's; an Ollama `options` object is merged field by field."""
    out = dict(base)
    for k, v in overlay.items():
        if v == DROP:
            out.pop(k, None)
        elif k == "options" and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def body(route: str, overlay: dict, raw: bytes | str | None = None) -> bytes:
    text = json.dumps(merge(BASE[route], overlay)).encode()
    if raw is not None:
        assert f'"{RAW}"'.encode() in text, (route, overlay)
        text = text.replace(f'"{RAW}"'.encode(), raw.encode() if isinstance(raw, str) else raw)
    return text


@dataclass(frozen=True)
class Case:
    id: str
    route: str
    body: bytes
    allow_200: bool = False  # the input is in fact valid: a 200 is right too (the reason is in the table)


CASES: list[Case] = []


def add(route: str, name: str, data: bytes, allow_200: bool = False) -> None:
    CASES.append(Case(f"{route}|{name}", route, data, allow_200))


# --- 1. lone surrogates in every text field ------------------------------------------------
SURROGATES = {"lone-high": r'"\ud800"', "lone-low-inside": r'"x = 1\udc00 + 2"'}
CESU = b'"\xed\xa0\x80"'  # a surrogate as raw (invalid) UTF-8 bytes: json.loads reads it with surrogatepass


def chat_text_fields(ollama: bool) -> dict:
    stop = {"options": {"stop": RAW}} if ollama else {"stop": RAW}
    fields = {
        "messages[].content": {"messages": [{"role": "user", "content": RAW}]},
        "messages[].role": {"messages": [{"role": RAW, "content": "hi"}]},
        "system-message.content": {"messages": [{"role": "system", "content": RAW}, *USER]},
        "tools[].function.name": {"tools": [{"type": "function", "function": {"name": RAW, "parameters": {}}}],
                                  "messages": [{"role": "system", "content": "You code."}, *USER]},
        "stop": stop, "model": {"model": RAW}, "key": {RAW: 1},
        "messages[].content+stream": {"messages": [{"role": "user", "content": RAW}], "stream": True},
    }
    if not ollama:
        fields |= {
            "messages[].content[].text": {"messages": [{"role": "user", "content": [{"type": "text", "text": RAW}]}]},
            "messages[].name": {"messages": [{"role": "user", "content": "hi", "name": RAW}]},
            "stop[]": {"stop": ["\n\n", RAW]},
            "tool_calls[].function.arguments": {"messages": [*USER, {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": RAW}}]}, {"role": "user", "content": "?"}]},
        }
    return fields


TEXT_FIELDS = {
    "/infill": {
        "input_prefix": {"input_prefix": RAW}, "input_suffix": {"input_suffix": RAW}, "prompt": {"prompt": RAW},
        "input_extra[].text": {"input_extra": [{"filename": "util.py", "text": RAW}]},
        "input_extra[].filename": {"input_extra": [{"filename": RAW, "text": "X = 1\n"}]},
        "filename": {"filename": RAW}, "stop": {"stop": RAW}, "stop[]": {"stop": ["\n\n", RAW]},
        "samplers[]": {"samplers": ["top_k", RAW]}, "response_fields[]": {"response_fields": ["content", RAW]},
        "fim_order": {"fim_order": RAW}, "key": {RAW: 1}, "input_prefix+stream": {"input_prefix": RAW, "stream": True},
    },
    "/completion": {
        "prompt": {"prompt": RAW}, "stop": {"stop": RAW}, "stop[]": {"stop": ["\n\n", RAW]},
        "samplers[]": {"samplers": ["top_k", RAW]}, "response_fields[]": {"response_fields": ["content", RAW]},
        "key": {RAW: 1}, "prompt+stream": {"prompt": RAW, "stream": True},
    },
    "/v1/completions": {
        "prompt": {"prompt": RAW}, "prompt[0]": {"prompt": [RAW]}, "suffix": {"suffix": RAW}, "stop": {"stop": RAW},
        "stop[]": {"stop": ["\n\n", RAW]}, "model": {"model": RAW}, "key": {RAW: 1},
        "prompt+stream": {"prompt": RAW, "stream": True},
    },
    "/api/generate": {
        "prompt": {"prompt": RAW}, "suffix": {"suffix": RAW}, "model": {"model": RAW}, "system": {"system": RAW},
        "template": {"template": RAW}, "options.stop": {"options": {"stop": RAW}},
        "options.stop[]": {"options": {"stop": ["\n\n", RAW]}}, "key": {RAW: 1},
        "model(load, no prompt)": {"model": RAW, "prompt": DROP}, "prompt+stream": {"prompt": RAW, "stream": True},
    },
    "/v1/chat/completions": chat_text_fields(ollama=False),
    "/api/chat": chat_text_fields(ollama=True),
    "/tokenize": {"content": {"content": RAW}, "content+with_pieces": {"content": RAW, "with_pieces": True},
                  "content+parse_special": {"content": RAW, "parse_special": True}, "key": {RAW: 1}},
    "/detokenize": {"tokens[]": {"tokens": [RAW]}, "key": {RAW: 1}},
    "/api/show": {"model": {"model": RAW}, "name": {"model": DROP, "name": RAW}, "key": {RAW: 1}},
}
assert set(TEXT_FIELDS) == set(ROUTES)
for route, fields in TEXT_FIELDS.items():
    for name, overlay in fields.items():
        for kind, raw in SURROGATES.items():
            add(route, f"surrogate-{kind}:{name}", body(route, overlay, raw))
    first = next(iter(fields))  # the route's main text field, also as raw surrogate bytes
    add(route, f"surrogate-cesu-bytes:{first}", body(route, fields[first], CESU))


# --- 2. deep nesting, as the whole body and as a field's value -----------------------------
def nested_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


NESTED = {"list-100000": nested_list(100_000), "object-100000": nested_object(100_000),
          "list-900": nested_list(900)}  # 900: below the parser's recursion limit, so the server sees it
NEST_FIELDS = {
    "/infill": {"input_prefix": {"input_prefix": RAW}, "input_extra": {"input_extra": RAW}},
    "/completion": {"prompt": {"prompt": RAW}, "stop": {"stop": RAW}},
    "/v1/completions": {"prompt": {"prompt": RAW}},
    "/api/generate": {"prompt": {"prompt": RAW}, "options": {"options": RAW}},
    "/v1/chat/completions": {"messages": {"messages": RAW}, "tools[].function.parameters": {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": RAW}}],
        "messages": [{"role": "system", "content": "You code."}, *USER]}},
    "/api/chat": {"messages": {"messages": RAW}, "options": {"options": RAW}},
    "/tokenize": {"content": {"content": RAW}},
    "/detokenize": {"tokens": {"tokens": RAW}},
    "/api/show": {"model": {"model": RAW}},
}
assert set(NEST_FIELDS) == set(ROUTES)
for route in ROUTES:
    for kind, text in NESTED.items():
        add(route, f"nested-body-{kind}", text.encode())
        for name, overlay in NEST_FIELDS[route].items():
            add(route, f"nested-{kind}:{name}", body(route, overlay, text))


# --- 3. bodies that are JSON but not an object ----------------------------------------------
NOT_OBJECTS = {"list-empty": "[]", "list": "[1]", "list-of-a-valid-body": None, "string": '"def add(a, b):"',
               "number": "1", "float": "1.5", "null": "null", "true": "true", "false": "false", "NaN": "NaN",
               "-Infinity": "-Infinity"}
for route in ROUTES:
    for name, text in NOT_OBJECTS.items():
        add(route, f"body-not-an-object:{name}", text.encode() if text else b"[" + body(route, {}) + b"]")


# --- 4. bodies that are not JSON (or not UTF-8) ---------------------------------------------
MAIN = {"/infill": "input_prefix", "/completion": "prompt", "/v1/completions": "prompt", "/api/generate": "prompt",
        "/v1/chat/completions": "messages", "/api/chat": "messages", "/tokenize": "content",
        "/detokenize": "tokens", "/api/show": "model"}
for route in ROUTES:
    valid, key = body(route, {}), MAIN[route].encode()
    raw_cases = {
        "empty": b"", "whitespace": b"  \n ", "open-brace": b"{", "truncated": valid[:len(valid) // 2],
        "truncated-after-colon": b'{"' + key + b'":', "trailing-garbage": valid + b"}", "two-objects": valid + valid,
        "nul-after": valid + b"\x00", "single-quotes": b"{'" + key + b"': 'x'}",
        "comment": valid[:-1] + b" /* c */}", "invalid-utf8-in-string": b'{"' + key + b'": "\xff\xfe"}',
        "invalid-utf8-outside": b"\xff" + valid, "overlong-utf8": b'{"' + key + b'": "\xc0\xaf"}',
        "latin1-bytes": valid[:-1] + b', "x": "caf\xe9"}', "int-5000-digits": b'{"' + key + b'": ' + b"1" * 5000 + b"}",
        "duplicate-key-last-wrong": valid[:-1] + b', "' + key + b'": 12}',
    }
    for name, data in raw_cases.items():
        add(route, f"raw:{name}", data)
    # RFC 8259 section 8.1: a parser MAY ignore a byte order mark; Python's json.loads also reads
    # UTF-16/32 (it detects the encoding). Either way the object is the valid base body.
    add(route, "raw:bom+valid", b"\xef\xbb\xbf" + valid, allow_200=True)
    add(route, "raw:utf16+valid", valid.decode().encode("utf-16"), allow_200=True)


# --- 5. numbers that are not numbers: each sampling / length / time field --------------------
NUMBERS = {"Infinity": "Infinity", "-Infinity": "-Infinity", "NaN": "NaN", "1e400": "1e400", "-1e400": "-1e400",
           "1e-310": "1e-310", "-0.0": "-0.0", "2**70": str(2**70), "-2**70": str(-2**70), "string": '"0.5"',
           "true": "true", "false": "false", "null": "null", "list": "[0.5]", "object": '{"v": 0.5}'}
FEW_NUMBERS = ["Infinity", "NaN", "1e400", "-0.0", "2**70", "string", "true", "null", "list"]
# Values that are in fact valid for a field (a 200 is right). `null` is valid everywhere: it means
# "the default" (llama.cpp's server drops null fields; OpenAI's fields are nullable; Ollama omits them).
VALID_NUMBERS = {
    "temperature": {"-0.0", "1e-310", "2**70"},  # any finite number >= 0 (0 = greedy); llama.cpp sets no maximum
    "top_p": {"1e-310"},  # in (0, 1]
    "min_p": {"-0.0", "1e-310"},  # in [0, 1]
    "t_max_prompt_ms": {"-0.0", "1e-310", "2**70"},  # finite milliseconds >= 0 (0: no limit)
    "t_max_predict_ms": {"-0.0", "1e-310", "2**70"},
    "top_k": {"2**70"},  # any integer >= 0: a top_k past the vocabulary cuts nothing
    "seed": {"2**70"},  # any integer >= 0 is a seed
    "n_indent": {"2**70"},  # any integer >= 0
    "repeat_last_n": {"2**70"},  # any integer >= -1
    "repeat_penalty": {"1e-310", "2**70"},  # any finite number > 0
    "presence_penalty": {"-0.0", "1e-310", "2**70", "-2**70"},  # any finite number (llama.cpp sets no range)
    "frequency_penalty": {"-0.0", "1e-310", "2**70", "-2**70"},
}
CORE = ["temperature", "top_p", "n_predict"]
LLAMA_TIMES = ["t_max_prompt_ms", "t_max_predict_ms"]
EXTENDED = ["top_k", "min_p", "seed", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty"]
# route -> {field as the route names it: (the request field it sets, whether all NUMBERS or FEW_NUMBERS)}
NUMBER_FIELDS = {
    "/infill": {**{f: (f, True) for f in CORE + LLAMA_TIMES}, "n_indent": ("n_indent", False)},
    "/completion": {**{f: (f, True) for f in CORE + LLAMA_TIMES}, **{f: (f, False) for f in EXTENDED},
                    "n_cmpl": ("n_cmpl", False), "id_slot": ("id_slot", False), "max_tokens": ("n_predict", False)},
    "/v1/completions": {"temperature": ("temperature", True), "top_p": ("top_p", True),
                        "max_tokens": ("n_predict", True), "n": ("n_cmpl", False),
                        **{f: (f, False) for f in ("top_k", "min_p", "seed", "presence_penalty", "frequency_penalty")}},
    "/api/generate": {"options.temperature": ("temperature", True), "options.top_p": ("top_p", True),
                      "options.num_predict": ("n_predict", True),
                      **{f"options.{f}": (f, False) for f in ("top_k", "min_p", "seed", "repeat_penalty")}},
    "/v1/chat/completions": {"temperature": ("temperature", True), "top_p": ("top_p", True),
                             "max_tokens": ("n_predict", True), "max_completion_tokens": ("n_predict", False),
                             "n": ("n_cmpl", False)},
    "/api/chat": {"options.temperature": ("temperature", True), "options.top_p": ("top_p", True),
                  "options.num_predict": ("n_predict", True)},
}
for route, fields in NUMBER_FIELDS.items():
    for name, (field, all_values) in fields.items():
        overlay = {"options": {name.split(".", 1)[1]: RAW}} if name.startswith("options.") else {name: RAW}
        if name == "max_tokens" and route == "/completion":
            overlay["n_predict"] = DROP  # llama.cpp reads max_tokens when n_predict is absent
        for label in (NUMBERS if all_values else FEW_NUMBERS):
            ok = label == "null" or label in VALID_NUMBERS.get(field, ())
            add(route, f"number-{label}:{name}", body(route, overlay, NUMBERS[label]), allow_200=ok)


# --- 6. wrong types and values for every known field --------------------------------------
UNSUPPORTED = {"grammar": "root ::= \"x\"", "json_schema": {"type": "object"}, "n_probs": 5, "logit_bias": [[1, 1.0]],
               "typical_p": 0.5, "mirostat": 2, "dry_multiplier": "x", "xtc_probability": [1], "tfs_z": {},
               "top_n_sigma": "x", "top_n_sigma[]": [1], "top_n_sigma>0": 1.5, "ignore_eos": True,
               "lora": [{"id": 0, "scale": 1}], "image_data": [{"data": "x", "id": 1}]}
LLAMA_WRONG = {
    "stop": [{"a": 1}, 1, [1], [None], [["a"]], True], "samplers": [["nope"], "top_k", [1], [None], {"a": 1}],
    "n_indent": [-1, "2", 1.5, True], "single_line": ["yes", 1], "special": ["yes", 1], "seed": [-2, 1.5, "1", True],
    "n_cmpl": [0, 17, "2", 1.5, True], "id_slot": [-2, 16, "0", True, 1.5], "stream": ["true", 1, [True]],
    "return_tokens": ["x", 1], "cache_prompt": ["x"], "response_fields": ["content", [1], {"a": 1}],
    "top_k": [-1, 1.5, "40"], "min_p": [-1, 2, "x"], "repeat_penalty": [0, -1, "x"], "repeat_last_n": [-2, 1.5, "64"],
    "presence_penalty": ["x", [0]], "fim_order": ["xyz", 1], "n_predict": [-2, "5", [2]],
    "t_max_predict_ms": [-1, "100"], "t_max_prompt_ms": [-1, "100"],
}
WRONG: dict[str, list[tuple[str, dict]]] = {r: [] for r in ROUTES}


def wrong(route: str, field: str, values, nest=None) -> None:
    for v in values:
        WRONG[route].append((f"{field}={json.dumps(v)[:100]}", nest(v) if nest else {field: v}))


for route in ("/infill", "/completion"):
    for field, values in LLAMA_WRONG.items():
        wrong(route, field, values)
    for field, v in UNSUPPORTED.items():
        WRONG[route].append((f"unsupported:{field}={json.dumps(v)[:30]}", {field.split("[")[0].split(">")[0]: v}))
EXTRA = [("input_extra", v) for v in ("x", {"text": "x"}, [1], [None], [{"filename": "a.py"}], [{"text": 1}],
                                      [{"text": None}], [{"text": ["a"]}], [{"text": "x", "filename": 1}],
                                      [{"text": "x", "filename": ["a.py"]}], [{"text": "x", "filename": {"a": 1}}],
                                      [{"text": "x", "filename": True}])]
wrong("/infill", "input_extra", [v for _, v in EXTRA])
wrong("/infill", "input_prefix", [1, ["x"], {"a": 1}])
wrong("/infill", "input_suffix", [1, ["x"], True])
wrong("/infill", "prompt", [1, [1], ["x"]])
wrong("/infill", "filename", [1, ["a.py"]])
wrong("/completion", "prompt", [[], [-1], [10**9], [2**70], [1.5], [True], [None], [[1]], {"a": 1}, 1, True, [1, "a"]])

wrong("/v1/completions", "prompt", [1, ["a", "b"], [1, 2], [], {"a": 1}, True, [[1]], None])
wrong("/v1/completions", "suffix", [1, ["x"], {"a": 1}, True])
wrong("/v1/completions", "max_tokens", [-2, "5", 1.5, True, [2], 9])
wrong("/v1/completions", "n", [0, 17, "2", 1.5])
wrong("/v1/completions", "stop", [{"a": 1}, [1], 1, [[""]], True])
wrong("/v1/completions", "stream", ["yes", 1])
wrong("/v1/completions", "stream_options", ["x", [1], 1])
wrong("/v1/completions", "seed", ["1", -5, 1.5])
wrong("/v1/completions", "samplers", [["nope"], "top_k"])
for field, v in {"echo": True, "logprobs": 5, "best_of": 2, "logit_bias": {"1": 100}, "top_n_sigma": "x",
                 "mirostat": 1}.items():
    wrong("/v1/completions", field, [v])

wrong("/api/generate", "model", [1, [], {}, "", None, "nope", DROP])
wrong("/api/generate", "prompt", [1, [], {"a": 1}, True, ["x"]])
wrong("/api/generate", "suffix", [1, ["x"], {"a": 1}, True])
wrong("/api/generate", "options", ["x", [1], 1, True])
wrong("/api/generate", "options.stop", [{"a": 1}, [1], 1], nest=lambda v: {"options": {"stop": v}})
wrong("/api/generate", "options.top_n_sigma", ["x", [1]], nest=lambda v: {"options": {"top_n_sigma": v}})
wrong("/api/generate", "options.mirostat", [1, "x"], nest=lambda v: {"options": {"mirostat": v}})
wrong("/api/generate", "options.num_predict", [-2, 9, "2"], nest=lambda v: {"options": {"num_predict": v}})
for field, v in {"images": ["aGk="], "format": "json", "system": "You code.", "template": "{{ .Prompt }}",
                 "context": [1, 2], "think": True, "raw": "yes", "stream": "yes"}.items():
    wrong("/api/generate", field, [v])
wrong("/api/generate", "keep_alive(load)", [[], {"a": 1}], nest=lambda v: {"prompt": DROP, "keep_alive": v})
wrong("/api/generate", "model(load)", [1, [], "nope"], nest=lambda v: {"prompt": DROP, "model": v})

BAD_MESSAGES = ["x", {"role": "user", "content": "hi"}, [], [1], [{}], [{"role": 1, "content": "x"}],
                [{"role": None, "content": "x"}], [{"content": "x"}], [{"role": "user", "content": 1}],
                [{"role": "user", "content": {"a": 1}}], [{"role": "user", "content": [1]}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                [{"role": "user", "content": [{"type": "text", "text": 1}]}],
                [{"role": "user", "content": [{"type": "text", "text": None}]}],
                [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}], DROP]
BAD_TOOL_CALLS = ["x", [1], [{"function": "x"}], [{"function": {"name": 1, "arguments": "{"}}],
                  [{"function": {"name": "f", "arguments": 1}}]]
wrong("/v1/chat/completions", "messages", BAD_MESSAGES)
wrong("/v1/chat/completions", "messages[].tool_calls", BAD_TOOL_CALLS, nest=lambda v: {"messages": [
    *USER, {"role": "assistant", "content": "", "tool_calls": v}, {"role": "user", "content": "?"}]})
wrong("/v1/chat/completions", "tools", ["x", [1], {"a": 1}])
wrong("/v1/chat/completions", "tool_choice", ["required", {"type": "function", "function": {"name": "f"}}, 1])
wrong("/v1/chat/completions", "response_format", ["json", {"type": "json_object"}, [1], 1])
wrong("/v1/chat/completions", "stop", [{"a": 1}, [1], 1])
wrong("/v1/chat/completions", "stream", ["yes"])
wrong("/v1/chat/completions", "stream_options", ["x", [1]])
wrong("/v1/chat/completions", "max_tokens", ["5", True, 1.5, -2, 9])
wrong("/v1/chat/completions", "n", [0, "2", 17])
wrong("/v1/chat/completions", "samplers", [["nope"]])
for field, v in {"logprobs": True, "top_logprobs": 5, "logit_bias": {"1": 1}, "audio": {"voice": "x"},
                 "modalities": ["audio"], "top_n_sigma": "x", "mirostat": 2}.items():
    wrong("/v1/chat/completions", field, [v])

wrong("/api/chat", "messages", [m for m in BAD_MESSAGES if m not in ([], DROP)] +
      [[{"role": "user", "content": "x", "images": ["aGk="]}], [{"role": "user", "content": "x", "images": "x"}]])
wrong("/api/chat", "model", [1, "", "nope", DROP, []])
wrong("/api/chat", "options", ["x", [1]])
wrong("/api/chat", "options.stop", [{"a": 1}, [1]], nest=lambda v: {"options": {"stop": v}})
wrong("/api/chat", "options.top_n_sigma", ["x"], nest=lambda v: {"options": {"top_n_sigma": v}})
wrong("/api/chat", "options.num_predict", [9, "2"], nest=lambda v: {"options": {"num_predict": v}})
wrong("/api/chat", "tools", ["x", [1]])
for field, v in {"format": "json", "think": True, "stream": "yes", "logprobs": True}.items():
    wrong("/api/chat", field, [v])
wrong("/api/chat", "messages(load)", [[], {}], nest=lambda v: {"messages": v, "model": "nope"})

wrong("/tokenize", "content", [1, None, [], {"a": 1}, True, ["x"], DROP])
wrong("/tokenize", "parse_special", ["yes", 1])
wrong("/tokenize", "with_pieces", ["yes", 1])
wrong("/detokenize", "tokens", [-1, 10**9, 1.5, True, None, "1", [[1]], {"a": 1}, "x", [-1], [10**9], [2**31],
                                [2**63], [2**64], [2**70], [-2**70], [1.5], [True], [None], ["1"], DROP])
wrong("/api/show", "model", [1, [], {}, "", None, True, "nope", DROP])
wrong("/api/show", "name", [1, "nope"], nest=lambda v: {"model": DROP, "name": v})

for route, items in WRONG.items():
    for name, overlay in items:
        add(route, f"wrong:{name}", body(route, overlay))
# /detokenize: an empty list of ids is valid (the text is "")
add("/detokenize", "tokens=[] (valid)", body("/detokenize", {"tokens": []}), allow_200=True)


# --- 7. stop strings: many and long, and empty ------------------------------------------
MANY_STOPS = [f"{i:04d}" + "~" * 1996 for i in range(2000)]  # 2000 stop strings of 2000 characters (4 MB)
for route in GENERATING:
    ollama = route in OLLAMA
    for name, stop in {"2000x2000": MANY_STOPS, "empty": "", "[empty]": [""], "[x, empty]": ["\n\n", ""]}.items():
        # valid input: a server may refuse it (4xx) or serve it. An empty stop string matches nowhere
        # useful: ignoring it (OpenAI, Ollama routes) or refusing it (llama.cpp routes) are both right.
        add(route, f"stop-{name}", body(route, {"options": {"stop": stop}} if ollama else {"stop": stop}),
            allow_200=True)

assert len({c.id for c in CASES}) == len(CASES), [k for k, n in Counter(c.id for c in CASES).items() if n > 1]


# --- the server and the checks -------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(served_artifact, tmp_path_factory):
    def load(max_slots):
        model = open_model(str(served_artifact), threads=1, max_slots=max_slots)
        model.name = MODEL
        model.chat = ChatTemplate(TEMPLATE, {"eos_token": "<|endoftext|>"})
        return model

    running = Running(Server(load, Limits(max_predict=8, max_body=8 << 20)), tmp_path_factory.mktemp("bad") / "b.sock")
    running.guarded = running.client("tcp", timeout=GUARD)
    yield running
    running.guarded.close()
    running.stop()


def post(srv, route: str, data: bytes) -> httpx.Response:
    try:
        return srv.guarded.post(route, content=data, headers=JSON)
    except httpx.TimeoutException:
        pytest.fail(f"no answer from {route} in {GUARD} s: a hang")


@pytest.mark.parametrize("route", ROUTES)
def test_base_bodies_are_valid(srv, route):
    """Each table's starting point answers 200: a case's 4xx comes from what the case changed."""
    r = post(srv, route, body(route, {}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(srv, case):
    r = post(srv, case.route, case.body)
    try:
        health = srv.guarded.get("/health").status_code
    except httpx.TimeoutException:
        health = "no answer (hang)"
    status = r.status_code
    assert status < 500, f"{status}: {r.text[:400]}"
    if status >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), (status, r.headers, r.text[:200])
        try:
            error = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            pytest.fail(f"{status} without a JSON error body: {r.text[:200]!r}")
        if case.route.startswith("/api/"):
            assert isinstance(error, str) and error, r.text[:200]
        else:
            assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"], r.text[:200]
    else:
        assert case.allow_200 and status == 200, f"{status} for invalid input: {r.text[:300]}"
        if r.headers.get("content-type", "").startswith("application/json"):
            r.json()
    assert health == 200, f"/health answered {health} after the case"


def test_case_count(capsys):
    per_route = Counter(c.route for c in CASES)
    assert set(per_route) == set(ROUTES) and len(CASES) > 1000
    with capsys.disabled():
        print(f"\ntest_serve_bad_input: {len(CASES)} bad-input cases "
              f"({sum(c.allow_200 for c in CASES)} of them allowed a 200): "
              + ", ".join(f"{r} {n}" for r, n in per_route.items()))
