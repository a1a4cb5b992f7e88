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

from pltkit.export.graph import FLOAT, Graph
from pltkit.model.formats import float_type

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
    elem, ft = float_type(dtype).onnx, float_type(dtype).numpy
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


# --- fast path: com.microsoft.GroupQueryAttention (decode, prefill's loop 0) --------------------
def loop_attention_gqa(g: Graph, inputs: list[str], *, rows: int, window: int, scale: float,
                       heads: int, kv_heads: int, head_dim: int, rotary: tuple | None = None) -> list[str]:
    """LoopAttention with first_loop = 0 on ONNX Runtime's GroupQueryAttention kernels, in the
    projections' own layout: q [R, B, S, H*Dh], k and v [R, B, S, Hkv*Dh], output [R, B, S, H*Dh]
    (no head transposes). One row (loop 0 alone: a prefill chunk, or a one-loop model's decode
    step), or all L loops of a decode step (S = 1) with gate [R-1, B, H, 1]. One row may come
    packed: q [1, B, S, (H + 2 Hkv)*Dh], k and v None.

    Global branch: ONE call for all rows, the rows' query heads stacked as extra heads of each kv
    group, appending loop 0's key to the global cache in place (past_key is a buffer of `capacity`
    positions shared with present_key; pos0 valid entries). Local branch: one call per extra loop
    over its ring (local_window_size = window + 1 keys including the current one).

    rotary: (cos_cache, sin_cache) when q and k are NOT rotated: every call rotates them at the
    token's position itself (do_rotary; the ring calls get it as position_ids)."""
    q, k, v, past_k, past_v, ring_k, ring_v, gate, pos0 = inputs
    zero, big = g.const([0]), g.const([2**62])
    caches = tuple(rotary or ())

    def take(x, r):  # row r: [R, ...] -> [...]
        return g.op("Gather", x, g.const(r), axis=0)

    def rows_of(xs):  # [1, ...] pieces -> [len(xs), ...]
        return xs[0] if len(xs) == 1 else g.op("Concat", *xs, axis=0)

    def lengths(batch, total):  # GQA's total_sequence_length and seqlens_k
        total32 = g.op("Cast", total, to=6)
        return total32, g.op("Expand", g.op("Sub", total32, g.const(1, np.int32)), batch)

    def gqa(query, key, value, pk, pv, n_heads, lens, window_size=-1, caches=()):
        total32, seqlens = lens
        extra = dict(do_rotary=1, rotary_interleaved=0) if caches else {}
        return g.op("GroupQueryAttention", query, key, value, pk, pv, seqlens, total32, *caches, n_out=3,
                    domain="com.microsoft", num_heads=n_heads, kv_num_heads=kv_heads, scale=scale,
                    local_window_size=window_size, **extra)

    # global: the rows' heads grouped by kv head, [B, 1, Hkv * R * rep * Dh]
    if rows == 1:
        qg = take(q, 0)
    else:
        qg = g.op("Transpose", g.op("Reshape", q, g.const([0, 0, kv_heads, -1])), perm=[1, 2, 0, 3])
        qg = g.op("Reshape", qg, g.const([0, 1, -1]))
    # the lengths are the same in every layer (the caches, and the rings, have one length): built once
    batch = g.shared("gqa.batch", lambda: g.op("Slice", g.op("Shape", q), g.const([1]), g.const([2])))
    lens = g.shared("gqa.global.lengths",  # the cache holds pos0 + S keys after the call
                    lambda: lengths(batch, g.op("Add", pos0, g.op("Gather", g.op("Shape", q), g.const(2)))))
    key, value = ("", "") if k is None else (take(k, 0), take(v, 0))
    yg, present_k, present_v = gqa(qg, key, value, past_k, past_v, rows * heads, lens, caches=caches)
    if rows == 1:
        return [g.op("Unsqueeze", yg, zero), present_k, present_v, None, None]  # no rings
    yg = g.op("Transpose", g.op("Reshape", yg, g.const([0, kv_heads, rows, -1])), perm=[2, 0, 1, 3])
    y_rows = g.op("Reshape", yg, g.const([0, 0, heads, head_dim]))  # [R, B, H, Dh]

    def positions():  # a ring call's keys are relative: the token's position, [B, 1]
        return g.shared("gqa.position_ids", lambda: g.op("Expand", g.op("Reshape", pos0, g.const([1, 1])),
                                                         g.op("Concat", batch, g.const([1]), axis=0)))

    locals_, rings_k, rings_v = [], [], []
    for r in range(1, rows):
        rk = take(ring_k, r - 1)
        total = g.shared(("gqa.ring.total", r), lambda: g.op("Add", g.op("Gather", g.op("Shape", rk), g.const(2)),
                                                             g.const(1)))
        y_local, loc_k, loc_v = gqa(take(q, r), take(k, r), take(v, r), rk, take(ring_v, r - 1), heads,
                                    g.shared(("gqa.ring.lengths", r), lambda: lengths(batch, total)),
                                    window_size=window + 1, caches=caches and (*caches, positions()))
        locals_.append(g.op("Reshape", y_local, g.const([1, -1, heads, head_dim])))
        keep = g.shared(("gqa.ring.keep", r),  # the local call's keys (total of them) -> the newest `window`
                        lambda: g.op("Unsqueeze", g.op("Max", g.const(0), g.op("Sub", total, g.const(window))), zero))
        rings_k.append(g.op("Unsqueeze", g.op("Slice", loc_k, keep, big, g.const([2])), zero))
        rings_v.append(g.op("Unsqueeze", g.op("Slice", loc_v, keep, big, g.const([2])), zero))
    y_local = rows_of(locals_)
    # rows >= 1: g * global + (1 - g) * local = local + g * (global - local)
    y_g = g.op("Slice", y_rows, g.const([1]), big, zero)
    mixed = g.op("Add", y_local, g.op("Mul", gate, g.op("Sub", y_g, y_local)))
    out = g.op("Concat", g.op("Slice", y_rows, zero, g.const([1]), zero), mixed, axis=0)
    out = g.op("Reshape", out, g.const([0, 0, 1, -1]))
    return [out, present_k, present_v, rows_of(rings_k), rows_of(rings_v)]
