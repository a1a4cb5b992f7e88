"""`int8-dq` (int8 weights per output column, activations quantized per tensor at run time by
DynamicQuantizeMatMul): the format in numpy, ONNX Runtime's op against that statement, the tensors an
export writes, and an exported tiny model against a torch reference that computes with the same weights."""

import json
import subprocess

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from synth import make_checkpoint, make_config

from pltkit.quant.schemes import SCHEMES

DQ = SCHEMES["int8-dq"]


def uint8_per_tensor(x: np.ndarray) -> np.ndarray:
    """x as DynamicQuantizeLinear leaves it: one uint8 scale and zero point for the whole tensor, the range
    widened to hold 0, s = (max - min) / 255, zp = round(-min / s), x' = (clip(round(x / s) + zp, 0, 255) - zp) * s."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / s), 0, 255)
    return ((np.clip(np.round(x / s) + zp, 0, 255) - zp) * s).astype(np.float32)


def dqmm(q: np.ndarray, scales: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x @ W by one DynamicQuantizeMatMul node on ONNX Runtime's CPU."""
    import onnxruntime as ort

    node = helper.make_node("DynamicQuantizeMatMul", ["x", "b", "s"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(q, "b"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_format_and_onnxruntime_follow_the_numpy_statement():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(200, 48)).astype(np.float32)
    w[:, 7] = 0  # an all-zero column
    w[3, 9] = -40  # one large weight: its column's scale
    q, scales = DQ.pack(w)
    assert q.dtype == np.int8 and q.shape == (200, 48) and scales.shape == (48,) and scales.dtype == np.float32
    amax = np.abs(w).max(0)
    assert np.array_equal(scales, np.where(amax == 0, 1, amax / np.float32(127)).astype(np.float32))
    assert np.abs(q).max() == 127 and (q[:, 7] == 0).all() and q[3, 9] == -127
    # half a step of error at most, nothing clipped; the large weight exactly
    err = np.abs(DQ.dequantize(q, scales) - w)
    print(f"max|dequantized - w| / step {(err / scales).max():.3f}")
    assert (err <= scales / 2 * (1 + 1e-5)).all() and err[3, 9] == 0
    # the op: x quantized per tensor (uint8) over all rows at once, times the dequantized weights. A 4-D
    # input [R, B, S, K] as the graphs give it; one row with a large value coarsens the other rows' grid too
    x = rng.normal(size=(2, 1, 3, 200)).astype(np.float32)
    x[1, 0, 0, 5] = 30
    got, want = dqmm(q, scales, x), uint8_per_tensor(x) @ DQ.dequantize(q, scales)
    per_row = np.concatenate([uint8_per_tensor(r) for r in x.reshape(-1, 1, 200)]) @ DQ.dequantize(q, scales)
    print(f"ORT vs numpy statement max|diff| {np.abs(got - want).max():.1e}; "
          f"vs a scale per row {np.abs(got.reshape(-1, 48) - per_row).max():.1e}")
    assert got.shape == (2, 1, 3, 48) and np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    assert np.abs(got.reshape(-1, 48) - per_row).max() > 1e-2 * np.abs(want).max()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny PLT-2 checkpoint (head_dim 16: the GQA graphs rotate themselves) exported by plt-export --int8-dq."""
    d = tmp_path_factory.mktemp("int8dq")
    make_checkpoint(d / "ckpt", make_config(plt_num_loops=2, head_dim=16), seed=3)
    subprocess.run(["plt-export", str(d / "ckpt"), "--int8-dq", "--no-eval", "-o", str(d / "art")], check=True,
                   capture_output=True)
    return d / "ckpt", d / "art"


def test_exported_layers_follow_the_format(exported):
    from safetensors.numpy import load_file

    ckpt, art = exported
    src = load_file(ckpt / "model.safetensors")
    model = onnx.load(art / "decode.gqa.onnx")
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(nodes) == 2 * 4  # per layer: q/k/v packed, o, gate/up packed, down
    for n in nodes:
        w = np.concatenate([src[p + ".weight"] for p in n.input[1].removesuffix(".weight.q8col").split("+")])
        q, scales = DQ.reference_quantize(w.T)
        assert np.array_equal(init[n.input[1]], q) and np.array_equal(init[n.input[2]], scales), n.input[1]
    head = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert [n.input[1] for n in head] == ["lm_head.weight.q8"]  # the output head: int8 MatMulNBits
    manifest = json.loads((art / "pltkit.json").read_text())
    assert manifest["precision"] == "int8-dq" and manifest["quantization"]["output_head"] == "int8"


# max |logit difference| from the torch reference with the same weights, over 2 prefill chunks and 8 decode
# steps of the tiny model (seed 3: logits span about 7.7; the int8 weights themselves move them by 0.10).
# What is left is the activations' run-time uint8 quantization, one scale per tensor: measured 0.145
# (prefill; decode 0.11). The bound is twice that, looser than float rounding by far because every one of
# the 16 quantized products a token passes through (2 loops x 2 layers x 4) adds its rounding; int8
# (MatMulNBits, int8 activations per block of 32) leaves 0.11 on the same model and tokens.
MAX_LOGIT_DIFF = 0.3


def ort_logits(art, ids: np.ndarray, attention: str = "gqa") -> np.ndarray:
    """The artifact's logits for ids [1, 24] as the engine feeds them: prefill chunks of 9 and 7
    tokens, then 8 decode steps."""
    from pltkit.runtime.artifact import Artifact
    from pltkit.runtime.ort_backend import OrtBackend

    ort = OrtBackend(Artifact.open(art), 1, attention)
    state, got = ort.new_state(1), []
    for a, b in ((0, 9), (9, 16)):
        logits, state = ort.prefill(ids[:, a:b], state)
        got.append(logits[0])
    for t in range(16, 24):
        logits, state = ort.decode(ids[:, t], state)
        got.append(logits)
    return np.concatenate(got)


@pytest.mark.parametrize("attention", ["gqa", "kvbuffer"])
def test_exported_model_matches_torch_with_the_same_weights(exported, attention):
    from pltkit.runtime.backends import open_backend

    ckpt, art = exported
    ref = open_backend(ckpt, threads=1)
    ids = np.random.default_rng(0).integers(0, 300, (1, 24))
    with torch.no_grad():
        float_logits = ref.model(torch.from_numpy(ids)).numpy()[0]
        for name, t in ref.model.state_dict().items():
            if name.endswith("_proj.weight"):
                t.copy_(torch.from_numpy(DQ.dequantize(*DQ.pack(t.numpy().T)).T.copy()))
            elif name == "lm_head.weight":
                k = t.shape[1]
                t.copy_(torch.from_numpy(DQ.head.dequantize(*DQ.head.pack(t.numpy().T), k).T.copy()))
            elif name == "model.embed_tokens.weight":
                t.copy_(t.half().float())
        want = ref.model(torch.from_numpy(ids)).numpy()[0]
    got = ort_logits(art, ids, attention)
    diff, float_diff = np.abs(got - want).max(), np.abs(want - float_logits).max()
    print(f"{attention}: max|ort - torch with the same weights| {diff:.2e} (the int8 weights move torch's "
          f"logits by {float_diff:.1e}; logits span {np.ptp(want):.2f})")
    assert diff < MAX_LOGIT_DIFF and np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9
