"""The pieces of the PLT graphs (norms, linear layers, RoPE, gates, embeddings, logits) and the
graphs' inputs and outputs, written into one Graph by a Builder."""

from __future__ import annotations

import numpy as np

from pltkit.export.graph import FLOAT, INT64, TO_END, Graph
from pltkit.export.gqa import step_positions
from pltkit.model.config import PLTConfig
from pltkit.model.formats import float_type


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


class Builder:
    """One graph of a graph set (attention: "function", "gqa" or "kvbuffer", see
    pltkit.export.artifact.GRAPHS) being written: its Graph `g`, the model's config `cfg` and the
    artifact's weight `store`."""

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

    def heads(self, x: str, n: int) -> str:
        """[R, B, S, n*Dh] -> [R, B, n, S, Dh]"""
        x = self.g.op("Reshape", x, self.g.const([0, 0, 0, n, self.cfg.head_dim]))
        return self.g.op("Transpose", x, perm=[0, 1, 3, 2, 4])

    def rope(self, x: str, cos: str, sin: str) -> str:
        g, half = self.g, self.cfg.head_dim // 2
        x1, x2 = g.op("Split", x, g.const([half, half]), axis=-1, n_out=2)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def rope_tokens(self, x: str, n: int, rope: tuple[str, str]) -> str:
        """RoPE on [R, B, S, n*Dh] (viewed as [R, B, S, n, Dh])."""
        g = self.g
        cos, sin = (g.shared(("rope.tokens", t), lambda t=t: g.op("Unsqueeze", t, g.const([-2]))) for t in rope)
        y = self.rope(g.op("Reshape", x, g.const([0, 0, 0, n, self.cfg.head_dim])), cos, sin)
        return g.op("Reshape", y, g.const([0, 0, 0, -1]))

    def rope_tables(self, positions: str) -> tuple[str, str]:
        g = self.g
        return g.op("Gather", self.w("rope.cos"), positions), g.op("Gather", self.w("rope.sin"), positions)

    def rope_half(self, which: str) -> str:
        """GQA's cos/sin cache: [positions, head_dim / 2] (our tables repeat the half). The kernel wants
        a row for every position of the cache it reaches, and a decode step's call reaches up to
        L * H / Hkv - 1 spare positions past the context (GQA.step): zero rows, never read (the
        step rotates at its token's position)."""
        c = self.cfg
        half = c.head_dim // 2
        spare = step_positions(c.plt_num_loops, c.num_attention_heads, c.num_key_value_heads) - 1

        def table():
            rows = self.store.source(f"rope.{which}")[:, :half]
            return np.concatenate([rows, np.zeros((spare, half), rows.dtype)]).astype(self.np_ft)
        return self.use_initializer(*self.store.derived(f"rope.{which}.half", table))

    def rotary_in_gqa(self) -> bool:
        """GroupQueryAttention applies RoPE itself (do_rotary) when head_dim is a multiple of 16."""
        return self.attention == "gqa" and self.cfg.head_dim % 16 == 0

    def rows_from(self, x: str, start: int) -> str:
        return self.g.op("Slice", x, self.g.const([start]), self.g.const([TO_END]), self.g.const([0]))

    def gate(self, i: int, x_in: str, q: str | None, start: int) -> str:
        """g [Rr, B, H, S] for the rows of loops >= 1 (rows `start`..), from the layer's input x_in
        or (plt_gate_use_hidden_states false) its rotated query heads q [R, B, H, S, Dh]."""
        g, c, p = self.g, self.cfg, f"model.layers.{i}.self_attn.plt_gate"
        if c.plt_gate_use_hidden_states:
            h = self.rmsnorm(self.rows_from(x_in, start), p + ".gate_norm.weight")
            logits = g.op("Transpose", self.linear(h, p, bias=True, quantize=False), perm=[0, 1, 3, 2])
        else:
            w = g.op("Reshape", self.w(p + ".weight"), g.const([c.num_attention_heads, 1, c.head_dim]))
            dot = g.op("ReduceSum", g.op("Mul", self.rows_from(q, start), w), g.const([-1]), keepdims=0)
            logits = g.op("Add", dot, g.op("Unsqueeze", self.w(p + ".bias"), g.const([-1])))
        return g.op("Sigmoid", logits)

    def mlp(self, i: int, h: str) -> str:
        """The SwiGLU MLP of layer i."""
        g, p, bias = self.g, f"model.layers.{i}.mlp", self.cfg.mlp_bias
        gp, up = self.linears(h, [p + ".gate_proj", p + ".up_proj"], bias)
        return self.linear(g.op("Mul", g.op("Mul", gp, g.op("Sigmoid", gp)), up), p + ".down_proj", bias)

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

    # -- the graph's inputs and outputs ----------------------------------------------------
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

    def outputs(self, present: dict[str, str], logits: str, logits_shape: list):
        if self.ft != FLOAT:
            logits = self.g.op("Cast", logits, to=FLOAT)
        self.g.output(logits, "logits", FLOAT, logits_shape)
        for n, shape in state_shapes(self.cfg, present=True, kv_buffer=self.kv_buffer).items():
            self.g.output(present[n], "present_" + n, self.ft, shape)
