"""pltkit's own ONNX Runtime kernels (pltkit/runtime/kernels), built with this machine's compiler and run in real
sessions. pltkit.RowsMatMulNBits is held to a numpy statement of its arithmetic and to ONNX Runtime's
MatMulNBits, which it replaces in decode graphs; pltkit.StepAttention and pltkit.RingMix to numpy statements of
their semantics and to the function bodies the exporter writes with them. The decode of exported models on them
against the same models on ONNX Runtime's kernels and against the torch reference."""

import copy
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from synth import make_checkpoint, make_config

from pltkit.export.gqa import GQA, RING_MIX_GATE, RING_MIX_INPUTS, STEP_INPUTS
from pltkit.quant.schemes import SCHEMES
from pltkit.runtime import kernels
from pltkit.runtime.artifact import Artifact, ArtifactError
from pltkit.runtime.buffer_state import ALIGN
from pltkit.runtime.ort_backend import OrtBackend

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="pltkit's kernels do not build or run here")
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


def layer_model(scheme, w: np.ndarray, zero_points=None, weights_as_input: bool = False, **attrs):
    """One MatMulNBits node x @ W for W [K, N] packed by `scheme` (zero_points: a uint8 tensor given as the
    node's fourth input; attrs override the node's attributes). Returns (model, packed, scales)."""
    k, n = w.shape
    packed, scales = scheme.pack(w)[:2]  # int4-asym's offsets are not this node's
    inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "z"))
    if weights_as_input:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.UINT8, list(packed.shape)))
        inits = inits[1:]
    attrs = {"K": k, "N": n, "bits": scheme.bits, "block_size": scheme.block_size,
             "accuracy_level": scheme.accuracy_level, **attrs}
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"][:3 + (zero_points is not None)], ["y"],
                            domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10), packed, scales


def zero_points(scheme, n: int, k: int, value: int) -> np.ndarray:
    """MatMulNBits' zero points [N, ceil(blocks * bits / 8)], every block's `value`."""
    per_byte = 8 // scheme.bits
    byte = value if scheme.bits == 8 else value | value << 4
    return np.full((n, -(-(k // scheme.block_size) // per_byte)), byte, np.uint8)


def session(model, own: bool, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if own:
        so.register_custom_ops_library(str(kernels.library()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def statement(x: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The arithmetic in numpy: each row of x rounded to int8 per block of 32 (d = amax / 127, half to even),
    products summed exactly per block, then scaled: y[m, n] = sum_b dx[m, b] dw[n, b] sum_i qx qw.
    codes: W's signed codes [N, K]; scales [N, K/32]."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    blocks = rows.reshape(len(rows), -1, 32)
    d = np.abs(blocks).max(-1) / 127
    q = np.round(np.divide(blocks, d[..., None], out=np.zeros_like(blocks), where=d[..., None] > 0))
    dots = np.einsum("mbi,nbi->mnb", q, codes.reshape(codes.shape[0], -1, 32).astype(np.float64))
    y = (dots * d[:, None, :].astype(np.float32) * scales[None].astype(np.float64)).sum(-1)
    return y.reshape(*x.shape[:-1], -1)


# name -> (scheme, the zero point written as the node's input, or None for MatMulNBits' default)
LAYER_FORMS = {"int8": ("int8", None), "int4": ("int4", None),
               "int4, zero points 8 given": ("int4", 8),
               "int4-asym (unsigned codes, zero points 0)": ("int4-asym", 0)}


@needs_kernels
@pytest.mark.parametrize("form", list(LAYER_FORMS))
# 80, 18: a group left over; 1536: chunks of 2 groups; 1040: chunks of 2 and one of 1; 2080, 2056, 2091: chunks of
# 4 and a last of 2, of 1 (8 columns) and of 3 (11 columns)
@pytest.mark.parametrize("k,n", [(64, 16), (96, 80), (64, 18), (576, 1536), (64, 1040), (64, 2080), (64, 2056),
                                 (96, 2091)])
def test_rows_kernel_equals_its_statement_and_matmulnbits(form, k, n):
    name, zero = LAYER_FORMS[form]
    scheme = SCHEMES[name]
    rng = np.random.default_rng(k + n)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    z = None if zero is None else zero_points(scheme, n, k, zero)
    model, packed, scales = layer_model(scheme, w, z)
    own_model = copy.deepcopy(model)
    assert kernels.rows_graph(own_model) == 1 and own_model.graph.node[0].op_type == kernels.OP
    own, ort_kernel = session(own_model, True), session(model, False)
    codes = scheme.unpack(packed).reshape(n, -1)[:, :k]  # signed codes; int4-asym's unsigned, zero point 0
    for shape in [(1, k), (2, k), (1, 2, 1, k), (3, k), (5, 1, k)]:  # PLT-2's [1, 2, 1, K]; odd rows; batches
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        x.reshape(-1, k)[0, :32] = 0  # an all-zero block (d = 0)
        x.reshape(-1, k)[-1, 32:64] = np.r_[127, np.arange(31) - 15.5]  # d = 1: ties, rounded half to even
        y = own.run(None, {"x": x})[0]
        ref, theirs = statement(x, codes, scales), ort_kernel.run(None, {"x": x})[0]
        scale = np.abs(ref).max()
        err, err_ort = np.abs(y - ref).max(), np.abs(y - theirs).max()
        print(f"{form}, K {k} N {n}, x {shape}: max|own - statement| {err:.1e}, max|own - MatMulNBits| "
              f"{err_ort:.1e} (outputs up to {scale:.1f})")
        assert y.shape == (*shape[:-1], n)
        assert err <= 2e-6 * scale and err_ort <= 2e-6 * scale


@needs_kernels
def test_rows_graph_replaces_only_what_the_kernel_computes():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    int8, int4 = SCHEMES["int8"], SCHEMES["int4"]
    mixed = zero_points(int4, 32, 64, 8)
    mixed[3, 0] = 0x78  # one block's zero point 7
    odd = zero_points(int4, 32, 96, 8)  # 3 blocks: the last byte's high nibble is padding
    odd[:, -1] &= 0x0F
    with_bias = layer_model(int8, w)[0]
    with_bias.graph.node[0].input.extend(["", "", "bias"])  # zero points, g_idx absent; a bias
    with_bias.graph.initializer.append(numpy_helper.from_array(np.zeros(32, np.float32), "bias"))
    too_few_columns = layer_model(int8, w)[0]  # N says 48, B and scales hold 32 columns
    next(a for a in too_few_columns.graph.node[0].attribute if a.name == "N").i = 48
    float_zeros = layer_model(int8, w)[0]
    float_zeros.graph.node[0].input.append("z")
    float_zeros.graph.initializer.append(numpy_helper.from_array(np.full((32, 2), 128, np.float32), "z"))
    cases = {  # name -> (model, the zero point it runs with, or None where it stays MatMulNBits)
        "int8": (layer_model(int8, w)[0], 128),
        "int4": (layer_model(int4, w)[0], 8),
        "N not a multiple of 16": (layer_model(int8, w[:, :24])[0], 128),
        "int4, zero points 0": (layer_model(int4, w, zero_points(int4, 32, 64, 0))[0], 0),
        "int4, 3 blocks, padding nibble 0": (layer_model(int4, np.vstack([w, w[:32]]), odd)[0], 8),
        "int4, zero points not all alike": (layer_model(int4, w, mixed)[0], None),
        "float zero points": (float_zeros, None),
        "a bias": (with_bias, None),
        "B smaller than K and N say": (too_few_columns, None),
        "K not a multiple of 32": (layer_model(int8, w[:48])[0], None),
        "float compute (accuracy_level 0)": (layer_model(int8, w, accuracy_level=0)[0], None),
        "block 64": (layer_model(int8, w, block_size=64)[0], None),
        "2 bits": (layer_model(int8, w, bits=2)[0], None),
        "weights fed at run time": (layer_model(int8, w, weights_as_input=True)[0], None),
    }
    for name, (model, zero) in cases.items():
        before = model.SerializeToString()
        assert kernels.rows_graph(model) == int(zero is not None), name
        if zero is None:
            assert model.SerializeToString() == before, name
            continue
        node = model.graph.node[0]
        assert list(node.input) == ["x", "b", "s"] and any(o.domain == kernels.DOMAIN for o in model.opset_import)
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["zero_point"] == zero, name
        assert {t.name for t in model.graph.initializer} == {"b", "s"}, name  # zero points read no more: dropped


@needs_kernels
def test_the_op_refuses_what_it_cannot_compute_with_a_clear_error():
    """Nodes written by hand, not by rows_graph: B smaller than K and N say, a zero point beyond the bits."""
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    for attr, value, message in (("N", 48, "B is not uint8 of N x K/32"), ("zero_point", 300, "zero point")):
        model = layer_model(SCHEMES["int8"], w)[0]
        assert kernels.rows_graph(model) == 1
        next(a for a in model.graph.node[0].attribute if a.name == attr).i = value
        with pytest.raises(Exception, match=message):
            session(model, True)


GATE_EPS = 1e-5


def ring_mix_model(rows: int, rotary: bool, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                   window: int = 4, hidden_gate: bool = False):
    """One pltkit.RingMix node as the exporter writes it, with its function body; hidden_gate: the gate computed
    from the layer input (RING_MIX_GATE) instead of given."""
    gqa = GQA(heads=heads, kv_heads=kv_heads, head_dim=head_dim, window=window, scale=head_dim ** -0.5,
              rotary=("cos_cache", "sin_cache") if rotary else ())
    names = RING_MIX_INPUTS if rotary else RING_MIX_INPUTS[:-3]
    if hidden_gate:
        names = [n if n != "gate" and (rotary or n not in RING_MIX_INPUTS[-3:]) else "" for n in RING_MIX_INPUTS]
        names += RING_MIX_GATE
    types = {"seqlens_k": TensorProto.INT32, "total_sequence_length": TensorProto.INT32,
             "position_ids": TensorProto.INT64}
    node = helper.make_node(kernels.RING_MIX, names, ["y", "ring_k", "ring_v"], domain=kernels.DOMAIN,
                            num_heads=heads, kv_num_heads=kv_heads, window=window, scale=gqa.scale, epsilon=GATE_EPS)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None)
                                            for n in names if n],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output])
    return helper.make_model(graph, opset_imports=[*OPSETS, helper.make_opsetid(kernels.DOMAIN, 1)], ir_version=10,
                             functions=[gqa.ring_mix_function(21, rows, GATE_EPS if hidden_gate else None)])


def with_hidden_gate(feed: dict, rows: int, heads: int = 4, d: int = 24, seed: int = 0) -> dict:
    """feed with the hidden-state gate's inputs in place of its gate, and that gate, computed in numpy, as "gate"
    (for ring_mix_statement)."""
    rng = np.random.default_rng(seed)
    batch = feed["query"].shape[1]
    x = rng.normal(size=(rows, batch, 1, d)).astype(np.float32)
    norm, w = rng.uniform(0.5, 1.5, d).astype(np.float32), rng.normal(size=(d, heads)).astype(np.float32)
    bias = rng.normal(size=heads).astype(np.float32)
    xr = x[1:].astype(np.float64)
    h = xr / np.sqrt((xr ** 2).mean(-1, keepdims=True) + GATE_EPS) * norm
    gate = 1 / (1 + np.exp(-(h @ w + bias)))  # [R-1, B, 1, H]
    return {**feed, "gate": gate.transpose(0, 1, 3, 2).astype(np.float32), "hidden": x, "gate_norm": norm,
            "gate_weight": w, "gate_bias": bias}


def gate_initializers(model, feed: dict):
    """model with the hidden-state gate's norm and weights (from feed) as initializers, as the exporter writes them
    (RingMix's kernel reads them at session start); and feed without them and without the gate."""
    model, names = copy.deepcopy(model), ("gate_norm", "gate_weight")
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(numpy_helper.from_array(feed[n], n) for n in names)
    return model, {k: v for k, v in feed.items() if k not in (*names, "gate")}


def ring_mix_inputs(rows: int, batch: int, ring: int, rotary: bool, heads: int = 4, kv_heads: int = 2,
                    head_dim: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)
    feed = {"query": normal(rows, batch, 1, heads * head_dim), "key": normal(rows, batch, 1, kv_heads * head_dim),
            "value": normal(rows, batch, 1, kv_heads * head_dim),
            "global": normal(rows, batch, 1, heads * head_dim),
            "ring_key": normal(rows - 1, batch, kv_heads, ring, head_dim),
            "ring_value": normal(rows - 1, batch, kv_heads, ring, head_dim),
            "gate": rng.uniform(size=(rows - 1, batch, heads, 1)).astype(np.float32),
            "seqlens_k": np.full(batch, ring, np.int32), "total_sequence_length": np.array(ring + 1, np.int32)}
    if rotary:
        angles = np.arange(200)[:, None] * 10000.0 ** (-np.arange(head_dim // 2) / (head_dim // 2))
        feed.update(cos_cache=np.cos(angles).astype(np.float32), sin_cache=np.sin(angles).astype(np.float32),
                    position_ids=rng.integers(ring, 200, (batch, 1)))
    return feed


def ring_mix_statement(feed: dict, rows: int, window: int = 4, heads: int = 4, kv_heads: int = 2) -> list:
    """RingMix in numpy: each row r >= 1, batch entry and head attends (softmax) over the last window + 1 of its
    ring's keys and its own (q and k rotated at the entry's position where the caches are given), then
    local + g (global - local); row 0 is the global call's; the rings keep their newest `window` entries."""
    batch, dh, rep = feed["query"].shape[1], feed["ring_key"].shape[-1], heads // kv_heads
    q = feed["query"].reshape(rows, batch, heads, dh).astype(np.float64)
    k, v = (feed[n].reshape(rows, batch, kv_heads, dh).astype(np.float64) for n in ("key", "value"))
    glob = feed["global"].reshape(q.shape)

    def rotate(x, b):
        if "cos_cache" not in feed:
            return x
        p, half = int(feed["position_ids"][b, 0]), dh // 2
        c, s = feed["cos_cache"][p], feed["sin_cache"][p]
        return np.concatenate([x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s], -1)
    out, rings_k, rings_v = glob.copy(), [], []
    for r in range(1, rows):
        own = np.stack([rotate(k[r, b], b) for b in range(batch)])[:, :, None]  # [B, Hkv, 1, Dh]
        keys = np.concatenate([feed["ring_key"][r - 1], own], 2)
        values = np.concatenate([feed["ring_value"][r - 1], v[r][:, :, None]], 2)
        for b in range(batch):
            for h in range(heads):
                keys_h, values_h = keys[b, h // rep, -(window + 1):], values[b, h // rep, -(window + 1):]
                scores = keys_h @ rotate(q[r, b, h], b) / np.sqrt(dh)
                p = np.exp(scores - scores.max())
                local = p / p.sum() @ values_h
                out[r, b, h] = local + feed["gate"][r - 1, b, h, 0] * (glob[r, b, h] - local)
        rings_k.append(keys[:, :, max(0, keys.shape[2] - window):])
        rings_v.append(values[:, :, max(0, keys.shape[2] - window):])
    return [out.reshape(rows, batch, 1, heads * dh), np.stack(rings_k), np.stack(rings_v)]


@needs_kernels
@pytest.mark.parametrize("rows,batch", [(2, 1), (3, 1), (2, 2)])
# window 4: rings empty, filling, full, and longer than the window; window 0: the row's own key alone, no ring kept
@pytest.mark.parametrize("ring,window", [(0, 4), (2, 4), (4, 4), (6, 4), (3, 0)])
@pytest.mark.parametrize("rotary", [True, False])
def test_ring_mix_kernel_equals_its_statement_and_function_body(rows, batch, ring, window, rotary):
    model = ring_mix_model(rows, rotary, window=window)
    feed = ring_mix_inputs(rows, batch, ring, rotary, seed=rows * 100 + batch * 10 + ring)
    want = ring_mix_statement(feed, rows, window)
    body, got = session(model, False).run(None, feed), session(model, True).run(None, feed)
    assert [w.shape for w in want] == [b.shape for b in body] == [g.shape for g in got] == [
        (rows, batch, 1, 64), *[(rows - 1, batch, 2, min(ring + 1, window), 16)] * 2]
    # ONNX Runtime's GroupQueryAttention, with an empty past and batch 2, returns the second entry's new key
    # rotated elsewhere than at its position; its output is right. pltkit never runs it so: a decode step of
    # L > 1 loops on the GQA graph has batch 1.
    checked = body[:1] if batch > 1 and ring == 0 and rotary else body
    diff = max(float(np.abs(w - g).max(initial=0)) for w, g in zip(want, got))  # (window 0: empty rings)
    diff_body = max(float(np.abs(b - g).max(initial=0)) for b, g in zip(checked, got))
    print(f"rows {rows}, batch {batch}, ring {ring}, window {window}, rotary {rotary}: max|kernel - statement| "
          f"{diff:.1e}, "
          f"max|kernel - function body| {diff_body:.1e}")
    assert diff <= 1e-5 and diff_body <= 1e-5


@needs_kernels
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 4, 64), (8, 2, 128), (2, 1, 256)])
def test_ring_mix_head_sizes_weighed_by_rows(heads, kv_heads, head_dim):
    """Head sizes of 64, 128 and 256 weigh a ring's values whole rows at a time (attend.h, weigh_rows)."""
    model = ring_mix_model(2, True, heads, kv_heads, head_dim)
    feed = ring_mix_inputs(2, 1, 4, True, heads, kv_heads, head_dim, seed=head_dim)
    want, got = ring_mix_statement(feed, 2, 4, heads, kv_heads), session(model, True).run(None, feed)
    diff = max(float(np.abs(w - g).max()) for w, g in zip(want, got))
    print(f"RingMix, heads {heads}/{kv_heads} of {head_dim}: max|kernel - statement| {diff:.1e}")
    assert diff <= 1e-5


@needs_kernels
@pytest.mark.parametrize("rows,batch,ring,rotary", [(2, 1, 6, True), (3, 1, 2, False), (2, 2, 4, True)])
def test_ring_mix_computes_the_hidden_state_gate(rows, batch, ring, rotary):
    """Given the layer input and the gate's weights instead of the gate, RingMix computes sigmoid(W RMSNorm(x) +
    b) itself: the same output as the statement with that gate, and as the function body."""
    feed = with_hidden_gate(ring_mix_inputs(rows, batch, ring, rotary, seed=ring), rows, seed=ring)
    model, given = gate_initializers(ring_mix_model(rows, rotary, hidden_gate=True), feed)
    want = ring_mix_statement(feed, rows)
    body, got = session(model, False).run(None, given), session(model, True).run(None, given)
    checked = body[:1] if batch > 1 and rotary else body  # (GroupQueryAttention's batch-2 rings: see above)
    diff = max(float(np.abs(w - g).max(initial=0)) for w, g in zip(want, got))
    diff_body = max(float(np.abs(b - g).max(initial=0)) for b, g in zip(checked, got))
    print(f"hidden-state gate, rows {rows}, batch {batch}: max|kernel - statement| {diff:.1e}, max|kernel - "
          f"function body| {diff_body:.1e}")
    assert diff <= 1e-5 and diff_body <= 1e-5
    with pytest.raises(Exception, match="RingMix: hidden, gate_norm, gate_weight and gate_bias must be"):
        session(model, True).run(None, {**given, "hidden": given["hidden"][..., :-1]})
    fed = session(ring_mix_model(rows, rotary, hidden_gate=True), True)  # the gate's weights fed at run time
    with pytest.raises(Exception, match="RingMix: gate_norm and gate_weight must be initializers"):
        fed.run(None, {k: v for k, v in feed.items() if k != "gate"})


@needs_kernels
def test_ring_mix_gate_of_more_than_16_heads():
    """20 heads in 4 kv groups: each unit computes the gates of its group's 5 heads, from rows of D = 40 (two vectors
    and a tail)."""
    heads, kv_heads, rows = 20, 4, 2
    feed = with_hidden_gate(ring_mix_inputs(rows, 1, 4, True, heads, kv_heads, seed=3), rows, heads, d=40, seed=3)
    model, given = gate_initializers(ring_mix_model(rows, True, heads, kv_heads, hidden_gate=True), feed)
    want = ring_mix_statement(feed, rows, 4, heads, kv_heads)
    got = session(model, True).run(None, given)
    diff = max(float(np.abs(w - g).max()) for w, g in zip(want, got))
    print(f"hidden-state gate of {heads} heads: max|kernel - statement| {diff:.1e}")
    assert diff <= 1e-5


@needs_kernels
@pytest.mark.parametrize("rows,batch", [(2, 1), (3, 2)])
def test_ring_mix_reads_the_global_output_of_older_artifacts(rows, batch):
    """Artifacts exported before StepAttention give RingMix the global GroupQueryAttention call's output, [B,
    R * rep, Hkv * Dh] (a kv group's heads of all rows as positions): the same numbers as the rows' layout."""
    model = ring_mix_model(rows, True)
    feed = ring_mix_inputs(rows, batch, 3, True, seed=rows)
    grouped = feed["global"].reshape(rows, batch, 2, 2, 16).transpose(1, 0, 3, 2, 4).reshape(batch, rows * 2, 32)
    own = session(model, True)
    want, got = own.run(None, feed), own.run(None, {**feed, "global": grouped})
    assert all(np.array_equal(w, g) for w, g in zip(want, got))


@needs_kernels
def test_ring_mix_refuses_shapes_it_cannot_read_with_a_clear_error():
    model = ring_mix_model(2, True)
    feed = ring_mix_inputs(2, 1, 3, True)
    own = session(model, True)
    bad = {"global must be": {"global": feed["global"][..., :32]},
           "ring_key and ring_value must be": {"ring_value": feed["ring_value"][..., :2, :]},
           "a position is outside cos_cache": {"position_ids": np.array([[500]])},
           "gate must be": {"gate": feed["gate"].reshape(1, 1, 1, 4)},  # as many values, another shape
           "position_ids must be": {"position_ids": np.array([7])}}
    for why, change in bad.items():
        with pytest.raises(Exception, match=f"RingMix: {why}"):
            own.run(None, {**feed, **change})
    assert own.run(None, feed)[0].shape == (2, 1, 1, 64)  # and the session goes on


RINGS = {"ring_key": "ring_k", "ring_value": "ring_v"}  # the RingMix model's past and present rings


def bind_in_place(own, feed: dict, shared: dict):
    """An IO binding of session `own` with each input named in `shared` bound as its output there as well (one
    buffer, as the runtime binds its caches and full rings), output y, and the other inputs copied in."""
    import onnxruntime as ort

    io = own.io_binding()
    io.bind_output("y")
    for name, a in feed.items():
        if name in shared:
            value = ort.OrtValue.ortvalue_from_numpy(a)
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(shared[name], value)
        else:
            io.bind_cpu_input(name, a)
    return io


def circular(rings: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Full rings [R-1, B, Hkv, W, Dh] (oldest first, entry i at position p - W + i for batch entry b's position
    p) laid out as RingMix writes them in place: position t at slot t % W."""
    return np.stack([np.roll(rings[:, b], int(p) % rings.shape[3], 2) for b, p in enumerate(positions)], 1)


@needs_kernels
@pytest.mark.parametrize("rows,batch", [(2, 1), (3, 2)])
def test_ring_mix_writes_full_rings_in_place(rows, batch):
    """Bound as both past and present, full rings are circular (position t at slot t % W): the kernel attends
    over them as over the same rings oldest first, and writes the row's own key and value over the oldest slot
    only."""
    window = 4
    model, own = ring_mix_model(rows, True, window=window), session(ring_mix_model(rows, True, window=window), True)
    feed = ring_mix_inputs(rows, batch, window, True, seed=7 + rows)
    want = ring_mix_statement(feed, rows, window)
    pos = feed["position_ids"][:, 0]
    given = {**feed, "ring_key": circular(feed["ring_key"], pos), "ring_value": circular(feed["ring_value"], pos)}
    before = {n: given[n].copy() for n in ("ring_key", "ring_value")}
    io = bind_in_place(own, given, RINGS)
    own.run_with_iobinding(io)
    diff = float(np.abs(io.copy_outputs_to_cpu()[0] - want[0]).max())
    rings = [float(np.abs(given[n] - circular(w, pos + 1)).max()) for n, w in zip(before, want[1:])]
    print(f"rows {rows}, batch {batch}, rings in place: max|output - statement| {diff:.1e}, max|rings - statement's "
          f"rings, circular| {max(rings):.1e}")
    assert diff <= 1e-5 and max(rings) <= 1e-6
    for n in before:  # in each ring, the slot of the oldest position (p - W) alone changed
        changed = [np.flatnonzero((given[n][:, b] != before[n][:, b]).any(axis=(0, 1, 3))).tolist()
                   for b in range(batch)]
        assert changed == [[int(p) % window] for p in pos]
    assert np.abs(session(model, False).run(None, feed)[0] - want[0]).max() <= 1e-5  # (the body, as ever)


@needs_kernels
def test_ring_mix_writes_in_place_only_full_rings_with_positions():
    # a ring short of the window grows: ONNX Runtime refuses the bound output of the old shape
    for rotary, ring, why in ((True, 3, "output 'ring_k' .* has shape"), (False, 4, "RingMix: rings written in place "
                                                                                    "need position_ids")):
        own = session(ring_mix_model(2, rotary, window=4), True)
        feed = ring_mix_inputs(2, 1, ring, rotary)
        with pytest.raises(Exception, match=why):
            own.run_with_iobinding(bind_in_place(own, feed, RINGS))
    own, feed = session(ring_mix_model(2, True, window=0), True), ring_mix_inputs(2, 1, 0, True)  # no rings at all
    io = bind_in_place(own, feed, RINGS)
    own.run_with_iobinding(io)
    assert np.abs(io.copy_outputs_to_cpu()[0] - ring_mix_statement(feed, 2, 0)[0]).max() <= 1e-5


def rotary_caches(head_dim: int, positions: int = 700) -> dict:
    angles = np.arange(positions)[:, None] * 10000.0 ** (-np.arange(head_dim // 2) / (head_dim // 2))
    return {"cos_cache": np.cos(angles).astype(np.float32), "sin_cache": np.sin(angles).astype(np.float32)}


def rotate_half(x, cos, sin):
    half = x.shape[-1] // 2
    return np.concatenate([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)


def step_model(rows: int, rotary: bool, heads: int, kv_heads: int, head_dim: int):
    """One pltkit.StepAttention node as the exporter writes it, with its function body."""
    gqa = GQA(heads=heads, kv_heads=kv_heads, head_dim=head_dim, window=4, scale=head_dim ** -0.5,
              rotary=("cos_cache", "sin_cache") if rotary else ())
    n = rows * heads // kv_heads
    names = [i for i in STEP_INPUTS if (rotary or i not in ("cos_cache", "sin_cache", "position_ids"))]
    node_inputs = [i if i != "attention_bias" or n > 1 else "" for i in names]
    types = {"seqlens_k": TensorProto.INT32, "total_sequence_length": TensorProto.INT32,
             "position_ids": TensorProto.INT64}
    node = helper.make_node(kernels.STEP, node_inputs, ["y", "present_key", "present_value"], domain=kernels.DOMAIN,
                            num_heads=heads, kv_num_heads=kv_heads, scale=gqa.scale)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(i, types.get(i, TensorProto.FLOAT), None)
                                            for i in node_inputs if i],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output])
    return helper.make_model(graph, opset_imports=[*OPSETS, helper.make_opsetid(kernels.DOMAIN, 1)], ir_version=10,
                             functions=[gqa.step_function(21, rows)])


def step_inputs(rows: int, batch: int, pos0: int, rotary: bool, heads: int, kv_heads: int, head_dim: int,
                spare: int = 3, seed: int = 0) -> dict:
    """A step at position pos0 over a cache buffer of pos0 + n + spare positions (random beyond pos0 too: no
    position after the token's may count)."""
    rng = np.random.default_rng(seed)
    n = rows * heads // kv_heads

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)
    cap = pos0 + n + spare
    feed = {"query": normal(rows, batch, 1, heads * head_dim), "key": normal(rows, batch, 1, kv_heads * head_dim),
            "value": normal(rows, batch, 1, kv_heads * head_dim),
            "past_key": normal(batch, kv_heads, cap, head_dim), "past_value": normal(batch, kv_heads, cap, head_dim),
            "seqlens_k": np.full(batch, pos0 + n - 1, np.int32), "total_sequence_length": np.array(pos0 + n, np.int32)}
    if n > 1:  # the body's: its n - 1 copies of the key hidden
        feed["attention_bias"] = np.concatenate([np.zeros((n, pos0 + 1)), np.full((n, n - 1), -np.inf)],
                                                1).astype(np.float32).reshape(1, 1, n, -1)
    if rotary:
        feed.update(rotary_caches(head_dim, max(700, cap + 3)), position_ids=np.full((batch, n), pos0 + 2, np.int64))
    return feed


def step_statement(feed: dict, rows: int, heads: int, kv_heads: int) -> list:
    """StepAttention in numpy: row 0's key (rotated at the entry's position where the caches are given) and value
    go into the cache at pos0 = seqlens_k + 1 - n; each row's heads attend (softmax, scale 1/sqrt(Dh)) over
    positions 0 .. pos0 of their kv head; the cache is otherwise unchanged."""
    batch, dh, rep = feed["query"].shape[1], feed["past_key"].shape[-1], heads // kv_heads
    q = feed["query"].reshape(rows, batch, heads, dh).astype(np.float64)
    k, v = (feed[i].reshape(rows, batch, kv_heads, dh).astype(np.float64) for i in ("key", "value"))
    cache_k, cache_v = feed["past_key"].copy(), feed["past_value"].copy()
    out = np.zeros_like(q)
    for b in range(batch):
        pos0 = int(feed["seqlens_k"][b]) + 1 - rows * rep
        def rot(x):
            if "cos_cache" not in feed:
                return x
            p = int(feed["position_ids"][b, 0])
            return rotate_half(x, feed["cos_cache"][p], feed["sin_cache"][p])
        cache_k[b, :, pos0], cache_v[b, :, pos0] = rot(k[0, b]), v[0, b]
        for r in range(rows):
            for h in range(heads):
                scores = cache_k[b, h // rep, :pos0 + 1].astype(np.float64) @ rot(q[r, b, h]) / np.sqrt(dh)
                p = np.exp(scores - scores.max())
                out[r, b, h] = p / p.sum() @ cache_v[b, h // rep, :pos0 + 1]
    return [out.reshape(rows, batch, 1, heads * dh), cache_k, cache_v]


@needs_kernels
# rows of 1 to 3 loops; heads: GQA groups of 2, or MHA; head size 24 has a partial vector of 16 (no rotary:
# the body's GroupQueryAttention rotates heads of multiples of 16 only); head sizes 64, 128 and 256 weigh the
# values whole rows at a time, up to 6, 3 and 1 queries a pass (queries a kv head, and a pass's: of 64, 8: 4 4, 6: 6,
# 5: 5, 10: 5 5, 1: 1; of 128, 8: 3 3 2, 12: 3 3 3 3, 1: 1); positions: empty cache, short, and 300 and 600 (the
# kernel splits keys by 256)
@pytest.mark.parametrize("rows,heads,kv_heads,head_dim,rotary",
                         [(1, 4, 2, 16, True), (2, 4, 2, 16, True), (3, 4, 2, 16, False), (2, 8, 2, 24, False),
                          (1, 2, 2, 16, True), (2, 2, 2, 24, False), (2, 8, 2, 64, True), (2, 12, 4, 64, True),
                          (1, 5, 1, 64, True), (2, 10, 2, 64, False), (1, 1, 1, 64, True), (2, 8, 2, 128, True),
                          (3, 8, 2, 128, False), (1, 1, 1, 128, True), (1, 2, 1, 256, True)])
@pytest.mark.parametrize("pos0", [0, 5, 300, 600])
def test_step_attention_kernel_equals_its_statement_and_function_body(rows, heads, kv_heads, head_dim, rotary,
                                                                       pos0):
    model = step_model(rows, rotary, heads, kv_heads, head_dim)
    feed = step_inputs(rows, 1, pos0, rotary, heads, kv_heads, head_dim, seed=pos0 + rows)
    want = step_statement(feed, rows, heads, kv_heads)
    body, got = session(model, False).run(None, feed), session(model, True).run(None, feed)
    assert [w.shape for w in want] == [b.shape for b in body] == [g.shape for g in got]
    seen = pos0 + 1  # the body writes the key at pos0 and n - 1 copies after it, which it hides
    diff = max(float(np.abs(w - g).max()) for w, g in zip(want, got))
    diff_body = max(float(np.abs(b[..., :seen, :] - g[..., :seen, :]).max()) for b, g in zip(body[1:], got[1:]))
    diff_body = max(diff_body, float(np.abs(body[0] - got[0]).max()))
    print(f"rows {rows}, heads {heads}/{kv_heads} of {head_dim}, rotary {rotary}, pos0 {pos0}: max|kernel - "
          f"statement| {diff:.1e}, max|kernel - function body| {diff_body:.1e}")
    assert diff <= 1e-5 and diff_body <= 1e-5


@needs_kernels
@pytest.mark.parametrize("heads,rows", [(2, 1), (4, 2)])
def test_step_attention_batch(heads, rows):
    """A batch of 2 at positions 7 and 300. The body's GroupQueryAttention takes one position after a past only
    for a batch (MHA, one row: the runtime's batched decode on this graph); the kernel any."""
    model = step_model(rows, True, heads, 2, 16)
    n = rows * heads // 2
    feed = step_inputs(rows, 2, 300, True, heads, 2, 16, seed=9)
    feed["seqlens_k"] = np.array([7 + n - 1, 300 + n - 1], np.int32)
    feed["position_ids"] = np.array([[9] * n, [302] * n], np.int64)
    want, got = step_statement(feed, rows, heads, 2), session(model, True).run(None, feed)
    diff = max(float(np.abs(w - g).max()) for w, g in zip(want, got))
    print(f"batch 2, {n} query positions a kv head: max|kernel - statement| {diff:.1e}")
    assert diff <= 1e-5
    if n == 1:  # the body writes past an entry's token too: each entry's cache compares up to its token
        body = session(model, False).run(None, feed)
        assert np.abs(body[0] - got[0]).max() <= 1e-5
        for b, seen in enumerate((8, 301)):
            assert max(float(np.abs(x[b, :, :seen] - y[b, :, :seen]).max()) for x, y in zip(body[1:], got[1:])) <= 1e-5


@needs_kernels
def test_shapes_read_in_place_and_the_older_way_alike():
    """From ONNX Runtime 1.24 the kernels read an input's shape in place, without the shape object older versions
    make them allocate; both ways give the same outputs and the same refusals."""
    import ctypes

    import onnxruntime as ort
    rows = 3
    feed = with_hidden_gate(ring_mix_inputs(rows, 1, 4, True, seed=5), rows, seed=5)
    model, given = gate_initializers(ring_mix_model(rows, True, hidden_gate=True), feed)
    step = step_model(2, True, 4, 2, 16)
    step_feed = step_inputs(2, 1, 300, True, 4, 2, 16, seed=6)
    ring_session, step_session = session(model, True), session(step, True)  # (the library is registered)
    lib = ctypes.CDLL(str(kernels.library()))
    if tuple(int(p) for p in ort.__version__.split(".")[:2]) < (1, 24):
        pytest.skip("ONNX Runtime before 1.24 has the older way only")
    assert lib.pltkit_read_shapes_in_place(1) == 1  # on from the first registration
    outs = []
    try:
        for in_place in (1, 0):
            assert lib.pltkit_read_shapes_in_place(in_place) == 1  # (on before each)
            outs.append(ring_session.run(None, given) + step_session.run(None, step_feed))
            with pytest.raises(Exception, match="RingMix: query must be"):
                ring_session.run(None, {**given, "query": given["query"][:, :, :, :-1]})
    finally:
        off = lib.pltkit_read_shapes_in_place(1) == 0
    assert off and all(np.array_equal(a, b) for a, b in zip(*outs))


@needs_kernels
def test_step_attention_writes_the_cache_in_place():
    """Bound as both past and present (as the runtime binds its cache buffers), the kernel writes the token's key
    and value into the buffer itself, and no other position."""
    model, rows, pos0 = step_model(2, True, 4, 2, 16), 2, 40
    feed = step_inputs(rows, 1, pos0, True, 4, 2, 16, seed=4)
    want = step_statement(feed, rows, 4, 2)
    before = {i: feed[i].copy() for i in ("past_key", "past_value")}
    own = session(model, True)
    io = bind_in_place(own, feed, {"past_key": "present_key", "past_value": "present_value"})
    own.run_with_iobinding(io)
    assert np.abs(io.copy_outputs_to_cpu()[0] - want[0]).max() <= 1e-5
    for i, w in zip(("past_key", "past_value"), want[1:]):
        changed = np.flatnonzero((feed[i] != before[i]).any(axis=(0, 1, 3)))
        assert changed.tolist() == [pos0] and np.abs(feed[i] - w).max() <= 1e-6


@needs_kernels
def test_step_attention_refuses_shapes_it_cannot_read_with_a_clear_error():
    model = step_model(2, True, 4, 2, 16)
    feed = step_inputs(2, 1, 5, True, 4, 2, 16)
    own = session(model, True)
    bad = {"past_key and past_value must be": {"past_value": feed["past_value"][:, :, :-1]},
           "key and value must be": {"key": feed["key"][:1]},
           "seqlens_k must be at least": {"seqlens_k": np.array([2], np.int32)},
           "which the cache's capacity must hold": {"total_sequence_length": np.array(50, np.int32)},
           "total_sequence_length must be a scalar": {"total_sequence_length": np.zeros(0, np.int32)},
           "past_key and past_value must be": {"past_value": feed["past_value"][0]},  # one rank fewer
           "a position is outside cos_cache": {"position_ids": np.full((1, 4), 900, np.int64)},
           "position_ids must be": {"position_ids": np.array([[7]])}}
    for why, change in bad.items():
        with pytest.raises(Exception, match=f"StepAttention: .*{why}"):
            own.run(None, {**feed, **change})
    assert own.run(None, feed)[0].shape == (2, 1, 1, 64)  # and the session goes on
    for model in (step_model(1, False, 288, 1, 4), ring_mix_model(2, False, 288, 1, 4)):  # 288 heads to a kv head
        with pytest.raises(Exception, match="at most 256 times it"):
            session(model, True)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from pltkit.export.artifact import export

    root = tmp_path_factory.mktemp("kernels")  # K of every layer a multiple of 32, N of 16: all replaceable
    make_checkpoint(root / "ckpt", make_config(hidden_size=64, intermediate_size=96, head_dim=16), seed=3)
    return {"ckpt": root / "ckpt", **{form: export(root / "ckpt", root / form, quant=SCHEMES[form])
                                      for form in ("int8", "int4", "int4-asym")}}


def decode_logits(backend, ids: np.ndarray, prompt: int = 8) -> np.ndarray:
    """Logits of ids [1, T] as the engine feeds them: a prefill of `prompt` tokens, then one decode step a
    token; [T, V]."""
    logits, state = backend.prefill(ids[:, :prompt], backend.new_state(1))
    got = [logits[0]]
    for t in range(prompt, ids.shape[1]):
        logits, state = backend.decode(ids[:, t], state)
        got.append(logits.reshape(-1, logits.shape[-1]))
    return np.concatenate(got)


def torch_same_weights(ckpt, scheme, ids: np.ndarray) -> np.ndarray:
    """The torch reference's logits with the weights the artifact computes with: the scheme's dequantized
    linear layers and 8-bit head, float16 embeddings."""
    import torch

    from pltkit.runtime.backends import open_backend

    model = open_backend(ckpt, "torch", threads=1).model
    with torch.no_grad():
        for name, t in model.state_dict().items():
            head = name == "lm_head.weight"
            q = scheme if name.endswith("_proj.weight") else (scheme.head or scheme) if head else None
            if q is not None:
                w = t.numpy().T
                t.copy_(torch.from_numpy(q.dequantize(*q.pack(w), w.shape[0]).T.copy()))
            elif name == "model.embed_tokens.weight":
                t.copy_(t.half().float())
        return model(torch.from_numpy(ids)).numpy()[0]


# max |logit difference| of the decode from torch with the same weights, on the tiny random model below
# (logits span about 12): what is left is the int8 rounding of activations per block of 32 (accuracy
# level 4), measured 0.61 (int8), 0.56 (int4) and 0.59 (int4-asym) on pltkit's kernel and on ONNX
# Runtime's alike; the same int8 artifact with float compute (level 0) leaves 1e-5. The two kernels
# must agree to 1e-4.
MAX_LOGIT_DIFF = 1.0


# nodes of the tiny model's decode graph on pltkit's kernel: q/k/v, o, gate/up and down of 2 layers and the
# 8-bit head; int4-asym's block sums as well (an 8-bit MatMulNBits beside each of its 8 linear nodes)
OWN_NODES = {"int8": 9, "int4": 9, "int4-asym": 17}


@needs_kernels
@pytest.mark.parametrize("form", list(OWN_NODES))
def test_decode_on_own_kernels_matches_ort_kernels_and_torch(artifacts, form):
    art = Artifact.open(artifacts[form])
    path = art.graph_path("decode", "gqa")
    replaced = kernels.rows_graph(onnx.load(str(path), load_external_data=False), path.parent)
    assert replaced == OWN_NODES[form]
    own, theirs = OrtBackend(art, 1, kernels="pltkit"), OrtBackend(art, 1, kernels="ort")
    attention = 2 * 2  # a StepAttention and a RingMix node in each of 2 layers: the model's loops are 2
    assert own.own_nodes == {("decode", "gqa"): replaced + attention}
    assert theirs.kernels is None and not theirs.own_nodes
    ids = np.random.default_rng(1).integers(4, 320, (1, 20))
    a, b = decode_logits(own, ids), decode_logits(theirs, ids)
    want = torch_same_weights(artifacts["ckpt"], SCHEMES[form], ids)
    diff, diff_ort, diff_ref = np.abs(a - b).max(), np.abs(b - want).max(), np.abs(a - want).max()
    print(f"{form}: {replaced} + {attention} nodes on pltkit's kernels; max|logits, own - ORT's kernels| {diff:.1e}; "
          f"max|own - torch with the same weights| {diff_ref:.3f} (ORT's kernels: {diff_ort:.3f}; "
          f"logits span {np.ptp(want):.1f})")
    assert diff <= 1e-4 and (a.argmax(-1) == b.argmax(-1)).all()
    assert diff_ref <= MAX_LOGIT_DIFF


@needs_kernels
def test_decode_writes_full_rings_in_place_and_hands_them_out_in_order(artifacts):
    """Past the window, pltkit's kernels write the rings in place (circular, state.circular); through decode steps,
    a clone decoding beside its original, a prefill after decode steps and a rewind, the logits are ONNX Runtime's
    kernels', and the rings of snapshots are theirs: oldest first."""
    art = Artifact.open(artifacts["int8"])
    own, theirs = OrtBackend(art, 1, kernels="pltkit"), OrtBackend(art, 1, kernels="ort")
    assert own.rings_in_place and not theirs.rings_in_place
    ids, worst = np.random.default_rng(2).integers(4, 320, (1, 40)), []
    states = {b: b.prefill(ids[:, :5], b.new_state(1))[1] for b in (own, theirs)}

    def run(key, t, phase="decode", n=1):
        outs = []
        for b in (own, theirs):
            tokens = ids[:, t:t + n] if phase == "prefill" else ids[:, t]
            logits, states[b, key] = getattr(b, phase)(tokens, states[b, key])
            outs.append(logits.reshape(-1, logits.shape[-1])[-1])
        worst.append(float(np.abs(outs[0] - outs[1]).max()))

    states = {(b, "a"): s for b, s in states.items()}
    for t in range(5, 11):
        run("a", t)
    # at 11 tokens, the oldest entry of a full ring (window 3: the tiny model's) is at slot 2, not 0
    assert states[own, "a"].circular and not states[theirs, "a"].circular
    snapshot = {b: states[b, "a"].snapshot() for b in (own, theirs)}
    for b in (own, theirs):
        states[b, "b"] = states[b, "a"].clone()
    for t in range(11, 14):  # a clone and its original in turn
        run("a", t), run("b", t + 10)
    run("a", 14, "prefill", 4)  # a prompt after decode steps, at 14 tokens (slot 2 again)
    run("a", 18)
    for b in (own, theirs):
        states[b, "a"].rewind(11, snapshot[b])
    for t in range(11, 14):
        run("a", t)
    rings = [float(np.abs(snapshot[own][n] - snapshot[theirs][n]).max()) for n in snapshot[own] if "ring" in n]
    print(f"max|logits, own - ORT's kernels| {max(worst):.1e} over {len(worst)} calls; max|snapshot rings| "
          f"{max(rings):.1e}")
    assert max(worst) <= 1e-4 and rings and max(rings) <= 1e-4
    # the caches (grown by reserve), rings and carries of decoded, cloned and rewound states start on cache lines
    starts = [a.ctypes.data % ALIGN for key in "ab" for a in (*states[own, key].kv.values(),
                                                              *states[own, key].other.values()) if a.size]
    assert len(starts) > 8 and not any(starts), starts


@needs_kernels
def test_ring_mix_writes_the_graph_outputs_it_is_bound_to(artifacts):
    """kernel_model makes each RingMix node write the graph's present rings itself (no Identity between), and
    says the rings may be written in place only where every RingMix reads past rings and writes present ones."""
    path = Artifact.open(artifacts["int8"]).graph_path("decode", "gqa")
    made = kernels.kernel_model(path)
    graph = onnx.load_from_string(made.model).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    rings = [n for n in graph.node if n.op_type == kernels.RING_MIX]
    assert made.rings_in_place and len(rings) == 2
    assert all({*n.input[4:6]} <= inputs and {*n.output[1:3]} <= outputs for n in rings)
    model = onnx.load(str(path), load_external_data=False)  # a present ring read by a second node as well
    ring_out = next(n.output[1] for n in model.graph.node if n.op_type == kernels.RING_MIX)
    model.graph.node.append(helper.make_node("Identity", [ring_out], ["also"]))
    model.graph.output.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, None))
    copy = path.parent / "decode.copy.onnx"
    onnx.save(model, copy)
    try:
        assert not kernels.kernel_model(copy).rings_in_place
    finally:
        copy.unlink()


@needs_kernels
def test_ring_mix_reads_no_lengths_and_their_nodes_go(artifacts):
    """The exporter gives RingMix the rings' lengths (its function body's GroupQueryAttention reads them); the
    kernel takes them from the rings, so kernel_model drops them, and the nodes that compute them go with them."""
    path = Artifact.open(artifacts["int8"]).graph_path("decode", "gqa")
    model = onnx.load(str(path), load_external_data=False)
    graph = onnx.load_from_string(kernels.kernel_model(path).model).graph
    rings = [n for n in graph.node if n.op_type == kernels.RING_MIX]
    assert rings and all(n.input[i] == "" for n in rings for i in kernels.RING_LENGTHS)
    given = {n.input[i] for n in model.graph.node if n.op_type == kernels.RING_MIX for i in kernels.RING_LENGTHS}
    assert given and "" not in given
    made = {o for n in graph.node for o in n.output}
    assert not given & made, given & made  # (nothing else reads them; the decode tests run this graph)


@needs_kernels
def test_decode_without_a_window_on_own_kernels(tmp_path):
    """A local window of 0 (rings of no entries): pltkit's kernels decode as ONNX Runtime's do, and nothing is
    bound or written in place."""
    from pltkit.export.artifact import export

    make_checkpoint(tmp_path / "ckpt", make_config(hidden_size=64, intermediate_size=96, head_dim=16,
                                                   plt_window_size=[0, 0]), seed=3)
    art = Artifact.open(export(tmp_path / "ckpt", tmp_path / "int8", quant=SCHEMES["int8"]))
    own, theirs = OrtBackend(art, 1, kernels="pltkit"), OrtBackend(art, 1, kernels="ort")
    ids = np.random.default_rng(4).integers(4, 320, (1, 12))
    a, b = decode_logits(own, ids, prompt=4), decode_logits(theirs, ids, prompt=4)
    print(f"window 0: max|logits, own - ORT's kernels| {np.abs(a - b).max():.1e}")
    assert np.abs(a - b).max() <= 1e-4


@needs_kernels
def test_the_kernels_count_their_calls_and_cycles(artifacts):
    """kernels.cycles: each op's calls over the decode steps since a reset (the tiny int8 model's decode graph: 9
    RowsMatMulNBits, 2 StepAttention and 2 RingMix nodes), and their time-stamp counter cycles."""
    art = Artifact.open(artifacts["int8"])
    own = OrtBackend(art, 1, kernels="pltkit")
    _, state = own.prefill(np.array([[5, 6, 7]]), own.new_state(1))
    kernels.cycles(reset=True)
    for t in range(4):
        _, state = own.decode(np.array([8 + t]), state)
    counted = kernels.cycles(reset=True)
    assert {op: calls for op, (calls, _) in counted.items()} == {kernels.OP: 36, kernels.STEP: 8, kernels.RING_MIX: 8}
    assert all(c > 0 for _, c in counted.values())
    assert all(calls == 0 for calls, _ in kernels.cycles().values())  # (the reset)
    assert kernels.counter_hz(0.01) > 1e8


def test_the_sources_compile_wherever_a_compiler_is(tmp_path):
    """Every kernel test skips where the kernels cannot run; a compile error in pltkit's own sources must fail
    (where the compiler knows the AVX-512 VNNI target they name: GCC 8 and clang 6 on)."""
    _, why = kernels._built()
    if (why or "").startswith("building pltkit's kernels failed"):
        probe = tmp_path / "probe.c"
        probe.write_text('__attribute__((target("avx512f,avx512bw,avx512vnni,fma"))) int f(void) { return 0; }\n')
        cc = kernels.compiler()
        if subprocess.run([cc, *kernels.FLAGS, str(probe), "-o", str(tmp_path / "probe.so")]).returncode:
            pytest.skip(f"{cc} cannot build for the AVX-512 VNNI target")
    assert not (why or "").startswith("building pltkit's kernels failed"), why


def test_kernels_choice_is_checked(artifacts, monkeypatch, tmp_path):
    art = Artifact.open(artifacts["int8"])
    with pytest.raises(ArtifactError, match="unknown kernels 'fast'"):
        OrtBackend(art, 1, kernels="fast")
    (tmp_path / "a-file").write_text("")
    broken = {"no C compiler": ("CC", str(tmp_path / "no-such-cc")),  # the cache: a file, not a folder
              "building or loading pltkit's kernels failed": ("XDG_CACHE_HOME", str(tmp_path / "a-file"))}
    for why, (name, value) in broken.items():
        with monkeypatch.context() as m:
            m.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there
            m.setenv(name, value)
            kernels._built.cache_clear()
            try:
                with pytest.raises(ArtifactError, match=f"pltkit's kernels cannot run here: {why}"):
                    OrtBackend(art, 1, kernels="pltkit")
                auto = OrtBackend(art, 1, kernels="auto")  # falls back to ONNX Runtime's kernels, and runs
                assert auto.kernels is None and not auto.own_nodes
                assert decode_logits(auto, np.array([[5, 6, 7, 8]]), prompt=3).shape == (4, 320)
            finally:
                kernels._built.cache_clear()


@needs_kernels
def test_a_graph_the_kernel_refuses_decodes_on_ort_kernels_under_auto(artifacts, monkeypatch):
    """Should rows_graph write a node the op refuses, 'auto' opens the graph as it is, 'pltkit' says why."""
    art = Artifact.open(artifacts["int8"])
    real = kernels.rows_graph

    def broken(model, folder=None):
        count = real(model, folder)
        for node in model.graph.node:
            for a in node.attribute:
                if node.op_type == kernels.OP and a.name == "zero_point":
                    a.i = 300
        return count

    monkeypatch.setattr(kernels, "rows_graph", broken)
    with pytest.raises(ArtifactError, match="pltkit's kernel cannot run decode.gqa.onnx"):
        OrtBackend(art, 1, kernels="pltkit")
    auto = OrtBackend(art, 1, kernels="auto")
    assert auto.kernels is None and not auto.own_nodes
    assert decode_logits(auto, np.array([[5, 6, 7, 8]]), prompt=3).shape == (4, 320)
