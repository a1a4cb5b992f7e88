"""pltkit.RowsMatMul (kernels/rows_f32.c): float32 MatMul for the few rows of a decode step, B read at session
start from the external data file instead of an initializer. Held to numpy in float64 and to ONNX Runtime's MatMul,
alone and with the residual add, RMSNorm and SwiGLU folded in (kernels/fuse.py); float_rows_graph replaces only
the nodes it may; a bad file is a clear error; an exported float32 model decodes on it as on ONNX Runtime's
kernels."""

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model
from test_kernels import OPSETS, needs_kernels, session
from test_kernels_fused import block_model, check_folded, decode_on_both

from pltkit.quant.schemes import SCHEMES
from pltkit.runtime import kernels
from pltkit.runtime.kernels.fuse import fuse_rows


def saved(model, folder, name: str = "m.onnx"):
    """`model` written to folder/name with its initializers of 1 KB or more in folder/name.bin (as the exporter
    writes them), read back without them, as kernel_model reads a decode graph."""
    path = folder / name
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=name + ".bin",
              size_threshold=1024)
    return onnx.load(str(path), load_external_data=False), path


def matmul_model(w: np.ndarray, readers: int = 1):
    """`readers` MatMul nodes x @ W, W an initializer [K, N]; outputs y0, y1, ..."""
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "W"], [f"y{i}"]) for i in range(readers)]
    graph = helper.make_graph(nodes, "g", [value("x")], [value(f"y{i}") for i in range(readers)],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10)


@needs_kernels
# 40: a group of 8 columns left over; 1536: chunks of 2 groups; 2080: chunks of 4 and a last of 2; 2091: a last of 3
@pytest.mark.parametrize("k,n", [(16, 16), (64, 40), (576, 1536), (64, 2080), (96, 2091)])
def test_float_rows_equal_numpy_and_onnx_runtimes_matmul(tmp_path, k, n):
    rng = np.random.default_rng(k + n)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    model, _ = saved(matmul_model(w), tmp_path)
    assert kernels.float_rows_graph(model, tmp_path) == 1
    assert [nd.op_type for nd in model.graph.node] == [kernels.OP_F32] and not model.graph.initializer
    own = session(model, True)
    theirs = session(matmul_model(w), False)
    for shape in [(1, k), (2, k), (1, 2, 1, k), (3, k), (5, 1, k)]:  # PLT-2's [1, 2, 1, K]; odd rows; batches
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        y = own.run(None, {"x": x})[0]
        ref = x.astype(np.float64) @ w.astype(np.float64)
        scale = np.abs(ref).max()
        err, err_ort = np.abs(y - ref).max(), np.abs(y - theirs.run(None, {"x": x})[0]).max()
        print(f"K {k} N {n}, x {shape}: max|own - float64| {err:.1e}, max|own - MatMul| {err_ort:.1e} "
              f"(outputs up to {scale:.1f})")
        assert y.shape == (*shape[:-1], n)
        assert err <= 2e-6 * scale and err_ort <= 2e-6 * scale


def float_block(w: np.ndarray, residual: bool, swiglu: bool):
    """test_kernels_fused.block_model's graph with a float32 MatMul in place of MatMulNBits; and the norm's weight"""
    model, _, _, norm = block_model(SCHEMES["int8"], w, residual, swiglu)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    node.op_type, node.domain = "MatMul", ""
    node.input[:] = [node.input[0], "W"]
    del node.attribute[:]
    kept = [t for t in model.graph.initializer if t.name not in ("B", "S")]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, numpy_helper.from_array(w, "W")])
    return model, norm


@needs_kernels
@pytest.mark.parametrize("k,n", [(64, 192), (576, 1536)])
@pytest.mark.parametrize("residual,swiglu", [(True, True), (True, False), (False, True), (False, False)])
def test_folded_float_rows_equal_their_statement_and_the_unfolded_nodes(tmp_path, k, n, residual, swiglu):
    rng = np.random.default_rng(k + n)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    model, norm = float_block(w, residual, swiglu)
    own, _ = saved(copy.deepcopy(model), tmp_path)
    assert kernels.float_rows_graph(own, tmp_path) == 1
    load_external_data_for_model(own, str(tmp_path))  # the rest, for a session made from bytes
    fuse_rows(own.graph)
    assert [nd.op_type for nd in own.graph.node] == [kernels.OP_F32]
    assert list(own.graph.node[0].input) == ["a", "", "", "b" if residual else "", "norm"]
    check_folded(session(own, True), session(model, False), lambda x: x.astype(np.float64) @ w.astype(np.float64),
                 norm, n, residual, swiglu, rng, f"float32 K {k} N {n}", tol=4e-6, tol_ort=4e-6)


def test_float_rows_graph_replaces_only_what_the_kernel_may(tmp_path):
    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    inline = matmul_model(w)  # B in the graph, not in a file
    two_readers, _ = saved(matmul_model(w, readers=2), tmp_path, "two.onnx")
    odd_k, _ = saved(matmul_model(w[:24]), tmp_path, "odd.onnx")  # K 24: not a multiple of 16
    half, _ = saved(matmul_model(w.astype(np.float16)), tmp_path, "half.onnx")
    for name, model in {"inline": inline, "two readers": two_readers, "K 24": odd_k, "float16": half}.items():
        before = model.SerializeToString()
        assert kernels.float_rows_graph(model, tmp_path) == 0, name
        assert model.SerializeToString() == before, name  # left as it was


@needs_kernels
def test_a_missing_or_short_weights_file_is_a_clear_error(tmp_path):
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    w = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    model, path = saved(matmul_model(w), tmp_path)
    kernels.float_rows_graph(model, tmp_path)
    data = tmp_path / "m.onnx.bin"
    data.write_bytes(data.read_bytes()[:100])  # B needs 64 * 32 * 4 bytes
    with pytest.raises(RuntimeException, match=r"m\.onnx\.bin ends before B's 64 x 32"):
        session(model, True)
    data.unlink()
    with pytest.raises(RuntimeException, match=r"cannot read B from .*m\.onnx\.bin"):
        session(model, True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from synth import make_checkpoint, make_config

    from pltkit.export.artifact import export

    root = tmp_path_factory.mktemp("f32")
    make_checkpoint(root / "ckpt", make_config(hidden_size=64, intermediate_size=96, head_dim=16), seed=5)
    return export(root / "ckpt", root / "fp32")


@needs_kernels
def test_a_float32_decode_graph_runs_its_products_on_the_kernel(exported):
    """Every product of the tiny model's float32 decode graph (2 layers: q/k/v, o, gate/up, down; and the head) is a
    RowsMatMul, its weights out of the graph, norms and SwiGLUs folded as in int8's graph; decoding gives ONNX
    Runtime's logits."""
    from pltkit.runtime.artifact import Artifact

    art = Artifact.open(exported)
    path = art.graph_path("decode", "gqa")
    plain = onnx.load(str(path), load_external_data=False).graph
    graph = onnx.load_from_string(kernels.kernel_model(path).model).graph
    products = [n for n in graph.node if n.op_type == kernels.OP_F32]
    folds = (sum(any(a.name == "epsilon" for a in n.attribute) for n in products),
             sum(any(a.name == "swiglu" for a in n.attribute) for n in products))
    print(f"float32 decode graph: {len(plain.node)} nodes, {len(graph.node)} on pltkit's kernels; "
          f"{len(products)} products, norms and SwiGLUs folded {folds}")
    assert len(products) == sum(n.op_type == "MatMul" for n in plain.node) == 9 and folds == (5, 2)
    assert not any(n.op_type == "MatMul" for n in graph.node)
    assert {t.name for t in graph.initializer}.isdisjoint(i for n in plain.node if n.op_type == "MatMul"
                                                          for i in n.input[1:])
    _, diff = decode_on_both(art, batch=1, steps=12)
    print(f"float32: max|logits, own - ORT's kernels| {diff:.1e}")
    assert diff <= 1e-4
