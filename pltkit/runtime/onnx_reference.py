"""A backend on ONNX's reference evaluator (onnx.reference): an artifact's kvbuffer graphs in
numpy, every op rounded to the artifact's float type. About 1 s per 512-token chunk of the
default model, so it is for accuracy checks of what no CPU provider runs (bfloat16 artifacts):
`plt-eval ARTIFACT --backend onnx-reference`."""

from __future__ import annotations

import numpy as np

from pltkit.runtime.artifact import Artifact
from pltkit.runtime.buffer_state import BufferState

GRAPHS = "kvbuffer"


class ReferenceBackend:
    name = "onnx-reference"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        """threads is not used, and cannot be: the evaluator runs one node after another on the
        calling thread, each in numpy, and only numpy's matrix products use more threads, those of
        its BLAS library, sized once when numpy is first imported (OPENBLAS_NUM_THREADS or
        OMP_NUM_THREADS in the environment); numpy has no call that changes them afterwards."""
        from onnx.reference import ReferenceEvaluator

        self.artifact, self.config = artifact, artifact.config
        self.sessions = {p: ReferenceEvaluator(str(artifact.graph_path(p, GRAPHS))) for p in ("prefill", "decode")}

    def new_state(self, batch: int = 1) -> BufferState:
        return BufferState.empty(self.artifact, batch)

    def _run(self, phase: str, ids: np.ndarray, state: BufferState):
        new = ids.shape[1] if phase == "prefill" else 1
        state.reserve(state.pos + new, self.config.max_position_embeddings)
        session = self.sessions[phase]
        feed = {"input_ids": np.ascontiguousarray(ids, np.int64), "past_len": np.array(state.pos, np.int64),
                **{"past_" + n: a for n, a in (*state.kv.items(), *state.other.items())}}
        out = dict(zip(session.output_names, session.run(None, feed)))
        state.kv = {n: out["present_" + n] for n in state.kv}  # the kv buffers after the write
        state.other = {n: out["present_" + n] for n in state.other}
        state.pos += new
        return out["logits"], state

    def prefill(self, ids: np.ndarray, state: BufferState, last: bool = False):
        return self._run("prefill", ids, state)

    def decode(self, ids: np.ndarray, state: BufferState):
        return self._run("decode", ids, state)
