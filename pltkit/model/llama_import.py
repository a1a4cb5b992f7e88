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

The sources are read by pltkit.model.hf_llama, and by gguf_file (the file), gguf_llama (the model),
gguf_tokenizer and gguf_spm (the tokenizer). The output is written into a temporary sibling folder,
checked with `open_checkpoint` and renamed at the end (pltkit.model.folders.staged_folder), so a failed
or interrupted import leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from pltkit.model.checkpoint import STORED_DTYPES, TOKENIZER_FILES, open_checkpoint, write_weights
from pltkit.model.config import PLTConfig
from pltkit.model.folders import kill_point, staged_folder
from pltkit.model.formats import FLOAT_TYPES, float_type
from pltkit.model.gguf_file import GGUFMeta, dequantize, gguf_package, open_gguf
from pltkit.model.gguf_llama import gguf_config, hf_tensors, unpermute_rotary
from pltkit.model.gguf_spm import gguf_sentencepiece
from pltkit.model.gguf_tokenizer import gguf_bpe
from pltkit.model.hf_llama import HF_ARCHITECTURE, hf_llama_config, hf_weights, read_hf_config
from pltkit.model.paths import ImportModelError, is_gguf

__all__ = ["ImportModelError", "hf_llama_config", "import_gguf", "import_hf_llama", "import_model", "unpermute_rotary"]

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 2 << 30
GGUF_TOKENIZERS = {"gpt2": gguf_bpe, "llama": gguf_sentencepiece}  # tokenizer.ggml.model -> its rebuild


def import_model(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                 force: bool = False) -> Path:
    """Import a GGUF file or a Hugging Face Llama folder, whichever `src` is."""
    src = Path(src)
    if src.is_dir():
        return import_hf_llama(src, out_dir, dtype=dtype, force=force)
    if src.is_file():
        if is_gguf(src):
            return import_gguf(src, out_dir, dtype=dtype or "float32", force=force)
        raise ImportModelError(f"{src}: neither a GGUF file nor a Hugging Face model folder")
    raise ImportModelError(f"{src}: no such file or folder")


def import_hf_llama(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                    force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Import a Hugging Face `LlamaForCausalLM` folder as a PLT checkpoint with one loop.

    Weights keep their stored dtype unless `dtype` ("float32", "float16", "bfloat16") is given.
    Returns the output folder."""
    src = Path(src_dir)
    target = _torch_dtype(dtype) if dtype is not None else None
    cfg = read_hf_config(src)
    if not any((src / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise ImportModelError(f"{src}: no tokenizer.json or SentencePiece tokenizer.model")
    plan = hf_weights(src, cfg)
    files = {name: file for name, _, _, file in plan}
    sizes = [(name, math.prod(shape) * (target or STORED_DTYPES[stored]).itemsize) for name, stored, shape, _ in plan]

    def tensor(name):
        with safe_open(files[name], framework="pt") as f:
            t = f.get_tensor(name)
        return t.to(target) if target else t

    source = {"format": "huggingface", "architecture": HF_ARCHITECTURE, "name": src.resolve().name}
    cfg = cfg.replace(extra={**cfg.extra, "pltkit_import": source})
    tokenizer = {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()}
    return _write_checkpoint(out_dir, force, cfg, sizes, tensor, max_shard_bytes, tokenizer)


def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Import a llama.cpp GGUF file of architecture `llama` (gpt2 or llama/SentencePiece tokenizer) as a PLT
    checkpoint with one loop. Tensors are dequantized to float32 and stored as `dtype`."""
    gguf = gguf_package()
    target = _torch_dtype(dtype)
    path = Path(path)
    reader, meta = open_gguf(path, gguf)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ImportModelError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are imported")
    tensors = {t.name: t for t in reader.tensors}
    cfg = gguf_config(meta, tensors, path)
    n_tokens, tok_files = _gguf_tokenizer(meta, path)
    if n_tokens > cfg.vocab_size:
        raise ImportModelError(f"{path}: the tokenizer has {n_tokens} tokens, the model {cfg.vocab_size} embeddings")
    plan = {hf_name: (t, permute) for hf_name, t, permute in hf_tensors(tensors, cfg, path)}
    if cfg.tie_word_embeddings:
        log.info("%s: no output.weight, so the output layer is the token embedding (tied)", path.name)

    def tensor(hf_name):
        t, permute = plan[hf_name]
        a = dequantize(gguf, t, path)
        if permute:
            a = unpermute_rotary(a, permute)
        return torch.from_numpy(a).to(target)

    sizes = [(hf_name, int(t.n_elements) * target.itemsize) for hf_name, (t, _) in plan.items()]
    source = {"format": "gguf", "architecture": "llama", "name": path.name,
              "file_type": meta.get("general.file_type")}
    cfg = cfg.replace(extra={**cfg.extra, "torch_dtype": dtype, "pltkit_import": source})
    return _write_checkpoint(out_dir, force, cfg, sizes, tensor, max_shard_bytes, tok_files)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in FLOAT_TYPES:
        raise ImportModelError(f"dtype {dtype!r}: choose one of {', '.join(FLOAT_TYPES)}")
    return float_type(dtype).torch()


def _gguf_tokenizer(meta: GGUFMeta, path: Path) -> tuple[int, dict]:
    """(the number of tokens, {file name: bytes or JSON object}): the tokenizer files rebuilt from the file's
    vocabulary by the rebuild of its kind (GGUF_TOKENIZERS)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in GGUF_TOKENIZERS:
        what = {None: "no tokenizer"}.get(kind, "a tokenizer")
        raise ImportModelError(f"{path}: tokenizer.ggml.model is {kind!r} ({what}); only 'gpt2' "
                               "(byte-level BPE) and 'llama' (SentencePiece) tokenizers are imported")
    return GGUF_TOKENIZERS[kind](meta, path)


def _write_checkpoint(out_dir: str | os.PathLike, force: bool, cfg: PLTConfig, sizes: list[tuple[str, int]],
                      tensor: Callable[[str], torch.Tensor], max_shard_bytes: int, tokenizer: dict) -> Path:
    """Write the checkpoint (weights, config.json, the tokenizer files: name -> a file to copy, bytes or a JSON
    object) into a temporary sibling of out_dir, check it loads, then put it in place of out_dir. On any
    failure or interrupt out_dir is left as it was; after a kill, the next run cleans up."""
    out = Path(out_dir)
    with staged_folder(out, check=lambda out: _check_output(out, force)) as tmp:
        write_weights(tmp, sizes, tensor, max_shard_bytes, progress="import")
        cfg.to_json(tmp / "config.json")
        for name, content in tokenizer.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            elif isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        kill_point("written")
        try:
            open_checkpoint(tmp)
        except ValueError as e:
            raise ImportModelError(f"the imported checkpoint does not load: {str(e).replace(str(tmp), str(out))}") \
                from None
    return out


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ImportModelError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ImportModelError(f"{out}: folder is not empty (--force replaces it)")
