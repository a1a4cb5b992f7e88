"""Loops of depth at the cost of one: plain (one loop), serial-loop L=2 (the cost model of
pltkit.runtime.serial) and PLT-2, on the SAME weights (the default model's, positions raised
to the longest context), on torch and ONNX Runtime at fp32 / int8 / int4.

Timing is per decoded token after a prefill of `ctx` tokens, median of `steps` tokens, repeated
`repeats` times with the variants interleaved, forward and backward in turn (ratios come from one
run). Each measurement starts from a copy of the prefilled state, so every repeat decodes at the
same context; the copy's first step, which binds its buffers, is not timed. Before a form's first context each
variant decodes twice that many tokens untimed: a session's first runs (its memory arena growing, first bindings)
took PLT-2 at the large shape 1.1-1.2x its later repeats.
Prefill speed is measured over at most PREFILL_REPEATS of the repeats: at the large shape each takes seconds, and
many short repeats are what make the decode medians hold through the host's slow spells.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pltkit.export import export_stamp
from pltkit.bench.nodes import loop_nodes
from pltkit.runtime import kernels

VARIANTS = ("plain", "serial2", "plt2")


# the default model's weights, or random weights of a shape whose decode is bound by weight
# reads rather than per-node overhead (as a real code model's is)
SHAPES = {"default": None,
          "medium": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                         num_key_value_heads=4, head_dim=64),
          # about 0.8 B parameters: even int4 weights (0.4 GB) far exceed any L3 cache, as a 7B model's do
          "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=4, head_dim=128, vocab_size=32000)}


def make_checkpoints(workdir: Path, max_positions: int, shape: str = "medium") -> dict[str, Path]:
    """{"plt2": PLT-2 checkpoint, "plain": the same weight file with plt_num_loops = 1 (its loop
    gates are then unused)}, with max_position_embeddings raised to max_positions."""
    import torch

    from pltkit.model.checkpoint import TOKENIZER_FILES, save_checkpoint
    from pltkit.model.config import PLTConfig
    from pltkit.model.paths import resolve_model_path
    from pltkit.model.plt import PLTForCausalLM
    from pltkit.train.train import init_weights

    src = resolve_model_path("default")
    out = {}
    for name, loops in (("plt2", 2), ("plain", 1)):
        d = workdir / f"{shape}-{name}-{max_positions}"
        if not (d / "config.json").is_file():
            tmp = d.with_name(d.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            if SHAPES[shape] is None or name == "plain":
                tmp.mkdir(parents=True)
                weights = src if SHAPES[shape] is None else out["plt2"]
                for f in ("model.safetensors", *TOKENIZER_FILES):
                    if (weights / f).is_file():
                        shutil.copy(weights / f, tmp / f)
                cfg = json.loads((weights / "config.json").read_text())
            else:
                torch.manual_seed(0)
                base = PLTConfig.from_json(src / "config.json")
                model = PLTForCausalLM(base.replace(**SHAPES[shape]))
                init_weights(model)
                save_checkpoint(model, tmp)
                for f in TOKENIZER_FILES:
                    if (src / f).is_file() and f != "config.json":
                        shutil.copy(src / f, tmp / f)
                cfg = json.loads((tmp / "config.json").read_text())
            cfg.update(max_position_embeddings=max_positions, plt_num_loops=loops)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
            tmp.rename(d)
        out[name] = d
    return out


def artifact_dir(ckpt: Path, prec: str, workdir: Path) -> Path:
    """Where a checkpoint's artifact of one precision is kept (named for the export code)."""
    return workdir / f"{ckpt.name}-{prec}-{export_stamp()}"


def make_artifacts(checkpoints: dict[str, Path], workdir: Path, precisions) -> dict[tuple[str, str], Path]:
    """(variant checkpoint, precision) -> an exported artifact, kept in workdir between runs."""
    from pltkit.export.artifact import export
    from pltkit.quant.schemes import SCHEMES
    from pltkit.runtime.artifact import is_artifact

    out = {}
    for name, ckpt in checkpoints.items():
        for prec in precisions:
            art = artifact_dir(ckpt, prec, workdir)
            if not is_artifact(art):
                export(ckpt, art, force=True, quant=SCHEMES.get(prec))
            out[name, prec] = art
    return out


def open_form(form: str, checkpoints, artifacts, threads: int, variants=VARIANTS) -> dict:
    """{variant: backend} for a form "torch-fp32" | "torch-int8" | "ort-<precision>" (a scheme name,
    which may hold a dash: "ort-int8-dq")."""
    from pltkit.runtime.backends import open_backend
    from pltkit.runtime.serial import SerialLoops

    kind, prec = form.split("-", 1)
    needed = {"plt2"} & set(variants) | ({"plain"} if {"plain", "serial2"} & set(variants) else set())
    if kind == "torch":
        backends = {v: open_backend(checkpoints[v], "torch", threads) for v in needed}
        if prec == "int8":  # torch's own dynamic int8 linear layers
            import torch
            for b in backends.values():
                b.model = torch.ao.quantization.quantize_dynamic(b.model, {torch.nn.Linear}, dtype=torch.qint8)
    else:
        backends = {v: open_backend(artifacts[v, prec], "ort", threads) for v in needed}
    if "serial2" in variants:
        backends["serial2"] = SerialLoops(backends["plain"], 2)
    return {v: backends[v] for v in variants}


def decode_ms(backend, state, steps: int, rng) -> float:
    """The median ms of `steps` decode steps from a copy of `state`, after one untimed step: the first step from
    a copy binds its new buffers (at the large shape, int4, 256 tokens: plain 32 ms, PLT-2 39 ms; the next steps
    25.5 and 27.2), and with few steps a block it would weigh in the median."""
    state = state.clone()
    _, state = backend.decode(np.asarray([rng.integers(10, backend.config.vocab_size)]), state)
    times = []
    for t in rng.integers(10, backend.config.vocab_size, steps):
        start = time.perf_counter()
        _, state = backend.decode(np.asarray([t]), state)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def prefill_tps(backend, ids: np.ndarray) -> float:
    start = time.perf_counter()
    backend.prefill(ids, backend.new_state(1))
    return ids.shape[1] / (time.perf_counter() - start)


PREFILL_REPEATS = 5
CHUNK = 256  # prefill chunk (the completion engine uses 64): bounds the attention scores' memory


def prefill_chunked(backend, ids: np.ndarray, state):
    for start in range(0, ids.shape[1], CHUNK):
        _, state = backend.prefill(ids[:, start:start + CHUNK], state)
    return state


def prefilled(backend, prompt: np.ndarray, contexts) -> dict:
    """{ctx: state after prefilling prompt[:ctx]}, one chunked prefill."""
    states, state, pos = {}, backend.new_state(1), 0
    for ctx in sorted(contexts):
        state = prefill_chunked(backend, prompt[:, pos:ctx], state)
        states[ctx], pos = state.clone(), ctx
    return states


def run(forms, contexts, steps: int, repeats: int, threads: int, workdir: Path, shape: str = "medium",
        rss_forms=("ort-fp32",), prefill_tokens: int = 512, log=print) -> dict:
    """{"decode_ms": {form: {ctx: {variant: ms}}}, "prefill_tps": {form: {variant: tokens/s}},
    "kv_bytes": {ctx: {variant: bytes}}, "peak_rss_mb": {form: {variant: MB}}, "nodes_per_layer":
    {precision: {variant: n}} (ONNX Runtime forms), "repeats": {form: {ctx: {variant: [ms, ...]}}}}:
    medians over the interleaved repeats, and each repeat's decode figures."""
    from pltkit.runtime.serial import SerialState

    if steps > 56:
        raise ValueError("steps must be at most 56 (positions are the longest context + 64)")
    checkpoints = make_checkpoints(workdir, max(contexts) + 64, shape)
    precisions = sorted({f.split("-", 1)[1] for f in forms if f.startswith("ort-")})
    log(f"{shape} shape; exporting {len(precisions) * 2} artifacts (kept in {workdir})")
    artifacts = make_artifacts(checkpoints, workdir, precisions)
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, 4000, (1, max(contexts)))
    out = {"shape": shape, "decode_ms": {}, "prefill_tps": {}, "kv_bytes": {}, "repeats": {}}
    for form in forms:
        backends = open_form(form, checkpoints, artifacts, threads)
        states = {v: prefilled(backends[v], prompt, contexts) for v in ("plain", "plt2")}
        # the serial loops' passes see the same tokens: each starts from a copy of the plain state
        states["serial2"] = {c: SerialState([s.clone(), s.clone()]) for c, s in states["plain"].items()}
        if not out["kv_bytes"]:
            out["kv_bytes"] = {c: {v: kv_bytes(states[v][c]) for v in VARIANTS} for c in contexts}
        out["decode_ms"][form] = {}
        for v in VARIANTS:  # (untimed: a session's first runs; see the docstring)
            for _ in range(2):
                decode_ms(backends[v], states[v][contexts[0]], steps, rng)
        for ctx in contexts:
            runs = {v: [] for v in VARIANTS}
            for r in range(repeats):
                for v in _turn(r):
                    runs[v].append(decode_ms(backends[v], states[v][ctx], steps, rng))
            out["decode_ms"][form][ctx] = {v: statistics.median(r) for v, r in runs.items()}
            out["repeats"].setdefault(form, {})[ctx] = runs
            log(f"{form:>10} ctx {ctx:>5}: " + "  ".join(f"{v} {m:.2f} ms" for v, m in
                                                         out["decode_ms"][form][ctx].items()))
        ids = prompt[:, :prefill_tokens]
        tps = {v: [] for v in VARIANTS}
        for r in range(min(repeats, PREFILL_REPEATS)):
            for v in _turn(r):
                tps[v].append(prefill_tps(backends[v], ids))
        out["prefill_tps"][form] = {v: statistics.median(r) for v, r in tps.items()}
        del backends, states  # before the next form's sessions open (at --shape large: GBs each)
    out["peak_rss_mb"] = peak_rss(checkpoints, max(contexts), threads, [f for f in forms if f in rss_forms])
    if artifacts:
        out["nodes_per_layer"] = loop_nodes(artifacts)
        out["nodes_on_pltkit_kernels"] = kernels.available()
    return out


ORDER = ("plain", "plt2", "serial2")  # plain and PLT-2 next to each other: a repeat's ratio spans ~2 blocks, not ~4


def _turn(repeat: int) -> tuple:
    """The variants in repeat's order: forward, then backward, so that none always runs first or after another
    (the machine's speed drifts over seconds), and PLT-2 always next to plain and to serial L=2."""
    return ORDER if repeat % 2 == 0 else ORDER[::-1]


def kv_bytes(state) -> int:
    """Bytes of a decode state's entries: caches, rings and carries (ONNX Runtime's cache buffers
    also have room to grow, by doubling: that room is not counted)."""
    from pltkit.runtime.buffer_state import BufferState
    from pltkit.runtime.serial import SerialState

    if isinstance(state, SerialState):
        return sum(kv_bytes(s) for s in state.states)
    if isinstance(state, BufferState):
        return (sum(b[:, :, :state.pos].nbytes for b in state.kv.values())
                + sum(a.nbytes for a in state.other.values()))
    return state.nbytes()


def peak_rss(checkpoints, ctx: int, threads: int, forms) -> dict:
    """Peak resident memory of a fresh process that loads one variant, prefills `ctx` tokens and
    decodes 8 (the artifacts are those run() exported)."""
    out = {}
    for form in forms:
        out[form] = {}
        for v in VARIANTS:
            args = [form, v, str(ctx), str(threads), *(str(checkpoints[n]) for n in ("plain", "plt2"))]
            r = subprocess.run([sys.executable, "-m", "pltkit.bench.loops", *args], capture_output=True, text=True)
            out[form][v] = float(r.stdout.split()[-1]) if r.returncode == 0 else None
    return out


def _rss_child(form: str, variant: str, ctx: int, threads: int, plain: Path, plt2: Path) -> float:
    checkpoints = {"plain": plain, "plt2": plt2}
    prec = form.split("-", 1)[1]
    artifacts = {(n, prec): artifact_dir(p, prec, p.parent) for n, p in checkpoints.items()}
    backend = open_form(form, checkpoints, artifacts, threads, (variant,))[variant]
    state = prefill_chunked(backend, np.random.default_rng(0).integers(10, 4000, (1, ctx)), backend.new_state(1))
    for t in range(8):
        _, state = backend.decode(np.asarray([10 + t]), state)
    # VmHWM, not getrusage's ru_maxrss: that one keeps the parent's peak across fork and exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":  # the peak-RSS child process
    form, variant, ctx, threads, plain, plt2 = sys.argv[1:7]
    print(round(_rss_child(form, variant, int(ctx), int(threads), Path(plain), Path(plt2)), 1))
