"""Generation as a Python generator over token ids."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pltkit.runtime.sampling import SamplingParams, sample


def generate(backend, prompt: list[int], max_new: int, params: SamplingParams = SamplingParams(),
             seed: int | None = None, stop_ids=()) -> Iterator[int]:
    """Prefill the prompt, then yield sampled ids one by one (CLP decode steps) until a stop
    id (not yielded), max_new tokens, or the model's context is full."""
    if not prompt:
        raise ValueError("the prompt is empty")
    rng = np.random.default_rng(seed)
    logits, state = backend.prefill(np.asarray([prompt], np.int64), backend.new_state(1), last=True)
    logits = logits[0, -1]
    limit = backend.config.max_position_embeddings
    for _ in range(max_new):
        token = sample(logits, params, rng)
        if token in stop_ids:
            return
        yield token
        if state.pos >= limit:
            return
        step, state = backend.decode(np.asarray([token], np.int64), state)
        logits = step[0]
