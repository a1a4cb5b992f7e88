"""Sampling as a pure function of the logits and an explicit numpy Generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from logits [V]: greedy at temperature 0, else top-k, then top-p (nucleus)."""
    logits = np.asarray(logits, dtype=np.float64)
    if params.temperature == 0:
        return int(np.argmax(logits))
    order = np.argsort(-logits, kind="stable")
    if params.top_k:
        order = order[:params.top_k]
    z = logits[order] / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)
        p = p[:keep] / p[:keep].sum()
        order = order[:keep]
    return int(order[rng.choice(len(p), p=p)])
