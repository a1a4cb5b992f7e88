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

`int4-asym` (AsymmetricNBits) gives each block an offset as well (min/max blocks, w = q * s + lo):
the form that keeps llama.cpp Q4_1's weights (x = q * d + m) as they are, for the llama.cpp
comparison. It runs as MatMulNBits plus a block-sum correction (see the class), computes in int8 as llama.cpp
does (x rounded per block of 32, the block sums taken from the rounded x), and its 8-bit head keeps Q8_0's
grid (s = max|w| / 127): slower than int4 on one token (1.24x on SmolLM2-135M), so `--int4` stays symmetric.

`int8-dq` and `int8-dq-sq` (DynamicInt8, pltkit/quant/dynamic.py, opt-in) keep int8 weights per output
column and quantize activations per tensor at run time (DynamicQuantizeMatMul); -sq smooths them first.

Embeddings are stored in float16 (a gather reads one row per token, then casts). The
output head is 8-bit in both schemes: 4 bits there cost int4 most of its next-token
agreement (measured on the default model: 91.8 % top-1 with a 4-bit head).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pltkit.quant.dynamic import DynamicInt8, smoothquant

HEAD_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")  # the output head (tied or not)


def codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' packed bytes [N, blocks, bytes] -> the unsigned codes [N, blocks, block_size] (two
    4-bit codes a byte, low nibble first)."""
    if bits == 8:
        return packed.astype(np.int32)
    return np.stack([packed & 0x0F, packed >> 4], -1).reshape(*packed.shape[:2], -1).astype(np.int32)


@dataclass(frozen=True)
class WeightOnlyNBits:
    name: str
    bits: int
    block_size: int
    accuracy_level: int = 4
    head: WeightOnlyNBits | None = None  # another scheme for the output head (None: this one)
    # False: s = amax / (2^(bits-1) - 1) and codes within +-(2^(bits-1) - 1), the grid of llama.cpp's Q8_0
    # (8 bits only: the bytes are the codes, there is nothing to lay out)
    full_range: bool = True

    def __post_init__(self):
        if not self.full_range and self.bits != 8:
            raise ValueError("full_range=False is for 8 bits")

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
        if self.full_range:
            v = np.where(np.abs(hi) > np.abs(lo), hi, lo)  # a tie in magnitude takes the negative one
            scales = (v / -self.zero_point).astype(np.float32)
        else:
            scales = (np.maximum(np.abs(hi), np.abs(lo)) / np.float32(self.zero_point - 1)).astype(np.float32)
        safe = np.where(scales == 0, 1, scales)
        q = np.clip(np.round(blocks / safe[..., None]), -self.zero_point + (not self.full_range), self.zero_point - 1)
        return q.astype(np.int32), scales

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """packed [N, blocks, bytes] uint8 -> q [N, blocks, block_size] signed ints."""
        return codes(packed, self.bits) - self.zero_point

    def dequantize(self, packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
        """The weights MatMulNBits computes with: W [K, N]."""
        w = self.unpack(packed) * scales[..., None]
        return w.reshape(w.shape[0], -1)[:, :k].T

    # -- packing with ONNX Runtime's kernels -------------------------------------------
    def pack(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """W [K, N] float32 -> (packed [N, blocks, block_size*bits/8] uint8, scales [N, blocks])."""
        from onnxruntime.capi import _pybind_state as kernels

        k, n = w.shape
        if not self.full_range:  # 8 bits: ONNX Runtime's layout is the codes' bytes, [N, blocks, block_size]
            q, scales = self.reference_quantize(np.asarray(w, np.float32))
            return (q + self.zero_point).astype(np.uint8), scales
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
        store, key = builder.store, f"{weight}.q{self.bits}" + ("" if self.full_range else "-127")
        n, k = store.shape(weight)
        packed, scales = (builder.use_initializer(*t) for t in store.derived_together(
            [key, key + ".scales"], lambda: self.pack(store.source(weight).T)))
        return builder.g.op("MatMulNBits", x, packed, scales, domain="com.microsoft", K=k, N=n, bits=self.bits,
                            block_size=self.block_size, accuracy_level=self.accuracy_level)

    def manifest(self) -> dict:
        return {"scheme": self.name, "kind": "weight-only", "target": "onnxruntime",
                "op": "com.microsoft.MatMulNBits", "bits": self.bits,
                "block_size": self.block_size, "symmetric": True, "accuracy_level": self.accuracy_level,
                "output_head": (self.head or self).name, "embeddings": "float16",
                "kept_float32": "norms, loop gates, activations"}


@dataclass(frozen=True)
class AsymmetricNBits:
    """Weight-only n-bit with an offset per block (min/max): each block of `block_size` weights along
    K of output column n gets, from its smallest and largest entries lo and hi, s = (hi - lo) / (2^bits - 1)
    (s = 1 where hi == lo) and q = clip(round((w - lo) / s), 0, 2^bits - 1), stored as unsigned bits (two
    4-bit values a byte, low nibble first); the weights are w = q * s + lo. lo and hi are weights of the
    block, so its codes include 0 and 2^bits - 1, and weights that lie on an evenly spaced grid of 2^bits
    points per block (llama.cpp's Q4_1: x = q * d + m) come back to within float rounding.

    In the graph: MatMulNBits with zero points 0 computes x @ (q * s), and the offsets are added as
    (x @ E) @ lo: E [K, blocks] sums x over each block, lo [blocks, N] float32. x @ E is an 8-bit
    MatMulNBits too (E's ones and zeros are exact on its grid), at the product's accuracy level: with int8
    compute (level 4) ONNX Runtime rounds x to 8 bits per block, and the sums are then those of the rounded
    x, as llama.cpp's Q8_1 activations carry them. Float sums beside a rounded product cost 4 points of
    top-1 agreement with Q4_1 (docs/benchmarks.md). Measured and rejected: MatMulNBits' own zero points.
    Float ones are exact, but ONNX Runtime 1.32's CPU kernel dequantizes the whole weight each call
    (60x slower per layer); uint8 ones round Q4_1's offset to a whole step (no better than symmetric).

    Codes are laid out by ONNX Runtime's quantizer kernel (given the codes minus 2^(bits-1), whose
    symmetric scale is then exactly 1); `reference_quantize`/`dequantize` are the numpy statement of
    the format that the tests hold the packed tensors to."""

    name: str
    bits: int
    block_size: int
    accuracy_level: int = 4
    head: WeightOnlyNBits | None = None  # another scheme for the output head (None: this one)

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def blocks(self, k: int) -> int:
        return -(-k // self.block_size)

    # -- the format, in numpy -------------------------------------------------------
    def reference_quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """W [K, N] -> (q [N, blocks, block_size] unsigned ints, scales [N, blocks], lo [blocks, N]); a
        partial last block repeats its last row, which leaves its min and max as they are."""
        k, n = w.shape
        pad = self.blocks(k) * self.block_size - k
        blocks = np.pad(np.asarray(w, np.float32), ((0, pad), (0, 0)), mode="edge").T.reshape(
            n, self.blocks(k), self.block_size)
        lo, hi = blocks.min(-1), blocks.max(-1)
        scales = ((hi - lo) / np.float32(self.levels)).astype(np.float32)
        scales = np.where(scales == 0, np.float32(1), scales)
        q = np.clip(np.round((blocks - lo[..., None]) / scales[..., None]), 0, self.levels)
        return q.astype(np.int32), scales, np.ascontiguousarray(lo.T)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """packed [N, blocks, bytes] uint8 -> q [N, blocks, block_size] unsigned ints."""
        return codes(packed, self.bits)

    def dequantize(self, packed: np.ndarray, scales: np.ndarray, lo: np.ndarray, k: int) -> np.ndarray:
        """The weights the layer computes with, W [K, N], from what `pack` stores."""
        w = self.unpack(packed).astype(np.float32) * scales[..., None] + lo.T[..., None]
        return w.reshape(w.shape[0], -1)[:, :k].T

    # -- packing with ONNX Runtime's kernels -------------------------------------------
    def pack(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """W [K, N] float32 -> (packed [N, blocks, block_size*bits/8] uint8, scales [N, blocks], lo [blocks, N])."""
        from onnxruntime.capi import _pybind_state as kernels

        k, n = w.shape
        quantize = {8: kernels.quantize_matmul_8bits, 4: kernels.quantize_matmul_4bits}[self.bits]
        packed = np.zeros((n, self.blocks(k), self.block_size * self.bits // 8), np.uint8)
        scales = np.zeros((n, self.blocks(k)), np.float32)
        zero_points = np.zeros((n, -(-self.blocks(k) * self.bits // 8)), np.uint8)
        # ONNX Runtime has no kernel for min/max blocks without 0 in the range: the codes come from numpy
        # and its symmetric kernel lays them out (every block holds code 0, so its scale is exactly 1)
        q, float_scales, lo = self.reference_quantize(w)
        codes = (q - (1 << (self.bits - 1))).astype(np.float32).reshape(n, -1)[:, :k].T
        quantize(packed, np.ascontiguousarray(codes), scales, zero_points, self.block_size, n, k, True)
        if not (scales == 1).all():
            raise AssertionError("ONNX Runtime's quantizer did not keep the codes as they are")
        return packed, float_scales, lo

    def block_sums(self, k: int) -> np.ndarray:
        """E [K, blocks]: x @ E sums x over each block."""
        return (np.arange(k)[:, None] // self.block_size == np.arange(self.blocks(k))).astype(np.float32)

    # -- the graph ------------------------------------------------------------------
    def linear(self, builder, x: str, weight: str) -> str:
        """x @ W.T for the checkpoint tensor `weight` ([N, K] as stored): MatMulNBits with zero points 0
        plus the block-sum correction; the packed tensors are written once and shared by every graph."""
        if self.head is not None and weight in HEAD_WEIGHTS:
            return self.head.linear(builder, x, weight)
        g, store, key = builder.g, builder.store, f"{weight}.q{self.bits}a"
        n, k = store.shape(weight)
        packed, scales, lo = (builder.use_initializer(*t) for t in store.derived_together(
            [key, key + ".scales", key + ".offsets"], lambda: self.pack(store.source(weight).T)))
        shape = (n, -(-self.blocks(k) * self.bits // 8))
        zeros = builder.use_initializer(*store.derived(f"zero_points.{shape[0]}x{shape[1]}",
                                                       lambda: np.zeros(shape, np.uint8)))
        sums_key = f"block_sums.{k}.{self.block_size}.q8"
        sums_scheme = replace(INT8, block_size=self.block_size)  # E's ones and zeros are exact on its grid
        e, e_scales = (builder.use_initializer(*t) for t in store.derived_together(
            [sums_key, sums_key + ".scales"], lambda: sums_scheme.pack(self.block_sums(k))))
        sums = g.op("MatMulNBits", x, e, e_scales, domain="com.microsoft", K=k, N=self.blocks(k), bits=8,
                    block_size=self.block_size, accuracy_level=self.accuracy_level)
        y = g.op("MatMulNBits", x, packed, scales, zeros, domain="com.microsoft", K=k, N=n, bits=self.bits,
                 block_size=self.block_size, accuracy_level=self.accuracy_level)
        return g.op("Add", y, g.op("MatMul", sums, lo))

    def manifest(self) -> dict:
        return {"scheme": self.name, "kind": "weight-only", "target": "onnxruntime",
                "op": "com.microsoft.MatMulNBits + block offsets", "bits": self.bits, "block_size": self.block_size,
                "symmetric": False, "accuracy_level": self.accuracy_level,
                "output_head": (self.head or self).name, "embeddings": "float16",
                "kept_float32": "norms, loop gates, activations, block offsets"}


INT8 = WeightOnlyNBits("int8", 8, 32)
# int4-asym's 8-bit head keeps Q8_0's grid: on SmolLM2-135M's Q4_1 file the int8 head's -2^7 scale cost about
# 1-5 points of top-1 agreement with llama.cpp (docs/benchmarks.md)
SCHEMES = {"int8": INT8, "int4": WeightOnlyNBits("int4", 4, 32, head=INT8),
           "int4-asym": AsymmetricNBits("int4-asym", 4, 32, head=WeightOnlyNBits("int8-127", 8, 32, full_range=False)),
           "int8-dq": DynamicInt8("int8-dq", head=INT8),  # opt-in: see pltkit/quant/dynamic.py
           "int8-dq-sq": DynamicInt8("int8-dq-sq", head=INT8, alpha=0.65, on_head=("mlp.down_proj.weight",))}


# --- static Q/DQ schemes for TensorRT (strongly typed: precision comes from Q/DQ) ---------------
LAYER_PARTS = ("inv_smooth", "x_scale", "w", "w_scales", "w_zero")  # what StaticQDQ stores per layer


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
    calibrated = True  # an export needs activation ranges first (with_calibration)
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
        return smoothquant(w, amax, self.alpha)

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

        def make():
            parts = self.quantized_layer(np.asarray(store.source(weight), np.float32).T, self.amax[weight])
            return [parts[p] for p in LAYER_PARTS]

        inv_m, xs, wq, ws, wz = (builder.use_initializer(*t) for t in store.derived_together(
            [f"{weight}.{self.name}.{p}" for p in LAYER_PARTS], make))
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
