"""The TensorRT backend: an artifact's engines (pltkit.gpu.trt_engine) behind the runtime's
backend interface, with torch CUDA tensors for every input, output and state tensor.

The engines are the artifact's `kvbuffer` graphs: prefill (loops one after another over a
chunk) and the CLP decode step, over the same state as ONNX Runtime's kv buffer path
(pltkit.runtime.buffer_state.BufferState, here over torch CUDA tensors). Each call binds a
buffer as both `past_key.i` and `present_key.i` and the engine writes the new positions into it
at `past_len` (with the plugin, only those positions are written).
Rings and carries are small and come back as new tensors. The completion engine runs on top
unchanged.
"""

from __future__ import annotations

import numpy as np

from pltkit.gpu.trt_engine import PHASES, GpuUnavailable, build, require
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.backends import physical_cores
from pltkit.runtime.buffer_state import ArrayOps, BufferState


def _cuda_zeros(shape, dtype: str):
    import torch
    return torch.zeros(shape, dtype=getattr(torch, dtype), device="cuda")


CUDA = ArrayOps(new=_cuda_zeros, copy=lambda t: t.clone(), zeros=lambda like, shape: like.new_zeros(shape))


class TrtBackend:
    name = "trt"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        """threads: torch's intra-op threads, for the host-side work (inputs, logits back to numpy;
        default: one per physical core). The engines run on the GPU; TensorRT has no CPU thread setting."""
        trt, torch = require()
        torch.set_num_threads(threads or physical_cores())
        from pltkit.gpu import trt_plugin

        trt_plugin.register()  # a JIT plugin's engine calls back into it
        self.trt, self.torch, self.artifact, self.config = trt, torch, artifact, artifact.config
        folder = build(artifact.path)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {p: runtime.deserialize_cuda_engine((folder / f"{p}.plan").read_bytes()) for p in PHASES}
        self.contexts = {p: e.create_execution_context() for p, e in self.engines.items()}
        self.dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                       trt.int64: torch.int64, trt.int32: torch.int32}
        self._empty = torch.empty(1, device="cuda")  # an address for zero-size tensors

    def new_state(self, batch: int = 1) -> BufferState:
        return BufferState.empty(self.artifact, batch, CUDA)

    def _address(self, t) -> int:
        return t.data_ptr() if t.numel() else self._empty.data_ptr()

    def _run(self, phase: str, ids: np.ndarray, state: BufferState):
        torch, trt = self.torch, self.trt
        new = ids.shape[-1] if phase == "prefill" else 1
        state.reserve(state.pos + new, self.config.max_position_embeddings)
        engine, ctx = self.engines[phase], self.contexts[phase]
        feed = {"input_ids": torch.as_tensor(np.ascontiguousarray(ids, np.int64), device="cuda"),
                "past_len": torch.tensor(state.pos, dtype=torch.int64),
                **{"past_" + n: t for n, t in (*state.kv.items(), *state.other.items())}}
        for name, t in feed.items():
            if not engine.is_shape_inference_io(name):  # a shape input is read on the host
                t = feed[name] = t.to("cuda")
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, self._address(t))
        out = {"present_" + n: t for n, t in state.kv.items()}  # written in place
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT and name not in out:
                out[name] = torch.empty(tuple(ctx.get_tensor_shape(name)),
                                        dtype=self.dtypes[engine.get_tensor_dtype(name)], device="cuda")
        for name, t in out.items():
            ctx.set_tensor_address(name, self._address(t))
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT {phase} failed")
        stream.synchronize()
        state.other = {n: out["present_" + n] for n in state.other}
        state.pos += new
        return out["logits"].float().cpu().numpy(), state

    def prefill(self, ids: np.ndarray, state: BufferState, last: bool = False):
        return self._run("prefill", ids, state)

    def decode(self, ids: np.ndarray, state: BufferState):
        return self._run("decode", ids, state)


def open_trt(path, threads: int | None, verify: bool) -> TrtBackend:
    """The `trt` entry of pltkit.runtime.backends.BACKENDS."""
    try:
        return TrtBackend(Artifact.open(path, verify), threads)
    except GpuUnavailable as e:
        raise ValueError(f"the trt backend: {e}") from None
