import numpy as np
import pytest

from pltkit.runtime.sampling import SamplingParams, sample

LOGITS = np.log(np.array([0.05, 0.5, 0.2, 0.15, 0.1]))


def draws(params, seed=0, n=2000):
    rng = np.random.default_rng(seed)
    return [sample(LOGITS, params, rng) for _ in range(n)]


def test_temperature_zero_is_greedy():
    assert set(draws(SamplingParams(temperature=0), n=20)) == {1}


def test_top_k_and_top_p_restrict_the_support():
    assert set(draws(SamplingParams(temperature=1, top_k=2))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1, top_p=0.75))) == {1, 2, 3}  # 0.5 + 0.2 < 0.75 <= + 0.15


def test_sampling_follows_the_distribution_and_is_reproducible():
    got = draws(SamplingParams(temperature=1), seed=3)
    freq = np.bincount(got, minlength=5) / len(got)
    print("frequencies", np.round(freq, 3))
    assert np.abs(freq - np.exp(LOGITS)).max() < 0.04
    assert got == draws(SamplingParams(temperature=1), seed=3) != draws(SamplingParams(temperature=1), seed=4)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)])
def test_invalid_parameters(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
