"""runtime/evaluate.py:compare, the source of every accuracy figure (plt-eval, the docs, the
manifests), on hand-made backends whose answers are known exactly: scripted logits for the
teacher-forced windows (log-probabilities of powers of two, so perplexities are exact roots) and
scripted greedy continuations for the prompts. Every expected value is computed here, by hand,
not by the code under test. Then train/accuracy.py:accuracy_report, which runs compare on the
held-out windows, on the same backends."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from pltkit.runtime.evaluate import IGNORE, compare

H, Q, E = 1 / 2, 1 / 4, 1 / 8  # probabilities; each row below sums to 1

# Two windows of 4 tokens; the last position of window 0 and the last two of window 1 are padding.
INPUTS = np.array([[1, 2, 3, 0], [3, 1, 0, 0]], np.int64)
TARGETS = np.array([[2, 3, 0, IGNORE], [1, 0, IGNORE, IGNORE]], np.int64)
# Per position: the next-token distribution over a vocabulary of 4.
#                  kept A            kept B            kept C            padding
QUANTIZED = [[[E, E, H, Q], [H, E, E, Q], [H, Q, E, E], [E, E, Q, H]],
             #     kept D            kept E            padding           padding
             [[H, E, Q, E], [H, Q, E, E], [H, Q, E, E], [H, Q, E, E]]]
REFERENCE = [[[Q, E, H, E], [E, E, Q, H], [H, Q, E, E], [H, Q, E, E]],
             [[E, Q, H, E], [H, Q, E, E], [H, Q, E, E], [E, H, Q, E]]]
# By hand, at the 5 kept positions A..E:
#   quantized argmax 2 0 0 0 0, target probability 1/2 1/4 1/2 1/8 1/2  (product 2^-8)
#   reference argmax 2 3 0 2 0, target probability 1/2 1/2 1/2 1/4 1/2  (product 2^-6)
#   top-1 agreement at A, C, E: 3 of 5. (Padding disagrees at 2 of its 3 positions: counted, it
#   would read 4 of 8. The least likely tokens agree at C and E only: argmin would read 2 of 5.)
KEPT, AGREE = 5, 3
PPL_Q = 2 ** (8 / 5)  # exp(mean NLL) = exp(8 ln 2 / 5)
PPL_R = 2 ** (6 / 5)

# Greedy continuations (5 tokens) of four prompts. The quantized model's context is 6 positions,
# so it stops after 4 tokens of the 3-token prompt and 3 of the 4-token prompt (reference: 64).
PROMPTS = [[1, 2], [3], [2, 2, 2], [7, 7, 7, 7]]
Q_SCRIPT = {(1, 2): [5, 6, 7, 8, 9], (3,): [4, 4, 4, 4, 4], (2, 2, 2): [1, 2, 3, 4, 5], (7, 7, 7, 7): [1, 2, 3, 4, 5]}
R_SCRIPT = {(1, 2): [5, 6, 0, 8, 9], (3,): [4, 4, 4, 4, 4], (2, 2, 2): [2, 2, 3, 4, 5], (7, 7, 7, 7): [1, 2, 3, 4, 5]}
# first differing index: 2 (agreement after it does not count), 5 (all), 0, and 3 (the
# quantized one stopped after 3 equal tokens: the shorter length)
MATCHED = [2, 5, 0, 3]


class Scripted:
    """A backend that answers a window with its scripted logits (log p plus a large per-row
    offset, which a correct log-softmax ignores) and a prompt with its scripted greedy tokens
    (one-hot logits over a vocabulary of 10)."""

    def __init__(self, name, probs, script, max_pos, calls):
        self.name, self.script, self.calls = name, script, calls
        self.windows = {tuple(x): np.log(np.asarray(p)) + 700.0 + 10 * np.arange(len(p))[:, None]
                        for x, p in zip(INPUTS.tolist(), probs)}
        self.config = SimpleNamespace(max_position_embeddings=max_pos)

    def new_state(self, batch):
        assert batch == 1
        return SimpleNamespace(pos=0, history=())

    def _next(self, history):
        prompt = next(p for p in self.script if history[:len(p)] == p)
        tokens = self.script[prompt]
        i = len(history) - len(prompt)
        one_hot = np.full(10, -5.0)
        one_hot[tokens[i] if i < len(tokens) else 0] = 5.0
        return one_hot

    def prefill(self, ids, state, last=False):
        ids = np.asarray(ids)
        assert ids.ndim == 2 and ids.shape[0] == 1
        toks = tuple(int(t) for t in ids[0])
        self.calls.append((self.name, "prefill", toks))
        new = SimpleNamespace(pos=state.pos + len(toks), history=state.history + toks)
        if toks in self.windows:
            assert state.pos == 0, "a window must start from a fresh state"
            return self.windows[toks][None], new
        logits = np.zeros((1, len(toks), 10))
        logits[0, -1] = self._next(new.history)
        return logits, new

    def decode(self, ids, state):
        assert np.asarray(ids).shape == (1,)
        self.calls.append((self.name, "decode", int(ids[0])))
        new = SimpleNamespace(pos=state.pos + 1, history=state.history + (int(ids[0]),))
        return self._next(new.history)[None], new


def backends(calls=None):
    calls = [] if calls is None else calls
    return (Scripted("quantized", QUANTIZED, Q_SCRIPT, 6, calls), Scripted("reference", REFERENCE, R_SCRIPT, 64, calls))


def test_compare_reports_the_exact_figures():
    got = compare(*backends(), INPUTS, TARGETS, PROMPTS, greedy_tokens=5)
    print(got)
    want = {"tokens": KEPT,
            "perplexity": round(PPL_Q, 4),  # 3.0314
            "reference_perplexity": round(PPL_R, 4),  # 2.2974
            "perplexity_change": round(PPL_Q / PPL_R - 1, 5),  # 2^(2/5) - 1 = 0.31951
            "top1_agreement": round(AGREE / KEPT, 5),  # 0.6
            "greedy_match_mean": round(sum(MATCHED) / len(MATCHED), 2),  # 2.5
            "greedy_tokens": 5, "prompts": 4}
    assert got == want
    # the same figures written out, against a slip in the hand computation above
    assert (got["perplexity"], got["reference_perplexity"], got["perplexity_change"]) == (3.0314, 2.2974, 0.31951)
    assert (got["top1_agreement"], got["greedy_match_mean"]) == (0.6, 2.5)


def test_perplexity_is_exp_of_the_mean_nll_over_kept_tokens():
    """Independently of the powers of two: NLL summed with math.log over the kept positions only."""
    nll = {}
    for name, probs in (("q", QUANTIZED), ("r", REFERENCE)):
        terms = [-math.log(probs[n][t][TARGETS[n, t]]) for n in range(2) for t in range(4) if TARGETS[n, t] != IGNORE]
        assert len(terms) == KEPT
        nll[name] = sum(terms) / len(terms)
    got = compare(*backends(), INPUTS, TARGETS, PROMPTS, greedy_tokens=5)
    assert got["perplexity"] == pytest.approx(math.exp(nll["q"]), abs=5e-5)
    assert got["reference_perplexity"] == pytest.approx(math.exp(nll["r"]), abs=5e-5)


def test_identical_models_agree_fully():
    calls = []
    q = Scripted("quantized", REFERENCE, R_SCRIPT, 64, calls)
    r = Scripted("reference", REFERENCE, R_SCRIPT, 64, calls)
    got = compare(q, r, INPUTS, TARGETS, PROMPTS, greedy_tokens=5)
    assert got["top1_agreement"] == 1.0 and got["perplexity_change"] == 0.0
    assert got["perplexity"] == got["reference_perplexity"] == round(PPL_R, 4)
    assert got["greedy_match_mean"] == 5.0  # every prompt matched to the last of its 5 tokens


def test_a_window_without_padding_counts_all_its_tokens():
    inputs, targets = INPUTS[:1, :3], TARGETS[:1, :3]  # positions A, B, C
    q, r = backends()
    for b, probs in ((q, QUANTIZED), (r, REFERENCE)):
        b.windows = {(1, 2, 3): np.log(np.asarray(probs[0][:3]))}
    got = compare(q, r, inputs, targets, [], greedy_tokens=5)
    # quantized 1/2 1/4 1/2 (2^-4), reference 1/2 1/2 1/2 (2^-3); agreement at A and C
    assert got["tokens"] == 3 and got["top1_agreement"] == round(2 / 3, 5) == 0.66667
    assert got["perplexity"] == round(2 ** (4 / 3), 4) and got["reference_perplexity"] == 2.0
    assert got["greedy_match_mean"] is None and got["prompts"] == 0


def test_each_model_runs_all_its_windows_and_prompts_in_turn():
    calls = []
    compare(*backends(calls), INPUTS, TARGETS, PROMPTS, greedy_tokens=5)
    names = [c[0] for c in calls]
    first_ref = names.index("reference")
    assert set(names[:first_ref]) == {"quantized"} and set(names[first_ref:]) == {"reference"}
    for name in ("quantized", "reference"):
        prefills = [c[2] for c in calls if c[0] == name and c[1] == "prefill"]
        assert prefills == [tuple(x) for x in INPUTS.tolist()] + [tuple(p) for p in PROMPTS]


def test_no_kept_tokens_is_refused():
    with pytest.raises(ValueError, match="no tokens"):
        compare(*backends(), INPUTS, np.full_like(TARGETS, IGNORE), PROMPTS)


def test_accuracy_report_measures_the_model_on_windows_of_its_context(monkeypatch):
    """plt-eval's and plt-export's report: compare()'s figures on the held-out windows cut at the
    measured model's context (here 6, the reference's is 64), with the windows counted; the
    reference on one thread unless told, both opened with the caller's verify."""
    from pltkit.train import accuracy

    q, r = backends()
    opened, asked = [], []

    def open_backend(model, backend=None, threads=None, verify=True):
        opened.append((model, backend, threads, verify))
        return {"ref": r, "art": q}[model]

    def heldout_windows(tokenizer_dir, seq_len, windows):
        asked.append((tokenizer_dir, seq_len, windows))
        return INPUTS, TARGETS, PROMPTS, 40

    monkeypatch.setattr("pltkit.runtime.backends.open_backend", open_backend)
    monkeypatch.setattr("pltkit.model.paths.resolve_model_path", lambda m: f"{m}-folder")
    monkeypatch.setattr(accuracy, "heldout_windows", heldout_windows)
    got = accuracy.accuracy_report("art", "ref", windows=2, backend="ort", verify=False)
    assert opened == [("ref", None, 1, False), ("art", "ort", None, False)]
    assert asked == [("art-folder", 6, 2)]
    assert (got["windows"], got["windows_total"], got["seq_len"]) == (2, 40, 6)
    assert (got["tokens"], got["perplexity"], got["reference_perplexity"], got["top1_agreement"]) == \
        (KEPT, round(PPL_Q, 4), round(PPL_R, 4), 0.6)
    assert got["greedy_tokens"] == 32 and got["prompts"] == len(PROMPTS)

    opened.clear()
    accuracy.accuracy_report("art", "ref", threads=3)
    assert [o[2] for o in opened] == [3, 3]  # threads given: the reference runs on them too
