"""What every protocol's parser shares: the parsed request (`Call`), the checks that turn a bad
field into a RequestError naming it, the options this server refuses, and the protocols'
defaults, stated where they differ from CompletionRequest's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from pltkit.runtime.completion import CompletionRequest, RequestError, is_number


@dataclass
class Call:
    """One parsed completion request, whatever the protocol."""

    req: CompletionRequest
    ids: list[int] | None = None  # a prompt given as token ids
    id_slot: int | None = None
    stream: bool = False
    response_fields: list[str] | None = None
    return_tokens: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex[:24])
    created: float = field(default_factory=time.time)
    chat: dict | None = None  # a chat request: messages, tools and request fields, rendered by the server
    state: dict = field(default_factory=dict)  # a protocol's notes while it streams
    model: str | None = None  # the model a request names, where the protocol checks it (Ollama)
    load: str | None = None  # Ollama's "load" / "unload" request: no prompt, answered at once


def json_object(body) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def check(cond: bool, name: str, value, what: str) -> None:
    if not cond:
        raise RequestError(f"invalid {name}: {value!r} (expected {what})")


def refuse_unsupported(body: dict, names: dict) -> None:
    """Fields that would change the result in a way this server does not implement: refused, not
    silently ignored. names: field -> predicate on its value that makes it harmless."""
    for name, harmless in names.items():
        if name in body and not harmless(body[name]):
            raise RequestError(f"{name} is not supported by this server")


def neutral(value) -> Callable[[object], bool]:
    """A predicate: the option has its neutral value (it changes nothing), or is absent (None)."""
    return lambda v: v is None or v == value


# Options of llama.cpp's server (and of Ollama) that this server does not implement: a request
# that sets one to anything but its neutral value is refused with a 400 that names it.
UNIMPLEMENTED_SAMPLING = {"typical_p": neutral(1.0), "mirostat": neutral(0), "dry_multiplier": neutral(0.0),
                          "xtc_probability": neutral(0.0), "dynatemp_range": neutral(0.0), "tfs_z": neutral(1.0),
                          "top_n_sigma": lambda v: v is None or is_number(v) and v <= 0, "ignore_eos": lambda v: not v}


def stop_list(value, name: str = "stop"):
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    check(isinstance(value, list) and all(isinstance(s, str) for s in value), name, value,
          "a string or a list of strings")
    return [s for s in value if s]


def model_name(body: dict) -> str:
    name = body.get("model") or body.get("name")  # Continue asks /api/show with "name", as older Ollamas did
    check(isinstance(name, str) and name != "", "model", name, "the name of a model, as /api/tags lists them")
    return name


# the request fields a protocol has defaults for (llama.cpp's /props lists them)
DEFAULTED = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
             "frequency_penalty", "n_predict")
REQUEST_DEFAULTS = {f.name: f.default for f in fields(CompletionRequest)}


def protocol_defaults(**own) -> dict:
    """A protocol's defaults for the DEFAULTED fields: its `own` values (at least those that differ
    from CompletionRequest's defaults), the dataclass's defaults for the rest."""
    return {name: own.get(name, REQUEST_DEFAULTS[name]) for name in DEFAULTED}
