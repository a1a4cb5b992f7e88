"""The float64 oracle is not vacuous: it matches a textbook Llama for one loop,
satisfies exact identities of the spec, and reacts to every PLT knob.

These tests need only the oracle (ref64) and the checkpoint builder (synth).
"""

import numpy as np
import pytest
import torch

from ref64 import reference_logits
from synth import make_checkpoint, make_config, random_weights

IDS = np.random.default_rng(7).integers(0, 320, size=(2, 12))


def logits(tmp_path, name, cfg, ids=IDS, **kwargs):
    make_checkpoint(tmp_path / name, cfg, **kwargs)
    return reference_logits(tmp_path / name, ids)


def max_diff(x, y):
    return float(np.abs(x - y).max())


def plain_llama(cfg, w, ids):
    """Textbook Llama forward of one sequence: masks, repeat_kv, complex RoPE."""
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, seq, half = cfg["rms_norm_eps"], len(ids), cfg["head_dim"] // 2
    w = {k: a.astype(np.float64) for k, a in w.items()}
    turn = np.exp(1j * np.outer(np.arange(seq), cfg["rope_theta"] ** (-np.arange(half) / half)))

    def rope(x):  # [T, heads, hd]; pair (i, i + hd/2) is one complex number
        z = (x[..., :half] + 1j * x[..., half:]) * turn[:, None, :]
        return np.concatenate([z.real, z.imag], axis=-1)

    def norm(x, g):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * g

    def lin(x, name):
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)

    mask = np.triu(np.full((seq, seq), -np.inf), k=1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope(lin(h, p + "self_attn.q_proj").reshape(seq, nh, hd))
        k = rope(lin(h, p + "self_attn.k_proj").reshape(seq, nkv, hd))
        v = lin(h, p + "self_attn.v_proj").reshape(seq, nkv, hd)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        y = np.einsum("hts,shd->thd", prob, v).reshape(seq, nh * hd)
        x = x + lin(y, p + "self_attn.o_proj")
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = lin(h, p + "mlp.gate_proj")
        x = x + lin(gate / (1 + np.exp(-gate)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_one_loop_is_plain_llama(tmp_path):
    cfg = make_config(plt_num_loops=1, attention_bias=True, mlp_bias=True)
    weights = random_weights(cfg, seed=3)
    assert not any("plt_gate" in name for name in weights)
    got = logits(tmp_path, "llama", cfg, weights=weights)
    want = np.stack([plain_llama(cfg, weights, row) for row in IDS])
    d = max_diff(got, want)
    print(f"one loop vs plain Llama: max|diff| = {d:.2e}")
    assert d < 1e-10


def test_one_loop_ignores_plt_settings(tmp_path):
    base = logits(tmp_path, "base", make_config(plt_num_loops=1))
    other = make_config(plt_num_loops=1, plt_window_size=[1, 0], plt_emb_scale=0.3,
                        plt_hidden_scale=0.2, plt_gate_use_hidden_states=False,
                        plt_normalize_per_loop=False, plt_clp_shift=False)
    assert max_diff(base, logits(tmp_path, "other", other)) == 0.0


def _tweak_gate_weight(w):
    w["model.layers.1.self_attn.plt_gate.weight"][2] += 1.0


def _tweak_gate_bias(w):
    w["model.layers.0.self_attn.plt_gate.bias"][0] -= 2.0


def _tweak_gate_norm(w):
    w["model.layers.0.self_attn.plt_gate.gate_norm.weight"][:5] *= -1.0


@pytest.mark.parametrize("tweak", [_tweak_gate_weight, _tweak_gate_bias, _tweak_gate_norm])
def test_gate_tensors_matter(tmp_path, tweak):
    cfg = make_config()
    weights = random_weights(cfg)
    base = logits(tmp_path, "base", cfg, weights=weights)
    tweak(weights)
    d = max_diff(base, logits(tmp_path, "tweaked", cfg, weights=weights))
    print(f"{tweak.__name__}: max|diff| = {d:.2e}")
    assert d > 1e-3


@pytest.mark.parametrize("change", [
    dict(plt_window_size=[1, 0]),
    dict(plt_window_size=[64, 0]),
    dict(plt_emb_scale=0.707),
    dict(plt_hidden_scale=0.053),
    dict(plt_normalize_per_loop=False),
    dict(plt_clp_shift=False),
    dict(plt_num_loops=3),
    dict(rope_scaling={"type": "linear", "factor": 2.0}),
])
def test_plt_settings_matter(tmp_path, change):
    base = logits(tmp_path, "base", make_config())
    d = max_diff(base, logits(tmp_path, "changed", make_config(**change)))
    print(f"{change}: max|diff| = {d:.2e}")
    assert d > 1e-3


def _saturated_gate(cfg, bias):
    """Weights whose gates are constant: sigmoid(bias) for every head."""
    weights = random_weights(cfg)
    for name in weights:
        if name.endswith("plt_gate.weight"):
            weights[name][:] = 0.0
        elif name.endswith("plt_gate.bias"):
            weights[name][:] = bias
    return weights


@pytest.mark.parametrize("bias, window, same", [
    (40.0, [3, 0], True),    # g = 1: only the global branch (loop 0's K/V)
    (-40.0, [64, 0], True),  # g = 0, window covers all: own K/V == loop 0's
    (-40.0, [3, 0], False),  # g = 0, short window: differs from causal
])
def test_second_loop_repeats_first_without_carry(tmp_path, bias, window, same):
    """With b = 0 loop 1 sees exactly loop 0's input, so it reproduces loop 0
    whenever its attention reduces to loop 0's: this pins the gate direction,
    the global branch's K/V and the local branch's window."""
    one = make_config(plt_num_loops=1)
    two = make_config(plt_hidden_scale=0.0, plt_window_size=window)
    weights = _saturated_gate(two, bias)
    loop1 = logits(tmp_path, "one", one, weights={k: v for k, v in weights.items()
                                                   if "plt_gate" not in k})
    loop2 = logits(tmp_path, "two", two, weights=weights)
    d = max_diff(loop1, loop2)
    print(f"gate bias {bias}, window {window}: max|diff| = {d:.2e}")
    assert (d < 1e-12) == same


@pytest.mark.parametrize("shift", [True, False])
def test_shift_leaves_position_zero_with_embedding_only(tmp_path, shift):
    """With the shift, loop 1 at position 0 gets a*E_0 + 0; with a = 1 and
    g = 1 it then equals loop 0 there, and only there."""
    one = make_config(plt_num_loops=1)
    two = make_config(plt_clp_shift=shift)
    weights = _saturated_gate(two, 40.0)
    loop1 = logits(tmp_path, "one", one, weights={k: v for k, v in weights.items()
                                                   if "plt_gate" not in k})
    loop2 = logits(tmp_path, "two", two, weights=weights)
    assert (max_diff(loop1[:, 0], loop2[:, 0]) < 1e-12) == shift
    assert max_diff(loop1[:, 1:], loop2[:, 1:]) > 1e-3


def test_causal(tmp_path):
    cfg = make_config(plt_num_loops=3)
    base = logits(tmp_path, "ckpt", cfg)
    ids = IDS.copy()
    ids[:, 6] = (ids[:, 6] + 1) % 320
    changed = reference_logits(tmp_path / "ckpt", ids)
    assert max_diff(base[:, :6], changed[:, :6]) == 0.0
    assert max_diff(base[:, 6:], changed[:, 6:]) > 1e-3


@pytest.mark.parametrize("scaling, same_as", [
    ({"rope_type": "default"}, None),
    ({"type": "linear", "factor": 1.0}, None),
    ({"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, None),
    # every wavelength exceeds old_len / low_freq_factor: all divided by factor
    ({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 2},
     {"rope_type": "linear", "factor": 4.0}),
])
def test_rope_scaling_identities(tmp_path, scaling, same_as):
    a = logits(tmp_path, "a", make_config(rope_scaling=scaling))
    b = logits(tmp_path, "b", make_config(rope_scaling=same_as))
    assert max_diff(a, b) < 1e-12


def test_llama3_smoothing_differs_from_linear(tmp_path):
    """Wavelengths 6.3, 63, 628, 6283 against old_len 64: one kept, one
    interpolated, two divided, so neither plain nor linear RoPE."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    ids = np.random.default_rng(1).integers(0, 320, size=(2, 40))
    got = logits(tmp_path, "llama3", make_config(rope_scaling=llama3), ids)
    for other in (None, {"rope_type": "linear", "factor": 8.0}):
        assert max_diff(got, logits(tmp_path, "other", make_config(rope_scaling=other), ids)) > 1e-3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_formats(tmp_path, dtype):
    """Shards change nothing; half-precision storage equals float32 storage
    of the same values rounded to that precision."""
    cfg = make_config()
    base = logits(tmp_path, "one", cfg)
    assert max_diff(base, logits(tmp_path, "sharded", cfg, shards=3)) == 0.0
    half = logits(tmp_path, "half", cfg, dtype=dtype)
    rounded = {k: torch.from_numpy(a).to(getattr(torch, dtype)).float().numpy()
               for k, a in random_weights(cfg).items()}
    assert max_diff(half, logits(tmp_path, "rounded", cfg, weights=rounded)) == 0.0
    assert max_diff(half, base) > 1e-4
