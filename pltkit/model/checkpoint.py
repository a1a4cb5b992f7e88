"""Checkpoint I/O in the published HF layout: config.json + safetensors (one file or
shards with model.safetensors.index.json). Only safetensors are read: no pickle.

Tensors are read one at a time from the memory-mapped files into a model built on
the meta device, so loading needs the model's size in RAM, not twice that.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from pltkit.model.config import PLTConfig
from pltkit.model.folders import write_file
from pltkit.model.formats import FLOAT_TYPES
from pltkit.model.paths import INDEX, SINGLE, CheckpointError, resolve_model_path
from pltkit.model.plt import PLTForCausalLM

log = logging.getLogger(__name__)

# what a runtime reads of a tokenizer: tokenizer.json, or a SentencePiece tokenizer.model with the slow
# tokenizer's files (never its tokenization_*.py: checkpoint code is not run)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
# safetensors dtype -> torch dtype of what loads as weights
STORED_DTYPES = {t.safetensors: t.torch() for t in FLOAT_TYPES.values()} | {"F64": torch.float64}
# safetensors dtype -> bytes per element (all the format defines; only STORED_DTYPES load as weights)
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 << 20  # what safetensors itself accepts


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tensor name -> (dtype, shape) from a safetensors file's header, checked the way safetensors
    checks it (and more) without reading any tensor: CheckpointError naming the file and tensor for a bad
    header length, a header that is not JSON, an unknown dtype, a shape that does not fit its bytes,
    offsets out of range or overlapping, or a truncated file."""
    size = file.stat().st_size

    def bad(why):
        raise CheckpointError(f"{file}: {why}")

    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            bad(f"not a safetensors file ({size} bytes, no header length)")
        n = struct.unpack("<Q", head)[0]
        if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
            bad(f"header length {n} does not fit a file of {size} bytes (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            bad(f"header is not JSON ({' '.join(str(e).split())})")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    if not isinstance(header.pop("__metadata__", None) or {}, dict):  # safetensors takes null too
        bad("header field '__metadata__' is not an object")
    data, end, out = size - 8 - n, 0, {}
    spans = []
    for name, info in header.items():
        where = f"tensor {name}"
        if not isinstance(info, dict):
            bad(f"{where}: not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ITEM_BYTES:
            bad(f"{where}: field 'dtype' = {dtype!r} is not a safetensors type")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_count(d) for d in shape)):
            bad(f"{where}: field 'shape' = {shape!r} is not a list of at most 8 sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            bad(f"{where}: field 'data_offsets' = {offsets!r} is not [begin, end]")
        if offsets[1] > data:
            bad(f"{where}: field 'data_offsets' = {offsets}: past the {data} data bytes of the file (truncated?)")
        if offsets[1] - offsets[0] != math.prod(shape) * ITEM_BYTES[dtype]:
            bad(f"{where}: field 'shape' = {shape} ({dtype}) needs {math.prod(shape) * ITEM_BYTES[dtype]} bytes, "
                f"'data_offsets' = {offsets} give {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = (dtype, tuple(shape))
    for begin, stop, name in sorted(spans):
        if begin != end:
            bad(f"tensor {name}: field 'data_offsets' = {[begin, stop]} " +
                ("overlaps the tensor before it" if begin < end else f"leaves a gap after byte {end}"))
        end = stop
    if end != data:
        bad(f"the tensors end at data byte {end}, the file has {data} (truncated or padded)")
    return out


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62


def read_index(ckpt: Path) -> dict[str, str]:
    """The weight_map of model.safetensors.index.json: tensor name -> shard file name."""
    try:
        index = json.loads((ckpt / INDEX).read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / INDEX}: not a safetensors index ({e})") from None
    if not isinstance(index, dict) or not all(isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
                                              for v in index.values()):
        raise CheckpointError(f"{ckpt / INDEX}: field 'weight_map' must map tensor names to file names beside it")
    return index


def weight_map(ckpt: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it."""
    if (ckpt / INDEX).is_file():
        index = read_index(ckpt)
        missing = sorted({f for f in index.values() if not (ckpt / f).is_file()})
        if missing:
            raise CheckpointError(f"{ckpt / INDEX} names shard files that do not exist: {', '.join(missing)}")
        return {name: ckpt / f for name, f in index.items()}
    if (ckpt / SINGLE).is_file():
        return dict.fromkeys(read_header(ckpt / SINGLE), ckpt / SINGLE)
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
    files = weight_map(ckpt)
    headers = {file: read_header(file) for file in sorted(set(files.values()))}
    stored = {name: headers[file][name] for name, file in files.items() if name in headers[file]}
    check_sizes(cfg, {name: shape for name, (_, shape) in stored.items()}, ckpt / "config.json")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in PLTForCausalLM(cfg).state_dict().items()}

    problems = []
    for name in sorted(set(files) - set(expected)):
        if not _ignored(name, cfg):
            problems.append(f"unexpected tensor {name}")
    for name in sorted(set(expected) - set(files)):
        problems.append(f"missing tensor {name}")
    for name in sorted(set(files) & set(expected)):
        if name not in stored:
            problems.append(f"tensor {name} is listed for {files[name].name} but not stored there")
            continue
        dtype, shape = stored[name]
        if shape != expected[name]:
            problems.append(f"tensor {name} has shape {list(shape)}, config.json implies {list(expected[name])}")
        if dtype not in STORED_DTYPES:
            problems.append(f"tensor {name} is stored as {dtype} in {files[name].name}, not a float type")
    if problems:
        shown = problems[:30] + ([f"... and {len(problems) - 30} more"] if len(problems) > 30 else [])
        raise CheckpointError(f"{ckpt} does not match its config.json:\n  " + "\n  ".join(shown))
    return cfg, {name: files[name] for name in expected}


def check_sizes(cfg: PLTConfig, shapes: dict[str, tuple[int, ...]], where) -> None:
    """CheckpointError naming num_hidden_layers when the stored tensors (name -> shape) hold another number of
    layers: checked before the model is built (on the meta device, but layer by layer), so that a count no
    stored tensor backs costs nothing. Widths cost nothing on the meta device: open_checkpoint compares them."""
    layers = {int(n.split(".")[2]) for n in shapes if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if layers != set(range(cfg.num_hidden_layers)):
        raise CheckpointError(f"{where}: field 'num_hidden_layers' = {cfg.num_hidden_layers}: the weights hold "
                              f"{len(layers)} layers (numbered {min(layers, default=0)} to {max(layers, default=-1)})")


def read_tensor(file: Path, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One tensor from a safetensors file (memory-mapped), converted to dtype."""
    try:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(name).to(dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: tensor {name}: {e}") from None


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
        for name in names:
            state[name] = read_tensor(file, name, dtype)
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
    state = model.state_dict()
    for stale in [out / SINGLE, out / INDEX, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    write_weights(out, [(name, t.numel() * (dtype or t.dtype).itemsize) for name, t in state.items()],
                  lambda name: (state[name].to(dtype) if dtype else state[name]).detach().clone(), max_shard_bytes)
    write_file(out / "config.json", model.config.to_json)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.is_file():
                write_file(out / name, lambda p: shutil.copyfile(src, p))
    return out


def write_weights(out: Path, sizes: Iterable[tuple[str, int]], tensor: Callable[[str], torch.Tensor],
                  max_shard_bytes: int | None = None, progress: str | None = None) -> None:
    """Write the tensors named in `sizes` (name, bytes) as safetensors in the published layout, one shard in
    memory at a time (tensor(name) gives each): model.safetensors, or model-0000k-of-0000n.safetensors shards
    of at most max_shard_bytes plus the index. `progress` names a progress bar (shown on a terminal)."""
    shards, size, total = [[]], 0, 0
    for name, nbytes in sizes:
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    weight_map = {}
    with tqdm(total=total, desc=progress, unit="B", unit_scale=True, disable=None if progress else True) as bar:
        for k, names in enumerate(shards, 1):
            fname = SINGLE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                tensors[name] = tensor(name).contiguous()
                bar.update(tensors[name].nbytes)
            write_file(out / fname, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(names, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_file(out / INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2) + "\n"))
