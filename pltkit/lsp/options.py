"""The client's settings for plt-lsp: initializationOptions (either the settings themselves or
{"pltkit": {...}}) and the workspace/configuration section "pltkit" (pulled after `initialized`
and on every workspace/didChangeConfiguration, or taken from its settings["pltkit"]).

| name           | default | meaning                                                              |
|----------------|---------|----------------------------------------------------------------------|
| n_predict      | 128     | tokens generated at most per completion (1 to 4096)                  |
| temperature    | 0.0     | sampling temperature; 0 is greedy (same answer every time)           |
| single_line    | false   | stop at the end of the current line                                  |
| context_tokens | 1024    | token budget for the other open documents, packed into the FIM      |
|                |         | prompt as extra context (most recently edited first; 0: none)        |

Unknown names are ignored; a value of the wrong type or out of range is ignored (the previous
value stays) and logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace

log = logging.getLogger(__name__)
MAX_PREDICT, MAX_CONTEXT_TOKENS = 4096, 1 << 20


@dataclass(frozen=True)
class Options:
    n_predict: int = 128
    temperature: float = 0.0
    single_line: bool = False
    context_tokens: int = 1024


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


CHECKS = {
    "n_predict": lambda v: _is_int(v) and 1 <= v <= MAX_PREDICT,
    "temperature": lambda v: (_is_int(v) or isinstance(v, float)) and 0 <= v < math.inf,
    "single_line": lambda v: isinstance(v, bool),
    "context_tokens": lambda v: _is_int(v) and 0 <= v <= MAX_CONTEXT_TOKENS,
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
        value = raw[f.name]
        if CHECKS[f.name](value):
            changes[f.name] = float(value) if f.name == "temperature" else value
        else:
            log.warning("plt-lsp: ignoring pltkit.%s = %r", f.name, value)
    return replace(options, **changes)
