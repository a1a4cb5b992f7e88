"""The backends: one way to open each (open_backend, through BACKENDS), one interface (the Backend
and State protocols), and the threads each is asked for."""

import inspect
import shutil

import numpy as np
import pytest
import torch
from synth import make_checkpoint, make_config

from pltkit.runtime.artifact import ArtifactError
from pltkit.runtime.backends import BACKENDS, Backend, State, _opener, open_backend
from pltkit.runtime.serial import SerialLoops

THREADS = 3  # not what any default would give on a small machine
RUNNABLE = {"torch": "checkpoint", "ort": "artifact", "onnx-reference": "artifact"}  # on a CPU


@pytest.fixture
def torch_threads():
    """The backends set torch's thread count for the whole process: put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def model_for(kind, artifact):
    return "default" if RUNNABLE[kind] == "checkpoint" else artifact


@pytest.mark.parametrize("kind", list(RUNNABLE))
def test_every_backend_opens_one_way_and_runs_the_interface(kind, served_artifact, torch_threads):
    backend = open_backend(model_for(kind, served_artifact), kind, THREADS, verify=True)
    assert isinstance(backend, Backend) and backend.name == kind
    state = backend.new_state(1)
    assert isinstance(state, State) and state.pos == 0
    logits, state = backend.prefill(np.asarray([[5, 6, 7, 8]]), state)
    assert logits.shape == (1, 4, backend.config.vocab_size) and state.pos == 4
    copy, snapshot = state.clone(), state.snapshot()
    logits, state = backend.decode(np.asarray([9]), state)
    assert logits.shape == (1, backend.config.vocab_size) and state.pos == 5 and copy.pos == 4
    state.rewind(4, snapshot)
    assert state.pos == 4 and state.nbytes() > 0
    again, _ = backend.decode(np.asarray([9]), state)
    np.testing.assert_allclose(again, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [THREADS, None])
def test_threads_reach_onnx_runtime(threads, served_artifact):
    from pltkit.runtime.backends import physical_cores

    backend = open_backend(served_artifact, "ort", threads)
    for session in backend.sessions.values():
        assert session.get_session_options().intra_op_num_threads == (threads or physical_cores())


@pytest.mark.parametrize("threads", [THREADS, 1])
def test_threads_reach_torch(threads, torch_threads):
    open_backend("default", "torch", threads)
    assert torch.get_num_threads() == threads


def test_every_opener_takes_path_threads_verify():
    for kind in BACKENDS:  # the trt opener imports without a GPU
        params = list(inspect.signature(_opener(kind)).parameters.values())
        assert [p.name for p in params[:3]] == ["path", "threads", "verify"], kind
        assert all(p.default is not p.empty for p in params[3:]), kind


@pytest.mark.parametrize("kind", [k for k, m in RUNNABLE.items() if m == "artifact"])
def test_verify_reaches_every_artifact_backend(kind, served_artifact, tmp_path):
    damaged = shutil.copytree(served_artifact, tmp_path / "damaged")
    with open(damaged / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="tokenizer.json"):
        open_backend(damaged, kind, 1, verify=True)
    assert isinstance(open_backend(damaged, kind, 1, verify=False), Backend)


def test_an_unknown_backend_is_named(served_artifact):
    with pytest.raises(ValueError, match=r"unknown backend 'nope' \(known: torch, ort, "):
        open_backend(served_artifact, "nope")


def test_the_serial_cost_model_is_a_backend_too(tmp_path, torch_threads):
    make_checkpoint(tmp_path / "one", make_config(plt_num_loops=1), seed=1)
    serial = SerialLoops(open_backend(tmp_path / "one", "torch", 1), 2)
    state = serial.new_state(1)
    assert isinstance(serial, Backend) and isinstance(state, State)
    _, state = serial.prefill(np.asarray([[5, 6, 7]]), state)
    snapshot = state.snapshot()
    _, state = serial.decode(np.asarray([8]), state)
    state.rewind(3, snapshot)
    assert [s.pos for s in state.states] == [3, 3]


def test_a_steady_ort_decode_step_binds_nothing(served_artifact, monkeypatch):
    """Once the rings are full, a decode step writes its token and position into arrays its binding already
    holds and reads its logits from another: it binds no tensor (each costs microseconds), and the logits it
    returns are its own (the next step does not overwrite them)."""
    import onnxruntime as ort

    backend = open_backend(served_artifact, "ort", 1)
    ids = np.random.default_rng(3).integers(10, 300, (1, backend.config.window_left + 4))
    _, state = backend.prefill(ids, backend.new_state(1))
    for t in (5, 6):  # the two sets of rings, each bound on its first step
        _, state = backend.decode(np.asarray([t]), state)
    binds = []
    for name in ("bind_cpu_input", "bind_input", "bind_ortvalue_input", "bind_output", "bind_ortvalue_output"):
        real = getattr(ort.IOBinding, name)
        monkeypatch.setattr(ort.IOBinding, name, lambda self, *a, _real=real, **k: binds.append(a[0]) or _real(
            self, *a, **k))
    kept = []
    for t in (7, 8, 9):
        logits, state = backend.decode(np.asarray([t]), state)
        kept.append((logits, logits.copy()))
    assert binds == []
    assert all(np.array_equal(a, b) for a, b in kept) and not np.array_equal(kept[0][0], kept[1][0])


def test_ort_decode_over_full_rings_keeps_each_state_it_hands_out(served_artifact):
    """Once the rings hold their whole window, the ONNX Runtime backend's steps write rings and carries into two
    sets of arrays in turn, each bound once. Decoded so, a state gives the torch reference's logits (within
    1e-4), and the states it hands out behave as values: a snapshot rewound to, a clone, and two states decoded
    by turns give the logits of one state decoded alone."""
    backend, reference = open_backend(served_artifact, "ort", 1), open_backend("default", "torch", 1)
    ids = np.random.default_rng(2).integers(10, 300, (1, 80))
    prompt = backend.config.window_left + 6

    def decode(state, tokens, by=backend):
        out = []
        for t in tokens:
            logits, state = by.decode(np.asarray([t]), state)
            out.append(logits)
        return out, state

    _, start = backend.prefill(ids[:, :prompt], backend.new_state(1))
    steps = ids[0, prompt:]
    alone, _ = decode(start.clone(), steps)
    want, _ = decode(reference.prefill(ids[:, :prompt], reference.new_state(1))[1], steps, reference)
    diff = max(float(np.abs(a - w).max()) for a, w in zip(alone, want))
    print(f"{len(steps)} steps over full rings: max|ONNX Runtime - torch| {diff:.1e}")
    assert diff < 1e-4
    assert backend._bound["decode"]["turns"] is not None  # the steps took turns over two sets of arrays
    state = start.clone()
    first, state = decode(state, steps[:4])
    snapshot, pos = state.snapshot(), state.pos
    later, state = decode(state, steps[4:7])
    state.rewind(pos, snapshot)
    again, _ = decode(state, steps[4:])
    a, b = start.clone(), start.clone()
    by_turns = [decode(s, [t]) for t in steps for s in (a, b)]  # a state each, one step at a time
    for t, logits in enumerate(zip(alone, [*first, *again])):
        np.testing.assert_array_equal(*logits, err_msg=f"step {t}")
    for t, logits in enumerate(alone):
        np.testing.assert_array_equal(logits, by_turns[2 * t][0][0])
        np.testing.assert_array_equal(logits, by_turns[2 * t + 1][0][0])
