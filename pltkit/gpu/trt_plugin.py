"""The LoopAttention op as a TensorRT plugin, registered from Python (`tensorrt.plugin`, TensorRT
10.6+). The ONNX parser maps nodes with `plugin_namespace="pltkit"` to it.

The implementation is the Triton kernel of pltkit.gpu.triton_loop_attention, called through
torch on TensorRT's stream (a JIT plugin: TensorRT calls back into Python each time the node
runs). An ahead-of-time variant (`@trtp.aot_impl`, the kernel compiled to PTX and baked into the
engine) is not built: the kernel's arguments are derived tensors (the concatenated caches), which
the AOT calling convention (plugin inputs, scalars, outputs) cannot express without a kernel
that reads past and new keys separately.
"""

from __future__ import annotations

_registered = False


def register() -> bool:
    """Register the plugin once; False when this TensorRT has no `tensorrt.plugin` (then the
    engine builder inlines the ONNX function instead)."""
    global _registered
    if _registered:
        return True
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        return False
    import numpy as np
    import torch

    from pltkit.gpu.triton_loop_attention import loop_attention

    @trtp.register("pltkit::LoopAttention")
    def desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
             past_value: trtp.TensorDesc, ring_key: trtp.TensorDesc, ring_value: trtp.TensorDesc,
             gate: trtp.TensorDesc, pos0: trtp.TensorDesc, first_loop: int, window: int, scale: float):
        out = query.like()
        present_k, present_v = past_key.like(), past_value.like()
        if first_loop == 0:  # row 0 is loop 0: its keys are appended to the global cache
            for d in (present_k, present_v):
                d.shape_expr[2] = past_key.shape_expr[2] + key.shape_expr[3]
        ring_k, ring_v = ring_key.like(), ring_value.like()
        for d in (ring_k, ring_v):  # min(window, W + S): the ring never holds more than the window
            d.shape_expr[3] = trtp.min(ring_key.shape_expr[3] + key.shape_expr[3], window)
        return out, present_k, present_v, ring_k, ring_v

    @trtp.impl("pltkit::LoopAttention")
    def impl(query, key, value, past_key, past_value, ring_key, ring_value, gate, pos0, first_loop: int,
             window: int, scale: float, outputs, stream: int) -> None:
        t = [torch.as_tensor(x, device="cuda") for x in (query, key, value, past_key, past_value, ring_key,
                                                          ring_value, gate)]
        p0 = int(np.asarray(torch.as_tensor(pos0, device="cuda").cpu()))
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            results = loop_attention(*t, p0, first_loop=first_loop, window=window, scale=scale)
            for dst, src in zip(outputs, results):
                torch.as_tensor(dst, device="cuda").copy_(src)

    _registered = True
    return True
