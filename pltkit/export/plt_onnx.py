"""The two ONNX graphs of a PLT model, written node by node from the checkpoint.

prefill: a chunk of S >= 1 tokens after P cached ones, loops one after another over the
         chunk, the CLP shift seeded from the saved carries.
decode:  one token per sequence, the L loops as L rows of one pass.

Hidden states travel as [R, B, S, D]: R rows (loops) of B sequences of S tokens. Each
layer's attention is one plt.ops::LoopAttention node, or in the "gqa" graphs ONNX Runtime's
GroupQueryAttention (decode, and prefill's loop 0): see pltkit.export.attention. All graphs
read the same initializers, stored once as external data (see pltkit.export.artifact).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from pltkit.export.attention import ALL_LOOPS, ATTENTION, LATER, LOOP0, Rows
from pltkit.export.builder import Builder
from pltkit.export.graph import TO_END, Graph
from pltkit.model.config import PLTConfig
from pltkit.model.plt import rope_cos_sin


def layer(b: Builder, i: int, x: str, rows: Rows) -> tuple[str, list[str]]:
    """One decoder layer; returns its output and the attention's state outputs (present key,
    value, ring key, ring value)."""
    g, c = b.g, b.cfg
    p = f"model.layers.{i}"
    with g.scope(f"layers.{i}"):
        h = b.rmsnorm(x, p + ".input_layernorm.weight")
        y, state = ATTENTION[b.attention][rows.variant](b, i, x, h, rows)
        x = g.op("Add", x, b.linear(y, p + ".self_attn.o_proj", c.attention_bias))
        x = g.op("Add", x, b.mlp(i, b.rmsnorm(x, p + ".post_attention_layernorm.weight")))
    return x, state


def _next_loop_input(b: Builder, x: str, emb: str, carry: str, loop: int) -> tuple[str, str]:
    """Prefill: loop `loop`'s input from the previous loop's output x [1, B, S, D], shifted one
    token on (CLP) behind the saved carry; and the carry to save (x's last token)."""
    g = b.g
    prev = b.loop_output(x)
    last = g.op("Squeeze", g.op("Slice", prev, g.const([-1]), g.const([TO_END]), g.const([2])), g.const([2]))
    seed = g.op("Unsqueeze", g.op("Slice", carry, g.const([loop - 1]), g.const([loop]), g.const([0])),
                g.const([2]))
    if b.cfg.plt_clp_shift:
        prev = g.op("Concat", seed, g.op("Slice", prev, g.const([0]), g.const([-1]), g.const([2])), axis=2)
    return b.scaled_sum(emb, prev), last


# attention: "function" (LoopAttention nodes, portable), "gqa" (ONNX Runtime GQA kernels: decode,
# prefill's loop 0) or "kvbuffer" (LoopAttention over in-place cache buffers, kv_buffer = 1: TensorRT)
def prefill_graph(cfg: PLTConfig, store, opset: int, attention: str = "function", quant=None,
                  dtype: str = "float32") -> Graph:
    b = Builder(cfg, store, opset, attention, quant, dtype)
    g, n = b.g, cfg.num_hidden_layers
    ids, past, pos0 = b.inputs(["batch", "seq"])
    s = g.op("Squeeze", g.op("Slice", g.op("Shape", ids), g.const([1]), g.const([2])), g.const([0]))
    rope = b.rope_tables(g.op("Add", g.op("Range", g.const(0), s, g.const(1)), pos0))
    emb = g.op("Unsqueeze", b.embed(ids), g.const([0]))  # [1, B, S, D]
    present, x, rings, carries = {}, emb, {}, []
    with g.scope("loop.0"):  # writes the global cache
        for i in range(n):
            x, (k, v, _, _) = layer(b, i, x, Rows(LOOP0, rope, pos0, (past[f"key.{i}"], past[f"value.{i}"])))
            present[f"key.{i}"], present[f"value.{i}"] = k, v
    for loop in range(1, cfg.plt_num_loops):  # each over the cache loop 0 wrote, and its own ring
        with g.scope(f"loop.{loop}"):
            x, carry = _next_loop_input(b, x, emb, past["carry"], loop)
            carries.append(carry)
            for i in range(n):
                kv = (present[f"key.{i}"], present[f"value.{i}"])
                ring = tuple(g.op("Slice", past[f"ring_{t}.{i}"], g.const([loop - 1]), g.const([loop]), g.const([0]))
                             for t in ("key", "value"))
                x, (_, _, rk, rv) = layer(b, i, x, Rows(LATER, rope, pos0, kv, ring, loop))
                rings.setdefault(i, []).append((rk, rv))
    for i, parts in rings.items():
        present[f"ring_key.{i}"] = g.op("Concat", *[k for k, _ in parts], axis=0)
        present[f"ring_value.{i}"] = g.op("Concat", *[v for _, v in parts], axis=0)
    if carries:
        present["carry"] = g.op("Concat", *carries, axis=0)
    if attention == "gqa":  # the CPU fast path: the head only from position `logits_from` on (completion: the last)
        start = g.op("Unsqueeze", g.input("logits_from", TensorProto.INT64, []), g.const([0]))
        x = g.op("Slice", x, start, g.const([TO_END]), g.const([2]))
    logits = b.logits(g.op("Squeeze", x, g.const([0])))
    b.outputs(present, logits, ["batch", "logits_seq" if attention == "gqa" else "seq", cfg.vocab_size])
    return g


def decode_graph(cfg: PLTConfig, store, opset: int, attention: str = "function", quant=None,
                 dtype: str = "float32") -> Graph:
    b = Builder(cfg, store, opset, attention, quant, dtype)
    g, L, n = b.g, cfg.plt_num_loops, cfg.num_hidden_layers
    ids, past, pos0 = b.inputs(["batch"])
    rope = b.rope_tables(g.op("Unsqueeze", pos0, g.const([0])))
    emb = b.embed(g.op("Unsqueeze", ids, g.const([1])))  # [B, 1, D]
    emb = g.op("Unsqueeze", emb, g.const([0]))  # [1, B, 1, D]
    x = emb
    if L > 1:  # rows: loop 0 sees E, loop r sees a*E + b*carry[r-1]
        x = g.op("Concat", emb, b.scaled_sum(emb, g.op("Unsqueeze", past["carry"], g.const([2]))), axis=0)
    present = {}
    for i in range(n):
        kv = (past[f"key.{i}"], past[f"value.{i}"])
        rows = Rows(ALL_LOOPS, rope, pos0, kv, (past[f"ring_key.{i}"], past[f"ring_value.{i}"])) if L > 1 else \
            Rows(LOOP0, rope, pos0, kv, step=True)
        x, (present[f"key.{i}"], present[f"value.{i}"], rk, rv) = layer(b, i, x, rows)
        if L > 1:
            present[f"ring_key.{i}"], present[f"ring_value.{i}"] = rk, rv
    x = g.op("Squeeze", x, g.const([2]))  # [L, B, D]
    if L > 1:
        present["carry"] = b.loop_output(g.op("Slice", x, g.const([0]), g.const([L - 1]), g.const([0])))
    logits = b.logits(g.op("Squeeze", g.op("Slice", x, g.const([L - 1]), g.const([L]), g.const([0])), g.const([0])))
    b.outputs(present, logits, ["batch", cfg.vocab_size])
    return g


def rope_tables(cfg: PLTConfig) -> dict[str, np.ndarray]:
    cos, sin = rope_cos_sin(cfg, torch.arange(cfg.max_position_embeddings), torch.float32)
    return {"rope.cos": cos.numpy(), "rope.sin": sin.numpy()}
