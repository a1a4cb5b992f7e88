"""`plt.ops::LoopAttention` (docs/loop-attention-op.md) as a Triton kernel, for GPUs.

`loop_attention(...)` takes and returns torch tensors with the op's inputs and outputs. The
cache and ring writes are tensor copies; the kernel computes the attention: one program per
(row, batch, query head, token), streaming over the keys with an online softmax, the global
branch over the global cache (positions <= t) and, for rows of loops >= 1, the local branch over
the ring (positions t-window .. t), mixed by the gate. The tests hold it to
`pltkit.gpu.loop_attention_ref.reference`, which they hold to the exported ONNX function.

Needs torch and triton; runs on a CUDA device, or on the CPU under TRITON_INTERPRET=1 (slow,
for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pltkit.gpu.loop_attention_ref import writes


@triton.jit
def _attend_block(q, k_ptr, v_ptr, stride_kt, stride_vt, lo, hi, t_base, t, window, use_window,
                  scale, m, l, acc, offs_d, d_mask, BLOCK_N: tl.constexpr):
    """Online softmax over keys lo..hi-1 of one (batch, kv head) (positions t_base + index)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        pos = t_base + offs_n
        visible = (offs_n < hi) & (pos <= t)
        if use_window:
            visible = visible & (pos >= t - window)
        k = tl.load(k_ptr + offs_n[:, None] * stride_kt + offs_d[None, :], mask=visible[:, None] & d_mask[None, :],
                    other=0.0)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp() finite
        p = tl.where(visible, tl.exp(s - m_ref), 0.0)
        alpha = tl.exp(m - m_ref)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vt + offs_d[None, :], mask=visible[:, None] & d_mask[None, :],
                    other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    return m, l, acc


@triton.jit
def _loop_attention_kernel(
        q_ptr, kg_ptr, vg_ptr, kl_ptr, vl_ptr, gate_ptr, out_ptr,
        B, H, S, T, WS, pos0, n0, window, scale, group,
        sq_r, sq_b, sq_h, sq_s, sg_b, sg_h, sg_t, sl_r, sl_b, sl_h, sl_t, sgate_r, sgate_b, sgate_h, sgate_s,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    s_idx = pid % S
    h = (pid // S) % H
    b = (pid // (S * H)) % B
    r = pid // (S * H * B)
    hk = h // group
    t = pos0 + s_idx
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + r * sq_r + b * sq_b + h * sq_h + s_idx * sq_s + offs_d, mask=d_mask, other=0.0)
    q = q.to(tl.float32)

    # global branch: the global cache, positions 0..t
    zero = tl.sum(q, axis=0) * 0.0
    m, l, acc = zero - float("inf"), zero, tl.zeros([BLOCK_D], dtype=tl.float32)
    m, l, acc = _attend_block(q, kg_ptr + b * sg_b + hk * sg_h, vg_ptr + b * sg_b + hk * sg_h, sg_t, sg_t,
                              0, T, 0, t, window, False, scale, m, l, acc, offs_d, d_mask, BLOCK_N)
    y = acc / l
    if r >= n0:  # a loop >= 1 row: local branch over its ring, mixed by the gate
        rr = r - n0
        ml, ll, accl = zero - float("inf"), zero, tl.zeros([BLOCK_D], dtype=tl.float32)
        base = rr * sl_r + b * sl_b + hk * sl_h
        ml, ll, accl = _attend_block(q, kl_ptr + base, vl_ptr + base, sl_t, sl_t, 0, WS, pos0 - (WS - S), t,
                                     window, True, scale, ml, ll, accl, offs_d, d_mask, BLOCK_N)
        g = tl.load(gate_ptr + rr * sgate_r + b * sgate_b + h * sgate_h + s_idx * sgate_s).to(tl.float32)
        y = g * y + (1.0 - g) * (accl / ll)
    tl.store(out_ptr + r * sq_r + b * sq_b + h * sq_h + s_idx * sq_s + offs_d, y, mask=d_mask)


def loop_attention(query, key, value, past_key, past_value, ring_key, ring_value, gate, pos0: int, *,
                   first_loop: int, window: int, scale: float, block_n: int = 64):
    """The op on torch tensors (shapes as in docs/loop-attention-op.md); returns
    (output, present_key, present_value, present_ring_key, present_ring_value)."""
    R, B, H, S, D = query.shape
    Hkv = key.shape[2]
    n0, present_k, present_v, k_loc, v_loc = writes(key, value, past_key, past_value, ring_key, ring_value,
                                                    first_loop)
    q = query.contiguous()
    out = torch.empty_like(q)
    kg, vg, kl, vl, g = (x.contiguous() for x in (present_k, present_v, k_loc, v_loc, gate))
    if q.numel():
        grid = (R * B * H * S,)
        _loop_attention_kernel[grid](
            q, kg, vg, kl, vl, g, out, B, H, S, kg.shape[2], kl.shape[3], int(pos0), n0, window, float(scale),
            H // Hkv, *q.stride()[:4], *kg.stride()[:3], *kl.stride()[:4], *_strides4(g),
            D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_N=block_n)
    keep = max(0, k_loc.shape[3] - window)
    return out, present_k, present_v, k_loc[:, :, :, keep:], v_loc[:, :, :, keep:]


def _strides4(g: torch.Tensor):
    return g.stride() if g.dim() == 4 and g.numel() else (0, 0, 0, 0)
