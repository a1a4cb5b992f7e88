"""Where a model named on the command line lives. No torch here: the runtime uses it too."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

GGUF_MAGIC = b"GGUF"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing or does not hold the model its config.json describes."""


class ImportModelError(ValueError):
    """A source that cannot be imported (plt-import); the message says what and, for config fields, which."""


def user_cache_dir() -> Path:
    """pltkit's folder in the user cache ($XDG_CACHE_HOME, else ~/.cache): exported artifacts,
    benchmark models."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pltkit"


def default_model_path() -> Path:
    return Path(str(resources.files("pltkit") / "models" / "default"))


def resolve_model_path(path: str | os.PathLike) -> Path:
    """`default` names the model shipped inside the package; anything else is a folder."""
    if str(path) == "default":
        path = default_model_path()
        if not (path / "config.json").is_file():
            raise CheckpointError("the default model is missing from this pltkit installation")
        return path
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model folder{_what_it_is(path)}")
    return path


def _what_it_is(path: Path) -> str:
    if not path.exists():
        return " (it does not exist)"
    try:
        if is_gguf(path):
            return f" but a GGUF file: run `plt-import {path}` first and pass the folder it writes"
    except OSError as e:
        return f" but a file ({e.strerror})"
    return " but a file"


def is_gguf(path: Path) -> bool:
    """A llama.cpp GGUF file, by name or by its first 4 bytes (OSError if it cannot be read)."""
    if path.suffix == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def checkpoint_files(ckpt: Path) -> list[Path]:
    """config.json and the weight files (model.safetensors, or the shards its index names), in
    name order: the files that identify a checkpoint's exported artifacts."""
    weights = [SINGLE]
    if (ckpt / INDEX).is_file():
        try:
            weights = json.loads((ckpt / INDEX).read_text())["weight_map"].values()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{ckpt / INDEX}: not a safetensors index ({e})") from None
    return sorted({ckpt / "config.json", *(ckpt / w for w in weights)})


def checkpoint_sha256(ckpt: Path) -> str:
    """One digest over the checkpoint's files (reads every byte: seconds for a GB)."""
    h = hashlib.sha256()
    for f in checkpoint_files(ckpt):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def checkpoint_stamp(ckpt: Path) -> str:
    """A digest of the checkpoint files' names, sizes and modification times: it changes whenever
    a file is rewritten, and costs one stat a file (a cache key checked on every run)."""
    h = hashlib.sha256()
    for f in checkpoint_files(ckpt):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


PROGRESS_BYTES = 256 << 20  # files this large show a progress bar (on a terminal) while they are hashed


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 4 MiB blocks."""
    size = path.stat().st_size
    h, buf = hashlib.sha256(), bytearray(1 << 22)
    view, bar = memoryview(buf), None
    if size >= PROGRESS_BYTES:
        from tqdm import tqdm
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", leave=False, disable=None)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if bar is not None:
                bar.update(n)
    if bar is not None:
        bar.close()
    return h.hexdigest()
