"""The tokenizer of a checkpoint: HF `tokenizers` tokenizer.json, with the special
tokens a runtime needs (bos, every eos, FIM tokens) read from the files beside it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

# FIM token names of the model families in use; a tokenizer's format is the first whose
# prefix, suffix and middle tokens all exist in its vocabulary.
FIM_FORMATS = {
    "qwen": {"prefix": "<|fim_prefix|>", "suffix": "<|fim_suffix|>", "middle": "<|fim_middle|>",
             "pad": "<|fim_pad|>", "file_sep": "<|file_sep|>", "repo_name": "<|repo_name|>"},
    "starcoder": {"prefix": "<fim_prefix>", "suffix": "<fim_suffix>", "middle": "<fim_middle>",
                  "pad": "<fim_pad>", "file_sep": "<file_sep>", "repo_name": "<repo_name>"},
    "deepseek": {"prefix": "<｜fim▁begin｜>", "suffix": "<｜fim▁hole｜>", "middle": "<｜fim▁end｜>"},
    "codellama": {"prefix": "<PRE>", "suffix": "<SUF>", "middle": "<MID>", "eot": "<EOT>"},
}


@dataclass(frozen=True)
class FimTokens:
    format: str
    prefix: int
    suffix: int
    middle: int
    pad: int | None = None
    file_sep: int | None = None
    repo_name: int | None = None
    eot: int | None = None  # an end token of the infill besides eos


class PLTTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos_id: int | None, eos_ids: tuple[int, ...]):
        self._tok = tokenizer
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True  # user text never turns into control tokens
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.fim = _find_fim(tokenizer)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> PLTTokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tcfg, gen, cfg = (_read_json(path / n) for n in ("tokenizer_config.json", "generation_config.json",
                                                          "config.json"))
        eos = []
        for ids in (gen.get("eos_token_id"), cfg.get("eos_token_id"), _token_id(tok, tcfg.get("eos_token"))):
            for i in ([] if ids is None else [ids] if isinstance(ids, int) else ids):
                if i not in eos:
                    eos.append(i)
        bos = gen.get("bos_token_id", cfg.get("bos_token_id", _token_id(tok, tcfg.get("bos_token"))))
        return cls(tok, bos, tuple(eos))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text as plain tokens: no bos added, special-token names in the text stay text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def count_batch(self, texts: list[str]) -> list[int]:
        """Token counts of several texts, each encoded alone (in parallel)."""
        return [len(e.ids) for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def encode_with_specials(self, text: str) -> list[int]:
        """Text in which special-token names (e.g. <|fim_prefix|>) become those tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_id(tok: Tokenizer, token) -> int | None:
    if isinstance(token, dict):  # {"content": "<|endoftext|>", ...}
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None


def _find_fim(tok: Tokenizer) -> FimTokens | None:
    for name, names in FIM_FORMATS.items():
        ids = {role: tok.token_to_id(t) for role, t in names.items()}
        if all(ids[r] is not None for r in ("prefix", "suffix", "middle")):
            return FimTokens(format=name, **ids)
    return None
