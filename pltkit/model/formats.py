"""What pltkit writes and reads, defined once for the writer and the reader: the artifact's format
constants and the float types (their names in the manifest, ONNX, numpy, safetensors and torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MANIFEST = "pltkit.json"
ARTIFACT_FORMAT = "pltkit-artifact"
# 2: prefill.gqa.onnx (in version 1 the gqa set's prefill is prefill.onnx); 3: prefill.gqa.onnx takes
# logits_from, the first position the head runs on (required, so a runtime that does not feed it refuses the
# artifact by its version instead of failing at its first prefill)
ARTIFACT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


@dataclass(frozen=True)
class FloatType:
    name: str  # the artifact's and torch's name: float32, float16, bfloat16
    short: str  # the manifest's precision name and Triton's: fp32, fp16, bf16
    onnx: int  # ONNX element type (TensorProto.DataType; written out: importing onnx takes 0.7 s)
    safetensors: str  # the safetensors header's dtype

    @property
    def numpy(self) -> np.dtype:
        if self.name == "bfloat16":
            import ml_dtypes  # numpy's bfloat16; its import takes 0.7 s, so only when asked for
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.name)

    def torch(self):
        import torch  # only the layers that run torch ask for it
        return getattr(torch, self.name)


FLOAT_TYPES = {t.name: t for t in (
    FloatType("float32", "fp32", 1, "F32"),
    FloatType("float16", "fp16", 10, "F16"),
    FloatType("bfloat16", "bf16", 16, "BF16"))}


def float_type(name: str) -> FloatType:
    """The float type named `name` (ValueError naming the known ones otherwise)."""
    if name not in FLOAT_TYPES:
        raise ValueError(f"unknown float type {name!r} (known: {', '.join(FLOAT_TYPES)})")
    return FLOAT_TYPES[name]
