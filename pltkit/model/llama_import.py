"""Import Llama-architecture checkpoints as PLT checkpoints with one loop.

A PLT model with `plt_num_loops = 1` is an ordinary Llama transformer with the same tensor
names, so an import maps the config, carries the weights over and brings the tokenizer:

- `import_hf_llama`: a Hugging Face `LlamaForCausalLM` folder (config.json, safetensors
  weights, tokenizer.json or tokenizer.model). Tensor names are kept; only the config is translated.
- `import_gguf`: a llama.cpp GGUF file of architecture `llama`. Every tensor is dequantized
  to float with gguf's own code, renamed to the Hugging Face name, and the q/k rows are put
  back in Hugging Face's rotate-half order (llama.cpp's converter interleaves them). The
  tokenizer.json is rebuilt from the byte-level BPE vocabulary stored in the file, or a SentencePiece
  tokenizer.model from a `llama` (SPM) vocabulary.

The output is written into a temporary sibling folder, checked with `open_checkpoint` and
renamed at the end, so a failed or interrupted import leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from pltkit.model.checkpoint import (INDEX, SINGLE, STORED_DTYPES, TOKENIZER_FILES, open_checkpoint, read_header,
                                     read_index)
from pltkit.model.folders import kill_point, repair_leftovers, replace_folder
from pltkit.model.formats import FLOAT_TYPES
from pltkit.model.config import ConfigError, PLTConfig
from pltkit.model.paths import GGUF_MAGIC, CheckpointError

log = logging.getLogger(__name__)

DTYPES = {name: t.torch() for name, t in FLOAT_TYPES.items()}
MAX_SHARD_BYTES = 2 << 30
HF_ARCHITECTURE = "LlamaForCausalLM"
GGUF_PRE_TOKENIZERS = ("smollm",)  # pre-tokenizers rebuilt exactly; others fall back to plain ByteLevel


class ImportModelError(ValueError):
    """A source that cannot be imported; the message says what and, for config fields, which."""


# --- Hugging Face folders ---------------------------------------------------------------------------------
def import_hf_llama(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                    force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Import a Hugging Face `LlamaForCausalLM` folder as a PLT checkpoint with one loop.

    Weights keep their stored dtype unless `dtype` ("float32", "float16", "bfloat16") is given.
    Returns the output folder."""
    src = Path(src_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ImportModelError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not (src / "config.json").is_file():
        raise ImportModelError(f"{src}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ImportModelError(f"cannot read {src / 'config.json'}: {e}") from None
    if not isinstance(hf, dict):
        raise ImportModelError(f"{src / 'config.json'}: expected a JSON object")
    cfg = hf_llama_config(hf, where=str(src / "config.json"))
    if not any((src / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise ImportModelError(f"{src}: no tokenizer.json or SentencePiece tokenizer.model")

    files = _hf_weight_files(src)
    plan, skipped = [], []
    for file in files:
        for name, (stored, shape) in read_header(file).items():  # CheckpointError naming a corrupt header
            if name.endswith(".rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
                skipped.append(name)
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:  # a stored copy of the embedding
                skipped.append(name)
                continue
            if stored not in STORED_DTYPES:
                raise ImportModelError(f"{file.name}: tensor {name} is stored as {stored}, not a float type "
                                       "(quantized checkpoints are not supported)")
            target = DTYPES[dtype] if dtype else STORED_DTYPES[stored]
            plan.append((name, math.prod(shape) * target.itemsize, file))
    if skipped:
        log.info("not imported (recomputed or tied): %s", ", ".join(skipped))

    def tensor(name, file):
        with safe_open(file, framework="pt") as f:
            t = f.get_tensor(name)
        return t.to(DTYPES[dtype]) if dtype else t

    source = {"format": "huggingface", "architecture": HF_ARCHITECTURE, "name": src.resolve().name}
    cfg = cfg.replace(extra={**cfg.extra, "pltkit_import": source})

    def write(tmp: Path):
        _write_weights(tmp, [(n, b) for n, b, _ in plan], lambda n: tensor(n, by_name[n]), max_shard_bytes)
        cfg.to_json(tmp / "config.json")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)

    by_name = {n: f for n, _, f in plan}
    return _atomic_output(out_dir, write, force)


def hf_llama_config(hf: dict, where: str = "config.json") -> PLTConfig:
    """The PLTConfig (one loop) of a Hugging Face Llama config.json; ImportModelError naming the field
    for anything the PLT model cannot represent."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if HF_ARCHITECTURE not in archs and model_type != "llama":
        what = ", ".join(map(str, archs)) or f"model_type {model_type!r}"
        raise ImportModelError(f"{where}: architecture {what} is not supported; only {HF_ARCHITECTURE} "
                               "(model_type 'llama') is imported")

    def fail(field, why):
        raise ImportModelError(f"{where}: field {field!r} = {hf.get(field)!r}: {why}")

    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if field not in hf:
            raise ImportModelError(f"{where}: field {field!r} is missing")
    if hf.get("quantization_config"):
        fail("quantization_config", "quantized checkpoints are not supported (import the float weights)")
    if hf.get("hidden_act", "silu") != "silu":
        fail("hidden_act", "only 'silu' (SwiGLU) is supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        fail("partial_rotary_factor", "pltkit rotates the whole head (factor 1.0)")
    for field in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(field) is not None:
            fail(field, "not part of the Llama architecture pltkit runs")

    heads = hf["num_attention_heads"]
    rope_theta = hf.get("rope_theta", 10000.0)
    rope_scaling = hf.get("rope_scaling")
    if isinstance(hf.get("rope_parameters"), dict):  # newer transformers: theta and scaling in one object
        params = dict(hf["rope_parameters"])
        rope_theta = params.pop("rope_theta", rope_theta)
        rope_scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        rope_scaling = None
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or (hf["hidden_size"] // heads if isinstance(heads, int) and heads else 0),
        hidden_act="silu",
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=hf.get("eos_token_id", 2),
        plt_num_loops=1,
    )
    extra = {}
    if hf.get("pad_token_id") is not None:
        extra["pad_token_id"] = hf["pad_token_id"]
    for key in ("torch_dtype", "dtype"):
        if isinstance(hf.get(key), str):
            extra["torch_dtype"] = hf[key]
    try:
        return PLTConfig(**fields, extra=extra)
    except ConfigError as e:
        raise ImportModelError(f"{where}: {e}") from None


def _hf_weight_files(src: Path) -> list[Path]:
    if (src / INDEX).is_file():
        try:
            names = sorted(set(read_index(src).values()))
        except CheckpointError as e:
            raise ImportModelError(str(e)) from None
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise ImportModelError(f"{src / INDEX} names shard files that do not exist: {', '.join(missing)}")
        return [src / n for n in names]
    if (src / SINGLE).is_file():
        return [src / SINGLE]
    if any(src.glob("*.bin")) or any(src.glob("*.pt")) or any(src.glob("*.pth")):
        raise ImportModelError(f"{src}: only safetensors weights are imported (no pickle); "
                               f"no {SINGLE} or {INDEX} here")
    raise ImportModelError(f"{src}: no {SINGLE} or {INDEX}")


# --- GGUF files -------------------------------------------------------------------------------------------
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_SKIPPED = ("rope_freqs", "attn_rot_embd")


def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Import a llama.cpp GGUF file of architecture `llama` (gpt2 or llama/SentencePiece tokenizer) as a PLT
    checkpoint with one loop. Tensors are dequantized to float32 and stored as `dtype`."""
    try:
        import gguf
    except ImportError:
        raise ImportError("importing GGUF files needs the gguf package: pip install 'pltkit[gguf]'") from None
    if dtype not in DTYPES:
        raise ImportModelError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path = Path(path)
    if not path.is_file():
        raise ImportModelError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ImportModelError(f"{path}: not a GGUF file")
    expected, size = gguf_size(path, gguf), path.stat().st_size
    if size < expected:
        raise ImportModelError(f"{path}: file truncated at byte {size}, expected {expected} bytes")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, struct errors, ...
        raise ImportModelError(f"{path}: cannot read the GGUF file ({type(e).__name__}: {e})") from None
    meta = _GGUFMeta(reader, gguf, path)

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ImportModelError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are imported")
    tensors = {t.name: t for t in reader.tensors}
    cfg = _gguf_config(meta, tensors, path)
    n_tokens, tok_files = _gguf_tokenizer(meta, path)
    if n_tokens > cfg.vocab_size:
        raise ImportModelError(f"{path}: the tokenizer has {n_tokens} tokens, the model {cfg.vocab_size} embeddings")

    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    plan = []  # (hf name, gguf tensor, heads of the rotary permutation or None)
    unknown = []
    for name, t in tensors.items():
        hf_name, permute = _gguf_to_hf_name(name, heads, kv_heads)
        if hf_name is None:
            if not name.startswith(_GGUF_SKIPPED) and ".attn_rot_embd" not in name:
                unknown.append(name)
            continue
        plan.append((hf_name, t, permute))
    if unknown:
        raise ImportModelError(f"{path}: tensors a Llama model does not have: {', '.join(sorted(unknown)[:10])}")
    if cfg.tie_word_embeddings:
        log.info("%s: no output.weight, so the output layer is the token embedding (tied)", path.name)

    target = DTYPES[dtype]

    def tensor(hf_name):
        t, permute = by_name[hf_name]
        a = _dequantize(gguf, t, path)
        if permute:
            a = unpermute_rotary(a, permute)
        return torch.from_numpy(a).to(target)

    by_name = {hf_name: (t, permute) for hf_name, t, permute in plan}
    sizes = [(hf_name, int(t.n_elements) * target.itemsize) for hf_name, t, _ in plan]
    source = {"format": "gguf", "architecture": "llama", "name": path.name,
              "file_type": meta.get("general.file_type")}
    cfg = cfg.replace(extra={**cfg.extra, "torch_dtype": dtype, "pltkit_import": source})

    def write(tmp: Path):
        _write_weights(tmp, sizes, tensor, max_shard_bytes)
        cfg.to_json(tmp / "config.json")
        for name, obj in tok_files.items():
            if isinstance(obj, bytes):
                (tmp / name).write_bytes(obj)
            else:
                (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    return _atomic_output(out_dir, write, force)


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
GGUF_MAX_DIMS = 4


def gguf_size(path: Path, gguf) -> int:
    """The size a GGUF file's header says it has: where its last tensor's data ends. gguf's reader fails
    on a truncated file or an unknown type with numpy's messages, or allocates what a count says; this
    reads the header first and names the byte, the metadata key or the tensor instead."""
    _GGML_TYPES.update(int(t) for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES)
    size = path.stat().st_size
    with open(path, "rb") as f:
        order = "<"

        def truncated():
            raise ImportModelError(f"{path}: file truncated at byte {size}, inside its header")

        def read(fmt: str) -> tuple:
            n = struct.calcsize(order + fmt)
            if f.tell() + n > size:
                truncated()
            return struct.unpack(order + fmt, f.read(n))

        def forward(n: int) -> None:  # past n bytes that must be in the file (a count read from it)
            if n > size - f.tell():
                truncated()
            f.seek(n, os.SEEK_CUR)

        def skip(vtype: int):  # a metadata value; returns a scalar's value
            if vtype == _GGUF_STRING:
                forward(read("Q")[0])
            elif vtype == _GGUF_ARRAY:
                itype, n = read("IQ")
                if itype in _GGUF_SCALARS:
                    forward(n * struct.calcsize(order + _GGUF_SCALARS[itype]))
                else:
                    for _ in range(n):
                        skip(itype)
            else:
                return read(_GGUF_SCALARS[vtype])[0]

        f.seek(4)
        version = read("I")[0]
        if not version & 0xFFFF:  # written on a big-endian machine
            order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            raise ImportModelError(f"{path}: GGUF version {version} (versions 2 and 3 are read)")
        n_tensors, n_kv = read("QQ")
        alignment, ends = 32, [0]
        def text() -> str:
            n = read("Q")[0]
            if n > size - f.tell():
                truncated()
            return f.read(n).decode("utf-8", errors="replace")

        for _ in range(n_kv):
            key, vtype = text(), read("I")[0]
            if vtype not in _GGUF_SCALARS and vtype not in (_GGUF_STRING, _GGUF_ARRAY):
                raise ImportModelError(f"{path}: metadata {key}: unknown value type {vtype}")
            value = skip(vtype)
            if key == "general.alignment":
                alignment = value
        for i in range(n_tensors):
            name, n_dims = text(), read("I")[0]
            if not 1 <= n_dims <= GGUF_MAX_DIMS:
                raise ImportModelError(f"{path}: tensor {name!r} (number {i} of the {n_tensors} the header counts): "
                                       f"{n_dims} dimensions (GGUF has 1 to {GGUF_MAX_DIMS})")
            dims, ttype = read(f"{n_dims}Q"), read("I")[0]
            if ttype not in _GGML_TYPES:
                raise ImportModelError(f"{path}: tensor {name}: unknown tensor type {ttype}")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            if dims[0] % block:
                raise ImportModelError(f"{path}: tensor {name}: {dims[0]} values a row, not whole blocks of {block}")
            ends.append(read("Q")[0] + math.prod(dims) * type_size // block)
        if f.tell() > size:
            raise ImportModelError(f"{path}: file truncated at byte {size}, inside its header")
        if not isinstance(alignment, int) or not 0 < alignment <= 1 << 16 or alignment & (alignment - 1):
            raise ImportModelError(f"{path}: metadata general.alignment = {alignment!r}: must be a power of 2")
        return -(-f.tell() // alignment) * alignment + max(ends)


_GGML_TYPES: set[int] = set()  # tensor types gguf knows the block size of, filled on first use


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q or k projection (weight [rows, D] or bias [rows]).

    llama.cpp's converter regroups the rows of each head from Hugging Face's rotate-half order
    (row j*half + i, j in {0, 1}) into interleaved pairs (row 2*i + j), so that its RoPE rotates
    adjacent rows. This puts them back: within each head, row 2*i + j returns to j*half + i."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ImportModelError(f"cannot undo the rotary permutation: {rows} rows for {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).copy()


def _gguf_to_hf_name(name: str, heads: int, kv_heads: int) -> tuple[str | None, int | None]:
    """HF tensor name of a GGUF tensor, and the head count of its rotary permutation (q, k) or None."""
    base, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None, None
    if base in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[base]}.{suffix}", None
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_BLOCK:
        permute = {"attn_q": heads, "attn_k": kv_heads}.get(parts[2])
        return f"model.layers.{int(parts[1])}.{_GGUF_BLOCK[parts[2]]}.{suffix}", permute
    return None, None


def _dequantize(gguf, t, path: Path) -> np.ndarray:
    """A GGUF tensor as float32 in numpy's (row-major, HF) shape: GGUF lists dimensions fastest first."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ImportModelError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which gguf cannot dequantize "
                               "(upgrade gguf)") from None
    a = np.asarray(a, dtype=np.float32)
    if a.size != int(np.prod(shape, dtype=np.int64)):
        raise ImportModelError(f"{path}: tensor {t.name} holds {a.size} values, its shape says {list(shape)}")
    return np.array(a.reshape(shape), dtype=np.float32, copy=True)  # a writable copy, not the mapped file


class _GGUFMeta:
    """Metadata values of a GGUF file as Python values (strings, numbers, lists)."""

    def __init__(self, reader, gguf, path: Path):
        self._fields, self._types, self.path = reader.fields, gguf.GGUFValueType, path

    def __contains__(self, key):
        return key in self._fields

    def get(self, key, default=None):
        field = self._fields.get(key)
        if field is None or not field.types:
            return default
        vt = field.types[0]
        if vt == self._types.ARRAY:
            item_type = field.types[-1] if len(field.types) > 1 else None
            items = [field.parts[i] for i in field.data]
            if item_type == self._types.STRING:
                return [bytes(p).decode("utf-8", errors="replace") for p in items]
            return [self._scalar(p, item_type) for p in items]
        if vt == self._types.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        return self._scalar(field.parts[field.data[0]], vt)

    def _scalar(self, part, vt):
        value = part[0].item()
        if vt == self._types.FLOAT32:  # 1e-5 stored as float32 reads 9.99999974e-06: keep the short form
            value = float(str(np.float32(value)))
        return value

    def need(self, key):
        value = self.get(key)
        if value is None:
            raise ImportModelError(f"{self.path}: metadata {key} is missing")
        return value


def _gguf_config(meta: _GGUFMeta, tensors: dict, path: Path) -> PLTConfig:
    p = "llama."
    embd = meta.need(p + "embedding_length")
    heads = meta.need(p + "attention.head_count")
    kv_heads = meta.get(p + "attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ImportModelError(f"{path}: per-layer head counts are not supported")
    head_dim = meta.get(p + "attention.key_length",
                        embd // heads if isinstance(embd, int) and isinstance(heads, int) and heads > 0 else 0)

    def fail(key, why):
        raise ImportModelError(f"{path}: metadata {key} = {meta.get(key)!r}: {why}")

    if meta.get(p + "attention.value_length", head_dim) != head_dim:
        fail(p + "attention.value_length", f"must equal the key length ({head_dim})")
    if meta.get(p + "rope.dimension_count", head_dim) != head_dim:
        fail(p + "rope.dimension_count", f"pltkit rotates the whole head ({head_dim} dimensions)")
    if meta.get(p + "expert_count", 0):
        fail(p + "expert_count", "mixture-of-experts models are not supported")
    if "rope_freqs.weight" in tensors:
        raise ImportModelError(f"{path}: tensor rope_freqs.weight (per-frequency RoPE factors, as Llama 3.1 "
                               "stores its rope scaling) is not supported")
    rope_scaling = None
    kind = meta.get(p + "rope.scaling.type", "none")
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": meta.need(p + "rope.scaling.factor")}
    elif kind != "none":
        fail(p + "rope.scaling.type", "only linear rope scaling is supported")
    elif meta.get(p + "rope.scale_linear") not in (None, 1.0):
        rope_scaling = {"rope_type": "linear", "factor": meta.get(p + "rope.scale_linear")}

    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab = meta.get(p + "vocab_size") or len(tokens)
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    eos = [meta.get("tokenizer.ggml.eos_token_id")]
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):  # also end a generation
        if meta.get(key) is not None and meta.get(key) not in eos:
            eos.append(meta.get(key))
    eos = [i for i in eos if i is not None]

    def has(kind):
        return any(n.endswith(f".{kind}.bias") for n in tensors)

    fields = dict(
        vocab_size=vocab,
        hidden_size=embd,
        intermediate_size=meta.need(p + "feed_forward_length"),
        num_hidden_layers=meta.need(p + "block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=meta.get(p + "context_length", 2048),
        rms_norm_eps=meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get(p + "rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        attention_bias=any(has(k) for k in ("attn_q", "attn_k", "attn_v", "attn_output")),
        mlp_bias=any(has(k) for k in ("ffn_gate", "ffn_up", "ffn_down")),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        plt_num_loops=1,
    )
    try:
        cfg = PLTConfig(**fields)
    except ConfigError as e:
        key = GGUF_KEYS.get(e.field)
        raise ImportModelError(f"{path}: {f'metadata {p}{key}: ' if key else ''}{e}") from None
    layers = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if layers != set(range(cfg.num_hidden_layers)):
        raise ImportModelError(f"{path}: metadata {p}block_count = {cfg.num_hidden_layers}: the file has tensors "
                               f"for {len(layers)} layers (blk.{min(layers, default=0)} to blk.{max(layers, default=-1)})")
    return cfg


# PLTConfig field -> the llama.* metadata key it comes from, to name in errors
GGUF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
             "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
             "max_position_embeddings": "context_length", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
             "rope_theta": "rope.freq_base", "rope_scaling": "rope.scaling.factor"}


def _gguf_tokenizer(meta: _GGUFMeta, path: Path) -> tuple[int, dict]:
    """(the number of tokens, {file name: bytes or JSON object}): the tokenizer files rebuilt from a GGUF
    file's vocabulary, a byte-level BPE (tokenizer.ggml.model 'gpt2': tokenizer.json) or a SentencePiece
    one ('llama': tokenizer.model, pltkit.model.gguf_spm)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        from pltkit.model.gguf_spm import SentencePieceImportError, gguf_sentencepiece

        try:
            return gguf_sentencepiece(meta, path)
        except SentencePieceImportError as e:
            raise ImportModelError(str(e)) from None
    if kind != "gpt2":
        what = {None: "no tokenizer"}.get(kind, "a tokenizer")
        raise ImportModelError(f"{path}: tokenizer.ggml.model is {kind!r} ({what}); only 'gpt2' "
                               "(byte-level BPE) and 'llama' (SentencePiece) tokenizers are imported")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ImportModelError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ImportModelError(f"{path}: {len(tokens)} tokens but {len(types)} token types")

    vocab, duplicates = {}, []
    for i, token in enumerate(tokens):
        if token in vocab:
            duplicates.append(i)
        else:
            vocab[token] = i
    if duplicates:
        log.warning("%s: %d tokens repeat an earlier token's text and cannot be produced (ids %s...)",
                    path.name, len(duplicates), duplicates[:5])
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or " " in b:
            raise ImportModelError(f"{path}: merge {m!r} is not two tokens separated by one space")
        pairs.append((a, b))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        log.warning("%s: pre-tokenizer %r is approximated by GPT-2's byte-level split; text may tokenize "
                    "differently from llama.cpp (exact: %s)", path.name, pre, ", ".join(GGUF_PRE_TOKENIZERS))
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == 3, normalized=False)
             for i in range(len(tokens)) if types[i] in (3, 4) and vocab.get(tokens[i]) == i]
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    wrong = [t.content for t in added if tok.token_to_id(t.content) != vocab[t.content]]
    if wrong:
        raise ImportModelError(f"{path}: could not keep the ids of added tokens {wrong[:5]}")

    def name(key):
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    tcfg = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": {
            str(vocab[t.content]): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": t.special}
            for t in added},
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get("llama.context_length", 2048),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if meta.get("tokenizer.chat_template"):
        tcfg["chat_template"] = meta.get("tokenizer.chat_template")
    gen = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
    return tok.get_vocab_size(with_added_tokens=True), {
        "tokenizer.json": tok.to_str(pretty=True).encode(), "tokenizer_config.json": tcfg,
        "generation_config.json": gen}


# --- writing ----------------------------------------------------------------------------------------------
def _write_weights(out: Path, sizes: Iterable[tuple[str, int]], tensor: Callable[[str], torch.Tensor],
                   max_shard_bytes: int) -> None:
    """safetensors in the published layout, one shard in memory at a time: model.safetensors, or
    model-0000k-of-0000n.safetensors shards of at most max_shard_bytes plus the index."""
    shards, size = [[]], 0
    total = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    weight_map = {}
    with tqdm(total=total, desc="import", unit="B", unit_scale=True, disable=None) as bar:
        for k, names in enumerate(shards, 1):
            fname = SINGLE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for n in names:
                tensors[n] = tensor(n).contiguous()
                bar.update(tensors[n].nbytes)
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _atomic_output(out_dir: str | os.PathLike, write: Callable[[Path], None], force: bool) -> Path:
    """Run write(tmp) on a temporary sibling of out_dir (`.NAME.PID.XXXX.partial`), check it loads, then
    rename it to out_dir (an old out_dir is renamed aside meanwhile: pltkit.model.folders.replace_folder).
    On any failure (or an interrupt) the temporary folder is removed and out_dir is left as it was; after
    a kill, the next run removes the leftovers and puts an old out_dir back (repair_leftovers)."""
    out = Path(out_dir)
    repair_leftovers(out)
    if out.exists() and not out.is_dir():
        raise ImportModelError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ImportModelError(f"{out}: folder is not empty (--force replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    try:
        write(tmp)
        kill_point("written")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp and some writers make their output private to the owner
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~umask)
        try:
            open_checkpoint(tmp)
        except ValueError as e:
            raise ImportModelError(f"the imported checkpoint does not load: {str(e).replace(str(tmp), str(out))}") \
                from None
        kill_point("before-rename")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_model(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                 force: bool = False) -> Path:
    """Import a GGUF file or a Hugging Face Llama folder, whichever `src` is."""
    src = Path(src)
    if src.is_dir():
        return import_hf_llama(src, out_dir, dtype=dtype, force=force)
    if src.is_file():
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC or src.suffix == ".gguf":
            return import_gguf(src, out_dir, dtype=dtype or "float32", force=force)
        raise ImportModelError(f"{src}: neither a GGUF file nor a Hugging Face model folder")
    raise ImportModelError(f"{src}: no such file or folder")
