"""Where a model named on the command line lives. No torch here: the runtime uses it too."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint folder that is missing or does not hold the model its config.json describes."""


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
        raise CheckpointError(f"{path}: not a model folder")
    return path
