"""plt-bench: the serial-loop cost model, and a smoke run of the benchmark (tiny settings)."""

import copy
import json
import subprocess

import numpy as np
import pytest
from serving import HANG
from synth import make_checkpoint, make_config

from pltkit.runtime.backends import open_backend
from pltkit.runtime.serial import SerialLoops


def test_serial_loops_cost_model(tmp_path):
    make_checkpoint(tmp_path / "one", make_config(plt_num_loops=1), seed=1)
    make_checkpoint(tmp_path / "two", make_config(plt_num_loops=2), seed=1)
    plain = open_backend(tmp_path / "one", "torch", 1)
    serial = SerialLoops(plain, 2)
    _, state = serial.prefill(np.arange(4, 14)[None], serial.new_state(1))
    _, state = serial.decode(np.asarray([5]), state)
    single = plain.decode(np.asarray([5]), plain.prefill(np.arange(4, 14)[None], plain.new_state(1))[1])[1]
    # two full caches, each as long as the sequence: twice the memory of one loop
    assert [s.pos for s in state.states] == [11, 11] and state.nbytes() == 2 * single.nbytes()
    with pytest.raises(ValueError, match="one-loop backend"):
        SerialLoops(open_backend(tmp_path / "two", "torch", 1), 2)


def test_kv_bytes_count_the_entries_not_the_room_to_grow(tmp_path):
    """plt-bench's KV bytes are the same on ONNX Runtime (cache buffers with spare capacity) as
    the torch reference's exact tensors, for PLT-2 (global cache, rings, carries)."""
    from pltkit.bench.loops import kv_bytes
    from pltkit.export.artifact import export

    make_checkpoint(tmp_path / "two", make_config(plt_num_loops=2), seed=1)
    export(tmp_path / "two", tmp_path / "art")
    ids = np.arange(4, 14)[None]
    states = {b: open_backend(tmp_path / d, b, 1) for b, d in (("torch", "two"), ("ort", "art"))}
    states = {b: be.decode(np.asarray([5]), be.prefill(ids, be.new_state(1))[1])[1] for b, be in states.items()}
    assert states["ort"].nbytes() > kv_bytes(states["ort"]) == kv_bytes(states["torch"]) > 0
    # float32: K and V of 11 tokens per layer, the second loop's ring of min(11, window) tokens, one carry
    c = make_config(plt_num_loops=2)
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 4
    assert kv_bytes(states["torch"]) == per_token * (11 + min(11, c["plt_window_size"][0])) + c["hidden_size"] * 4
    print(f"PLT-2 state after 11 tokens: {kv_bytes(states['torch'])} bytes "
          f"(ONNX Runtime buffers: {states['ort'].nbytes()})")


def _kv_bytes_expected(ctx: int) -> dict:
    """KV bytes of the default shape after `ctx` tokens, from its config alone (float32): per token
    K and V of every layer; PLT-2 adds its second loop's ring (the last `window` tokens) and carry
    (one hidden vector); serial L=2 keeps two full caches."""
    from pltkit.model.paths import resolve_model_path

    c = json.loads((resolve_model_path("default") / "config.json").read_text())
    assert c["plt_num_loops"] == 2
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 4
    return {"plain": per_token * ctx, "serial2": 2 * per_token * ctx,
            "plt2": per_token * (ctx + min(ctx, c["plt_window_size"][0])) + c["hidden_size"] * 4}


def test_plt_bench_smoke(tmp_path):
    """What plt-bench reports is what it was asked for and what it measured: every ratio the quotient
    of the reported figures it comes from, KV bytes as the shape's arithmetic gives them. Timings
    are reported, never asserted."""
    forms, contexts, variants = ["torch-fp32", "ort-fp32"], [32, 96], {"plain", "serial2", "plt2"}
    out = subprocess.run(["plt-bench", "--shape", "default", "--forms", *forms, "--contexts", *map(str, contexts),
                          "--steps", "2", "--repeats", "1", "--no-llamacpp", "--no-ortgenai", "--threads", "1",
                          "--workdir", str(tmp_path), "--plot", str(tmp_path / "chart.png")],
                         capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    print(out.stderr[-1500:])
    lo = summary["results"]["loops"]
    ctx = [str(c) for c in contexts]  # JSON object keys
    assert lo["shape"] == "default" and list(lo["decode_ms"]) == forms and list(lo["prefill_tps"]) == forms
    assert all(list(lo["decode_ms"][f]) == ctx and all(set(r) == variants for r in lo["decode_ms"][f].values())
               for f in forms)
    assert all(set(lo["prefill_tps"][f]) == variants for f in forms)
    times = [m for f in forms for r in lo["decode_ms"][f].values() for m in r.values()]
    times += [t for f in forms for t in lo["prefill_tps"][f].values()]
    assert all(isinstance(t, float) and 0 < t < float("inf") for t in times), times
    assert (summary["threads"], summary["steps"], summary["repeats"]) == (1, 2, 1)

    # the headline ratios: ONNX Runtime fp32 at the longest context, each the quotient of its figures
    assert summary["ratios_at"] == {"form": "ort-fp32", "context": 96, "kv_context": 96}
    d, kv = lo["decode_ms"]["ort-fp32"]["96"], lo["kv_bytes"]["96"]
    assert summary["plt2_over_plain_decode"] == round(d["plt2"] / d["plain"], 3)
    assert summary["serial2_over_plt2_decode"] == round(d["serial2"] / d["plt2"], 3)
    assert summary["plt2_over_plain_kv_bytes"] == round(kv["plt2"] / kv["plain"], 3)
    for key, (num, den) in (("plt2_over_plain_decode_all", ("plt2", "plain")),
                            ("serial2_over_plt2_decode_all", ("serial2", "plt2"))):
        assert summary[key] == {f: {c: round(r[num] / r[den], 3) for c, r in lo["decode_ms"][f].items()}
                                for f in forms}, key
    # the table on stderr prints the same times and their quotients
    for f in forms:
        for c in ctx:
            r = lo["decode_ms"][f][c]
            row = (f"{f:>11} {c:>8} {r['plain']:>8.2f} {r['serial2']:>8.2f} {r['plt2']:>8.2f} "
                   f"{r['plt2'] / r['plain']:>10.2f}x {r['serial2'] / r['plt2']:>12.2f}x")
            assert row in out.stderr.splitlines(), row

    # KV bytes: exactly the shape's arithmetic, at every context asked for (ring full at 96, not at 32)
    assert lo["kv_bytes"] == {c: _kv_bytes_expected(int(c)) for c in ctx}
    assert lo["kv_bytes"]["32"] == {"plain": 65536, "serial2": 131072, "plt2": 132096}
    assert summary["plt2_over_plain_kv_bytes"] == round(328704 / 196608, 3) == 1.672

    # nodes per layer: one figure per variant of the one ONNX Runtime precision asked for, mirrored in
    # the JSON line's keys; each a node count over the 4 layers, to 0.1; the second loop's ring
    # attention, gate and carry are nodes of every layer
    nodes = lo["nodes_per_layer"]
    assert set(nodes) == {"fp32"} and set(nodes["fp32"]) == {"plain", "plt2"}
    assert {k: v for k, v in summary.items() if k.startswith("nodes_per_layer_")} == \
        {f"nodes_per_layer_{v}_fp32": n for v, n in nodes["fp32"].items()}
    for n in nodes["fp32"].values():
        assert any(round(count / 4, 1) == n for count in range(int(n * 4) - 1, int(n * 4) + 2)), n
    assert nodes["fp32"]["plt2"] > nodes["fp32"]["plain"] > 0
    assert "nodes per decoder layer" in out.stderr
    # the two fp32 artifacts the run exported (plain and PLT-2), kept in the workdir
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("default-") and "-fp32-" in p.name]) == 2

    # a fresh process per variant measured the peak RSS, for the forms it is measured on (ort-fp32)
    rss = lo["peak_rss_mb"]
    assert set(rss) == {"ort-fp32"} and set(rss["ort-fp32"]) == variants, rss
    assert all(v > 0 for v in rss["ort-fp32"].values()), rss
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_plt_bench_runs_a_scheme_whose_name_has_a_dash(tmp_path):
    """ort-int8-dq: the form's precision is everything after "ort-", and its artifacts are that scheme's."""
    out = subprocess.run(["plt-bench", "--shape", "default", "--forms", "ort-int8-dq", "--contexts", "32", "--steps",
                          "1", "--repeats", "1", "--no-llamacpp", "--no-ortgenai", "--threads", "1",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr[-2000:]
    lo = json.loads(out.stdout.strip().splitlines()[-1])["results"]["loops"]
    assert list(lo["decode_ms"]) == ["ort-int8-dq"] and set(lo["nodes_per_layer"]) == {"int8-dq"}
    arts = [p for p in tmp_path.iterdir() if "-int8-dq-" in p.name]
    assert len(arts) == 2 and all(json.loads((p / "pltkit.json").read_text())["precision"] == "int8-dq" for p in arts)


def test_the_summary_takes_the_longest_context_whatever_its_keys():
    """Contexts are int keys in the process and strings once results come back from JSON: "96" sorts
    after "256" as text, and the headline ratios must still be those of the longest context."""
    from types import SimpleNamespace

    from pltkit.bench.report import summary

    times = {"96": {"plt2": 2.0, "plain": 1.0, "serial2": 4.0}, "256": {"plt2": 3.0, "plain": 2.0, "serial2": 6.0}}
    results = {"seconds": 1.0, "loops": {"decode_ms": {"ort-fp32": times},
                                         "kv_bytes": {"96": {"plt2": 10, "plain": 5}, "256": {"plt2": 30, "plain": 20}}}}
    out = summary(results, SimpleNamespace(threads=1, steps=1, repeats=1))
    assert out["ratios_at"] == {"form": "ort-fp32", "context": "256", "kv_context": "256"}
    assert (out["plt2_over_plain_decode"], out["plt2_over_plain_kv_bytes"]) == (1.5, 1.5)


def test_peer_ratios_and_their_spread_over_the_repeats():
    """Each repeat runs the systems side by side: its ratio is one sample, and the quartiles of those
    samples say how far a single run's ratio can stray from the median's."""
    from pltkit.bench.report import peer_ratios, ratio_lines

    decode = {"pltkit-int8": [10.0, 10.0, 10.0, 10.0, 20.0], "genai-int8": [9.0, 10.0, 11.0, 12.0, 20.0],
              "pltkit-int4": [8.0] * 5, "genai-int4": [8.0] * 5}
    tps = {name: [100.0 if name.startswith("genai") else 150.0] * 5 for name in decode}
    r = {"decode_ms": {n: sorted(v)[2] for n, v in decode.items()}, "prefill_tps": {n: v[0] for n, v in tps.items()},
         "repeats": {"decode_ms": decode, "prefill_tps": tps}}
    out = peer_ratios("ortgenai", r)
    print(out, ratio_lines("ortgenai", r), sep="\n")
    assert out["pltkit_over_ortgenai_decode_int8"] == 1.1  # medians: 11 / 10
    # repeats' ratios 0.9, 1.0, 1.1, 1.2, 1.0 -> quartiles (exclusive method) 0.95, 1.0 and 1.15
    assert out["pltkit_over_ortgenai_decode_int8_quartiles"] == [0.95, 1.0, 1.15]
    assert out["pltkit_over_ortgenai_prefill_int4"] == 1.5  # tokens/s: ours over theirs
    assert out["pltkit_over_ortgenai_prefill_int4_quartiles"] == [1.5, 1.5, 1.5]
    assert "decode 1.10x (repeats' ratios: median 1.00, quartiles 0.95-1.15)" in ratio_lines("ortgenai", r)[0]
    del r["repeats"]  # results from before the repeats were kept: the medians alone
    assert "pltkit_over_ortgenai_decode_int8_quartiles" not in peer_ratios("ortgenai", r)
    r["decode_ms"]["genai-int4"] = None  # a system that did not run
    assert "decode -" in ratio_lines("ortgenai", r)[1]


def test_ort_cost_per_node_is_measured_and_reported():
    """The cost of a small node is measured on a real ONNX Runtime session (its value depends on the
    machine, so only its form is checked), and the nodes table turns node counts into time with it."""
    import math

    from pltkit.bench import nodes, report

    us = nodes.us_per_node(threads=1, nodes=50, repeats=20)
    print(f"ONNX Runtime: {us} us per small node")
    assert isinstance(us, float) and math.isfinite(us)
    results = {"loops": {"shape": "default", "nodes_per_layer": {"int8": {"plain": 20.0, "plt2": 30.0}}},
               "ortgenai": {"nodes_per_layer": {"pltkit-int8": 25.0, "genai-int8": 10.0}}, "ort_us_per_node": 0.5}
    table = "\n".join(report.nodes_table(results))
    print(table)
    assert "PLT-2 over plain, int8: 5.0 us" in table and "pltkit over onnxruntime-genai, int8: 7.5 us" in table
    assert report.nodes_summary(results)["ort_us_per_node"] == 0.5


def test_the_decode_profile_comes_with_the_unprofiled_step(tmp_path):
    """plt-bench's profile line: kernel time by op from ONNX Runtime's profiler, beside the same steps
    timed without it (the profiler's own cost per node is what makes small ops look expensive)."""
    from pltkit.bench.llamacpp import ort_profile
    from pltkit.export.artifact import export

    make_checkpoint(tmp_path / "ckpt", make_config(num_hidden_layers=2), seed=3)
    backend = open_backend(export(tmp_path / "ckpt", tmp_path / "art"), "ort", 1)
    prof = ort_profile(backend, list(range(5, 21)), steps=4)
    print(prof)
    assert prof["unprofiled_us_per_step"] > 0 and prof["kernel_us_per_step"] > 0
    # the shares are of the kernel total, the largest op types' only: their ranking depends on the load
    assert prof["op_share"] and all(0 < v <= 1 for v in prof["op_share"].values())
    assert sum(prof["op_share"].values()) <= 1.0001


def test_the_loop_ratios_come_with_their_spread_over_the_repeats():
    from types import SimpleNamespace

    from pltkit.bench.report import summary, tables

    reps = {"plain": [1.0, 1.0, 1.0, 1.0, 1.0], "serial2": [2.0] * 5, "plt2": [1.1, 1.2, 1.3, 1.0, 1.2]}
    results = {"seconds": 1.0, "loops": {"decode_ms": {"ort-int8": {256: {"plain": 1.0, "serial2": 2.0, "plt2": 1.2}}},
                                         "repeats": {"ort-int8": {256: reps}}, "prefill_tps": {}, "kv_bytes": {},
                                         "peak_rss_mb": {}}}
    out = summary(results, SimpleNamespace(threads=1, steps=1, repeats=5))
    assert out["plt2_over_plain_decode_quartiles_all"] == {"ort-int8": {256: [1.05, 1.2, 1.25]}}
    text = tables(results)
    print(text)
    assert "repeats' plt2/plain: 1.05 1.20 1.25" in text
    # three repeats make no quartiles worth printing
    results["loops"]["repeats"]["ort-int8"][256] = {v: r[:3] for v, r in reps.items()}
    out = summary(results, SimpleNamespace(threads=1, steps=1, repeats=3))
    assert out["plt2_over_plain_decode_quartiles_all"] == {"ort-int8": {256: None}}
    assert "repeats' plt2/plain" not in tables(results)


def test_plt2_runs_next_to_plain_and_to_serial2_in_every_repeat():
    """A repeat's PLT-2 / plain (and serial L=2 / PLT-2) ratio is taken from blocks run one after the other, and
    no variant always runs first."""
    from pltkit.bench.loops import VARIANTS, _turn

    orders = [_turn(r) for r in range(4)]
    for order in orders:
        assert sorted(order) == sorted(VARIANTS)
        assert abs(order.index("plt2") - order.index("plain")) == 1
        assert abs(order.index("plt2") - order.index("serial2")) == 1
    assert orders[0][0] != orders[1][0] and orders[0] == orders[2]


def test_plt2_cuts_cut_what_they_name_and_the_cut_graphs_run(tmp_path, capsys, monkeypatch):
    """benchmarks/plt2_cuts.py: each cut leaves a graph ONNX Runtime runs with the artifact's state (every
    step, rings included, keeps its shapes), without the piece it names."""
    from pathlib import Path

    import onnx

    from pltkit.export.artifact import export
    from pltkit.quant.schemes import SCHEMES

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import plt2_cuts

    arts = {}
    for loops in (1, 2):
        make_checkpoint(tmp_path / f"ckpt{loops}", make_config(plt_num_loops=loops, num_hidden_layers=2), seed=1)
        arts[loops] = export(tmp_path / f"ckpt{loops}", tmp_path / f"art{loops}", quant=SCHEMES["int8"])
    graph = onnx.load(arts[2] / "decode.gqa.onnx", load_external_data=False).graph

    def rings(g):
        return [n for n in g.node if n.op_type == "RingMix"]

    def layer_matmuls(g):
        return [n for n in g.node if n.op_type == "MatMulNBits" and "/layers." in n.name]

    assert len(rings(graph)) == 2 and layer_matmuls(graph)
    # int4-asym: a layer's block sums read the product's input; the cut wraps that input once
    asym = export(tmp_path / "ckpt2", tmp_path / "asym", quant=SCHEMES["int4-asym"])
    cut = onnx.load(asym / "decode.gqa.onnx", load_external_data=False).graph
    plt2_cuts.one_row_matmuls(cut)
    outputs = [o for n in cut.node for o in n.output]
    assert len(outputs) == len(set(outputs)) and len(layer_matmuls(cut)) > len({n.input[0] for n in layer_matmuls(cut)})
    cut = onnx.load(arts[2] / "decode.gqa.onnx", load_external_data=False).graph
    plt2_cuts.no_ring_mix(cut)
    assert not rings(cut)
    make_checkpoint(tmp_path / "query", make_config(plt_gate_use_hidden_states=False, num_hidden_layers=2), seed=1)
    query = onnx.load(export(tmp_path / "query", tmp_path / "query-art", quant=SCHEMES["int8"]) / "decode.gqa.onnx",
                      load_external_data=False).graph
    for g in (graph, query):  # the hidden-state gate is RingMix's own; the query-mode gate is nodes of the graph
        cut = copy.deepcopy(g)
        plt2_cuts.no_gate(cut)
        assert [n.input[6] for n in rings(cut)] == ["cut.gate" if g is query else ""] * 2
        assert (len(cut.node) < len(g.node)) == (g is query)
    cut = onnx.load(arts[2] / "decode.gqa.onnx", load_external_data=False).graph
    plt2_cuts.one_row_matmuls(cut)
    made = {o: n for n in cut.node for o in n.output}
    assert all(made[n.input[0]].op_type == "Slice" for n in layer_matmuls(cut))
    cut = onnx.load(arts[1] / "decode.gqa.onnx", load_external_data=False).graph
    plt2_cuts.two_row_matmuls(cut)
    made = {o: n for n in cut.node for o in n.output}
    assert layer_matmuls(cut) and all(made[n.input[0]].op_type == "Concat" and len(set(made[n.input[0]].input)) == 1
                                      and len(made[n.input[0]].input) == 2 for n in layer_matmuls(cut))
    # the cut graphs run, several steps, beside the whole one and the plain artifact
    assert plt2_cuts.main([str(arts[2]), str(arts[1]), "--context", "24", "--steps", "3", "--rounds", "2", "--cpu-time",
                           "--threads", "1"]) == 0
    ms = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ms"]
    assert set(ms) == {"plain", "PLT-2", *plt2_cuts.CUTS}
    assert all(v > 0 for v in ms.values())
    assert not list(tmp_path.glob(".pltkit-cuts-*"))  # the cut graphs' folder is gone
    from pltkit.runtime import kernels

    if kernels.available():  # every graph, cut or whole, on pltkit's kernel where it applies
        assert plt2_cuts.main([str(arts[2]), str(arts[1]), "--context", "24", "--steps", "2", "--rounds", "1",
                               "--threads", "1", "--kernels", "pltkit"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kernels"] == "pltkit"
        import kernels_ab

        assert kernels_ab.main([str(arts[1]), str(arts[2]), "--contexts", "24", "--steps", "2", "--rounds", "2",
                                "--threads", "1"]) == 0
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["contexts"]["24"]
        assert set(row) >= {"plain_ort_ms", "plain_pltkit_ms", "plt2_ort_ms", "plt2_pltkit_ms",
                            "plt2_over_plain_pltkit", "pltkit_over_ort_plt2"} and all(v > 0 for v in row.values())
