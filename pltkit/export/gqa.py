"""LoopAttention's fast path on ONNX Runtime's GroupQueryAttention kernels, for the calls that start at loop 0
(decode, and prefill's loop 0), and pltkit's two ops of a decode step on that path, written as model-local
functions whose bodies are GroupQueryAttention calls and standard nodes (pltkit's CPU kernels replace them
where they run, pltkit/runtime/kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper

from pltkit.export.graph import TO_END, Graph

# pltkit's ops of a decode step on the GQA graphs, model-local functions which pltkit's CPU kernels replace
# where they run: StepAttention (GQA.step), the global attention of all rows over the cache buffer, in place;
# RingMix (GQA.all_loops), the rows of loops >= 1 over their rings, mixed with the global attention's output
KERNEL_DOMAIN, STEP, RING_MIX = "pltkit", "StepAttention", "RingMix"
STEP_INPUTS = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
               "attention_bias", "cos_cache", "sin_cache", "position_ids"]
STEP_OUTPUTS = ["output", "present_key", "present_value"]
RING_MIX_INPUTS = ["query", "key", "value", "global", "ring_key", "ring_value", "gate", "seqlens_k",
                   "total_sequence_length", "cos_cache", "sin_cache", "position_ids"]
# in place of `gate`: the layer input and the gate's norm weight [D], weight [D, H] and bias [H] (hidden-state gate)
RING_MIX_GATE = ["hidden", "gate_norm", "gate_weight", "gate_bias"]
RING_MIX_OUTPUTS = ["output", "present_ring_key", "present_ring_value"]
# pltkit's ops with function bodies -> (their spec, their version). RingMix 2: the global output in the rows'
# layout and the hidden-state gate's inputs (its kernel reads version 1 nodes too)
OWN_OPS = {STEP: ("pltkit/runtime/kernels/step_attention.c", 1), RING_MIX: ("pltkit/runtime/kernels/ring_mix.c", 2)}


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

    def all_loops(self, g: Graph, inputs: list[str], rows: int, hidden_gate: tuple = (), eps: float = 0.0
                  ) -> list[str]:
        """The `rows` loops of a decode step (S = 1), LoopAttention's inputs and outputs with
        gate [R-1, B, H, 1]: the global attention (`step`), then the rows of loops >= 1 over their
        rings and their gated mix as one pltkit.RingMix node (`ring_mix`). hidden_gate: in place of the
        gate (None), the inputs that RingMix computes a hidden-state gate from (RING_MIX_GATE; eps: its
        norm's)."""
        q, k, v, past_k, past_v, ring_k, ring_v, gate, pos0 = inputs
        y, present_k, present_v = self.step(g, q, k, v, past_k, past_v, pos0, rows)
        batch = _batch(g, q)
        total = g.shared("gqa.ring.total", lambda: g.op("Add", g.op("Gather", g.op("Shape", ring_k), g.const(3)),
                                                        g.const(1)))
        total32, seqlens = g.shared("gqa.ring.lengths", lambda: _lengths(g, batch, total))
        rotary = self.rotary and (*self.rotary, _positions(g, batch, pos0, 1))
        if RING_MIX not in g.functions:
            g.functions[RING_MIX] = self.ring_mix_function(g.opset, rows, eps if hidden_gate else None)
        extra = [*(rotary or ("", "", "")), *hidden_gate] if hidden_gate else rotary
        out, rings_k, rings_v = g.op(RING_MIX, q, k, v, y, ring_k, ring_v, gate or "", seqlens, total32, *extra,
                                     n_out=3, domain=KERNEL_DOMAIN, num_heads=self.heads, kv_num_heads=self.kv_heads,
                                     window=self.window, scale=self.scale, epsilon=eps)
        return [out, present_k, present_v, rings_k, rings_v]

    def hidden_gate(self, g: Graph, hidden, norm, weight, bias, eps: float) -> str:
        """The gate of the rows of loops >= 1 [R-1, B, H, 1] from the layer input [R, B, 1, D]:
        sigmoid(W RMSNorm(x) + b), as the exporter's own nodes compute it."""
        x = g.op("Slice", hidden, g.const([1]), g.const([TO_END]), g.const([0]))
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
        h = g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", ms, g.const(eps, np.float32)))), norm)
        return g.op("Sigmoid", g.op("Transpose", g.op("Add", g.op("MatMul", h, weight), bias), perm=[0, 1, 3, 2]))

    def ring_mix(self, g: Graph, q, k, v, y_step, ring_k, ring_v, gate, seqlens, total32, rows: int,
                 positions=None) -> list[str]:
        """pltkit.RingMix in standard and GroupQueryAttention nodes (the function body; pltkit's
        kernel computes the same in one call): row 0 is the global attention's output y_step [R, B, 1,
        H*Dh]; each row r >= 1
        attends over its ring and its own key (one GroupQueryAttention call, local_window_size
        window + 1, seqlens and total32 its lengths), and is mixed: g * global + (1 - g) * local.
        Returns the output [R, B, 1, H*Dh] (o_proj's input) and the rings' new keys and values."""
        zero = g.const([0])
        keep = g.const([-self.window] if self.window else [TO_END])  # (a start of -0 would keep them all)
        y_rows = g.op("Reshape", y_step, g.const([0, 0, self.heads, self.head_dim]))  # [R, B, H, Dh]
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

    def ring_mix_function(self, opset: int, rows: int, gate_eps: float | None = None) -> onnx.FunctionProto:
        """The model-local function pltkit.RingMix. This model's rows, heads, window and scale are
        constants of the body (the node's attributes tell a kernel the same); the rotary inputs
        (cos_cache, sin_cache, position_ids) are there where GroupQueryAttention rotates q and k, and
        the hidden-state gate's (RING_MIX_GATE, computed with norm epsilon gate_eps) where it is given."""
        body = Graph(opset)
        gated = gate_eps is not None
        inputs = RING_MIX_INPUTS + RING_MIX_GATE if gated else RING_MIX_INPUTS if self.rotary else RING_MIX_INPUTS[:-3]
        local = replace(self, rotary=tuple(RING_MIX_INPUTS[-3:-1]) if self.rotary else ())
        args = list(inputs[:9])
        if gated:
            args[6] = self.hidden_gate(body, *RING_MIX_GATE, gate_eps)
        outs = local.ring_mix(body, *args, rows, positions=RING_MIX_INPUTS[-1] if self.rotary else None)
        nodes = body.nodes + [helper.make_node("Identity", [o], [name], name=f"/out/{name}")
                              for o, name in zip(outs, RING_MIX_OUTPUTS)]
        return helper.make_function(KERNEL_DOMAIN, RING_MIX, inputs, RING_MIX_OUTPUTS, nodes,
                                    [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                                    attributes=["num_heads", "kv_num_heads", "window", "scale", "epsilon"])

    def step(self, g: Graph, q, k, v, past_k, past_v, pos0, rows: int) -> list[str]:
        """The global attention of a decode step (S = 1) for `rows` rows, in place, as one
        pltkit.StepAttention node: output [R, B, 1, H*Dh], present key, present value. q [R, B, 1,
        H*Dh], k and v [R, B, 1, Hkv*Dh]; row 0's key and value are loop 0's, written at pos0. Its
        inputs are those of the body's GroupQueryAttention call (step_call), which every layer shares."""
        n = step_positions(rows, self.heads, self.kv_heads)
        g.meta["cache_writes"] = n  # the body's (the kernel writes one)
        batch = _batch(g, q)
        total32, seqlens = g.shared("gqa.step.lengths", lambda: _lengths(g, batch, g.op("Add", pos0, g.const(n))))
        bias = g.shared("gqa.step.bias", lambda: _hide_copies(g, pos0, n, self.dtype)) if n > 1 else ""
        rotary = self.rotary and (*self.rotary, _positions(g, batch, pos0, n))
        body = g.functions[STEP] = g.functions.get(STEP) or self.step_function(g.opset, rows)
        assert len(body.input) == 8 + len(rotary), "one StepAttention function a graph: one `rows`, one `rotary`"
        inputs = [q, k, v, past_k, past_v, seqlens, total32, bias, *rotary]
        return g.op(STEP, *inputs[:len(inputs) if rotary or bias else 7], n_out=3, domain=KERNEL_DOMAIN,
                    num_heads=self.heads, kv_num_heads=self.kv_heads, scale=self.scale)

    def step_function(self, opset: int, rows: int) -> onnx.FunctionProto:
        """The model-local function pltkit.StepAttention: `step_call` over its inputs (the rotary ones
        where GroupQueryAttention rotates q and k)."""
        body = Graph(opset)
        inputs = STEP_INPUTS if self.rotary else STEP_INPUTS[:8]
        local = replace(self, rotary=tuple(inputs[-3:-1]) if self.rotary else ())
        bias = "attention_bias" if step_positions(rows, self.heads, self.kv_heads) > 1 else None
        outs = local.step_call(body, *inputs[:5], (inputs[6], inputs[5]), bias, inputs[-1] if self.rotary else None,
                               rows)
        nodes = body.nodes + [helper.make_node("Identity", [o], [name], name=f"/out/{name}")
                              for o, name in zip(outs, STEP_OUTPUTS)]
        return helper.make_function(KERNEL_DOMAIN, STEP, inputs, STEP_OUTPUTS, nodes,
                                    [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                                    attributes=["num_heads", "kv_num_heads", "scale"])

    def step_call(self, g: Graph, q, k, v, past_k, past_v, lens, bias, positions, rows: int) -> list[str]:
        """pltkit.StepAttention as one GroupQueryAttention call and its layout (the function body):
        output [R, B, 1, H*Dh], present key, present value. lens: total_sequence_length and seqlens_k,
        bias: the attention bias that hides the copies (below), positions: position_ids where rotary.

        The call has Hkv heads, and a kv group's query heads of all rows are its n = R * H / Hkv
        positions, row-major (position r * H / Hkv + j is row r's head j of the group): ONNX Runtime's
        CPU kernel reads a head's keys once per call (per query head, had they come as heads). The n
        positions all get loop 0's key and value, so the call writes n - 1 copies after position pos0:
        the buffer keeps n - 1 spare positions, the next step overwrites them, and an attention bias
        hides them from every row. The kernel takes n > 1 positions after a past for batch 1 only (the
        runtime runs a batch on the kvbuffer graph)."""
        heads, hkv, dh = self.heads, self.kv_heads, self.head_dim
        rep, n = heads // hkv, step_positions(rows, heads, hkv)
        qg = g.op("Transpose", g.op("Reshape", q, g.const([rows, 0, hkv, rep, dh])), perm=[1, 0, 3, 2, 4])
        qg = g.op("Reshape", qg, g.const([0, n, hkv * dh]))  # [B, n, Hkv*Dh]: position (row, head in group)
        key, value = _take(g, k, 0), _take(g, v, 0)
        if n > 1:
            spread = g.const([1, n, 1])
            key, value = g.op("Expand", key, spread), g.op("Expand", value, spread)
        caches = self.rotary and (*self.rotary, positions)
        y, present_k, present_v = self.call(g, qg, key, value, past_k, past_v, hkv, lens, caches=caches, bias=bias)
        # [B, n, Hkv*Dh] -> rows of heads, [R, B, 1, H*Dh]
        y = g.op("Transpose", g.op("Reshape", y, g.const([0, rows, rep, hkv, dh])), perm=[1, 0, 3, 2, 4])
        return [g.op("Reshape", y, g.const([0, 0, 1, heads * dh])), present_k, present_v]


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
