"""plt.ops::LoopAttention, version 1: the attention of one PLT layer as one ONNX node.

The spec is docs/loop-attention-op.md. This module writes the node and the model-local
ONNX function of the same name whose body is the reference decomposition in standard
ops (opset 21), so a stock ONNX Runtime runs any artifact; a runtime with a kernel for
the op (or TensorRT, through the node's plugin attributes) replaces the body.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, helper

from pltkit.export.graph import FLOAT, Graph, float_type

DOMAIN = "plt.ops"
OP = "LoopAttention"
VERSION = 2  # 2: the kv_buffer attribute
PLUGIN_NAMESPACE = "pltkit"
PLUGIN_VERSION = "1"  # TensorRT's Python plugins are always version 1
INPUTS = ["query", "key", "value", "past_key", "past_value", "ring_key", "ring_value", "gate", "pos0"]
OUTPUTS = ["output", "present_key", "present_value", "present_ring_key", "present_ring_value"]
ATTRIBUTES = {"first_loop": AttributeProto.INT, "window": AttributeProto.INT, "scale": AttributeProto.FLOAT,
              "kv_buffer": AttributeProto.INT, "plugin_namespace": AttributeProto.STRING,
              "plugin_version": AttributeProto.STRING}


def loop_attention(g: Graph, inputs: list[str], *, first_loop: int, window: int, scale: float,
                   kv_buffer: bool = False) -> list[str]:
    """Add one LoopAttention node; returns its five output names."""
    return g.op(OP, *inputs, n_out=len(OUTPUTS), domain=DOMAIN, first_loop=first_loop, window=window,
                scale=scale, kv_buffer=int(kv_buffer), plugin_namespace=PLUGIN_NAMESPACE,
                plugin_version=PLUGIN_VERSION)


def _ref(g: Graph, attr: str, kind: int) -> str:
    """A Constant whose value is the calling node's attribute `attr`."""
    out = g._name(f"attr_{attr}")
    node = helper.make_node("Constant", [], [out], name=out)
    a = AttributeProto(name={AttributeProto.INT: "value_int", AttributeProto.FLOAT: "value_float"}[kind],
                       ref_attr_name=attr, type=kind)
    node.attribute.append(a)
    g.nodes.append(node)
    return out


def _attend(g: Graph, q: str, k: str, v: str, mask: str, scale: str, q_shape: str, hkv: str, ft) -> str:
    """Softmax attention with grouped heads. q [..., H, S, Dh]; k, v [..., Hkv, T, Dh] broadcastable
    over the leading dims; mask [S, T] bool. Heads are grouped as [..., Hkv, H/Hkv, S, Dh]."""
    lead = g.op("Slice", q_shape, g.const([0]), g.const([-3]))
    rep = g.op("Div", g.op("Slice", q_shape, g.const([-3]), g.const([-2])), hkv)
    tail = g.op("Slice", q_shape, g.const([-2]), g.const([5]))
    grouped = g.op("Concat", lead, hkv, rep, tail, axis=0)  # explicit sizes: R may be 0
    q6 = g.op("Reshape", q, grouped)
    k6, v6 = g.op("Unsqueeze", k, g.const([-3])), g.op("Unsqueeze", v, g.const([-3]))
    scores = g.op("Mul", g.op("MatMul", q6, g.op("Transpose", k6, perm=[0, 1, 2, 3, 5, 4])), scale)
    neg_inf = g.const(-np.inf, ft)
    probs = g.op("Softmax", g.op("Where", mask, scores, neg_inf), axis=-1)
    return g.op("Reshape", g.op("MatMul", probs, v6), q_shape)


def function_proto(opset: int, dtype: str = "float32") -> onnx.FunctionProto:
    """The reference decomposition of LoopAttention in standard ops, for float tensors of `dtype`."""
    elem, ft = float_type(dtype)
    g = Graph(opset)
    q, k, v, past_k, past_v, ring_k, ring_v, gate, pos0 = INPUTS
    first, window, scale, kv_buffer = (_ref(g, "first_loop", AttributeProto.INT),
                                       _ref(g, "window", AttributeProto.INT),
                                       _ref(g, "scale", AttributeProto.FLOAT), _ref(g, "kv_buffer", AttributeProto.INT))
    if elem != FLOAT:
        scale = g.op("Cast", scale, to=elem)
    one, zero, big = g.const([1]), g.const([0]), g.const([2**62])
    # Row 0 is loop 0 (and writes the global cache) iff first_loop == 0: `split` rows.
    split = g.op("Sub", one, g.op("Min", g.op("Unsqueeze", first, zero), one))
    q_shape, k_shape = g.op("Shape", q), g.op("Shape", k)
    hkv = g.op("Slice", k_shape, g.const([2]), g.const([3]))
    dh = g.op("Slice", k_shape, g.const([4]), g.const([5]))

    # 1. cache write: loop-0 rows' keys/values go to the global cache at index `at`: appended
    # (at = P), or over positions pos0.. of a buffer (kv_buffer: at = pos0, the length stays).
    n_new = g.op("Mul", split, g.op("Slice", k_shape, g.const([3]), g.const([4])))
    past_len = g.op("Slice", g.op("Shape", past_k), g.const([2]), g.const([3]))
    buffer = g.op("Unsqueeze", kv_buffer, zero)
    at = g.op("Add", past_len, g.op("Mul", buffer, g.op("Sub", g.op("Unsqueeze", pos0, zero), past_len)))
    after = g.op("Add", at, g.op("Mul", buffer, n_new))

    def write(x, past):
        rows = g.op("Transpose", g.op("Slice", x, zero, split, zero), perm=[1, 2, 0, 3, 4])
        flat = g.op("Reshape", rows, g.op("Concat", g.const([0, 0]), n_new, dh, axis=0))
        axis = g.const([2])
        return g.op("Concat", g.op("Slice", past, zero, at, axis), flat, g.op("Slice", past, after, big, axis), axis=2)

    present_k, present_v = write(k, past_k), write(v, past_v)

    # 2. global branch, every row: causal over the global cache by position. Only positions up to
    # pos0 + S - 1 can be visible: the rest of a buffer is never read (nor its cost paid).
    s = g.op("Squeeze", g.op("Slice", k_shape, g.const([3]), g.const([4])), zero)
    q_pos = g.op("Add", g.op("Range", g.const(0), s, g.const(1)), pos0)
    seen = g.op("Unsqueeze", g.op("Add", pos0, s), zero)
    glob_k, glob_v = (g.op("Slice", x, zero, seen, g.const([2])) for x in (present_k, present_v))
    total = g.op("Squeeze", g.op("Slice", g.op("Shape", glob_k), g.const([2]), g.const([3])), zero)
    k_pos = g.op("Range", g.const(0), total, g.const(1))
    q_col = g.op("Unsqueeze", q_pos, one)
    causal = g.op("LessOrEqual", g.op("Unsqueeze", k_pos, zero), q_col)
    y_global = _attend(g, q, g.op("Unsqueeze", glob_k, zero), g.op("Unsqueeze", glob_v, zero),
                       causal, scale, q_shape, hkv, ft)

    # 3. local branch, rows of loops >= 1: the row's ring plus its own keys, inside the window.
    def ring_rows(x):
        return g.op("Slice", x, split, big, zero)

    loc_k = g.op("Concat", ring_k, ring_rows(k), axis=3)
    loc_v = g.op("Concat", ring_v, ring_rows(v), axis=3)
    w = g.op("Squeeze", g.op("Slice", g.op("Shape", ring_k), g.const([3]), g.const([4])), zero)
    n_loc = g.op("Squeeze", g.op("Slice", g.op("Shape", loc_k), g.const([3]), g.const([4])), zero)
    loc_pos = g.op("Add", g.op("Range", g.const(0), n_loc, g.const(1)), g.op("Sub", pos0, w))
    loc_row = g.op("Unsqueeze", loc_pos, zero)
    in_window = g.op("And", g.op("LessOrEqual", loc_row, q_col),
                     g.op("GreaterOrEqual", loc_row, g.op("Sub", q_col, window)))
    q_loc = ring_rows(q)
    y_local = _attend(g, q_loc, loc_k, loc_v, in_window, scale, g.op("Shape", q_loc), hkv, ft)

    # 4. gate mix: g * global + (1 - g) * local for loop >= 1 rows; loop-0 rows keep global.
    gt = g.op("Unsqueeze", gate, g.const([-1]))
    y_g_loc = ring_rows(y_global)
    mixed = g.op("Add", g.op("Mul", gt, y_g_loc), g.op("Mul", g.op("Sub", g.const(1.0, ft), gt), y_local))
    output = g.op("Concat", g.op("Slice", y_global, zero, split, zero), mixed, axis=0)

    # 5. rings keep their last `window` keys/values.
    keep_from = g.op("Unsqueeze", g.op("Max", g.const(0), g.op("Sub", n_loc, window)), zero)
    ring_k_out = g.op("Slice", loc_k, keep_from, big, g.const([3]))
    ring_v_out = g.op("Slice", loc_v, keep_from, big, g.const([3]))

    outs = [output, present_k, present_v, ring_k_out, ring_v_out]
    nodes = g.nodes + [helper.make_node("Identity", [o], [name], name=f"/out/{name}")
                       for o, name in zip(outs, OUTPUTS)]
    return helper.make_function(DOMAIN, OP, INPUTS, OUTPUTS, nodes,
                                [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES))


# --- fast path: decode on com.microsoft.GroupQueryAttention ----------------------------------
def loop_attention_gqa_decode(g: Graph, inputs: list[str], *, rows: int, window: int, scale: float,
                              heads: int, kv_heads: int, rotary: tuple | None = None) -> list[str]:
    """LoopAttention of a decode step (first_loop = 0, S = 1) on ONNX Runtime's GroupQueryAttention
    kernels. Global branch: ONE call for all rows, the rows' query heads stacked as extra heads
    of each kv group, appending loop 0's key to the global cache in place (past_key is a buffer of
    `capacity` positions shared with present_key; pos0 valid entries). Local branch: one call per
    extra loop over its ring (local_window_size = window + 1 keys including the current one).

    rotary: (cos_cache, sin_cache, q, k) with q, k NOT rotated: the global call rotates them at
    the token's position itself (do_rotary); the rows of `inputs` then only serve the rings."""
    q, k, v, past_k, past_v, ring_k, ring_v, gate, pos0 = inputs
    zero, big, rep = g.const([0]), g.const([2**62]), heads // kv_heads

    def row(x, r):  # [R, B, n, 1, Dh] -> row r as [B, 1, n*Dh]
        x = g.op("Transpose", g.op("Gather", x, g.const(r), axis=0), perm=[0, 2, 1, 3])
        return g.op("Reshape", x, g.const([0, 0, -1]))

    def unrow(y):  # [B, 1, H*Dh] -> [1, B, H, 1, Dh]
        y = g.op("Reshape", y, g.const([0, 0, heads, -1]))
        return g.op("Unsqueeze", g.op("Transpose", y, perm=[0, 2, 1, 3]), zero)

    def lengths(batch, total):  # GQA's total_sequence_length and seqlens_k
        total32 = g.op("Cast", total, to=6)
        return total32, g.op("Expand", g.op("Sub", total32, g.const(1, np.int32)), batch)

    def ring_total(r, pk):  # keys of a local call: the ring's valid entries + 1
        return g.shared(("gqa.ring.total", r), lambda: g.op("Add", g.op("Gather", g.op("Shape", pk), g.const(2)),
                                                           g.const(1)))

    def gqa(query, key, value, pk, pv, n_heads, lens, window_size=-1, caches=()):
        total32, seqlens = lens
        extra = dict(do_rotary=1, rotary_interleaved=0) if caches else {}
        return g.op("GroupQueryAttention", query, key, value, pk, pv, seqlens, total32, *caches, n_out=3,
                    domain="com.microsoft", num_heads=n_heads, kv_num_heads=kv_heads, scale=scale,
                    local_window_size=window_size, **extra)

    q_glob, k_glob, caches = (rotary[2], rotary[3], rotary[:2]) if rotary else (q, k, ())
    # global: q [R, B, H, 1, Dh] -> [B, 1, Hkv * R * rep * Dh], grouped by kv head
    qg = g.op("Reshape", g.op("Transpose", q_glob, perm=[1, 3, 0, 2, 4]), g.const([0, 0, rows, kv_heads, rep, -1]))
    qg = g.op("Reshape", g.op("Transpose", qg, perm=[0, 1, 3, 2, 4, 5]), g.const([0, 0, -1]))
    # the lengths are the same in every layer (the caches, and the rings, have one length): built once
    batch = g.shared("gqa.batch", lambda: g.op("Slice", g.op("Shape", qg), zero, g.const([1])))
    lens = g.shared("gqa.global.lengths", lambda: lengths(batch, g.op("Add", pos0, g.const(1))))
    yg, present_k, present_v = gqa(qg, row(k_glob, 0), row(v, 0), past_k, past_v, rows * heads, lens, caches=caches)
    yg = g.op("Transpose", g.op("Reshape", yg, g.const([0, 0, kv_heads, rows, rep, -1])), perm=[0, 1, 3, 2, 4, 5])
    y_global = g.op("Transpose", g.op("Reshape", yg, g.const([0, 0, rows, heads, -1])), perm=[2, 0, 3, 1, 4])

    outs, rings_k, rings_v = [g.op("Slice", y_global, zero, g.const([1]), zero)], [], []
    for r in range(1, rows):
        rk, rv = g.op("Gather", ring_k, g.const(r - 1), axis=0), g.op("Gather", ring_v, g.const(r - 1), axis=0)
        total = ring_total(r, rk)
        y_local, loc_k, loc_v = gqa(row(q, r), row(k, r), row(v, r), rk, rv, heads,
                                    g.shared(("gqa.ring.lengths", r), lambda: lengths(batch, total)),
                                    window_size=window + 1)
        gt = g.op("Unsqueeze", g.op("Gather", gate, g.const(r - 1), axis=0), g.const([0, -1]))
        y_g = g.op("Slice", y_global, g.const([r]), g.const([r + 1]), zero)
        outs.append(g.op("Add", g.op("Mul", gt, y_g),
                         g.op("Mul", g.op("Sub", g.const(1.0, np.float32), gt), unrow(y_local))))
        keep = g.shared(("gqa.ring.keep", r),  # the local call's keys (total of them) -> the newest `window`
                        lambda: g.op("Unsqueeze", g.op("Max", g.const(0), g.op("Sub", total, g.const(window))), zero))
        rings_k.append(g.op("Unsqueeze", g.op("Slice", loc_k, keep, big, g.const([2])), zero))
        rings_v.append(g.op("Unsqueeze", g.op("Slice", loc_v, keep, big, g.const([2])), zero))
    out = outs[0] if rows == 1 else g.op("Concat", *outs, axis=0)
    ring_out_k = g.op("Concat", *rings_k, axis=0) if rings_k else g.op("Identity", ring_k)
    ring_out_v = g.op("Concat", *rings_v, axis=0) if rings_v else g.op("Identity", ring_v)
    return [out, present_k, present_v, ring_out_k, ring_out_v]
