"""Checkpoint I/O in the published HF layout: config.json + safetensors (one file or
shards with model.safetensors.index.json). Only safetensors are read: no pickle.

Tensors are read one at a time from the memory-mapped files into a model built on
the meta device, so loading needs the model's size in RAM, not twice that.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pltkit.model.config import PLTConfig
from pltkit.model.paths import INDEX, SINGLE, CheckpointError, resolve_model_path
from pltkit.model.plt import PLTForCausalLM

log = logging.getLogger(__name__)

# what a runtime reads of a tokenizer: tokenizer.json, or a SentencePiece tokenizer.model with the slow
# tokenizer's files (never its tokenization_*.py: checkpoint code is not run)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def weight_map(ckpt: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it."""
    if (ckpt / INDEX).is_file():
        try:
            index = json.loads((ckpt / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt / INDEX}: not a safetensors index ({e})") from None
        missing = sorted({f for f in index.values() if not (ckpt / f).is_file()})
        if missing:
            raise CheckpointError(f"{ckpt / INDEX} names shard files that do not exist: {', '.join(missing)}")
        return {name: ckpt / f for name, f in index.items()}
    if (ckpt / SINGLE).is_file():
        with safe_open(ckpt / SINGLE, framework="pt") as f:
            return {name: ckpt / SINGLE for name in f.keys()}
    raise CheckpointError(f"{ckpt}: no {SINGLE} or {INDEX} (only safetensors weights are loaded)")


def _ignored(name: str, cfg: PLTConfig) -> bool:
    """Loop gates of a looped checkpoint run with plt_num_loops = 1 are not used."""
    return cfg.plt_num_loops == 1 and ".self_attn.plt_gate." in name


def open_checkpoint(path: str | os.PathLike = "default") -> tuple[PLTConfig, dict[str, Path]]:
    """Validate a checkpoint folder against its config.json without reading any weights:
    returns the config and a map tensor name -> file. Every problem (missing, unexpected,
    mis-shaped or non-float tensors) is reported by name in one CheckpointError."""
    ckpt = resolve_model_path(path)
    cfg = PLTConfig.from_json(ckpt / "config.json")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in PLTForCausalLM(cfg).state_dict().items()}
    files = weight_map(ckpt)

    problems, by_file = [], {}
    for name in sorted(set(files) - set(expected)):
        if not _ignored(name, cfg):
            problems.append(f"unexpected tensor {name}")
    for name in sorted(set(expected) - set(files)):
        problems.append(f"missing tensor {name}")
    for name in sorted(set(files) & set(expected)):
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    problems.append(f"tensor {name} is listed for {file.name} but not stored there")
                    continue
                sl = f.get_slice(name)
                shape, stored = tuple(sl.get_shape()), sl.get_dtype()
                if shape != expected[name]:
                    problems.append(f"tensor {name} has shape {list(shape)}, config.json implies "
                                    f"{list(expected[name])}")
                if stored not in STORED_DTYPES:
                    problems.append(f"tensor {name} is stored as {stored}, not a float type")
    if problems:
        shown = problems[:30] + ([f"... and {len(problems) - 30} more"] if len(problems) > 30 else [])
        raise CheckpointError(f"{ckpt} does not match its config.json:\n  " + "\n  ".join(shown))
    return cfg, {name: files[name] for name in expected}


def read_tensor(file: Path, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One tensor from a safetensors file (memory-mapped), converted to dtype."""
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name).to(dtype)


def load_model(path: str | os.PathLike = "default", dtype: torch.dtype = torch.float32) -> PLTForCausalLM:
    """Load a PLT checkpoint folder (or `default`) as a PLTForCausalLM in eval mode. The model is
    built on the meta device and takes the tensors read one by one, so loading needs about the
    model's size in memory."""
    cfg, files = open_checkpoint(path)
    with torch.device("meta"):
        model = PLTForCausalLM(cfg)
    by_file = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    state = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                state[name] = f.get_tensor(name).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    log.info("loaded %s: %d tensors, %.1fM parameters", path, len(state),
             sum(t.numel() for t in state.values()) / 1e6)
    return model.eval()


def save_checkpoint(model: PLTForCausalLM, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    max_shard_bytes: int | None = None, tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write config.json and safetensors (sharded above max_shard_bytes) in the published
    layout; copy the tokenizer files from `tokenizer_from` when given. Each file is written
    under a temporary name and renamed, so an interrupted save leaves no partial file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous().clone()
               for k, v in model.state_dict().items()}
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for stale in [out / SINGLE, out / INDEX, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _write(out / SINGLE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    else:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {}}
        for i, names in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write(out / fname, lambda p: save_file({n: tensors[n] for n in names}, p, metadata={"format": "pt"}))
            index["weight_map"].update({n: fname for n in names})
        _write(out / INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2) + "\n"))
    _write(out / "config.json", model.config.to_json)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.is_file():
                _write(out / name, lambda p: shutil.copyfile(src, p))
    return out


def _write(path: Path, writer) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        writer(str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create files private to the owner
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
