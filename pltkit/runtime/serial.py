"""The serial-loop baseline, a COST MODEL for benchmarks ("vanilla loop" in the PLT paper):
the L loops of each token run one after another, each loop with its own full-length KV cache,
no cross-loop parallelism and no shared cache.

It runs the same weights as the model under test, as a one-loop model (plt_num_loops = 1),
L times per token, each pass with its own state. That is what a serial loop costs in compute
and memory: L passes through the layer stack per token and L full caches. It does NOT compute
the PLT model's outputs (pass r does not consume pass r-1's hidden states); do not read its
logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SerialState:
    states: list

    @property
    def pos(self) -> int:
        return self.states[0].pos

    def clone(self) -> SerialState:
        return SerialState([s.clone() for s in self.states])

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states)

    def snapshot(self) -> list:
        return [s.snapshot() for s in self.states]

    def rewind(self, pos: int, snapshot: list) -> None:
        for s, snap in zip(self.states, snapshot):
            s.rewind(pos, snap)


class SerialLoops:
    """Wraps a one-loop backend: every call runs `loops` times, on `loops` separate states."""

    def __init__(self, one_loop_backend, loops: int):
        if one_loop_backend.config.plt_num_loops != 1:
            raise ValueError("SerialLoops runs a one-loop backend (plt_num_loops = 1) several times")
        self.inner, self.loops = one_loop_backend, loops
        self.config = one_loop_backend.config
        self.name = f"serial{loops}-{one_loop_backend.name}"

    def new_state(self, batch: int = 1) -> SerialState:
        return SerialState([self.inner.new_state(batch) for _ in range(self.loops)])

    def _run(self, call, ids: np.ndarray, state: SerialState):
        logits = None
        for i, s in enumerate(state.states):
            logits, state.states[i] = call(ids, s)
        return logits, state

    def prefill(self, ids: np.ndarray, state: SerialState, last: bool = False):
        return self._run(self.inner.prefill, ids, state)

    def decode(self, ids: np.ndarray, state: SerialState):
        return self._run(self.inner.decode, ids, state)
