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

`int8-dq-sq` adds SmoothQuant (alpha): each layer divides its input channel k by
m_k = a_k^alpha / w_k^(1 - alpha) (a_k the channel's calibrated amax, w_k the largest |weight| reading
it) and quantizes W with row k times m_k, as StaticQDQ does; x @ W is unchanged and the activations'
outlier channels move into the weights, where the per-column scales absorb them. Projections packed
into one layer (q/k/v, gate/up) read one input, so they share its calibrated amax. down_proj runs as the
head's scheme (int8 MatMulNBits, activations per block of 32): in a trained LLM its input has channels
whose calibrated amax is hundreds to thousands of times the median channel's (SmolLM2-135M layer 11:
3,500 against 1.8); smoothed like the others (alpha 0.8), they cost SmolLM2-135M 9 points of next-token agreement
with llama.cpp Q8_0 (docs/quantization.md).

`reference_quantize` and `dequantize` are the format in numpy; packing is the same numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


def smoothquant(w: np.ndarray, amax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel factors m [K] for W [K, N] and the input's channel amax [K]:
    m_k = a_k^alpha / w_k^(1 - alpha), w_k the largest |weight| reading channel k."""
    a, wmax = np.maximum(amax, 1e-5), np.maximum(np.abs(w).max(1), 1e-5)
    return (a ** alpha / wmax ** (1 - alpha)).astype(np.float32)


@dataclass(frozen=True)
class DynamicInt8:
    name: str
    head: object | None = None  # another scheme for the output head (None: this one)
    qmax: int = 127
    alpha: float | None = None  # SmoothQuant migration strength (None: no smoothing, no calibration)
    amax: dict = field(default_factory=dict, compare=False)  # weight name -> per-channel input amax [K]
    on_head: tuple[str, ...] = ()  # weight-name endings that run as the head's scheme

    @property
    def calibrated(self) -> bool:
        """Whether an export needs activation ranges first (with_calibration)."""
        return self.alpha is not None

    def with_calibration(self, amax: dict[str, np.ndarray]) -> DynamicInt8:
        return replace(self, amax={k: np.asarray(v, np.float32) for k, v in amax.items()})

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

    def smoothing(self, w: np.ndarray, amax: np.ndarray) -> np.ndarray:
        """m [K] for W [K, N] and its input's per-channel amax [K]."""
        return smoothquant(w, amax, self.alpha)

    def input_amax(self, weight: str) -> np.ndarray:
        """The calibrated amax of `weight`'s input; a packed layer's ("a+b.weight") is its parts'."""
        parts = [p + ".weight" for p in weight.removesuffix(".weight").split("+")]
        missing = [p for p in parts if p not in self.amax]
        if missing:
            raise ValueError(f"no calibration range for {missing[0]}: calibrate before exporting {self.name}")
        return np.max([self.amax[p] for p in parts], 0)

    def smoothed_pack(self, w: np.ndarray, amax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """W [K, N], amax [K] -> (q, scales) of W * m (pack) and 1/m [K]."""
        m = self.smoothing(w, amax)
        return (*self.pack(w * m[:, None]), (1 / m).astype(np.float32))

    # -- the graph ------------------------------------------------------------------
    def linear(self, builder, x: str, weight: str) -> str:
        """x @ W.T for the checkpoint tensor `weight` ([N, K] as stored), as one DynamicQuantizeMatMul
        (it takes x of any rank: [R, B, S, K]); the int8 tensors are written once and shared by every
        graph of the artifact."""
        from pltkit.quant.schemes import HEAD_WEIGHTS

        if self.head is not None and (weight in HEAD_WEIGHTS or weight.endswith(self.on_head)):
            return self.head.linear(builder, x, weight)
        store, key = builder.store, f"{weight}.q8col"
        if self.alpha is None:
            q, scales = (builder.use_initializer(*t) for t in store.derived_together(
                [key, key + ".scales"], lambda: self.pack(store.source(weight).T)))
        else:
            amax, key = self.input_amax(weight), f"{key}.{self.name}"
            q, scales, inv_m = (builder.use_initializer(*t) for t in store.derived_together(
                [key, key + ".scales", key + ".inv_smooth"], lambda: self.smoothed_pack(store.source(weight).T, amax)))
            x = builder.g.op("Mul", x, inv_m)
        return builder.g.op("DynamicQuantizeMatMul", x, q, scales, domain="com.microsoft")

    def manifest(self) -> dict:
        return {"scheme": self.name, "kind": "dynamic", "target": "onnxruntime",
                "op": "com.microsoft.DynamicQuantizeMatMul", "bits": 8, "weights": "int8 per output column, symmetric",
                "activations": "uint8 per tensor, at run time", "smoothquant_alpha": self.alpha,
                "calibrated_layers": len(self.amax),
                "on_output_head_scheme": list(self.on_head), "output_head": (self.head or self).name,
                "embeddings": "float16", "kept_float32": "norms, loop gates, attention"}
