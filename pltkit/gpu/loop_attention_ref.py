"""`plt.ops::LoopAttention` (docs/loop-attention-op.md) in plain torch, float64, position by
position: the statement the Triton kernel and the exported ONNX function are tested against."""

from __future__ import annotations

import torch


def writes(key, value, past_key, past_value, ring_key, ring_value, first_loop: int, pos0: int = 0,
           kv_buffer: int = 0):
    """Steps 1 and 3 of the op's data: the global cache after the write, and each loop >= 1 row's
    keys/values with its ring in front (positions pos0 - W ..). Returns (n0, present_k,
    present_v, k_loc, v_loc)."""
    n0 = 1 if first_loop == 0 else 0

    def write(past, new):
        if not n0:
            return past
        if not kv_buffer:
            return torch.cat([past, new], 2)
        present = past.clone()
        present[:, :, pos0:pos0 + new.shape[2]] = new
        return present

    present_k, present_v = write(past_key, key[0]), write(past_value, value[0])
    return n0, present_k, present_v, torch.cat([ring_key, key[n0:]], 3), torch.cat([ring_value, value[n0:]], 3)


def reference(query, key, value, past_key, past_value, ring_key, ring_value, gate, pos0: int, *,
              first_loop: int, window: int, scale: float, kv_buffer: int = 0):
    """The op's semantics in plain torch, float64, position by position."""
    f = torch.float64
    R, B, H, S, D = query.shape
    Hkv = key.shape[2]
    pos0 = int(pos0)
    n0, present_k, present_v, k_loc, v_loc = writes(key, value, past_key, past_value, ring_key, ring_value,
                                                    first_loop, pos0, kv_buffer)
    W = ring_key.shape[3]
    out = torch.zeros(query.shape, dtype=f)

    def attend(q, K, V, visible):
        s = (K[visible].to(f) @ q.to(f)) * scale
        return torch.softmax(s, 0) @ V[visible].to(f)

    for r in range(R):
        for b in range(B):
            for h in range(H):
                hk = h // (H // Hkv)
                for s in range(S):
                    t = pos0 + s
                    glob_pos = torch.arange(present_k.shape[2])
                    y = attend(query[r, b, h, s], present_k[b, hk], present_v[b, hk], glob_pos <= t)
                    if r >= n0:
                        loc_pos = pos0 - W + torch.arange(k_loc.shape[3])
                        vis = (loc_pos <= t) & (loc_pos >= t - window)
                        y_loc = attend(query[r, b, h, s], k_loc[r - n0, b, hk], v_loc[r - n0, b, hk], vis)
                        g = float(gate[r - n0, b, h, s])
                        y = g * y + (1 - g) * y_loc
                    out[r, b, h, s] = y
    keep = max(0, k_loc.shape[3] - window)
    return out, present_k, present_v, k_loc[:, :, :, keep:], v_loc[:, :, :, keep:]
