"""The PyTorch reference as a backend (imports torch)."""

from __future__ import annotations

import numpy as np
import torch

from pltkit.model.checkpoint import load_model
from pltkit.model.plt import PLTState
from pltkit.runtime.backends import physical_cores


class TorchBackend:
    name = "torch"

    def __init__(self, path, threads: int | None = None):
        """threads: torch's intra-op threads, for the whole process (default: one per physical core)."""
        torch.set_num_threads(threads or physical_cores())
        self.model = load_model(path)
        self.config = self.model.config

    def new_state(self, batch: int = 1) -> PLTState:
        return self.model.new_state(batch)

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray, state: PLTState, last: bool = False) -> tuple[np.ndarray, PLTState]:
        logits, state = self.model.prefill(torch.from_numpy(np.asarray(ids, np.int64)), state)
        return logits.float().numpy(), state

    @torch.inference_mode()
    def decode(self, ids: np.ndarray, state: PLTState) -> tuple[np.ndarray, PLTState]:
        logits, state = self.model.decode(torch.from_numpy(np.asarray(ids, np.int64)), state)
        return logits.float().numpy(), state
