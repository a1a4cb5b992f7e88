"""The LoopAttention op as a TensorRT plugin, registered from Python (`tensorrt.plugin`, TensorRT
10.6+) as `pltkit::LoopAttention`, version 1. The ONNX parser maps nodes with
`plugin_namespace="pltkit"` to it; their attributes first_loop, window, scale and kv_buffer are
the plugin's.

Both implementations run the one Triton kernel of pltkit.gpu.triton_loop_attention:

- ahead of time (`@trtp.aot_impl`, TensorRT 10.9+): the kernel compiled to PTX for the node's
  dtype and attributes, baked into the engine with its launch grid and int32 scalars as
  expressions of the input shapes. The engine then runs without Python. Chosen whenever
  TensorRT supports it (network flag PREFER_AOT_PYTHON_PLUGINS);
- just in time (`@trtp.impl`): TensorRT calls back into Python, which launches the kernel.

With kv_buffer = 1 the present cache outputs of a loop-0 node are declared aliases of the past
cache inputs (I/O aliasing, preview feature ALIASED_PLUGIN_IO_10_03): the kernel writes the new
positions into the caller's buffer. A node of loops >= 1 writes nothing; its present outputs
(equal to past, never read by pltkit's graphs) are empty. Outputs have the input dtypes: the
network's types decide the precision.

No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions'
annotations as classes. The attributes are 1-element numpy arrays (int32, float32), the type the
ONNX parser hands over; tensorrt.plugin's scalar path calls int() on such an array, which
numpy >= 2.4 refuses.
"""

from typing import Tuple, Union

import numpy as np
import numpy.typing as npt

I32, F32 = npt.NDArray[np.int32], npt.NDArray[np.float32]

PLUGIN_ID = "pltkit::LoopAttention"
_registered: bool | None = None


def output_descs(trtp, query, key, past_key, past_value, ring_key, ring_value, *, first_loop: int, window: int,
                 kv_buffer: int):
    """The five output descriptors, from the input descriptors (shape expressions)."""
    n0 = first_loop == 0
    if kv_buffer and n0:
        present_k, present_v = past_key.aliased(), past_value.aliased()
    elif kv_buffer:  # writes nothing (present = past) and pltkit's graphs never read it: empty, so that
        e = past_key.shape_expr  # TensorRT needs no alias, hence no copy, of a cache other nodes read
        present_k, present_v = (trtp.from_shape_expr((e[0], e[1], 0, e[3]), dtype=d.dtype)
                                for d in (past_key, past_value))
    else:
        e = past_key.shape_expr
        length = e[2] + key.shape_expr[3] if n0 else e[2]
        present_k, present_v = (trtp.from_shape_expr((e[0], e[1], length, e[3]), dtype=d.dtype)
                                for d in (past_key, past_value))
    r = ring_key.shape_expr
    ring_len = trtp.min(r[3] + key.shape_expr[3], window)  # the ring never holds more than the window
    rings = (trtp.from_shape_expr((r[0], r[1], r[2], ring_len, r[4]), dtype=d.dtype) for d in (ring_key, ring_value))
    return (query.like(), present_k, present_v, *rings)


def launch(trtp, query, past_key, ring_key, *, first_loop: int, kv_buffer: int):
    """(grid size, the kernel's int32 scalars) as expressions of the input shapes."""
    from pltkit.gpu.triton_loop_attention import programs

    q, pk = query.shape_expr, past_key.shape_expr
    R, B, H, S, HKV, C, W = q[0], q[1], q[2], q[3], pk[1], pk[2], ring_key.shape_expr[3]
    grid = programs(R, B, H, HKV, S, C, n0=int(first_loop == 0), kv_buffer=bool(kv_buffer), cdiv=trtp.cdiv)
    return grid, (R, B, H, HKV, S, C, W)


def register() -> bool:
    """Register the plugin once; False when this TensorRT has no `tensorrt.plugin` (then the
    engine builder inlines the ONNX function instead)."""
    global _registered
    if _registered is not None:
        return _registered
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        _registered = False
        return False
    TD = trtp.TensorDesc

    # attributes in name order, the order the ONNX parser may hand them over in
    @trtp.register(PLUGIN_ID)
    def describe(query: TD, key: TD, value: TD, past_key: TD, past_value: TD, ring_key: TD, ring_value: TD,
                 gate: TD, pos0: TD, first_loop: I32, kv_buffer: I32, scale: F32, window: I32
                 ) -> Tuple[TD, TD, TD, TD, TD]:
        a = attributes(first_loop, kv_buffer, scale, window)
        return output_descs(trtp, query, key, past_key, past_value, ring_key, ring_value, first_loop=a["first_loop"],
                            window=a["window"], kv_buffer=a["kv_buffer"])

    @trtp.impl(PLUGIN_ID)
    def run(query, key, value, past_key, past_value, ring_key, ring_value, gate, pos0, first_loop: I32,
            kv_buffer: I32, scale: F32, window: I32, outputs, stream: int) -> None:
        import torch

        from pltkit.gpu.triton_loop_attention import loop_attention

        tensors = [_torch_view(trt, torch, x) for x in (query, key, value, past_key, past_value, ring_key,
                                                        ring_value, gate, pos0)]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            loop_attention(*tensors, **attributes(first_loop, kv_buffer, scale, window),
                           out=[_torch_view(trt, torch, x) for x in outputs])

    if hasattr(trtp, "aot_impl"):
        @trtp.aot_impl(PLUGIN_ID)
        def compiled(query: TD, key: TD, value: TD, past_key: TD, past_value: TD, ring_key: TD, ring_value: TD,
                     gate: TD, pos0: TD, first_loop: I32, kv_buffer: I32, scale: F32, window: I32,
                     outputs: Tuple[TD, TD, TD, TD, TD], tactic: int
                     ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
            return aot_kernel(trt, trtp, query, past_key, ring_key, attributes(first_loop, kv_buffer, scale, window))

    _registered = True
    return True


def aot_kernel(trt, trtp, query, past_key, ring_key, a: dict):
    """What the ahead-of-time implementation returns for a node of attributes `a`: the kernel's
    name and PTX, its launch parameters and its int32 scalars (expressions of the input shapes)."""
    from pltkit.gpu.triton_loop_attention import aot_ptx, compile_ptx

    head = query.shape_expr[4]
    if not head.is_constant:
        raise ValueError("LoopAttention on TensorRT needs a static head size")
    kernel = compile_ptx(kernel_dtype(trt, query.dtype), **a, head_dim=head.constant_value(),
                         ptx_version=driver_ptx_version())
    grid, scalars = launch(trtp, query, past_key, ring_key, first_loop=a["first_loop"], kv_buffer=a["kv_buffer"])
    params = trtp.KernelLaunchParams()
    params.grid_x = grid
    params.block_x = kernel.metadata.num_warps * 32
    params.shared_mem = kernel.metadata.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
    return kernel.metadata.name, aot_ptx(kernel), params, extra


def attributes(first_loop, kv_buffer, scale, window) -> dict:
    """The node's attributes as Python numbers (they arrive as 1-element arrays). tensorrt.plugin
    hands them to the AOT function by position, in the order the fields came: the creator's (name
    order). A float where an int belongs means they came in another order."""
    def item(a):
        return np.asarray(a).reshape(-1)[0].item()
    kinds = [np.asarray(a).dtype.kind for a in (first_loop, kv_buffer, scale, window)]
    if kinds[2] != "f" or "f" in kinds[:2] + kinds[3:]:
        raise ValueError(f"LoopAttention's attributes arrived out of order (kinds {kinds}); expected "
                         f"first_loop, kv_buffer, scale, window")
    return {"first_loop": int(item(first_loop)), "kv_buffer": int(item(kv_buffer)), "scale": float(item(scale)),
            "window": int(item(window))}


def driver_ptx_version() -> int | None:
    """The PTX ISA to write for this machine (e.g. 84 for a CUDA 12.4 driver): the newest one both
    its CUDA driver and Triton's bundled ptxas accept; None (Triton's default) when unknown.
    TensorRT loads the AOT kernel's PTX through the driver, while Triton writes the ISA of its own
    ptxas, which can be newer than the driver."""
    import ctypes
    import re

    try:  # Triton's own table from CUDA versions to PTX ISAs (internal API: any failure is "unknown")
        from triton.backends.nvidia.compiler import get_ptxas_version, ptx_get_version

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        driver = ptx_get_version(f"{version.value // 1000}.{version.value % 1000 // 10}")
        ptxas = ptx_get_version(re.search(r"release (\d+\.\d+)", get_ptxas_version(90)).group(1))
        return min(driver, ptxas)
    except Exception:
        return None


def kernel_dtype(trt, dtype) -> str:
    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
    if dtype not in names:
        raise ValueError(f"LoopAttention on TensorRT runs float32, float16 or bfloat16 tensors, not {dtype}")
    return names[dtype]


class _CudaArray:
    """An object torch.as_tensor reads through __cuda_array_interface__."""

    def __init__(self, **interface):
        self.__cuda_array_interface__ = interface


def _torch_view(trt, torch, t):
    """A torch tensor over a plugin tensor's memory (contiguous). tensorrt.plugin's own
    __cuda_array_interface__ refuses bfloat16, so bf16 is read as int16 and viewed."""
    typestr, dtype = {trt.float32: ("<f4", torch.float32), trt.float16: ("<f2", torch.float16),
                      trt.bfloat16: ("<i2", torch.bfloat16), trt.int64: ("<i8", torch.int64)}[t.dtype]
    shape = tuple(t.shape)
    if 0 in shape:  # an empty tensor: nothing to read or write (its address may be null)
        return torch.empty(shape, dtype=dtype, device="cuda")
    view = torch.as_tensor(_CudaArray(shape=shape, typestr=typestr, data=(t.data_ptr, False), version=3,
                                      strides=None), device="cuda")
    return view.view(dtype)
