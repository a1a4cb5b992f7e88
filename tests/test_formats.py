"""The shared float types agree with ONNX, numpy and torch, and keep the CLIs' start light."""

import subprocess
import sys

import ml_dtypes
import numpy as np
import torch
from onnx import TensorProto

from pltkit.model.formats import FLOAT_TYPES, float_type


def test_float_types_name_the_same_type_everywhere():
    want = {"float32": (TensorProto.FLOAT, np.float32, torch.float32, "F32"),
            "float16": (TensorProto.FLOAT16, np.float16, torch.float16, "F16"),
            "bfloat16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16, torch.bfloat16, "BF16")}
    assert list(FLOAT_TYPES) == list(want)
    for name, (onnx_type, np_type, torch_type, st) in want.items():
        t = float_type(name)
        assert (t.onnx, t.numpy, t.torch(), t.safetensors) == (onnx_type, np.dtype(np_type), torch_type, st)


def test_an_unknown_float_type_names_the_known_ones():
    try:
        float_type("float8")
    except ValueError as e:
        assert "float32, float16, bfloat16" in str(e)
    else:
        raise AssertionError("float8 accepted")


def test_the_clis_argument_checks_import_neither_onnx_nor_torch():
    """A usage error or --help answers at once: onnx (with ml_dtypes) takes 0.7 s to import, torch 1 s."""
    code = ("import sys, pltkit.cli.args, pltkit.cli.eval, pltkit.cli.serve; "
            "print(sorted(m for m in ('onnx', 'ml_dtypes', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
