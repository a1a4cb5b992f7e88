"""The LoopAttention op, three ways: the exported ONNX function body (run by ONNX Runtime), a
plain torch reference (float64, position by position), and the Triton kernel (on a CUDA device,
or on the CPU under TRITON_INTERPRET=1 where triton is installed)."""

import os

import numpy as np
import pytest
import torch

CASES = [  # (first_loop, rows, S, P before the call, ring length W, window)
    (0, 2, 1, 9, 3, 3),     # decode, L = 2, ring full
    (0, 3, 1, 5, 1, 3),     # decode, L = 3, ring still filling
    (0, 2, 1, 0, 0, 64),    # decode of the first token
    (0, 1, 6, 4, 0, 3),     # prefill, loop 0 (no ring rows)
    (1, 1, 6, 10, 3, 3),    # prefill, loop 1, chunk after 4 tokens (cache already holds the chunk)
    (1, 1, 5, 5, 0, 64),    # prefill, loop 1, first chunk, wide window
]
H, HKV, D = 4, 2, 16


def inputs(first_loop, R, S, P, W, window, seed=0):
    g = torch.Generator().manual_seed(seed)
    n0 = 1 if first_loop == 0 else 0
    pos0 = P if n0 else P - S  # loop >= 1 rows: loop 0 already wrote the chunk
    rr = R - n0
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(query=t(R, 1, H, S, D), key=t(R, 1, HKV, S, D), value=t(R, 1, HKV, S, D),
                past_key=t(1, HKV, P, D), past_value=t(1, HKV, P, D), ring_key=t(rr, 1, HKV, W, D),
                ring_value=t(rr, 1, HKV, W, D), gate=torch.rand(rr, 1, H, S, generator=g), pos0=pos0), \
        dict(first_loop=first_loop, window=window, scale=D ** -0.5)


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_the_exported_function(case):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from pltkit.export.loop_attention import DOMAIN, INPUTS, OP, OUTPUTS, function_proto
    from pltkit.gpu.loop_attention_ref import reference

    x, attrs = inputs(*case)
    node = helper.make_node(OP, INPUTS, OUTPUTS, domain=DOMAIN, **attrs)
    vi = [helper.make_tensor_value_info(n, TensorProto.INT64, []) if n == "pos0" else
          helper.make_tensor_value_info(n, TensorProto.FLOAT, list(x[n].shape)) for n in INPUTS]
    graph = helper.make_graph([node], "op", vi, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                 for n in OUTPUTS])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                              functions=[function_proto(21)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {k: (np.array(v, np.int64) if k == "pos0" else v.numpy()) for k, v in x.items()}
    got = sess.run(None, feed)
    want = reference(*x.values(), **attrs)
    diffs = [float(np.abs(g - w.numpy()).max()) if g.size else 0.0 for g, w in zip(got, want)]
    print(case, "max|diff| per output", [f"{d:.1e}" for d in diffs])
    assert all(g.shape == tuple(w.shape) for g, w in zip(got, want)) and max(diffs) < 1e-5


def _triton():
    # without CUDA, conftest.py has set TRITON_INTERPRET=1 (the interpreter: numpy on the CPU)
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    pytest.importorskip("triton", reason="triton is not installed")
    from pltkit.gpu import triton_loop_attention
    return triton_loop_attention


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_equals_reference(case):
    k = _triton()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, attrs = inputs(*case, seed=1)
    dev = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in x.items()}
    from pltkit.gpu.loop_attention_ref import reference

    got = k.loop_attention(*dev.values(), **attrs, block_n=4)  # several key blocks even on tiny caches
    want = reference(*x.values(), **attrs)
    diff = float((got[0].double().cpu() - want[0]).abs().max())
    print(case, device, f"output max|diff| {diff:.1e}")
    assert diff < 1e-4  # float32 kernel against float64
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g.cpu(), w)
