"""The wire protocols plt-serve speaks, as pure functions from a JSON body to a `Call` and from
engine results to response objects: llama.cpp's server (/infill, /completion), OpenAI's
/v1/completions (with `suffix`) and Ollama's /api/generate. Field names follow the clients'
sources (see docs/serve.md). Each protocol also states its streaming format and error shape.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from pltkit.runtime.completion import CompletionRequest, is_number
from pltkit.runtime.engine import Result
from pltkit.serve.parsing import (UNIMPLEMENTED_SAMPLING, Call, check, json_object, model_name, protocol_defaults,
                                  refuse_unsupported, stop_list)

# llama.cpp stop types; the engine's "time" is a limit, "cancelled" is none
STOP_TYPES = {"eos": "eos", "word": "word", "limit": "limit", "time": "limit", "cancelled": "none", "none": "none"}


# --- llama.cpp ----------------------------------------------------------------------------
class LlamaCpp:
    """llama.cpp server's /infill and /completion."""

    media_type = "text/event-stream"
    unsupported = {"grammar": lambda v: not v, "json_schema": lambda v: not v, "n_probs": lambda v: not v,
                   "logit_bias": lambda v: not v, "lora": lambda v: not v, "image_data": lambda v: not v,
                   "multimodal_data": lambda v: not v, "post_sampling_probs": lambda v: not v,
                   **UNIMPLEMENTED_SAMPLING}
    # llama.cpp server's defaults for the fields a request leaves out (common_params_sampling)
    defaults = protocol_defaults(temperature=0.8, min_p=0.05, n_predict=-1)

    def __init__(self, infill: bool):
        self.infill = infill

    def parse(self, body) -> Call:
        body = dict(json_object(body))
        refuse_unsupported(body, self.unsupported)
        if "max_tokens" in body and "n_predict" not in body:
            body["n_predict"] = body["max_tokens"]
        body = {**self.defaults, **{k: v for k, v in body.items() if v is not None}}
        call = Call(CompletionRequest())
        ids = None
        if not self.infill:  # plain completion of `prompt`: text, or token ids
            prompt = body.pop("prompt", "")
            for key in ("input_prefix", "input_suffix", "input_extra"):
                body.pop(key, None)
            if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids = prompt
                check(bool(ids), "prompt", prompt, "a non-empty string or list of token ids")
                prompt = ""
            check(isinstance(prompt, str), "prompt", prompt, "a string or a list of token ids")
            check(isinstance(body.get("special", True), bool), "special", body.get("special"), "a boolean")
            body["input_prefix"], body["special"] = prompt, True  # as llama.cpp: FIM templates work
        elif "input_suffix" not in body:
            body["input_suffix"] = ""  # /infill always fills in the middle
        call.req, call.ids = CompletionRequest.from_infill(body), ids
        slot = body.get("id_slot", -1)
        check(isinstance(slot, int) and not isinstance(slot, bool) and slot >= -1, "id_slot", slot,
               "an integer >= -1")
        call.id_slot = None if slot == -1 else slot
        for name in ("stream", "return_tokens", "cache_prompt"):
            check(isinstance(body.get(name, False), bool), name, body.get(name), "a boolean")
        call.stream, call.return_tokens = body.get("stream", False), body.get("return_tokens", False)
        fields_ = body.get("response_fields")
        check(fields_ is None or isinstance(fields_, list) and all(isinstance(f, str) for f in fields_),
               "response_fields", fields_, "a list of strings")
        call.response_fields = fields_ or None
        return call

    def result(self, call: Call, r: Result, index: int, model: str, slot) -> dict:
        t = dict(r.timings)
        prompt_ms = t.get("prompt_ms", 0)
        t["prompt_per_second"] = round(t.get("prompt_n", 0) / prompt_ms * 1e3, 2) if prompt_ms else None
        req = call.req
        out = {"index": index, "content": r.text, "tokens": r.tokens if call.return_tokens else [],
               "id_slot": slot, "stop": True, "model": model, "tokens_predicted": len(r.tokens),
               "tokens_evaluated": r.tokens_evaluated, "tokens_cached": r.tokens_cached, "truncated": r.truncated,
               "stop_type": STOP_TYPES[r.stop_type], "stopping_word": r.stopping_word,
               "has_new_line": "\n" in r.text, "timings": t,
               **({"infill": "prefix-only"} if call.state.get("prefix_only") else {}),
               "generation_settings": {"n_ctx": call.state.get("n_ctx"), **settings(req)}}
        return select_fields(out, call.response_fields)

    def response(self, call: Call, results: list[Result], model: str, slot) -> dict | list:
        out = [self.result(call, r, i, model, slot) for i, r in enumerate(results)]
        return out[0] if len(out) == 1 else out

    def piece(self, call: Call, text: str, model: str, slot) -> bytes:
        return sse({"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": slot,
                    "tokens_predicted": call.state["tokens_predicted"], "tokens_evaluated": call.state["tokens_evaluated"]})

    def end(self, call: Call, results: list[Result], model: str, slot) -> bytes:
        """The last events: the streamed completion's stats (content already sent), and the other
        completions of n_cmpl whole."""
        events = []
        for i, r in enumerate(results):
            out = self.result(call, r if i else replace(r, text=""), i, model, slot)
            events.append(sse(out))
        return b"".join(events)

    @staticmethod
    def error(status: int, message: str) -> dict:
        kinds = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 501: "not_supported_error", 503: "unavailable_error"}  # llama.cpp's error_type
        kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
        return {"error": {"code": status, "message": message, "type": kind}}


def settings(req: CompletionRequest) -> dict:
    """llama.cpp's generation_settings: the request's parameters as the server applied them."""
    return {"n_predict": req.n_predict, "temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p,
            "min_p": req.min_p, "repeat_penalty": req.repeat_penalty, "repeat_last_n": req.repeat_last_n,
            "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
            "samplers": list(req.samplers), "seed": req.seed, "n_indent": req.n_indent, "stop": list(req.stop),
            "t_max_prompt_ms": req.t_max_prompt_ms, "t_max_predict_ms": req.t_max_predict_ms, "n_cmpl": req.n_cmpl}


def select_fields(out: dict, paths: list[str] | None) -> dict:
    """llama.cpp's response_fields: keep the named fields; "a/b" names a nested field and is
    returned at the top level under the key "a/b". Names that match nothing are left out."""
    if not paths:
        return out
    kept = {}
    for path in paths:
        value, found = out, True
        for key in path.split("/"):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                found = False
                break
        if found:
            kept[path] = value
    return kept


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


# --- OpenAI -------------------------------------------------------------------------------
class OpenAI:
    """POST /v1/completions, accepting `suffix` (infill)."""

    media_type = "text/event-stream"
    unsupported = {"echo": lambda v: not v, "logprobs": lambda v: v is None or v == 0,
                   "best_of": lambda v: v in (None, 1), "logit_bias": lambda v: not v, **UNIMPLEMENTED_SAMPLING}
    # OpenAI's defaults (its API reference for /v1/completions); no top-k, no min-p, no penalties
    defaults = protocol_defaults(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, n_predict=16)
    # OpenAI's fields, then llama.cpp's extensions of its OpenAI routes (llama.vim's chat sends them)
    renames = {"max_tokens": "n_predict", "n": "n_cmpl", "temperature": "temperature", "top_p": "top_p",
               "seed": "seed", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
               **{name: name for name in ("n_predict", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                                          "samplers")}}

    def parse(self, body) -> Call:
        body = json_object(body)
        refuse_unsupported(body, self.unsupported)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        check(isinstance(prompt, str), "prompt", prompt, "a string (one prompt per request)")
        args = {**self.defaults, "input_prefix": prompt, "input_suffix": body.get("suffix"),
                "stop": stop_list(body.get("stop")), "special": body.get("suffix") is None}
        args.update({ours: body[theirs] for theirs, ours in self.renames.items() if body.get(theirs) is not None})
        stream = body.get("stream", False)
        check(isinstance(stream, bool), "stream", stream, "a boolean")
        options = body.get("stream_options") or {}
        check(isinstance(options, dict), "stream_options", options, "an object")
        return Call(CompletionRequest.from_infill(args), stream=stream, include_usage=bool(options.get("include_usage")))

    @staticmethod
    def finish_reason(r: Result) -> str:
        return "length" if r.stop_type in ("limit", "time") else "stop"

    def _head(self, call: Call, model: str) -> dict:
        return {"id": call.id, "object": "text_completion", "created": int(call.created), "model": model}

    @staticmethod
    def usage(results: list[Result]) -> dict:
        prompt = results[0].tokens_cached + results[0].tokens_evaluated
        completion = sum(len(r.tokens) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self, call: Call, results: list[Result], model: str, slot) -> dict:
        choices = [{"text": r.text, "index": i, "logprobs": None, "finish_reason": self.finish_reason(r)}
                   for i, r in enumerate(results)]
        return {**self._head(call, model), "choices": choices, "usage": self.usage(results)}

    def piece(self, call: Call, text: str, model: str, slot) -> bytes:
        return sse({**self._head(call, model),
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}]})

    def end(self, call: Call, results: list[Result], model: str, slot) -> bytes:
        events = [sse({**self._head(call, model), "choices": [
            {"text": r.text if i else "", "index": i, "logprobs": None, "finish_reason": self.finish_reason(r)}]})
            for i, r in enumerate(results)]
        if call.include_usage:
            events.append(sse({**self._head(call, model), "choices": [], "usage": self.usage(results)}))
        return b"".join(events) + b"data: [DONE]\n\n"

    error = staticmethod(LlamaCpp.error)


# --- Ollama -------------------------------------------------------------------------------
OLLAMA_OPTIONS = {"num_predict": "n_predict", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                  "min_p": "min_p", "seed": "seed", "repeat_penalty": "repeat_penalty",
                  "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
                  "frequency_penalty": "frequency_penalty"}
# Ollama's defaults (api/types.go DefaultOptions)
OLLAMA_DEFAULTS = protocol_defaults(temperature=0.8, top_p=0.9, min_p=0.0, n_predict=-1)


def ollama_options(body: dict) -> dict:
    """The request fields an Ollama body's `options` set; options this server does not implement are
    refused unless neutral (those about memory and threads, such as num_ctx, change no result)."""
    options = body.get("options") or {}
    check(isinstance(options, dict), "options", options, "an object")
    refuse_unsupported(options, UNIMPLEMENTED_SAMPLING)
    args = {"stop": stop_list(options.get("stop"))}
    args.update({ours: options[theirs] for theirs, ours in OLLAMA_OPTIONS.items() if options.get(theirs) is not None})
    return args


class Ollama:
    """POST /api/generate: NDJSON streaming, on by default."""

    media_type = "application/x-ndjson"
    # `raw` is accepted either way: this route applies no template but the FIM one /api/show reports
    unsupported = {"images": lambda v: not v, "format": lambda v: not v, "context": lambda v: not v,
                   "system": lambda v: not v, "template": lambda v: not v, "think": lambda v: not v}

    def parse(self, body) -> Call:
        body = json_object(body)
        refuse_unsupported(body, self.unsupported)
        prompt, suffix = body.get("prompt", ""), body.get("suffix")
        check(isinstance(prompt, str), "prompt", prompt, "a string")
        if not prompt and not suffix:
            return self.load_call(body)
        check(isinstance(body.get("raw", False), bool), "raw", body.get("raw"), "a boolean")
        args = {**OLLAMA_DEFAULTS, **ollama_options(body), "input_prefix": prompt, "input_suffix": suffix or None, "special": not suffix}
        stream = body.get("stream", True)
        check(isinstance(stream, bool), "stream", stream, "a boolean")
        return Call(CompletionRequest.from_infill(args), stream=stream, model=model_name(body))

    @staticmethod
    def load_call(body: dict) -> Call:
        """Ollama's answer to a request without a prompt: the model is loaded (or, with keep_alive 0,
        unloaded: here it stays, there is one)."""
        keep = body.get("keep_alive")
        check(keep is None or isinstance(keep, str) or is_number(keep), "keep_alive", keep,
               "a duration: seconds, or a string such as \"5m\"")
        return Call(CompletionRequest(), model=model_name(body),
                    load="unload" if keep in (0, "0", "0s", "0m") else "load")

    def loaded(self, call: Call, model: str) -> dict:
        return {"model": model, "created_at": self._now(), "response": "", "done": True, "done_reason": call.load}

    @staticmethod
    def _now() -> str:
        return ollama_time(time.time())

    def _final(self, call: Call, r: Result, model: str, text: str) -> dict:
        t = r.timings
        prompt_ns, eval_ns = int(t.get("prompt_ms", 0) * 1e6), int(t.get("predicted_ms", 0) * 1e6)
        return {"model": model, "created_at": self._now(), "response": text, "done": True,
                "done_reason": "length" if r.stop_type in ("limit", "time") else "stop",
                "total_duration": int((time.time() - call.created) * 1e9), "load_duration": 0,
                "prompt_eval_count": r.tokens_evaluated, "prompt_eval_duration": prompt_ns,
                "eval_count": len(r.tokens), "eval_duration": eval_ns}

    def response(self, call: Call, results: list[Result], model: str, slot) -> dict:
        return self._final(call, results[0], model, results[0].text)

    def piece(self, call: Call, text: str, model: str, slot) -> bytes:
        return ndjson({"model": model, "created_at": self._now(), "response": text, "done": False})

    def end(self, call: Call, results: list[Result], model: str, slot) -> bytes:
        return ndjson(self._final(call, results[0], model, ""))

    @staticmethod
    def error(status: int, message: str) -> dict:
        return {"error": message}


def ollama_time(seconds: float) -> str:
    """A time as Ollama writes it (created_at, modified_at): UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def ndjson(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


COMPLETION_ROUTES = {"/infill": LlamaCpp(infill=True), "/completion": LlamaCpp(infill=False),
                     "/v1/completions": OpenAI(), "/api/generate": Ollama()}
