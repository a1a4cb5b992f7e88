"""Sampling as a pure function of the logits, the history and an explicit numpy Generator.

It imitates llama.cpp's common sampler (common/sampling.cpp `common_sampler_init`, samplers in
src/llama-sampling.cpp): `params.samplers` lists the samplers in the order they apply to the
candidate list (all tokens at first), then one final draw ("dist") picks a token.

Chain rules, as llama.cpp builds them:
- Each name in `samplers` adds its sampler where it stands; names not listed do not apply. There
  is no hidden greedy mode: llama.cpp's temperature sampler, given temp <= 0, keeps only the
  candidate with the highest logit (the first one on ties), so with the default order greedy is
  the argmax of the *penalized* logits (penalties come first).
- Without "temperature" in the list the temperature is not applied at all, whatever its value
  (llama.vim sends ["top_k", "top_p", "infill"] and gets draws at temperature 1 from what is
  left; its warm-ups send [] and draw from the full softmax). We do the same.
- The final draw always recomputes a softmax from the surviving candidates' logits (llama.cpp's
  `llama_sampler_dist_apply`) and draws from it; a single candidate is returned without using rng.
- "dry", "xtc", "typ_p" and "top_n_sigma" are accepted names that do nothing here (their neutral
  parameters are the only ones the server lets through). llama.cpp's "adaptive_p" is not accepted.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

CANONICAL = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature",
             "infill")
ALT_NAMES = {"top-k": "top_k", "top-p": "top_p", "nucleus": "top_p", "top-n-sigma": "top_n_sigma",
             "typical-p": "typ_p", "typical": "typ_p", "typ-p": "typ_p", "typ": "typ_p", "min-p": "min_p",
             "temp": "temperature"}  # llama.cpp common_sampler_types_from_names
DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")


def sampler_names(names: Sequence[str]) -> tuple[str, ...]:
    """The canonical names of `names` (llama.cpp's or its alternative spellings), in order."""
    if isinstance(names, str):
        raise ValueError(f"samplers must be a list of names, got the string {names!r}")
    unknown = [n for n in names if n not in CANONICAL and n not in ALT_NAMES]
    if unknown:
        raise ValueError(f"unknown sampler name(s) {unknown}; known: {list(CANONICAL)} and {sorted(ALT_NAMES)}")
    return tuple(ALT_NAMES.get(n, n) for n in names)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # <= 0 in the chain: keep the argmax only (greedy)
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # llama.cpp's penalty_repeat
    repeat_last_n: int = 64  # history tokens penalized; 0: none; -1: all of the history given
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS  # stored canonical

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be >= -1, got {self.repeat_last_n}")
        object.__setattr__(self, "samplers", sampler_names(self.samplers))


@dataclass(frozen=True)
class TokenInfo:
    """What the infill sampler needs to know about the vocabulary."""

    eog: frozenset[int]  # end-of-generation ids
    piece: Callable[[int], str]  # a token's text piece (used for the common-prefix test)
    eot: int | None = None  # what infill returns when no text token is left; None: the smallest EOG id


@dataclass
class _Cands:
    """The candidate list: token ids, their logits, whether they are sorted by logit (descending)
    and whether they are still the whole vocabulary in id order (ids[i] == i)."""

    ids: np.ndarray
    logits: np.ndarray
    sorted: bool = False
    whole: bool = True

    def keep(self, idx) -> None:
        self.ids, self.logits, self.whole = self.ids[idx], self.logits[idx], False

    def sort(self) -> None:
        if not self.sorted:
            self.keep(np.argsort(-self.logits))
            self.sorted = True

    def probs(self) -> np.ndarray:
        p = np.exp(self.logits - self.logits.max())
        return p / p.sum()


# -- the samplers: each one narrows or rescales the candidates in place (llama-sampling.cpp) --

def _penalties(c: _Cands, params: SamplingParams, history: Sequence[int], info) -> None:
    """llama_sampler_penalties_apply: for each token among the last repeat_last_n of history, with
    count n > 0: logit <= 0 ? logit * repeat : logit / repeat, then logit -= n * freq + presence."""
    last_n = params.repeat_last_n
    if last_n == 0 or len(history) == 0 or (params.repeat_penalty == 1 and params.frequency_penalty == 0
                                            and params.presence_penalty == 0):
        return
    window = np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64)
    seen, counts = np.unique(window, return_counts=True)
    if c.whole:  # the usual case (penalties first): the positions are the ids
        inside = (seen >= 0) & (seen < len(c.ids))
        hit, n = seen[inside], counts[inside]
    else:  # O(n log m) over the n candidates, m = distinct tokens in the window
        at = np.searchsorted(seen, c.ids)
        hit = np.flatnonzero(seen[np.minimum(at, len(seen) - 1)] == c.ids)
        n = counts[at[hit]]
    z = c.logits[hit]
    # penalties near the float range's edge overflow: sample() takes the limit
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.where(z <= 0, z * params.repeat_penalty, z / params.repeat_penalty)
        c.logits[hit] = z - (n * params.frequency_penalty + params.presence_penalty)
    c.sorted = False


def _top_k(c: _Cands, params: SamplingParams, history, info) -> None:
    k = params.top_k
    if k <= 0:
        return
    if k < len(c.ids):
        c.sorted = False
        c.keep(np.argpartition(-c.logits, k - 1)[:k])  # O(n), then a sort of k
    c.sort()


def _top_p(c: _Cands, params: SamplingParams, history, info) -> None:
    """llama_sampler_top_p_apply: the smallest head of the sorted list with cumulative p >= top_p."""
    if params.top_p >= 1:
        return
    if not c.sorted and len(c.ids) > 1024:  # as llama.cpp: try the 256 best before sorting everything
        p = c.probs()
        head = np.argpartition(-c.logits, 255)[:256]
        head = head[np.argsort(-c.logits[head])]
        cum = np.cumsum(p[head])
        if cum[-1] >= params.top_p:
            c.keep(head[:int(np.searchsorted(cum, params.top_p)) + 1])
            c.sorted = True
            return
    c.sort()
    cum = np.cumsum(c.probs())
    c.keep(slice(0, min(int(np.searchsorted(cum, params.top_p)) + 1, len(cum))))


def _min_p(c: _Cands, params: SamplingParams, history, info) -> None:
    """llama_sampler_min_p_apply: keep p >= min_p * p_max, i.e. logit >= max + log(min_p)."""
    if params.min_p <= 0:
        return
    c.keep(np.flatnonzero(c.logits >= c.logits.max() + np.log(params.min_p)))


def _temperature(c: _Cands, params: SamplingParams, history, info) -> None:
    """llama_sampler_temp_impl: divide by temp; temp <= 0 keeps one candidate of highest logit (llama.cpp:
    the first in its current order; here: the smallest id, as np.argmax, whatever the order), and so
    does a temperature too small for the division to stay finite (greedy is the limit as temp -> 0)."""
    with np.errstate(over="ignore"):
        scaled = c.logits / params.temperature if params.temperature > 0 else None
    if scaled is None or not np.isfinite(scaled).all():  # a temperature so small (1e-310) that it overflows: its limit
        best = np.flatnonzero(c.logits == c.logits.max())
        c.keep([best[np.argmin(c.ids[best])]])
    else:
        c.logits = scaled


def _infill(c: _Cands, params: SamplingParams, history, info: TokenInfo | None) -> None:
    """llama_sampler_infill_apply, step by step (the logits are left as they are; only the
    candidate set changes, since the final draw recomputes a softmax from the logits):
    1. if 3 * p(EOG) * n > p(text), keep only the EOG tokens;
    2. when a token's piece is a prefix of another's, the less probable of the two is merged into
       the other (its p added, itself dropped); EOG tokens (empty pieces in llama.cpp) never merge;
    3. drop text tokens with p < 0.2; if no text token is left, return only the EOT token;
    4. renormalize and drop text tokens with p < 1 / (number of text tokens + 1)."""
    if info is None:
        return
    c.sort()
    p = c.probs()
    eog = np.fromiter((int(t) in info.eog for t in c.ids), dtype=bool, count=len(c.ids))
    if 3 * p[eog].sum() * len(p) > p[~eog].sum():
        c.keep(np.flatnonzero(eog))
        return
    pieces = ["" if e else info.piece(int(t)) for t, e in zip(c.ids, eog)]
    _merge_common_prefixes(pieces, p)
    keep = eog | (p >= 0.2)
    n_text = int((keep & ~eog).sum())
    if n_text == 0:
        eot = info.eot if info.eot is not None else min(info.eog, default=int(c.ids[0]))
        c.ids, c.logits = np.array([eot]), np.array([1.0])
        return
    p = np.where(keep, p, 0) / p[keep].sum()
    c.keep(np.flatnonzero(eog | (keep & (p >= 1 / (n_text + 1)))))


def _merge_common_prefixes(pieces: list[str], p: np.ndarray) -> None:
    """The double loop of llama.cpp (i0 over candidates by p, i1 over the others; an emptied i0
    stops its row), visiting only the i1 whose piece starts with piece[i0] (found by bisection in
    the sorted pieces). Updates p in place; merged-away tokens get p = 0."""
    order = sorted(range(len(pieces)), key=pieces.__getitem__)
    keys = [pieces[i] for i in order]
    dead = np.zeros(len(pieces), dtype=bool)
    for i0, s in enumerate(pieces):
        if not s or dead[i0]:
            continue
        j = bisect_left(keys, s)
        matches = []
        while j < len(keys) and keys[j].startswith(s):
            matches.append(order[j])
            j += 1
        for i1 in sorted(matches):
            if dead[i0]:
                break
            if i1 == i0 or dead[i1]:
                continue
            dst, src = (i1, i0) if p[i1] > p[i0] else (i0, i1)
            p[dst] += p[src]
            p[src], dead[src] = 0.0, True


def _neutral(c, params, history, info) -> None:
    """dry, xtc, typ_p, top_n_sigma: accepted, not implemented (only neutral parameters reach here)."""


SAMPLERS: dict[str, Callable] = {
    "penalties": _penalties, "dry": _neutral, "top_n_sigma": _neutral, "top_k": _top_k, "typ_p": _neutral,
    "top_p": _top_p, "min_p": _min_p, "xtc": _neutral, "temperature": _temperature, "infill": _infill,
}
assert set(SAMPLERS) == set(CANONICAL)


def candidates(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = (),
               info: TokenInfo | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The token ids left after params.samplers, in order, and their logits (as the samplers left
    them: penalized, divided by the temperature where it applies)."""
    logits = np.asarray(logits)
    c = _Cands(np.arange(len(logits)), logits.astype(np.float64))
    for name in params.samplers:
        SAMPLERS[name](c, params, history, info)
    return c.ids, c.logits


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           history: Sequence[int] = (), info: TokenInfo | None = None) -> int:
    """One token id from logits [V]: params.samplers applied in order, then a draw from the
    softmax of what is left (see the module docstring for the rules)."""
    ids, z = candidates(logits, params, history, info)
    z = np.where(np.isnan(z), -np.inf, z)
    if len(ids) == 1 or not np.isfinite(z.max()):  # penalties at the edge of the float range: their limit, greedy
        return int(ids[np.argmax(z)])
    p = np.exp(z - z.max())
    return int(ids[rng.choice(len(ids), p=p / p.sum())])
