"""Independent float64 oracle for the Parallel Loop Transformer (PLT).

Written directly from the architecture spec and deliberately naive: one
sequence at a time, attention as explicit loops over positions and heads,
plain dicts of numpy arrays. It shares no code with the runtime, so the two
can only agree if both follow the spec.

Loop r of the model (r = 0 .. L-1) runs every physical layer on its input:
  loop 0 input:  E (token embeddings)
  loop r input:  a*E + b*shift(C[r-1]),  C = model.norm(output) when
                 plt_normalize_per_loop, shift = one position right with a
                 zero row at position 0 (no shift when plt_clp_shift is false)
In loop 0 attention is ordinary causal attention; its K/V per layer are the
global cache. In loop r >= 1 each head mixes causal attention over loop 0's
K/V (global) with attention over its own loop's K/V in the window
t-left..t (local): o_proj(g*global + (1-g)*local), g a per-head gate.
Logits are lm_head(model.norm(last loop output)).
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

# Defaults of the published config class for optional fields.
DEFAULTS = dict(
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=None,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    plt_num_loops=2,
    plt_window_size=[64, 0],
    plt_normalize_per_loop=True,
    plt_emb_scale=None,
    plt_hidden_scale=None,
    plt_gate_use_hidden_states=False,
    plt_clp_shift=True,
)


def load_checkpoint(ckpt_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """Read config.json (with defaults filled in) and all tensors as float64."""
    ckpt_dir = Path(ckpt_dir)
    cfg = {**DEFAULTS, **json.loads((ckpt_dir / "config.json").read_text())}
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for file in files:
        # framework "pt" because numpy cannot represent bfloat16.
        with safe_open(ckpt_dir / file, framework="pt") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name).to(torch.float64).numpy()
    return cfg, weights


def reference_logits(ckpt_dir, input_ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] (float64) of the checkpoint for token ids [B, T]."""
    cfg, w = load_checkpoint(ckpt_dir)
    if cfg["hidden_act"] != "silu":
        raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r}")
    if cfg["plt_window_size"][1] != 0:
        raise NotImplementedError("only causal windows [left, 0] are specified")
    return np.stack([_sequence_logits(cfg, w, row) for row in np.asarray(input_ids)])


def _sequence_logits(cfg: dict, w: dict, ids: np.ndarray) -> np.ndarray:
    """Logits [T, V] of one sequence: all loops, one after another."""
    a = 1.0 if cfg["plt_emb_scale"] is None else cfg["plt_emb_scale"]
    b = 1.0 if cfg["plt_hidden_scale"] is None else cfg["plt_hidden_scale"]
    eps = cfg["rms_norm_eps"]
    norm_w = w["model.norm.weight"]
    emb = w["model.embed_tokens.weight"][ids]
    inv_freq = rope_inv_freq(cfg)

    global_kv = []  # per layer: loop 0's (k, v), each [T, kv_heads, head_dim]
    carry = None  # C[r-1]: previous loop's (normed) output
    for r in range(cfg["plt_num_loops"]):
        if r == 0:
            x = emb
        else:
            prev = carry
            if cfg["plt_clp_shift"]:
                prev = np.zeros_like(carry)
                prev[1:] = carry[:-1]
            x = a * emb + b * prev
        for i in range(cfg["num_hidden_layers"]):
            x = _layer(cfg, w, i, x, inv_freq, r, global_kv)
        carry = rms_norm(x, norm_w, eps) if cfg["plt_normalize_per_loop"] else x

    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return rms_norm(x, norm_w, eps) @ head.T


def _layer(cfg, w, i, x, inv_freq, loop, global_kv):
    """One pre-norm block; in loop 0 it appends its K/V to `global_kv`."""
    p = f"model.layers.{i}."
    eps = cfg["rms_norm_eps"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    seq = x.shape[0]
    ab, mb = cfg["attention_bias"], cfg["mlp_bias"]

    h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
    q = linear(h, w, p + "self_attn.q_proj", ab).reshape(seq, nh, hd)
    k = linear(h, w, p + "self_attn.k_proj", ab).reshape(seq, nkv, hd)
    v = linear(h, w, p + "self_attn.v_proj", ab).reshape(seq, nkv, hd)
    for t in range(seq):
        q[t] = rotate(q[t], t, inv_freq)
        k[t] = rotate(k[t], t, inv_freq)

    if loop == 0:
        global_kv.append((k, v))
    else:
        k0, v0 = global_kv[i]
        gate = _gate(cfg, w, p, x, q)  # x is still the layer input here
    left = cfg["plt_window_size"][0]
    group = nh // nkv
    y = np.zeros((seq, nh, hd))
    for t in range(seq):
        for n in range(nh):
            m = n // group  # the kv head that query head n reads
            if loop == 0:
                y[t, n] = attend(q[t, n], k[: t + 1, m], v[: t + 1, m])
            else:
                y_global = attend(q[t, n], k0[: t + 1, m], v0[: t + 1, m])
                lo = max(0, t - left)
                y_local = attend(q[t, n], k[lo : t + 1, m], v[lo : t + 1, m])
                y[t, n] = gate[t, n] * y_global + (1.0 - gate[t, n]) * y_local
    x = x + linear(y.reshape(seq, nh * hd), w, p + "self_attn.o_proj", ab)

    h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
    act = silu(linear(h, w, p + "mlp.gate_proj", mb)) * linear(h, w, p + "mlp.up_proj", mb)
    return x + linear(act, w, p + "mlp.down_proj", mb)


def _gate(cfg, w, p, x_in, q):
    """Per-position, per-head gate g [T, H] on the global branch.

    Hidden-state mode reads the layer input x_in (before input_layernorm)
    through its own RMSNorm; query mode reads the post-RoPE query of each head.
    """
    weight, bias = w[p + "self_attn.plt_gate.weight"], w[p + "self_attn.plt_gate.bias"]
    seq, nh, _ = q.shape
    g = np.zeros((seq, nh))
    for t in range(seq):
        if cfg["plt_gate_use_hidden_states"]:
            z = weight @ rms_norm(x_in[t], w[p + "self_attn.plt_gate.gate_norm.weight"],
                                  cfg["rms_norm_eps"]) + bias
        else:
            z = np.array([q[t, n] @ weight[n] + bias[n] for n in range(nh)])
        g[t] = sigmoid(z)
    return g


def attend(q, keys, values):
    """Softmax attention of one query [hd] over keys/values [n, hd]."""
    scores = keys @ q / math.sqrt(q.shape[0])
    p = np.exp(scores - scores.max())
    return (p / p.sum()) @ values


def rope_inv_freq(cfg: dict) -> np.ndarray:
    """RoPE inverse frequencies theta^(-2i/head_dim), i < head_dim/2, scaled."""
    hd = cfg["head_dim"]
    inv_freq = np.array([cfg["rope_theta"] ** (-2.0 * i / hd) for i in range(hd // 2)])
    scaling = cfg["rope_scaling"] or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":  # positions divided by factor
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return np.array([_llama3_freq(f, scaling) for f in inv_freq])
    raise NotImplementedError(f"rope_scaling {kind!r}")


def _llama3_freq(freq: float, s: dict) -> float:
    """Llama-3.1 smoothing: keep high, divide low, interpolate the middle."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high:
        return freq
    if wavelen > old_len / low:
        return freq / factor
    smooth = (old_len / wavelen - low) / (high - low)
    return (1 - smooth) * freq / factor + smooth * freq


def rotate(x: np.ndarray, pos: int, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x [heads, hd] at position pos: pairs (i, i + hd/2)."""
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for i in range(half):
        c, s = math.cos(pos * inv_freq[i]), math.sin(pos * inv_freq[i])
        x1, x2 = x[:, i], x[:, i + half]
        out[:, i] = x1 * c - x2 * s
        out[:, i + half] = x2 * c + x1 * s
    return out


def linear(x, w, prefix, has_bias):
    """x @ W.T, plus the bias when the config says the layer has one."""
    y = x @ w[prefix + ".weight"].T
    return y + w[prefix + ".bias"] if has_bias else y


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    return x * sigmoid(x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))
