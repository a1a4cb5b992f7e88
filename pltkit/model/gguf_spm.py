"""A SentencePiece tokenizer.model (and the slow tokenizer's files) rebuilt from a GGUF file's
`llama` tokenizer: its tokens, scores and token types.

llama.cpp's converter writes the SentencePiece pieces first (normal, unknown, control and byte
pieces, scored), then the tokens the Hugging Face tokenizer added on top. The model is rebuilt from
the pieces up to the last normal, byte or unknown one; the tokens after them become added tokens
(control: special, user-defined: not special) as they were, and unused padding is left out.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pltkit.model.gguf_file import GGUFMeta
from pltkit.model.gguf_tokenizer import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, added_entry,
                                         config_tail, generation_config, special_names)
from pltkit.model.paths import ImportModelError


def gguf_sentencepiece(meta: GGUFMeta, path: Path) -> tuple[int, dict]:
    """(the number of tokens, {file name: bytes or a JSON object}) for a GGUF `llama` tokenizer."""
    tokens, scores = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens or [])
    if not tokens or not scores:
        raise ImportModelError(f"{path}: a llama tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.scores")
    if not len(tokens) == len(scores) == len(types):
        raise ImportModelError(f"{path}: {len(tokens)} tokens, {len(scores)} scores, {len(types)} types")
    if UNKNOWN not in types:
        raise ImportModelError(f"{path}: no token of the unknown type")
    pieces = 1 + max(i for i, t in enumerate(types) if t in (NORMAL, BYTE, UNKNOWN))
    duplicates = sorted(t for t, n in Counter(tokens[:pieces]).items() if n > 1)
    if duplicates:
        raise ImportModelError(f"{path}: pieces defined twice: {duplicates[:5]}")

    added = {i: types[i] == CONTROL for i in range(pieces, len(tokens)) if types[i] in (CONTROL, USER_DEFINED)}
    added.update({i: True for i in range(pieces) if types[i] in (CONTROL, UNKNOWN)})
    tcfg = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "legacy": True,
        "added_tokens_decoder": {str(i): added_entry(tokens[i], added[i]) for i in sorted(added)},
        "additional_special_tokens": [tokens[i] for i in sorted(added) if i >= pieces and added[i]],
        **special_names(meta, tokens),
        "unk_token": tokens[types.index(UNKNOWN)],
        **config_tail(meta),
    }
    files = {"tokenizer.model": _model_proto(meta, tokens, scores, types, pieces), "tokenizer_config.json": tcfg,
             "generation_config.json": generation_config(meta)}
    return max([pieces, *(i + 1 for i in added)]), files


def _model_proto(meta: GGUFMeta, tokens: list[str], scores: list[float], types: list[int], pieces: int) -> bytes:
    """The serialized SentencePiece ModelProto of the first `pieces` tokens."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    def special_id(key, default=-1):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return i if isinstance(i, int) and 0 <= i < pieces else default

    m = pb.ModelProto()
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE  # llama.cpp's SPM tokenizer merges by score, as SentencePiece's BPE does
    ts.vocab_size = pieces
    ts.byte_fallback = BYTE in types[:pieces]
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = (types.index(UNKNOWN), special_id("bos"), special_id("eos"),
                                                  special_id("padding"))
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    ns.escape_whitespaces = True
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        ns.precompiled_charsmap = bytes(charsmap)
    for token, score, kind in zip(tokens[:pieces], scores, types):
        p = m.pieces.add()
        p.piece, p.score = token, float(score)
        p.type = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
    return m.SerializeToString()
