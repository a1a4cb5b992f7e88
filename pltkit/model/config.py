"""PLTConfig: the architecture of a PLT checkpoint, exactly as its config.json says.

Field names and defaults follow the published `IQuestPLTCoderForCausalLM` class
(LoopCoder-v2). Fields this class does not know are kept in `extra` and written
back, so `PLTConfig.from_dict(d).to_dict()` loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a PLT model; the message names the field (also in `field`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


ROPE_TYPES = ("default", "linear", "llama3")  # implemented in pltkit.model.plt.ROPE_SCALING

# field -> (lowest, highest) integer it may hold: generous for real models (LoopCoder-V2 7B: hidden 5120,
# 14 layers, 40 heads, head_dim 128, context 131072, vocab 75904), small enough that a typo cannot ask
# for gigabytes (rope tables are max_position_embeddings x head_dim; layers are built one by one). Refused
# on purpose: contexts beyond 2^20 positions (4M-context Llama-3 variants; head_dim 256 at 1M)
INT_BOUNDS = {
    "vocab_size": (1, 1 << 20),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (2, 1024),
    "max_position_embeddings": (1, 1 << 20),
    "plt_num_loops": (1, 16),
}
WINDOW_MAX = 1 << 20  # plt_window_size[0]
ROPE_TABLE_MAX = 1 << 27  # max_position_embeddings x head_dim: the rotary tables' values (512 MB in float32)
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")  # finite and > 0
# rope_scaling type -> the numeric fields it needs, each finite and > 0
ROPE_FIELDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(frozen=True)
class PLTConfig:
    vocab_size: int = 75904
    hidden_size: int = 5120  # D
    intermediate_size: int = 27648  # SwiGLU width
    num_hidden_layers: int = 14  # physical layers, shared by every loop
    num_attention_heads: int = 40  # H
    num_key_value_heads: int = 8  # grouped-query attention
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", ...}
    attention_bias: bool = False  # bias on q, k, v and o projections
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = (2, 75864, 75869)
    plt_num_loops: int = 2  # L; 1 is an ordinary transformer
    plt_window_size: tuple[int, int] = (64, 0)  # [left, right] of the local (G-SWA) branch
    plt_normalize_per_loop: bool = True  # model.norm on each non-last loop's output
    plt_emb_scale: float | None = None  # a in a*E + b*shift(C); None means 1.0
    plt_hidden_scale: float | None = None  # b; None means 1.0
    plt_gate_use_hidden_states: bool = False  # gate from the layer input (True) or the query
    plt_clp_shift: bool = True  # False runs the unshifted variant (loops serially per token)
    model_type: str = "iquestpltcoder"
    architectures: tuple[str, ...] = ("IQuestPLTCoderForCausalLM",)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        # JSON gives lists; keep tuples so the frozen config is really immutable.
        for name in ("eos_token_id", "plt_window_size", "architectures"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    # -- derived values -------------------------------------------------------------
    @property
    def window_left(self) -> int:
        return self.plt_window_size[0]

    @property
    def emb_scale(self) -> float:
        return 1.0 if self.plt_emb_scale is None else float(self.plt_emb_scale)

    @property
    def hidden_scale(self) -> float:
        return 1.0 if self.plt_hidden_scale is None else float(self.plt_hidden_scale)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default"))

    # -- validation -----------------------------------------------------------------
    def _validate(self):
        def fail(name, why):
            raise ConfigError(f"config field {name!r} = {getattr(self, name)!r}: {why}", name)

        for name, (lo, hi) in INT_BOUNDS.items():
            value = getattr(self, name)
            if not _is_int(value) or not lo <= value <= hi:
                fail(name, f"must be an integer from {lo} to {hi}")
        if self.max_position_embeddings * self.head_dim > ROPE_TABLE_MAX:
            fail("max_position_embeddings", f"times head_dim ({self.head_dim}) must be at most {ROPE_TABLE_MAX} "
                                            "(the size of the rotary tables)")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_attention_heads",
                 f"must be divisible by num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            fail("head_dim", "must be even for rotary embeddings")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' (SwiGLU) is supported")
        for name in POSITIVE_FLOATS:
            if not _is_positive(getattr(self, name)):
                fail(name, "must be a finite number > 0")
        w = self.plt_window_size
        if not (isinstance(w, tuple) and len(w) == 2 and all(_is_int(x) for x in w)
                and 0 <= w[0] <= WINDOW_MAX and w[1] == 0):
            fail("plt_window_size", f"must be [left, 0] with left from 0 to {WINDOW_MAX} (the local branch is causal)")
        for name in ("plt_emb_scale", "plt_hidden_scale"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value)):
                fail(name, "must be a finite number or null")
        if not (self.bos_token_id is None or _is_int(self.bos_token_id) and self.bos_token_id >= 0):
            fail("bos_token_id", "must be a token id or null")
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings", "plt_normalize_per_loop",
                     "plt_gate_use_hidden_states", "plt_clp_shift"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        if not (self.eos_token_id is None or isinstance(self.eos_token_id, (int, tuple))) or \
                not all(_is_int(i) and 0 <= i < self.vocab_size for i in self.eos_token_ids):
            fail("eos_token_id", f"must be token ids below vocab_size ({self.vocab_size})")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                fail("rope_scaling", "must be an object or null")
            if self.rope_type not in ROPE_TYPES:
                fail("rope_scaling", f"rope type {self.rope_type!r} is not supported "
                                     f"(supported: {', '.join(ROPE_TYPES)})")
            needs = ROPE_FIELDS[self.rope_type]
            missing = [k for k in needs if k not in self.rope_scaling]
            if missing:
                fail("rope_scaling", f"{self.rope_type} scaling needs {', '.join(missing)}")
            for key in needs:
                if not _is_positive(self.rope_scaling[key]):
                    raise ConfigError(f"config field 'rope_scaling.{key}' = {self.rope_scaling[key]!r}: "
                                      "must be a finite number > 0", "rope_scaling")
            if self.rope_type == "llama3" and not \
                    self.rope_scaling["low_freq_factor"] < self.rope_scaling["high_freq_factor"]:
                fail("rope_scaling", "llama3 scaling needs low_freq_factor < high_freq_factor")

    # -- (de)serialization ----------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> PLTConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> PLTConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {' '.join(str(e).split())}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {str(e).removeprefix('config ')}", e.field) from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes) -> PLTConfig:
        return dataclasses.replace(self, **changes)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_positive(x) -> bool:
    """A finite number > 0 (NaN and inf are not)."""
    return _is_number(x) and math.isfinite(x) and x > 0
