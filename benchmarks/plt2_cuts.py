"""Where PLT-2's decode step spends its time over plain's, by cutting pieces out of its graph.

ONNX Runtime's profiler cannot say: it slows some kernels more than others (on the medium shape it put
PLT-2 at 1.03-1.08x plain where unprofiled steps take 1.3-1.4x). So this times the PLT-2 decode graph as
exported and with one piece cut at a time, beside the plain artifact of the same weights, interleaved,
medians of ms per step. The cut graphs compute wrong numbers; only their time means anything.

- "no RingMix": each RingMix node (the rows of loops >= 1 over their rings, and their mix with the global
  call's output) becomes its query passed through and its past ring with the last position repeated (a
  Slice, a Concat and a Slice per ring), so the rings keep their shapes.
- "gate a constant": each RingMix node's gate input is 0.5, and the nodes that computed it are gone (a query-mode
  gate's; a float32 graph's hidden-state gate is computed inside RingMix, and this cut leaves it).
- "one row per MatMulNBits": each decoder layer's MatMulNBits reads the first row only and its output
  is repeated (a Slice and a Concat per node): what the second row costs, less those two small nodes.
- "plain, two rows per MatMulNBits": the converse on the plain graph (its row twice in, the first row out):
  what a second row costs a plain step.

    python benchmarks/plt2_cuts.py PLT2_ARTIFACT PLAIN_ARTIFACT [--context 256] [--steps 16] [--rounds 21] [--threads 2]
    python benchmarks/plt2_cuts.py PLT2_ARTIFACT PLAIN_ARTIFACT --cpu-time [--kernels pltkit]

--cpu-time measures the process's CPU time with ONNX Runtime's thread spinning off, which other work on a
shared machine disturbs much less than wall time; without it, wall time with spinning on, as the runtime runs.
Prints a line per graph, then one JSON line. The cut graphs live in temporary folders beside the artifacts;
each graph runs as a decode session swapped into its artifact's one backend, from one prefilled state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pltkit.runtime import kernels
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.ort_backend import OrtBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ab import prefilled, step_ms  # noqa: E402


def _ints(graph, **values):
    for name, v in values.items():
        graph.initializer.append(numpy_helper.from_array(np.array([v], np.int64), f"cut.{name}"))


def no_ring_mix(graph):
    nodes = []
    for n in graph.node:
        if n.op_type != "RingMix":
            nodes.append(n)
            continue
        window = next(a.i for a in n.attribute if a.name == "window")
        nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]]))
        for past, present in ((n.input[4], n.output[1]), (n.input[5], n.output[2])):
            nodes += [helper.make_node("Slice", [past, "cut.minus1", "cut.end", "cut.three"], [present + ".last"]),
                      helper.make_node("Concat", [past, present + ".last"], [present + ".all"], axis=3),
                      helper.make_node("Slice", [present + ".all", f"cut.window{window}", "cut.end", "cut.three"],
                                       [present])]
        if not any(t.name == f"cut.window{window}" for t in graph.initializer):
            _ints(graph, **{f"window{window}": -window if window else 2**40})  # window 0: keep none
    del graph.node[:]
    graph.node.extend(nodes)
    _ints(graph, minus1=-1, end=2**40, three=3)


def no_gate(graph):
    """Each RingMix node's gate input a constant (0.5), and the nodes that made it gone. (A float32 graph's
    hidden-state gate is RingMix's own: there is no gate input to cut.)"""
    heads = next(a.i for n in graph.node if n.op_type == "RingMix" for a in n.attribute if a.name == "num_heads")
    graph.initializer.append(numpy_helper.from_array(np.full((1, 1, heads, 1), 0.5, np.float32), "cut.gate"))
    for n in graph.node:
        if n.op_type == "RingMix" and n.input[6]:
            n.input[6] = "cut.gate"
    kernels.prune(graph)


def _wrap_layer_matmuls(graph, before, after):
    """Each decoder layer's MatMulNBits between before(input, new input) and after(new output, output); one
    before() per input (int4-asym's block sums read the same x as its product)."""
    nodes, wrapped = [], set()
    for n in graph.node:
        if n.op_type == "MatMulNBits" and "/layers." in n.name:
            x, out = n.input[0], n.output[0]
            n.input[0], n.output[0] = x + ".cut", out + ".cut"
            nodes += [before(x, x + ".cut")] if x not in wrapped else []
            nodes += [n, after(out + ".cut", out)]
            wrapped.add(x)
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    _ints(graph, zero=0, one=1)


def _first_row(x, y):
    return helper.make_node("Slice", [x, "cut.zero", "cut.one", "cut.zero"], [y])


def _twice(x, y):
    return helper.make_node("Concat", [x, x], [y], axis=0)


def one_row_matmuls(graph):
    _wrap_layer_matmuls(graph, _first_row, _twice)


def two_row_matmuls(graph):
    _wrap_layer_matmuls(graph, _twice, _first_row)


# name -> (the graph it cuts, the cut)
CUTS = {"PLT-2, no RingMix": ("PLT-2", no_ring_mix), "PLT-2, gate a constant": ("PLT-2", no_gate),
        "PLT-2, one row per MatMulNBits": ("PLT-2", one_row_matmuls),
        "plain, two rows per MatMulNBits": ("plain", two_row_matmuls)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plt2")
    ap.add_argument("plain")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time, thread spinning off")
    ap.add_argument("--kernels", choices=["ort", "pltkit"], default="ort",
                    help="the MatMulNBits kernels of every decode graph: ONNX Runtime's, or pltkit's where they apply")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    plt2, plain = Artifact.open(args.plt2), Artifact.open(args.plain)
    if plt2.config.plt_num_loops != 2 or plain.config.plt_num_loops != 1:
        ap.error("give a PLT-2 artifact, then the plain artifact of the same weights")

    def session(graph: Path):
        """A decode session of `graph`, every one made alike here (the whole graphs' too)."""
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0" if args.cpu_time else "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")  # (as the runtime's: OrtBackend._options)
        if args.kernels == "ort":
            return ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        model = kernels.kernel_model(graph).model
        kernels.load_into(so, graph.parent)
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    clock = time.process_time if args.cpu_time else time.perf_counter
    # one backend and one prefilled state per artifact; each graph is a decode session swapped in to time it
    arts = {"plain": plain, "PLT-2": plt2}
    backends = {k: OrtBackend(a, args.threads, kernels="ort") for k, a in arts.items()}  # for prefill only
    sources = {k: a.graph_path("decode", backends[k].attention) for k, a in arts.items()}
    graphs = {k: (k, session(sources[k])) for k in arts}  # name -> (its artifact, its decode session)
    with contextlib.ExitStack() as stack:
        for name, (k, cut) in CUTS.items():
            # beside the artifact, its weights hard-linked: ONNX Runtime refuses external data through a symlink
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".pltkit-cuts-",
                                                                         dir=arts[k].path.resolve().parent)))
            (folder / "weights.bin").hardlink_to(arts[k].path.resolve() / "weights.bin")
            model = onnx.load(sources[k], load_external_data=False)
            cut(model.graph)
            onnx.save(model, folder / "decode.onnx")
            graphs[name] = (k, session(folder / "decode.onnx"))
        ids = np.random.default_rng(0).integers(10, min(4000, plt2.config.vocab_size), (1, args.context))
        states = {k: prefilled(b, ids, args.steps + 1) for k, b in backends.items()}
        times = {n: [] for n in graphs}
        for r in range(args.rounds):
            for n in (list(graphs) if r % 2 == 0 else list(graphs)[::-1]):
                k, backends[k].sessions["decode"] = graphs[n]
                times[n].append(step_ms(backends[k], states[k], args.steps, clock))
    ms = {n: statistics.median(t) for n, t in times.items()}
    for n, v in ms.items():
        whole = graphs[n][0]  # the graph it was cut from
        print(f"{n:>36}: {v:6.2f} ms  ({v / ms['plain']:.2f}x plain, {v - ms[whole]:+.2f} ms against {whole})")
    print(json.dumps({"context": args.context, "threads": args.threads, "rounds": args.rounds,
                      "cpu_time": args.cpu_time, "kernels": args.kernels,
                      "ms": {n: round(v, 3) for n, v in ms.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
