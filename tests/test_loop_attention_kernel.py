"""The LoopAttention op, three ways: the exported ONNX function body (run by ONNX Runtime), a
plain torch reference (float64, position by position), and the Triton kernel (on a CUDA device,
or on the CPU under TRITON_INTERPRET=1 where triton is installed). Both cache forms: appended
(kv_buffer 0) and written in place into a buffer (kv_buffer 1). The kernel is also compiled
ahead of time to PTX, as the TensorRT plugin does, which needs no GPU."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from serving import HANG

CASES = [  # (first_loop, rows, S, P before the call, ring length W, window)
    (0, 2, 1, 9, 3, 3),     # decode, L = 2, ring full
    (0, 3, 1, 5, 1, 3),     # decode, L = 3, ring still filling
    (0, 2, 1, 0, 0, 64),    # decode of the first token
    (0, 1, 6, 4, 0, 3),     # prefill, loop 0 (no ring rows)
    (1, 1, 6, 10, 3, 3),    # prefill, loop 1, chunk after 4 tokens (cache already holds the chunk)
    (1, 1, 5, 5, 0, 64),    # prefill, loop 1, first chunk, wide window
    (0, 2, 1, 70, 3, 3),    # a cache longer than one block of the kernel (64 keys)
]
H, HKV, D = 4, 2, 16
SPARE = 3  # buffer positions beyond what the call needs: NaN, which the op must never read


def inputs(first_loop, R, S, P, W, window, kv_buffer=0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n0 = 1 if first_loop == 0 else 0
    pos0 = P if n0 else P - S  # loop >= 1 rows: loop 0 already wrote the chunk
    rr = R - n0
    cache = P + (n0 * S + SPARE if kv_buffer else 0)
    t = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    past_k, past_v = t(1, HKV, cache, D), t(1, HKV, cache, D)
    if kv_buffer:  # positions the cache holds: pos0 + S (loop >= 1) or pos0 before the write
        past_k[:, :, P:], past_v[:, :, P:] = float("nan"), float("nan")
    return dict(query=t(R, 1, H, S, D), key=t(R, 1, HKV, S, D), value=t(R, 1, HKV, S, D),
                past_key=past_k, past_value=past_v, ring_key=t(rr, 1, HKV, W, D),
                ring_value=t(rr, 1, HKV, W, D), gate=torch.rand(rr, 1, H, S, generator=g).to(dtype),
                pos0=torch.tensor(pos0)), \
        dict(first_loop=first_loop, window=window, scale=D ** -0.5, kv_buffer=kv_buffer)


def _as_f64(x):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}


def max_diff(got, want) -> float:
    """max |got - want|, NaN where both are NaN counting as equal (a buffer's unused positions)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    both = np.isnan(got) & np.isnan(want)
    d = np.abs(np.where(both, 0, got - want))
    return float(np.where(np.isnan(d), np.inf, d).max()) if d.size else 0.0


@pytest.mark.parametrize("kv_buffer", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_reference_equals_the_exported_function(case, kv_buffer):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from pltkit.export.loop_attention import DOMAIN, INPUTS, OP, OUTPUTS, VERSION, function_proto
    from pltkit.gpu.loop_attention_ref import reference

    x, attrs = inputs(*case, kv_buffer=kv_buffer)
    node = helper.make_node(OP, INPUTS, OUTPUTS, domain=DOMAIN, **attrs)
    vi = [helper.make_tensor_value_info(n, TensorProto.INT64, []) if n == "pos0" else
          helper.make_tensor_value_info(n, TensorProto.FLOAT, list(x[n].shape)) for n in INPUTS]
    graph = helper.make_graph([node], "op", vi, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                 for n in OUTPUTS])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, VERSION)],
                              functions=[function_proto(21)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in x.items()})
    want = reference(*_as_f64(x).values(), **attrs)
    diffs = [max_diff(g, w.numpy()) for g, w in zip(got, want)]
    print(case, f"kv_buffer {kv_buffer}", "max|diff| per output", [f"{d:.1e}" for d in diffs])
    assert all(g.shape == tuple(w.shape) for g, w in zip(got, want)) and max(diffs) < 1e-5


def _triton():
    # without CUDA, conftest.py has set TRITON_INTERPRET=1 (the interpreter: numpy on the CPU)
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    pytest.importorskip("triton", reason="triton is not installed")
    from pltkit.gpu import triton_loop_attention
    return triton_loop_attention


DTYPES = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # float32 math inside the kernel


@pytest.mark.parametrize("kv_buffer", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_equals_reference(case, kv_buffer):
    k = _triton()
    from pltkit.gpu.loop_attention_ref import reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = list(DTYPES) if device == "cuda" or case == CASES[0] else [torch.float32]  # the interpreter is slow
    for dtype in dtypes:
        x, attrs = inputs(*case, kv_buffer=kv_buffer, seed=1, dtype=dtype)
        want = reference(*_as_f64(x).values(), **attrs)
        dev = {n: v.to(device) for n, v in x.items()}
        got = k.loop_attention(*dev.values(), **attrs)
        if kv_buffer:  # the present cache is the past buffer, written in place
            assert got[1] is dev["past_key"] and got[2] is dev["past_value"]
        diff = max_diff(got[0].double().cpu(), want[0])
        print(case, f"kv_buffer {kv_buffer}", device, dtype, f"output max|diff| {diff:.1e}")
        assert diff < DTYPES[dtype]
        for g, w in zip(got[1:], want[1:]):  # cache and rings: copies, exact (unused positions stay NaN)
            assert g.shape == w.shape and max_diff(g.double().cpu(), w) == 0


def test_kernel_compiles_ahead_of_time_to_ptx_for_tensorrt(tmp_path):
    """What the AOT plugin hands TensorRT: PTX whose entry takes the op's 9 inputs, 7 int32
    scalars and 5 outputs in that order, and nothing else (Triton's two trailing scratch pointers,
    which TensorRT does not pass, are cut: the kernel uses no scratch memory). ptxas, Triton's own,
    must still assemble it for sm_90a. Compiled in a process without TRITON_INTERPRET (which turns
    kernels into Python functions); no GPU needed."""
    pytest.importorskip("triton", reason="triton is not installed")
    code = """if 1:
        import json, sys
        from pltkit.gpu.triton_loop_attention import aot_ptx, compile_ptx
        from triton.backends.nvidia.compiler import get_ptxas
        out = {"ptxas": get_ptxas(90).path}
        for kv_buffer, first_loop, dtype, ptx in ((1, 0, "float16", None), (1, 1, "bfloat16", 84), (0, 0, "float32", None)):
            k = compile_ptx(dtype, first_loop=first_loop, window=64, scale=0.088, head_dim=128,
                            kv_buffer=kv_buffer, capability=(9, 0), ptx_version=ptx)
            m = k.metadata
            out[f"{kv_buffer}-{first_loop}-{dtype}"] = dict(name=m.name, triton_ptx=k.asm["ptx"], ptx=aot_ptx(k),
                                                          warps=m.num_warps, shared=m.shared)
        json.dump(out, open(sys.argv[1], "w"))
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ptx.json")], check=True, env=env, timeout=HANG)
    compiled = json.loads((tmp_path / "ptx.json").read_text())
    ptxas = compiled.pop("ptxas")
    for variant, k in compiled.items():
        params = {}
        for key in ("triton_ptx", "ptx"):
            entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", k[key], re.S)
            assert entry.group(1) == k["name"] and ".target sm_90" in k[key]
            params[key] = re.findall(r"\.param\s+\.(\w+)", entry.group(2))
        print(variant, k["name"], f"{len(params['triton_ptx'])} params from Triton, {len(params['ptx'])} for "
              f"TensorRT, {k['warps']} warps, {k['shared']} bytes shared, PTX {len(k['ptx'])} chars")
        assert params["ptx"] == ["u64"] * 9 + ["u32"] * 7 + ["u64"] * 5
        assert params["triton_ptx"][:21] == params["ptx"] and k["warps"] == 4
        (tmp_path / f"{variant}.ptx").write_text(k["ptx"])
        subprocess.run([ptxas, "-arch=sm_90a", str(tmp_path / f"{variant}.ptx"), "-o", str(tmp_path / "k.cubin")],
                       check=True, capture_output=True, timeout=HANG)
    assert ".version 8.4" in compiled["1-1-bfloat16"]["ptx"]  # capped for an older driver


@pytest.mark.gpu
@pytest.mark.parametrize("kv_buffer", [0, 1])
def test_ahead_of_time_ptx_launched_as_tensorrt_does_equals_reference(kv_buffer):
    """The PTX the AOT plugin gives TensorRT, for this GPU and driver, launched through the driver
    API with the plugin's argument layout and grid, against the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ptx_launch import launch

    from pltkit.gpu import trt_plugin
    from pltkit.gpu.loop_attention_ref import reference
    from pltkit.gpu.triton_loop_attention import aot_ptx, compile_ptx, programs
    from pltkit.model.formats import FLOAT_TYPES

    names = {getattr(torch, n): n for n in FLOAT_TYPES}
    for case in CASES:
        for dtype in (torch.float16, torch.bfloat16):  # the engines' types (float32: the JIT test above)
            x, attrs = inputs(*case, kv_buffer=kv_buffer, seed=2, dtype=dtype)
            want = reference(*_as_f64(x).values(), **attrs)
            dev = {n: v.cuda().contiguous() for n, v in x.items()}
            out = [torch.empty(tuple(w.shape), dtype=dtype, device="cuda") for w in want]
            if kv_buffer:  # the present cache aliases the past buffer
                out[1], out[2] = dev["past_key"], dev["past_value"]
            kernel = compile_ptx(names[dtype], **attrs, head_dim=D, ptx_version=trt_plugin.driver_ptx_version())
            ptx = aot_ptx(kernel)  # exactly the 21 parameters TensorRT passes
            R, B, _, S, _ = x["query"].shape
            C, W = x["past_key"].shape[2], x["ring_key"].shape[3]
            grid = programs(R, B, H, HKV, S, C, n0=int(attrs["first_loop"] == 0), kv_buffer=bool(kv_buffer))
            launch(ptx, kernel.metadata.name, grid, kernel.metadata.num_warps * 32, kernel.metadata.shared,
                   [t.data_ptr() for t in dev.values()], (R, B, H, HKV, S, C, W), [t.data_ptr() for t in out],
                   torch.cuda.current_stream().cuda_stream)
            torch.cuda.synchronize()
            diff = max_diff(out[0].double().cpu(), want[0])
            print(case, f"kv_buffer {kv_buffer}", dtype, f"AOT PTX output max|diff| {diff:.1e}")
            assert diff < DTYPES[dtype]
            for g, w in zip(out[1:], want[1:]):
                assert g.shape == w.shape and max_diff(g.double().cpu(), w) == 0
