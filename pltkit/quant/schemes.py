"""Quantization schemes as small registered classes, each with a plain numpy reference.

Weight-only n-bit (`int8`, `int4`) for ONNX Runtime on CPU: every linear layer's weight
W [K, N] (as MatMul takes it) is cut along K into blocks; each block of each output
column n gets one float32 scale s = v / -2^(bits-1), v the block's entry of largest
magnitude (the negative one on a tie), and stores q = clip(round(w / s), -2^(bits-1), 2^(bits-1) - 1) + 2^(bits-1)
as unsigned bits (two 4-bit values a byte, low nibble first). The layer runs as
`com.microsoft.MatMulNBits` with accuracy_level 4 (int8 compute, VNNI on x86), which
dequantizes as w = (q - 2^(bits-1)) * s. Packing uses ONNX Runtime's own quantizer
kernels; `reference_quantize` and `dequantize` are the numpy statement of the format
that the tests hold the packed tensors to (scales exactly; codes to within one step on
rounding boundaries, where ONNX Runtime's float arithmetic rounds differently from numpy's
in about 0.02 % of the weights of the default model).

Embeddings are stored in float16 (a gather reads one row per token, then casts). The
output head is 8-bit in both schemes: 4 bits there cost int4 most of its next-token
agreement (measured on the default model: 91.8 % top-1 with a 4-bit head).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


HEAD_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")  # the output head (tied or not)


@dataclass(frozen=True)
class WeightOnlyNBits:
    name: str
    bits: int
    block_size: int
    accuracy_level: int = 4
    head: WeightOnlyNBits | None = None  # another scheme for the output head (None: this one)

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def blocks(self, k: int) -> int:
        return -(-k // self.block_size)

    # -- the format, in numpy -------------------------------------------------------
    def reference_quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """W [K, N] -> (q [N, blocks, block_size] signed ints, scales [N, blocks])."""
        k, n = w.shape
        pad = self.blocks(k) * self.block_size - k
        blocks = np.pad(w, ((0, pad), (0, 0))).T.reshape(n, self.blocks(k), self.block_size)
        hi, lo = blocks.max(-1), blocks.min(-1)
        v = np.where(np.abs(hi) > np.abs(lo), hi, lo)  # a tie in magnitude takes the negative one
        scales = (v / -self.zero_point).astype(np.float32)
        safe = np.where(scales == 0, 1, scales)
        q = np.clip(np.round(blocks / safe[..., None]), -self.zero_point, self.zero_point - 1)
        return q.astype(np.int32), scales

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """packed [N, blocks, bytes] uint8 -> q [N, blocks, block_size] signed ints."""
        if self.bits == 8:
            q = packed.astype(np.int32)
        else:
            q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(*packed.shape[:2], -1).astype(np.int32)
        return q - self.zero_point

    def dequantize(self, packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
        """The weights MatMulNBits computes with: W [K, N]."""
        w = self.unpack(packed) * scales[..., None]
        return w.reshape(w.shape[0], -1)[:, :k].T

    # -- packing with ONNX Runtime's kernels -------------------------------------------
    def pack(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """W [K, N] float32 -> (packed [N, blocks, block_size*bits/8] uint8, scales [N, blocks])."""
        from onnxruntime.capi import _pybind_state as kernels

        k, n = w.shape
        per_byte = 8 // self.bits
        packed = np.zeros((n, self.blocks(k), self.block_size // per_byte), np.uint8)
        scales = np.zeros((n, self.blocks(k)), np.float32)
        zero_points = np.zeros((n, -(-self.blocks(k) // per_byte)), np.uint8)  # unused: symmetric
        quantize = {8: kernels.quantize_matmul_8bits, 4: kernels.quantize_matmul_4bits}[self.bits]
        quantize(packed, np.ascontiguousarray(w, np.float32), scales, zero_points, self.block_size, n, k, True)
        return packed, scales

    # -- the graph ------------------------------------------------------------------
    def linear(self, builder, x: str, weight: str) -> str:
        """x @ W.T for the checkpoint tensor `weight` ([N, K] as stored), as one MatMulNBits node;
        the packed tensors are written once and shared by every graph of the artifact."""
        if self.head is not None and weight in HEAD_WEIGHTS:
            return self.head.linear(builder, x, weight)
        store, key = builder.store, f"{weight}.q{self.bits}"
        n, k = store.source(weight).shape
        if key not in store.protos:
            packed, scales = self.pack(store.source(weight).T)
            store.derived(key, lambda: packed)
            store.derived(key + ".scales", lambda: scales)
        packed, scales = (builder.use_initializer(*store.derived(name, None)) for name in (key, key + ".scales"))
        return builder.g.op("MatMulNBits", x, packed, scales, domain="com.microsoft", K=k, N=n, bits=self.bits,
                            block_size=self.block_size, accuracy_level=self.accuracy_level)

    def manifest(self) -> dict:
        return {"scheme": self.name, "kind": "weight-only", "target": "onnxruntime",
                "op": "com.microsoft.MatMulNBits", "bits": self.bits,
                "block_size": self.block_size, "symmetric": True, "accuracy_level": self.accuracy_level,
                "output_head": (self.head or self).name, "embeddings": "float16",
                "kept_float32": "norms, loop gates, activations"}


INT8 = WeightOnlyNBits("int8", 8, 32)
SCHEMES = {"int8": INT8, "int4": WeightOnlyNBits("int4", 4, 32, head=INT8)}


# --- static Q/DQ schemes for TensorRT (strongly typed: precision comes from Q/DQ) ---------------
@dataclass(frozen=True)
class StaticQDQ:
    """Weights per output channel and activations per tensor (from calibration), as explicit
    QuantizeLinear/DequantizeLinear around a float MatMul: the form TensorRT 10/11 strongly
    typed networks fuse into int8 or fp8 GEMMs. ONNX Runtime on CPU runs it too (fp8 as
    emulation: Q/DQ then a float32 MatMul), which is how its accuracy is measured here.

    int8: s = amax / 127, q = clip(round(x / s), -127, 127), zero point 0.
    fp8:  s = amax / 448 (the largest float8e4m3fn), q = float8e4m3fn(x / s), zero point 0.

    SmoothQuant (alpha): each linear layer divides its input channel k by
    m_k = a_k^alpha / w_k^(1 - alpha) (a_k the calibrated amax of the channel, w_k the largest
    |weight| reading it) and multiplies the weights' row k by m_k, which leaves x @ W unchanged
    and moves activation outliers into the weights, where per-channel scales absorb them.
    Layers whose names start with a `keep_float` prefix stay float (the first layer: its
    activations cost fp8 the most agreement, see docs/design.md)."""

    packable = False  # calibrated per layer: a packed projection would have no calibration range
    name: str
    qtype: int  # onnx TensorProto element type of the quantized values
    qmax: float
    alpha: float | None = None  # SmoothQuant migration strength
    keep_float: tuple[str, ...] = ()
    amax: dict = field(default_factory=dict, compare=False)  # weight name -> per-channel input amax [K]

    def with_calibration(self, amax: dict[str, np.ndarray]) -> StaticQDQ:
        return replace(self, amax={k: np.asarray(v, np.float32) for k, v in amax.items()})

    def _np_type(self):
        import ml_dtypes
        return {3: np.int8, 17: ml_dtypes.float8_e4m3fn}[self.qtype]

    def quantize(self, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The numpy statement of QuantizeLinear with zero point 0 (round half to even)."""
        y = x / scale
        if self.qtype == 3:
            return np.clip(np.rint(y), -self.qmax, self.qmax).astype(np.int8)
        return np.clip(y, -self.qmax, self.qmax).astype(self._np_type())

    def smoothing(self, w: np.ndarray, amax: np.ndarray) -> np.ndarray:
        """m [K] for W [K, N] and input channel amax [K] (ones without SmoothQuant)."""
        if self.alpha is None:
            return np.ones(w.shape[0], np.float32)
        a, wmax = np.maximum(amax, 1e-5), np.maximum(np.abs(w).max(1), 1e-5)
        return (a ** self.alpha / wmax ** (1 - self.alpha)).astype(np.float32)

    def weight(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """W [K, N] -> (quantized W [K, N], scales [N]): one scale per output channel."""
        scales = (np.abs(w).max(0) / self.qmax).astype(np.float32)
        scales = np.where(scales == 0, np.float32(1), scales)
        return self.quantize(w, scales), scales

    def quantized_layer(self, w: np.ndarray, amax: np.ndarray) -> dict[str, np.ndarray]:
        """Everything the graph stores for one layer, from W [K, N] and its input amax [K]:
        1/m, the activation scale, the quantized smoothed weights and their scales."""
        m = self.smoothing(w, amax)
        wq, scales = self.weight(w * m[:, None])
        x_scale = np.float32(max(float((amax / m).max()), 1e-8) / self.qmax)
        return {"inv_smooth": (1 / m).astype(np.float32), "x_scale": np.array(x_scale), "w": wq, "w_scales": scales,
                "w_zero": np.zeros(wq.shape[1], wq.dtype)}

    def is_quantized(self, weight: str) -> bool:
        return weight not in HEAD_WEIGHTS and not weight.startswith(self.keep_float)

    def linear(self, builder, x: str, weight: str) -> str:
        g, store = builder.g, builder.store
        if not self.is_quantized(weight):  # the output head (it decides the argmax), kept layers
            return g.op("MatMul", x, builder.w(weight, transpose=True))
        if weight not in self.amax:
            raise ValueError(f"no calibration range for {weight}: calibrate before exporting {self.name}")
        key = f"{weight}.{self.name}"
        if key + ".w" not in store.protos:
            parts = self.quantized_layer(np.asarray(store.source(weight), np.float32).T, self.amax[weight])
            for part, value in parts.items():
                store.derived(f"{key}.{part}", lambda v=value: v)
        inv_m, xs, wq, ws, wz = (builder.use_initializer(*store.derived(f"{key}.{part}", None))
                                 for part in ("inv_smooth", "x_scale", "w", "w_scales", "w_zero"))
        xz = builder.use_initializer(*store.derived(f"qdq.{self.name}.zero", lambda: np.zeros((), self._np_type())))
        if self.alpha is not None:
            x = g.op("Mul", x, inv_m)
        x_dq = g.op("DequantizeLinear", g.op("QuantizeLinear", x, xs, xz), xs, xz)
        return g.op("MatMul", x_dq, g.op("DequantizeLinear", wq, ws, wz, axis=1))

    def manifest(self) -> dict:
        return {"scheme": self.name, "kind": "static Q/DQ", "target": "tensorrt", "weights": "per output channel",
                "activations": "per tensor, calibrated amax", "zero_point": 0, "embeddings": "float32",
                "smoothquant_alpha": self.alpha, "calibrated_layers": len(self.amax),
                "kept_float32": ["output head", "embeddings", "norms", "loop gates", "attention",
                                 *(p + "*" for p in self.keep_float)]}


QDQ_SCHEMES = {"int8-qdq": StaticQDQ("int8-qdq", 3, 127.0, alpha=0.8),
               "fp8": StaticQDQ("fp8", 17, 448.0, alpha=0.8, keep_float=("model.layers.0.",))}
