"""plt-bench's nodes per decoder layer after ONNX Runtime's optimizations (pltkit.bench.nodes)."""

import json
import shutil

import onnx
import pytest
from synth import make_checkpoint, make_config

from pltkit.bench import nodes, report
from pltkit.export.artifact import export
from pltkit.runtime import kernels


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("nodes")
    make_checkpoint(d / "ckpt", make_config(num_hidden_layers=3), seed=1)
    return export(d / "ckpt", d / "art")


def test_nodes_per_layer_of_the_decode_graph(artifact):
    """Unoptimized, the figure is a direct count of the file's nodes (ONNX Runtime holds Constant
    nodes as initializers, and puts a model-local function's body in place of each node that calls it)
    over the layers; ONNX Runtime's optimizations then fuse nodes."""
    graph = nodes.decode_graph(artifact)
    assert graph == (artifact / "decode.gqa.onnx", 3)
    model = onnx.load(graph[0], load_external_data=False)
    bodies = {(f.domain, f.name): sum(n.op_type != "Constant" for n in f.node) for f in model.functions}
    direct = sum(bodies.get((n.domain, n.op_type), n.op_type != "Constant") for n in model.graph.node)
    loaded, optimized = nodes.per_layer(graph, "none"), nodes.per_layer(graph)
    print(f"decode graph: {len(model.graph.node)} nodes in the file, {direct / 3:.1f} per layer as loaded, "
          f"{optimized} after ORT_ENABLE_ALL")
    assert loaded == round(direct / 3, 1)
    assert 0 < optimized < loaded


@pytest.mark.skipif(not kernels.available(), reason="pltkit's kernels do not build or run here")
def test_nodes_per_layer_on_pltkits_kernels(artifact):
    """As the runtime opens the graph: each layer's StepAttention and RingMix are one node each instead of their
    function bodies."""
    graph = nodes.decode_graph(artifact)
    stock, own = nodes.per_layer(graph), nodes.per_layer(graph, own_kernels=True)
    print(f"decode graph: {stock} nodes per layer on ONNX Runtime's kernels, {own} on pltkit's")
    assert 0 < own < stock


def test_genai_folder_and_peer_nodes(artifact, tmp_path):
    """An onnxruntime-genai folder names its decoder and layer count in genai_config.json: here one
    made of the artifact's own decode graph, so both systems count the same."""
    for f in ("decode.gqa.onnx", "weights.bin"):
        shutil.copy(artifact / f, tmp_path / f)
    (tmp_path / "genai_config.json").write_text(json.dumps(
        {"model": {"decoder": {"filename": "decode.gqa.onnx", "num_hidden_layers": 3}}}))
    assert nodes.genai_graph(tmp_path) == (tmp_path / "decode.gqa.onnx", 3)
    got = nodes.peer_nodes({"int8": artifact}, {"int8": tmp_path})
    assert set(got) == {"pltkit-int8", "genai-int8"}  # pltkit's as its runtime opens it, the peer's on stock kernels
    assert got["pltkit-int8"] == nodes.per_layer(nodes.decode_graph(artifact), own_kernels=True) > 0
    assert got["genai-int8"] == nodes.per_layer(nodes.decode_graph(artifact)) > 0


def test_nodes_in_report():
    results = {"seconds": 1.0, "loops": {"shape": "default", "decode_ms": {"ort-fp32": {32: dict(plain=1.0, serial2=2.0,
                                                                                                  plt2=1.5)}},
                                         "prefill_tps": {}, "kv_bytes": {}, "peak_rss_mb": {},
                                         "nodes_per_layer": {"fp32": {"plain": 20.0, "plt2": 30.5}}},
               "ortgenai": {"nodes_per_layer": {"pltkit-int8": 31.5, "genai-int8": 10.3, "pltkit-int4": 31.5,
                                                "genai-int4": 10.3}}}
    table = "\n".join(report.nodes_table(results))
    print(table)
    assert "30.5" in table and "10.3" in table
    s = report.nodes_summary(results)
    assert s == {"nodes_per_layer_plain_fp32": 20.0, "nodes_per_layer_plt2_fp32": 30.5,
                 "nodes_per_layer_pltkit_int8": 31.5, "nodes_per_layer_ortgenai_int8": 10.3,
                 "nodes_per_layer_pltkit_int4": 31.5, "nodes_per_layer_ortgenai_int4": 10.3}
    assert report.nodes_table({"loops": {}}) == []
