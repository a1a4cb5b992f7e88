"""plt.ops::LoopAttention, version 2: the attention of one PLT layer as one ONNX node.

The spec is docs/loop-attention-op.md. This module writes the node and the model-local
ONNX function of the same name whose body is the reference decomposition in standard
ops (opset 21), so a stock ONNX Runtime runs any artifact; a runtime with a kernel for
the op (or TensorRT, through the node's plugin attributes) replaces the body. It also
writes the op's fast path on ONNX Runtime's GroupQueryAttention kernels, for the calls
that start at loop 0 (decode, and prefill's loop 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
# pltkit.RingMix (GQA.all_loops): the rows of loops >= 1 of a decode step over their rings, mixed with the
# global call's output; a model-local function, which pltkit's CPU kernel replaces where it runs
KERNEL_DOMAIN, RING_MIX = "pltkit", "RingMix"
RING_MIX_INPUTS = ["query", "key", "value", "global", "ring_key", "ring_value", "gate", "seqlens_k",
                   "total_sequence_length", "cos_cache", "sin_cache", "position_ids"]
RING_MIX_OUTPUTS = ["output", "present_ring_key", "present_ring_value"]
OWN_OPS = {RING_MIX: "pltkit/runtime/kernels/ring_mix.c"}  # pltkit's ops with function bodies -> their spec
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


# --- fast path: com.microsoft.GroupQueryAttention (decode, prefill's loop 0) --------------------
@dataclass(frozen=True)
class GQA:
    """LoopAttention with first_loop = 0 on ONNX Runtime's GroupQueryAttention kernels, in the
    projections' own layout: q [R, B, S, H*Dh], k and v [R, B, S, Hkv*Dh], output [R, B, S, H*Dh]
    (no head transposes): `loop0` for one row (loop 0 alone), `all_loops` for the L rows of a
    decode step.

    Global branch, in place (past_key is a buffer of `capacity` positions shared with present_key;
    pos0 valid entries): a decode step (`step`) makes ONE call for all rows with each kv group's
    query heads of all rows as the call's positions, so each kv head's keys are read once; a prefill
    chunk's loop 0 (`loop0`) is one ordinary call. Local branch: one call per extra loop over its
    ring (local_window_size = window + 1 keys including the current one).

    rotary: (cos_cache, sin_cache) when q and k are NOT rotated: every call rotates them at the
    token's position itself (do_rotary; the ring calls get it as position_ids); () when they are."""

    heads: int
    kv_heads: int
    head_dim: int
    window: int
    scale: float
    rotary: tuple[str, ...] = ()
    dtype: type = np.float32  # of the attention bias

    def call(self, g: Graph, query, key, value, past_k, past_v, n_heads, lens, window_size=-1,
             caches=(), bias=None) -> list[str]:
        """One GroupQueryAttention node: output, present key, present value. caches: cos, sin
        and position ids (rotary), bias: an attention bias added to the scores."""
        total32, seqlens = lens
        extra = dict(do_rotary=1, rotary_interleaved=0) if caches else {}
        optional = [*caches, *[""] * (3 - len(caches)), bias] if bias else caches
        return g.op("GroupQueryAttention", query, key, value, past_k, past_v, seqlens, total32, *optional, n_out=3,
                    domain="com.microsoft", num_heads=n_heads, kv_num_heads=self.kv_heads, scale=self.scale,
                    local_window_size=window_size, **extra)

    def loop0(self, g: Graph, q: str, k: str | None, v: str | None, past_k: str, past_v: str,
              pos0: str) -> list[str]:
        """One row, loop 0 alone, a prefill chunk of S tokens: output [1, B, S, H*Dh], present key,
        present value. q may come packed, [1, B, S, (H + 2 Hkv)*Dh], with k and v None."""
        lens = g.shared("gqa.chunk.lengths",  # the cache holds pos0 + S keys after the call (every layer)
                        lambda: _lengths(g, _batch(g, q), g.op("Add", pos0, g.op("Gather", g.op("Shape", q),
                                                                                  g.const(2)))))
        key, value = ("", "") if k is None else (_take(g, k, 0), _take(g, v, 0))
        y, present_k, present_v = self.call(g, _take(g, q, 0), key, value, past_k, past_v, self.heads, lens,
                                            caches=self.rotary)
        return [g.op("Unsqueeze", y, g.const([0])), present_k, present_v]

    def all_loops(self, g: Graph, inputs: list[str], rows: int) -> list[str]:
        """The `rows` loops of a decode step (S = 1), LoopAttention's inputs and outputs with
        gate [R-1, B, H, 1]: the global call (`step_call`), then the rows of loops >= 1 over their
        rings and their gated mix as one pltkit.RingMix node (`ring_mix`)."""
        q, k, v, past_k, past_v, ring_k, ring_v, gate, pos0 = inputs
        y, present_k, present_v = self.step_call(g, q, k, v, past_k, past_v, pos0, rows)
        batch = _batch(g, q)
        total = g.shared("gqa.ring.total", lambda: g.op("Add", g.op("Gather", g.op("Shape", ring_k), g.const(3)),
                                                        g.const(1)))
        total32, seqlens = g.shared("gqa.ring.lengths", lambda: _lengths(g, batch, total))
        rotary = self.rotary and (*self.rotary, _positions(g, batch, pos0, 1))
        if RING_MIX not in g.functions:
            g.functions[RING_MIX] = self.ring_mix_function(g.opset, rows)
        out, rings_k, rings_v = g.op(RING_MIX, q, k, v, y, ring_k, ring_v, gate, seqlens, total32, *rotary, n_out=3,
                                     domain=KERNEL_DOMAIN, num_heads=self.heads, kv_num_heads=self.kv_heads,
                                     window=self.window, scale=self.scale)
        return [out, present_k, present_v, rings_k, rings_v]

    def ring_mix(self, g: Graph, q, k, v, y_step, ring_k, ring_v, gate, seqlens, total32, rows: int,
                 positions=None) -> list[str]:
        """pltkit.RingMix in standard and GroupQueryAttention nodes (the function body; pltkit's
        kernel computes the same in one call): row 0 is the global call's output; each row r >= 1
        attends over its ring and its own key (one GroupQueryAttention call, local_window_size
        window + 1, seqlens and total32 its lengths), and is mixed: g * global + (1 - g) * local.
        Returns the output [R, B, 1, H*Dh] (o_proj's input) and the rings' new keys and values."""
        zero = g.const([0])
        keep = g.const([-self.window] if self.window else [TO_END])  # (a start of -0 would keep them all)
        y_rows = self.step_rows(g, y_step, rows)  # [R, B, H, Dh]
        locals_, rings_k, rings_v = [], [], []
        for r in range(1, rows):
            y, loc_k, loc_v = self.call(g, _take(g, q, r), _take(g, k, r), _take(g, v, r), _take(g, ring_k, r - 1),
                                        _take(g, ring_v, r - 1), self.heads, (total32, seqlens),
                                        window_size=self.window + 1,
                                        caches=self.rotary and (*self.rotary, positions))
            locals_.append(g.op("Reshape", y, g.const([1, -1, self.heads, self.head_dim])))
            for ring, x in ((rings_k, loc_k), (rings_v, loc_v)):  # the newest `window` of the call's keys
                ring.append(g.op("Unsqueeze", g.op("Slice", x, keep, g.const([TO_END]), g.const([2])), zero))
        y_local = _rows_of(g, locals_)
        # rows >= 1: g * global + (1 - g) * local = local + g * (global - local)
        y_g = g.op("Slice", y_rows, g.const([1]), g.const([TO_END]), zero)
        mixed = g.op("Add", y_local, g.op("Mul", gate, g.op("Sub", y_g, y_local)))
        out = g.op("Concat", g.op("Slice", y_rows, zero, g.const([1]), zero), mixed, axis=0)
        return [g.op("Reshape", out, g.const([0, 0, 1, -1])), _rows_of(g, rings_k), _rows_of(g, rings_v)]

    def ring_mix_function(self, opset: int, rows: int) -> onnx.FunctionProto:
        """The model-local function pltkit.RingMix. This model's rows, heads, window and scale are
        constants of the body (the node's attributes tell a kernel the same); the rotary inputs
        (cos_cache, sin_cache, position_ids) are there where GroupQueryAttention rotates q and k."""
        body = Graph(opset)
        inputs = RING_MIX_INPUTS if self.rotary else RING_MIX_INPUTS[:-3]
        local = replace(self, rotary=tuple(inputs[-3:-1]) if self.rotary else ())
        outs = local.ring_mix(body, *inputs[:9], rows, positions=inputs[-1] if self.rotary else None)
        nodes = body.nodes + [helper.make_node("Identity", [o], [name], name=f"/out/{name}")
                              for o, name in zip(outs, RING_MIX_OUTPUTS)]
        return helper.make_function(KERNEL_DOMAIN, RING_MIX, inputs, RING_MIX_OUTPUTS, nodes,
                                    [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                                    attributes=["num_heads", "kv_num_heads", "window", "scale"])

    def step(self, g: Graph, q, k, v, past_k, past_v, pos0, rows: int) -> list[str]:
        """The global call of a decode step for `rows` rows: output [R, B, H, Dh], present key,
        present value (step_call, step_rows)."""
        y, present_k, present_v = self.step_call(g, q, k, v, past_k, past_v, pos0, rows)
        return [self.step_rows(g, y, rows), present_k, present_v]

    def step_call(self, g: Graph, q, k, v, past_k, past_v, pos0, rows: int) -> list[str]:
        """The global call of a decode step (S = 1) for `rows` rows: output [B, n, Hkv*Dh] (n below),
        present key, present value. q [R, B, 1, H*Dh], k and v [R, B, 1, Hkv*Dh].

        The call has Hkv heads, and a kv group's query heads of all rows are its n = R * H / Hkv
        positions, row-major (position r * H / Hkv + j is row r's head j of the group): ONNX Runtime's
        CPU kernel reads a head's keys once per call (per query head, had they come as heads). The n
        positions all get loop 0's key and value, so the call writes n - 1 copies after position pos0:
        the buffer keeps n - 1 spare positions, the next step overwrites them, and an attention bias
        hides them from every row. The kernel takes n > 1 positions after a past for batch 1 only (the
        runtime runs a batch on the kvbuffer graph)."""
        heads, hkv, dh = self.heads, self.kv_heads, self.head_dim
        rep, n = heads // hkv, step_positions(rows, heads, hkv)
        g.meta["cache_writes"] = n
        qg = g.op("Transpose", g.op("Reshape", q, g.const([rows, 0, hkv, rep, dh])), perm=[1, 0, 3, 2, 4])
        qg = g.op("Reshape", qg, g.const([0, n, hkv * dh]))  # [B, n, Hkv*Dh]: position (row, head in group)
        key, value = _take(g, k, 0), _take(g, v, 0)
        bias = None
        if n > 1:
            spread = g.const([1, n, 1])
            key, value = g.op("Expand", key, spread), g.op("Expand", value, spread)
            bias = g.shared("gqa.step.bias", lambda: _hide_copies(g, pos0, n, self.dtype))
        batch = _batch(g, q)
        lens = g.shared("gqa.step.lengths", lambda: _lengths(g, batch, g.op("Add", pos0, g.const(n))))
        caches = self.rotary and (*self.rotary, _positions(g, batch, pos0, n))
        return self.call(g, qg, key, value, past_k, past_v, hkv, lens, caches=caches, bias=bias)

    def step_rows(self, g: Graph, y: str, rows: int) -> str:
        """The global call's output [B, n, Hkv*Dh] as rows of heads, [R, B, H, Dh]."""
        rep, hkv, dh = self.heads // self.kv_heads, self.kv_heads, self.head_dim
        y = g.op("Transpose", g.op("Reshape", y, g.const([0, rows, rep, hkv, dh])), perm=[1, 0, 3, 2, 4])
        return g.op("Reshape", y, g.const([0, 0, self.heads, dh]))

def step_positions(rows: int, heads: int, kv_heads: int) -> int:
    """The positions of a decode step's global call (GQA.step): its rows' query heads of one kv group."""
    return rows * heads // kv_heads


def _take(g: Graph, x: str, r: int) -> str:
    """Row r: [R, ...] -> [...]"""
    return g.op("Gather", x, g.const(r), axis=0)


def _rows_of(g: Graph, xs) -> str:
    """[1, ...] pieces -> [len(xs), ...]"""
    return xs[0] if len(xs) == 1 else g.op("Concat", *xs, axis=0)


def _batch(g: Graph, q: str) -> str:
    """B, [1], from q [R, B, ...]"""
    return g.shared("gqa.batch", lambda: g.op("Slice", g.op("Shape", q), g.const([1]), g.const([2])))


def _lengths(g: Graph, batch: str, total: str) -> tuple[str, str]:
    """GQA's total_sequence_length and seqlens_k."""
    total32 = g.op("Cast", total, to=6)
    return total32, g.op("Expand", g.op("Sub", total32, g.const(1, np.int32)), batch)


def _positions(g: Graph, batch: str, pos0: str, n: int) -> str:
    """The token's position for each of a call's n positions, [B, n] (a ring call's keys are
    relative; a step's n positions are one token)."""
    return g.shared(("gqa.position_ids", n), lambda: g.op("Expand", g.op("Reshape", pos0, g.const([1, 1])),
                                                          g.op("Concat", batch, g.const([n]), axis=0)))


def _hide_copies(g: Graph, pos0: str, n: int, dtype) -> str:
    """The attention bias of a step's call, [1, 1, n, pos0 + n]: 0 over the pos0 + 1 real keys,
    -inf over the n - 1 copies of loop 0's key."""
    real = g.op("Concat", g.const([n]), g.op("Add", g.op("Reshape", pos0, g.const([1])), g.const([1])), axis=0)
    zeros = g.op("Expand", g.const(np.zeros((1, 1)), dtype), real)
    bias = g.op("Concat", zeros, g.const(np.full((n, n - 1), -np.inf), dtype), axis=1)
    return g.op("Reshape", bias, g.const([1, 1, n, -1]))
