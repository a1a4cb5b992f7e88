"""pltkit.RowsMatMulNBits with the nodes between a decoder layer's products folded in (kernels/fuse.py): the
residual add and RMSNorm before it, the SwiGLU after it. Held to a numpy statement (the norm to the bit, then the
product as test_kernels.statement) and to ONNX Runtime running the unfolded nodes."""

import copy
from collections import Counter

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_kernels import OPSETS, needs_kernels, session, statement

from pltkit.quant.schemes import SCHEMES
from pltkit.runtime import kernels
from pltkit.runtime.kernels.fuse import fuse_rows

EPS = 1e-5


def block_model(scheme, w: np.ndarray, residual: bool, swiglu: bool, sum_read: bool = True):
    """[Add a + b ->] RMSNorm -> MatMulNBits [-> Split, Sigmoid, Mul, Mul], as pltkit's exporter writes them; the
    sum is a graph output where `sum_read`. Inputs a (and b), outputs y (and s)."""
    k, n = w.shape
    packed, scales = scheme.pack(w)[:2]
    norm = np.random.default_rng(n).uniform(0.5, 1.5, k).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S"),
             numpy_helper.from_array(norm, "norm"), numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(EPS, np.float32), "eps"),
             numpy_helper.from_array(np.array([n // 2, n // 2], np.int64), "halves")]
    node = helper.make_node
    nodes = [node("Add", ["a", "b"], ["s"])] if residual else []
    s = "s" if residual else "a"
    nodes += [node("Pow", [s, "two"], ["p"]), node("ReduceMean", ["p", "axes"], ["m"], keepdims=1),
              node("Add", ["m", "eps"], ["me"]), node("Sqrt", ["me"], ["r"]), node("Div", [s, "r"], ["d"]),
              node("Mul", ["d", "norm"], ["x"]),
              node("MatMulNBits", ["x", "B", "S"], ["z" if swiglu else "y"], domain="com.microsoft", K=k, N=n,
                   bits=scheme.bits, block_size=32, accuracy_level=4)]
    if swiglu:
        nodes += [node("Split", ["z", "halves"], ["g", "u"], axis=-1), node("Sigmoid", ["g"], ["sg"]),
                  node("Mul", ["g", "sg"], ["gs"]), node("Mul", ["gs", "u"], ["y"])]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    inputs = [value("a"), *([value("b")] if residual else [])]
    outputs = [value("y"), *([value("s")] if residual and sum_read else [])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10), packed, scales, norm


def norm_statement(s: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """The kernel's RMSNorm to the bit, in float32: squares summed in 16 lanes (value j in lane j % 16), the
    lanes in order, then s / sqrt(sum / K + eps) * norm."""
    out = np.empty_like(s)
    for row, o in zip(s.reshape(-1, s.shape[-1]), out.reshape(-1, s.shape[-1])):
        lanes = np.zeros(16, np.float32)
        for j in range(0, len(row), 16):
            lanes = lanes + row[j:j + 16] * row[j:j + 16]
        total = np.float32(0)
        for lane in lanes:
            total = np.float32(total + lane)
        rms = np.sqrt(np.float32(total / np.float32(len(row)) + np.float32(EPS)))
        o[:] = row / rms * norm
    return out


def fused(model):
    own = copy.deepcopy(model)
    assert kernels.rows_graph(own) == 1
    fuse_rows(own.graph)
    return own


@needs_kernels
@pytest.mark.parametrize("scheme", ["int8", "int4"])
# 192: 12 groups, chunks of 2 (1 + 1); 2080: 130 groups, chunks of 4 and a last of 2; 1536: chunks of 2
@pytest.mark.parametrize("k,n", [(64, 192), (64, 2080), (576, 1536)])
@pytest.mark.parametrize("residual,swiglu", [(True, True), (True, False), (False, True), (False, False)])
def test_fused_node_equals_its_statement_and_the_unfused_nodes(scheme, k, n, residual, swiglu):
    q = SCHEMES[scheme]
    rng = np.random.default_rng(k + n)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    model, packed, scales, norm = block_model(q, w, residual, swiglu)
    own = fused(model)
    assert [nd.op_type for nd in own.graph.node] == [kernels.OP]
    node = own.graph.node[0]
    assert list(node.input) == ["a", "B", "S", "b" if residual else "", "norm"]
    assert list(node.output) == ["y", "s"][:1 + residual]
    codes = q.unpack(packed).reshape(n, -1)[:, :k]
    # ONNX Runtime sums the squares in another order: a value may round to the next int8 code (tol_ort)
    check_folded(session(own, True), session(model, False), lambda x: statement(x, codes, scales), norm, n,
                 residual, swiglu, rng, f"{scheme} K {k} N {n}", tol=2e-6, tol_ort=0.01)


def check_folded(mine, theirs, product, norm, n: int, residual: bool, swiglu: bool, rng, name: str, tol: float,
                 tol_ort: float) -> None:
    """The folded node's session `mine` against its statement (`product` of the rows normalized as
    norm_statement, then the SwiGLU) within `tol` of the outputs' scale and against ONNX Runtime running the
    unfolded nodes (`theirs`) within `tol_ort`, on PLT-2's rows, odd rows and batches; the sum to the bit."""
    k = len(norm)
    for shape in [(1, k), (2, k), (1, 2, 1, k), (3, k)]:
        feed = {"a": (rng.standard_normal(shape) * 2).astype(np.float32)}
        if residual:
            feed["b"] = (rng.standard_normal(shape) * 2).astype(np.float32)
        got, want = mine.run(None, feed), theirs.run(None, feed)
        s = feed["a"] + feed["b"] if residual else feed["a"]
        ref = product(norm_statement(s, norm))
        if swiglu:
            g, u = np.split(ref, 2, axis=-1)
            ref = g / (1 + np.exp(-g)) * u
        scale = np.abs(ref).max()
        err, err_ort = np.abs(got[0] - ref).max(), np.abs(got[0] - want[0]).max()
        print(f"{name}, residual {residual}, swiglu {swiglu}, x {shape}: max|own - statement| {err:.1e}, "
              f"max|own - ONNX Runtime's nodes| {err_ort:.1e} (outputs up to {scale:.1f})")
        assert got[0].shape == (*shape[:-1], n // 2 if swiglu else n)
        assert err <= tol * scale and err_ort <= tol_ort * scale
        if residual:
            assert np.array_equal(got[1], s)  # the sum, to the bit


@needs_kernels
def test_the_sum_is_an_output_only_where_other_nodes_read_it():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    own = fused(block_model(SCHEMES["int8"], w, residual=True, swiglu=False, sum_read=False)[0])
    assert [list(nd.output) for nd in own.graph.node] == [["y"]]
    a, b = np.ones((2, 64), np.float32), np.arange(128, dtype=np.float32).reshape(2, 64)
    y = session(own, True).run(None, {"a": a, "b": b})[0]
    assert y.shape == (2, 64) and np.isfinite(y).all()


def test_fuse_rows_folds_only_exact_patterns():
    """Each case breaks one condition of the pattern: the nodes it concerns stay as they are."""
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    base = lambda **kw: block_model(SCHEMES["int8"], w, **kw)[0]  # noqa: E731

    def replaced(model):
        kernels.rows_graph(model)
        return model

    def read_elsewhere(model, value: str, by_node: bool):
        """model with `value` also a graph output, directly or through a second node that reads it"""
        if by_node:
            model.graph.node.append(helper.make_node("Identity", [value], [value + "_copy"]))
            value += "_copy"
        model.graph.output.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, None))
        return model

    cases = {}
    for by_node in (False, True):
        how = "another node" if by_node else "a graph output"
        m = read_elsewhere(replaced(base(residual=True, swiglu=True)), "x", by_node)
        cases[f"normalized rows read by {how}"] = (m, {"Mul", "Div", "Sqrt", "ReduceMean", "Pow", "Add"})
        m = read_elsewhere(replaced(base(residual=False, swiglu=True)), "g", by_node)
        cases[f"gate read by {how}"] = (m, {"Split", "Sigmoid", "Mul"})
    m = replaced(base(residual=False, swiglu=True))
    next(t for t in m.graph.initializer if t.name == "halves").CopyFrom(
        numpy_helper.from_array(np.array([16, 48], np.int64), "halves"))
    cases["halves of unequal sizes"] = (m, {"Split", "Sigmoid", "Mul"})
    m = replaced(base(residual=False, swiglu=False))
    next(t for t in m.graph.initializer if t.name == "two").CopyFrom(
        numpy_helper.from_array(np.array(3.0, np.float32), "two"))
    cases["a cube, not a square"] = (m, {"Pow", "ReduceMean", "Sqrt", "Div", "Mul"})
    m = replaced(base(residual=False, swiglu=False))
    next(t for t in m.graph.initializer if t.name == "axes").CopyFrom(
        numpy_helper.from_array(np.array([0], np.int64), "axes"))
    cases["a mean over another axis"] = (m, {"Pow", "ReduceMean", "Sqrt", "Div", "Mul"})
    m = replaced(base(residual=True, swiglu=False))  # b a constant: a bias, not a residual
    m.graph.initializer.append(numpy_helper.from_array(np.ones(64, np.float32), "b"))
    inputs = [i for i in m.graph.input if i.name != "b"]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    cases["an add of a constant"] = (m, {"Add"})
    for name, (model, kept) in cases.items():
        fuse_rows(model.graph)
        assert kept <= {nd.op_type for nd in model.graph.node}, name


@needs_kernels
def test_fused_inputs_of_the_wrong_shape_get_a_clear_error():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    own = fused(block_model(SCHEMES["int8"], w, residual=True, swiglu=False)[0])
    run = session(own, True)
    with pytest.raises(Exception, match="skip is not A's shape"):
        run.run(None, {"a": np.ones((2, 64), np.float32), "b": np.ones((1, 64), np.float32)})
    assert run.run(None, {"a": np.ones((2, 64), np.float32), "b": np.ones((2, 64), np.float32)})[0].shape == (2, 64)
    bad = fused(block_model(SCHEMES["int8"], w[:, :48], residual=False, swiglu=False)[0])
    bad.graph.node[0].attribute.append(helper.make_attribute("swiglu", 1))
    with pytest.raises(Exception, match="swiglu needs N = 2 F, F a multiple of 16"):
        session(bad, True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from synth import make_checkpoint, make_config

    from pltkit.export.artifact import export

    root = tmp_path_factory.mktemp("fused")
    make_checkpoint(root / "ckpt", make_config(hidden_size=64, intermediate_size=96, head_dim=16), seed=3)
    return {form: export(root / "ckpt", root / form, quant=SCHEMES[form]) for form in ("int8", "int4-asym")}


# folds in the tiny model's decode graph (2 layers): a norm before q/k/v, gate/up and the head, a SwiGLU after
# gate/up. int4-asym reads each layer's norms twice (its block sums beside each product) and adds those after
# gate/up: only the head's norm folds.
FOLDS = {"int8": (5, 2), "int4-asym": (1, 0)}


@pytest.mark.parametrize("form", list(FOLDS))
def test_exported_decode_graphs_fold_each_layer(exported, form):
    import onnx

    from pltkit.runtime.artifact import Artifact

    path = Artifact.open(exported[form]).graph_path("decode", "gqa")
    graph = onnx.load_from_string(kernels.kernel_model(path).model).graph
    unfused = onnx.load_from_string(kernels.kernel_model(path, fuse=False).model).graph
    rows = [{a.name for a in n.attribute} for n in graph.node if n.op_type == kernels.OP]
    folds = (sum("epsilon" in r for r in rows), sum("swiglu" in r for r in rows))
    print(f"{form}: {len(unfused.node)} nodes unfused, {len(graph.node)} fused; norms and SwiGLUs folded {folds}")
    assert folds == FOLDS[form]
    before, after = (Counter(n.op_type for n in g.node) for g in (unfused, graph))
    for op in ("Pow", "ReduceMean", "Sqrt", "Div"):  # one each a norm
        assert before[op] - after[op] == folds[0], op
    for op in ("Split", "Sigmoid"):  # one each a SwiGLU
        assert before[op] - after[op] == folds[1], op


@needs_kernels
def test_batched_decode_on_the_folded_graph_matches_ort_kernels(exported):
    """A batch of 2 decodes on the kvbuffer graph, its rows [R, B, 1, D] folded alike: pltkit's kernels give ONNX
    Runtime's logits."""
    from pltkit.runtime.artifact import Artifact

    own, diff = decode_on_both(Artifact.open(exported["int8"]), batch=2, steps=10)
    assert own.own_nodes.get(("decode", "kvbuffer"))  # the batch ran on pltkit's kernels
    print(f"batch 2: max|logits, own - ORT's kernels| {diff:.1e}")
    assert diff <= 1e-4


def decode_on_both(art, batch: int, steps: int):
    """The artifact's backend on pltkit's kernels and on ONNX Runtime's: the first half of `steps` random tokens
    prefilled, the rest decoded one by one. Returns the first backend and max |logits, own - ONNX Runtime's|;
    asserts that every step's argmax agrees."""
    from pltkit.runtime.ort_backend import OrtBackend

    own, theirs = OrtBackend(art, 1, kernels="pltkit"), OrtBackend(art, 1, kernels="ort")
    ids = np.random.default_rng(7).integers(4, 320, (batch, steps))
    logits = []
    for b in (own, theirs):
        out, state = b.prefill(ids[:, :steps // 2], b.new_state(batch))
        got = []
        for t in range(steps // 2, steps):
            out, state = b.decode(ids[:, t], state)
            got.append(np.array(out, copy=True).reshape(batch, -1))
        logits.append(np.stack(got))
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).all()
    return own, float(np.abs(logits[0] - logits[1]).max())
