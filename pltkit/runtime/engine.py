"""The completion engine: prompt layout, chunked prefill with prefix reuse, decode, stopping,
cancellation. Works with any backend of pltkit.runtime.backends.

Prefix reuse: each slot keeps the tokens in its state and a snapshot of the rings and
carries every `chunk` positions (the global cache is just truncated). A new prompt rewinds
to the last snapshot inside its common prefix with the slot and prefills only the rest, so
the CLP shift is seeded from the carries at that boundary, exactly as in a cold run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np

from pltkit.model.tokenizer import PLTTokenizer
from pltkit.runtime.completion import CompletionRequest, Prompt, RequestError, clip, layout_with_bos
from pltkit.runtime.sampling import TokenInfo, sample
from pltkit.runtime.stopping import Stopper, trim_suffix_repeat


class Cancel:
    """Set from any thread; the engine checks it before every prefill chunk and decode step."""

    def __init__(self):
        self._event = threading.Event()
        self.at: float | None = None  # time.perf_counter() of the first cancel()

    def cancel(self) -> None:
        if self.at is None:
            self.at = time.perf_counter()
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled (True) or timeout seconds pass (False)."""
        return self._event.wait(timeout)


@dataclass
class Result:
    text: str
    tokens: list[int]
    stop_type: str  # eos | word | limit | time | cancelled | none
    stopping_word: str = ""
    tokens_cached: int = 0
    tokens_evaluated: int = 0
    truncated: bool = False
    timings: dict = field(default_factory=dict)


@dataclass
class _Slot:
    ids: list[int] = field(default_factory=list)  # tokens whose K/V the state holds
    state: object = None
    snapshots: dict[int, dict] = field(default_factory=dict)  # position -> rings and carries

    def nbytes(self) -> int:
        if self.state is None:
            return 0
        return self.state.nbytes() + _nbytes(self.snapshots)


def _nbytes(x) -> int:
    """Bytes of the arrays (numpy or torch) in nested dicts, lists and tuples."""
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return int(x.nbytes)


class Engine:
    def __init__(self, backend, tokenizer: PLTTokenizer, chunk: int = 64, cache_bytes: int = 256 << 20,
                 max_slots: int = 64):
        """cache_bytes: memory for every state: the slots' (any hashable ids: a client's prefix
        cache) and those kept after their slot moved on to an unrelated prompt (an editor switching
        files and back). Past it states are dropped, the moved-on ones first, then other slots',
        least recently used first, but never the one a request runs on: memory stays within
        cache_bytes plus one context's state (two while a request's extra completions run on a
        copy). max_slots: slots holding a state; the least recently used one beyond it is kept as
        a moved-on state."""
        self.backend, self.tok, self.chunk, self.cache_bytes = backend, tokenizer, chunk, cache_bytes
        self.max_slots = max_slots
        self.slots: dict = {}  # slot id -> _Slot, least recently used first
        self.recent: list[_Slot] = []  # least recently used first
        self.context = backend.config.max_position_embeddings
        # a text this long is more tokens than the context holds (computed now: a pass over the vocabulary)
        self.context_chars = self.context * tokenizer.max_token_chars

    def state_bytes(self) -> int:
        """Memory held by the slots' and the recent prompts' states (global caches, rings, carries
        and the prefix snapshots)."""
        return sum(s.nbytes() for s in (*self.slots.values(), *self.recent))

    @staticmethod
    def _reusable(slot: _Slot, ids: list[int]) -> int:
        """Tokens of `ids` a slot can restore: its last snapshot inside the common prefix (at least
        one token is left to prefill, for the logits)."""
        common = 0
        for a, b in zip(slot.ids, ids[:-1]):
            if a != b:
                break
            common += 1
        return max((p for p in slot.snapshots if p <= common), default=0) if slot.state is not None else 0

    def _pick(self, slot_id, ids: list[int]) -> _Slot:
        """The slot's own state, or a recent one that shares more of the prompt (swapped in)."""
        slot = self.slots.pop(slot_id, None) or _Slot()
        best = max(self.recent, key=lambda s: self._reusable(s, ids), default=None)
        if best is not None and self._reusable(best, ids) > self._reusable(slot, ids):
            self.recent.remove(best)
            self._keep(slot)
            slot = best
        elif self._reusable(slot, ids) == 0:  # an unrelated prompt: keep the old state for later
            self._keep(slot)
            slot = _Slot()
        self.slots[slot_id] = slot
        while len(self.slots) > self.max_slots:
            self._keep(self.slots.pop(next(iter(self.slots))))
        self._trim(slot)
        return slot

    def _keep(self, slot: _Slot) -> None:
        if slot.state is not None and len(slot.ids) >= self.chunk:
            self.recent.append(slot)

    def _trim(self, active: _Slot) -> None:
        """Drop states, least recently used first (moved-on ones, then other slots'), until all of
        them fit in cache_bytes; `active` stays."""
        sizes = {id(s): s.nbytes() for s in (*self.slots.values(), *self.recent)}
        total = sum(sizes.values())
        while total > self.cache_bytes and self.recent:
            total -= sizes[id(self.recent.pop(0))]
        for key in [k for k, s in self.slots.items() if s is not active]:
            if total <= self.cache_bytes:
                break
            total -= sizes[id(self.slots.pop(key))]

    def _restore(self, slot: _Slot, ids: list[int]) -> int:
        """Rewind the slot to the longest snapshotted prefix of `ids`; returns the reused tokens."""
        at = self._reusable(slot, ids)
        if at == 0:
            slot.state, slot.ids, slot.snapshots = self.backend.new_state(1), [], {}
            return 0
        slot.state.rewind(at, slot.snapshots[at])
        slot.ids = slot.ids[:at]
        slot.snapshots = {p: s for p, s in slot.snapshots.items() if p <= at}
        return at

    def _feed(self, slot: _Slot, ids: list[int], cancel: Cancel | None, marks: tuple[int, ...] = ()):
        """Prefill ids in chunks ending on multiples of `chunk` and on the positions `marks`, with a
        snapshot at each; returns the last logits, or "cancelled" if it was cancelled first."""
        logits, pos = None, len(slot.ids)
        while ids:
            if cancel is not None and cancel.cancelled:
                return "cancelled"
            end = min((m for m in marks if m > pos), default=len(slot.ids) + len(ids))
            n = min(len(ids), self.chunk - pos % self.chunk, end - pos)
            out, slot.state = self.backend.prefill(np.asarray([ids[:n]], np.int64), slot.state, last=True)
            slot.ids += ids[:n]
            ids, pos, logits = ids[n:], pos + n, out[0, -1]
            if pos % self.chunk == 0 or pos in marks:
                slot.snapshots[pos] = slot.state.snapshot()
        return logits

    def complete(self, req: CompletionRequest, slot_id: Hashable = 0, cancel: Cancel | None = None,
                 on_text: Callable[[str, Result], None] | None = None) -> Result:
        """The first completion of a request (streamed through on_text)."""
        return self.complete_all(req, slot_id, cancel, on_text)[0]

    def complete_all(self, req: CompletionRequest, slot_id: Hashable = 0, cancel: Cancel | None = None,
                     on_text: Callable[[str, Result], None] | None = None) -> list[Result]:
        """All req.n_cmpl completions of a request."""
        t0 = time.perf_counter()
        prompt = self.prompt(req)
        return self.run_all(prompt.ids, req, slot_id, cancel, on_text, prompt.truncated, t0, prompt.marks)

    def prompt(self, req: CompletionRequest, ids: list[int] | None = None) -> Prompt:
        """The request's prompt laid out within the context (or `ids`, a prompt given as token
        ids), checked: not empty, token ids in the vocabulary, and a plain prompt shorter than the
        context (an infill's prefix is cut to fit instead). RequestError otherwise. Texts are cut
        to what the context can use before they are tokenized (`clip`)."""
        cut = False
        if ids is None:
            n_predict = req.n_predict if req.n_predict >= 0 else self.context
            req, cut = clip(req, self.context_chars)
            prompt = layout_with_bos(self.tok, req, self.context - max(1, min(n_predict, self.context // 4)))
            given = prompt.parts.get("given", len(prompt.ids))
        else:
            vocab = self.tok.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"prompt token ids must be in [0, {vocab})")
            prompt, given = Prompt(list(ids)), len(ids)
        if not prompt.ids:
            raise RequestError("the prompt is empty")
        if given >= self.context:
            raise RequestError(f"prompt of {'at least ' * cut}{given} tokens exceeds the context of "
                               f"{self.context} tokens")
        return prompt

    def run(self, ids: list[int], req: CompletionRequest, slot_id: Hashable = 0, cancel: Cancel | None = None,
            on_text: Callable[[str, Result], None] | None = None) -> Result:
        """Complete the token ids `ids` (a laid-out prompt) on a slot: the first of req.n_cmpl."""
        return self.run_all(ids, req, slot_id, cancel, on_text)[0]

    def run_all(self, ids: list[int], req: CompletionRequest, slot_id: Hashable = 0, cancel: Cancel | None = None,
                on_text: Callable[[str, Result], None] | None = None, truncated: bool = False,
                t0: float | None = None, marks: tuple[int, ...] = ()) -> list[Result]:
        """req.n_cmpl completions of one prefilled prompt (seeds seed, seed+1, ...). The others run
        on copies of the state; the first runs last on the slot, which keeps it, and is streamed:
        on_text(piece, result) gets each new piece of its text and the result so far (its tokens,
        tokens_evaluated), on this thread."""
        t0 = t0 or time.perf_counter()
        slot = self._pick(slot_id, ids)
        cached = self._restore(slot, ids)
        # req.t_max_prompt_ms is accepted and ignored, as llama.cpp does: editors send 500 by default,
        # and cutting the prompt short would answer a cold prompt with nothing
        logits = self._feed(slot, ids[cached:], cancel, marks)
        t1 = time.perf_counter()
        evaluated = len(slot.ids) - cached
        if isinstance(logits, str):  # stopped before the prompt was in
            self._trim(slot)
            return [self._finish(Result("", [], logits), req, cached, evaluated, truncated, t0, t1)]
        results = []
        for i in reversed(range(req.n_cmpl)):
            on_slot = i == 0
            target = slot if on_slot else _Slot(list(slot.ids), slot.state.clone(), {})
            r = Result("", [], "none", tokens_cached=cached, tokens_evaluated=evaluated)
            if req.n_predict != 0:
                seed = None if req.seed is None else req.seed + i
                self._generate(req, target, logits, cancel, on_text if on_slot else None, r, time.perf_counter(),
                               seed)
            results.append(self._finish(r, req, cached, evaluated, truncated, t0, t1))
        self._trim(slot)  # the slot grew by the prompt and the completion
        return results[::-1]

    @staticmethod
    def _finish(r: Result, req, cached, evaluated, truncated, t0, t1) -> Result:
        t2 = time.perf_counter()
        if r.tokens:
            r.text = trim_suffix_repeat(r.text, req.suffix)
        n = len(r.tokens)
        r.tokens_cached, r.tokens_evaluated, r.truncated = cached, evaluated, truncated
        prompt_ms, predicted_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        r.timings = {"cache_n": cached, "prompt_n": evaluated, "prompt_ms": round(prompt_ms, 3),
                     "prompt_per_token_ms": round(prompt_ms / evaluated, 3) if evaluated else None,
                     "predicted_n": n, "predicted_ms": round(predicted_ms, 3),
                     "predicted_per_token_ms": round(predicted_ms / n, 3) if n else None,
                     "predicted_per_second": round(n / (t2 - t1), 2) if n and t2 > t1 else None}
        return r

    def _generate(self, req, slot, logits, cancel, on_text, result, t_start, seed):
        params = req.sampling()
        rng = np.random.default_rng(seed)
        end = self.tok.eog_ids | set(req.end_ids)
        info = TokenInfo(frozenset(end), self.tok.id_to_token)
        stopper = Stopper(req, end, prefix_only=req.suffix is not None and self.tok.fim is None)
        shown = 0
        while True:
            if cancel is not None and cancel.cancelled:
                result.stop_type, result.text = "cancelled", self._text(result.tokens)
                break
            token = sample(logits, params, rng, slot.ids, info)
            if token not in end:
                result.tokens.append(token)
            text = self._text(result.tokens)
            safe = stopper.feed(token, text)
            if not stopper.stop_type and req.t_max_predict_ms and "\n" in text and \
                    (time.perf_counter() - t_start) * 1e3 > req.t_max_predict_ms:  # as llama.cpp: after a newline
                safe = stopper.time_out(text)
            if not stopper.stop_type and len(slot.ids) + 1 >= self.context:
                safe = stopper.context_full(text)
            if on_text is not None and safe > shown and not text[:safe].endswith("\ufffd"):
                on_text(text[shown:safe], result)
                shown = safe
            if stopper.stop_type:
                result.text, result.stop_type, result.stopping_word = (stopper.text_final, stopper.stop_type,
                                                                       stopper.stopping_word)
                break
            out, slot.state = self.backend.decode(np.asarray([token], np.int64), slot.state)
            slot.ids.append(token)
            if len(slot.ids) % self.chunk == 0:
                slot.snapshots[len(slot.ids)] = slot.state.snapshot()
            logits = out[0]

    def _text(self, tokens: list[int]) -> str:
        """The text of generated tokens: control tokens render as nothing, as in llama.cpp (a model's
        <|im_start|> or <|fim_suffix|> never reaches the user's buffer as text)."""
        return self.tok.decode_continuation(tokens, skip_special_tokens=True)
