"""`plt.ops::LoopAttention` (docs/loop-attention-op.md) as ONE Triton kernel, for GPUs.

A launch computes the whole op: the attention output, the global cache write and the rings.
Its programs are, in order of program id:

- attention, one per (row, batch, query head, token): an online softmax over the global cache
  and, for rows of loops >= 1, over the ring, mixed by the gate. The keys written by this call
  are read from `key` itself, never from the cache, so no program reads what another writes;
- ring, one per (ring row, batch, kv head): the last `window` keys/values of ring ++ new;
- write, one per (batch, kv head) when row 0 is loop 0: its keys/values into the cache at pos0;
- copy (kv_buffer = 0 only), one per (batch, kv head, block of positions): past into present.

With kv_buffer = 1 the present cache is the past buffer itself (TensorRT aliases them), so a
step writes S positions instead of copying the cache. The kernel's arguments are the op's inputs,
int32 scalars and the op's outputs, in that order, with every tensor contiguous: the calling
convention of a TensorRT ahead-of-time plugin (`compile_ptx`), and launched from torch by
`loop_attention` (tests, the JIT plugin). pos0 is read on the device: no host sync.

Needs triton; runs on a CUDA device, or on the CPU under TRITON_INTERPRET=1 (slow, for tests).
`compile_ptx` needs no GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pltkit.model.formats import float_type

BLOCK_N = 64  # keys per step of the online softmax, rows per copy step
NUM_WARPS = 4


@triton.jit
def _attend(q, k_ptr, v_ptr, n, pos_base, t, window, LOCAL: tl.constexpr, scale, m, l, acc, offs_d, d_mask,
            D: tl.constexpr, BLOCK: tl.constexpr):
    """Online-softmax step over the keys 0..n-1 at k_ptr (rows of D values; key j is at position
    pos_base + j), visible when position <= t (and >= t - window for LOCAL)."""
    for start in range(0, n, BLOCK):
        offs_n = start + tl.arange(0, BLOCK)
        pos = pos_base + offs_n
        visible = (offs_n < n) & (pos <= t)
        if LOCAL:
            visible = visible & (pos >= t - window)
        rows = offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
        mask = visible[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(visible, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp() finite
        p = tl.where(visible, tl.exp(s - m_ref), 0.0)
        alpha = tl.exp(m - m_ref)
        v = tl.load(v_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    return m, l, acc


@triton.jit
def _copy_rows(dst, src, n, offs_d, d_mask, D: tl.constexpr, BLOCK: tl.constexpr):
    """dst[0..n-1] = src[0..n-1], rows of D values."""
    for start in range(0, n, BLOCK):
        offs_n = start + tl.arange(0, BLOCK)
        rows = offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
        mask = (offs_n < n)[:, None] & d_mask[None, :]
        tl.store(dst + rows, tl.load(src + rows, mask=mask), mask=mask)


@triton.jit
def _attention_program(pid, q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, rk_ptr, rv_ptr, gate_ptr, out_ptr, pos0,
                       B, H, HKV, S, C, W, offs_d, d_mask, N0: tl.constexpr, WINDOW: tl.constexpr,
                       SCALE: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """The output of one (row, batch, query head, token): global branch, and for a row of a loop
    >= 1 the local branch mixed in by the gate."""
    s_idx = pid % S
    h = (pid // S) % H
    b = (pid // (S * H)) % B
    r = pid // (S * H * B)
    hk = h // (H // HKV)
    t = pos0 + s_idx
    row = ((r * B + b) * H + h) * S + s_idx
    q = tl.load(q_ptr + row.to(tl.int64) * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    zero = tl.sum(q, axis=0) * 0.0
    # global branch: the cache before this call's write, then row 0's new keys if it is loop 0
    kv = (b * HKV + hk).to(tl.int64)
    cached = pos0 if N0 else tl.minimum(C, pos0 + S)  # no later position is visible
    m, l, acc = _attend(q, kc_ptr + kv * C * D, vc_ptr + kv * C * D, cached, 0, t, WINDOW, False, SCALE,
                        zero - float("inf"), zero, tl.zeros_like(q), offs_d, d_mask, D, BLOCK)
    if N0:
        new = ((0 * B + b) * HKV + hk).to(tl.int64) * S * D
        m, l, acc = _attend(q, k_ptr + new, v_ptr + new, S, pos0, t, WINDOW, False, SCALE, m, l, acc, offs_d,
                            d_mask, D, BLOCK)
    y = acc / l
    if r >= N0:  # a loop >= 1 row: local branch over its ring and its own keys, mixed by the gate
        rr = r - N0
        ring = ((rr * B + b) * HKV + hk).to(tl.int64) * W * D
        own = ((r * B + b) * HKV + hk).to(tl.int64) * S * D
        ml, ll, accl = _attend(q, rk_ptr + ring, rv_ptr + ring, W, pos0 - W, t, WINDOW, True, SCALE,
                               zero - float("inf"), zero, tl.zeros_like(q), offs_d, d_mask, D, BLOCK)
        ml, ll, accl = _attend(q, k_ptr + own, v_ptr + own, S, pos0, t, WINDOW, True, SCALE, ml, ll, accl,
                               offs_d, d_mask, D, BLOCK)
        g = tl.load(gate_ptr + ((rr * B + b) * H + h) * S + s_idx).to(tl.float32)
        y = g * y + (1.0 - g) * (accl / ll)
    tl.store(out_ptr + row.to(tl.int64) * D + offs_d, y.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _ring_program(pid, n_att, k_ptr, v_ptr, rk_ptr, rv_ptr, rk_out, rv_out, B, HKV, S, W, offs_d, d_mask,
                  N0: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """Ring program pid - n_att: the new ring of one (ring row, batch, kv head), the last
    min(W + S, window) of ring ++ own keys."""
    w_new = tl.minimum(W + S, WINDOW)  # ring length after the call
    i = pid - n_att
    rr = i // (B * HKV)
    bh = i % (B * HKV)
    ring = (rr * B * HKV + bh).to(tl.int64)
    own = ((N0 + rr) * B * HKV + bh).to(tl.int64) * S * D
    keep = W + S - w_new  # entries of ring ++ own dropped from the front
    from_ring = tl.maximum(W - keep, 0)
    _copy_rows(rk_out + ring * w_new * D, rk_ptr + ring * W * D + keep * D, from_ring, offs_d, d_mask, D, BLOCK)
    _copy_rows(rv_out + ring * w_new * D, rv_ptr + ring * W * D + keep * D, from_ring, offs_d, d_mask, D, BLOCK)
    skip = tl.maximum(keep - W, 0)
    _copy_rows(rk_out + (ring * w_new + from_ring) * D, k_ptr + own + skip * D, w_new - from_ring, offs_d,
               d_mask, D, BLOCK)
    _copy_rows(rv_out + (ring * w_new + from_ring) * D, v_ptr + own + skip * D, w_new - from_ring, offs_d,
               d_mask, D, BLOCK)


@triton.jit
def loop_attention_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, rk_ptr, rv_ptr, gate_ptr, pos0_ptr,  # the op's inputs
        R, B, H, HKV, S, C, W,  # rows, batch, heads, kv heads, tokens, cache length (past), ring length
        out_ptr, kc_out, vc_out, rk_out, rv_out,  # the op's outputs
        N0: tl.constexpr, WINDOW: tl.constexpr, SCALE: tl.constexpr, KV_BUFFER: tl.constexpr,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """One program of the launch: attention, ring, write or copy by program id (see the module's
    docstring)."""
    pid = tl.program_id(0)
    pos0 = tl.load(pos0_ptr).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    n_att = R * B * H * S
    n_ring = (R - N0) * B * HKV
    n_write = N0 * B * HKV
    c_out = C if KV_BUFFER else C + N0 * S  # present cache length
    if pid < n_att:
        _attention_program(pid, q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, rk_ptr, rv_ptr, gate_ptr, out_ptr, pos0,
                           B, H, HKV, S, C, W, offs_d, d_mask, N0, WINDOW, SCALE, D, BLOCK)
    elif pid < n_att + n_ring:
        _ring_program(pid, n_att, k_ptr, v_ptr, rk_ptr, rv_ptr, rk_out, rv_out, B, HKV, S, W, offs_d, d_mask,
                      N0, WINDOW, D, BLOCK)
    elif pid < n_att + n_ring + n_write:  # row 0's keys/values into the cache at pos0
        kvw = (pid - n_att - n_ring).to(tl.int64)
        dst = (kvw * c_out + pos0) * D
        _copy_rows(kc_out + dst, k_ptr + kvw * S * D, S, offs_d, d_mask, D, BLOCK)
        _copy_rows(vc_out + dst, v_ptr + kvw * S * D, S, offs_d, d_mask, D, BLOCK)
    elif not KV_BUFFER:  # present = past ++ new: one block of past positions of one (batch, kv head)
        i = pid - n_att - n_ring - n_write
        blocks = tl.cdiv(C, BLOCK)
        kvc = (i // blocks).to(tl.int64)
        start = (i % blocks) * BLOCK
        n = tl.minimum(C - start, BLOCK)
        _copy_rows(kc_out + (kvc * c_out + start) * D, kc_ptr + (kvc * C + start) * D, n, offs_d, d_mask, D, BLOCK)
        _copy_rows(vc_out + (kvc * c_out + start) * D, vc_ptr + (kvc * C + start) * D, n, offs_d, d_mask, D, BLOCK)


def programs(R, B, H, HKV, S, C, *, n0: int, kv_buffer: bool, cdiv=lambda a, b: -(-a // b)):
    """The number of programs of one launch (works on ints and on TensorRT shape expressions)."""
    total = R * B * H * S + (R - n0) * B * HKV + B * HKV * n0
    return total if kv_buffer else total + B * HKV * cdiv(C, BLOCK_N)


def constexprs(*, first_loop: int, window: int, scale: float, kv_buffer: int, head_dim: int) -> dict:
    return dict(N0=int(first_loop == 0), WINDOW=int(window), SCALE=float(scale), KV_BUFFER=int(bool(kv_buffer)),
                D=int(head_dim), BLOCK_D=triton.next_power_of_2(int(head_dim)), BLOCK=BLOCK_N)


def loop_attention(query, key, value, past_key, past_value, ring_key, ring_value, gate, pos0, *, first_loop: int,
                   window: int, scale: float, kv_buffer: int = 0, out=None):
    """The op on contiguous torch tensors (shapes as in docs/loop-attention-op.md; pos0 a 0-d int64
    tensor on the device). Returns (output, present_key, present_value, present_ring_key,
    present_ring_value); with kv_buffer, present_key/value ARE past_key/value, written in place.
    `out`: the five output tensors to write instead of new ones (the JIT TensorRT plugin)."""
    import torch

    R, B, H, S, D = query.shape
    HKV, C, W = past_key.shape[1], past_key.shape[2], ring_key.shape[3]
    n0 = int(first_loop == 0)
    if out is None:
        c_out = C if kv_buffer else C + n0 * S
        w_new = min(W + S, window)
        kc, vc = (past_key, past_value) if kv_buffer else \
            (past_key.new_empty(B, HKV, c_out, D), past_value.new_empty(B, HKV, c_out, D))
        out = (torch.empty_like(query), kc, vc, ring_key.new_empty(R - n0, B, HKV, w_new, D),
               ring_value.new_empty(R - n0, B, HKV, w_new, D))
    args = [query, key, value, past_key, past_value, ring_key, ring_value, gate, pos0]
    assert all(t.is_contiguous() for t in (*args, *out)), "LoopAttention's tensors must be contiguous"
    n = programs(R, B, H, HKV, S, C, n0=n0, kv_buffer=bool(kv_buffer))
    if n:
        loop_attention_kernel[(n,)](*args, R, B, H, HKV, S, C, W, *out, num_warps=NUM_WARPS,
                                    **constexprs(first_loop=first_loop, window=window, scale=scale,
                                                 kv_buffer=kv_buffer, head_dim=D))
    return out


SCALARS = ("R", "B", "H", "HKV", "S", "C", "W")
N_ARGS = 9 + len(SCALARS) + 5  # the AOT calling convention: the op's inputs, int32 scalars, the op's outputs


def compile_ptx(dtype: str, *, first_loop: int, window: int, scale: float, kv_buffer: int, head_dim: int,
                capability: tuple[int, int] | None = None, ptx_version: int | None = None):
    """The kernel compiled ahead of time for one dtype ('float32', 'float16', 'bfloat16') and one
    node's attributes: a triton CompiledKernel (`.asm["ptx"]`, `.metadata.name`, `.num_warps`,
    `.shared`). capability (major, minor) targets that GPU; None targets the GPU of this process.
    ptx_version (e.g. 84 for ISA 8.4) caps the PTX ISA for an older driver. Needs no GPU when
    capability is given."""
    from triton.backends.compiler import GPUTarget

    ty = float_type(dtype).short  # Triton's names
    signature = {n: f"*{ty}" for n in ("q_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "rk_ptr", "rv_ptr", "gate_ptr")}
    signature["pos0_ptr"] = "*i64"
    signature.update({n: "i32" for n in SCALARS})
    signature.update({n: f"*{ty}" for n in ("out_ptr", "kc_out", "vc_out", "rk_out", "rv_out")})
    consts = constexprs(first_loop=first_loop, window=window, scale=scale, kv_buffer=kv_buffer, head_dim=head_dim)
    signature.update({n: "constexpr" for n in consts})
    src = triton.compiler.ASTSource(fn=loop_attention_kernel, signature=signature, constexprs=consts)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32) if capability else None
    options = {"num_warps": NUM_WARPS, **({"ptx_version": ptx_version} if ptx_version else {})}
    return triton.compile(src, target=target, options=options)


def aot_ptx(kernel) -> str:
    """A compiled kernel's PTX with exactly the AOT calling convention's N_ARGS parameters. Triton
    (3.3+) appends scratch pointers (global, profile) that TensorRT does not pass; they are
    removed, which is sound only when the kernel uses no scratch memory and never reads them."""
    import re

    meta, ptx = kernel.metadata, kernel.asm["ptx"]
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError(f"{meta.name} uses scratch memory, which a TensorRT AOT plugin cannot pass")
    entry = re.search(rf"\.entry\s+{meta.name}\s*\((.*?)\)", ptx, re.S)
    params = entry.group(1).split(",")
    for extra in params[N_ARGS:]:
        if re.search(rf"\[{re.escape(extra.split()[-1])}\]", ptx):
            raise RuntimeError(f"{meta.name} reads its extra parameter {extra.split()[-1]}")
    return ptx[:entry.start(1)] + ",".join(params[:N_ARGS]).rstrip() + "\n" + ptx[entry.end(1):]
