"""What a second row costs ONNX Runtime's MatMulNBits: the floor under PLT-2 / plain decode.

PLT-2 decodes its two loops as two rows of one pass, so every quantized linear layer runs with
M = 2 instead of M = 1 while reading the same weights. This times a graph of 64 MatMulNBits nodes
(K 2048, N 5632: the large benchmark shape's MLP layers; 738 MB of int8 and 369 MB of int4 weights,
more than a 300 MB L3 holds) at M = 1..4 rows, int8 and int4 (pltkit's schemes: block 32,
accuracy_level 4), interleaved, medians. Prints a table, then one JSON line.

    python benchmarks/matmul_rows.py [--threads 2] [--repeats 15] [--cpu-time] [--block-size 128]
    python benchmarks/matmul_rows.py --k 768 --n 2048 --nodes 24   # the medium shape's MLP: weights in a 300 MB L3
    python benchmarks/matmul_rows.py --kernels both --cpu-time     # ONNX Runtime's kernel and pltkit's, alike

--cpu-time measures process CPU time with ONNX Runtime's thread spinning off, which is stable on
a machine that other work shares (wall time is not); without it, wall time with spinning on, as
the runtime runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from pltkit.quant.schemes import SCHEMES

K, N, NODES, ROWS = 2048, 5632, 64, (1, 2, 3, 4)


def rows_model(nodes, inits, count: int, k: int):
    """The model of nodes that read input x [M, k] and write outputs y0..y{count-1}."""
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(count)]
    graph = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def graph_session(nodes, inits, count: int, k: int, threads: int, spinning: bool, own_kernels: bool = False, **kw):
    """An ONNX Runtime CPU session of rows_model(nodes, ...); with own_kernels, the MatMulNBits nodes that
    pltkit's kernel computes run on it."""
    import onnxruntime as ort

    model = rows_model(nodes, inits, count, k)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if own_kernels:
        from pltkit.runtime import kernels

        assert kernels.rows_graph(model) == count
        so.register_custom_ops_library(str(kernels.library()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"], **kw)


def layers(scheme, k: int, n: int, count: int) -> tuple[list, list]:
    """(nodes, initializers): `count` MatMulNBits layers of random K x N weights packed by `scheme`, each reading
    input x and writing y0, y1, ..."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for i in range(count):
        packed, scales = scheme.pack((rng.standard_normal((k, n)) * 0.02).astype(np.float32))
        inits += [numpy_helper.from_array(packed, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=scheme.bits, block_size=scheme.block_size,
                                      accuracy_level=scheme.accuracy_level))
    return nodes, inits


def session(scheme, threads: int, spinning: bool, k: int = K, n: int = N, count: int = NODES, own_kernels=False):
    nodes, inits = layers(scheme, k, n, count)
    return graph_session(nodes, inits, count, k, threads, spinning, own_kernels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time, spinning off (shared machines)")
    ap.add_argument("--block-size", type=int, default=None, help="weights per scale (default: the schemes', 32)")
    ap.add_argument("--k", type=int, default=K, help="inputs of a layer")
    ap.add_argument("--n", type=int, default=N, help="outputs of a layer")
    ap.add_argument("--nodes", type=int, default=NODES, help="layers in the graph")
    ap.add_argument("--kernels", choices=["ort", "pltkit", "both"], default="ort",
                    help="ONNX Runtime's MatMulNBits, pltkit's RowsMatMulNBits, or both side by side")
    args = ap.parse_args(argv)
    clock = time.process_time if args.cpu_time else time.perf_counter
    rng, out = np.random.default_rng(1), {}
    kernel_sets = {"ort": ["ort"], "pltkit": ["pltkit"], "both": ["ort", "pltkit"]}[args.kernels]
    for form, kernels in itertools.product(("int8", "int4"), kernel_sets):
        scheme = SCHEMES[form] if args.block_size is None else dataclasses.replace(SCHEMES[form],
                                                                                  block_size=args.block_size)
        s = session(scheme, args.threads, not args.cpu_time, args.k, args.n, args.nodes, kernels == "pltkit")
        xs = {m: rng.standard_normal((m, args.k)).astype(np.float32) for m in ROWS}
        times = {m: [] for m in ROWS}
        for _ in range(args.repeats):
            for m, x in xs.items():
                start = clock()
                s.run(None, {"x": x})
                times[m].append(clock() - start)
        ms = {m: statistics.median(t) * 1e3 for m, t in times.items()}
        name = form if kernels == "ort" else f"{form}-pltkit"
        out[name] = {"ms": ms, "over_one_row": {m: ms[m] / ms[1] for m in ROWS}}
        print(f"{name}: " + "  ".join(f"M={m} {ms[m]:.2f} ms ({ms[m] / ms[1]:.2f}x)" for m in ROWS), flush=True)
        del s  # its weights, before the next session's
    print(json.dumps({"threads": args.threads, "cpu_time": args.cpu_time, "block_size": args.block_size or 32,
                      "nodes": args.nodes, "K": args.k, "N": args.n, **out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
