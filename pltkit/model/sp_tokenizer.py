"""A SentencePiece `tokenizer.model` with the Hugging Face files beside it, read the way the slow
transformers tokenizers (LlamaTokenizer with legacy=True, and the PreTrainedTokenizer subclasses that
copy it) read them, without importing transformers or any code of the checkpoint:

- added tokens (`added_tokens_decoder` in tokenizer_config.json, added_tokens.json, and the named
  special tokens) are split out of the text first, leftmost then longest, honouring lstrip, rstrip and
  single_word; SentencePiece encodes each piece between them on its own (legacy: each gets the dummy
  prefix "▁");
- decoding keeps special tokens out of SentencePiece, with the slow tokenizer's spacing rules
  (spaces_between_special_tokens=False, clean_up_tokenization_spaces as configured).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from pltkit.model.paths import CheckpointError

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


class SentencePieceTokenizer:
    """The backend of PLTTokenizer for `tokenizer.model` checkpoints."""

    def __init__(self, model: bytes, tcfg: dict, special_map: dict, added_json: dict):
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        proto = sentencepiece_model_pb2.ModelProto.FromString(model)
        proto.normalizer_spec.add_dummy_prefix = False  # for text that continues other text
        self.sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        n = self.sp.get_piece_size()
        if tcfg.get("legacy") is False:
            log.warning("tokenizer_config.json sets legacy: false; pltkit encodes as legacy SentencePiece does")
        self.add_prefix_space = bool(tcfg.get("add_prefix_space", False))
        self.clean_up = bool(tcfg.get("clean_up_tokenization_spaces", False))

        self.added: dict[str, AddedToken] = {}
        for i, t in sorted((tcfg.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            t = t if isinstance(t, dict) else {"content": t}
            self.added[t["content"]] = AddedToken(int(i), t["content"], bool(t.get("lstrip")), bool(t.get("rstrip")),
                                                  bool(t.get("single_word")))
        for content, i in (added_json or {}).items():
            self.added.setdefault(content, AddedToken(int(i), content))
        # the special tokens: named ones and additional_special_tokens (tokenizer_config.json first)
        named = {k: _content(tcfg.get(k, special_map.get(k))) for k in NAMED_SPECIALS}
        additional = [_content(t) for t in (tcfg.get("additional_special_tokens")
                                             or special_map.get("additional_special_tokens") or [])]
        self.named = {k: v for k, v in named.items() if v}
        for content in [*self.named.values(), *additional]:
            if content and content not in self.added:
                i = self.sp.piece_to_id(content)
                if self.sp.id_to_piece(i) != content:
                    i = max([n - 1, *(t.id for t in self.added.values())]) + 1
                self.added[content] = AddedToken(i, content)
        self.special = set(self.named.values()) | set(filter(None, additional))
        self.by_id = {t.id: t.content for t in self.added.values()}
        self.special_ids = {self.added[t].id for t in self.special}
        # added tokens decoded apart from the SentencePiece runs (transformers' "legacy added tokens")
        self.apart = (set(self.added) - self.special) | {t for t in additional if t and self.added[t].id >= n}
        self.vocab_size = max([n, *(t.id + 1 for t in self.added.values())])
        alts = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, alts))) if alts else None
        # what encoding with add_special_tokens puts around the text (add_bos_token is on by default)
        self.prefix_ids = [self.added[self.named["bos_token"]].id] if tcfg.get("add_bos_token", True) and \
            "bos_token" in self.named else []
        self.suffix_ids = [self.added[self.named["eos_token"]].id] if tcfg.get("add_eos_token", False) and \
            "eos_token" in self.named else []

    @classmethod
    def from_dir(cls, path: Path, tcfg: dict) -> SentencePieceTokenizer:
        special_map, added = _read_json(path / "special_tokens_map.json"), _read_json(path / "added_tokens.json")
        try:
            return cls((path / MODEL_FILE).read_bytes(), tcfg, special_map, added)
        except (RuntimeError, DecodeError) as e:  # what sentencepiece and protobuf raise for a corrupt model
            raise CheckpointError(f"{path / MODEL_FILE}: not a SentencePiece model ({' '.join(str(e).split())})") \
                from None

    # --- encoding ---
    def _sp(self, text: str) -> list[int]:
        return self.sp.encode(" " + text if self.add_prefix_space else text)

    def encode(self, text: str) -> list[int]:
        """Special-token names in the text stay text (transformers' split_special_tokens=True)."""
        return self._sp(text) if text else []

    def encode_continuation(self, text: str) -> list[int]:
        """Text that continues other text: no dummy-prefix "▁" in front of it."""
        return self.sp_cont.encode(text) if text else []

    def count_batch(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.sp.encode([" " + t if self.add_prefix_space else t for t in texts])]

    def encode_with_specials(self, text: str) -> list[int]:
        pieces = self._split.split(text) if self._split else [text]
        found = self._split.findall(text) if self._split else []
        parts: list = [pieces[0]]
        for tok, after in zip(found, pieces[1:]):
            parts += [self.added[tok], after]
        for k, p in enumerate(parts):  # lstrip/rstrip/single_word, in order, as transformers does
            if not isinstance(p, AddedToken):
                continue
            left = parts[k - 1] if k > 0 else None
            right = parts[k + 1] if k + 1 < len(parts) else None
            if p.rstrip and right and isinstance(right, str):
                parts[k + 1] = right.lstrip()
            if p.lstrip and left and isinstance(left, str):
                parts[k - 1] = left.rstrip()
            if p.single_word and isinstance(left, str) and left and left[-1] != " ":
                parts[k - 1], parts[k] = left + p.content, ""
            elif p.single_word and isinstance(right, str) and right and right[0] != " ":
                parts[k + 1], parts[k] = p.content + right, ""
        ids: list[int] = []
        for p in parts:
            if isinstance(p, AddedToken):
                ids.append(p.id)
            elif p:
                ids += self._sp(p)
        return ids

    # --- decoding ---
    def _sp_decode(self, ids: list[int]) -> str:
        n = self.sp.get_piece_size()
        return self.sp.decode([i for i in ids if 0 <= i < n])

    def _run_to_text(self, run: list[int]) -> str:
        """transformers' convert_tokens_to_string of the legacy Llama tokenizer."""
        out, sub, prev_special = "", [], False
        for k, i in enumerate(run):
            token = self.by_id.get(i)
            if token in self.special:
                if not prev_special and k != 0:
                    out += " "
                out += self._sp_decode(sub) + token
                sub, prev_special = [], True
            else:
                sub.append(i)
                prev_special = False
        return out + self._sp_decode(sub)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        parts, run = [], []
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            token = self.by_id.get(i)
            if token in self.apart:
                if run:
                    parts.append(self._run_to_text(run))
                    run = []
                parts.append(token)
            else:
                run.append(i)
        if run:
            parts.append(self._run_to_text(run))
        text = "".join(parts)
        if self.clean_up:
            for a, b in CLEAN_UP:
                text = text.replace(a, b)
        return text

    def decode_continuation(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of tokens that follow others: SentencePiece drops the leading space of a text's
        first piece ("▁def" -> "def"), which a continuation keeps."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        text = self.decode(ids)
        if ids and ids[0] not in self.by_id and 0 <= ids[0] < self.sp.get_piece_size():
            piece = self.sp.id_to_piece(ids[0])
            if piece.startswith("▁") and self.sp.decode([ids[0]]) == piece[1:].replace("▁", " "):
                return " " + text
        return text

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token].id
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        if i in self.by_id:
            return self.by_id[i]
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None


def _content(token) -> str | None:
    if isinstance(token, dict):  # {"content": "<s>", ...}
        token = token.get("content")
    return token if isinstance(token, str) else None


def _read_json(path: Path) -> dict:
    from pltkit.model.tokenizer import _read_json as read  # one JSON reader: CheckpointError naming the file
    return read(path)
