"""Accuracy of a backend against a reference backend on the same token windows: per-token
perplexity of each, next-token top-1 agreement, and mean greedy-match length."""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from pltkit.runtime.generate import generate

IGNORE = -100


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(backend, reference, inputs: np.ndarray, targets: np.ndarray, prompts: list[list[int]],
            greedy_tokens: int = 32) -> dict:
    """inputs/targets [N, T] token windows (targets IGNORE where padded); prompts: token lists.
    Each model runs all its windows and prompts in turn rather than alternating with the other, so
    that neither starts while the other's threads still spin (ONNX Runtime's do after each run)."""
    keep = targets != IGNORE
    count = int(keep.sum())
    if count == 0:
        raise ValueError("no tokens to evaluate")
    nll, top1, greedy = {}, {}, {}
    with tqdm(total=2 * (len(inputs) + len(prompts)), desc="accuracy", unit="run", disable=None) as bar:
        for name, b in (("quantized", backend), ("reference", reference)):
            nll[name], top1[name], greedy[name] = 0.0, [], []
            for x, t, k in zip(inputs, targets, keep):
                lp = _log_softmax(b.prefill(x[None], b.new_state(1))[0][0][k])
                nll[name] -= lp[np.arange(len(lp)), t[k]].sum()
                top1[name].append(lp.argmax(-1))
                bar.update()
            for p in prompts:
                greedy[name].append(list(generate(b, p, greedy_tokens)))
                bar.update()
    agree = int(sum((a == r).sum() for a, r in zip(top1["quantized"], top1["reference"])))
    matched = [next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
               for a, b in zip(greedy["quantized"], greedy["reference"])]
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    return {"tokens": count, "perplexity": round(ppl["quantized"], 4), "reference_perplexity": round(ppl["reference"], 4),
            "perplexity_change": round(ppl["quantized"] / ppl["reference"] - 1, 5),
            "top1_agreement": round(agree / count, 5),
            "greedy_match_mean": round(float(np.mean(matched)), 2) if matched else None,
            "greedy_tokens": greedy_tokens, "prompts": len(prompts)}
