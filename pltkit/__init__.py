"""pltkit: a local runtime for Parallel Loop Transformer (PLT) code models.

The names below are imported on first use, so that running an exported artifact
(pltkit.runtime) never imports torch.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CheckpointError": "pltkit.model.paths", "resolve_model_path": "pltkit.model.paths",
    "load_model": "pltkit.model.checkpoint", "save_checkpoint": "pltkit.model.checkpoint",
    "ConfigError": "pltkit.model.config", "PLTConfig": "pltkit.model.config",
    "PLTForCausalLM": "pltkit.model.plt", "PLTState": "pltkit.model.plt",
    "PLTTokenizer": "pltkit.model.tokenizer",
}
__all__ = [*_LAZY, "load_tokenizer"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pltkit' has no attribute {name!r}")


def load_tokenizer(path="default"):
    """The tokenizer of a checkpoint or artifact folder (or of the default model)."""
    from pltkit.model.paths import resolve_model_path
    from pltkit.model.tokenizer import PLTTokenizer

    return PLTTokenizer.from_dir(resolve_model_path(path))
