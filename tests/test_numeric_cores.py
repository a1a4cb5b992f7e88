"""Known-answer tests of the numeric cores that scripts/mutate.py breaks one at a time: the quant
accuracy comparison, the sampler chain and its final draw, and the stop logic. Every expected value
is worked out by hand (or by a plain loop written here), not by the code under test."""

import math
from types import SimpleNamespace

import numpy as np

from pltkit.runtime.completion import CompletionRequest
from pltkit.runtime.evaluate import IGNORE, compare
from pltkit.runtime.sampling import SamplingParams, TokenInfo, candidates, sample
from pltkit.runtime.stopping import Stopper, _held_back, trim_suffix_repeat


# --- compare: a bigram "model" whose next-token logits depend on the last token only ---------
def bigram(wrong_row: bool) -> np.ndarray:
    """Row t: logit 2 at (t + 1) % 4, 0 elsewhere; the quantized one's row 2 prefers 0 (2) over 3 (1)."""
    table = np.zeros((4, 4))
    table[np.arange(4), (np.arange(4) + 1) % 4] = 2.0
    if wrong_row:
        table[2] = [2.0, 0.0, 0.0, 1.0]
    return table


class Bigram:
    def __init__(self, table, max_pos):
        self.table, self.config = table, SimpleNamespace(max_position_embeddings=max_pos)

    def new_state(self, batch):
        return SimpleNamespace(pos=0)

    def prefill(self, ids, state, last=False):
        state.pos += ids.shape[1]
        return self.table[ids], state

    def decode(self, ids, state):
        state.pos += 1
        return self.table[ids], state


def test_compare_on_a_hand_made_bigram_model():
    inputs = np.array([[0, 1, 2, 3], [2, 3, 0, 1]])
    targets = np.array([[1, 2, 3, IGNORE], [3, 0, 1, IGNORE]])
    quantized, reference = Bigram(bigram(True), max_pos=3), Bigram(bigram(False), max_pos=64)
    got = compare(quantized, reference, inputs, targets, prompts=[[3], [1]], greedy_tokens=5)
    # 6 kept positions; inputs 0 1 2 | 2 3 0: the argmaxes differ only where the input is 2 -> 4 of 6
    assert got["tokens"] == 6 and got["top1_agreement"] == round(4 / 6, 5)
    # NLL by hand: the reference gives every target logit 2 against three 0s
    nll_ref = 6 * -math.log(math.e ** 2 / (math.e ** 2 + 3))
    # the quantized model: 4 such positions, and at both inputs 2 (target 3) logit 1 against 2, 0, 0
    nll_q = 4 * -math.log(math.e ** 2 / (math.e ** 2 + 3)) + 2 * -math.log(math.e / (math.e ** 2 + math.e + 2))
    assert got["reference_perplexity"] == round(math.exp(nll_ref / 6), 4)
    assert got["perplexity"] == round(math.exp(nll_q / 6), 4)
    # greedy from [3]: quantized 0 1 2 (its context of 3 is full), reference 0 1 2 3 0: 3 equal, the
    # shorter length; from [1]: quantized 2 0 ..., reference 2 3 ...: 1 equal. Mean 2.
    assert got["greedy_match_mean"] == 2.0


# --- the sampler chain ------------------------------------------------------------------
def kept(params, logits, history=(), info=None):
    ids, z = candidates(np.asarray(logits, float), params, history, info)
    return dict(zip(ids.tolist(), z.tolist()))


def test_min_p_keeps_a_token_at_exactly_min_p_times_p_max():
    logits = np.log([1.0, 0.5, 0.25])  # p1 / p0 = 0.5 exactly
    assert set(kept(SamplingParams(min_p=0.5, samplers=("min_p",)), logits)) == {0, 1}


def test_top_k_and_top_p_keep_the_most_probable():
    assert set(kept(SamplingParams(top_k=2, samplers=("top_k",)), [0.0, 3.0, 1.0, 2.0])) == {1, 3}
    # cumulative 0.5, 0.8, 1.0: the smallest head reaching 0.6 is two tokens
    assert set(kept(SamplingParams(top_p=0.6, samplers=("top_p",)), np.log([0.5, 0.3, 0.2]))) == {0, 1}


def test_temperature_divides_the_logits():
    assert kept(SamplingParams(temperature=0.5, samplers=("temperature",)), [1.0, 2.0]) == {0: 2.0, 1: 4.0}


def test_penalty_arithmetic_by_hand():
    p = SamplingParams(repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, samplers=("penalties",))
    # token 0 (logit 3, seen 3 times): 3 / 2 - 3 * 0.5 - 0.25; token 1 (-2, once): -2 * 2 - 0.5 - 0.25
    assert kept(p, [3.0, -2.0, 1.0], history=[0, 1, 0, 0]) == {0: -0.25, 1: -4.75, 2: 1.0}


def test_infill_keeps_only_eog_when_three_n_times_its_mass_beats_the_text():
    info = TokenInfo(frozenset({3}), lambda i: "abc"[i])
    # p(EOG) = 0.1: 3 * 0.1 * 4 = 1.2 > 0.9 (but 3 * 0.1 alone would not be)
    assert set(kept(SamplingParams(samplers=("infill",)), np.log([0.3, 0.3, 0.3, 0.1]), info=info)) == {3}


def test_the_final_draw_returns_token_ids_not_positions():
    p = SamplingParams(temperature=1.0, top_k=2, samplers=("top_k", "temperature"))
    logits = [0.0, 0.0, 0.0, 5.0, 5.0]
    draws = {sample(np.array(logits), p, np.random.default_rng(s)) for s in range(40)}
    assert draws == {3, 4}


# --- stop logic --------------------------------------------------------------------------
def test_stopper_stops_after_exactly_n_predict_tokens():
    stopper = Stopper(CompletionRequest(n_predict=2), end_ids=())
    stopper.feed(5, "a")
    assert stopper.stop_type is None
    stopper.feed(6, "ab")
    assert stopper.stop_type == "limit" and stopper.text_final == "ab"


def test_stop_string_split_across_feeds_is_found_and_held_back():
    stopper = Stopper(CompletionRequest(stop=("END",), n_predict=-1), end_ids=())
    assert stopper.feed(1, "abc E") == 4  # "E" may begin "END": held back
    assert stopper.feed(2, "abc EN") == 4
    stopper.feed(3, "abc END")
    assert stopper.stop_type == "word" and stopper.text_final == "abc " and stopper.stopping_word == "END"


def test_held_back_is_the_longest_proper_prefix_ending_the_text():
    assert _held_back("abc EN", ["END"]) == 2
    assert _held_back("abc E", ["END"]) == 1
    assert _held_back("abc", ["END"]) == 0


def test_trim_suffix_repeat_drops_a_one_character_repeat():
    assert trim_suffix_repeat("x = a", "a + b") == "x = "
    assert trim_suffix_repeat("f(x)", ")\n") == "f(x"


# --- the reference model's rewind to a snapshot -------------------------------------------
def test_rewind_to_a_snapshot_continues_like_the_full_forward():
    import torch

    from pltkit import PLTConfig, PLTForCausalLM
    cfg = PLTConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=64,
                    eos_token_id=[2], plt_num_loops=2, plt_window_size=[3, 0], plt_gate_use_hidden_states=True,
                    plt_emb_scale=0.707, plt_hidden_scale=0.5)
    torch.manual_seed(0)
    model = PLTForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        ids = torch.randint(0, 61, (1, 10), generator=torch.Generator().manual_seed(1))
        full = model(ids)
        _, state = model.prefill(ids[:, :5])
        snap = state.snapshot()
        model.prefill(ids[:, 5:8], state)  # go on past the snapshot, then back to it
        state.rewind(5, snap)
        assert state.pos == 5 and all(c.k.shape[2] == c.v.shape[2] == 5 for c in state.layers)
        logits, _ = model.prefill(ids[:, 5:], state)
    assert (full[:, 5:] - logits).abs().max().item() < 1e-5
