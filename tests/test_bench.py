"""plt-bench: the serial-loop cost model, and a smoke run of the benchmark (tiny settings)."""

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
    print(f"PLT-2 state after 11 tokens: {kv_bytes(states['torch'])} bytes "
          f"(ONNX Runtime buffers: {states['ort'].nbytes()})")


def test_plt_bench_smoke(tmp_path):
    out = subprocess.run(["plt-bench", "--shape", "default", "--forms", "torch-fp32", "ort-fp32", "--contexts", "32",
                          "96", "--steps", "2", "--repeats", "1", "--no-llamacpp", "--no-ortgenai", "--threads", "1",
                          "--workdir", str(tmp_path), "--plot", str(tmp_path / "chart.png")],
                         capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    print(out.stderr[-1500:])
    for key in ("plt2_over_plain_decode", "serial2_over_plt2_decode", "plt2_over_plain_kv_bytes"):
        assert summary[key] > 0
    assert summary["plt2_over_plain_kv_bytes"] > 1  # the ring and carry of the second loop
    # the second loop's ring attention, gate and carry are nodes of every layer
    assert summary["nodes_per_layer_plt2_fp32"] > summary["nodes_per_layer_plain_fp32"] > 0
    assert "nodes per decoder layer" in out.stderr
    # a fresh process per variant measured the peak RSS (it finds the artifacts the run exported)
    rss = summary["results"]["loops"]["peak_rss_mb"]["ort-fp32"]
    assert all(rss[v] > 0 for v in ("plain", "serial2", "plt2")), rss
    assert (tmp_path / "chart.png").stat().st_size > 1000
