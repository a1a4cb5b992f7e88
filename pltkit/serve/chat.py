"""The chat protocols: OpenAI's POST /v1/chat/completions and Ollama's POST /api/chat. A request's
messages (and tools) are rendered with the model's chat template by the server (`chat_prompt`);
the reply's `<tool_call>{json}</tool_call>` blocks come back as the protocol's tool calls when
the request offered tools. See docs/serve.md.
"""

from __future__ import annotations

import json
from dataclasses import replace

from pltkit.runtime.chat import (NoChatTemplate, end_of_turn_ids, held_for_tools, openai_tool_call, parse_tool_calls,
                                 prompt_ids)
from pltkit.runtime.completion import CompletionRequest, RequestError
from pltkit.runtime.engine import Result
from pltkit.serve.parsing import (UNIMPLEMENTED_SAMPLING, Call, check, json_object, model_name, refuse_unsupported,
                                  stop_list)
from pltkit.serve.protocols import OLLAMA_DEFAULTS, Ollama, OpenAI, ndjson, ollama_options, sse


def _messages(value) -> list[dict]:
    check(isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     for m in value),
           "messages", value, "a non-empty list of {role, content} objects")
    out = []
    for m in value:
        m = dict(m)
        if isinstance(m.get("content"), list):  # OpenAI's content parts: the text ones, joined
            parts = m["content"]
            check(all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text", ""), str)
                       for p in parts), "content", parts, "a string or a list of text parts")
            m["content"] = "".join(p.get("text", "") for p in parts)
        check(m.get("content") is None or isinstance(m["content"], str), "content", m.get("content"), "a string")
        calls = m.get("tool_calls")
        check(calls is None or isinstance(calls, list) and all(map(_tool_call, calls)), "tool_calls", calls,
               "a list of {function: {name: string, arguments: JSON text or object}} objects")
        out.append(m)
    return out


def _tool_call(call) -> bool:
    f = call.get("function") if isinstance(call, dict) else None
    return isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments", {}), (str, dict))


def _tools(value) -> list[dict] | None:
    check(value is None or isinstance(value, list) and all(isinstance(t, dict) for t in value), "tools", value,
           "a list of objects")
    return value or None


def chat_prompt(model, call: Call) -> None:
    """Renders a chat call's messages with the model's template: sets call.ids and call.req (the
    request's fields over the template's sampling defaults, and its end-of-turn tokens)."""
    template = model.chat
    if template is None:
        raise NoChatTemplate(f"model {model.name!r} has no chat template (no chat_template.jinja, nor chat_template "
                             "in tokenizer_config.json): chat is not available, use the completion routes")
    messages = []
    for m in call.chat["messages"]:  # OpenAI's tool-call arguments are JSON text; templates want objects
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            m = {**m, "tool_calls": [_parsed_arguments(c) for c in calls]}
        messages.append(m)
    text = template.render(messages, call.chat["tools"], add_generation_prompt=True)
    engine = model.engine
    if len(text) > engine.context_chars:  # more tokens than the context holds: not worth tokenizing
        raise RequestError(f"the chat of {len(text)} characters exceeds the context of {engine.context} tokens")
    call.ids = prompt_ids(engine.tok, text)
    req = CompletionRequest.from_infill({"n_predict": -1, **call.chat["defaults"], **template.sampling,
                                         **call.chat["args"]})
    call.req = replace(req, end_ids=end_of_turn_ids(model.engine.tok))


def _parsed_arguments(call):
    f = call.get("function") if isinstance(call, dict) else None
    if isinstance(f, dict) and isinstance(f.get("arguments"), str):
        try:
            return {**call, "function": {**f, "arguments": json.loads(f["arguments"])}}
        except ValueError:
            pass
    return call


def reply(call: Call, r: Result) -> tuple[str, list[dict]]:
    """A completion's text and tool calls (only when the request offered tools)."""
    return parse_tool_calls(r.text) if call.chat["tools"] else (r.text, [])


def _streamed(call: Call, text: str) -> str:
    """The part of a new piece to send now: with tools, text from a `<tool_call>` on waits for the end."""
    call.state["text"] = call.state.get("text", "") + text
    total, sent = call.state["text"], call.state.get("sent", 0)
    # with tools, the reply's text is stripped at the end: trailing whitespace waits too
    show = len(total[:held_for_tools(total)].rstrip()) if call.chat["tools"] else len(total)
    if show <= sent:
        return ""
    call.state["sent"] = show
    return total[sent:show]


def _rest(call: Call, content: str) -> str:
    sent = call.state.get("text", "")[:call.state.get("sent", 0)]
    return content[len(sent):] if content.startswith(sent) else ""


# --- OpenAI -------------------------------------------------------------------------------
class OpenAIChat:
    """POST /v1/chat/completions."""

    media_type = "text/event-stream"
    unsupported = {"logprobs": lambda v: not v, "top_logprobs": lambda v: not v, "logit_bias": lambda v: not v,
                   "response_format": lambda v: not v or isinstance(v, dict) and v.get("type") == "text",
                   "tool_choice": lambda v: v in (None, "auto", "none"), "audio": lambda v: not v,
                   "modalities": lambda v: not v or v == ["text"], **UNIMPLEMENTED_SAMPLING}
    renames = {**OpenAI.renames, "max_completion_tokens": "n_predict"}
    defaults = {k: v for k, v in OpenAI.defaults.items() if k != "n_predict"}  # OpenAI's; no token cap

    def parse(self, body) -> Call:
        body = json_object(body)
        refuse_unsupported(body, self.unsupported)
        args = {ours: body[theirs] for theirs, ours in self.renames.items() if body.get(theirs) is not None}
        args["stop"] = stop_list(body.get("stop"))
        tools = None if body.get("tool_choice") == "none" else _tools(body.get("tools"))
        stream = body.get("stream", False)
        check(isinstance(stream, bool), "stream", stream, "a boolean")
        options = body.get("stream_options") or {}
        check(isinstance(options, dict), "stream_options", options, "an object")
        call = Call(CompletionRequest(), stream=stream, include_usage=bool(options.get("include_usage")),
                    chat={"messages": _messages(body.get("messages")), "tools": tools, "args": args,
                          "defaults": self.defaults})
        call.id = "chatcmpl-" + call.id.removeprefix("cmpl-")
        return call

    def _head(self, call: Call, model: str) -> dict:
        return {"id": call.id, "object": "chat.completion.chunk" if call.stream else "chat.completion",
                "created": int(call.created), "model": model}

    @staticmethod
    def finish_reason(r: Result, calls: list) -> str:
        return "tool_calls" if calls else OpenAI.finish_reason(r)

    def response(self, call: Call, results: list[Result], model: str, slot) -> dict:
        choices = []
        for i, r in enumerate(results):
            content, calls = reply(call, r)
            message = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                message["tool_calls"] = [openai_tool_call(c) for c in calls]
            choices.append({"index": i, "message": message, "logprobs": None,
                            "finish_reason": self.finish_reason(r, calls)})
        return {**self._head(call, model), "choices": choices, "usage": OpenAI.usage(results)}

    def _chunk(self, call: Call, model: str, index: int, delta: dict, finish: str | None) -> bytes:
        return sse({**self._head(call, model),
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def _role(self, call: Call) -> dict:
        if call.state.get("role_sent"):
            return {}
        call.state["role_sent"] = True
        return {"role": "assistant"}

    def piece(self, call: Call, text: str, model: str, slot) -> bytes:
        text = _streamed(call, text)
        if not text:
            return b""
        return self._chunk(call, model, 0, {**self._role(call), "content": text}, None)

    def end(self, call: Call, results: list[Result], model: str, slot) -> bytes:
        events = []
        for i, r in enumerate(results):
            content, calls = reply(call, r)
            delta = {**self._role(call), "content": _rest(call, content)} if i == 0 else \
                {"role": "assistant", "content": content}
            if calls:
                delta["tool_calls"] = [{"index": k, **openai_tool_call(c)} for k, c in enumerate(calls)]
            events.append(self._chunk(call, model, i, delta, self.finish_reason(r, calls)))
        if call.include_usage:
            events.append(sse({**self._head(call, model), "choices": [], "usage": OpenAI.usage(results)}))
        return b"".join(events) + b"data: [DONE]\n\n"

    error = staticmethod(OpenAI.error)


# --- Ollama -------------------------------------------------------------------------------
class OllamaChat(Ollama):
    """POST /api/chat: NDJSON streaming, on by default; Ollama's message shape."""

    unsupported = {"format": lambda v: not v, "think": lambda v: not v, "logprobs": lambda v: not v}

    def parse(self, body) -> Call:
        body = json_object(body)
        refuse_unsupported(body, self.unsupported)
        if not body.get("messages"):
            return self.load_call(body)
        messages = _messages(body.get("messages"))
        if any(m.get("images") for m in messages):
            raise RequestError("images are not supported by this server")
        stream = body.get("stream", True)
        check(isinstance(stream, bool), "stream", stream, "a boolean")
        return Call(CompletionRequest(), stream=stream, model=model_name(body),
                    chat={"messages": messages, "tools": _tools(body.get("tools")), "args": ollama_options(body),
                          "defaults": OLLAMA_DEFAULTS})

    def loaded(self, call: Call, model: str) -> dict:
        return {"model": model, "created_at": self._now(), "message": self._message("", []), "done": True,
                "done_reason": call.load}

    def _message(self, content: str, calls: list[dict]) -> dict:
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [{"function": c} for c in calls]
        return message

    def _chat_final(self, call: Call, r: Result, model: str, content: str, calls: list[dict]) -> dict:
        out = self._final(call, r, model, "")
        del out["response"]
        return {"model": model, "created_at": out.pop("created_at"), "message": self._message(content, calls), **out}

    def response(self, call: Call, results: list[Result], model: str, slot) -> dict:
        content, calls = reply(call, results[0])
        return self._chat_final(call, results[0], model, content, calls)

    def piece(self, call: Call, text: str, model: str, slot) -> bytes:
        text = _streamed(call, text)
        if not text:
            return b""
        return ndjson({"model": model, "created_at": self._now(), "message": self._message(text, []), "done": False})

    def end(self, call: Call, results: list[Result], model: str, slot) -> bytes:
        content, calls = reply(call, results[0])
        return ndjson(self._chat_final(call, results[0], model, _rest(call, content), calls))


CHAT_ROUTES = {"/v1/chat/completions": OpenAIChat(), "/api/chat": OllamaChat()}
