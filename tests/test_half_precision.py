"""float16 and bfloat16 artifacts (`plt-export --dtype`), the unquantized form for GPUs, checked
against the torch reference. float16 runs on ONNX Runtime's CPU provider; bfloat16 has no CPU
kernels there, so its graphs run on ONNX's reference evaluator (the onnx-reference backend), which rounds
every op to bfloat16. The bound: the artifact may differ from the float32 reference by at most twice what
the torch reference itself loses in the same float type (plus a small floor)."""

import json
import subprocess

import numpy as np
import pytest
import torch
from synth import make_checkpoint, make_config

import pltkit
from pltkit.export.artifact import ExportError, export
from pltkit.model.formats import float_type
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.backends import open_backend
from pltkit.runtime.ort_backend import OrtBackend

CASES = {"L2-hidden": dict(plt_num_loops=2), "L3-query": dict(plt_num_loops=3, plt_gate_use_hidden_states=False)}
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
        got = pltkit.load_model(ckpt, dtype=float_type(dtype).torch())(torch.from_numpy(IDS)).float().numpy()
    return float(np.abs(got - want).max())


def run(backend):
    """Logits of IDS: prefill PROMPT tokens, then decode the rest one by one."""
    logits, state = backend.prefill(IDS[:, :PROMPT], backend.new_state(1))
    out = [logits]
    for t in range(PROMPT, IDS.shape[1]):
        step, state = backend.decode(IDS[:, t], state)
        out.append(step[:, None])
    return np.concatenate(out, 1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_artifact_matches_the_reference(checkpoint, dtype):
    d, want = checkpoint
    art = Artifact.open(export(d / "ckpt", d / dtype, dtype=dtype, force=True))
    assert art.manifest["state"]["dtype"] == dtype and ("gqa" in art.attention_variants) == (dtype == "float16")
    floor = 2 * torch_loss(d / "ckpt", dtype, want) + 1e-3
    runs = {"onnx-reference (kvbuffer)": run(open_backend(art.path, "onnx-reference"))}
    if dtype == "float16":
        runs.update({f"ort {a}": run(OrtBackend(art, 1, a)) for a in ("function", "kvbuffer", "gqa")})
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
    with pytest.raises(ValueError, match="bfloat16.*--backend trt on a GPU, or onnx-reference"):
        open_backend(tmp_path / "bf16", "ort")
    cli = ["plt-complete", "--model", str(tmp_path / "bf16"), "--max-tokens", "4", "--json", "def f(x):"]
    refused = subprocess.run(cli, capture_output=True, text=True)
    assert refused.returncode == 2 and "onnx-reference" in refused.stderr and "Traceback" not in refused.stderr
    done = subprocess.run(cli + ["--backend", "onnx-reference"], capture_output=True, text=True, check=True)
    assert len(json.loads(done.stdout)["tokens"]) > 0
    from pltkit.quant.schemes import SCHEMES
    with pytest.raises(ExportError, match="float32"):
        export(d / "ckpt", tmp_path / "q", dtype="float16", quant=SCHEMES["int8"])
    assert not (tmp_path / "q").exists()
