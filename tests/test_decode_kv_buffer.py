"""Decode writes the global KV cache in place at every precision: the bytes a decode step
allocates stay flat as the context grows (256 to 4096 tokens of the default model).

Measured without timing, from three sides:
- ONNX Runtime's profiler: the sizes of the tensors every node outputs, summed per step, less
  the cache buffers that are bound as both past_* and present_* (which the kernels write into:
  proven by the next point). A graph that concatenates the cache outputs a new one per layer.
- the present_* outputs are the very memory of the past_* buffers (data pointers), so
  GroupQueryAttention shares them and does not copy the past into a new present.
- tracemalloc on the Python side (BufferState and the backend's feeds and fetches).
The "function" decode graph (Concat of past and new keys) is the control: its bytes grow.
"""

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pltkit.bench.loops import make_checkpoints
from pltkit.export.artifact import export
from pltkit.quant.schemes import SCHEMES
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.ort_backend import OrtBackend

CONTEXTS = (256, 1024, 4096)  # tokens in the cache after the measured steps
STEPS = 4  # decode steps measured, ending at the context (so the buffers do not grow)
CHUNK = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The default model with its positions raised to the longest context (PLT-2)."""
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"), max(CONTEXTS), "default")["plt2"]


@pytest.fixture(scope="module", params=["fp32", "fp16", "int8", "int4"])
def artifact(request, checkpoint, tmp_path_factory):
    art = tmp_path_factory.mktemp(request.param) / "art"
    export(checkpoint, art, quant=SCHEMES.get(request.param), dtype="float16" if request.param == "fp16" else "float32")
    return Artifact.open(art)


class Recorded:
    """A session that records, after each run with IO binding, the data pointers of its outputs
    (in binding order)."""

    def __init__(self, session):
        self.session, self.outputs = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, io, *args):
        self.session.run_with_iobinding(io, *args)
        self.outputs.append([v.data_ptr() for v in io.get_outputs()])


def profiled_decode(backend: OrtBackend, prefix) -> Recorded:
    """Give backend a decode session opened as its own (on pltkit's kernels where they run), with ONNX Runtime's
    profiler on."""
    backend.sessions["decode"] = Recorded(backend.open_session("decode", backend.attention, profile=str(prefix)))
    return backend.sessions["decode"]


def node_output_bytes(profile_file) -> tuple[int, int]:
    """(runs, bytes output by all nodes in all runs) of a profile."""
    events = json.loads(Path(profile_file).read_text())
    runs = sum(e.get("name") == "model_run" for e in events)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return runs, sum(int(e["args"]["output_size"]) for e in nodes)


def measure(backend: OrtBackend, state, prefix) -> dict:
    """Decode STEPS tokens from a copy of state: bytes per step that nodes output into new tensors,
    Python-side peak bytes per step, and whether the cache stayed in its buffers."""
    state = state.clone()
    buffers = dict(state.kv)
    session = profiled_decode(backend, prefix)
    python = []
    tracemalloc.start()
    try:
        for t in range(STEPS):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            _, state = backend.decode(np.asarray([10 + t]), state)
            python.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    runs, out_bytes = node_output_bytes(session.end_profiling())
    assert runs == STEPS
    same_buffers = all(state.kv[k] is b for k, b in buffers.items())
    kv_buffer = backend.kv_buffer["decode"]
    if kv_buffer:  # present_* outputs bound first, to the state's buffers
        pointers = [b.ctypes.data for b in state.kv.values()]
        shared = all(out[:len(pointers)] == pointers for out in session.outputs)
        out_bytes -= STEPS * sum(b.nbytes for b in state.kv.values())  # written into, not allocated
    return {"ort": out_bytes // STEPS, "python": max(python), "shared": kv_buffer and shared,
            "same_buffers": same_buffers, "cache_bytes": sum(b[:, :, :state.pos].nbytes for b in state.kv.values())}


def test_decode_bytes_per_step_stay_flat_as_the_context_grows(artifact, tmp_path):
    gqa, function = OrtBackend(artifact, 1, "gqa"), OrtBackend(artifact, 1, "function")
    assert gqa.kv_buffer["decode"] and not function.kv_buffer["decode"]
    ids = np.random.default_rng(0).integers(10, 4000, (1, max(CONTEXTS)))
    state, got = gqa.new_state(1), {}
    for ctx in CONTEXTS:
        while state.pos < ctx - STEPS:
            _, state = gqa.prefill(ids[:, state.pos:min(state.pos + CHUNK, ctx - STEPS)], state)
        spare = gqa.writes["decode"] - 1  # positions a step writes after its token
        state.reserve(ctx, artifact.config.max_position_embeddings, spare)
        assert state.kv["key.0"].shape[2] >= ctx + spare  # room for the steps: the buffers do not grow while measured
        got[ctx] = {b.attention: measure(b, state, tmp_path / f"{b.attention}-{ctx}") for b in (gqa, function)}
    prec = artifact.manifest["precision"]
    for ctx, r in got.items():
        print(f"{prec} ctx {ctx:>5}: cache {r['gqa']['cache_bytes']:>9,} B; bytes per decode step, ONNX Runtime "
              f"nodes / Python peak: gqa {r['gqa']['ort']:>10,} / {r['gqa']['python']:>8,}   "
              f"function {r['function']['ort']:>11,} / {r['function']['python']:>10,}")
    small, large = got[min(CONTEXTS)], got[max(CONTEXTS)]
    # what one copy of the whole cache adds from the smallest context to the largest
    copy = large["gqa"]["cache_bytes"] - small["gqa"]["cache_bytes"]
    tensors = len(gqa.new_state(1).kv)  # a key and a value tensor per layer
    for r in got.values():
        assert r["gqa"]["shared"] and r["gqa"]["same_buffers"], "decode did not write into the cache buffers"
    for side in ("ort", "python"):
        # flat: copying even half of one layer's key cache would exceed this
        assert large["gqa"][side] - small["gqa"][side] < copy / tensors / 2, (side, got)
    if gqa.own_nodes.get(("decode", "gqa")):  # on pltkit's kernels, which read no attention bias: exactly flat
        assert large["gqa"]["ort"] == small["gqa"]["ort"], got
    # the control: the function graph concatenates (and the backend feeds and fetches) the whole cache
    assert large["function"]["ort"] - small["function"]["ort"] >= copy
    assert large["function"]["python"] - small["function"]["python"] >= copy / 2
