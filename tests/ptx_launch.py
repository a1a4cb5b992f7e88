"""Launch a PTX kernel through the CUDA driver API (ctypes on libcuda), the way TensorRT runs an
ahead-of-time plugin's kernel: its parameters are the plugin's inputs, the int32 scalars and the
outputs, in that order, and nothing else. For tests on a CUDA machine only."""

import ctypes


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {result}")


def launch(ptx: str, name: str, grid: int, block: int, shared: int, pointers_in, scalars, pointers_out,
           stream: int) -> None:
    cuda = ctypes.CDLL("libcuda.so.1")
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    _check(cuda.cuModuleLoadData(ctypes.byref(module), ptx.encode() + b"\0"), "cuModuleLoadData")
    _check(cuda.cuModuleGetFunction(ctypes.byref(function), module, name.encode()), "cuModuleGetFunction")
    values = ([ctypes.c_void_p(p) for p in pointers_in] + [ctypes.c_int32(s) for s in scalars]
              + [ctypes.c_void_p(p) for p in pointers_out])
    params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    cuda.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    _check(cuda.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, shared, stream, params, None), "cuLaunchKernel")
