import time

import numpy as np
import pytest

from pltkit.runtime.sampling import DEFAULT_SAMPLERS, SamplingParams, TokenInfo, candidates, sample, sampler_names

LOGITS = np.log(np.array([0.05, 0.5, 0.2, 0.15, 0.1]))


def draws(params, seed=0, n=2000, logits=LOGITS, history=(), info=None):
    rng = np.random.default_rng(seed)
    return [sample(logits, params, rng, history, info) for _ in range(n)]


def support(params, logits=LOGITS, history=(), info=None):
    return set(candidates(logits, params, history, info)[0].tolist())


def test_temperature_zero_is_greedy():
    assert set(draws(SamplingParams(temperature=0), n=20)) == {1}


def test_a_temperature_too_small_to_divide_by_is_greedy():
    # 1e-310 is a subnormal: logits / temperature overflow to inf, and the softmax to NaN
    for t in (1e-310, 5e-324, 1e-300):
        assert set(draws(SamplingParams(temperature=t), n=20)) == {1}, t


@pytest.mark.parametrize("kw, winner", [
    (dict(repeat_penalty=1e-308, samplers=("penalties", "top_k")), 0),  # 5 / 1e-308 and 3 / 1e-308: inf
    (dict(frequency_penalty=-1e308, samplers=("penalties",)), 1),  # 1 + 2 * 1e308: inf
    (dict(frequency_penalty=-1e308, presence_penalty=-1e308, samplers=("penalties", "min_p")), 0)])
def test_penalties_at_the_edge_of_the_float_range_sample_their_limit(kw, winner):
    # an infinite logit made inf - inf = NaN in the softmax (a 500); the limit is the argmax
    logits = np.array([5.0, 1.0, 3.0, -1.0, 2.0])
    assert set(draws(SamplingParams(repeat_last_n=-1, **kw), n=20, logits=logits, history=[0, 1, 1])) == {winner}


def test_greedy_is_exactly_argmax_with_neutral_penalties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=1000).astype(np.float32)
        logits[rng.integers(1000)] = logits.max()  # a tie: the first maximum wins, as np.argmax
        history = rng.integers(0, 1000, size=100).tolist()
        for p in (SamplingParams(), SamplingParams(top_k=40, top_p=0.95, min_p=0.05)):
            assert sample(logits, p, rng, history) == int(np.argmax(logits))


def test_top_k_and_top_p_restrict_the_support():
    assert set(draws(SamplingParams(temperature=1, top_k=2))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1, top_p=0.75))) == {1, 2, 3}  # 0.5 + 0.2 < 0.75 <= + 0.15


def test_min_p_removes_tokens_below_min_p_times_p_max():
    # p_max = 0.5: min_p 0.25 keeps p >= 0.125, min_p 0.35 keeps p >= 0.175
    assert set(draws(SamplingParams(temperature=1, min_p=0.25))) == {1, 2, 3}
    assert set(draws(SamplingParams(temperature=1, min_p=0.35))) == {1, 2}
    assert support(SamplingParams(temperature=1, min_p=0.0)) == {0, 1, 2, 3, 4}


def test_sampler_order_matters():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    k_then_p = SamplingParams(temperature=1, top_k=3, top_p=0.75, samplers=("top_k", "top_p", "temperature"))
    p_then_k = SamplingParams(temperature=1, top_k=3, top_p=0.75, samplers=("top_p", "top_k", "temperature"))
    # top_k first renormalizes to 0.44, 0.33, 0.22: 0.78 >= 0.75 after two tokens; top_p first needs three
    assert support(k_then_p, logits) == {0, 1}
    assert support(p_then_k, logits) == {0, 1, 2}
    # temperature before min_p flattens the distribution, so min_p keeps more
    hot_first = SamplingParams(temperature=4, min_p=0.8, samplers=("temperature", "min_p"))
    hot_last = SamplingParams(temperature=4, min_p=0.8, samplers=("min_p", "temperature"))
    assert support(hot_first, logits) == {0, 1, 2}  # (p / 0.4) ** (1/4) >= 0.8
    assert support(hot_last, logits) == {0}  # p / 0.4 >= 0.8


def test_penalty_arithmetic_is_llama_cpp_s():
    logits = np.array([2.0, -1.0, 0.5, 1.5])
    p = SamplingParams(temperature=1, repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                       samplers=("penalties",))
    ids, z = candidates(logits, p, history=[0, 1, 0])
    assert ids.tolist() == [0, 1, 2, 3]
    # token 0: count 2, positive: 2 / 2 - (2 * 0.5 + 0.25); token 1: count 1, negative: -1 * 2 - (0.5 + 0.25)
    np.testing.assert_allclose(z, [-0.25, -2.75, 0.5, 1.5])
    assert logits.tolist() == [2.0, -1.0, 0.5, 1.5]  # the input is not mutated


@pytest.mark.parametrize("kw, history, winner", [
    (dict(), [0], 0),
    (dict(repeat_penalty=1.1), [0], 1),  # 2.0 / 1.1 < 1.9
    (dict(presence_penalty=0.2), [0], 1),  # 1.8 < 1.9
    (dict(frequency_penalty=0.06), [0], 0),  # one occurrence: 1.94 > 1.9
    (dict(frequency_penalty=0.06), [0, 0], 1),  # two: 1.88 < 1.9
    (dict(repeat_penalty=1.1), [0, 1], 0),  # both penalized: 1.818 > 1.727
])
def test_penalties_change_the_greedy_choice(kw, history, winner):
    logits = np.array([2.0, 1.9, -1.0])
    assert sample(logits, SamplingParams(**kw), np.random.default_rng(0), history) == winner


def test_repeat_last_n_limits_the_window():
    logits = np.array([2.0, 1.9, -1.0, -1.0, -1.0, -1.0])
    history = [0, 5, 5, 5]
    pick = lambda n: sample(logits, SamplingParams(repeat_penalty=1.5, repeat_last_n=n), None, history)  # noqa: E731
    assert pick(3) == 0  # token 0 is out of the last 3
    assert pick(4) == 1
    assert pick(-1) == 1  # all of the history
    assert pick(0) == 0  # no penalty at all
    assert pick(64) == 1


def test_no_temperature_in_the_list_samples_at_temperature_one():
    # llama.cpp: temperature applies only where "temperature" stands; llama.vim sends no temperature
    p = SamplingParams(temperature=0, top_k=3, samplers=("top_k", "top_p"))
    got = draws(p)
    assert set(got) == {1, 2, 3}
    assert len(set(draws(SamplingParams(temperature=0, samplers=())))) == 5
    # and a temperature <= 0 in the list keeps only the argmax, even before other samplers
    assert support(SamplingParams(temperature=0, samplers=("temperature", "top_k"))) == {1}


def vocab(pieces, eog=(), eot=None):
    return TokenInfo(frozenset(eog), lambda i: pieces[i], eot)


def test_infill_returns_eog_when_its_mass_is_high():
    pieces = ["a", "b", "c", "<eot>", "<eos>"]
    logits = np.log(np.array([0.25, 0.25, 0.25, 0.125, 0.125]))  # 3 * 0.25 * 5 > 0.75
    info = vocab(pieces, eog={3, 4})
    p = SamplingParams(temperature=1, samplers=("infill", "temperature"))
    assert set(draws(p, logits=logits, info=info, n=200)) == {3, 4}
    # the same distribution without the infill sampler draws text too
    assert set(draws(SamplingParams(temperature=1), logits=logits, n=200)) == {0, 1, 2, 3, 4}


def test_infill_second_threshold_drops_text_below_one_over_n_plus_one():
    pieces = ["a", "b", "c", "d", "<eot>"]
    logits = np.log(np.array([0.5, 0.25, 0.21, 0.0399, 0.0001]))
    # 0.2 keeps a, b, c (3 text tokens); renormalized c = 0.21 / 0.9601 < 1 / 4
    assert support(SamplingParams(samplers=("infill",)), logits, info=vocab(pieces, eog={4})) == {0, 1, 4}


def test_infill_merges_tokens_whose_piece_is_a_prefix():
    pieces = ["de", "def", "define", "x", "y", "<eot>"]
    logits = np.log(np.array([0.3, 0.25, 0.19, 0.15, 0.1099, 0.0001]))
    p = SamplingParams(temperature=1, samplers=("infill",))
    # "de" absorbs "def" and "define" (0.74): they and the tokens below 0.2 are dropped; EOG stays
    assert support(p, logits, info=vocab(pieces, eog={5})) == {0, 5}
    got = draws(p, logits=logits, info=vocab(pieces, eog={5}))
    assert set(got) <= {0, 5} and 0 in got
    # without common prefixes, "b" (0.25) survives both thresholds (0.2, then 1/3 of 0.55)
    assert support(p, logits, info=vocab(["a", "b", "c", "x", "y", "<eot>"], eog={5})) == {0, 1, 5}
    # merging goes into the more probable token, here the longer one
    logits2 = np.log(np.array([0.1, 0.45, 0.19, 0.15, 0.1099, 0.0001]))
    assert support(p, logits2, info=vocab(pieces, eog={5})) == {1, 5}


def test_infill_falls_back_to_eot_when_no_text_token_is_left():
    pieces = ["a", "b", "c", "d", "e", "f", "<eot>", "<eos>"]
    logits = np.log(np.array([0.166] * 6 + [0.002, 0.002]))  # every text token < 0.2, EOG mass low
    p = SamplingParams(temperature=1, samplers=("infill", "temperature"))
    assert set(draws(p, logits=logits, info=vocab(pieces, eog={6, 7}), n=50)) == {6}  # the smallest EOG id
    assert set(draws(p, logits=logits, info=vocab(pieces, eog={6, 7}, eot=7), n=50)) == {7}
    # with info=None the infill step does nothing
    assert len(set(draws(p, logits=logits, n=500))) > 4


def test_infill_never_returns_a_dropped_token():
    rng = np.random.default_rng(1)
    pieces = [f"t{i}" for i in range(60)] + ["<eot>"]
    info = vocab(pieces, eog={60})
    p = SamplingParams(temperature=0.8, top_k=20, top_p=0.99, samplers=("top_k", "top_p", "infill", "temperature"))
    for _ in range(50):
        logits = rng.normal(scale=2.0, size=61)
        kept = support(p, logits, info=info)
        for token in draws(p, seed=int(rng.integers(1 << 30)), n=20, logits=logits, info=info):
            assert token in kept


def test_sampling_follows_the_distribution_and_is_reproducible():
    got = draws(SamplingParams(temperature=1), seed=3)
    freq = np.bincount(got, minlength=5) / len(got)
    print("frequencies", np.round(freq, 3))
    assert np.abs(freq - np.exp(LOGITS)).max() < 0.04
    assert got == draws(SamplingParams(temperature=1), seed=3) != draws(SamplingParams(temperature=1), seed=4)
    llama = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1)
    logits = np.random.default_rng(0).normal(size=5000)
    assert draws(llama, 7, 100, logits, [1, 2, 3]) == draws(llama, 7, 100, logits, [1, 2, 3])


def test_large_vocabulary_supports_match_a_full_sort():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=20000)
    order = np.argsort(-logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    cum = np.cumsum(probs[order])
    assert support(SamplingParams(temperature=1, top_k=40), logits) == set(order[:40].tolist())
    for top_p in (0.5, 0.9999):  # the first fits in the 256 best, the second needs the full sort
        want = set(order[:np.searchsorted(cum, top_p) + 1].tolist())
        assert support(SamplingParams(temperature=1, top_p=top_p), logits) == want


def test_sampler_names():
    assert sampler_names(["top-k", "nucleus", "typical", "temp", "min-p", "infill"]) == (
        "top_k", "top_p", "typ_p", "temperature", "min_p", "infill")
    assert SamplingParams(samplers=["top-p", "temp"]).samplers == ("top_p", "temperature")
    assert DEFAULT_SAMPLERS == ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                                "temperature")
    with pytest.raises(ValueError, match="bogus.*greedy"):
        sampler_names(["top_k", "bogus", "greedy"])
    with pytest.raises(ValueError, match="'warmth'"):
        SamplingParams(samplers=("top_k", "warmth"))
    # accepted but neutral
    p = SamplingParams(temperature=1, samplers=("dry", "xtc", "typ_p", "top_n_sigma"))
    assert support(p) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("kw, word", [
    (dict(temperature=-1), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
    (dict(repeat_penalty=0), "repeat_penalty"), (dict(repeat_last_n=-2), "repeat_last_n"),
    (dict(samplers=("nope",)), "nope"),
])
def test_invalid_parameters(kw, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kw)


def test_time_per_call_on_a_151k_vocabulary():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=151_000).astype(np.float32)
    history = rng.integers(0, 151_000, size=200).tolist()
    cases = {"llama.cpp defaults": SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
             "+ repeat_penalty 1.1": SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                                                    repeat_penalty=1.1),
             "greedy": SamplingParams(),
             "greedy, llama.cpp's other defaults": SamplingParams(top_k=40, top_p=0.95, min_p=0.05),
             "top_p 0.95 only": SamplingParams(temperature=0.8, top_p=0.95)}
    for name, params in cases.items():
        sample(logits, params, rng, history)
        t = time.perf_counter()
        for _ in range(20):
            sample(logits, params, rng, history)
        print(f"{name}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms per sample call")
