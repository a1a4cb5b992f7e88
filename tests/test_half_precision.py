"""float16 and bfloat16 artifacts (`plt-export --dtype`), the unquantized form for GPUs, checked
against the torch reference. float16 runs on ONNX Runtime's CPU provider; bfloat16 has no CPU
kernels there, so its graphs run on ONNX's reference evaluator, which rounds every op to
bfloat16. The bound: the artifact may differ from the float32 reference by at most twice what
the torch reference itself loses in the same float type (plus a small floor)."""

import ml_dtypes
import numpy as np
import pytest
import torch
from synth import make_checkpoint, make_config

import pltkit
from pltkit.export.artifact import ExportError, export
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.backends import open_backend
from pltkit.runtime.ort_backend import OrtBackend

CASES = {"L2-hidden": dict(plt_num_loops=2), "L3-query": dict(plt_num_loops=3, plt_gate_use_hidden_states=False)}
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}
IDS = np.random.default_rng(0).integers(0, 300, (1, 12))
PROMPT = 8  # prefill 8 tokens, then decode 4


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_checkpoint(d / "ckpt", make_config(**CASES[request.param]), seed=5)
    with torch.no_grad():
        want = pltkit.load_model(d / "ckpt")(torch.from_numpy(IDS)).numpy()
    return d, want


def torch_loss(ckpt, dtype: str, want) -> float:
    """max|logits - float32 logits| of the torch reference run in `dtype`."""
    with torch.no_grad():
        got = pltkit.load_model(ckpt, dtype=TORCH[dtype])(torch.from_numpy(IDS)).float().numpy()
    return float(np.abs(got - want).max())


def run_with_reference_evaluator(art: Artifact):
    """Prefill then decode on the kvbuffer graphs with onnx.reference: the buffers the graphs
    write in place are their present outputs."""
    from onnx.reference import ReferenceEvaluator

    sessions = {p: ReferenceEvaluator(str(art.graph_path(p, "kvbuffer"))) for p in ("prefill", "decode")}
    shapes = art.manifest["graphs"]["kvbuffer"]["decode"]["inputs"]
    cap = IDS.shape[1]
    state = {n[5:]: np.zeros([1 if d == "batch" else cap if d == "capacity" else 0 if isinstance(d, str) else d
                              for d in s], ml_dtypes.bfloat16)
             for n, s in shapes.items() if n.startswith("past_") and n != "past_len"}
    logits = []

    def call(phase, ids, pos):
        outs = sessions[phase].run(None, {"input_ids": ids, "past_len": np.array(pos, np.int64),
                                          **{"past_" + n: a for n, a in state.items()}})
        names = [o.name for o in sessions[phase].proto_.graph.output]
        out = dict(zip(names, outs))
        state.update({n: out["present_" + n] for n in state})
        return out["logits"]

    logits.append(call("prefill", IDS[:, :PROMPT], 0))
    for t in range(PROMPT, IDS.shape[1]):
        logits.append(call("decode", IDS[:, t], t)[:, None])
    return np.concatenate(logits, 1)


def run_with_onnx_runtime(art: Artifact, attention: str):
    b = OrtBackend(art, 1, attention)
    logits, state = b.prefill(IDS[:, :PROMPT], b.new_state(1))
    out = [logits]
    for t in range(PROMPT, IDS.shape[1]):
        step, state = b.decode(IDS[:, t], state)
        out.append(step[:, None])
    return np.concatenate(out, 1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_artifact_matches_the_reference(checkpoint, dtype):
    d, want = checkpoint
    art = Artifact.open(export(d / "ckpt", d / dtype, dtype=dtype, force=True))
    assert art.manifest["state"]["dtype"] == dtype and "gqa" not in art.attention_variants
    floor = 2 * torch_loss(d / "ckpt", dtype, want) + 1e-3
    if dtype == "float16":
        runs = {a: run_with_onnx_runtime(art, a) for a in ("function", "kvbuffer")}
    else:
        runs = {"kvbuffer (onnx.reference)": run_with_reference_evaluator(art)}
    for name, got in runs.items():
        diff = float(np.abs(got - want).max())
        print(f"{dtype} {name}: max|logits - float32 torch| = {diff:.2e} (bound {floor:.2e}, "
              f"|logits| up to {np.abs(want).max():.1f})")
        assert got.dtype == np.float32 and diff < floor
    weights = (d / dtype / "weights.bin").stat().st_size
    print(f"{dtype} weights.bin: {weights} bytes")


def test_bfloat16_is_refused_on_the_cpu_and_dtype_with_quantization(checkpoint, tmp_path):
    d, _ = checkpoint
    export(d / "ckpt", tmp_path / "bf16", dtype="bfloat16")
    with pytest.raises(ValueError, match="bfloat16.*--backend trt or ort-cuda"):
        open_backend(tmp_path / "bf16", "ort")
    from pltkit.quant.schemes import SCHEMES
    with pytest.raises(ExportError, match="float32"):
        export(d / "ckpt", tmp_path / "q", dtype="float16", quant=SCHEMES["int8"])
    assert not (tmp_path / "q").exists()
