"""Accuracy of a backend against a reference backend on the same token windows: per-token
perplexity of each, next-token top-1 agreement, and mean greedy-match length."""

from __future__ import annotations

import math

import numpy as np

from pltkit.runtime.generate import generate

IGNORE = -100


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(backend, reference, inputs: np.ndarray, targets: np.ndarray, prompts: list[list[int]],
            greedy_tokens: int = 32) -> dict:
    """inputs/targets [N, T] token windows (targets IGNORE where padded); prompts: token lists."""
    nll = {"quantized": 0.0, "reference": 0.0}
    agree = count = 0
    for x, t in zip(inputs, targets):
        logits = {name: b.prefill(x[None], b.new_state(1))[0][0]
                  for name, b in (("quantized", backend), ("reference", reference))}
        keep = t != IGNORE
        for name, lg in logits.items():
            nll[name] -= _log_softmax(lg[keep])[np.arange(keep.sum()), t[keep]].sum()
        agree += int((logits["quantized"][keep].argmax(-1) == logits["reference"][keep].argmax(-1)).sum())
        count += int(keep.sum())
    matched = []
    for p in prompts:
        a = list(generate(backend, p, greedy_tokens))
        b = list(generate(reference, p, greedy_tokens))
        matched.append(next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b))))
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    return {"tokens": count, "perplexity": round(ppl["quantized"], 4), "reference_perplexity": round(ppl["reference"], 4),
            "perplexity_change": round(ppl["quantized"] / ppl["reference"] - 1, 5),
            "top1_agreement": round(agree / count, 5),
            "greedy_match_mean": round(float(np.mean(matched)), 2), "greedy_tokens": greedy_tokens,
            "prompts": len(prompts)}
