"""Which ONNX Runtime CPU op pays least for a second row of an int8-weight linear layer.

PLT-2 decodes its two loops as two rows of one pass, so each quantized linear layer runs with M = 2
instead of M = 1 reading the same weights. This times graphs of NODES such layers (K 2048, N 5632,
weights larger than a 300 MB L3) at M = 1..3 rows, interleaved, medians, for each candidate op:

    nbits8-acc{4,1,0}  com.microsoft.MatMulNBits bits 8, block 32 (pltkit's int8 is accuracy_level 4)
    nbits8-acc4-b{128,2048}  the same with larger blocks (2048 = K: one scale per column)
    nbits4-acc4        com.microsoft.MatMulNBits bits 4, block 32 (pltkit's int4)
    dqmm               com.microsoft.DynamicQuantizeMatMul: A float, B int8 [K, N], per-column b_scale
    dql-mmi            DynamicQuantizeLinear + MatMulInteger + Cast + Mul (a_scale * b_scale)
    dql-mmitf          DynamicQuantizeLinear + com.microsoft.MatMulIntegerToFloat
    f32                MatMul on float32 weights (16 nodes: the same 738 MB as 64 int8 layers)

The fusions that would turn dql-mmi / dql-mmitf into DynamicQuantizeMatMul, and the common
subexpression elimination that would share one DynamicQuantizeLinear among all layers, are off, so
each layer quantizes its own input as it would in a model. Weight codes are random (timing does
not depend on them); --numerics instead compares each op's output on real quantized weights with
the float64 product of its dequantized weights.

    python benchmarks/int8_ops.py [--threads 2] [--repeats 9] [--cpu-time] [--ops a,b] [--rows 1,2,3] [--together]
    python benchmarks/int8_ops.py --numerics
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_rows import graph_session  # noqa: E402

K, N, NODES, BLOCK = 2048, 5632, 64, 32
OFF = ["CommonSubexpressionElimination", "DynamicQuantizeMatMulFusion", "MatMulIntegerToFloatFusion"]
T = numpy_helper.from_array


def nbits(bits: int, level: int, block: int = BLOCK):
    def layer(i, x, w, k=K, n=N):  # w: None (random codes) or (packed, scales)
        if w is None:
            rng = np.random.default_rng(i)
            w = (rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8),
                 (rng.random((n, k // block), dtype=np.float32) * 1e-3))
        node = helper.make_node("MatMulNBits", [x, f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                K=k, N=n, bits=bits, block_size=block, accuracy_level=level)
        return [node], [T(w[0], f"w{i}"), T(w[1], f"s{i}")]
    return layer


def int8_weights(i, w, k, n):
    if w is not None:
        return w
    rng = np.random.default_rng(i)
    return rng.integers(-127, 128, (k, n), dtype=np.int8), rng.random(n, dtype=np.float32) * 1e-3


def dqmm(i, x, w, k=K, n=N):
    q, s = int8_weights(i, w, k, n)
    node = helper.make_node("DynamicQuantizeMatMul", [x, f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft")
    return [node], [T(q, f"w{i}"), T(s, f"s{i}")]


def dql_mmi(i, x, w, k=K, n=N):
    q, s = int8_weights(i, w, k, n)
    nodes = [helper.make_node("DynamicQuantizeLinear", [x], [f"xq{i}", f"xs{i}", f"xz{i}"]),
             helper.make_node("MatMulInteger", [f"xq{i}", f"w{i}", f"xz{i}"], [f"acc{i}"]),
             helper.make_node("Cast", [f"acc{i}"], [f"accf{i}"], to=TensorProto.FLOAT),
             helper.make_node("Mul", [f"xs{i}", f"s{i}"], [f"sc{i}"]),
             helper.make_node("Mul", [f"accf{i}", f"sc{i}"], [f"y{i}"])]
    return nodes, [T(q, f"w{i}"), T(s, f"s{i}")]


def dql_mmitf(i, x, w, k=K, n=N):
    q, s = int8_weights(i, w, k, n)
    nodes = [helper.make_node("DynamicQuantizeLinear", [x], [f"xq{i}", f"xs{i}", f"xz{i}"]),
             helper.make_node("MatMulIntegerToFloat", [f"xq{i}", f"w{i}", f"xs{i}", f"s{i}", f"xz{i}"],
                              [f"y{i}"], domain="com.microsoft")]
    return nodes, [T(q, f"w{i}"), T(s, f"s{i}")]


def f32(i, x, w, k=K, n=N):
    if w is None:
        w = (np.random.default_rng(i).standard_normal((k, n), dtype=np.float32) * 0.02,)
    return [helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"])], [T(w[0], f"w{i}")]


OPS = {"nbits8-acc4": (nbits(8, 4), NODES), "nbits8-acc1": (nbits(8, 1), NODES),
       "nbits8-acc0": (nbits(8, 0), NODES), "nbits8-acc4-b128": (nbits(8, 4, 128), NODES),
       "nbits8-acc4-b2048": (nbits(8, 4, K), NODES), "nbits4-acc4": (nbits(4, 4), NODES),
       "dqmm": (dqmm, NODES), "dql-mmi": (dql_mmi, NODES), "dql-mmitf": (dql_mmitf, NODES),
       "f32": (f32, NODES // 4)}


def session(layer, count: int, threads: int, spinning: bool, weights=None, k=K, n=N):
    nodes, inits = [], []
    for i in range(count):
        more_nodes, more_inits = layer(i, "x", weights, k, n)
        nodes += more_nodes
        inits += more_inits
    return graph_session(nodes, inits, count, k, threads, spinning, disabled_optimizers=OFF)


def time_ops(names: list[str], args) -> dict:
    """Median ms at each row count; with --together all sessions stay open and every repeat runs every
    op at every row count in turn (after one untimed call), so a neighbour's load falls on all alike."""
    clock = time.process_time if args.cpu_time else time.perf_counter
    rng = np.random.default_rng(1)
    rows = [int(m) for m in args.rows.split(",")]
    xs = {m: rng.standard_normal((m, K)).astype(np.float32) for m in rows}
    groups = [names] if args.together else [[name] for name in names]
    out = {}
    for group in groups:
        sessions, repeats = {}, {}
        for name in group:
            layer, count = OPS[name]
            sessions[name] = session(layer, count, args.threads, spinning=not args.cpu_time)
            t0 = time.perf_counter()
            sessions[name].run(None, {"x": xs[rows[0]]})  # warm-up
            repeats[name] = args.repeats if time.perf_counter() - t0 < 1 else 3  # seconds a call: out of the race
        times = {name: {m: [] for m in rows} for name in group}
        for r in range(max(repeats.values())):
            for name, s in sessions.items():
                if r < repeats[name] and args.together:
                    s.run(None, {"x": xs[rows[0]]})  # untimed: the previous session's threads may still spin
                for m in rows[r % len(rows):] + rows[:r % len(rows)]:  # each row count first in turn
                    if r < repeats[name]:
                        t0 = clock()
                        s.run(None, {"x": xs[m]})
                        times[name][m].append(clock() - t0)
        for name in group:
            ms = {m: statistics.median(t) * 1e3 for m, t in times[name].items()}
            first = times[name][rows[0]]  # the median of each repeat's own ratio: robust to slow spells
            paired = {m: statistics.median(t / f for t, f in zip(times[name][m], first)) for m in rows}
            out[name] = {"nodes": OPS[name][1], "repeats": repeats[name], "ms": ms,
                         "over_first": {m: ms[m] / ms[rows[0]] for m in rows}, "paired": paired}
            print(f"{name:17s} nodes {OPS[name][1]:2d}: " + "  ".join(
                f"M={m} {ms[m]:7.1f} ms ({ms[m] / ms[rows[0]]:.2f}x, paired {paired[m]:.2f}x)" for m in rows),
                flush=True)
        sessions.clear()
    return out


def numerics(args, n: int = 1024) -> dict:
    """Relative error (Frobenius) of each op's y against x @ W_deq (its own dequantized weights) and
    against x @ W (the float weights), for Gaussian rows and rows with a few large channels."""
    from dataclasses import replace

    from pltkit.quant.schemes import SCHEMES

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((K, n)) * 0.02).astype(np.float32)
    sch = SCHEMES["int8"]
    packed, scales = sch.pack(w)
    col = (np.abs(w).max(0) / 127).astype(np.float32)
    q = np.clip(np.round(w / col), -127, 127).astype(np.int8)
    cases = {"nbits8-acc4": (nbits(8, 4), (packed, scales), sch.dequantize(packed, scales, K)),
             "nbits8-acc0": (nbits(8, 0), (packed, scales), sch.dequantize(packed, scales, K)),
             "dqmm": (dqmm, (q, col), q * col), "dql-mmitf": (dql_mmitf, (q, col), q * col),
             "dql-mmi": (dql_mmi, (q, col), q * col)}
    for block in (128, K):  # pltkit's scheme with larger blocks
        big = replace(sch, block_size=block, full_range=block <= 256)  # the kernel packs blocks <= 256
        p, sc = big.pack(w)
        cases[f"nbits8-acc4-b{block}"] = (nbits(8, 4, block), (p, sc), big.dequantize(p, sc, K))
    x = rng.standard_normal((2, K)).astype(np.float32)
    xo = x.copy()
    xo[:, rng.choice(K, 8, replace=False)] *= 30  # outlier channels, as transformer activations have
    out = {}
    for name, (layer, weights, deq) in cases.items():
        s = session(layer, 1, args.threads, True, weights, K, n)
        row = {}
        for label, xx in (("gauss", x), ("outliers", xo)):
            y = s.run(None, {"x": xx})[0].astype(np.float64)
            exact, flt = xx.astype(np.float64) @ deq.astype(np.float64), xx.astype(np.float64) @ w
            row[label] = {"vs_dequantized": float(np.linalg.norm(y - exact) / np.linalg.norm(exact)),
                          "vs_float": float(np.linalg.norm(y - flt) / np.linalg.norm(flt))}
        out[name] = row
        print(f"{name:17s} " + "  ".join(f"{lab}: vs deq {r['vs_dequantized']:.2e} vs float {r['vs_float']:.2e}"
                                          for lab, r in row.items()), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time, spinning off (shared machines)")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated, from: " + ", ".join(OPS))
    ap.add_argument("--rows", default="1,2,3", help="row counts M to time, the first the baseline")
    ap.add_argument("--together", action="store_true",
                    help="open all the sessions at once and interleave the ops too (needs their memory at once)")
    ap.add_argument("--numerics", action="store_true", help="errors against the dequantized product instead")
    args = ap.parse_args(argv)
    if args.numerics:
        print(json.dumps({"numerics": numerics(args)}))
        return 0
    out = time_ops(args.ops.split(","), args)
    print(json.dumps({"threads": args.threads, "cpu_time": args.cpu_time, "together": args.together,
                      "K": K, "N": N, "ops": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
