"""`int8-dq-sq` (int8-dq with SmoothQuant, calibrated on the held-out split): on a tiny model whose
layer inputs carry one outlier channel, the exported layers follow the numpy statement (smoothing
from the calibrated ranges, down_proj on int8 MatMulNBits) and the logits follow a torch reference
that computes with the same weights; plain int8-dq on the same model does not come close."""

import subprocess

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from synth import make_checkpoint, make_config, random_weights
from test_int8_dq import ort_logits

from pltkit.quant.schemes import SCHEMES

SQ, DQ = SCHEMES["int8-dq-sq"], SCHEMES["int8-dq"]
OUTLIER, GAIN = 5, 40.0  # channel 5 of every norm that feeds a smoothed layer, 40 times larger
NORM_FEEDS = {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}


def outlier_weights(cfg: dict, seed: int) -> dict:
    """Random weights with the norm gains of channel OUTLIER times GAIN and the weights reading it divided
    by GAIN: the float model computes the same, its layers' inputs have an outlier channel."""
    w = random_weights(cfg, seed)
    for i in range(cfg["num_hidden_layers"]):
        for norm, layers in NORM_FEEDS.items():
            w[f"model.layers.{i}.{norm}.weight"][OUTLIER] *= GAIN
            for layer in layers:
                w[f"model.layers.{i}.{layer}.weight"][:, OUTLIER] /= GAIN
    return w


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny PLT-2 checkpoint (head_dim 16: GQA rotates itself, q/k/v packed) exported by plt-export
    --int8-dq-sq and --int8-dq, and the ranges --int8-dq-sq calibrates (the same windows, the same model)."""
    from pltkit.train.calibrate import calibrate

    d = tmp_path_factory.mktemp("int8dqsq")
    cfg = make_config(plt_num_loops=2, head_dim=16)
    make_checkpoint(d / "ckpt", cfg, weights=outlier_weights(cfg, 3))
    for flag in ("--int8-dq-sq", "--int8-dq"):
        subprocess.run(["plt-export", str(d / "ckpt"), flag, "--no-eval", "-o", str(d / flag)], check=True,
                       capture_output=True)
    return d / "ckpt", {"int8-dq-sq": d / "--int8-dq-sq", "int8-dq": d / "--int8-dq"}, calibrate(d / "ckpt", None)


def test_exported_layers_are_smoothed_from_the_calibrated_ranges(exported):
    from safetensors.numpy import load_file

    ckpt, arts, amax = exported
    src = load_file(ckpt / "model.safetensors")
    model = onnx.load(arts["int8-dq-sq"] / "decode.gqa.onnx")
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = [n for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(nodes) == 2 * 3  # per layer: q/k/v packed, o, gate/up packed (down_proj: MatMulNBits)
    for n in nodes:
        weight = n.input[1].removesuffix(".weight.q8col.int8-dq-sq") + ".weight"
        w = np.concatenate([src[p + ".weight"] for p in weight.removesuffix(".weight").split("+")]).T
        mul = producer[n.input[0]]
        assert mul.op_type == "Mul", weight
        inv_m = init[mul.input[1]]
        m = SQ.smoothing(w, SQ.with_calibration(amax).input_amax(weight))
        assert np.allclose(inv_m, 1 / m, rtol=1e-6), weight
        q, scales = init[n.input[1]], init[n.input[2]]
        step_err = np.abs(DQ.dequantize(q, scales) - w / inv_m[:, None]) / scales
        assert step_err.max() <= 0.5 + 1e-3, weight  # the smoothed weights, to half a step
        if "o_proj" not in weight:  # the outlier channel's input is divided by far more than the others'
            assert m[OUTLIER] > 5 * np.median(m), weight
    nbits = sorted(n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits")
    assert nbits == ["lm_head.weight.q8", "model.layers.0.mlp.down_proj.weight.q8",
                     "model.layers.1.mlp.down_proj.weight.q8"]


def same_weights_model(ckpt, scheme, amax):
    """The torch reference with the weights `scheme` computes with: each layer's W = dequantized(W * m) / m,
    down_proj and the head as int8 MatMulNBits, float16 embeddings."""
    from pltkit.runtime.backends import open_backend

    ref = open_backend(ckpt, threads=1).model
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            w = t.numpy().T
            if name.endswith("down_proj.weight") and scheme.on_head or name == "lm_head.weight":
                t.copy_(torch.from_numpy(scheme.head.dequantize(*scheme.head.pack(w), w.shape[0]).T.copy()))
            elif name.endswith("_proj.weight") and scheme.alpha is not None:
                q, scales, inv_m = scheme.smoothed_pack(w, amax[name])
                t.copy_(torch.from_numpy((scheme.dequantize(q, scales) * inv_m[:, None]).T.copy()))
            elif name.endswith("_proj.weight"):
                t.copy_(torch.from_numpy(scheme.dequantize(*scheme.pack(w)).T.copy()))
            elif name == "model.embed_tokens.weight":
                t.copy_(t.half().float())
    return ref


def max_logit_diff(ckpt, art, scheme, amax) -> tuple[float, float]:
    """(max |ort - torch with the same weights|, top-1 agreement) over 2 prefill chunks and 8 decode steps."""
    ids = np.random.default_rng(0).integers(0, 300, (1, 24))
    with torch.no_grad():
        want = same_weights_model(ckpt, scheme, amax)(torch.from_numpy(ids)).numpy()[0]
    got = ort_logits(art, ids)
    return float(np.abs(got - want).max()), float(np.mean(got.argmax(-1) == want.argmax(-1)))


# max |logit difference| from torch with the same weights (what is left: the run-time uint8 activations,
# one scale per tensor). Measured on this model (seed 3, logits spanning about 8): int8-dq-sq 0.195 with
# 96 % top-1, plain int8-dq 2.70 (the outlier channel, 40 times the others, leaves them a few levels of the
# tensor's scale). The bound is twice int8-dq-sq's; int8-dq must lie above twice the bound.
MAX_LOGIT_DIFF = 0.4


def test_smoothed_model_matches_torch_with_the_same_weights(exported):
    ckpt, arts, amax = exported
    diff, agree = max_logit_diff(ckpt, arts["int8-dq-sq"], SQ.with_calibration(amax), amax)
    plain, _ = max_logit_diff(ckpt, arts["int8-dq"], DQ, amax)
    print(f"max|ort - torch with the same weights| int8-dq-sq {diff:.3f} (top-1 {agree:.2f}), int8-dq {plain:.3f}")
    assert diff < MAX_LOGIT_DIFF and agree >= 0.9
    assert plain > 2 * MAX_LOGIT_DIFF  # the outlier channel is one per-tensor quantization cannot hold
