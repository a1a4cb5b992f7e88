"""Parity of the PyTorch runtime with the independent float64 oracle.

Each case writes a synthetic checkpoint, runs `pltkit.load_model` in float32
and compares its logits with `ref64.reference_logits` (batch of 2). The cases
cover every axis of the spec once or twice rather than their product:
loops 1-3, both gate modes, windows 0/3/64 (sequences longer than the
window), emb/hidden scales, tied heads, biases, per-loop norm, shards,
half-precision storage, RoPE scaling and the unshifted CLP variant.
"""

import zlib

import numpy as np
import pytest
import torch

import pltkit
from ref64 import reference_logits
from synth import make_checkpoint, make_config

TOLERANCE = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
QUERY = dict(plt_gate_use_hidden_states=False)
RELEASED = dict(plt_window_size=[64, 0], plt_emb_scale=0.707, plt_hidden_scale=0.053)


def case(name, seq_len=12, shards=1, dtype="float32", **overrides):
    """One parametrized case; its name also seeds its weights and ids."""
    return pytest.param(name, overrides, seq_len, shards, dtype, id=name)


# The base config (synth.TINY) has 2 loops, the hidden-state gate and window 3.
CASES = [
    case("base"),
    case("loops1", plt_num_loops=1),
    case("loops1-tied", plt_num_loops=1, tie_word_embeddings=True),
    case("loops3", plt_num_loops=3),
    case("query-gate", **QUERY),
    case("query-gate-loops3", plt_num_loops=3, **QUERY),
    case("window0", plt_window_size=[0, 0]),
    case("window64", seq_len=70, plt_window_size=[64, 0]),
    case("window64-loops3-query", seq_len=70, plt_num_loops=3, plt_window_size=[64, 0], **QUERY),
    case("scales", plt_emb_scale=0.707, plt_hidden_scale=0.053),
    case("scales-loops3-query", plt_num_loops=3, plt_emb_scale=0.707, plt_hidden_scale=0.053,
         **QUERY),
    case("tied", tie_word_embeddings=True),
    case("biases", attention_bias=True, mlp_bias=True),
    case("biases-query-loops3", plt_num_loops=3, attention_bias=True, mlp_bias=True, **QUERY),
    case("no-per-loop-norm", plt_num_loops=3, plt_normalize_per_loop=False),
    case("shards3", shards=3),
    case("bf16", dtype="bfloat16"),
    case("fp16-loops3", dtype="float16", plt_num_loops=3),
    case("rope-linear", seq_len=40, rope_scaling={"type": "linear", "factor": 4.0}),
    case("rope-llama3", seq_len=40, rope_scaling=LLAMA3),
    case("no-shift", plt_clp_shift=False),
    case("no-shift-loops3-query", plt_num_loops=3, plt_clp_shift=False, **QUERY),
    case("released-like", seq_len=70, shards=3, dtype="bfloat16", **RELEASED),
]


def check_parity(ckpt_dir, seq_len, seed, label):
    """Compare runtime and oracle logits on random ids [2, seq_len]."""
    ids = np.random.default_rng(seed).integers(0, 320, size=(2, seq_len))
    model = pltkit.load_model(str(ckpt_dir), dtype=torch.float32)
    with torch.no_grad():
        got = model(torch.tensor(ids))
    want = reference_logits(ckpt_dir, ids)
    assert tuple(got.shape) == want.shape
    d = float(np.abs(got.double().numpy() - want).max())
    print(f"{label}: max|diff| = {d:.2e}")
    assert d < TOLERANCE


@pytest.mark.parametrize("name, overrides, seq_len, shards, dtype", CASES)
def test_logits_match_reference(tmp_path, name, overrides, seq_len, shards, dtype):
    seed = zlib.crc32(name.encode())
    make_checkpoint(tmp_path, make_config(**overrides), seed=seed, shards=shards, dtype=dtype)
    check_parity(tmp_path, seq_len, seed, name)


def test_published_defaults(tmp_path):
    """Optional fields left out of config.json take the published defaults:
    window [64, 0], query gate, per-loop norm, scales 1, untied, no biases,
    no RoPE scaling, shift on."""
    optional = ("plt_window_size", "plt_gate_use_hidden_states", "plt_normalize_per_loop",
                "plt_emb_scale", "plt_hidden_scale", "tie_word_embeddings",
                "attention_bias", "mlp_bias", "rope_scaling")
    cfg = {k: v for k, v in make_config().items() if k not in optional}
    make_checkpoint(tmp_path, cfg, seed=99)
    check_parity(tmp_path, 70, 99, "published defaults")
