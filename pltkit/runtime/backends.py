"""One small backend interface (Backend, State), and a registry of backends (BACKENDS).

A backend runs a PLT model as two calls, both returning numpy logits:
  prefill(ids [B, S], state) -> (logits [B, S, V], state)   loops one after another
  decode(ids [B], state)     -> (logits [B, V], state)      the L loops as L rows of one pass
and `new_state(batch)`. Every backend is opened the same way, open_backend(model, backend,
threads, verify), through its entry in BACKENDS. Backends with optional dependencies import
them inside, so `pltkit.runtime` needs only numpy, onnx, onnxruntime and tokenizers.
"""

from __future__ import annotations

import importlib
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pltkit.model.config import PLTConfig
from pltkit.model.paths import checkpoint_stamp, resolve_model_path, user_cache_dir
from pltkit.runtime.artifact import Artifact, is_artifact

log = logging.getLogger(__name__)


@runtime_checkable
class State(Protocol):
    """A backend's decode state: the tokens so far, as the completion engine keeps and reuses it."""
    pos: int  # tokens already in the state

    def clone(self) -> State:
        """An independent copy (a cached prefix)."""

    def nbytes(self) -> int:
        """Bytes it holds (the engine's cache budget)."""

    def snapshot(self) -> Any:
        """What rewinding to this position needs besides the global cache (rings and carries)."""

    def rewind(self, pos: int, snapshot: Any) -> None:
        """Back to `pos` tokens; snapshot must have been taken at pos."""


@runtime_checkable
class Backend(Protocol):
    """What the completion engine, generate, the evaluator and the benchmarks call."""
    name: str  # shown to users (plt-complete, plt-serve)
    config: PLTConfig

    def new_state(self, batch: int = 1) -> State:
        """No tokens yet, for `batch` sequences."""

    def prefill(self, ids: np.ndarray, state: State, last: bool = False) -> tuple[np.ndarray, State]:
        """ids [B, S] after the state -> logits [B, S, V] and the state moved on by S. last: only the last
        position's logits are wanted (a backend that can skip the others returns [B, 1, V])."""

    def decode(self, ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """ids [B], one token per sequence -> logits [B, V] and the state moved on by 1."""


def physical_cores() -> int:
    """Physical cores available to this process (ONNX Runtime runs best on one thread each)."""
    try:
        cores, core = set(), {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                core[key.strip()] = value.strip()
                if not line.strip():
                    if "core id" in core and int(core["processor"]) in os.sched_getaffinity(0):
                        cores.add((core.get("physical id"), core["core id"]))
                    core = {}
        return max(1, len(cores)) if cores else len(os.sched_getaffinity(0))
    except (OSError, ValueError, AttributeError):
        return os.cpu_count() or 1


def _torch(path: Path, threads: int | None, verify: bool) -> Backend:
    """verify is not used: a checkpoint has no manifest to check its files against."""
    try:
        from pltkit.runtime.torch_backend import TorchBackend
    except ImportError as e:
        raise ValueError(f"{path} is a checkpoint: running it needs PyTorch ({e.name} is not installed): "
                         f"pip install 'pltkit[torch]', or run an artifact exported with plt-export") from None
    return TorchBackend(path, threads)


def _ort(path: Path, threads: int | None, verify: bool, device: str = "cpu") -> Backend:
    from pltkit.runtime.ort_backend import OrtBackend
    return OrtBackend(Artifact.open(path, verify), threads, device=device)


def _onnx_reference(path: Path, threads: int | None, verify: bool) -> Backend:
    from pltkit.runtime.onnx_reference import ReferenceBackend
    return ReferenceBackend(Artifact.open(path, verify), threads)


# name -> opener(path, threads, verify) -> Backend. threads: the backend's CPU threads (None: one per
# physical core; each backend's __init__ says which threads); verify: check an artifact's files
# against its manifest first. An opener of a layer
# above this one (pltkit.gpu) is named as "module:function" and imported when asked for, as a plugin
# is: the runtime never imports it.
BACKENDS = {"torch": _torch, "ort": _ort, "ort-cuda": partial(_ort, device="cuda"),
            "trt": "pltkit.gpu.trt_backend:open_trt", "onnx-reference": _onnx_reference}


def _opener(kind: str):
    opener = BACKENDS[kind]
    if isinstance(opener, str):
        module, name = opener.split(":")
        opener = getattr(importlib.import_module(module), name)
    return opener


def open_backend(model: str | os.PathLike = "default", backend: str | None = None, threads: int | None = None,
                 verify: bool = True) -> Backend:
    """A checkpoint folder runs on the torch reference, an artifact folder on ONNX Runtime, its files
    checked against its manifest first unless verify is False (Artifact.verify)."""
    path = resolve_model_path(model)
    kind = backend or ("ort" if is_artifact(path) else "torch")
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r} (known: {', '.join(BACKENDS)})")
    if kind == "torch" and is_artifact(path):
        raise ValueError(f"{path} is an exported artifact: run it with --backend ort")
    if kind != "torch" and not is_artifact(path):
        raise ValueError(f"{path} is a checkpoint, not an exported artifact: export it with plt-export first")
    return _opener(kind)(path, threads, verify)


def cached_artifact(checkpoint: Path) -> Path:
    """The float32 artifact of a checkpoint in the user cache, keyed by its files' names, sizes and
    times (hashing a 7B checkpoint's bytes would cost seconds on every run) and by the exporter's code
    (pltkit.export.export_stamp: a new pltkit writes its own graphs), exported on first use
    (atomically: an interrupted export leaves nothing behind). Exporting needs torch (ImportError
    without it); finding an earlier export does not. An earlier export that does not open or
    verify (files missing or damaged, manifest unreadable) is exported again: the cache heals itself,
    whatever --no-verify says of the model the user named."""
    from pltkit.runtime.artifact import ArtifactError

    from pltkit.export import export_stamp  # the exporter's own code: an upgrade exports anew

    stamp = f"{checkpoint_stamp(checkpoint)[:16]}-{export_stamp()}"
    out = user_cache_dir() / "artifacts" / f"{checkpoint.name}-{stamp}-fp32"
    try:
        Artifact.open(out)
    except ArtifactError as e:
        if is_artifact(out):  # damaged, e.g. by a kill before this version's atomic replacement: rebuild it
            log.warning("%s; exporting it again", e)
        from pltkit.export.artifact import export

        # a rough estimate: 5 s plus 15 s a GB of weights (the default model, 8 MB, took 4-5 s on 2 cores;
        # docs/design.md: 52 s for 1.75 B parameters)
        size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        log.warning("exporting %s to %s for ONNX Runtime (once, ~%.0f s)", checkpoint.name, out, 5 + 15 * size / 1e9)
        export(checkpoint, out, force=True)
    return out


def open_fastest(model: str | os.PathLike = "default", backend: str | None = None, threads: int | None = None,
                 verify: bool = True):
    """(backend, folder it runs from) for plt-complete and plt-serve: an artifact on `backend`
    (default: ort); a checkpoint on torch when asked, else through its cached artifact (about 4x
    faster than torch: docs/design.md). Without torch to export with, the torch backend says what
    is missing."""
    path = resolve_model_path(model)
    if not is_artifact(path) and backend != "torch":
        try:
            path = cached_artifact(path)
        except ImportError:
            backend = None
    return open_backend(path, backend, threads, verify), path
