"""ONNX Runtime backend: runs an artifact's prefill and decode graphs (no torch).

The global KV cache lives in buffers allocated once per state (grown by doubling), `pos`
entries valid. The GQA graphs and the kvbuffer graphs write into them in place: the
buffers are bound with IO binding as both `past_key.i` and `present_key.i`, so a step allocates
no cache. GQA writes only the new positions; the kvbuffer graphs' standard-op function body
rewrites the whole buffer (it is TensorRT's plugin that writes only the new positions there).
The function graphs (and an artifact of format 1's GQA prefill, which is the function graph)
take the valid part and their new entries are written back into the buffers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from pltkit.model.formats import float_type
from pltkit.runtime.artifact import Artifact, ArtifactError
from pltkit.runtime.backends import physical_cores

MIN_CAPACITY = 256
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclass
class OrtState:
    """The decode state with the global cache in buffers: numpy here; the TensorRT backend's
    subclass holds torch CUDA tensors (`new`, `copy` and `zeros` are the only array calls)."""
    pos: int  # valid positions in the global cache
    kv: dict[str, np.ndarray]  # key.i / value.i: [B, Hkv, capacity, Dh] buffers
    other: dict[str, np.ndarray]  # rings and carry, exactly as the graphs take them

    @staticmethod
    def new(shape, dtype: str):
        return np.zeros(shape, float_type(dtype).numpy)

    @staticmethod
    def copy(a):
        return a.copy()

    @staticmethod
    def zeros(like, shape):
        return np.zeros(shape, like.dtype)

    @classmethod
    def empty(cls, artifact: Artifact, batch: int) -> OrtState:
        """No tokens yet: zero caches of no capacity (reserve grows them), empty rings, zero carries."""
        state = artifact.manifest["state"]

        def size(d):
            return batch if d == "batch" else 0 if isinstance(d, str) else d
        arrays = {n: cls.new([size(d) for d in state["shapes"][n]], state.get("dtype", "float32"))
                  for n in state["names"]}
        kv = {n: a for n, a in arrays.items() if n.startswith(("key.", "value."))}
        return cls(0, kv, {n: a for n, a in arrays.items() if n not in kv})

    def clone(self) -> OrtState:
        return type(self)(self.pos, {k: self.copy(v) for k, v in self.kv.items()},
                          {k: self.copy(v) for k, v in self.other.items()})

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.kv.values(), *self.other.values()))

    def snapshot(self) -> dict:
        """What a prefix needs besides the global cache: rings and carries (small)."""
        return {k: self.copy(v) for k, v in self.other.items()}

    def rewind(self, pos: int, snapshot: dict) -> None:
        """Back to `pos` tokens; snapshot must have been taken at pos."""
        self.pos, self.other = pos, {k: self.copy(v) for k, v in snapshot.items()}

    def reserve(self, n: int, limit: int) -> None:
        """Make room for n positions (capacity doubles, up to limit)."""
        cap = next(iter(self.kv.values())).shape[2]
        if n <= cap:
            return
        new_cap = min(limit, max(n, 2 * cap, MIN_CAPACITY))
        for name, buf in self.kv.items():
            grown = self.zeros(buf, tuple(buf.shape[:2]) + (new_cap,) + tuple(buf.shape[3:]))
            grown[:, :, :self.pos] = buf[:, :, :self.pos]
            self.kv[name] = grown


def check_room(config, tokens: int) -> None:
    if tokens > config.max_position_embeddings:
        raise ValueError(f"context of {tokens} tokens exceeds the model's {config.max_position_embeddings}")


def auto_attention(artifact: Artifact, device: str = "cpu") -> str:
    """The graph set the backend runs by default: GroupQueryAttention's, the CPU fast path, where the
    artifact has it; else the LoopAttention function graphs."""
    return "gqa" if "gqa" in artifact.attention_variants and device == "cpu" else "function"


class OrtBackend:
    name = "ort"

    def __init__(self, artifact: Artifact, threads: int | None = None, attention: str = "auto",
                 device: str = "cpu"):
        """attention: 'gqa' (ONNX Runtime's GroupQueryAttention kernels, cache updated in place;
        a batched prefill runs the kvbuffer graph), 'function' (the LoopAttention function body,
        portable), 'kvbuffer' (the function body over cache buffers updated in place: TensorRT's
        graphs), or 'auto' (auto_attention)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise ArtifactError("running an artifact needs onnxruntime: pip install onnxruntime") from None
        self.ort, self.artifact, self.config = ort, artifact, artifact.config
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or physical_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        variants = artifact.attention_variants
        providers = PROVIDERS[device]
        if providers[0] not in ort.get_available_providers():
            raise ArtifactError(f"ONNX Runtime's {providers[0]} is not available: on a machine with an NVIDIA GPU, "
                                f"pip uninstall onnxruntime && pip install onnxruntime-gpu")
        if artifact.manifest["state"].get("dtype") == "bfloat16" and device == "cpu":
            raise ArtifactError(f"{artifact.path} is bfloat16, which ONNX Runtime's CPU provider cannot run: use "
                                f"--backend trt on a GPU, or onnx-reference (slow) on a CPU, or export float32 / "
                                f"float16 for the CPU")
        if attention == "auto":
            attention = auto_attention(artifact, device)
        self.attention, self.device = attention, device
        if self.attention not in variants:
            raise ArtifactError(f"{artifact.path} has no {self.attention!r} graphs (it has: {', '.join(variants)})")
        self._open = lambda phase, attention: ort.InferenceSession(str(artifact.graph_path(phase, attention)), so,
                                                                  providers=providers)
        self.sessions = {phase: self._open(phase, self.attention) for phase in ("prefill", "decode")}
        self._batched_prefill = None
        self._bound: dict[str, tuple] = {}  # phase -> (session, weak refs to the buffers, IO binding)
        self.outputs = {p: [o.name for o in s.get_outputs()] for p, s in self.sessions.items()}
        # graphs that take the cache buffers whole (`past_len` valid) and write into them
        self.in_place = {p: "past_len" in {i.name for i in s.get_inputs()} for p, s in self.sessions.items()}

    def new_state(self, batch: int = 1) -> OrtState:
        return OrtState.empty(self.artifact, batch)

    def _check_room(self, state: OrtState, n: int) -> None:
        check_room(self.config, state.pos + n)

    def _run_copying(self, phase: str, ids: np.ndarray, state: OrtState):
        """Run a graph that takes the valid cache and returns it extended."""
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        feed.update({"past_" + n: np.ascontiguousarray(b[:, :, :state.pos]) for n, b in state.kv.items()})
        feed.update({"past_" + n: a for n, a in state.other.items()})
        out = dict(zip(self.outputs[phase], self.sessions[phase].run(None, feed)))
        new_pos = out["present_key.0"].shape[2]
        state.reserve(new_pos, self.config.max_position_embeddings)
        for n, buf in state.kv.items():
            buf[:, :, state.pos:new_pos] = out["present_" + n][:, :, state.pos:]
        state.other = {n: out["present_" + n] for n in state.other}
        state.pos = new_pos
        return out["logits"], state

    def _session(self, phase: str, batch: int):
        """The phase's session; GroupQueryAttention takes a chunk after a past for batch 1 only, so
        a batched prefill runs the kvbuffer graph (same inputs and state, opened when first needed)."""
        if phase == "prefill" and batch > 1 and self.attention == "gqa":
            if self._batched_prefill is None:
                self._batched_prefill = self._open(phase, "kvbuffer")
            return self._batched_prefill
        return self.sessions[phase]

    def _binding(self, phase: str, session, state: OrtState):
        """An IO binding with the state's cache buffers bound as both past_* and present_* (shared
        memory), reused while the same buffers come back: binding them anew costs about 0.5 ms a
        step with 60 buffers. Only weak references are kept, so a state's memory is freed with it;
        a binding is reused only while every buffer it holds is alive and is the state's."""
        cached = self._bound.get(phase)
        if cached and cached[0] is session and len(cached[1]) == len(state.kv) and all(
                ref() is buf for ref, buf in zip(cached[1], state.kv.values())):
            return cached[2]
        io = session.io_binding()
        for n, buf in state.kv.items():
            value = self.ort.OrtValue.ortvalue_from_numpy(buf)  # shares the buffer's memory
            io.bind_ortvalue_input("past_" + n, value)
            io.bind_ortvalue_output("present_" + n, value)
        self._bound[phase] = (session, [weakref.ref(buf) for buf in state.kv.values()], io)
        return io

    def _run_in_place(self, phase: str, ids: np.ndarray, state: OrtState):
        new = ids.shape[1] if phase == "prefill" else 1
        state.reserve(state.pos + new, self.config.max_position_embeddings)
        session = self._session(phase, ids.shape[0])
        io = self._binding(phase, session, state)
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("past_len", np.array(state.pos, np.int64))
        fetched = ["logits", *("present_" + n for n in state.other)]
        for n, a in state.other.items():
            io.bind_cpu_input("past_" + n, a)
        for name in fetched:
            io.bind_output(name)
        session.run_with_iobinding(io)
        values = {name: v for name, v in zip([*("present_" + n for n in state.kv), *fetched], io.get_outputs())}
        out = {name: values[name].numpy() for name in fetched}
        state.other = {n: out["present_" + n] for n in state.other}
        state.pos += new
        return out["logits"], state

    def _run(self, phase: str, ids: np.ndarray, state: OrtState):
        self._check_room(state, ids.shape[1] if phase == "prefill" else 1)
        return (self._run_in_place if self.in_place[phase] else self._run_copying)(phase, ids, state)

    def prefill(self, ids: np.ndarray, state: OrtState) -> tuple[np.ndarray, OrtState]:
        return self._run("prefill", ids, state)

    def decode(self, ids: np.ndarray, state: OrtState) -> tuple[np.ndarray, OrtState]:
        return self._run("decode", ids, state)
