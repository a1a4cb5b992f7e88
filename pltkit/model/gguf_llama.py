"""The Llama model in a GGUF file of architecture `llama`: the PLTConfig from its `llama.*` metadata,
and its tensors under their Hugging Face names, the q/k rows back in Hugging Face's rotate-half order
(llama.cpp's converter interleaves them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pltkit.model.config import ConfigError, PLTConfig
from pltkit.model.gguf_file import GGUFMeta
from pltkit.model.paths import ImportModelError

P = "llama."  # the metadata keys of the architecture
# PLTConfig field -> the llama.* metadata key it comes from, to name in errors
GGUF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
             "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
             "max_position_embeddings": "context_length", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
             "rope_theta": "rope.freq_base", "rope_scaling": "rope.scaling.factor"}
_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}  # of optional keys

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_SKIPPED = ("rope_freqs", "attn_rot_embd")  # rotary tables, recomputed


def gguf_config(meta: GGUFMeta, tensors: dict, path: Path) -> PLTConfig:
    """The PLTConfig (one loop) of a GGUF `llama` file (`tensors`: name -> gguf's tensor); ImportModelError
    naming the metadata key for anything the PLT model cannot represent."""
    embd = meta.need(P + "embedding_length")
    heads = meta.need(P + "attention.head_count")
    kv_heads = meta.get(P + "attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ImportModelError(f"{path}: per-layer head counts are not supported")
    head_dim = meta.get(P + "attention.key_length",
                        embd // heads if isinstance(embd, int) and isinstance(heads, int) and heads > 0 else 0)
    checks = ((P + "attention.value_length", lambda v: v != head_dim, f"must equal the key length ({head_dim})"),
              (P + "rope.dimension_count", lambda v: v != head_dim,
               f"pltkit rotates the whole head ({head_dim} dimensions)"),
              (P + "expert_count", bool, "mixture-of-experts models are not supported"))
    for key, bad, why in checks:
        if meta.get(key) is not None and bad(meta.get(key)):
            raise ImportModelError(f"{path}: metadata {key} = {meta.get(key)!r}: {why}")
    if "rope_freqs.weight" in tensors:
        raise ImportModelError(f"{path}: tensor rope_freqs.weight (per-frequency RoPE factors, as Llama 3.1 "
                               "stores its rope scaling) is not supported")
    rope_scaling = _rope_scaling(meta, path)
    eos = _eos_ids(meta)

    def has_bias(kinds):
        return any(n.endswith(f".{kind}.bias") for kind in kinds for n in tensors)

    fields = dict(
        vocab_size=_vocab_size(meta, tensors), hidden_size=embd,
        intermediate_size=meta.need(P + "feed_forward_length"), num_hidden_layers=meta.need(P + "block_count"),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        **{field: meta.get(P + GGUF_KEYS[field], default) for field, default in _DEFAULTS.items()},
        rope_scaling=rope_scaling,
        attention_bias=has_bias(("attn_q", "attn_k", "attn_v", "attn_output")),
        mlp_bias=has_bias(("ffn_gate", "ffn_up", "ffn_down")),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        plt_num_loops=1,
    )
    try:
        cfg = PLTConfig(**fields)
    except ConfigError as e:
        key = GGUF_KEYS.get(e.field)
        raise ImportModelError(f"{path}: {f'metadata {P}{key}: ' if key else ''}{e}") from None
    layers = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if layers != set(range(cfg.num_hidden_layers)):
        raise ImportModelError(f"{path}: metadata {P}block_count = {cfg.num_hidden_layers}: the file has tensors "
                               f"for {len(layers)} layers "
                               f"(blk.{min(layers, default=0)} to blk.{max(layers, default=-1)})")
    return cfg


def _rope_scaling(meta: GGUFMeta, path: Path) -> dict | None:
    kind = meta.get(P + "rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta.need(P + "rope.scaling.factor")}
    if kind != "none":
        raise ImportModelError(f"{path}: metadata {P}rope.scaling.type = {kind!r}: only linear rope scaling "
                               "is supported")
    if meta.get(P + "rope.scale_linear") not in (None, 1.0):  # the older key
        return {"rope_type": "linear", "factor": meta.get(P + "rope.scale_linear")}
    return None


def _vocab_size(meta: GGUFMeta, tensors: dict) -> int:
    vocab = meta.get(P + "vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    return vocab


def _eos_ids(meta: GGUFMeta) -> list[int]:
    """The end-of-sequence token and the tokens that also end a generation (end of turn, of message)."""
    eos = [meta.get("tokenizer.ggml.eos_token_id")]
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if meta.get(key) is not None and meta.get(key) not in eos:
            eos.append(meta.get(key))
    return [i for i in eos if i is not None]


def hf_tensors(tensors: dict, cfg: PLTConfig, path: Path) -> list[tuple[str, object, int | None]]:
    """(Hugging Face name, gguf's tensor, head count of its rotary permutation or None) of every tensor of
    a GGUF `llama` file but the rotary tables; ImportModelError naming those a Llama model does not have."""
    plan, unknown = [], []
    for name, t in tensors.items():
        hf_name, permute = hf_name_of(name, cfg.num_attention_heads, cfg.num_key_value_heads)
        if hf_name is None:
            if not name.startswith(_SKIPPED) and ".attn_rot_embd" not in name:
                unknown.append(name)
            continue
        plan.append((hf_name, t, permute))
    if unknown:
        raise ImportModelError(f"{path}: tensors a Llama model does not have: {', '.join(sorted(unknown)[:10])}")
    return plan


def hf_name_of(name: str, heads: int, kv_heads: int) -> tuple[str | None, int | None]:
    """HF tensor name of a GGUF tensor, and the head count of its rotary permutation (q, k) or None."""
    base, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None, None
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{suffix}", None
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        permute = {"attn_q": heads, "attn_k": kv_heads}.get(parts[2])
        return f"model.layers.{int(parts[1])}.{_BLOCK[parts[2]]}.{suffix}", permute
    return None, None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q or k projection (weight [rows, D] or bias [rows]).

    llama.cpp's converter regroups the rows of each head from Hugging Face's rotate-half order
    (row j*half + i, j in {0, 1}) into interleaved pairs (row 2*i + j), so that its RoPE rotates
    adjacent rows. This puts them back: within each head, row 2*i + j returns to j*half + i."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ImportModelError(f"cannot undo the rotary permutation: {rows} rows for {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).copy()
