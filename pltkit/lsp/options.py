"""The client's settings for plt-lsp: initializationOptions (either the settings themselves or
{"pltkit": {...}}) and the workspace/configuration section "pltkit" (pulled after `initialized`
and on every workspace/didChangeConfiguration, or taken from its settings["pltkit"]).

| name           | default         | meaning                                                     |
|----------------|-----------------|-------------------------------------------------------------|
| n_predict      | 128             | tokens generated at most per completion (1 to 4096)         |
| temperature    | 0.0             | sampling temperature; 0 is greedy (same answer every time)  |
| top_k          | 40              | keep the k most likely tokens (0: all); "top_k" sampler     |
| top_p          | 0.95            | keep the most likely tokens up to this probability mass,    |
|                |                 | in (0, 1]; "top_p" sampler                                  |
| samplers       | llama.cpp's     | the samplers that apply, in order (llama.cpp's names, see   |
|                | default chain   | pltkit/runtime/sampling.py); the default chain with         |
|                |                 | temperature 0 is greedy                                     |
| single_line    | false           | stop at the end of the current line                         |
| context_tokens | 1024            | token budget for the other open documents, packed into the  |
|                |                 | FIM prompt as extra context (most recently edited first;    |
|                |                 | 0: none)                                                    |

The sampling settings are llama.cpp's: llama.vim's request is {"samplers": ["top_k", "top_p",
"infill"], "top_k": 40, "top_p": 0.90}; without "temperature" in the list the temperature does
not apply, so that draws at temperature 1 (a different answer each time).

Unknown names are ignored; a value of the wrong type or out of range is ignored (the previous
value stays) and logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace

from pltkit.runtime.sampling import DEFAULT_SAMPLERS, sampler_names

log = logging.getLogger(__name__)
MAX_PREDICT, MAX_CONTEXT_TOKENS = 4096, 1 << 20


@dataclass(frozen=True)
class Options:
    n_predict: int = 128
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    single_line: bool = False
    context_tokens: int = 1024


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return _is_int(v) or isinstance(v, float)


def _samplers(v) -> tuple[str, ...] | None:
    """The canonical names of a list of sampler names; None if it is not one."""
    if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
        return None
    try:
        return sampler_names(v)
    except ValueError:
        return None


# name -> its value from a setting, or None when the setting is invalid (the ranges SamplingParams takes)
PARSE = {
    "n_predict": lambda v: v if _is_int(v) and 1 <= v <= MAX_PREDICT else None,
    "temperature": lambda v: float(v) if _is_number(v) and 0 <= v < math.inf else None,
    "top_k": lambda v: v if _is_int(v) and v >= 0 else None,
    "top_p": lambda v: float(v) if _is_number(v) and 0 < v <= 1 else None,
    "samplers": _samplers,
    "single_line": lambda v: v if isinstance(v, bool) else None,
    "context_tokens": lambda v: v if _is_int(v) and 0 <= v <= MAX_CONTEXT_TOKENS else None,
}


def section(raw) -> dict:
    """The settings in an initializationOptions or didChangeConfiguration payload: raw["pltkit"]
    when there is one, else raw itself; {} for anything that is not an object."""
    if isinstance(raw, dict) and isinstance(raw.get("pltkit"), dict):
        return raw["pltkit"]
    return raw if isinstance(raw, dict) else {}


def merged(options: Options, raw) -> Options:
    """`options` with the valid settings of `raw` (an object) applied."""
    if not isinstance(raw, dict):
        return options
    changes = {}
    for f in fields(Options):
        if f.name not in raw or raw[f.name] is None:
            continue
        value = PARSE[f.name](raw[f.name])
        if value is None:
            log.warning("plt-lsp: ignoring pltkit.%s = %r", f.name, raw[f.name])
        else:
            changes[f.name] = value
    return replace(options, **changes)
