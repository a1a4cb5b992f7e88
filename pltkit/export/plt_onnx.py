"""The two ONNX graphs of a PLT model, written node by node from the checkpoint.

prefill: a chunk of S >= 1 tokens after P cached ones, loops one after another over the
         chunk, the CLP shift seeded from the saved carries.
decode:  one token per sequence, the L loops as L rows of one pass.

Hidden states travel as [R, B, S, D]: R rows (loops) of B sequences of S tokens. Each
layer's attention is one plt.ops::LoopAttention node, or in the "gqa" graphs ONNX Runtime's
GroupQueryAttention (decode, and prefill's loop 0). All graphs read the same initializers,
stored once as external data (see pltkit.export.artifact).
"""

from __future__ import annotations

import math
import numpy as np
import torch

from pltkit.export.graph import FLOAT, INT64, Graph
from pltkit.model.formats import float_type
from pltkit.export.loop_attention import loop_attention, loop_attention_gqa
from pltkit.model.config import PLTConfig
from pltkit.model.plt import rope_cos_sin


def state_names(cfg: PLTConfig) -> list[str]:
    """The decode state carried between calls, in graph order: inputs `past_<name>`,
    outputs `present_<name>`."""
    n = cfg.num_hidden_layers
    names = [f"key.{i}" for i in range(n)] + [f"value.{i}" for i in range(n)]
    if cfg.plt_num_loops > 1:
        names += [f"ring_key.{i}" for i in range(n)] + [f"ring_value.{i}" for i in range(n)] + ["carry"]
    return names


def state_shapes(cfg: PLTConfig, present: bool = False, kv_buffer: bool = False) -> dict[str, list]:
    """Shapes of the state tensors; strings are dynamic sizes (past length, ring length). With
    kv_buffer the global cache is a buffer of `capacity` positions updated in place."""
    past, ring = ("present", "present_ring") if present else ("past", "ring")
    if kv_buffer:
        past = "capacity"
    kv = ["batch", cfg.num_key_value_heads, past, cfg.head_dim]
    rings = [cfg.plt_num_loops - 1, "batch", cfg.num_key_value_heads, ring, cfg.head_dim]
    carry = [cfg.plt_num_loops - 1, "batch", cfg.hidden_size]
    return {n: carry if n == "carry" else rings if n.startswith("ring") else kv for n in state_names(cfg)}


class _Builder:
    def __init__(self, cfg: PLTConfig, store, opset: int, attention: str, quant=None, dtype: str = "float32"):
        """quant: None (float weights) or a scheme whose linear(builder, x, weight) writes a quantized
        linear layer (see pltkit.quant.schemes). dtype: the float type of weights, activations and
        state (float32, float16, bfloat16); norms are computed in float32, logits are float32."""
        self.cfg, self.store, self.g, self.attention, self.quant = cfg, store, Graph(opset), attention, quant
        self.ft, self.np_ft = float_type(dtype).onnx, float_type(dtype).numpy
        # the GQA and the kvbuffer graphs update the global cache in place (a buffer of
        # `capacity` positions and a `past_len` input)
        self.kv_buffer = attention in ("gqa", "kvbuffer")
        self._used: set[str] = set()

    def w(self, name: str, transpose: bool = False) -> str:
        """An initializer of this graph in its float type (stored once in the artifact's weight file)."""
        return self.use_initializer(*self.store.get(name, transpose, self.np_ft))

    def fconst(self, value) -> str:
        return self.g.const(value, self.np_ft)

    def use_initializer(self, key: str, proto) -> str:
        if key not in self._used:
            self._used.add(key)
            self.g.initializers.append(proto)
        return key

    # -- pieces ----------------------------------------------------------------------
    def rmsnorm(self, x: str, weight_name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w, in the node pattern ONNX Runtime fuses into one
        SimplifiedLayerNormalization kernel (Pow, ReduceMean, Add, Sqrt, Div, Mul). A half-precision
        graph normalizes in float32 (x^2 overflows float16) and casts back before the weight."""
        g, half = self.g, self.ft != FLOAT
        x32 = g.op("Cast", x, to=FLOAT) if half else x
        ms = g.op("ReduceMean", g.op("Pow", x32, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
        rms = g.op("Sqrt", g.op("Add", ms, g.const(self.cfg.rms_norm_eps, np.float32)))
        y = g.op("Div", x32, rms)
        return g.op("Mul", g.op("Cast", y, to=self.ft) if half else y, self.w(weight_name))

    def linear(self, x: str, prefix: str, bias: bool, quantize: bool = True) -> str:
        if self.quant is not None and quantize:
            y = self.quant.linear(self, x, prefix + ".weight")
        else:
            y = self.g.op("MatMul", x, self.w(prefix + ".weight", transpose=True))
        return self.g.op("Add", y, self.w(prefix + ".bias")) if bias else y

    def heads(self, x: str, n: int) -> str:
        """[R, B, S, n*Dh] -> [R, B, n, S, Dh]"""
        x = self.g.op("Reshape", x, self.g.const([0, 0, 0, n, self.cfg.head_dim]))
        return self.g.op("Transpose", x, perm=[0, 1, 3, 2, 4])

    def rope(self, x: str, cos: str, sin: str) -> str:
        g, half = self.g, self.cfg.head_dim // 2
        x1, x2 = g.op("Split", x, g.const([half, half]), axis=-1, n_out=2)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def rows_from(self, x: str, start: int) -> str:
        return self.g.op("Slice", x, self.g.const([start]), self.g.const([2**62]), self.g.const([0]))

    def gate(self, i: int, x_in: str, q: str, start: int) -> str:
        """g [Rr, B, H, S] for the rows of loops >= 1 (rows `start`..)."""
        g, c, p = self.g, self.cfg, f"model.layers.{i}.self_attn.plt_gate"
        if c.plt_gate_use_hidden_states:
            h = self.rmsnorm(self.rows_from(x_in, start), p + ".gate_norm.weight")
            logits = g.op("Transpose", self.linear(h, p, bias=True, quantize=False), perm=[0, 1, 3, 2])
        else:
            w = g.op("Reshape", self.w(p + ".weight"), g.const([c.num_attention_heads, 1, c.head_dim]))
            dot = g.op("ReduceSum", g.op("Mul", self.rows_from(q, start), w), g.const([-1]), keepdims=0)
            logits = g.op("Add", dot, g.op("Unsqueeze", self.w(p + ".bias"), g.const([-1])))
        return g.op("Sigmoid", logits)

    def layer(self, i: int, x: str, first_loop: int, rope: tuple[str, str], pos0: str,
              kv: tuple[str, str], ring: tuple[str, str] | None) -> tuple[str, list[str]]:
        """One decoder layer; returns its output and the attention's state outputs (present key,
        value, ring key, ring value)."""
        g, c = self.g, self.cfg
        p = f"model.layers.{i}"
        with g.scope(f"layers.{i}"):
            h = self.rmsnorm(x, p + ".input_layernorm.weight")
            # GQA runs decode (all loops as rows) and prefill's loop 0; prefill's later loops read
            # the cache loop 0 wrote (LoopAttention over the in-place buffer)
            gqa = self.attention == "gqa" and first_loop == 0
            attention = self.attention_gqa if gqa else self.attention_loop
            y, state = attention(i, x, h, first_loop, rope, pos0, kv, ring)
            x = g.op("Add", x, self.linear(y, p + ".self_attn.o_proj", c.attention_bias))
            h = self.rmsnorm(x, p + ".post_attention_layernorm.weight")
            mlp = p + ".mlp"
            gp, up = self.linears(h, [mlp + ".gate_proj", mlp + ".up_proj"], c.mlp_bias)
            up = g.op("Mul", g.op("Mul", gp, g.op("Sigmoid", gp)), up)
            x = g.op("Add", x, self.linear(up, mlp + ".down_proj", c.mlp_bias))
        return x, state

    def packs(self) -> bool:
        """Whether projections of one input run as ONE packed layer (a scheme may refuse: `packable`)."""
        return getattr(self.quant, "packable", True)

    def linears(self, x: str, prefixes: list[str], bias: bool) -> list[str]:
        """Projections of one input, as one packed layer split after where packing applies: its
        weights are those of the layers stacked along the outputs."""
        if not self.packs():
            return [self.linear(x, p, bias) for p in prefixes]
        sizes = [self.store.shape(p + ".weight")[0] for p in prefixes]
        y = self.linear(x, self.store.pack(prefixes), bias)
        return self.g.op("Split", y, self.g.const(sizes), axis=-1, n_out=len(prefixes))

    def qkv_prefixes(self, i: int) -> list[str]:
        return [f"model.layers.{i}.self_attn.{n}_proj" for n in "qkv"]

    def qkv(self, i: int, h: str) -> list[str]:
        """[R, B, S, n*Dh] projections q, k, v."""
        return self.linears(h, self.qkv_prefixes(i), self.cfg.attention_bias)

    def attention_loop(self, i, x_in, h, first_loop, rope, pos0, kv, ring) -> tuple[str, list[str]]:
        """Attention as one LoopAttention node, on heads [R, B, H, S, Dh] (prefill and decode)."""
        g, c = self.g, self.cfg
        q, k, v = (self.heads(t, n) for t, n in zip(self.qkv(i, h), (c.num_attention_heads, c.num_key_value_heads,
                                                                      c.num_key_value_heads)))
        q, k = self.rope(q, *rope), self.rope(k, *rope)
        if ring is None:  # no loop >= 1 rows in this call: empty ring and gate
            no_rows = g.op("Slice", k, g.const([0]), g.const([0]), g.const([0]))
            ring = (g.op("Slice", no_rows, g.const([0]), g.const([0]), g.const([3])),) * 2
            gate = g.op("ReduceSum", g.op("Slice", q, g.const([0]), g.const([0]), g.const([0])),
                        g.const([-1]), keepdims=0)
        else:
            gate = self.gate(i, x_in, q, 1 if first_loop == 0 else 0)
        out, *state = loop_attention(g, [q, k, v, *kv, *ring, gate, pos0], first_loop=first_loop,
                                     window=c.window_left, scale=1 / math.sqrt(c.head_dim), kv_buffer=self.kv_buffer)
        return g.op("Reshape", g.op("Transpose", out, perm=[0, 1, 3, 2, 4]), g.const([0, 0, 0, -1])), state

    def attention_gqa(self, i, x_in, h, first_loop, rope, pos0, kv, ring) -> tuple[str, list[str]]:
        """Attention on GroupQueryAttention, in the projections' layout [R, B, S, n*Dh], RoPE inside
        the kernel where head_dim allows: decode (S = 1, all L loops as rows, a ring per extra loop)
        or prefill's loop 0 (one row, S tokens)."""
        c = self.cfg
        H, Hkv = c.num_attention_heads, c.num_key_value_heads
        rotary = self.rotary_in_gqa()
        if ring is None and rotary and self.packs():  # one row: GQA takes the packed q/k/v as they come
            q, k, v = self.linear(h, self.store.pack(self.qkv_prefixes(i)), c.attention_bias), None, None
        else:
            q, k, v = self.qkv(i, h)
        if not rotary:
            q, k = self.rope_tokens(q, H, rope), self.rope_tokens(k, Hkv, rope)
        gate = None
        if ring is not None:
            q_gate = None
            if not c.plt_gate_use_hidden_states:  # the query-mode gate reads the rotated query heads
                q_gate = self.heads(q, H)
                q_gate = self.rope(q_gate, *rope) if rotary else q_gate
            gate = self.gate(i, x_in, q_gate, 1)
        out, *state = loop_attention_gqa(
            self.g, [q, k, v, *kv, *(ring or (None, None)), gate, pos0], rows=c.plt_num_loops if ring else 1,
            window=c.window_left, scale=1 / math.sqrt(c.head_dim), heads=H, kv_heads=Hkv, head_dim=c.head_dim,
            rotary=(self.rope_half("cos"), self.rope_half("sin")) if rotary else None)
        return out, state

    def rope_tokens(self, x: str, n: int, rope: tuple[str, str]) -> str:
        """RoPE on [R, B, S, n*Dh] (viewed as [R, B, S, n, Dh])."""
        g = self.g
        cos, sin = (g.shared(("rope.tokens", t), lambda t=t: g.op("Unsqueeze", t, g.const([-2]))) for t in rope)
        y = self.rope(g.op("Reshape", x, g.const([0, 0, 0, n, self.cfg.head_dim])), cos, sin)
        return g.op("Reshape", y, g.const([0, 0, 0, -1]))

    def logits(self, x: str) -> str:
        """x [..., D] -> logits [..., V] through model.norm and lm_head (or the tied embeddings)."""
        g, c = self.g, self.cfg
        h = self.rmsnorm(x, "model.norm.weight")
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        if self.quant is not None:
            return self.quant.linear(self, h, head)
        return g.op("MatMul", h, self.w(head, transpose=True))

    def embed(self, ids: str) -> str:
        """Embedding rows of the token ids; a quantized artifact keeps the table in float16."""
        name = "model.embed_tokens.weight"
        if self.quant is None:
            return self.g.op("Gather", self.w(name), ids)
        table = self.use_initializer(*self.store.derived(name + ".fp16",
                                                         lambda: self.store.source(name).astype(np.float16)))
        return self.g.op("Cast", self.g.op("Gather", table, ids), to=FLOAT)

    def loop_output(self, x: str) -> str:
        return self.rmsnorm(x, "model.norm.weight") if self.cfg.plt_normalize_per_loop else x

    def scaled_sum(self, emb: str, prev: str) -> str:
        g, c = self.g, self.cfg
        return g.op("Add", g.op("Mul", emb, self.fconst(c.emb_scale)), g.op("Mul", prev, self.fconst(c.hidden_scale)))

    def inputs(self, ids_shape: list) -> tuple[str, dict[str, str], str]:
        """input_ids, the past state and the position of the first new token: the global cache's
        length, or the `past_len` input when the cache is an in-place buffer."""
        g, c = self.g, self.cfg
        ids = g.input("input_ids", INT64, ids_shape)
        shapes = state_shapes(c, kv_buffer=self.kv_buffer)
        state = {n: g.input("past_" + n, self.ft, shape) for n, shape in shapes.items()}
        if self.kv_buffer:
            return ids, state, g.input("past_len", INT64, [])
        pos0 = g.op("Squeeze", g.op("Slice", g.op("Shape", state["key.0"]), g.const([2]), g.const([3])),
                    g.const([0]))
        return ids, state, pos0

    def rotary_in_gqa(self) -> bool:
        """GroupQueryAttention applies RoPE itself (do_rotary) when head_dim is a multiple of 16."""
        return self.attention == "gqa" and self.cfg.head_dim % 16 == 0

    def rope_half(self, which: str) -> str:
        """GQA's cos/sin cache: [positions, head_dim / 2] (our tables repeat the half)."""
        half = self.cfg.head_dim // 2
        table = self.store.derived(f"rope.{which}.half",
                                   lambda: self.store.source(f"rope.{which}")[:, :half].astype(self.np_ft))
        return self.use_initializer(*table)

    def rope_tables(self, positions: str) -> tuple[str, str]:
        g = self.g
        return g.op("Gather", self.w("rope.cos"), positions), g.op("Gather", self.w("rope.sin"), positions)

    def outputs(self, present: dict[str, str], logits: str, logits_shape: list):
        if self.ft != FLOAT:
            logits = self.g.op("Cast", logits, to=FLOAT)
        self.g.output(logits, "logits", FLOAT, logits_shape)
        for n, shape in state_shapes(self.cfg, present=True, kv_buffer=self.kv_buffer).items():
            self.g.output(present[n], "present_" + n, self.ft, shape)


# attention: "function" (LoopAttention nodes, portable), "gqa" (ONNX Runtime GQA kernels: decode,
# prefill's loop 0) or "kvbuffer" (LoopAttention over in-place cache buffers, kv_buffer = 1: TensorRT)
def prefill_graph(cfg: PLTConfig, store, opset: int, attention: str = "function", quant=None,
                  dtype: str = "float32") -> Graph:
    b = _Builder(cfg, store, opset, attention, quant, dtype)
    g, L, n = b.g, cfg.plt_num_loops, cfg.num_hidden_layers
    ids, past, pos0 = b.inputs(["batch", "seq"])
    s = g.op("Squeeze", g.op("Slice", g.op("Shape", ids), g.const([1]), g.const([2])), g.const([0]))
    positions = g.op("Add", g.op("Range", g.const(0), s, g.const(1)), pos0)
    rope = b.rope_tables(positions)
    emb = g.op("Unsqueeze", b.embed(ids), g.const([0]))  # [1, B, S, D]
    present = {}
    x, rings, carries = emb, {}, []
    for loop in range(L):
        with g.scope(f"loop.{loop}"):
            if loop > 0:
                prev = b.loop_output(x)
                carries.append(g.op("Squeeze", g.op("Slice", prev, g.const([-1]), g.const([2**62]), g.const([2])),
                                    g.const([2])))
                seed = g.op("Unsqueeze", g.op("Slice", past["carry"], g.const([loop - 1]), g.const([loop]),
                                              g.const([0])), g.const([2]))
                if cfg.plt_clp_shift:
                    prev = g.op("Concat", seed, g.op("Slice", prev, g.const([0]), g.const([-1]), g.const([2])),
                                axis=2)
                x = b.scaled_sum(emb, prev)
            for i in range(n):
                kv = (present[f"key.{i}"], present[f"value.{i}"]) if loop else (past[f"key.{i}"], past[f"value.{i}"])
                ring = None if loop == 0 else tuple(
                    g.op("Slice", past[f"ring_{t}.{i}"], g.const([loop - 1]), g.const([loop]), g.const([0]))
                    for t in ("key", "value"))
                x, (pk, pv, rk, rv) = b.layer(i, x, loop, rope, pos0, kv, ring)
                if loop == 0:
                    present[f"key.{i}"], present[f"value.{i}"] = pk, pv
                else:
                    rings.setdefault(i, []).append((rk, rv))
    for i, parts in rings.items():
        present[f"ring_key.{i}"] = g.op("Concat", *[k for k, _ in parts], axis=0)
        present[f"ring_value.{i}"] = g.op("Concat", *[v for _, v in parts], axis=0)
    if carries:
        present["carry"] = g.op("Concat", *carries, axis=0)
    logits = b.logits(g.op("Squeeze", x, g.const([0])))
    b.outputs(present, logits, ["batch", "seq", cfg.vocab_size])
    return g


def decode_graph(cfg: PLTConfig, store, opset: int, attention: str = "function", quant=None,
                 dtype: str = "float32") -> Graph:
    b = _Builder(cfg, store, opset, attention, quant, dtype)
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
        ring = (past[f"ring_key.{i}"], past[f"ring_value.{i}"]) if L > 1 else None
        x, (pk, pv, rk, rv) = b.layer(i, x, 0, rope, pos0, (past[f"key.{i}"], past[f"value.{i}"]), ring)
        present[f"key.{i}"], present[f"value.{i}"] = pk, pv
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
