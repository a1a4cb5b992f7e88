"""The tokenizer of a checkpoint, with the special tokens a runtime needs (bos, every eos, FIM
tokens) read from the files beside it. Backends, the first whose file the folder has:
HF `tokenizers` tokenizer.json, or a SentencePiece tokenizer.model (pltkit.model.sp_tokenizer)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer

from pltkit.model.paths import CheckpointError

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


class JsonTokenizer:
    """The backend for tokenizer.json: a `tokenizers.Tokenizer`."""

    prefix_ids = suffix_ids = ()  # prompts are laid out without bos, as they always were

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._plain = plain_text(tokenizer)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: Path, tcfg: dict) -> JsonTokenizer:
        return cls(read_tokenizer_json(path / "tokenizer.json"))

    # the *_batch calls release the GIL while they work, encode and decode do not: a long text
    # tokenized on a server's thread would hold up every other thread, its event loop included
    def encode(self, text: str) -> list[int]:
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids

    encode_continuation = encode

    def count_batch(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def encode_with_specials(self, text: str) -> list[int]:
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]

    decode_continuation = decode

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)


def _sentencepiece(path: Path, tcfg: dict):
    from pltkit.model.sp_tokenizer import SentencePieceTokenizer  # sentencepiece is only needed here

    return SentencePieceTokenizer.from_dir(path, tcfg)


# the file a tokenizer is read from -> its backend, the first found wins
BACKENDS = {"tokenizer.json": JsonTokenizer.from_dir, "tokenizer.model": _sentencepiece}


class PLTTokenizer:
    def __init__(self, backend, bos_id: int | None, eos_ids: tuple[int, ...]):
        self._tok = backend
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        # what the tokenizer's config puts around a text (a SentencePiece model's bos)
        self.prefix_ids, self.suffix_ids = tuple(backend.prefix_ids), tuple(backend.suffix_ids)
        self.add_bos = bool(self.prefix_ids) and bos_id is not None  # prompts start with bos
        self.fim = _find_fim(backend)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> PLTTokenizer:
        path = Path(path)
        load = next((f for name, f in BACKENDS.items() if (path / name).is_file()), None)
        if load is None:
            raise FileNotFoundError(f"{path}: no {' or '.join(BACKENDS)}")
        tcfg, gen, cfg = (_read_json(path / n) for n in ("tokenizer_config.json", "generation_config.json",
                                                          "config.json"))
        tok = load(path, tcfg)
        eos = []
        for ids in (gen.get("eos_token_id"), cfg.get("eos_token_id"), _token_id(tok, tcfg.get("eos_token"))):
            for i in ([] if ids is None else [ids] if isinstance(ids, int) else ids):
                if i not in eos:
                    eos.append(i)
        bos = gen.get("bos_token_id", cfg.get("bos_token_id", _token_id(tok, tcfg.get("bos_token"))))
        return cls(tok, bos, tuple(eos))

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def encode(self, text: str) -> list[int]:
        """Text as plain tokens: no bos added, special-token names in the text stay text."""
        return self._tok.encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        """As encode, for text that continues other text: a SentencePiece tokenizer puts no "▁"
        (its dummy prefix) in front, so encode(a) + encode_continuation(b) reads as the text a + b."""
        return self._tok.encode_continuation(text)

    def count_batch(self, texts: list[str]) -> list[int]:
        """Token counts of several texts, each encoded alone (in parallel)."""
        return self._tok.count_batch(texts)

    def encode_with_specials(self, text: str) -> list[int]:
        """Text in which special-token names (e.g. <|fim_prefix|>) become those tokens."""
        return self._tok.encode_with_specials(text)

    def add_special_tokens(self, ids: list[int]) -> list[int]:
        """`ids` with bos (and eos) around them where the tokenizer's config asks for them, as
        transformers' encode(add_special_tokens=True) does."""
        return [*self.prefix_ids, *ids, *self.suffix_ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_continuation(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of tokens that continue a text: as decode, but a SentencePiece tokenizer keeps the
        leading space that it drops at the start of a text."""
        return self._tok.decode_continuation(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def eog_ids(self) -> frozenset[int]:
        """The tokens that end a generation, as llama.cpp's end-of-generation set: every eos, and a
        code model's FIM tokens and file and repo separators (the model moving on to another hole or
        file: nothing to put at the cursor)."""
        fim = [getattr(self.fim, f) for f in ("prefix", "suffix", "middle", "pad", "eot", "file_sep", "repo_name")
               ] if self.fim else []
        return frozenset(self.eos_ids) | {i for i in fim if i is not None}

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its piece's length: a byte-level or byte
        fallback piece is at least as long as its text). A text of n characters is at least
        n / max_token_chars tokens: what lets a server cut an input before tokenizing it. (It
        assumes no normalizer drops characters and no run of unknown characters becomes one
        token, which holds for the byte-level and byte-fallback tokenizers of code models.)"""
        return max(1, max(len(self.id_to_token(i) or "") for i in range(self.vocab_size)))


class _Encoding(NamedTuple):
    ids: list[int]


class PlainEncoder:
    """A PLTTokenizer's plain encoding behind the part of the `tokenizers.Tokenizer` interface that
    evaluation and calibration use (encode, encode_batch: objects with .ids)."""

    def __init__(self, tok: PLTTokenizer):
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        return _Encoding(self.tok.encode(text))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[_Encoding]:
        return [_Encoding(self.tok.encode(t)) for t in texts]


def text_tokenizer(path: str | os.PathLike):
    """The tokenizer code windows are cut with: tokenizer.json as a `tokenizers.Tokenizer`, or else
    a PlainEncoder (a SentencePiece tokenizer.model)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return read_tokenizer_json(path / "tokenizer.json")
    return PlainEncoder(PLTTokenizer.from_dir(path))


def plain_text(tokenizer):
    """`tokenizer` with special-token names in text tokenized as plain text, so that user text and
    source code never turn into control tokens: a copy of a `tokenizers.Tokenizer` with
    encode_special_tokens set; anything else (a PlainEncoder) encodes so already and is returned."""
    if not isinstance(tokenizer, Tokenizer):
        return tokenizer
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.encode_special_tokens = True
    return plain


def read_tokenizer_json(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        if isinstance(e, OSError):
            raise
        raise CheckpointError(f"{file}: not a tokenizer ({' '.join(str(e).split())})") from None


def _read_json(path: Path) -> dict:
    """A JSON object from a file beside the tokenizer, {} when there is none."""
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not JSON ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _token_id(tok, token) -> int | None:
    if isinstance(token, dict):  # {"content": "<|endoftext|>", ...}
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None


def _find_fim(tok) -> FimTokens | None:
    for name, names in FIM_FORMATS.items():
        ids = {role: tok.token_to_id(t) for role, t in names.items()}
        if all(ids[r] is not None for r in ("prefix", "suffix", "middle")):
            return FimTokens(format=name, **ids)
    return None
