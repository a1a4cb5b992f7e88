"""The completion engine: prefix reuse equals a cold run, carries matter, cancellation is prompt."""

import time

import numpy as np
import pytest
from synth import make_checkpoint, make_config

import pltkit
from pltkit.export.artifact import export
from pltkit.runtime.backends import open_backend
from pltkit.runtime.completion import CompletionRequest
from pltkit.runtime.engine import Cancel, Engine

GREEDY = CompletionRequest(n_predict=12, temperature=0.0)


@pytest.fixture(scope="module", params=[1, 2])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"L{request.param}")
    make_checkpoint(d, make_config(plt_num_loops=request.param, plt_window_size=[3, 0],
                                   max_position_embeddings=256), seed=5)
    return d


def engine(path, chunk=16):
    return Engine(open_backend(path, threads=1), pltkit.load_tokenizer(path), chunk=chunk)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_reuse_equals_cold_at_any_cut(ckpt, backend, tmp_path):
    path = ckpt
    if backend == "ort":
        export(ckpt, tmp_path / "art")
        path = tmp_path / "art"
    rng = np.random.default_rng(0)
    first = rng.integers(4, 300, 90).tolist()
    warm = engine(path)
    for cut in (1, 15, 16, 17, 40, 64, 89):
        warm.run(first, GREEDY)  # the slot now holds `first` (itself partly reused)
        prompt = first[:cut] + rng.integers(4, 300, 7).tolist()
        got = warm.run(prompt, GREEDY)
        want = engine(path).run(prompt, GREEDY)
        assert got.tokens == want.tokens, f"cut {cut}"
        assert got.tokens_cached == min(cut, len(prompt) - 1) // 16 * 16
        assert got.tokens_cached + got.tokens_evaluated == len(prompt)


def test_reset_carries_on_a_hit_changes_the_output(ckpt):
    if pltkit.PLTConfig.from_json(ckpt / "config.json").plt_num_loops == 1:
        pytest.skip("one loop has no carries")
    rng = np.random.default_rng(1)
    first = rng.integers(4, 300, 70).tolist()
    prompt = first[:48] + [7]  # only position 48 is prefilled: its shift reads the restored carry
    want = engine(ckpt).run(prompt, GREEDY).tokens
    broken = engine(ckpt)
    broken.run(first, GREEDY)
    for snap in broken.slots[0].snapshots.values():
        snap["carry"].zero_()
    got = broken.run(prompt, GREEDY)
    assert got.tokens_cached == 48 and got.tokens != want


def test_cancel_stops_within_one_decode_step():
    e = Engine(open_backend("default", threads=1), pltkit.load_tokenizer("default"))
    cancel, seen, when = Cancel(), [], []

    def on_text(piece, result):
        seen.append(piece)
        if len(seen) == 3:
            when.append(time.perf_counter())
            cancel.cancel()

    r = e.complete(CompletionRequest(prefix="def parse(text):\n", n_predict=200), cancel=cancel, on_text=on_text)
    stopped = time.perf_counter() - when[0]
    tokens_after = len(r.tokens) - len(e.tok.encode("".join(seen)))
    print(f"cancelled: {stopped * 1e3:.1f} ms after the request, {tokens_after} token(s) later")
    assert r.stop_type == "cancelled" and len(r.tokens) < 200 and tokens_after <= 1


def test_cancel_during_prefill():
    e = Engine(open_backend("default", threads=1), pltkit.load_tokenizer("default"), chunk=16)
    cancel = Cancel()
    cancel.cancel()
    r = e.complete(CompletionRequest(prefix="x = 1\n" * 50), cancel=cancel)
    assert r.stop_type == "cancelled" and r.tokens == []


def test_infill_on_default_model_stops_and_reports():
    e = Engine(open_backend("default", threads=1), pltkit.load_tokenizer("default"), chunk=8)
    r = e.complete(CompletionRequest(prefix="def add(a, b):\n    ", suffix="\n\n\nprint(add(1, 2))\n", n_predict=24))
    print(repr(r.text), r.stop_type, r.timings)
    assert r.stop_type in ("eos", "limit") and r.tokens_evaluated > 0 and r.timings["prompt_ms"] > 0
    again = e.complete(CompletionRequest(prefix="def add(a, b):\n    ", suffix="\n\n\nprint(add(1, 2))\n",
                                         n_predict=24))
    assert again.tokens == r.tokens and again.tokens_cached > 0


def test_time_limits_as_llama_cpp_applies_them():
    """t_max_prompt_ms is ignored; t_max_predict_ms stops generation once a newline is out. A
    limit of 1e-6 ms has always passed, so the outcome does not depend on the machine's speed."""
    e = Engine(open_backend("default", threads=1), pltkit.load_tokenizer("default"), chunk=16)
    prompt = dict(prefix="def parse(text):\n    ", n_predict=40)
    untimed = e.complete(CompletionRequest(**prompt))
    r = e.complete(CompletionRequest(**prompt, t_max_prompt_ms=1e-6), slot_id=1)
    assert r.tokens_evaluated == untimed.tokens_evaluated and r.tokens == untimed.tokens
    cut = e.complete(CompletionRequest(**prompt, t_max_predict_ms=1e-6), slot_id=2)
    first_line = next(n for n in range(1, len(untimed.tokens) + 1) if "\n" in e.tok.decode(untimed.tokens[:n]))
    print(repr(untimed.text), "->", repr(cut.text))
    assert cut.stop_type == "time" and cut.tokens == untimed.tokens[:first_line] < untimed.tokens


def test_several_completions_of_one_prompt():
    e = Engine(open_backend("default", threads=1), pltkit.load_tokenizer("default"))
    req = dict(prefix="def area(w, h):\n", n_predict=12, temperature=0.9, top_k=40, seed=11)
    many = e.complete_all(CompletionRequest(n_cmpl=3, **req))
    one = Engine(open_backend("default", threads=1), pltkit.load_tokenizer("default")).complete(
        CompletionRequest(**req))
    assert len(many) == 3 and many[0].tokens == one.tokens  # the first uses the request's seed
    assert len({tuple(r.tokens) for r in many}) > 1
    prompt_len = len(e.tok.encode(req["prefix"]))
    assert e.slots[0].ids[:prompt_len] == e.tok.encode(req["prefix"])
    assert e.slots[0].ids[prompt_len:] == many[0].tokens[:len(e.slots[0].ids) - prompt_len]  # slot keeps the first


def test_switching_files_and_back_reuses_the_earlier_state(ckpt):
    rng = np.random.default_rng(2)
    file_a, file_b = rng.integers(4, 300, 60).tolist(), rng.integers(4, 300, 60).tolist()
    e = engine(ckpt)
    e.run(file_a, GREEDY)
    e.run(file_b, GREEDY)  # the same slot moves to another file
    back = file_a + [5, 6, 7]
    r = e.run(back, GREEDY)
    assert r.tokens_cached == 48 and r.tokens == engine(ckpt).run(back, GREEDY).tokens
    tight = Engine(open_backend(ckpt, threads=1), pltkit.load_tokenizer(ckpt), chunk=16, cache_bytes=1)
    tight.run(file_a, GREEDY)
    tight.run(file_b, GREEDY)
    assert tight.run(back, GREEDY).tokens_cached == 0  # nothing kept within one byte


def test_every_state_live_slots_included_stays_within_cache_bytes(ckpt):
    """Many clients, each on a slot of its own: their states (not only the moved-on ones) stay
    within cache_bytes plus the state of the slot that ran last; the oldest are dropped first."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 300, 70).tolist() for _ in range(12)]
    one = engine(ckpt)
    one.run(prompts[0], GREEDY)
    size = one.state_bytes()
    e = Engine(one.backend, one.tok, chunk=16, cache_bytes=3 * size)
    for i, ids in enumerate(prompts):
        e.run(ids, GREEDY, slot_id=("client", i))
        assert e.state_bytes() <= 3 * size + e.slots[("client", i)].nbytes(), i
    assert 1 < len(e.slots) < 12 and ("client", 11) in e.slots and ("client", 0) not in e.slots
    assert e.run(prompts[11] + [5], GREEDY, slot_id=("client", 11)).tokens_cached > 0  # the live one kept its cache


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_state_bytes_count_the_snapshots(ckpt, backend, tmp_path):
    path = ckpt
    if backend == "ort":
        path = export(ckpt, tmp_path / "art")
    e = engine(path)
    e.run(list(range(4, 100)), GREEDY)
    slot = e.slots[0]
    assert len(slot.snapshots) == 6
    if e.backend.config.plt_num_loops > 1:  # rings and carries are in each snapshot
        assert e.state_bytes() > slot.state.nbytes()
    else:
        assert e.state_bytes() == slot.state.nbytes()


def test_typing_on_the_current_line_reuses_everything_before_it():
    """The layout marks where the current line starts; the engine snapshots there, so the next
    keystroke prefills only the line, and the completion equals a cold run's."""
    from pltkit.model.paths import resolve_model_path
    from pltkit.runtime.completion import layout

    e = Engine(open_backend("default", threads=1), pltkit.load_tokenizer(resolve_model_path("default")))
    base = dict(prefix="import os\n\n\ndef walk(top):\n" * 6, suffix="\n\nprint(walk('.'))\n", n_predict=8)
    e.complete(CompletionRequest(prompt="    for", **base))
    req = CompletionRequest(prompt="    for root", **base)
    got = e.complete(req)
    line_start = layout(e.tok, req, 10_000).marks[-1]
    cold = Engine(e.backend, e.tok).complete(req)
    print(f"cached {got.tokens_cached} of {got.tokens_cached + got.tokens_evaluated} (line starts at {line_start})")
    assert got.tokens_cached == line_start and got.tokens == cold.tokens
