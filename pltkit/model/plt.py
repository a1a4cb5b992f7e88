"""The PLT reference model, top to bottom.

A Parallel Loop Transformer runs one stack of Llama-style layers L times ("loops").
Loop 0 sees the token embeddings E. Loop r >= 1 sees a*E + b*shift(C[r-1]), where
C[r-1] is loop r-1's output (through model.norm when plt_normalize_per_loop) moved
one position to the right: token t at loop r consumes loop r-1's output of token
t-1. Because of that shift, one decode step runs all L loops of a new token as L
rows of ONE pass through the weights (cross-loop parallelism, CLP).

Attention per loop and layer:
  loop 0:    causal attention; its K/V are the global cache, the only full-length one.
  loop r>=1: y_global = causal attention over loop 0's K/V,
             y_local  = attention over this loop's own K/V at positions t-left..t,
             out      = o_proj(g * y_global + (1 - g) * y_local), g one gate per head.
So an extra loop costs a ring of `left` K/V per layer, not a second full cache.

Decoding state (PLTState): the next position, per layer the loop-0 K/V and each
extra loop's ring, and carry[r] = loop r's (normed) output at the last position,
which seeds the shift of the next token or chunk. A cached prefix is the caches
AND the carries at its boundary.

Every backend of pltkit reproduces `prefill` and `decode` of this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pltkit.model.config import PLTConfig


# --- rotary position embedding --------------------------------------------------------
def _rope_linear(inv_freq: Tensor, rs: dict) -> Tensor:
    return inv_freq / rs["factor"]


def _rope_llama3(inv_freq: Tensor, rs: dict) -> Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short kept, smooth in between."""
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


ROPE_SCALING = {"default": lambda inv_freq, rs: inv_freq, "linear": _rope_linear,
                "llama3": _rope_llama3}


def rope_cos_sin(cfg: PLTConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [T, head_dim] for the given positions, computed in float64."""
    half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
    inv_freq = ROPE_SCALING[cfg.rope_type](cfg.rope_theta ** -half, cfg.rope_scaling or {})
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., T, head_dim] (Llama's rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# --- attention helpers ----------------------------------------------------------------
def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax attention, scale 1/sqrt(Dh). q [..., H, T, Dh]; k, v [..., Hkv, S, Dh] (H a multiple
    of Hkv: grouped-query); mask [T, S] with True where the key is visible."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[-3] != k.shape[-3])


def window_mask(q_pos: Tensor, k_pos: Tensor, left: int | None) -> Tensor:
    """Key j is visible to query t when t - left <= j <= t (left=None: no lower bound)."""
    d = q_pos[:, None] - k_pos[None, :]
    return (d >= 0) if left is None else (d >= 0) & (d <= left)


# --- modules --------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LoopGate(nn.Module):
    """g = sigmoid(W_g . RMSNorm_gate(x_in) + b_g) (hidden-state mode) or
    g_h = sigmoid(q_h . W_g[h] + b_g[h]) on the post-RoPE query (query mode)."""

    def __init__(self, cfg: PLTConfig):
        super().__init__()
        H = cfg.num_attention_heads
        width = cfg.hidden_size if cfg.plt_gate_use_hidden_states else cfg.head_dim
        self.weight = nn.Parameter(torch.zeros(H, width))
        self.bias = nn.Parameter(torch.zeros(H))
        self.gate_norm = (RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                          if cfg.plt_gate_use_hidden_states else None)

    def forward(self, x_in: Tensor, q: Tensor) -> Tensor:
        """x_in [B, T, D], q [B, H, T, Dh] -> g [B, H, T, 1]."""
        if self.gate_norm is not None:
            logits = F.linear(self.gate_norm(x_in), self.weight, self.bias).transpose(1, 2)
        else:
            logits = torch.einsum("bhtd,hd->bht", q, self.weight) + self.bias[:, None]
        return torch.sigmoid(logits)[..., None]


class Attention(nn.Module):
    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, Dh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=cfg.attention_bias)
        self.plt_gate = LoopGate(cfg) if cfg.plt_num_loops > 1 else None

    def qkv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [B, T, D] -> q [B, H, T, Dh], k, v [B, Hkv, T, Dh]; q and k rotated."""
        B, T, _ = h.shape
        Dh = self.cfg.head_dim
        q = self.q_proj(h).view(B, T, -1, Dh).transpose(1, 2)
        k = self.k_proj(h).view(B, T, -1, Dh).transpose(1, 2)
        v = self.v_proj(h).view(B, T, -1, Dh).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, y: Tensor) -> Tensor:
        B, H, T, Dh = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))

    def forward_chunk(self, x_in: Tensor, h: Tensor, loop: int, cache: LayerCache,
                      pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Loop `loop` over a chunk of S tokens at positions `pos` (loops one after another)."""
        q, k, v = self.qkv(h, cos, sin)
        if loop == 0:  # write the global cache, then attend causally over it
            cache.k, cache.v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)
            keys = torch.arange(cache.k.shape[2])
            return self.out(attend(q, cache.k, cache.v, window_mask(pos, keys, None)))
        # loop 0 of this chunk already ran through every layer, so cache.k covers it.
        y_global = attend(q, cache.k, cache.v, window_mask(pos, torch.arange(cache.k.shape[2]), None))
        ring_k = torch.cat([cache.ring_k[loop - 1], k], 2)
        ring_v = torch.cat([cache.ring_v[loop - 1], v], 2)
        ring_pos = torch.arange(int(pos[-1]) + 1 - ring_k.shape[2], int(pos[-1]) + 1)
        y_local = attend(q, ring_k, ring_v, window_mask(pos, ring_pos, self.cfg.window_left))
        cache.ring_k[loop - 1], cache.ring_v[loop - 1] = _keep_last(ring_k, ring_v, self.cfg.window_left)
        g = self.plt_gate(x_in, q)
        return self.out(g * y_global + (1 - g) * y_local)

    def forward_rows(self, x_in: Tensor, h: Tensor, cache: LayerCache, cos: Tensor, sin: Tensor) -> Tensor:
        """CLP decode: row r of x_in [B, L, D] is loop r of the same new token."""
        q, k, v = self.qkv(h, cos, sin)  # the L rows play the role of T
        cache.k, cache.v = torch.cat([cache.k, k[:, :, :1]], 2), torch.cat([cache.v, v[:, :, :1]], 2)
        y = attend(q, cache.k, cache.v, None)  # every row sees loop 0's keys 0..t
        if x_in.shape[1] > 1:
            # rows >= 1: per loop, its ring plus its own current key -> [B, L-1, Hkv, w+1, Dh]
            ring_k = torch.cat([torch.stack(cache.ring_k, 1), k[:, :, 1:].transpose(1, 2)[..., None, :]], -2)
            ring_v = torch.cat([torch.stack(cache.ring_v, 1), v[:, :, 1:].transpose(1, 2)[..., None, :]], -2)
            q_rows = q[:, :, 1:].transpose(1, 2)[..., None, :]  # [B, L-1, H, 1, Dh]
            y_local = attend(q_rows, ring_k, ring_v, None)[..., 0, :].transpose(1, 2)
            g = self.plt_gate(x_in[:, 1:], q[:, :, 1:])
            y = torch.cat([y[:, :, :1], g * y[:, :, 1:] + (1 - g) * y_local], 2)
            ring_k, ring_v = _keep_last(ring_k, ring_v, self.cfg.window_left)
            cache.ring_k, cache.ring_v = list(ring_k.unbind(1)), list(ring_v.unbind(1))
        return self.out(y)


def _keep_last(k: Tensor, v: Tensor, n: int) -> tuple[Tensor, Tensor]:
    start = max(0, k.shape[-2] - n)  # not [-n:]: n may be 0
    return k[..., start:, :], v[..., start:, :]


class MLP(nn.Module):
    def __init__(self, cfg: PLTConfig):
        super().__init__()
        D, F_, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(D, F_, bias=bias)
        self.up_proj = nn.Linear(D, F_, bias=bias)
        self.down_proj = nn.Linear(F_, D, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, attn_fn) -> Tensor:
        x = x + attn_fn(x, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


# --- decoding state -------------------------------------------------------------------
@dataclass
class LayerCache:
    k: Tensor  # [B, Hkv, pos, Dh] loop-0 keys after RoPE: the global cache
    v: Tensor
    ring_k: list[Tensor]  # per loop r >= 1: [B, Hkv, min(pos, left), Dh], oldest first
    ring_v: list[Tensor]


@dataclass
class PLTState:
    pos: int  # position of the next token
    layers: list[LayerCache]
    carry: Tensor  # [L-1, B, D]: loop r's (normed) output at pos-1; zeros at pos 0

    def clone(self) -> PLTState:
        return PLTState(self.pos, [LayerCache(c.k.clone(), c.v.clone(), [t.clone() for t in c.ring_k],
                                              [t.clone() for t in c.ring_v]) for c in self.layers],
                        self.carry.clone())

    def nbytes(self) -> int:
        tensors = [self.carry] + [t for c in self.layers for t in (c.k, c.v, *c.ring_k, *c.ring_v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def snapshot(self) -> dict:
        """What a prefix needs besides the global cache: rings and carries (small)."""
        return {"rings": [([t.clone() for t in c.ring_k], [t.clone() for t in c.ring_v]) for c in self.layers],
                "carry": self.carry.clone()}

    def rewind(self, pos: int, snapshot: dict) -> None:
        """Back to `pos` tokens; snapshot must have been taken at pos."""
        for c, (rk, rv) in zip(self.layers, snapshot["rings"]):
            c.k, c.v = c.k[:, :, :pos], c.v[:, :, :pos]
            c.ring_k, c.ring_v = [t.clone() for t in rk], [t.clone() for t in rv]
        self.pos, self.carry = pos, snapshot["carry"].clone()


# --- the model ------------------------------------------------------------------------
class PLTModel(nn.Module):
    """The `model.` part of the checkpoint: embeddings, shared layers, final norm."""

    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class PLTForCausalLM(nn.Module):
    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.config = cfg
        self.model = PLTModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, h: Tensor) -> Tensor:
        h = self.model.norm(h)
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.model.embed_tokens.weight)

    def loop_output(self, x: Tensor) -> Tensor:
        """C[r]: what a non-last loop hands to the next loop."""
        return self.model.norm(x) if self.config.plt_normalize_per_loop else x

    def new_state(self, batch: int) -> PLTState:
        c, w = self.config, self.model.embed_tokens.weight
        empty = w.new_zeros(batch, c.num_key_value_heads, 0, c.head_dim)
        extra = c.plt_num_loops - 1
        layers = [LayerCache(empty, empty, [empty] * extra, [empty] * extra) for _ in range(c.num_hidden_layers)]
        return PLTState(0, layers, w.new_zeros(extra, batch, c.hidden_size))

    def forward(self, input_ids: Tensor) -> Tensor:
        """Full forward: LongTensor [B, T] -> logits [B, T, V]."""
        return self.prefill(input_ids)[0]

    def prefill(self, input_ids: Tensor, state: PLTState | None = None) -> tuple[Tensor, PLTState]:
        """Run a chunk of S >= 1 tokens after `state` (None: from position 0), loops one after
        another over the whole chunk, the shift seeded by the state's carries. Returns the
        chunk's logits [B, S, V] and the state (updated in place)."""
        c = self.config
        B, S = input_ids.shape
        state = state if state is not None else self.new_state(B)
        if state.pos + S > c.max_position_embeddings:
            raise ValueError(f"position {state.pos + S} exceeds max_position_embeddings ({c.max_position_embeddings})")
        pos = torch.arange(state.pos, state.pos + S)
        emb = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(c, pos, emb.dtype)
        x, carries = emb, []
        for loop in range(c.plt_num_loops):
            if loop > 0:
                prev = self.loop_output(x)
                carries.append(prev[:, -1])
                if c.plt_clp_shift:
                    prev = torch.cat([state.carry[loop - 1][:, None], prev[:, :-1]], 1)
                x = c.emb_scale * emb + c.hidden_scale * prev
            x = self._run_loop(x, loop, state, pos, cos, sin)
        state.carry = torch.stack(carries) if carries else state.carry
        state.pos += S
        return self.logits(x), state

    def _run_loop(self, x, loop, state, pos, cos, sin):
        for layer, cache in zip(self.model.layers, state.layers):
            attn = layer.self_attn
            x = layer(x, lambda x_in, h: attn.forward_chunk(x_in, h, loop, cache, pos, cos, sin))
        return x

    def decode(self, tokens: Tensor, state: PLTState) -> tuple[Tensor, PLTState]:
        """One new token per sequence (LongTensor [B]) -> logits [B, V]. With the CLP shift, all
        L loops run as L rows of one pass through the layers; without it, loops run serially."""
        c = self.config
        if not c.plt_clp_shift:
            logits, state = self.prefill(tokens[:, None], state)
            return logits[:, -1], state
        if state.pos + 1 > c.max_position_embeddings:
            raise ValueError(f"position {state.pos + 1} exceeds max_position_embeddings ({c.max_position_embeddings})")
        emb = self.model.embed_tokens(tokens)  # [B, D]
        rows = [emb] + [c.emb_scale * emb + c.hidden_scale * state.carry[r] for r in range(c.plt_num_loops - 1)]
        x = torch.stack(rows, 1)  # [B, L, D]
        cos, sin = rope_cos_sin(c, torch.tensor([state.pos]), emb.dtype)
        for layer, cache in zip(self.model.layers, state.layers):
            attn = layer.self_attn
            x = layer(x, lambda x_in, h: attn.forward_rows(x_in, h, cache, cos, sin))
        if c.plt_num_loops > 1:
            state.carry = self.loop_output(x[:, :-1]).transpose(0, 1)
        state.pos += 1
        return self.logits(x[:, -1]), state
