"""Chat templates: the Jinja template a model folder ships (`chat_template.jinja`, or
`chat_template` in tokenizer_config.json), rendered as transformers' `apply_chat_template`
renders it, in a sandbox: a template is data from the checkpoint, never code to run. Also the
end-of-turn tokens, the sampling defaults of generation_config.json, and the tool calls in a
reply (`<tool_call>{json}</tool_call>`).

A model without a template has no chat: NoChatTemplate, never a guessed template.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from pltkit.runtime.completion import RequestError

# the named special tokens transformers passes to a template
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokens that end a turn in the chat formats in use, when the tokenizer has them
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class NoChatTemplate(RequestError):
    """The model folder has no chat template."""


class ChatTemplateError(RequestError):
    """The template refused the conversation (raise_exception) or failed to render it."""


@dataclass
class ChatTemplate:
    source: str
    special: dict[str, str] = field(default_factory=dict)  # bos_token etc., as text
    sampling: dict = field(default_factory=dict)  # request fields from generation_config.json
    tool_source: str | None = None  # a separate "tool_use" template, for requests with tools

    @classmethod
    def from_dir(cls, path) -> ChatTemplate | None:
        path = Path(path)
        tcfg, smap, gen = (_read_json(path / n) for n in ("tokenizer_config.json", "special_tokens_map.json",
                                                          "generation_config.json"))
        source, tool_source = None, None
        if (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text()
        else:
            t = tcfg.get("chat_template")
            if isinstance(t, str):
                source = t
            elif isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
                named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
                source, tool_source = named.get("default"), named.get("tool_use")
        if not isinstance(source, str) or not source.strip():
            return None
        special = {}
        for name in SPECIAL_NAMES:
            value = _token_text(tcfg.get(name))
            value = value if value is not None else _token_text(smap.get(name))
            if value is not None:
                special[name] = value
        names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "repetition_penalty": "repeat_penalty"}  # generation_config.json's -> a request's
        sampling = {ours: gen[theirs] for theirs, ours in names.items() if gen.get(theirs) is not None}
        if gen.get("do_sample") is False:
            sampling = {"temperature": 0.0}
        return cls(source, special, sampling, tool_source if isinstance(tool_source, str) else None)

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs) -> str:
        """The prompt text, as transformers' apply_chat_template(tokenize=False) gives it."""
        import jinja2

        source = self.tool_source if tools and self.tool_source else self.source
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RequestError("messages must be a list of objects")
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        try:
            return _compile(source).render(messages=chat, tools=tools, documents=None,
                                           add_generation_prompt=add_generation_prompt,
                                           **{**self.special, **kwargs})
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            # the conversation does not fit the template (a message it cannot read, roles it refuses)
            raise ChatTemplateError(f"the chat template failed: {e}") from None

    @property
    def uses_tools(self) -> bool:
        return "tools" in self.source or self.tool_source is not None


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _generation_extension()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _generation_extension():
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} (transformers marks assistant text with it): its body, as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    return Generation


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# --- prompt ids and stopping --------------------------------------------------------------
def prompt_ids(tok, text: str) -> list[int]:
    """The rendered prompt as tokens: special-token names become those tokens. BOS goes in front
    where the tokenizer adds one (`add_bos`) unless the template already wrote it; a doubled
    one at the start is collapsed."""
    ids = tok.encode_with_specials(text)
    bos = tok.bos_id
    if bos is not None and getattr(tok, "add_bos", False) and ids[:1] != [bos]:
        ids = [bos, *ids]
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def end_of_turn_ids(tok) -> tuple[int, ...]:
    """The eos ids, and the end-of-turn tokens of the common chat formats the tokenizer has."""
    ids = list(tok.eos_ids)
    for name in END_OF_TURN:
        i = tok.token_to_id(name)
        if i is not None and i not in ids:
            ids.append(i)
    return tuple(ids)


# --- tool calls ---------------------------------------------------------------------------
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
OPEN_TAG = "<tool_call>"


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """The reply's text without its well-formed `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
    blocks, and those calls as {"name", "arguments" (a dict)}. A block that is not such JSON stays text."""
    calls, kept, at = [], [], 0
    for m in TOOL_CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except ValueError:
            continue
        args = call.get("arguments", call.get("parameters", {})) if isinstance(call, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(args, dict):
            continue
        calls.append({"name": call["name"], "arguments": args})
        kept.append(text[at:m.start()])
        at = m.end()
    kept.append(text[at:])
    return ("".join(kept).strip() if calls else text), calls


def openai_tool_call(call: dict) -> dict:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def held_for_tools(text: str) -> int:
    """How much of a streamed reply may be shown while tool calls may follow: the text before the
    first `<tool_call>`, or before a trailing partial `<tool_call`."""
    at = text.find(OPEN_TAG)
    if at >= 0:
        return at
    for k in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if text.endswith(OPEN_TAG[:k]):
            return len(text) - k
    return len(text)
