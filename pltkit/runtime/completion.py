"""Code-completion requests: their fields (llama.cpp's /infill) and the FIM prompt layout (when
to stop: pltkit.runtime.stopping). Pure functions and small classes; the engine that runs them
sits on top.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, fields, replace

from pltkit.model.tokenizer import PLTTokenizer
from pltkit.runtime.sampling import DEFAULT_SAMPLERS, SamplingParams, sampler_names


class RequestError(ValueError):
    """A request that cannot be served; the message names the field."""


# Stop strings are checked at every generated token: their number and length are capped (OpenAI
# takes 4; editors send a dozen short ones), so that one request cannot make each token cost seconds
MAX_STOPS, MAX_STOP_CHARS = 64, 256


@dataclass(frozen=True)
class CompletionRequest:
    """Field names follow llama.cpp's /infill (input_prefix -> prefix, input_suffix -> suffix,
    input_extra -> extra, prompt = the current line before the cursor)."""

    prefix: str = ""
    suffix: str | None = None  # None: plain completion of prefix + prompt
    prompt: str = ""
    extra: tuple[tuple[str | None, str], ...] = ()  # (filename, text) chunks of other files
    filename: str | None = None  # the current file, for repo-level layouts
    n_predict: int = 128  # -1: until another rule stops it; 0: only fill the cache
    n_indent: int = 0
    single_line: bool = False
    stop: tuple[str, ...] = ()
    t_max_prompt_ms: float = 0.0  # accepted and ignored, as llama.cpp does
    t_max_predict_ms: float = 0.0  # 0: no limit; else stop past it once a newline was generated
    # sampling (pltkit.runtime.sampling): greedy unless asked; each protocol of plt-serve sets its own defaults
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    seed: int | None = None
    n_cmpl: int = 1
    fim_order: str = "psm"  # or "spm" (suffix first)
    special: bool = False  # a plain prompt's special-token names become those tokens (llama.cpp's /completion)
    end_ids: tuple[int, ...] = ()  # tokens that end the completion besides eos (a chat's end of turn)

    def __post_init__(self):
        checks = {
            "prefix": isinstance(self.prefix, str), "prompt": isinstance(self.prompt, str),
            "suffix": self.suffix is None or isinstance(self.suffix, str),
            "n_predict": _int(self.n_predict) and self.n_predict >= -1,
            "n_indent": _int(self.n_indent) and self.n_indent >= 0,
            "single_line": isinstance(self.single_line, bool), "special": isinstance(self.special, bool),
            "stop": len(self.stop) <= MAX_STOPS and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                        for s in self.stop),
            "t_max_prompt_ms": is_number(self.t_max_prompt_ms) and self.t_max_prompt_ms >= 0,
            "t_max_predict_ms": is_number(self.t_max_predict_ms) and self.t_max_predict_ms >= 0,
            "filename": self.filename is None or isinstance(self.filename, str),
            "temperature": is_number(self.temperature) and self.temperature >= 0,
            "top_k": _int(self.top_k) and self.top_k >= 0,
            "top_p": is_number(self.top_p) and 0 < self.top_p <= 1,
            **{name: is_number(getattr(self, name)) for name in ("min_p", "repeat_penalty", "presence_penalty",
                                                                 "frequency_penalty")},
            "repeat_last_n": _int(self.repeat_last_n),
            "seed": self.seed is None or _int(self.seed) and self.seed >= 0,
            "n_cmpl": _int(self.n_cmpl) and 1 <= self.n_cmpl <= 16,
            "fim_order": self.fim_order in FIM_ORDERS,
            "extra": all(isinstance(t, str) and (f is None or isinstance(f, str)) for f, t in self.extra),
            "end_ids": all(_int(i) for i in self.end_ids),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad == ["stop"] and all(isinstance(s, str) for s in self.stop):
            raise RequestError(f"invalid stop: at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters")
        if bad:
            raise RequestError(f"invalid {bad[0]}: {_short(getattr(self, bad[0]))}")
        try:
            self.sampling()
        except (TypeError, ValueError) as e:
            raise RequestError(f"invalid sampling parameters: {e}") from None

    def sampling(self) -> SamplingParams:
        return SamplingParams(**{name: getattr(self, name) for name in SAMPLING})

    @classmethod
    def from_infill(cls, body: dict) -> CompletionRequest:
        """A llama.cpp /infill (or /completion) JSON body."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        renames = {"input_prefix": "prefix", "input_suffix": "suffix", "input_extra": "extra"}
        known = {f.name for f in fields(cls)} - {"end_ids"}  # set by the server, never by a request
        args = {}
        for key, value in body.items():
            name = renames.get(key, key)
            if name in known:
                args[name] = value
        if args.get("seed") == -1:  # llama.cpp: -1 is a random seed
            args["seed"] = None
        if "extra" in args:
            chunks = args["extra"]
            if not isinstance(chunks, list) or not all(isinstance(c, dict) and "text" in c for c in chunks):
                raise RequestError("invalid input_extra: a list of {filename?, text} objects")
            args["extra"] = tuple((c.get("filename"), c["text"]) for c in chunks)
        if "samplers" in args:  # llama.cpp's names, canonical ones and others ("top-k", "temp", ...)
            names = args["samplers"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise RequestError(f"invalid samplers: {names!r} (expected a list of sampler names)")
            try:
                args["samplers"] = sampler_names(names)
            except ValueError as e:
                raise RequestError(f"invalid samplers: {e}") from None
        if "stop" in args:
            if isinstance(args["stop"], str):
                args["stop"] = [args["stop"]]
            if not isinstance(args["stop"], list):
                raise RequestError("invalid stop: a list of strings")
            args["stop"] = tuple(args["stop"])
        try:
            return cls(**args)
        except TypeError as e:
            raise RequestError(str(e)) from None


SAMPLING = [f.name for f in fields(SamplingParams)]  # the request fields that are sampling parameters


def _short(value, limit: int = 80) -> str:
    """A value for an error message, cut short: a request's value may be megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite number (JSON's 1e400 parses as infinity, and Python's json takes Infinity and NaN)."""
    return not isinstance(x, bool) and (isinstance(x, int) and abs(x) < 2**63 or isinstance(x, float)
                                        and math.isfinite(x))


# --- prompt layout ------------------------------------------------------------------------
FIM_ORDERS = {
    # where the parts go; the current line ("prompt") always comes last, after the middle token,
    # so that typing on it changes only the tail of the token sequence
    "psm": ("prefix", "suffix", "middle"),
    "spm": ("suffix", "prefix", "middle"),
}


@dataclass
class Prompt:
    ids: list[int]
    truncated: bool = False
    parts: dict = field(default_factory=dict)  # tokens kept of each part
    marks: tuple[int, ...] = ()  # positions where the next request will likely differ: worth a snapshot


def layout(tok: PLTTokenizer, req: CompletionRequest, budget: int) -> Prompt:
    """The token ids of a request within `budget` tokens (the context minus room to generate).
    Suffix kept from its start (at most a quarter of the budget), prefix from its end, extra
    chunks (most recent last) fill what is left, in front."""
    line = tok.encode(req.prompt)
    if req.suffix is None:  # plain completion
        rest = tok.encode_continuation(req.prompt) if req.prefix else line  # no SentencePiece "▁" in between
        ids = tok.encode_with_specials(req.prefix + req.prompt) if req.special else tok.encode(req.prefix) + rest
        keep = ids[-budget:] if budget > 0 else []
        return Prompt(keep, len(keep) < len(ids), {"prefix": len(keep), "given": len(ids)})
    fim = tok.fim
    if fim is None:  # no FIM tokens: continue the prefix; the Stopper cuts where the suffix begins
        ids = tok.encode(req.prefix + req.prompt)
        keep = ids[-budget:] if budget > 0 else []
        return Prompt(keep, len(keep) < len(ids), {"prefix": len(keep), "prefix_only": True})
    suffix = tok.encode(req.suffix)
    prefix = tok.encode(req.prefix)
    room = budget - len(line) - 3
    if room < 0:
        raise RequestError(f"the current line alone ({len(line)} tokens) exceeds the prompt budget ({budget})")
    suffix_kept = suffix[:min(len(suffix), room // 4)]
    prefix_kept = stable_tail(tok, req.prefix, prefix, room - len(suffix_kept))
    marks = {"prefix": [fim.prefix, *prefix_kept], "suffix": [fim.suffix, *suffix_kept], "middle": [fim.middle]}
    body = [t for part in FIM_ORDERS[req.fim_order] for t in marks[part]] + line
    head, left = [], budget - len(body)
    if fim.file_sep is not None:
        for filename, text in reversed(req.extra):
            chunk = [fim.file_sep, *tok.encode(f"{filename}\n" if filename else ""), *tok.encode(text)]
            if len(chunk) > left:
                break
            head, left = chunk + head, left - len(chunk)
        if req.filename and head and left > 2:  # name the current file after the others
            name = [fim.file_sep, *tok.encode(req.filename + "\n")]
            if len(name) <= left:
                head += name
    truncated = len(prefix_kept) < len(prefix) or len(suffix_kept) < len(suffix)
    # typing changes the current line (after the middle token); a new line changes what follows
    # the first part (the prefix, in PSM order), and maybe its last token ("\n" + indent merge)
    first = len(head) + 1 + len(prefix_kept if FIM_ORDERS[req.fim_order][0] == "prefix" else suffix_kept)
    marks = (first - 1, first, len(head) + len(body) - len(line))
    return Prompt(head + body, truncated, marks=marks, parts={"prefix": len(prefix_kept), "suffix": len(suffix_kept),
                                           "extra": len(head)})


def clip(req: CompletionRequest, chars: int) -> tuple[CompletionRequest, bool]:
    """The request with every text cut to `chars` characters (the prefix and current line keep
    their ends, the rest their starts), and whether anything was cut. Given chars = context *
    tok.max_token_chars, a text that long is already more tokens than the context holds, so the
    layout of the cut request is that of the whole one, or the same "exceeds the context" error:
    a megabyte of input costs no more than a context's worth of tokenizing. (Unless one
    pre-token, such as a run of thousands of spaces, spans the cut and the kept tokens: a
    tokenizer splits such a run by its length.)"""
    head, tail = slice(None, chars), slice(-chars, None)
    cut = {"prefix": req.prefix[tail], "prompt": req.prompt[tail],
           "suffix": req.suffix if req.suffix is None else req.suffix[head],
           "filename": req.filename if req.filename is None else req.filename[head],
           "extra": tuple((f if f is None else f[head], t[head]) for f, t in req.extra)}
    changed = {k: v for k, v in cut.items() if v != getattr(req, k)}
    return (replace(req, **changed), True) if changed else (req, False)


def layout_with_bos(tok: PLTTokenizer, req: CompletionRequest, budget: int) -> Prompt:
    """layout(), behind the bos token where the tokenizer's config adds one (SentencePiece models)."""
    lead = [tok.bos_id] if tok.add_bos else []
    if not lead:
        return layout(tok, req, budget)
    p = layout(tok, req, budget - len(lead))
    p.ids, p.marks = lead + p.ids, tuple(m + len(lead) for m in p.marks)
    if "given" in p.parts:
        p.parts["given"] += len(lead)
    return p


def stable_tail(tok: PLTTokenizer, text: str, ids: list[int], budget: int) -> list[int]:
    """The end of `text` (tokens `ids`) within `budget` tokens, cut where the next request's
    prompt will be cut too. As the user types on, the prefix grows at its end (and an editor's
    window of the last N lines slides): cutting at a fixed token count would move the start of
    the prompt every time and no cached prefix would ever match. So the cut falls on the line
    with the smallest content hash (the leftmost of equals) among the lines that would come
    first, up to a quarter of the budget: it stays put until the text moves past it
    (winnowing). Costs at most a quarter of the budget, usually much less."""
    if len(ids) <= budget:
        return ids
    if budget <= 0:
        return []
    lines = text.splitlines(keepends=True)
    counts = tok.count_batch(lines)
    first, total = len(lines), 0
    while first > 0 and total + counts[first - 1] <= budget:
        first, total = first - 1, total + counts[first - 1]
    window, spent = [], 0
    for i in range(first, len(lines)):
        if window and spent + counts[i] > budget // 4:
            break
        window.append(i)
        spent += counts[i]
    anchor = min(window, key=lambda i: (zlib.crc32(lines[i].encode()), i), default=first)
    kept = tok.encode("".join(lines[anchor:]))
    return kept[-budget:] if len(kept) > budget else kept
