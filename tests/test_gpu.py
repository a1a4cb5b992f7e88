"""The GPU paths. On a machine without an NVIDIA GPU or TensorRT: clear failures, nothing needs
tensorrt to import, and the pieces that do not need a GPU (profiles, the inlined fallback graph)
are checked. On a GPU machine the `gpu` tests run engines and the CUDA provider against the CPU
(scripts/gpu_check.sh)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pltkit.export.artifact import export
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.backends import open_backend


def has_trt_gpu() -> bool:
    from pltkit.gpu.trt_engine import GpuUnavailable, require
    try:
        require()
        return True
    except GpuUnavailable:
        return False


def has_ort_cuda() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return export("default", tmp_path_factory.mktemp("gpu") / "fp32")


def test_importing_the_gpu_modules_needs_no_tensorrt():
    code = "import sys, pltkit.gpu.trt_engine, pltkit.gpu.trt_plugin; assert 'tensorrt' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(has_trt_gpu(), reason="this machine has TensorRT and a GPU")
def test_engine_without_tensorrt_or_gpu_exits_2_with_one_line(tmp_path, artifact):
    for args in (["default", "--engine", "trt", "-o", str(tmp_path / "x")], [str(artifact), "--engine", "trt"]):
        out = subprocess.run(["plt-export", *args], capture_output=True, text=True)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert "TensorRT" in lines[0] or "GPU" in lines[0]
    assert not (tmp_path / "x").exists()  # refused before exporting anything


@pytest.mark.skipif(has_trt_gpu() and has_ort_cuda(), reason="this machine has the GPU paths")
def test_gpu_backends_without_a_gpu_are_refused_clearly(artifact):
    for backend, words in (("trt", "TensorRT"), ("ort-cuda", "onnxruntime-gpu")):
        if (backend == "trt" and has_trt_gpu()) or (backend == "ort-cuda" and has_ort_cuda()):
            continue
        out = subprocess.run(["plt-complete", "--model", str(artifact), "--backend", backend, "def"],
                             capture_output=True, text=True)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_plugin_annotations_are_classes():
    """tensorrt.plugin validates the decorated functions by their annotations, read as classes
    (issubclass(annotation, TensorDesc)); `from __future__ import annotations` makes them strings
    and registration fails (found by running the module against tensorrt.plugin's own sources)."""
    import ast
    import inspect

    from pltkit.gpu import trt_plugin

    tree = ast.parse(inspect.getsource(trt_plugin))
    future = [a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__" for a in n.names]
    assert "annotations" not in future
    i32, f32 = (lambda v: np.array([v], np.int32)), (lambda v: np.array([v], np.float32))
    assert trt_plugin.attributes(i32(0), i32(1), f32(0.5), i32(64)) == {"first_loop": 0, "kv_buffer": 1,
                                                                       "scale": 0.5, "window": 64}
    with pytest.raises(ValueError, match="out of order"):  # fields in another order: scale not third
        trt_plugin.attributes(i32(0), f32(0.5), i32(1), i32(64))


def test_profiles_cover_the_graphs_dimensions(artifact):
    from pltkit.gpu.trt_engine import GRAPHS, _shapes, profile_ranges

    art = Artifact.open(artifact)
    ranges = profile_ranges(art)
    for phase in ("prefill", "decode"):
        shapes = _shapes(art.manifest["graphs"][GRAPHS][phase]["inputs"], ranges)
        lo, opt, hi = shapes["past_key.0"]
        assert lo[2] == 1 and hi[2] == art.config.max_position_embeddings and lo <= opt <= hi
        assert shapes["past_ring_key.0"][2][3] == art.config.window_left
        assert shapes["past_len"] == ([], [], [])
    assert _shapes({"input_ids": ["batch", "seq"]}, ranges)["input_ids"] == ([1, 1], [1, 64], [1, 512])


def test_inlined_fallback_graph_runs_like_the_original(artifact, tmp_path):
    """Without the plugin, TensorRT gets the kvbuffer graph with plugin_namespace removed (the
    parser then inlines the function). What can be checked here: the edited graph is still valid
    and computes the same, on ONNX Runtime (which inlines the function either way)."""
    import onnx

    from pltkit.gpu.trt_engine import GRAPHS, _graph_for_tensorrt
    from pltkit.runtime.ort_backend import OrtBackend

    art = Artifact.open(artifact)
    path = _graph_for_tensorrt(art, "decode", plugin=False)
    try:
        model = onnx.load(path, load_external_data=False)
        assert not any(a.name == "plugin_namespace" for n in model.graph.node for a in n.attribute)
        # ONNX Runtime's own kernels for both: pltkit's float32 RowsMatMul sums in another order
        original, fallback = OrtBackend(art, 1, GRAPHS, kernels="ort"), OrtBackend(art, 1, GRAPHS, kernels="ort")
        fallback.sessions["decode"] = type(fallback.sessions["decode"])(str(path), providers=["CPUExecutionProvider"])
        logits = []
        for backend in (original, fallback):
            _, state = backend.prefill(np.arange(4, 20)[None], backend.new_state(1))
            logits.append(backend.decode(np.array([7]), state)[0])
        assert np.array_equal(*logits)
    finally:
        path.unlink()


def test_plugin_shapes_and_grid_follow_the_op(artifact, monkeypatch):
    """The plugin's output shapes and launch grid are formulas over TensorRT shape expressions;
    evaluated on integers (a stand-in for tensorrt.plugin's expression types) they must equal the
    reference op's output shapes and what the Triton wrapper launches, in both cache forms. The
    grid is also counted here, from the kernel's layout: a program per (row, batch, head, token) of
    attention, per (loop >= 1 row, batch, kv head) ring, per (batch, kv head) cache write of loop 0,
    and without kv_buffer per 64-key block of the past cache copied into the present one. The
    wrapper's launch is recorded, not run: no GPU is needed."""
    from test_loop_attention_kernel import CASES, inputs

    from pltkit.gpu import triton_loop_attention, trt_plugin
    from pltkit.gpu.loop_attention_ref import reference

    launched = []

    class Recorder:  # stands in for the @triton.jit kernel: kernel[grid](*args) records the grid
        def __getitem__(self, grid):
            launched.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(triton_loop_attention, "loop_attention_kernel", Recorder())

    class Desc:
        def __init__(self, shape, aliased_to=None):
            self.shape_expr, self.dtype, self.aliased_to = tuple(shape), "f", aliased_to

        def like(self):
            return Desc(self.shape_expr)

        def aliased(self):
            return Desc(self.shape_expr, self)

    class IntShapes:  # tensorrt.plugin's from_shape_expr, min and cdiv on ints
        min = staticmethod(min)
        cdiv = staticmethod(lambda a, b: -(-a // b))
        from_shape_expr = staticmethod(lambda shape, dtype: Desc(shape))

    for case in CASES:
        for kv_buffer in (0, 1):
            x, attrs = inputs(*case, kv_buffer=kv_buffer)
            d = {n: Desc(v.shape) for n, v in x.items()}
            outs = trt_plugin.output_descs(IntShapes, d["query"], d["key"], d["past_key"], d["past_value"],
                                           d["ring_key"], d["ring_value"], first_loop=attrs["first_loop"],
                                           window=attrs["window"], kv_buffer=kv_buffer)
            want = [tuple(w.shape) for w in reference(*x.values(), **attrs)]
            writes = attrs["first_loop"] == 0
            if kv_buffer and not writes:  # present = past, never read: empty on TensorRT
                want[1] = want[2] = want[1][:2] + (0,) + want[1][3:]
            assert [o.shape_expr for o in outs] == want, (case, kv_buffer)
            aliased = outs[1].aliased_to is d["past_key"] and outs[2].aliased_to is d["past_value"]
            assert aliased == bool(kv_buffer and writes)
            grid, scalars = trt_plugin.launch(IntShapes, d["query"], d["past_key"], d["ring_key"],
                                              first_loop=attrs["first_loop"], kv_buffer=kv_buffer)
            R, B, H, S, _ = x["query"].shape
            HKV, C = x["past_key"].shape[1:3]
            assert scalars == (R, B, H, x["key"].shape[2], S, x["past_key"].shape[2], x["ring_key"].shape[3])
            n0 = int(attrs["first_loop"] == 0)
            copies = 0 if kv_buffer else B * HKV * -(-C // 64)  # ceil(C / 64) blocks per (batch, kv head)
            want_grid = R * B * H * S + (R - n0) * B * HKV + n0 * B * HKV + copies
            assert grid == want_grid, (case, kv_buffer, grid, want_grid)
            launched.clear()
            triton_loop_attention.loop_attention(*x.values(), **attrs)
            assert launched == [(want_grid,)], (case, kv_buffer, launched, want_grid)


def test_no_graph_reads_what_a_loop_above_0_passes_on_as_its_cache(artifact):
    """The TensorRT plugin leaves a kv_buffer node of loops >= 1 without present outputs (they
    equal its past): sound only if no graph reads them."""
    import onnx

    from pltkit.gpu.trt_engine import GRAPHS

    art = Artifact.open(artifact)
    for phase in ("prefill", "decode"):
        g = onnx.load(art.graph_path(phase, GRAPHS), load_external_data=False).graph
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        nodes = [n for n in g.node if n.op_type == "LoopAttention"]
        assert nodes and all(next(a.i for a in n.attribute if a.name == "kv_buffer") == 1 for n in nodes)
        above_0 = [n for n in nodes if next(a.i for a in n.attribute if a.name == "first_loop") > 0]
        assert len(above_0) == (art.config.num_hidden_layers * (art.config.plt_num_loops - 1)
                                if phase == "prefill" else 0)
        assert not any(o in read for n in above_0 for o in n.output[1:3])


@pytest.mark.parametrize("scheme, op", [("int8", "MatMulNBits"), ("int8-dq", "DynamicQuantizeMatMul")])
def test_ort_forms_are_refused_for_tensorrt(tmp_path, scheme, op):
    from pltkit.gpu.trt_engine import _graph_for_tensorrt
    from pltkit.quant.schemes import SCHEMES

    art = Artifact.open(export("default", tmp_path / scheme, quant=SCHEMES[scheme]))
    with pytest.raises(ValueError, match=op):
        _graph_for_tensorrt(art, "decode", plugin=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["trt", "ort-cuda"])
def test_gpu_backend_matches_onnx_runtime_on_the_cpu(artifact, backend):
    if not {"trt": has_trt_gpu, "ort-cuda": has_ort_cuda}[backend]():
        pytest.skip(f"{backend} needs an NVIDIA GPU and " + ("TensorRT" if backend == "trt" else "onnxruntime-gpu"))
    gpu, cpu = open_backend(artifact, backend), open_backend(artifact, "ort")
    ids = np.arange(4, 40)[None]
    (a, sa), (b, sb) = gpu.prefill(ids, gpu.new_state(1)), cpu.prefill(ids, cpu.new_state(1))
    diffs = [np.abs(a - b).max()]
    buffers = dict(sa.kv)
    for t in (5, 9, 13):
        (a, sa), (b, sb) = gpu.decode(np.array([t]), sa), cpu.decode(np.array([t]), sb)
        diffs.append(np.abs(a - b).max())
    (a, sa), (b, sb) = gpu.prefill(ids[:, :7], sa), cpu.prefill(ids[:, :7], sb)  # a chunk after decodes
    diffs.append(np.abs(a - b).max())
    print(f"{backend} vs ONNX Runtime CPU, max|diff| per call:", [f"{d:.1e}" for d in diffs])
    assert max(diffs) < 1e-3
    if backend == "trt":
        assert all(sa.kv[k] is buffers[k] for k in buffers), "the TensorRT backend reallocated the cache"
        engines = json.loads((artifact / "pltkit.json").read_text())["engines"]
        print("engines:", json.dumps(engines))
        assert engines


@pytest.mark.gpu
def test_bfloat16_engines_lose_no_more_than_torch_in_bfloat16(tmp_path):
    """A bfloat16 artifact on TensorRT against the float32 reference: within twice what the
    torch reference loses when run in bfloat16 on the same GPU."""
    if not has_trt_gpu():
        pytest.skip("needs an NVIDIA GPU and TensorRT")
    import torch

    import pltkit

    art = export("default", tmp_path / "bf16", dtype="bfloat16")
    ids = np.arange(4, 40)[None]
    with torch.no_grad():
        want = pltkit.load_model("default")(torch.from_numpy(ids)).numpy()
        torch_bf16 = pltkit.load_model("default", dtype=torch.bfloat16).cuda()(torch.from_numpy(ids).cuda())
    bound = 2 * float(np.abs(torch_bf16.float().cpu().numpy() - want).max()) + 1e-3
    trt = open_backend(art, "trt")
    logits, state = trt.prefill(ids[:, :30], trt.new_state(1))
    got = [logits]
    for t in range(30, ids.shape[1]):
        step, state = trt.decode(ids[:, t], state)
        got.append(step[:, None])
    diff = float(np.abs(np.concatenate(got, 1) - want).max())
    print(f"TensorRT bfloat16 max|logits - float32 reference| = {diff:.3f} (bound {bound:.3f})")
    assert diff < bound
