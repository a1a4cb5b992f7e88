"""ONNX Runtime backend: runs an artifact's prefill and decode graphs (no torch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pltkit.runtime.artifact import Artifact, ArtifactError
from pltkit.runtime.backends import physical_cores

log = logging.getLogger(__name__)


@dataclass
class OrtState:
    tensors: dict[str, np.ndarray]  # name -> array, in the manifest's state order

    @property
    def pos(self) -> int:
        return self.tensors["key.0"].shape[2]

    def clone(self) -> OrtState:
        return OrtState({k: v.copy() for k, v in self.tensors.items()})


class OrtBackend:
    name = "ort"

    def __init__(self, artifact: Artifact, threads: int | None = None, attention: str = "auto"):
        """attention: 'gqa' (ONNX Runtime's GroupQueryAttention kernels), 'function' (the
        LoopAttention function body, portable), or 'auto' (gqa when the artifact has it)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise ArtifactError("running an artifact needs onnxruntime: pip install onnxruntime") from None
        self.artifact, self.config = artifact, artifact.config
        m = artifact.manifest
        self.state_names, self.state_shapes = m["state"]["names"], m["state"]["shapes"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or physical_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        variants = artifact.attention_variants
        self.attention = ("gqa" if "gqa" in variants else "function") if attention == "auto" else attention
        if self.attention not in variants:
            raise ArtifactError(f"{artifact.path} has no {self.attention!r} graphs (it has: {', '.join(variants)})")
        providers = ["CPUExecutionProvider"]
        self.sessions = {phase: ort.InferenceSession(str(artifact.graph_path(phase, self.attention)), so,
                                                     providers=providers)
                         for phase in ("prefill", "decode")}
        self.outputs = {p: [o.name for o in s.get_outputs()] for p, s in self.sessions.items()}

    def new_state(self, batch: int = 1) -> OrtState:
        def size(d):
            return batch if d == "batch" else 0 if isinstance(d, str) else d
        return OrtState({n: np.zeros([size(d) for d in self.state_shapes[n]], np.float32)
                         for n in self.state_names})

    def _run(self, phase: str, ids: np.ndarray, state: OrtState):
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        feed.update({"past_" + n: v for n, v in state.tensors.items()})
        out = dict(zip(self.outputs[phase], self.sessions[phase].run(None, feed)))
        return out["logits"], OrtState({n: out["present_" + n] for n in self.state_names})

    def prefill(self, ids: np.ndarray, state: OrtState) -> tuple[np.ndarray, OrtState]:
        if state.pos + ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"context of {state.pos + ids.shape[1]} tokens exceeds the model's "
                             f"{self.config.max_position_embeddings}")
        return self._run("prefill", ids, state)

    def decode(self, ids: np.ndarray, state: OrtState) -> tuple[np.ndarray, OrtState]:
        if state.pos + 1 > self.config.max_position_embeddings:
            raise ValueError(f"context exceeds the model's {self.config.max_position_embeddings} tokens")
        return self._run("decode", ids, state)
