"""Open the model plt-serve serves: an engine over a backend, and how to describe it.

A checkpoint is exported once to an ONNX Runtime artifact in the user cache (keyed by its
files' names, sizes and times) and served from there, as plt-complete runs it (`open_fastest`): decode
is about 4x faster than the torch reference (docs/design.md), and the export takes seconds for
small models. `backend="torch"` serves the checkpoint directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pltkit.model.tokenizer import PLTTokenizer
from pltkit.runtime.artifact import Artifact, is_artifact
from pltkit.runtime.backends import open_fastest
from pltkit.runtime.chat import ChatTemplate
from pltkit.runtime.engine import Engine


@dataclass
class ServedModel:
    """What the loader returns: the engine and how to describe the model."""

    engine: Engine
    name: str
    details: dict
    chat: ChatTemplate | None = None  # None: the model has no chat template, no chat routes


def open_model(model: str = "default", backend: str | None = None, threads: int | None = None,
               cache_bytes: int = 256 << 20, verify: bool = True, max_slots: int = 64) -> ServedModel:
    """max_slots: the slots whose states the engine keeps (Engine's max_slots)."""
    runner, path = open_fastest(model, backend, threads, verify)
    engine = Engine(runner, PLTTokenizer.from_dir(path), cache_bytes=cache_bytes, max_slots=max_slots)
    cfg = engine.backend.config
    artifact = is_artifact(path)
    precision = Artifact.open(path, verify=False).manifest.get("precision", "fp32") if artifact else "fp32"
    name = str(model) if str(model) == "default" else Path(model).name
    details = {"format": "onnx" if artifact else "safetensors", "precision": precision, "backend": engine.backend.name,
               "loops": cfg.plt_num_loops, "n_ctx_train": cfg.max_position_embeddings, "n_vocab": cfg.vocab_size,
               "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
               "modified": int(max(f.stat().st_mtime for f in path.iterdir() if f.is_file()))}
    return ServedModel(engine, name, details, ChatTemplate.from_dir(path))
