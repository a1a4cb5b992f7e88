"""Prefix affinity: the replicas of a team server in the order a request should try them, so that
an editor's growing prompt goes back to the replica whose engine holds its prefix (a warm request
costs a small fraction of a cold one). Pure: the Ray request router (pltkit.serve.ray.router) asks it.

The policy, for a request whose prompt text is known:
1. The replica that last received the longest prefix of this text, in blocks of BLOCK characters,
   if that prefix is at least `min_match` of the text and that replica's load is within
   `imbalance` requests of the least-loaded replica's.
2. Else the text's home replica, picked by rendezvous hashing of its first HOME_CHARS characters:
   stable across processes and restarts, so a new editor's requests agree from the first one, and
   spread evenly over the replicas. Within `imbalance` as above.
3. Else the least-loaded replicas.
The other replicas follow, least loaded first, for when the preferred one refuses.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Hashable, Iterable, Mapping

from pltkit.serve.body import parse_json
from pltkit.serve.completions import PROTOCOLS

BLOCK = 64  # characters per block of the prefix index
HOME_CHARS = 256  # the start of a prompt that picks its home replica


def prompt_text(path: str, body: bytes) -> str | None:
    """The text a completion request's prompt starts with, as the model reads it (other files'
    chunks, then the file's prefix); None for other requests and for bad ones (the replica
    answers those with plt-serve's error)."""
    if path not in PROTOCOLS:
        return None
    try:
        call = PROTOCOLS[path].parse(parse_json(body))
    except Exception:
        return None
    if call.chat is not None:
        return "".join(str(m.get("content", "")) for m in call.chat["messages"])
    r = call.req
    return "".join(text for _, text in r.extra) + r.prefix + r.prompt


def block_keys(text: str) -> tuple[int, ...]:
    """One key per whole block of text, each standing for all of the text up to that block's end
    (Python's string hash: keys are compared only within the process that made them)."""
    keys, key = [], 0
    for end in range(BLOCK, len(text) + 1, BLOCK):
        key = hash((key, text[end - BLOCK:end]))
        keys.append(key)
    return tuple(keys)


@dataclass(frozen=True)
class PromptKey:
    """What routing needs of a prompt's text, a fraction of its size: made once per request."""

    start: str  # the first HOME_CHARS characters
    blocks: tuple[int, ...]  # block_keys(text)
    length: int

    @classmethod
    def of(cls, text: str) -> PromptKey:
        return cls(text[:HOME_CHARS], block_keys(text), len(text))


class PrefixIndex:
    """Which replica last received each prefix (block key -> replica), the least recently seen
    dropped beyond max_blocks (64 characters each: 200,000 blocks stand for 12.8 M characters of
    prompts, a few tens of MB)."""

    def __init__(self, max_blocks: int = 200_000):
        self.max_blocks = max_blocks
        self._owner: OrderedDict[int, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def match(self, prompt: PromptKey, live: Iterable[Hashable]) -> tuple[Hashable | None, int]:
        """The live replica holding the longest indexed prefix of the prompt, and its length."""
        live = set(live)
        best, length = None, 0
        for i, key in enumerate(prompt.blocks):
            owner = self._owner.get(key)
            if owner is None:
                break  # keys are chained: no longer prefix can be indexed
            if owner in live:
                best, length = owner, (i + 1) * BLOCK
        return best, length

    def record(self, prompt: PromptKey, replica: Hashable) -> None:
        for key in reversed(prompt.blocks):  # a prompt's first blocks are the last to go: match starts there
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_blocks:
            self._owner.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """Drops a replica's prefixes (it died: a new one starts cold)."""
        for key in [k for k, r in self._owner.items() if r == replica]:
            del self._owner[key]


def home(start: str, replicas: Iterable[Hashable]) -> Hashable:
    """Rendezvous hashing of a prompt's start: the same replica in every process, and only the
    prompts of a replica that goes away move."""
    data = start[:HOME_CHARS].encode("utf-8", "surrogatepass")
    return max(replicas, key=lambda r: hashlib.blake2b(data + b"\0" + str(r).encode(), digest_size=8).digest())


def ranked(prompt: PromptKey | None, replicas: list[Hashable], loads: Mapping[Hashable, int | None],
           index: PrefixIndex, imbalance: int = 2, min_match: float = 0.1) -> list[list[Hashable]]:
    """The replicas in ranks of preference (see the module docstring). loads: requests in flight
    per replica (None or absent: unknown, taken as 0)."""
    if not replicas:
        return []
    load = {r: loads.get(r) or 0 for r in replicas}
    least = min(load.values())
    by_load = sorted(replicas, key=lambda r: load[r])
    choice = None
    if prompt is not None and prompt.length:
        hit, length = index.match(prompt, replicas)
        if hit is not None and length >= min_match * prompt.length and load[hit] - least <= imbalance:
            choice = hit
        elif load[first := home(prompt.start, replicas)] - least <= imbalance:
            choice = first
    if choice is None:
        ranks = [[r for r in by_load if load[r] == least], [r for r in by_load if load[r] != least]]
    else:
        ranks = [[choice], [r for r in by_load if r != choice]]
    return [rank for rank in ranks if rank]
