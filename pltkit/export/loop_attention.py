"""plt.ops::LoopAttention, version 2: the attention of one PLT layer as one ONNX node.

The spec is docs/loop-attention-op.md. This module writes the node and the model-local
ONNX function of the same name whose body is the reference decomposition in standard
ops (opset 21), so a stock ONNX Runtime runs any artifact; a runtime with a kernel for
the op (or TensorRT, through the node's plugin attributes) replaces the body. The op's
fast path on ONNX Runtime's kernels is pltkit.export.gqa.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, helper

from pltkit.export.graph import FLOAT, TO_END, Graph
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


class _Body:
    """The function body, one step of the spec's semantics a method, over the op's inputs (named
    as in INPUTS) and attributes (Constants that read the calling node's)."""

    def __init__(self, opset: int, dtype: str):
        self.g = g = Graph(opset)
        elem, self.ft = float_type(dtype).onnx, float_type(dtype).numpy
        first, self.window, scale, self.kv_buffer = (g.attribute(a, ATTRIBUTES[a])
                                                     for a in ("first_loop", "window", "scale", "kv_buffer"))
        self.scale = g.op("Cast", scale, to=elem) if elem != FLOAT else scale
        one, zero, self.to_end = g.const([1]), g.const([0]), g.const([TO_END])
        # Row 0 is loop 0 (and writes the global cache) iff first_loop == 0: `split` rows.
        self.split = g.op("Sub", one, g.op("Min", g.op("Unsqueeze", first, zero), one))
        self.q_shape, self.k_shape = g.op("Shape", "query"), g.op("Shape", "key")
        self.hkv = g.op("Slice", self.k_shape, g.const([2]), g.const([3]))
        self.dh = g.op("Slice", self.k_shape, g.const([4]), g.const([5]))

    def cache_write(self) -> tuple[str, str]:
        """1. Loop-0 rows' keys/values go to the global cache at index `at`: appended (at = P), or
        over positions pos0.. of a buffer (kv_buffer: at = pos0, the length stays)."""
        g, zero, split = self.g, self.g.const([0]), self.split
        n_new = g.op("Mul", split, g.op("Slice", self.k_shape, g.const([3]), g.const([4])))
        past_len = g.op("Slice", g.op("Shape", "past_key"), g.const([2]), g.const([3]))
        buffer = g.op("Unsqueeze", self.kv_buffer, zero)
        at = g.op("Add", past_len, g.op("Mul", buffer, g.op("Sub", g.op("Unsqueeze", "pos0", zero), past_len)))
        after = g.op("Add", at, g.op("Mul", buffer, n_new))

        def write(x, past):
            rows = g.op("Transpose", g.op("Slice", x, zero, split, zero), perm=[1, 2, 0, 3, 4])
            flat = g.op("Reshape", rows, g.op("Concat", g.const([0, 0]), n_new, self.dh, axis=0))
            axis = g.const([2])
            return g.op("Concat", g.op("Slice", past, zero, at, axis), flat,
                        g.op("Slice", past, after, self.to_end, axis), axis=2)

        return write("key", "past_key"), write("value", "past_value")

    def global_branch(self, present_k: str, present_v: str) -> tuple[str, str]:
        """2. Every row: causal over the global cache by position. Only positions up to pos0 + S - 1
        can be visible: the rest of a buffer is never read (nor its cost paid). Returns the branch's
        output and the query positions [S, 1]."""
        g, zero, one = self.g, self.g.const([0]), self.g.const([1])
        s = g.op("Squeeze", g.op("Slice", self.k_shape, g.const([3]), g.const([4])), zero)
        q_pos = g.op("Add", g.op("Range", g.const(0), s, g.const(1)), "pos0")
        seen = g.op("Unsqueeze", g.op("Add", "pos0", s), zero)
        glob_k, glob_v = (g.op("Slice", x, zero, seen, g.const([2])) for x in (present_k, present_v))
        total = g.op("Squeeze", g.op("Slice", g.op("Shape", glob_k), g.const([2]), g.const([3])), zero)
        k_pos = g.op("Range", g.const(0), total, g.const(1))
        q_col = g.op("Unsqueeze", q_pos, one)
        causal = g.op("LessOrEqual", g.op("Unsqueeze", k_pos, zero), q_col)
        return _attend(g, "query", g.op("Unsqueeze", glob_k, zero), g.op("Unsqueeze", glob_v, zero), causal,
                       self.scale, self.q_shape, self.hkv, self.ft), q_col

    def ring_rows(self, x: str) -> str:
        """The rows of loops >= 1."""
        return self.g.op("Slice", x, self.split, self.to_end, self.g.const([0]))

    def local_branch(self, q_col: str) -> tuple[str, str, str, str]:
        """3. Rows of loops >= 1: the row's ring plus its own keys, inside the window. Returns the
        branch's output, its keys, values and their count."""
        g, zero = self.g, self.g.const([0])
        loc_k = g.op("Concat", "ring_key", self.ring_rows("key"), axis=3)
        loc_v = g.op("Concat", "ring_value", self.ring_rows("value"), axis=3)
        w = g.op("Squeeze", g.op("Slice", g.op("Shape", "ring_key"), g.const([3]), g.const([4])), zero)
        n_loc = g.op("Squeeze", g.op("Slice", g.op("Shape", loc_k), g.const([3]), g.const([4])), zero)
        loc_pos = g.op("Add", g.op("Range", g.const(0), n_loc, g.const(1)), g.op("Sub", "pos0", w))
        loc_row = g.op("Unsqueeze", loc_pos, zero)
        in_window = g.op("And", g.op("LessOrEqual", loc_row, q_col),
                         g.op("GreaterOrEqual", loc_row, g.op("Sub", q_col, self.window)))
        q_loc = self.ring_rows("query")
        y = _attend(g, q_loc, loc_k, loc_v, in_window, self.scale, g.op("Shape", q_loc), self.hkv, self.ft)
        return y, loc_k, loc_v, n_loc

    def gate_mix(self, y_global: str, y_local: str) -> str:
        """4. g * global + (1 - g) * local for loop >= 1 rows; loop-0 rows keep global."""
        g, zero = self.g, self.g.const([0])
        gt = g.op("Unsqueeze", "gate", g.const([-1]))
        y_g_loc = self.ring_rows(y_global)
        mixed = g.op("Add", g.op("Mul", gt, y_g_loc), g.op("Mul", g.op("Sub", g.const(1.0, self.ft), gt), y_local))
        return g.op("Concat", g.op("Slice", y_global, zero, self.split, zero), mixed, axis=0)

    def rings(self, loc_k: str, loc_v: str, n_loc: str) -> list[str]:
        """5. Rings keep their last `window` keys/values."""
        g = self.g
        keep_from = g.op("Unsqueeze", g.op("Max", g.const(0), g.op("Sub", n_loc, self.window)), g.const([0]))
        return [g.op("Slice", x, keep_from, self.to_end, g.const([3])) for x in (loc_k, loc_v)]


def function_proto(opset: int, dtype: str = "float32") -> onnx.FunctionProto:
    """The reference decomposition of LoopAttention in standard ops, for float tensors of `dtype`."""
    body = _Body(opset, dtype)
    present_k, present_v = body.cache_write()
    y_global, q_col = body.global_branch(present_k, present_v)
    y_local, loc_k, loc_v, n_loc = body.local_branch(q_col)
    outs = [body.gate_mix(y_global, y_local), present_k, present_v, *body.rings(loc_k, loc_v, n_loc)]
    nodes = body.g.nodes + [helper.make_node("Identity", [o], [name], name=f"/out/{name}")
                            for o, name in zip(outs, OUTPUTS)]
    return helper.make_function(DOMAIN, OP, INPUTS, OUTPUTS, nodes,
                                [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES))
