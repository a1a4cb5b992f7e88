"""Quantized artifacts: the packed format against its numpy reference, and accuracy on the
default model's held-out code against the float32 reference."""

import json
import subprocess

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pltkit.cli.eval import accuracy_report
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
    for name in ("int8", "int4"):
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


def test_quantized_artifact_completes(quantized):
    out = subprocess.run(["plt-complete", "--model", str(quantized / "int4"), "--json", "--max-tokens", "8",
                          "def add(a, b):"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["tokens"]


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    """The TensorRT forms, calibrated on the held-out split like `plt-export --int8 --target trt`."""
    from pltkit.cli.export import calibrate
    from pltkit.quant.schemes import QDQ_SCHEMES

    d = tmp_path_factory.mktemp("qdq")
    amax = calibrate("default", None, windows=4)
    assert len(amax) == 4 * 7 + 1 and min(amax.values()) > 0  # every linear layer and the head
    for name in ("int8-qdq", "fp8"):
        export("default", d / name, quant=QDQ_SCHEMES[name].with_calibration(amax))
    return d


@pytest.mark.parametrize("name", ["int8-qdq", "fp8"])
def test_qdq_weights_dequantize_in_onnxruntime_as_in_numpy(qdq, name):
    import onnxruntime as ort
    from onnx import helper

    from pltkit.quant.schemes import QDQ_SCHEMES

    model = onnx.load(qdq / name / "decode.onnx")
    init = {t.name: t for t in model.graph.initializer}
    key = f"model.layers.1.mlp.up_proj.weight.{name}"
    wq, scales = numpy_helper.to_array(init[key]), numpy_helper.to_array(init[key + ".scales"])
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], axis=1)], "dq", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [init[key], init[key + ".scales"], init[key + ".zero"]])
    for t, n in zip(graph.initializer, "wsz"):
        t.name = n
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                                  ir_version=10).SerializeToString())
    got = sess.run(None, {})[0]
    want = wq.astype(np.float32) * scales
    import pltkit
    src = pltkit.load_model("default").state_dict()["model.layers.1.mlp.up_proj.weight"].numpy().T
    rel = np.abs(want - src).max() / np.abs(src).max()
    print(f"{name}: ORT vs numpy dequantize max|diff| {np.abs(got - want).max():.1e}; "
          f"max error vs float weights {rel:.2%} of the largest weight")
    assert np.array_equal(got, want) and np.array_equal(wq, QDQ_SCHEMES[name].weight(src)[0])


# On the first 6 held-out windows. int8/int4: the targets. int8-qdq/fp8: guards below
# the full-set figures (93.75 % / 96.82 %, see docs/design.md), whose targets are not yet met.
MIN_AGREEMENT_MAX_PPL = {"int8": (0.98, 0.01), "int4": (0.93, 0.06), "int8-qdq": (0.92, 0.01), "fp8": (0.95, 0.02)}


@pytest.mark.parametrize("name", list(MIN_AGREEMENT_MAX_PPL))
def test_accuracy_against_float32(quantized, qdq, name):
    artifact = (quantized if name in SCHEMES else qdq) / name
    report = accuracy_report(artifact, "default", threads=2, limit=6)
    print(name, json.dumps(report))
    agreement, ppl = MIN_AGREEMENT_MAX_PPL[name]
    assert report["top1_agreement"] >= agreement and report["perplexity_change"] <= ppl


def test_calibration_on_a_users_folder(tmp_path):
    from pltkit.cli.export import calibrate

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f(x):\n    return [i * x for i in range(10)]\n" * 40)
    amax = calibrate("default", tmp_path, windows=2)
    assert len(amax) == 29 and all(v > 0 for v in amax.values())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .py files"):
        calibrate("default", tmp_path / "empty")
    out = subprocess.run(["plt-export", "default", "--fp8", "--calib", str(tmp_path / "empty"), "-o",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert out.returncode == 2 and "no .py files" in out.stderr and not (tmp_path / "x").exists()
