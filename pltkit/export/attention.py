"""The attention of one decoder layer in each call of the graphs, by variant.

A variant names which loops a call's rows are:

  loop0      one row, loop 0: a prefill chunk's first loop, or a one-loop model's decode step
  later      one row, loop >= 1 of a prefill chunk, over its ring, after loop 0 wrote the chunk's keys
  all_loops  a decode step of L > 1 loops: L rows, row 0 loop 0, a ring for each of the others

Each graph set (pltkit.export.artifact.GRAPHS) runs a variant with one function of ATTENTION:
LoopAttention nodes throughout ("function", "kvbuffer": the node's kv_buffer attribute tells
them apart), or GroupQueryAttention where a call starts at loop 0 ("gqa").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pltkit.export.gqa import GQA
from pltkit.export.graph import FLOAT
from pltkit.export.loop_attention import loop_attention

LOOP0, LATER, ALL_LOOPS = "loop0", "later", "all_loops"


@dataclass(frozen=True)
class Rows:
    """What one call gives a layer's attention besides the layer's input."""

    variant: str  # LOOP0, LATER or ALL_LOOPS
    rope: tuple[str, str]  # cos, sin at the tokens' positions
    pos0: str  # the position of the first new token
    kv: tuple[str, str]  # the global cache's key and value
    ring: tuple[str, str] | None = None  # ring key and value of the rows of loops >= 1 (LATER, ALL_LOOPS)
    loop: int = 0  # LATER: the row's loop
    step: bool = False  # a decode step: one token


# -- LoopAttention: the op's node, q/k/v as heads [R, B, H, S, Dh] ------------------------------
def _rotated_heads(b, i: int, h: str, rope: tuple[str, str]) -> tuple[str, str, str]:
    c = b.cfg
    q, k, v = (b.heads(t, n) for t, n in zip(b.qkv(i, h), (c.num_attention_heads, c.num_key_value_heads,
                                                          c.num_key_value_heads)))
    return b.rope(q, *rope), b.rope(k, *rope), v


def _loop_node(b, inputs: list[str], first_loop: int) -> tuple[str, list[str]]:
    """One LoopAttention node; its output back in the projections' layout [R, B, S, H*Dh]."""
    g, c = b.g, b.cfg
    out, *state = loop_attention(g, inputs, first_loop=first_loop, window=c.window_left,
                                 scale=1 / math.sqrt(c.head_dim), kv_buffer=b.kv_buffer)
    return g.op("Reshape", g.op("Transpose", out, perm=[0, 1, 3, 2, 4]), g.const([0, 0, 0, -1])), state


def loop_loop0(b, i: int, x_in: str, h: str, rows: Rows) -> tuple[str, list[str]]:
    """The op's ring and gate inputs are required though no row reads them: empty ring keys and
    values [0, B, Hkv, 0, Dh] and gate [0, B, H, S], cut from k and q."""
    g = b.g
    q, k, v = _rotated_heads(b, i, h, rows.rope)
    no_rows = g.op("Slice", k, g.const([0]), g.const([0]), g.const([0]))
    ring = (g.op("Slice", no_rows, g.const([0]), g.const([0]), g.const([3])),) * 2
    gate = g.op("ReduceSum", g.op("Slice", q, g.const([0]), g.const([0]), g.const([0])), g.const([-1]), keepdims=0)
    return _loop_node(b, [q, k, v, *rows.kv, *ring, gate, rows.pos0], first_loop=0)


def loop_later(b, i: int, x_in: str, h: str, rows: Rows) -> tuple[str, list[str]]:
    q, k, v = _rotated_heads(b, i, h, rows.rope)
    gate = b.gate(i, x_in, q, 0)
    return _loop_node(b, [q, k, v, *rows.kv, *rows.ring, gate, rows.pos0], first_loop=rows.loop)


def loop_all_loops(b, i: int, x_in: str, h: str, rows: Rows) -> tuple[str, list[str]]:
    q, k, v = _rotated_heads(b, i, h, rows.rope)
    gate = b.gate(i, x_in, q, 1)
    return _loop_node(b, [q, k, v, *rows.kv, *rows.ring, gate, rows.pos0], first_loop=0)


# -- GroupQueryAttention: in the projections' layout [R, B, S, n*Dh] ----------------------------
def _gqa(b, rotary: bool) -> GQA:
    """RoPE inside the kernel where head_dim allows (rotary)."""
    c = b.cfg
    return GQA(heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
               window=c.window_left, scale=1 / math.sqrt(c.head_dim),
               rotary=(b.rope_half("cos"), b.rope_half("sin")) if rotary else (), dtype=b.np_ft)


def _qkv_tokens(b, i: int, h: str, rope: tuple[str, str], rotary: bool) -> list[str]:
    """q, k, v, rotated here unless GQA rotates them (rotary)."""
    c = b.cfg
    q, k, v = b.qkv(i, h)
    if not rotary:
        q, k = b.rope_tokens(q, c.num_attention_heads, rope), b.rope_tokens(k, c.num_key_value_heads, rope)
    return [q, k, v]


def gqa_loop0(b, i: int, x_in: str, h: str, rows: Rows) -> tuple[str, list[str]]:
    """A decode step runs GQA.step; a prefill chunk takes the packed q/k/v as they come where GQA
    rotates q and k itself."""
    rotary = b.rotary_in_gqa()
    if rows.step:
        q, k, v = _qkv_tokens(b, i, h, rows.rope, rotary)
        y, *state = _gqa(b, rotary).step(b.g, q, k, v, *rows.kv, rows.pos0, 1)
        return y, [*state, None, None]
    if rotary and b.packs():
        q, k, v = b.linear(h, b.store.pack(b.qkv_prefixes(i)), b.cfg.attention_bias), None, None
    else:
        q, k, v = _qkv_tokens(b, i, h, rows.rope, rotary)
    out, *state = _gqa(b, rotary).loop0(b.g, q, k, v, *rows.kv, rows.pos0)
    return out, [*state, None, None]  # no rings


def gqa_all_loops(b, i: int, x_in: str, h: str, rows: Rows) -> tuple[str, list[str]]:
    """The query-mode gate reads the rotated query heads: rotated here when GQA rotates its own."""
    rotary = b.rotary_in_gqa()
    q, k, v = _qkv_tokens(b, i, h, rows.rope, rotary)
    q_gate = None
    if not b.cfg.plt_gate_use_hidden_states:
        q_gate = b.heads(q, b.cfg.num_attention_heads)
        q_gate = b.rope(q_gate, *rows.rope) if rotary else q_gate
    if b.cfg.plt_gate_use_hidden_states and b.ft == FLOAT:  # RingMix computes the gate itself
        p = f"model.layers.{i}.self_attn.plt_gate"
        hidden_gate = (x_in, b.w(p + ".gate_norm.weight"), b.w(p + ".weight", transpose=True), b.w(p + ".bias"))
        out, *state = _gqa(b, rotary).all_loops(b.g, [q, k, v, *rows.kv, *rows.ring, None, rows.pos0],
                                                b.cfg.plt_num_loops, hidden_gate, b.cfg.rms_norm_eps)
        return out, state
    gate = b.gate(i, x_in, q_gate, 1)
    out, *state = _gqa(b, rotary).all_loops(b.g, [q, k, v, *rows.kv, *rows.ring, gate, rows.pos0],
                                            b.cfg.plt_num_loops)
    return out, state


_LOOP = {LOOP0: loop_loop0, LATER: loop_later, ALL_LOOPS: loop_all_loops}
# graph set -> variant -> f(builder, layer, layer input, normed input, rows) -> (output [R, B, S, H*Dh],
# [present key, present value, present ring key, present ring value])
ATTENTION = {"function": _LOOP, "kvbuffer": _LOOP,
             # prefill's later loops read the cache loop 0 wrote: LoopAttention over the kv buffer
             "gqa": {LOOP0: gqa_loop0, LATER: loop_later, ALL_LOOPS: gqa_all_loops}}
