"""pltkit: a local runtime for Parallel Loop Transformer (PLT) code models."""

from pltkit.model.checkpoint import CheckpointError, load_model, resolve_model_path, save_checkpoint
from pltkit.model.config import ConfigError, PLTConfig
from pltkit.model.plt import PLTForCausalLM, PLTState
from pltkit.model.tokenizer import PLTTokenizer


def load_tokenizer(path="default") -> PLTTokenizer:
    """The tokenizer of a checkpoint folder (or of the default model)."""
    return PLTTokenizer.from_dir(resolve_model_path(path))


__all__ = ["CheckpointError", "ConfigError", "PLTConfig", "PLTForCausalLM", "PLTState", "PLTTokenizer",
           "load_model", "load_tokenizer", "save_checkpoint"]
__version__ = "0.1.0"
