"""pltkit's kernel library as of git revision REV against the working tree's, in one process, interleaved; ratios
new / old below 1 mean the working tree's is faster.

    python benchmarks/kernels_lib_ab.py REV                                       # StepAttention and RingMix alone
    python benchmarks/kernels_lib_ab.py REV --artifact DIR --contexts 256 4096    # whole decode steps

The ops run alone at the large shape (16 query and 4 kv heads of 128, window 64, D 2048) on more inputs than
the caches hold (StepAttention with 1 and 2 rows over 16 caches at --position; RingMix over 160 sets of its inputs,
62 MB; RowsMatMulNBits, int8 and int4, 1 and 2 rows, as 32 layers of the down projection or of --rows-shape K N),
one call of each library in turn, with ONNX Runtime's thread spinning off: with it on, the idle session's
spinning thread takes the second core from the other. Whole steps (--artifact) keep the spinning and alternate
blocks of steps (decode_ab's step_ms). REV's library is built from the files the working tree's is built from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pltkit.runtime import kernels

HEADS, KV, DH, WINDOW, D = 16, 4, 128, 64, 2048
I32, I64 = {"seqlens_k": TensorProto.INT32, "total": TensorProto.INT32}, {"position_ids": TensorProto.INT64}


def build(rev: str, out: Path) -> Path:
    """The library built from REV's kernel sources (those of today's that REV has), as the runtime builds it."""
    src = out / rev
    src.mkdir(parents=True, exist_ok=True)
    sources = []
    for f in (*kernels.SOURCES, *kernels.HEADERS):
        got = subprocess.run(["git", "show", f"{rev}:pltkit/runtime/kernels/{f.name}"], capture_output=True,
                             text=True, cwd=kernels.HERE)
        if got.returncode == 0:
            (src / f.name).write_text(got.stdout)
            sources += [src / f.name] if f in kernels.SOURCES else []
    lib = src / "lib.so"
    subprocess.run([kernels.compiler(), *kernels.FLAGS, *map(str, sources), "-o", str(lib), "-lm"], check=True)
    return lib


def model(op: str, inputs: list[str], outputs: list[str], **attrs):
    types = {**I32, **I64}
    node = helper.make_node(op, inputs, outputs, domain=kernels.DOMAIN, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None)
                                            for n in inputs if n],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(kernels.DOMAIN, 1)],
                             ir_version=10)


def rotary(positions: int) -> dict:
    angles = np.arange(positions)[:, None] * 10000.0 ** (-np.arange(DH // 2) / (DH // 2))
    return {"cos_cache": np.cos(angles).astype(np.float32), "sin_cache": np.sin(angles).astype(np.float32)}


def step_case(rows: int, pos0: int, sets: int):
    """StepAttention: a token at pos0, each set its own cache (bound as past and present: written in place)."""
    n, rng = rows * HEADS // KV, np.random.default_rng(0)
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total", "", "cos_cache", "sin_cache",
             "position_ids"]
    m = model(kernels.STEP, names, ["y", "present_key", "present_value"], num_heads=HEADS, kv_num_heads=KV,
              scale=DH ** -0.5)
    shared = {"query": rng.normal(size=(rows, 1, 1, HEADS * DH)), "key": rng.normal(size=(rows, 1, 1, KV * DH)),
              "value": rng.normal(size=(rows, 1, 1, KV * DH)), **rotary(pos0 + 2)}
    shared = {k: v.astype(np.float32) for k, v in shared.items()}
    shared.update(seqlens_k=np.array([pos0 + n - 1], np.int32), total=np.array(pos0 + n, np.int32),
                  position_ids=np.full((1, n), pos0, np.int64))
    caches = [{k: rng.normal(size=(1, KV, pos0 + n, DH)).astype(np.float32) for k in ("past_key", "past_value")}
              for _ in range(sets)]
    return m, shared, caches, {"past_key": "present_key", "past_value": "present_value"}


def ring_case(rows: int, sets: int):
    """RingMix with the hidden-state gate: full rings, each set its own inputs; the gate's norm and weights are
    initializers (as in exported graphs), one pair for all sets."""
    rng = np.random.default_rng(0)
    names = ["query", "key", "value", "global", "ring_key", "ring_value", "", "seqlens_k", "total", "cos_cache",
             "sin_cache", "position_ids", "hidden", "gate_norm", "gate_weight", "gate_bias"]
    m = model(kernels.RING_MIX, names, ["y", "ring_key_out", "ring_value_out"], num_heads=HEADS, kv_num_heads=KV,
              window=WINDOW, scale=DH ** -0.5, epsilon=1e-6)
    weights = {"gate_norm": rng.normal(size=D).astype(np.float32),
               "gate_weight": rng.normal(size=(D, HEADS)).astype(np.float32)}
    inputs = [i for i in m.graph.input if i.name not in weights]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    m.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in weights.items())
    shapes = {"query": (rows, 1, 1, HEADS * DH), "key": (rows, 1, 1, KV * DH), "value": (rows, 1, 1, KV * DH),
              "global": (rows, 1, 1, HEADS * DH), "hidden": (rows, 1, 1, D), "gate_bias": (HEADS,),
              "ring_key": (rows - 1, 1, KV, WINDOW, DH), "ring_value": (rows - 1, 1, KV, WINDOW, DH)}
    shared = {**rotary(WINDOW + 8), "seqlens_k": np.array([WINDOW], np.int32), "total": np.array(WINDOW + 1, np.int32),
              "position_ids": np.array([[WINDOW + 4]], np.int64)}
    per_set = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(sets)]
    return m, shared, per_set, {}


def rows_case(form: str, rows: int, k: int = 5632, n: int = 2048, nodes: int = 32):
    """RowsMatMulNBits: `nodes` layers of K x N (the large shape's down projection; 369 MB at int8, beyond the L3),
    all reading one input of `rows` rows."""
    from matmul_rows import layers, rows_model  # benchmarks/ is the script's folder

    from pltkit.quant.schemes import SCHEMES
    m = rows_model(*layers(SCHEMES[form], k, n, nodes), nodes, k)
    assert kernels.rows_graph(m) == nodes
    return m, {}, [{"x": np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)}], {}


def op_ab(libs: list[Path], case, rounds: int) -> dict:
    m, shared, per_set, in_place = case
    runs, kept = [], []  # kept: the cache buffers bound, alive as long as their bindings
    for lib in libs:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.register_custom_ops_library(str(lib))
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        bindings = []
        for own in per_set:
            io = sess.io_binding()
            for name, a in {**shared, **own}.items():
                if name in in_place:  # the cache buffer, shared by past and present
                    v = ort.OrtValue.ortvalue_from_numpy(a.copy())
                    kept.append(v)
                    io.bind_ortvalue_input(name, v)
                    io.bind_ortvalue_output(in_place[name], v)
                else:
                    io.bind_cpu_input(name, a)
            for o in m.graph.output:
                if o.name not in in_place.values():
                    io.bind_output(o.name)
            bindings.append(io)
        runs.append((sess, bindings))
    us = [[], []]
    for r in range(rounds):
        for i in range(len(per_set)):
            for k in ((0, 1) if (r + i) % 2 else (1, 0)):
                sess, bindings = runs[k]
                start = time.perf_counter()
                sess.run_with_iobinding(bindings[i])
                us[k].append((time.perf_counter() - start) * 1e6)
    pairs = np.array(us[1]) / np.array(us[0])
    old, new = statistics.median(us[0]), statistics.median(us[1])
    return {"old_us": round(old, 1), "new_us": round(new, 1), "new_over_old": round(new / old, 3),
            "pairs_quartiles": [round(float(q), 3) for q in np.percentile(pairs, [25, 50, 75])]}


def step_ab(libs: list[Path], artifact: Path, contexts: list[int], rounds: int) -> dict:
    from decode_ab import prefilled, step_ms  # benchmarks/ is the script's folder

    from pltkit.runtime.artifact import Artifact
    from pltkit.runtime.ort_backend import OrtBackend
    backends = []
    for lib in libs:
        kernels.library = lambda lib=lib: lib  # the session opened next registers this build
        backends.append(OrtBackend(Artifact.open(artifact), 2, kernels="pltkit"))
    ids = np.random.default_rng(0).integers(10, backends[0].config.vocab_size, (1, max(contexts)))
    out = {}
    for ctx in contexts:
        states = [prefilled(b, ids[:, :ctx], 64) for b in backends]
        ms = [[], []]
        for r in range(rounds):
            for k in ((0, 1) if r % 2 else (1, 0)):
                ms[k].append(step_ms(backends[k], states[k], 16))
        old, new, pairs = statistics.median(ms[0]), statistics.median(ms[1]), np.array(ms[1]) / np.array(ms[0])
        out[ctx] = {"old_ms": round(old, 3), "new_ms": round(new, 3), "new_over_old": round(new / old, 3),
                    "pairs_quartiles": [round(float(q), 3) for q in np.percentile(pairs, [25, 50, 75])]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the git revision of the old library")
    ap.add_argument("--artifact", type=Path, help="time whole decode steps of this artifact instead of the ops")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--position", type=int, default=4096, help="StepAttention's token position")
    ap.add_argument("--rounds", type=int, default=None, help="default: 60 over the ops' inputs, 11 blocks of steps")
    ap.add_argument("--rows-shape", type=int, nargs=2, default=(5632, 2048), metavar=("K", "N"),
                    help="RowsMatMulNBits' layers (default: the large shape's down projection)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build(args.rev, Path(tmp)), kernels.library()]
        if args.artifact:
            result = {"steps": step_ab(libs, args.artifact, args.contexts, args.rounds or 11)}
        else:
            rounds = args.rounds or 60
            result = {f"step_attention_{r}_rows": op_ab(libs, step_case(r, args.position, 16), rounds) for r in (1, 2)}
            result["ring_mix"] = op_ab(libs, ring_case(2, 160), rounds // 10 or 1)
            for form, r in itertools.product(("int8", "int4"), (1, 2)):
                case = rows_case(form, r, *args.rows_shape)
                result[f"rows_matmul_{form}_{r}_rows"] = op_ab(libs, case, rounds // 4 or 1)
    for name, r in result.items():
        print(f"{name}: {r}")
    print(json.dumps({"rev": args.rev, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
