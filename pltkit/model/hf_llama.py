"""A Hugging Face `LlamaForCausalLM` folder read for import: the PLTConfig of its config.json, and its
safetensors weights, whose names a PLT model with one loop keeps."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pltkit.model.checkpoint import INDEX, SINGLE, STORED_DTYPES, read_header, read_index
from pltkit.model.config import ConfigError, PLTConfig
from pltkit.model.paths import CheckpointError, ImportModelError

log = logging.getLogger(__name__)

HF_ARCHITECTURE = "LlamaForCausalLM"
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# config.json field -> (refused when it holds, why)
_REFUSED = {
    "quantization_config": (bool, "quantized checkpoints are not supported (import the float weights)"),
    "hidden_act": (lambda v: v != "silu", "only 'silu' (SwiGLU) is supported"),
    "partial_rotary_factor": (lambda v: v != 1.0, "pltkit rotates the whole head (factor 1.0)"),
    **dict.fromkeys(("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"),
                    (lambda v: v is not None, "not part of the Llama architecture pltkit runs")),
}
# PLTConfig field -> its default where config.json does not have it (same name in both)
_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False,
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def read_hf_config(src: Path) -> PLTConfig:
    """The PLTConfig of the folder's config.json (hf_llama_config)."""
    if not (src / "config.json").is_file():
        raise ImportModelError(f"{src}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ImportModelError(f"cannot read {src / 'config.json'}: {e}") from None
    if not isinstance(hf, dict):
        raise ImportModelError(f"{src / 'config.json'}: expected a JSON object")
    return hf_llama_config(hf, where=str(src / "config.json"))


def hf_llama_config(hf: dict, where: str = "config.json") -> PLTConfig:
    """The PLTConfig (one loop) of a Hugging Face Llama config.json; ImportModelError naming the field
    for anything the PLT model cannot represent."""
    _check(hf, where)
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or (hf["hidden_size"] // heads if isinstance(heads, int) and heads else 0),
        hidden_act="silu",
        **{field: hf.get(field, default) for field, default in _DEFAULTS.items()},
        **_rope(hf),
        plt_num_loops=1,
    )
    extra = {}
    if hf.get("pad_token_id") is not None:
        extra["pad_token_id"] = hf["pad_token_id"]
    for key in ("torch_dtype", "dtype"):
        if isinstance(hf.get(key), str):
            extra["torch_dtype"] = hf[key]
    try:
        return PLTConfig(**fields, extra=extra)
    except ConfigError as e:
        raise ImportModelError(f"{where}: {e}") from None


def _check(hf: dict, where: str) -> None:
    """ImportModelError for another architecture, a missing field or one (_REFUSED) pltkit cannot run."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if HF_ARCHITECTURE not in archs and model_type != "llama":
        what = ", ".join(map(str, archs)) or f"model_type {model_type!r}"
        raise ImportModelError(f"{where}: architecture {what} is not supported; only {HF_ARCHITECTURE} "
                               "(model_type 'llama') is imported")
    for field in _REQUIRED:
        if field not in hf:
            raise ImportModelError(f"{where}: field {field!r} is missing")
    for field, (refused, why) in _REFUSED.items():
        if field in hf and refused(hf[field]):
            raise ImportModelError(f"{where}: field {field!r} = {hf.get(field)!r}: {why}")


def _rope(hf: dict) -> dict:
    """rope_theta and rope_scaling (None for the default rope), from the fields of either transformers version."""
    rope_theta = hf.get("rope_theta", 10000.0)
    rope_scaling = hf.get("rope_scaling")
    if isinstance(hf.get("rope_parameters"), dict):  # newer transformers: theta and scaling in one object
        params = dict(hf["rope_parameters"])
        rope_theta = params.pop("rope_theta", rope_theta)
        rope_scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        rope_scaling = None
    return {"rope_theta": rope_theta, "rope_scaling": rope_scaling}


def hf_weights(src: Path, cfg: PLTConfig) -> list[tuple[str, str, tuple[int, ...], Path]]:
    """(name, safetensors dtype, shape, file) of every tensor to import from the folder: all but the rotary
    buffers some old checkpoints saved and a tied output layer's stored copy of the embedding."""
    plan, skipped = [], []
    for file in _weight_files(src):
        for name, (stored, shape) in read_header(file).items():  # CheckpointError naming a corrupt header
            if name.endswith(".rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                skipped.append(name)
                continue
            if stored not in STORED_DTYPES:
                raise ImportModelError(f"{file.name}: tensor {name} is stored as {stored}, not a float type "
                                       "(quantized checkpoints are not supported)")
            plan.append((name, stored, shape, file))
    if skipped:
        log.info("not imported (recomputed or tied): %s", ", ".join(skipped))
    return plan


def _weight_files(src: Path) -> list[Path]:
    if (src / INDEX).is_file():
        try:
            names = sorted(set(read_index(src).values()))
        except CheckpointError as e:
            raise ImportModelError(str(e)) from None
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise ImportModelError(f"{src / INDEX} names shard files that do not exist: {', '.join(missing)}")
        return [src / n for n in names]
    if (src / SINGLE).is_file():
        return [src / SINGLE]
    if any(src.glob("*.bin")) or any(src.glob("*.pt")) or any(src.glob("*.pth")):
        raise ImportModelError(f"{src}: only safetensors weights are imported (no pickle); "
                               f"no {SINGLE} or {INDEX} here")
    raise ImportModelError(f"{src}: no {SINGLE} or {INDEX}")
