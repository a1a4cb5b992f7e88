"""ONNX Runtime backend: runs an artifact's prefill and decode graphs (no torch).

The state is a BufferState: the global KV cache in buffers, `pos` entries valid. The GQA
graphs and the kvbuffer graphs take the cache as a kv buffer (an input `past_len`): the
buffers are bound with IO binding as both `past_key.i` and `present_key.i`, so a step allocates
no cache. GQA writes only the new positions; the kvbuffer graphs' standard-op function body
rewrites the whole buffer (it is TensorRT's plugin that writes only the new positions there).
The function graphs (and an artifact of format 1's GQA prefill, which is the function graph)
take the valid part and their new entries are written back into the buffers.
"""

from __future__ import annotations

import logging
import os
import weakref

import numpy as np

from pltkit.runtime import kernels as kernels_mod
from pltkit.runtime.artifact import Artifact, ArtifactError
from pltkit.runtime.backends import physical_cores
from pltkit.runtime.buffer_state import BufferState, aligned

log = logging.getLogger(__name__)
KERNEL_CHOICES = ("auto", "pltkit", "ort")
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def auto_attention(artifact: Artifact, device: str = "cpu") -> str:
    """The graph set the backend runs by default: GroupQueryAttention's, the CPU fast path, where the
    artifact has it; else the LoopAttention function graphs."""
    return "gqa" if "gqa" in artifact.attention_variants and device == "cpu" else "function"


class OrtBackend:
    name = "ort"

    def __init__(self, artifact: Artifact, threads: int | None = None, attention: str = "auto",
                 device: str = "cpu", kernels: str | None = None):
        """threads: ONNX Runtime's intra-op threads (default: one per physical core).
        attention: 'gqa' (ONNX Runtime's GroupQueryAttention kernels over a kv buffer; a batched
        prefill runs the kvbuffer graph), 'function' (the LoopAttention function body, portable),
        'kvbuffer' (the function body over a kv buffer: TensorRT's graphs), or 'auto' (auto_attention).
        kernels: where pltkit's own kernels (pltkit.runtime.kernels) run the decode graphs' matrix products:
        'auto' (where it builds and this CPU runs it), 'pltkit' (an error where it cannot), 'ort' (never);
        default: $PLTKIT_KERNELS, else 'auto'."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise ArtifactError("running an artifact needs onnxruntime: pip install onnxruntime") from None
        self.ort, self.artifact, self.config = ort, artifact, artifact.config
        self.threads = threads or physical_cores()
        variants = artifact.attention_variants
        self.providers = PROVIDERS[device]
        if self.providers[0] not in ort.get_available_providers():
            raise ArtifactError(f"ONNX Runtime's {self.providers[0]} is not available: on a machine with an NVIDIA "
                                f"GPU, pip uninstall onnxruntime && pip install onnxruntime-gpu")
        if artifact.manifest["state"].get("dtype") == "bfloat16" and device == "cpu":
            raise ArtifactError(f"{artifact.path} is bfloat16, which ONNX Runtime's CPU provider cannot run: use "
                                f"--backend trt on a GPU, or onnx-reference (slow) on a CPU, or export float32 / "
                                f"float16 for the CPU")
        if attention == "auto":
            attention = auto_attention(artifact, device)
        self.attention, self.device = attention, device
        if self.attention not in variants:
            raise ArtifactError(f"{artifact.path} has no {self.attention!r} graphs (it has: {', '.join(variants)})")
        self.kernel_choice = kernels or os.environ.get("PLTKIT_KERNELS") or "auto"
        if self.kernel_choice not in KERNEL_CHOICES:
            raise ArtifactError(f"unknown kernels {self.kernel_choice!r} (known: {', '.join(KERNEL_CHOICES)})")
        self.kernels = None  # the library of pltkit's kernels, once a session runs on it
        self.own_nodes: dict[tuple[str, str], int] = {}  # (phase, attention) -> nodes on pltkit's kernel
        self.rings_in_place = False  # decode steps write full rings in place (kernels.KernelModel)
        self.sessions = {phase: self.open_session(phase, self.attention) for phase in ("prefill", "decode")}
        self._batched: dict[str, object] = {}  # phase -> the kvbuffer graph's session, for a batch
        self.writes = {p: artifact.cache_writes(p, self.attention) for p in ("prefill", "decode")}
        self._bound: dict[str, tuple] = {}  # phase -> (session, weak refs to the buffers, IO binding)
        self.outputs = {p: [o.name for o in s.get_outputs()] for p, s in self.sessions.items()}
        inputs = {p: {i.name for i in s.get_inputs()} for p, s in self.sessions.items()}
        # graphs that take the cache as a kv buffer (whole, `past_len` valid) and write into it
        self.kv_buffer = {p: "past_len" in names for p, names in inputs.items()}
        # the GQA prefill graph (format 3) runs the head from position `logits_from` on
        self.logits_from = {p: "logits_from" in names for p, names in inputs.items()}

    def _options(self, profile: str | None = None):
        so = self.ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # the threads stop spinning when a run returns: else the idle session's threads take the cores from the
        # next session's run (a prefill's from the first decode steps; medium int4 PLT-2 decoded at 1.38 ms a
        # token right after another session, 1.13 with this; steady decode of one session alike either way)
        so.add_session_config_entry("session.force_spinning_stop", "1")
        if profile:
            so.enable_profiling, so.profile_file_prefix = True, profile
        return so

    def _library(self):
        """pltkit's kernels, built on first use; None where they cannot run (an error if they were asked for)."""
        try:
            return kernels_mod.library()
        except kernels_mod.KernelUnavailable as e:
            if self.kernel_choice == "pltkit":
                raise ArtifactError(f"pltkit's kernels cannot run here: {e}") from None
            log.info("decoding on ONNX Runtime's kernels only: %s", e)
            return None

    def open_session(self, phase: str, attention: str, profile: str | None = None):
        """A session of the artifact's graph (profiled into files named `profile`...); a decode graph (few rows)
        runs its MatMulNBits and RingMix nodes on pltkit's kernels where they apply (`kernels`)."""
        path = self.artifact.graph_path(phase, attention)
        if phase == "decode" and self.kernel_choice != "ort" and self.device == "cpu":
            model, count, rings_in_place = kernels_mod.kernel_model(path)
            library = self._library() if count else None
            if library:
                so = self._options(profile)
                kernels_mod.load_into(so, path.parent)
                try:
                    session = self.ort.InferenceSession(model, so, providers=self.providers)
                except Exception as e:  # onnxruntime's own exception types
                    if self.kernel_choice == "pltkit":
                        raise ArtifactError(f"pltkit's kernel cannot run {path.name}: {e}") from None
                    log.warning("pltkit's kernel cannot run %s, ONNX Runtime's will: %s", path.name, e)
                else:
                    self.kernels, self.own_nodes[phase, attention] = library, count
                    self.rings_in_place |= attention == self.attention and rings_in_place
                    return session
        return self.ort.InferenceSession(str(path), self._options(profile), providers=self.providers)

    def new_state(self, batch: int = 1) -> BufferState:
        return BufferState.empty(self.artifact, batch)

    def _run_copying(self, phase: str, ids: np.ndarray, state: BufferState):
        """Run a graph that takes the valid cache and returns it extended."""
        state.set_circular(False)
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        feed.update({"past_" + n: np.ascontiguousarray(b[:, :, :state.pos]) for n, b in state.kv.items()})
        feed.update({"past_" + n: a for n, a in state.other.items()})
        out = dict(zip(self.outputs[phase], self.sessions[phase].run(None, feed)))
        new_pos = out["present_key.0"].shape[2]
        for n, buf in state.kv.items():
            buf[:, :, state.pos:new_pos] = out["present_" + n][:, :, state.pos:]
        state.other = {n: out["present_" + n] for n in state.other}
        state.pos = new_pos
        return out["logits"], state

    def _session(self, phase: str, batch: int):
        """The phase's session. GroupQueryAttention takes more than one position after a past for batch 1
        only, so a batched prefill, and a batched decode step that writes more than its token
        (cache_writes), run the kvbuffer graph (same inputs and state, opened when first needed)."""
        if batch > 1 and self.attention == "gqa" and (phase == "prefill" or self.writes[phase] > 1):
            if phase not in self._batched:
                self._batched[phase] = self.open_session(phase, "kvbuffer")
            return self._batched[phase]
        return self.sessions[phase]

    def _bind_kv(self, session, state: BufferState) -> Binding:
        """A new IO binding with the state's cache buffers bound as both past_* and present_* (shared memory)."""
        io = session.io_binding()
        for n, buf in state.kv.items():
            value = self.ort.OrtValue.ortvalue_from_numpy(buf)  # shares the buffer's memory
            io.bind_ortvalue_input("past_" + n, value)
            io.bind_ortvalue_output("present_" + n, value)
        return Binding(self.ort, io)

    def _binding(self, phase: str, session, state: BufferState, new: int) -> tuple[Binding, dict]:
        """An IO binding for a step of `new` tokens from `state`, and the arrays its present rings and carries go
        into. Binding costs microseconds a tensor (0.5 ms a step for 60 cache buffers, 0.27 ms for PLT-2's 32
        rings at the large shape), so bindings are kept while the same buffers come back: the cache's (only
        weak references are kept, so a state's memory is freed with it), and, once the rings hold their whole
        window and keep their shapes, two sets of ring and carry arrays that decode steps write in turn, each set
        bound once as past and once as present; where pltkit's RingMix runs (rings_in_place), both sets hold the
        same rings, written in place and circular (BufferState.circular). Rings of changing shapes, and a
        prefill's (one call after a rewind, as a server's requests go), are bound a call at a time."""
        in_place = phase == "decode" and session is self.sessions[phase] and self.rings_in_place
        kept = self._bound.get(phase)
        if not (kept and kept["session"] is session and len(kept["kv"]) == len(state.kv) and all(
                ref() is buf for ref, buf in zip(kept["kv"], state.kv.values()))):
            kept = self._bound[phase] = {"session": session, "kv": [weakref.ref(b) for b in state.kv.values()],
                                         "io": self._bind_kv(session, state), "turns": None}
        other, turns = state.other, kept["turns"]
        side = _side(turns, other)  # (a pair's arrays keep their shapes)
        if side is None and phase == "decode" and other and all(
                self._next_shape(n, a, new) == a.shape for n, a in other.items()):
            # a new pair; rings written in place are in both
            arrays = [dict(other), {n: a if in_place and n.startswith("ring_") else aligned(a.shape, a.dtype, np.empty)
                                    for n, a in other.items()}]
            ios = [self._bind_kv(session, state) for _ in arrays]
            for b, (past, present) in zip(ios, (arrays, arrays[::-1])):
                for n in other:
                    b.io.bind_ortvalue_input("past_" + n, self.ort.OrtValue.ortvalue_from_numpy(past[n]))
                    b.io.bind_ortvalue_output("present_" + n, self.ort.OrtValue.ortvalue_from_numpy(present[n]))
            turns = kept["turns"] = {"arrays": arrays, "ios": ios}
            side = 0
        state.set_circular(side is not None and in_place)
        if side is not None:
            return turns["ios"][side], dict(turns["arrays"][1 - side])
        b = kept["io"]
        present = {n: aligned(self._next_shape(n, a, new), a.dtype, np.empty) for n, a in other.items()}
        for n, a in other.items():
            b.io.bind_cpu_input("past_" + n, a)
            b.io.bind_ortvalue_output("present_" + n, self.ort.OrtValue.ortvalue_from_numpy(present[n]))
        return b, present

    def _run_kv_buffer(self, phase: str, ids: np.ndarray, state: BufferState, new: int, last: bool = False):
        session = self._session(phase, ids.shape[0])
        binding, present = self._binding(phase, session, state, new)
        binding.input("input_ids", np.asarray(ids, np.int64))
        binding.input("past_len", np.array(state.pos, np.int64))
        rows = new
        if self.logits_from[phase] and session is self.sessions[phase]:  # not the batched kvbuffer graph
            start = rows - 1 if last else 0
            binding.input("logits_from", np.array(start, np.int64))
            rows -= start
        # the outputs go into arrays made here, so no step reads back all of the graph's outputs, the
        # cache buffers among them (SmolLM2-135M: half the step's Python time, benchmarks/step_overhead.py);
        # a decode step's logits into the binding's kept array, then copied out (cheaper than a new binding)
        logits_shape = (*((ids.shape[0], rows) if phase == "prefill" else ids.shape), self.config.vocab_size)
        if phase == "decode":
            logits = binding.output("logits", logits_shape, np.float32)
        else:
            logits = np.empty(logits_shape, np.float32)
            binding.io.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(logits))
        session.run_with_iobinding(binding.io)
        if phase == "decode":
            logits = logits.copy()
        state.other = present
        state.pos += new
        return logits, state

    def _next_shape(self, name: str, past, new: int) -> tuple:
        """The shape of present_<name> after `new` tokens: a ring keeps the last `window` positions
        of the loop (axis 3), a carry keeps its shape."""
        if not name.startswith("ring_"):
            return past.shape
        return (*past.shape[:3], min(self.config.window_left, past.shape[3] + new), *past.shape[4:])

    def _run(self, phase: str, ids: np.ndarray, state: BufferState, last: bool = False):
        new = ids.shape[1] if phase == "prefill" else 1
        state.reserve(state.pos + new, self.config.max_position_embeddings, spare=max(0, self.writes[phase] - new))
        if self.kv_buffer[phase]:
            return self._run_kv_buffer(phase, ids, state, new, last)
        return self._run_copying(phase, ids, state)

    def prefill(self, ids: np.ndarray, state: BufferState, last: bool = False) -> tuple[np.ndarray, BufferState]:
        return self._run("prefill", ids, state, last)

    def decode(self, ids: np.ndarray, state: BufferState) -> tuple[np.ndarray, BufferState]:
        return self._run("decode", ids, state)


class Binding:
    """An IO binding, and the arrays bound to its small inputs (a step's token and position) and a decode step's
    logits, kept while their shapes hold: a step writes into them instead of binding new ones (binding a tensor
    costs microseconds)."""

    def __init__(self, ort, io):
        self.ort, self.io, self.arrays = ort, io, {}

    def _array(self, name: str, shape: tuple, dtype, bind) -> np.ndarray:
        a = self.arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self.arrays[name] = np.empty(shape, dtype)
            bind(name, self.ort.OrtValue.ortvalue_from_numpy(a))
        return a

    def input(self, name: str, value: np.ndarray) -> None:
        self._array(name, value.shape, value.dtype, self.io.bind_ortvalue_input)[...] = value

    def output(self, name: str, shape: tuple, dtype) -> np.ndarray:
        return self._array(name, shape, np.dtype(dtype), self.io.bind_ortvalue_output)


def _side(turns: dict | None, other: dict) -> int | None:
    """Which of a binding pair's two sets of ring and carry arrays `other` is, if either."""
    for i, arrays in enumerate(turns["arrays"] if turns else []):
        if arrays.keys() == other.keys() and all(arrays[n] is a for n, a in other.items()):
            return i
    return None
