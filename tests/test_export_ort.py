"""plt-export artifacts on a real ONNX Runtime session, checked against the torch reference."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from synth import make_checkpoint, make_config

import pltkit
from pltkit.export.artifact import export
from pltkit.runtime.artifact import Artifact
from pltkit.runtime.backends import open_backend
from pltkit.runtime.generate import generate
from pltkit.runtime.ort_backend import OrtBackend

TOL = 1e-4
CASES = {"L1": dict(plt_num_loops=1), "L2-hidden": dict(plt_num_loops=2),
         "L2-query-bias": dict(plt_num_loops=2, plt_gate_use_hidden_states=False, attention_bias=True),
         "L3-query-scales": dict(plt_num_loops=3, plt_gate_use_hidden_states=False, plt_emb_scale=0.707,
                                 plt_hidden_scale=0.053, tie_word_embeddings=True),
         # head_dim 16 and one loop: the GQA decode applies RoPE itself (do_rotary)
         "L1-rotary-linear": dict(plt_num_loops=1, head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0}),
         "L2-hd16": dict(plt_num_loops=2, head_dim=16),
         # GQA rotates q and k itself; the query-mode gate reads its own rotated query heads
         "L2-hd16-query": dict(plt_num_loops=2, head_dim=16, plt_gate_use_hidden_states=False)}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_checkpoint(d / "ckpt", make_config(**CASES[request.param]), seed=3)
    export(d / "ckpt", d / "art")
    return d / "ckpt", d / "art"


@pytest.mark.parametrize("batch", [1, 2])  # gqa: batch 1 prefills on GQA, batch 2 on the kvbuffer graph
@pytest.mark.parametrize("attention", ["function", "gqa", "kvbuffer"])
def test_logits_prefill_chunks_and_decode_match_reference(exported, attention, batch):
    ckpt, art = exported
    ref, ort = open_backend(ckpt, threads=1), OrtBackend(Artifact.open(art), 1, attention)
    ids = np.random.default_rng(0).integers(0, 300, (batch, 16))
    with torch.no_grad():
        full = ref.model(torch.from_numpy(ids)).numpy()
    worst = {"prefill": 0.0, "decode": 0.0}

    def check(kind, logits, sl):
        worst[kind] = max(worst[kind], np.abs(logits - full[:, sl]).max())

    state = ort.new_state(batch)
    for kind, a, b in (("prefill", 0, 7), ("prefill", 7, 9), ("decode", 9, 12), ("prefill", 12, 14),
                       ("decode", 14, 16)):  # 7: a length no graph was traced at; chunks after decodes
        if kind == "prefill":
            logits, state = ort.prefill(ids[:, a:b], state)
            check(kind, logits, slice(a, b))
        else:
            for t in range(a, b):
                logits, state = ort.decode(ids[:, t], state)
                check(kind, logits, t)
    print(attention, f"batch {batch}:", ", ".join(f"{k} max|ort - torch| = {v:.2e}" for k, v in worst.items()))
    assert max(worst.values()) < TOL
    assert state.pos == 16
    # GQA takes more than one position after a past at batch 1 only: a batched prefill, and a
    # batched decode step that writes spare positions, ran the kvbuffer graph
    batched = attention == "gqa" and batch > 1
    assert ("prefill" in ort._batched) == batched
    assert ("decode" in ort._batched) == (batched and ort.writes["decode"] > 1)


def test_decode_up_to_the_last_position(exported):
    """A GQA decode step writes spare positions after its token (GQA.step): the buffers and the RoPE
    tables have room for them up to the context's last position, and a token more is refused."""
    ckpt, art = exported
    ref, ort = open_backend(ckpt, threads=1), OrtBackend(Artifact.open(art), 1, "gqa")
    limit = ort.config.max_position_embeddings
    ids = np.random.default_rng(1).integers(0, 300, (1, limit))
    with torch.no_grad():
        full = ref.model(torch.from_numpy(ids)).numpy()
    _, state = ort.prefill(ids[:, :limit - 3], ort.new_state(1))
    worst = 0.0
    for t in range(limit - 3, limit):
        logits, state = ort.decode(ids[:, t], state)
        worst = max(worst, float(np.abs(logits - full[:, t]).max()))
    print(f"decode at positions {limit - 3}..{limit - 1} of {limit}: max|ort - torch| = {worst:.2e}, "
          f"{ort.writes['decode']} cache positions written per step")
    assert worst < TOL
    with pytest.raises(ValueError, match="exceeds the model"):
        ort.decode(ids[:, 0], state)


def test_greedy_64_tokens_equal_reference(exported):
    ckpt, art = exported
    prompt = [5, 17, 42, 99, 7]
    want = list(generate(open_backend(ckpt, threads=1), prompt, 64))
    got = list(generate(open_backend(art, threads=1), prompt, 64))
    assert len(want) == 64 and got == want


def test_artifact_is_self_describing(exported):
    ckpt, art = exported
    a = Artifact.open(art)
    a.verify()
    m, cfg = a.manifest, pltkit.PLTConfig.from_json(ckpt / "config.json")
    assert m["config"] == cfg.to_dict() and m["opset"] == 21 and m["precision"] == "fp32"
    assert m["custom_ops"][0]["domain"] == "plt.ops" and m["custom_ops"][0]["op"] == "LoopAttention"
    assert {"tokenizer.json", "weights.bin", "prefill.onnx", "decode.onnx", "decode.gqa.onnx"} <= set(m["files"])
    for phase, per_layer in (("prefill", cfg.plt_num_loops), ("decode", 1)):
        model = onnx.load(art / m["graphs"]["function"][phase]["file"], load_external_data=False)
        nodes = [n for n in model.graph.node if n.op_type == "LoopAttention"]
        assert len(nodes) == cfg.num_hidden_layers * per_layer and {n.domain for n in nodes} == {"plt.ops"}
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs["plugin_namespace"] == b"pltkit" and attrs["plugin_version"] == b"1"
        assert [f.name for f in model.functions] == ["LoopAttention"]
        assert set(m["graphs"]["function"][phase]["inputs"]) == {i.name for i in model.graph.input}
    fast = onnx.load(art / m["graphs"]["gqa"]["decode"]["file"], load_external_data=False)
    own = {op: [n for n in fast.graph.node if (n.domain, n.op_type) == ("pltkit", op)]
           for op in ("StepAttention", "RingMix")}
    assert not [n for n in fast.graph.node if n.op_type == "GroupQueryAttention"]  # inside the functions
    # a layer: its global attention, and with loops >= 1 one RingMix
    assert len(own["StepAttention"]) == cfg.num_hidden_layers
    assert len(own["RingMix"]) == (cfg.num_hidden_layers if cfg.plt_num_loops > 1 else 0)
    bodies = {f.name: f for f in fast.functions}
    assert [op for op in own if own[op]] == [op for op in bodies if op in own]

    def listed(op, source, version):
        return {"domain": "pltkit", "op": op, "version": version, "graphs": ["decode.gqa.onnx"], "function_body": True,
                "spec": f"pltkit/runtime/kernels/{source}.c"}
    assert m["custom_ops"][1:] == [listed("StepAttention", "step_attention", 1),
                                   *([listed("RingMix", "ring_mix", 2)] if own["RingMix"] else [])]
    if own["RingMix"] and cfg.plt_gate_use_hidden_states:  # a float32 graph: RingMix computes the gate itself
        assert all(n.input[6] == "" and len(n.input) == 16 for n in own["RingMix"])
        assert not [n for n in fast.graph.node if n.op_type != "RingMix" and any("plt_gate" in i for i in n.input)]
    calls = {op: sum(n.op_type == "GroupQueryAttention" for n in f.node) for op, f in bodies.items() if op in own}
    assert calls == {"StepAttention": 1, **({"RingMix": cfg.plt_num_loops - 1} if own["RingMix"] else {})}


def test_runtime_path_does_not_import_torch(exported):
    _, art = exported
    code = ("import sys, numpy as np; from pltkit.runtime.backends import open_backend; "
            "from pltkit.runtime.generate import generate; b = open_backend(sys.argv[1]); "
            "print(list(generate(b, [1, 2, 3], 4))); assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# the command line does not vary with the model: one loop and PLT-2 (every case's tokens: test_greedy_64_tokens_...)
@pytest.mark.parametrize("exported", ["L1", "L2-hidden"], indirect=True)
def test_cli_complete_same_tokens_on_both_backends(exported):
    ckpt, art = exported
    runs = [json.loads(subprocess.run(["plt-complete", "--model", str(m), *backend, "--json", "--max-tokens", "12",
                                       "def f(x):"], capture_output=True, text=True, check=True).stdout)
            for m, backend in ((ckpt, ["--backend", "torch"]), (art, []))]
    assert [r["backend"] for r in runs] == ["torch", "ort"]
    assert runs[0]["tokens"] == runs[1]["tokens"] and len(runs[0]["tokens"]) > 0
    assert set(runs[1]["timings"]) >= {"prompt_ms", "predicted_ms", "predicted_per_second"}


def test_export_bad_input_exit_code_2(tmp_path):
    def run(*args):
        return subprocess.run(["plt-export", *map(str, args)], capture_output=True, text=True)
    r = run(tmp_path / "missing", "-o", tmp_path / "a")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a model folder" in r.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    make_checkpoint(tmp_path / "ckpt")
    r = run(tmp_path / "ckpt", "-o", tmp_path / "busy")
    assert r.returncode == 2 and "--force" in r.stderr
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Ctrl-C half way through writing the weights (a KeyboardInterrupt raised where the export
    reads its sixth tensor, so that the moment does not depend on the machine's speed): plt-export
    exits 130 and leaves neither the artifact nor its partial folder."""
    from pltkit.export import artifact
    from pltkit.cli.export import main

    make_checkpoint(tmp_path / "ckpt")
    real, seen = artifact.read_tensor, []

    def read_tensor(*a, **kw):
        seen.append(sum(f.stat().st_size for f in tmp_path.glob(".art.partial-*/weights.bin")))
        if len(seen) == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(artifact, "read_tensor", read_tensor)
    assert main([str(tmp_path / "ckpt"), "-o", str(tmp_path / "art"), "--no-eval"]) == 130
    print(capsys.readouterr().err.strip().splitlines()[-1])
    assert seen[-1] > 0  # it was interrupted while writing the weights
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art.partial-*"))


@pytest.mark.parametrize("attention", ["gqa", "kvbuffer"])
def test_kv_buffer_graphs_update_the_cache_in_place(exported, attention):
    """The GQA decode and the kvbuffer graphs write the new keys into the buffers the state
    already holds (no new cache per step): read back from those same buffers, the cache equals
    the function path's."""
    _, art = exported
    fast, slow = (OrtBackend(Artifact.open(art), 1, a) for a in (attention, "function"))
    assert fast.kv_buffer == {"prefill": True, "decode": True}
    assert not any(slow.kv_buffer.values())
    ids = np.random.default_rng(1).integers(0, 300, (2, 9))
    states = []
    for b in (fast, slow):
        _, st = b.prefill(ids[:, :5], b.new_state(2))
        buffers = {k: v for k, v in st.kv.items()}
        for t in range(5, 9):
            _, st = b.decode(ids[:, t], st)
        if b is fast:
            assert all(st.kv[k] is buffers[k] for k in buffers), "decode reallocated the cache"
        states.append(st)
    diff = max(np.abs(states[0].kv[k][:, :, :9] - states[1].kv[k][:, :, :9]).max() for k in states[0].kv)
    print(f"max|cache {attention} - cache function| = {diff:.2e}")
    assert diff < 1e-5 and states[0].pos == states[1].pos == 9


def test_interleaved_states_decode_as_alone(exported):
    """The backend reuses its IO binding while the same cache buffers come back: two states decoded
    turn by turn (and a third made after one is freed) give the logits each gives alone."""
    _, art = exported
    b = OrtBackend(Artifact.open(art), 1)
    ids = np.random.default_rng(4).integers(0, 300, (3, 12))

    def alone(row):
        logits, st = b.prefill(ids[row:row + 1, :6], b.new_state(1))
        out = [logits[:, -1]]
        for t in range(6, 12):
            step, st = b.decode(ids[row:row + 1, t], st)
            out.append(step)
        return np.concatenate(out)

    want = [alone(r) for r in range(3)]
    states, got = {}, {0: [], 1: [], 2: []}
    for r in (0, 1):
        logits, states[r] = b.prefill(ids[r:r + 1, :6], b.new_state(1))
        got[r].append(logits[:, -1])
    for t in range(6, 12):
        if t == 9:  # free state 0; state 2 may get its memory
            del states[0]
            logits, states[2] = b.prefill(ids[2:3, :9], b.new_state(1))
            got[2].append(logits[:, 5])
            got[2] += [logits[:, k] for k in range(6, 9)]
        for r in states:
            step, states[r] = b.decode(ids[r:r + 1, t], states[r])
            got[r].append(step)
    for r in (1, 2):
        diff = np.abs(np.concatenate(got[r]) - want[r]).max()
        assert diff < 1e-5, (r, diff)
    assert np.abs(np.concatenate(got[0]) - want[0][:4]).max() < 1e-5


def test_format_1_artifacts_still_run(exported, tmp_path):
    """An artifact of format 1 has no prefill.gqa.onnx: its gqa set prefills on the function graph
    (copying). It still opens and matches the reference at batch 1 and 2."""
    ckpt, art = exported
    old = tmp_path / "v1"
    shutil.copytree(art, old)
    manifest = json.loads((old / "pltkit.json").read_text())
    manifest["format_version"] = 1
    manifest["graphs"]["gqa"]["prefill"] = manifest["graphs"]["function"]["prefill"]
    (old / "prefill.gqa.onnx").unlink()
    del manifest["files"]["prefill.gqa.onnx"]
    del manifest["sizes"]  # format 1 recorded none
    (old / "pltkit.json").write_text(json.dumps(manifest))
    backend, ref = OrtBackend(Artifact.open(old), 1, "gqa"), open_backend(ckpt, threads=1)
    assert backend.kv_buffer == {"prefill": False, "decode": True}
    for batch in (1, 2):
        ids = np.random.default_rng(batch).integers(0, 300, (batch, 10))
        with torch.no_grad():
            want = ref.model(torch.from_numpy(ids)).numpy()
        logits, state = backend.prefill(ids[:, :6], backend.new_state(batch))
        got = [logits]
        for t in range(6, 10):
            step, state = backend.decode(ids[:, t], state)
            got.append(step[:, None])
        diff = np.abs(np.concatenate(got, 1) - want).max()
        print(f"format 1, batch {batch}: max|ort - torch| = {diff:.2e}")
        assert diff < TOL


def test_cli_infill_json_fields():
    out = subprocess.run(["plt-complete", "--json", "--suffix", "\n\nprint(add(1, 2))\n", "--stop", "\n\n",
                          "--max-tokens", "16", "def add(a, b):\n    "], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert {"text", "tokens", "stop_type", "tokens_cached", "timings"} <= set(r)
    assert r["stop_type"] in ("eos", "limit", "word") and "\n\n" not in r["text"]


def test_graphs_hold_no_dead_nodes(exported):
    """ONNX Runtime warns about every node or initializer nothing reads (the one-loop GQA decode
    used to carry the unused RoPE gathers, an empty gate and ring outputs)."""
    _, art = exported
    for f in ("prefill.onnx", "decode.onnx", "prefill.gqa.onnx", "decode.gqa.onnx", "prefill.kvbuffer.onnx",
              "decode.kvbuffer.onnx"):
        g = onnx.load(art / f, load_external_data=False).graph
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n.name for n in g.node if not any(o in read for o in n.output)]
        assert not dead, f"{f}: {dead}"
        assert all(t.name in read for t in g.initializer), f


def test_prefill_of_the_last_position_only(exported):
    """prefill(last=True), as completion asks: the GQA prefill graph runs the head on the last position only
    (logits_from), and its logits are the last row of a whole prefill's; the graphs without that input
    (function, kvbuffer) give every position, as before. The state moves on alike."""
    _, art = exported
    ids = np.random.default_rng(6).integers(0, 300, (1, 11))
    for attention, rows in (("gqa", 1), ("function", 11), ("kvbuffer", 11)):
        b = OrtBackend(Artifact.open(art), 1, attention)
        whole, s1 = b.prefill(ids, b.new_state(1))
        last, s2 = b.prefill(ids, b.new_state(1), last=True)
        diff = np.abs(last[:, -1] - whole[:, -1]).max()
        print(f"{attention}: logits {last.shape}, max|last - whole's last row| {diff:.1e}")
        assert last.shape == (1, rows, whole.shape[-1]) and diff <= 1e-5
        assert s1.pos == s2.pos == 11
        step1, step2 = (b.decode(ids[:, -1], s)[0] for s in (s1, s2))  # the caches are alike
        assert np.abs(step1 - step2).max() <= 1e-5

