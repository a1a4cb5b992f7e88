"""Open the model plt-serve serves: an engine over a backend, and how to describe it.

A checkpoint is exported once to an ONNX Runtime artifact in the user cache (keyed by the
checkpoint's sha256) and served from there: decode is about 4x faster than the torch
reference (docs/design.md), and the export takes seconds for small models. `backend="torch"`
serves the checkpoint directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pltkit.model.paths import resolve_model_path, user_cache_dir
from pltkit.model.tokenizer import PLTTokenizer
from pltkit.runtime.artifact import Artifact, is_artifact
from pltkit.runtime.backends import open_backend
from pltkit.runtime.engine import Engine
from pltkit.serve.app import Model

log = logging.getLogger(__name__)


def cached_artifact(checkpoint: Path) -> Path:
    """The float32 artifact of a checkpoint, exported on first use (atomically: an interrupted
    export leaves nothing behind)."""
    from pltkit.export.artifact import checkpoint_sha256, export

    out = user_cache_dir() / "artifacts" / f"{checkpoint.name}-{checkpoint_sha256(checkpoint)[:16]}-fp32"
    if not is_artifact(out):
        log.warning("exporting %s to %s for ONNX Runtime (once)", checkpoint, out)
        export(checkpoint, out, force=True)
    return out


def open_model(model: str = "default", backend: str | None = None, threads: int | None = None,
               cache_bytes: int = 256 << 20) -> Model:
    path = resolve_model_path(model)
    if not is_artifact(path) and backend != "torch":
        try:
            path = cached_artifact(path)
        except ImportError:  # no torch to export with: the torch backend says what is missing
            backend = None
    engine = Engine(open_backend(path, backend, threads), PLTTokenizer.from_dir(path), cache_bytes=cache_bytes)
    cfg = engine.backend.config
    artifact = is_artifact(path)
    precision = Artifact.open(path).manifest.get("precision", "fp32") if artifact else "fp32"
    name = str(model) if str(model) == "default" else Path(model).name
    details = {"format": "onnx" if artifact else "safetensors", "precision": precision, "backend": engine.backend.name,
               "loops": cfg.plt_num_loops, "n_ctx_train": cfg.max_position_embeddings, "n_vocab": cfg.vocab_size,
               "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}
    return Model(engine, name, details)
