"""`int8-dq`: int8 weights with dynamically quantized activations, as ONNX Runtime's
`com.microsoft.DynamicQuantizeMatMul` (opt-in: `plt-export --int8-dq`).

Weights: one float32 scale per output column n of W [K, N] (as MatMul takes it),
s = amax / 127 (amax the column's largest |w|; s = 1 for an all-zero column), and
q = clip(round(w / s), -127, 127) stored as int8 [K, N]; the layer computes with w = q * s.
Activations: the op quantizes its input per tensor at run time (uint8, one scale and zero
point for the whole input: PLT-2's two decode rows, or every token of a prefill chunk, share it)
and multiplies in integers (VNNI on x86).

Why: a second row costs DynamicQuantizeMatMul almost nothing on a CPU whose weights do not fit
in cache, where MatMulNBits int8 pays about a fifth more (docs/quantization.md). The price is
the per-tensor activation scale: larger errors than `int8`, most with outlier channels.

`reference_quantize` and `dequantize` are the format in numpy; packing is the same numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DynamicInt8:
    name: str
    head: object | None = None  # another scheme for the output head (None: this one)
    qmax: int = 127

    # -- the format, in numpy -------------------------------------------------------
    def reference_quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """W [K, N] -> (q [K, N] int8, scales [N] float32)."""
        w = np.asarray(w, np.float32)
        scales = (np.abs(w).max(0) / np.float32(self.qmax)).astype(np.float32)
        scales = np.where(scales == 0, np.float32(1), scales)
        q = np.clip(np.round(w / scales), -self.qmax, self.qmax)
        return q.astype(np.int8), scales

    def dequantize(self, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """The weights the layer computes with: W [K, N] float32."""
        return q.astype(np.float32) * scales

    pack = reference_quantize  # no ONNX Runtime kernel needed: the layout is the codes as they are

    # -- the graph ------------------------------------------------------------------
    def linear(self, builder, x: str, weight: str) -> str:
        """x @ W.T for the checkpoint tensor `weight` ([N, K] as stored), as one DynamicQuantizeMatMul
        (it takes x of any rank: [R, B, S, K]); the int8 tensors are written once and shared by every
        graph of the artifact."""
        from pltkit.quant.schemes import HEAD_WEIGHTS

        if self.head is not None and weight in HEAD_WEIGHTS:
            return self.head.linear(builder, x, weight)
        store, key = builder.store, f"{weight}.q8col"
        q, scales = (builder.use_initializer(*t) for t in store.derived_together(
            [key, key + ".scales"], lambda: self.pack(store.source(weight).T)))
        return builder.g.op("DynamicQuantizeMatMul", x, q, scales, domain="com.microsoft")

    def manifest(self) -> dict:
        return {"scheme": self.name, "kind": "dynamic", "target": "onnxruntime",
                "op": "com.microsoft.DynamicQuantizeMatMul", "bits": 8, "weights": "int8 per output column, symmetric",
                "activations": "uint8 per tensor, at run time", "output_head": (self.head or self).name,
                "embeddings": "float16", "kept_float32": "norms, loop gates, attention"}
