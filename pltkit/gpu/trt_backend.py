"""The TensorRT backend: an artifact's engines (pltkit.gpu.trt_engine) behind the runtime's
backend interface, with torch CUDA tensors for every input, output and state tensor.

The engines are the artifact's `function` graphs: prefill (loops one after another over a chunk)
and the CLP decode step. So the semantics are those of the ONNX Runtime backend, and the same
completion engine runs on top. Each call returns the caches extended by the new positions (the
graphs' present_* outputs), which become the state: a device-side copy per step, not an
in-place update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pltkit.gpu.trt_engine import PHASES, build, require
from pltkit.runtime.artifact import Artifact


@dataclass
class TrtState:
    pos: int
    tensors: dict  # state name -> torch CUDA tensor, as the graphs take them (past_<name>)

    def clone(self) -> TrtState:
        return TrtState(self.pos, {k: v.clone() for k, v in self.tensors.items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def snapshot(self) -> dict:
        return {k: v.clone() for k, v in self.tensors.items() if not k.startswith(("key.", "value."))}

    def rewind(self, pos: int, snapshot: dict) -> None:
        kv = {k: v[:, :, :pos].contiguous() for k, v in self.tensors.items() if k.startswith(("key.", "value."))}
        self.pos, self.tensors = pos, {**kv, **{k: v.clone() for k, v in snapshot.items()}}


class TrtBackend:
    name = "trt"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        trt, torch = require()
        self.trt, self.torch, self.artifact, self.config = trt, torch, artifact, artifact.config
        folder = build(artifact.path)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {p: runtime.deserialize_cuda_engine((folder / f"{p}.plan").read_bytes()) for p in PHASES}
        self.contexts = {p: e.create_execution_context() for p, e in self.engines.items()}
        m = artifact.manifest
        self.state_names, self.state_shapes = m["state"]["names"], m["state"]["shapes"]
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                       trt.DataType.BF16: torch.bfloat16, trt.DataType.INT64: torch.int64,
                       trt.DataType.INT32: torch.int32}
        self._empty = torch.empty(1, device="cuda")  # an address for zero-size tensors

    def new_state(self, batch: int = 1) -> TrtState:
        def size(d):
            return batch if d == "batch" else 0 if isinstance(d, str) else d
        return TrtState(0, {n: self.torch.zeros([size(d) for d in self.state_shapes[n]], device="cuda")
                            for n in self.state_names})

    def _run(self, phase: str, ids: np.ndarray, state: TrtState):
        torch, trt = self.torch, self.trt
        if state.pos + (ids.shape[-1] if phase == "prefill" else 1) > self.config.max_position_embeddings:
            raise ValueError(f"context exceeds the model's {self.config.max_position_embeddings} positions")
        engine, ctx = self.engines[phase], self.contexts[phase]
        feed = {"input_ids": torch.as_tensor(np.ascontiguousarray(ids, np.int64), device="cuda"),
                **{"past_" + n: t.contiguous() for n, t in state.tensors.items()}}
        for name, t in feed.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
        out = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.dtypes[engine.get_tensor_dtype(name)],
                            device="cuda")
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
            out[name] = t
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT {phase} failed")
        stream.synchronize()
        state.tensors = {n: out["present_" + n] for n in self.state_names}
        state.pos = state.tensors["key.0"].shape[2]
        return out["logits"].float().cpu().numpy(), state

    def prefill(self, ids: np.ndarray, state: TrtState):
        return self._run("prefill", ids, state)

    def decode(self, ids: np.ndarray, state: TrtState):
        return self._run("decode", ids, state)
