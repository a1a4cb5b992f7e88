"""Synthetic PLT checkpoints in the published Hugging Face layout.

No real weights are available to the tests, so they build tiny random
checkpoints that look exactly like a published `IQuestPLTCoderForCausalLM`
folder: `config.json`, `model.safetensors` (or shards plus
`model.safetensors.index.json`) and the tokenizer files.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pltkit.model.formats import FLOAT_TYPES

TINY = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    plt_num_loops=2,
    plt_window_size=[3, 0],
    plt_gate_use_hidden_states=True,
    plt_normalize_per_loop=True,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    plt_emb_scale=None,
    plt_hidden_scale=None,
    bos_token_id=1,
    eos_token_id=[2, 3],
    model_type="iquestpltcoder",
    architectures=["IQuestPLTCoderForCausalLM"],
    hidden_act="silu",
    rope_scaling=None,
)

# Llama-style ids 0-2 (as in the published config: bos 1, eos [2, ...]),
# then the code-model specials.
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<|endoftext|>", "<|fim_prefix|>",
    "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>", "<|repo_name|>",
]
BOS_TOKEN = "<s>"
EOS_TOKENS = ["</s>", "<|endoftext|>"]
TOKENIZER_VOCAB_SIZE = 300

_CORPUS = """\
import os
import sys
from typing import List, Optional

def add(a, b):
    return a + b

def fib(n: int) -> int:
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

    def __len__(self):
        return len(self.items)

def read_lines(path: str) -> List[str]:
    with open(path) as f:
        return [line.rstrip() for line in f]

def find(items, target) -> Optional[int]:
    for i, item in enumerate(items):
        if item == target:
            return i
    return None

if __name__ == "__main__":
    print(add(1, 2), fib(10))
    print(find([3, 1, 4, 1, 5], 4))
    sys.exit(0)
"""


def make_config(**overrides) -> dict:
    """Return a copy of TINY with `overrides` applied."""
    cfg = json.loads(json.dumps(TINY))  # deep copy
    cfg.update(overrides)
    return cfg


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors for every name of the checkpoint layout.

    Optional fields missing from `cfg` take the published class's defaults.
    Scales keep activations O(1) so that loops, gates and windows visibly
    change the logits: matrices N(0, 0.2^2), norm weights 1 + N(0, 0.1^2),
    biases N(0, 0.1^2) and gate biases N(0, 0.5^2).
    """
    rng = np.random.default_rng(seed)
    loops = cfg.get("plt_num_loops", 2)
    hidden_gate = cfg.get("plt_gate_use_hidden_states", False)
    attn_bias, mlp_bias = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
    d, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def matrix(*shape):
        return rng.normal(0.0, 0.2, shape)

    def norm(n):
        return 1.0 + rng.normal(0.0, 0.1, n)

    def bias(n, scale=0.1):
        return rng.normal(0.0, scale, n)

    w = {"model.embed_tokens.weight": matrix(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        for name, rows in (("q", h * hd), ("k", kv * hd), ("v", kv * hd)):
            w[f"{p}self_attn.{name}_proj.weight"] = matrix(rows, d)
            if attn_bias:
                w[f"{p}self_attn.{name}_proj.bias"] = bias(rows)
        w[p + "self_attn.o_proj.weight"] = matrix(d, h * hd)
        if attn_bias:
            w[p + "self_attn.o_proj.bias"] = bias(d)
        if loops >= 2:
            gate_in = d if hidden_gate else hd
            w[p + "self_attn.plt_gate.weight"] = matrix(h, gate_in)
            w[p + "self_attn.plt_gate.bias"] = bias(h, scale=0.5)
            if hidden_gate:
                w[p + "self_attn.plt_gate.gate_norm.weight"] = norm(d)
        for name, shape in (("gate", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
            w[f"{p}mlp.{name}_proj.weight"] = matrix(*shape)
            if mlp_bias:
                w[f"{p}mlp.{name}_proj.bias"] = bias(shape[0])
    w["model.norm.weight"] = norm(d)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = matrix(v, d)
    return {k: a.astype(np.float32) for k, a in w.items()}


def write_tokenizer(path) -> dict:
    """Train a tiny byte-level BPE and write the HF tokenizer files.

    Writes tokenizer.json, tokenizer_config.json and generation_config.json
    into `path`. Returns {"bos_token_id": int, "eos_token_id": [int, ...]},
    the ids config.json must carry to agree with the tokenizer.
    """
    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    tok.save(str(path / "tokenizer.json"))

    ids = {
        "bos_token_id": tok.token_to_id(BOS_TOKEN),
        "eos_token_id": [tok.token_to_id(t) for t in EOS_TOKENS],
    }
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKENS[0],
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(path / "tokenizer_config.json", tokenizer_config)
    _write_json(path / "generation_config.json", ids)
    return ids


def make_checkpoint(path, cfg: dict | None = None, *, seed: int = 0, shards: int = 1,
                    dtype: str = "float32", weights: dict | None = None, tokenizer=None) -> dict:
    """Write a complete synthetic checkpoint folder and return its config.

    `cfg` defaults to TINY and is written as given (fields left out stay
    out), except that its bos/eos ids are replaced by the tokenizer's. `tokenizer(path)` writes the
    tokenizer files and returns those ids (default: write_tokenizer).
    Tensors are `weights` if given (possibly broken on purpose), else
    `random_weights(cfg, seed)`, stored as `dtype`. With `shards` > 1 they
    are split into HF-named shard files plus model.safetensors.index.json.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = make_config() if cfg is None else json.loads(json.dumps(cfg))
    cfg.update((tokenizer or write_tokenizer)(path))
    cfg["torch_dtype"] = dtype
    _write_json(path / "config.json", cfg)

    if weights is None:
        weights = random_weights(cfg, seed)
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(a)).to(FLOAT_TYPES[dtype].torch())
        for name, a in weights.items()
    }
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return cfg

    if not 1 < shards <= len(tensors):
        raise ValueError(f"cannot split {len(tensors)} tensors into {shards} shards")
    weight_map = {}
    for k, names in enumerate(np.array_split(list(tensors), shards), start=1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names.tolist(), file))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    _write_json(path / "model.safetensors.index.json", index)
    return cfg


def _write_json(file: Path, obj) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n")
