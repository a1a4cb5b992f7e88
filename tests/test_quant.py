"""Quantized artifacts: the packed format against its numpy reference, and accuracy on the
default model's held-out code against the float32 reference."""

import json
import subprocess

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pltkit.train.accuracy import accuracy_report
from pltkit.export.artifact import export
from pltkit.quant.schemes import SCHEMES


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_ort_packing_equals_numpy_reference(name):
    scheme = SCHEMES[name]
    w = np.random.default_rng(0).normal(size=(200, 48)).astype(np.float32)  # K not a multiple of the block
    packed, scales = scheme.pack(w)
    q_ref, scales_ref = scheme.reference_quantize(w)
    off = np.abs(scheme.unpack(packed) - q_ref).reshape(48, -1)[:, :200]  # padding past K is unused
    print(f"{name}: scales max|diff| {np.abs(scales - scales_ref).max():.1e}, "
          f"codes differing {np.mean(off > 0):.4%} (by at most {off.max()})")
    assert np.array_equal(scales, scales_ref) and off.max() <= 1 and np.mean(off > 0) < 1e-3
    # half a step of error, a whole step for the opposite extreme (clipped at 2^(bits-1) - 1)
    err = np.abs(scheme.dequantize(packed, scales, 200) - w)
    step = np.repeat(np.abs(scales).T, scheme.block_size, 0)[:200]
    assert (err <= step + 1e-6).all() and np.mean(err <= step / 2 + 1e-6) > 0.99


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    for name in ("int8", "int4", "int8-dq"):
        export("default", d / name, quant=SCHEMES[name])
    return d


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_exported_weights_follow_the_format(quantized, name):
    import pltkit
    scheme = SCHEMES[name]
    model = onnx.load(quantized / name / "decode.onnx")
    init = {t.name: t for t in model.graph.initializer}
    src = pltkit.load_model("default").state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    key = f"model.layers.0.mlp.down_proj.weight.q{scheme.bits}"
    packed, scales = numpy_helper.to_array(init[key]), numpy_helper.to_array(init[key + ".scales"])
    q_ref, scales_ref = scheme.reference_quantize(src.T)
    off = np.abs(scheme.unpack(packed) - q_ref)
    print(f"{name} down_proj: codes differing {np.mean(off > 0):.4%}, scales max|diff| "
          f"{np.abs(scales - scales_ref).max():.1e}")
    # scales exact; a code may differ by one where w/s falls on a rounding boundary
    assert off.max() <= 1 and np.mean(off > 0) < 1e-3 and np.array_equal(scales, scales_ref)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nodes and {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {4}
    manifest = json.loads((quantized / name / "pltkit.json").read_text())
    assert manifest["precision"] == name and manifest["quantization"]["bits"] == scheme.bits


PROMPT = "def add(a, b):"
# greedy tokens (of 8) that each form must share with the float32 reference before the first difference
# (all 8 on the machine these were set on; int4 keeps a margin for other CPUs' MatMulNBits kernels)
MIN_GREEDY_MATCH = {"int8": 8, "int4": 6, "int8-qdq": 8, "fp8": 8, "int8-dq": 8}


@pytest.fixture(scope="module")
def reference_completion():
    """plt-complete's greedy completion of PROMPT on the float32 PyTorch reference."""
    out = subprocess.run(["plt-complete", "--model", "default", "--backend", "torch", "--json", "--max-tokens", "8",
                          PROMPT], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["backend"] == "torch" and len(result["tokens"]) == 8, result
    return result


@pytest.mark.parametrize("name", ["int8", "int4", "int8-qdq", "fp8", "int8-dq"])
def test_quantized_artifact_completes(quantized, qdq, reference_completion, name):
    """plt-complete on the quantized artifact: its greedy tokens are the float32 reference's."""
    artifact = (quantized if name in SCHEMES else qdq[0]) / name
    out = subprocess.run(["plt-complete", "--model", str(artifact), "--json", "--max-tokens", "8",
                          PROMPT], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    got, want = result["tokens"], reference_completion["tokens"]
    matched = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    print(f"{name} ({result['backend']}): greedy tokens {got}, float32 reference {want}: "
          f"the first {matched} of 8 agree")
    assert result["backend"] == "ort" and len(got) == 8 and result["stop_type"] == "limit", result
    assert matched >= MIN_GREEDY_MATCH[name], (got, want)
    if matched == 8:
        assert result["text"] == reference_completion["text"]


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    """The TensorRT forms, calibrated on the held-out split like `plt-export --int8 --target trt`."""
    from pltkit.train.calibrate import calibrate
    from pltkit.quant.schemes import QDQ_SCHEMES

    d = tmp_path_factory.mktemp("qdq")
    amax = calibrate("default", None, windows=4)
    assert len(amax) == 4 * 7 + 1  # every linear layer and the head, per input channel
    assert all(a.shape == (256 if "down_proj" not in k else 768,) and a.max() > 0 for k, a in amax.items())
    for name in ("int8-qdq", "fp8"):
        export("default", d / name, quant=QDQ_SCHEMES[name].with_calibration(amax))
    return d, amax


@pytest.mark.parametrize("name", ["int8-qdq", "fp8"])
def test_qdq_weights_dequantize_in_onnxruntime_as_in_numpy(qdq, name):
    import onnxruntime as ort
    from onnx import helper

    from pltkit.quant.schemes import QDQ_SCHEMES

    d, amax = qdq
    model = onnx.load(d / name / "decode.onnx")
    init = {t.name: t for t in model.graph.initializer}
    weight = "model.layers.1.mlp.up_proj.weight"
    key = f"{weight}.{name}"
    wq, scales = numpy_helper.to_array(init[key + ".w"]), numpy_helper.to_array(init[key + ".w_scales"])
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], axis=1)], "dq", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [init[key + ".w"], init[key + ".w_scales"], init[key + ".w_zero"]])
    for t, n in zip(graph.initializer, "wsz"):
        t.name = n
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                                  ir_version=10).SerializeToString())
    got = sess.run(None, {})[0]
    want = wq.astype(np.float32) * scales
    import pltkit
    scheme = QDQ_SCHEMES[name]
    src = pltkit.load_model("default").state_dict()[weight].numpy().T
    ref = scheme.quantized_layer(src, amax[weight])
    smoothed = src / numpy_helper.to_array(init[key + ".inv_smooth"])[:, None]
    err = np.abs(want - smoothed)
    # int8: half a step. fp8 (3 mantissa bits): half an ulp, 2^-4 relative; subnormals 2^-10 of the scale
    bound = scales / 2 if name == "int8-qdq" else np.maximum(np.abs(smoothed) / 16, scales / 1024)
    print(f"{name}: ORT vs numpy dequantize max|diff| {np.abs(got - want).max():.1e}; "
          f"error vs the smoothed float weights at most {(err / bound).max():.3f} of its bound")
    assert np.array_equal(got, want) and all(np.array_equal(numpy_helper.to_array(init[f"{key}.{part}"]), v)
                                             for part, v in ref.items())
    assert (err <= bound * (1 + 1e-6)).all()


def test_smoothquant_leaves_the_product_unchanged():
    from pltkit.quant.schemes import QDQ_SCHEMES

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(5, 64)) * np.r_[50, np.ones(63)], rng.normal(size=(64, 16))  # channel 0: outliers
    scheme = QDQ_SCHEMES["int8-qdq"]
    m = scheme.smoothing(w, np.abs(x).max(0))
    assert m[0] > 3 * np.median(m) and np.allclose((x / m) @ (w * m[:, None]), x @ w)


def test_fp8_keeps_the_first_layer_float(qdq):
    d, _ = qdq
    model = onnx.load(d / "fp8" / "decode.onnx")
    quantized = {i.name for i in model.graph.initializer if i.name.endswith(".fp8.w")}
    assert quantized and not any(n.startswith("model.layers.0.") for n in quantized)
    assert "model.layers.0.*" in json.loads((d / "fp8" / "pltkit.json").read_text())["quantization"]["kept_float32"]


# On 6 held-out windows spread over the set: the targets (int8-qdq has none; it is held to 96 % / +1 %;
# int8-dq, opt-in, measured 97.3 % here and 96.3 % on the whole set, to 95 % / +1 %).
MIN_AGREEMENT_MAX_PPL = {"int8": (0.98, 0.01), "int4": (0.93, 0.06), "int8-qdq": (0.96, 0.01), "fp8": (0.97, 0.02),
                         "int8-dq": (0.95, 0.01)}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "int8-dq" else n
                                  for n in MIN_AGREEMENT_MAX_PPL])  # int8-dq: experimental, 40 s: with -m slow
def test_accuracy_against_float32(quantized, qdq, name):
    artifact = (quantized if name in SCHEMES else qdq[0]) / name
    report = accuracy_report(artifact, "default", threads=2, windows=6)
    print(name, json.dumps(report))
    agreement, ppl = MIN_AGREEMENT_MAX_PPL[name]
    assert report["top1_agreement"] >= agreement and report["perplexity_change"] <= ppl


def test_calibration_on_a_users_folder(tmp_path):
    from pltkit.train.calibrate import calibrate

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f(x):\n    return [i * x for i in range(10)]\n" * 40)
    amax = calibrate("default", tmp_path, windows=2)
    assert len(amax) == 29 and all(v.max() > 0 for v in amax.values())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .py files"):
        calibrate("default", tmp_path / "empty")
    out = subprocess.run(["plt-export", "default", "--fp8", "--calib", str(tmp_path / "empty"), "-o",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert out.returncode == 2 and "no .py files" in out.stderr and not (tmp_path / "x").exists()
