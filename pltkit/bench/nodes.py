"""Nodes per decoder layer of a decode graph as ONNX Runtime runs it: after its graph
optimizations (ORT_ENABLE_ALL, CPU), all nodes divided by the layer count. Each node is a kernel
call per decoded token, so at small sizes this count, not the weights, sets the decode time.

Counted from the optimized model ONNX Runtime writes when a session is created
(SessionOptions.optimized_model_filepath, initializers to a side file), in a temporary folder:
nothing is run. What a node costs is measured apart (`us_per_node`): ONNX Runtime's profiler
adds several microseconds to every node it times, so the small nodes' share of a profile is
no measure of their cost.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

LEVELS = {"all": "ORT_ENABLE_ALL", "none": "ORT_DISABLE_ALL"}


def count_nodes(graph) -> int:
    """Nodes of an ONNX graph, those of its subgraphs (If, Loop, Scan bodies) included."""
    return sum(1 + sum(count_nodes(a.g) + sum(count_nodes(s) for s in a.graphs) for a in n.attribute)
               for n in graph.node)


def optimized_nodes(model: str | Path, level: str = "all", own_kernels: bool = False) -> int:
    """Nodes of an ONNX model after ONNX Runtime's CPU graph optimizations at `level` ("all":
    ORT_ENABLE_ALL, as the backends run; "none": ORT_DISABLE_ALL, the model as loaded). own_kernels:
    as the ONNX Runtime backend opens a decode graph, on pltkit's kernels where they run here
    (pltkit.runtime.kernels; a StepAttention or RingMix node is then one node, not its function body)."""
    import onnx
    import onnxruntime as ort

    from pltkit.runtime import kernels

    with tempfile.TemporaryDirectory(prefix="pltkit-nodes-") as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.log_severity_level = 3  # not the warning that an ENABLE_ALL model is specific to this machine
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.bin")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        source = str(model)
        if own_kernels and kernels.available():
            own, count, _ = kernels.kernel_model(Path(model))
            if count:
                source = own
                kernels.load_into(so, Path(model).parent)
        ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        return count_nodes(onnx.load(so.optimized_model_filepath, load_external_data=False).graph)


def us_per_node(threads: int, nodes: int = 400, repeats: int = 200) -> float:
    """What ONNX Runtime's CPU provider spends on a small node, in microseconds: a chain of `nodes`
    Adds of 64 floats against a chain of one, in sessions set up as the backends' (ORT_ENABLE_ALL,
    `threads` intra-op threads), interleaved runs, medians."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def session(n):
        chain = [helper.make_node("Add", ["x" if i == 0 else f"a{i - 1}", "x"], [f"a{i}"]) for i in range(n)]
        graph = helper.make_graph(chain, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                                  [helper.make_tensor_value_info(f"a{n - 1}", TensorProto.FLOAT, [1, 64])])
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    sessions, x = {n: session(n) for n in (1, nodes)}, {"x": np.ones((1, 64), np.float32)}
    times = {n: [] for n in sessions}
    for _ in range(repeats):
        for n, s in sessions.items():
            start = time.perf_counter()
            s.run(None, x)
            times[n].append(time.perf_counter() - start)
    return round((statistics.median(times[nodes]) - statistics.median(times[1])) / (nodes - 1) * 1e6, 2)


def decode_graph(artifact: str | Path) -> tuple[Path, int]:
    """(the decode graph the ONNX Runtime backend runs on a CPU, decoder layers) of a pltkit artifact."""
    from pltkit.runtime.artifact import Artifact
    from pltkit.runtime.ort_backend import auto_attention

    a = Artifact.open(artifact)
    return a.graph_path("decode", auto_attention(a)), a.config.num_hidden_layers


def genai_graph(model_dir: str | Path) -> tuple[Path, int]:
    """(the decoder model, decoder layers) of an onnxruntime-genai model folder."""
    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    return Path(model_dir) / decoder["filename"], decoder["num_hidden_layers"]


def per_layer(graph: tuple[Path, int], level: str = "all", own_kernels: bool = False) -> float:
    """Nodes per decoder layer of (model, layers), after ONNX Runtime's optimizations, to 0.1."""
    model, layers = graph
    return round(optimized_nodes(model, level, own_kernels) / layers, 1)


def peer_nodes(artifacts: dict, genai_models: dict) -> dict:
    """{"pltkit-int8": n, "genai-int8": n, ...}: nodes per layer of pltkit's decode graphs (as its runtime
    opens them) and onnxruntime-genai's models, by precision."""
    out = {}
    for prec in artifacts:
        out[f"pltkit-{prec}"] = per_layer(decode_graph(artifacts[prec]), own_kernels=True)
        out[f"genai-{prec}"] = per_layer(genai_graph(genai_models[prec]))
    return out


def loop_nodes(artifacts: dict) -> dict:
    """{precision: {variant: n}}: nodes per layer of the loop benchmark's decode graphs as the runtime opens
    them, from its {(variant, precision): artifact}."""
    out = {}
    for (variant, prec), art in sorted(artifacts.items(), key=lambda kv: kv[0][::-1]):
        out.setdefault(prec, {})[variant] = per_layer(decode_graph(art), own_kernels=True)
    return out
