"""Asymmetric int4 (`int4-asym`: min/max blocks with an offset each, the form that keeps llama.cpp
Q4_1's numbers): the packed format against its numpy statement, ONNX Runtime's MatMulNBits against
that statement, Q4_1-grid weights coming back to within float rounding, and an exported default
model against a torch reference that computes with the same weights."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pltkit.quant.schemes import SCHEMES

ASYM = SCHEMES["int4-asym"]


def q4_1_grid(k: int, n: int, seed: int = 0) -> np.ndarray:
    """W [K, N] as llama.cpp's Q4_1 stores it and gguf dequantizes it: per block of 32 along K,
    d = (max - min) / 15 and m = min as float16, q = min(15, trunc((x - min) / d + 0.5)), x' = d * q + m."""
    x = np.random.default_rng(seed).normal(size=(n, k // 32, 32)).astype(np.float32)
    x[0, 0] += 3  # a block far from zero: all its weights positive
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    d = (hi - lo) / 15
    q = np.clip(np.trunc((x - lo) / d + np.float32(0.5)), 0, 15)
    d, m = d.astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
    return (d * q + m).reshape(n, k).T


def matmul_nbits(scheme, tensors, x: np.ndarray, k: int, n: int, accuracy_level: int) -> np.ndarray:
    """x @ W by one MatMulNBits node on ONNX Runtime's CPU from the packed codes and scales; for
    int4-asym with zero points 0, its offsets added as (x @ E) @ lo in numpy."""
    import onnxruntime as ort

    packed, scales, lo = tensors
    inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")]
    if lo is not None:
        inits.append(numpy_helper.from_array(np.zeros((n, -(-scales.shape[1] * scheme.bits // 8)), np.uint8), "z"))
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"][:len(inits) + 1], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=scheme.bits, block_size=scheme.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return y if lo is None else y + (x @ scheme.block_sums(k)) @ lo


def test_ort_packing_equals_numpy_reference():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(200, 48)).astype(np.float32)  # K not a multiple of the block
    w[:32, :3] = np.abs(w[:32, :3]) + 0.3  # blocks without 0 in their range
    w[32:64, 5] = 0.7  # a constant block
    packed, scales, lo = ASYM.pack(w)
    q_ref, scales_ref, lo_ref = ASYM.reference_quantize(w)
    off = np.abs(ASYM.unpack(packed) - q_ref).reshape(48, -1)[:, :200]  # padding past K is unused
    print(f"codes differing {np.mean(off > 0):.4%}, scales max|diff| {np.abs(scales - scales_ref).max():.1e}")
    assert off.max() == 0 and np.array_equal(scales, scales_ref) and np.array_equal(lo, lo_ref)
    assert np.array_equal(lo, np.pad(w, ((0, 24), (0, 0)), mode="edge").reshape(-1, 32, 48).min(1))
    # half a step of error at most (min/max: nothing is clipped)
    err = np.abs(ASYM.dequantize(packed, scales, lo, 200) - w)
    step = np.repeat(scales.T, ASYM.block_size, 0)[:200]
    assert (err <= step / 2 * (1 + 1e-5)).all()
    assert err[32:64, 5].max() == 0  # the constant block exactly
    # ONNX Runtime computes with these weights: float32 compute (accuracy_level 0) to float rounding
    x = rng.normal(size=(3, 200)).astype(np.float32)
    want = x @ ASYM.dequantize(packed, scales, lo, 200)
    got = matmul_nbits(ASYM, (packed, scales, lo), x, 200, 48, 0)
    print(f"ORT MatMulNBits vs x @ dequantize max|diff| {np.abs(got - want).max():.1e}")
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_q4_1_grid_weights_come_back_to_float_rounding():
    w = q4_1_grid(256, 64)
    tensors = ASYM.pack(w)
    err = np.abs(ASYM.dequantize(*tensors, 256) - w)
    print(f"Q4_1 grid max|dequantized - w| {err.max():.1e} (max|w| {np.abs(w).max():.2f})")
    assert err.max() <= 4 * np.finfo(np.float32).eps * np.abs(w).max()
    x = np.random.default_rng(1).normal(size=(4, 256)).astype(np.float32)
    got, want = matmul_nbits(ASYM, tensors, x, 256, 64, 0), x @ w
    print(f"ORT x @ W vs numpy max|diff| {np.abs(got - want).max():.1e}")
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max() * 256 ** 0.5
    # symmetric int4 re-quantizes the same weights: a step's fraction off
    int4 = SCHEMES["int4"]
    err = np.abs(int4.dequantize(*int4.pack(w), 256) - w).max()
    print(f"int4 (symmetric): max|dequantized - w| {err:.1e}")
    assert err > 0.01


def test_head_on_the_q8_0_grid():
    """int4-asym's 8-bit head: s = max|w| / 127, codes within +-127, so Q8_0 weights (x = q * d, d = amax / 127
    as float16) come back to float rounding; ONNX Runtime computes with them."""
    head = ASYM.head
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, size=(64, 8, 32)).astype(np.float32)
    q[:, :, 0] = 127 * np.sign(rng.normal(size=(64, 8)))  # Q8_0: the entry of largest magnitude is +-127
    d = rng.uniform(1e-3, 1e-2, size=(64, 8, 1)).astype(np.float16).astype(np.float32)
    w = (q * d).reshape(64, 256).T  # [K, N]
    packed, scales = head.pack(w)
    err = np.abs(head.dequantize(packed, scales, 256) - w)
    int8_err = np.abs(SCHEMES["int8"].dequantize(*SCHEMES["int8"].pack(w), 256) - w).max()
    print(f"int8-127 on a Q8_0 grid: max|dequantized - w| {err.max():.1e} (int8's -128 scale: {int8_err:.1e})")
    assert err.max() <= 2 * np.finfo(np.float32).eps * np.abs(w).max() < int8_err
    x = rng.normal(size=(3, 256)).astype(np.float32)
    got = matmul_nbits(head, (packed, scales, None), x, 256, 64, 0)
    assert np.abs(got - x @ w).max() < 1e-5 * np.abs(x @ w).max()


def exported_layer(scheme, w: np.ndarray, folder):
    """x -> x @ W by `scheme`'s linear layer as the exporter writes it (its weight store and graph
    builder), on an ONNX Runtime CPU session."""
    import onnxruntime as ort

    from pltkit.export.artifact import IR_VERSION, OPSET, WeightStore
    from pltkit.export.builder import Builder
    from pltkit.export.graph import FLOAT

    store = WeightStore(folder / "weights.bin", {"w": np.ascontiguousarray(w.T)}.__getitem__)
    b = Builder(None, store, OPSET, "gqa", quant=scheme)  # a linear layer reads no config
    b.g.output(scheme.linear(b, b.g.input("x", FLOAT, [None, w.shape[0]]), "w"), "y", FLOAT, [None, w.shape[1]])
    store.close()
    model = helper.make_model(b.g.graph("layer"), ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, folder / "layer.onnx")
    session = ort.InferenceSession(str(folder / "layer.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def test_block_sums_are_those_of_the_rounded_activations(tmp_path):
    """int4-asym computes as llama.cpp's Q4_1 x Q8_1 does: x rounded to 8 bits per block of 32 (d = amax / 127),
    and both the product with the codes and the block sums that the offsets multiply taken from the rounded x.
    The exported layer follows that statement (with float32 d, where Q8_1 stores float16) to float rounding;
    sums of the unrounded x (the form before) do not."""
    k, n = 256, 64
    w = q4_1_grid(k, n, seed=3)
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(3, k)) * rng.uniform(0.1, 4, size=k)).astype(np.float32)
    packed, scales, lo = ASYM.pack(w)
    xb = x.reshape(3, -1, 32).astype(np.float64)
    d = np.abs(xb).max(-1) / 127  # [M, blocks]
    qa = np.round(xb / d[..., None])
    dot = np.einsum("mbi,nbi->mnb", qa, ASYM.unpack(packed))
    want = (dot * scales * d[:, None, :]).sum(-1) + (qa.sum(-1) * d) @ lo
    before = want - (qa.sum(-1) * d) @ lo + xb.sum(-1) @ lo
    got = exported_layer(ASYM, w, tmp_path)(x)
    err, err_before = np.abs(got - want).max(), np.abs(before - want).max()
    print(f"max|layer - Q4_1 x Q8_1| {err:.1e}; float block sums: {err_before:.1e} (max|y| {np.abs(want).max():.1f})")
    assert ASYM.accuracy_level == 4
    assert err < 1e-5 * np.abs(want).max() and err_before > 100 * err


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The default model as int4-asym (int8 compute throughout, accuracy_level 4) and as int4-asym with float32
    compute throughout (0)."""
    from pltkit.export.artifact import export

    import subprocess

    d = tmp_path_factory.mktemp("int4asym")
    forms = {"float32 compute": replace(ASYM, accuracy_level=0, head=replace(ASYM.head, accuracy_level=0))}
    out = {name: export("default", d / name.replace(" ", "-"), quant=scheme) for name, scheme in forms.items()}
    # the shipped form through the command line
    subprocess.run(["plt-export", "default", "--int4-asym", "--no-eval", "-o", str(d / "int4-asym")], check=True,
                   capture_output=True)
    return {"int4-asym": d / "int4-asym", **out}


@pytest.fixture(scope="module")
def exported(artifacts):
    return artifacts["int4-asym"]


def test_exported_layers_follow_the_format(exported):
    import json

    import pltkit

    model = onnx.load(exported / "decode.onnx")
    init = {t.name: t for t in model.graph.initializer}
    weight = "model.layers.1.mlp.down_proj.weight"
    src = pltkit.load_model("default").state_dict()[weight].numpy().T
    key = f"{weight}.q4a"
    packed, scales, lo = (numpy_helper.to_array(init[key + p]) for p in ("", ".scales", ".offsets"))
    q_ref, scales_ref, _ = ASYM.reference_quantize(src)
    assert np.array_equal(ASYM.unpack(packed), q_ref) and np.array_equal(scales, scales_ref)
    assert np.array_equal(lo, src.reshape(-1, 32, src.shape[1]).min(1))
    nodes = {n.input[1]: {a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"}
    head = nodes.pop("model.embed_tokens.weight.q8-127")  # tied: the head is the table
    assert head["bits"] == 8 and head["accuracy_level"] == 4
    sums = [a for name, a in nodes.items() if name.startswith("block_sums.")]
    layers = [a for name, a in nodes.items() if not name.startswith("block_sums.")]
    assert len(layers) >= 4 * 4 and all(a["bits"] == 4 and a["accuracy_level"] == 4 for a in layers)
    assert sums and all(a["bits"] == 8 and a["accuracy_level"] == 4 for a in sums)
    offsets = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1].endswith(".offsets")]
    assert len(offsets) == len(layers)
    manifest = json.loads((exported / "pltkit.json").read_text())
    assert manifest["precision"] == "int4-asym" and manifest["quantization"]["symmetric"] is False


# max |logit difference| from the torch reference with the same weights, over 48 positions (logits span
# about 26), where the int4 weights themselves move the logits by about 0.65: float32 compute leaves float
# rounding (measured 2e-5); int8 activations (per block of 32) in every layer and the head about 0.10, and
# 0.16 with float block sums beside them (measured, seed 0)
MAX_LOGIT_DIFF = {"float32 compute": 1e-3, "int4-asym": 0.15}


@pytest.mark.parametrize("form", list(MAX_LOGIT_DIFF))
def test_exported_model_matches_torch_with_the_same_weights(artifacts, form):
    """The torch reference computes with the dequantized weights: int4-asym's in the linear layers, the
    8-bit head's, the float16 embeddings'."""
    import pltkit
    from pltkit.runtime.artifact import Artifact
    from pltkit.runtime.ort_backend import OrtBackend

    ids = np.random.default_rng(0).integers(0, 4096, (1, 48))
    model = pltkit.load_model("default")
    with torch.no_grad():
        float_logits = model(torch.from_numpy(ids)).numpy()[0]
        head, emb = ASYM.head, model.model.embed_tokens.weight.numpy().copy()  # tied: the head is the table
        for name, t in model.state_dict().items():
            if name.endswith("_proj.weight"):
                w = t.numpy().T
                t.copy_(torch.from_numpy(ASYM.dequantize(*ASYM.pack(w), w.shape[0]).T.copy()))
        model.model.embed_tokens.weight.copy_(torch.from_numpy(emb.astype(np.float16).astype(np.float32)))
        head_w = torch.from_numpy(head.dequantize(*head.pack(emb.T), emb.shape[1]).T.astype(np.float32))
        model.logits = lambda h: torch.nn.functional.linear(model.model.norm(h), head_w)
        want = model(torch.from_numpy(ids)).numpy()[0]
    ort = OrtBackend(Artifact.open(artifacts[form]), 1)
    got = ort.prefill(ids, ort.new_state(1))[0][0]
    diff, float_diff = np.abs(got - want).max(), np.abs(want - float_logits).max()
    agree = np.mean(got.argmax(-1) == want.argmax(-1))
    print(f"{form}: max|ort - torch with the same weights| {diff:.2e} "
          f"(the int4 weights move torch's logits by {float_diff:.2f}; logits span {np.ptp(want):.1f}); "
          f"top-1 agreement {agree:.3f}")
    assert diff < MAX_LOGIT_DIFF[form] < float_diff / 2
    assert agree >= (1.0 if form == "float32 compute" else 0.95)
