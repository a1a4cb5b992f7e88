"""The tokenizer files rebuilt from a GGUF file's vocabulary: the parts every rebuild writes, and the
tokenizer.json of a byte-level BPE vocabulary (tokenizer.ggml.model 'gpt2'). A SentencePiece one
('llama') is rebuilt by pltkit.model.gguf_spm."""

from __future__ import annotations

import logging
from pathlib import Path

from pltkit.model.gguf_file import GGUFMeta
from pltkit.model.paths import ImportModelError

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # token types: GGUF and SentencePiece agree


def _smollm(pre_tokenizers) -> list:
    return [pre_tokenizers.Digits(individual_digits=True)]


# GGUF pre-tokenizer -> the splits before GPT-2's byte-level one that rebuild it exactly; others fall back
# to the byte-level split alone
GGUF_PRE_TOKENIZERS = {"smollm": _smollm}


# --- what every rebuild writes ----------------------------------------------------------------------------
def token_name(meta: GGUFMeta, tokens: list[str], key: str) -> str | None:
    """The text of the token tokenizer.ggml.<key>_token_id names (None if none)."""
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None


def special_names(meta: GGUFMeta, tokens: list[str]) -> dict:
    """tokenizer_config.json's bos_token, eos_token, unk_token and pad_token."""
    return {f"{name}_token": token_name(meta, tokens, key)
            for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}


def added_entry(content: str, special: bool) -> dict:
    """An added token as tokenizer_config.json's added_tokens_decoder lists it."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def config_tail(meta: GGUFMeta, **more) -> dict:
    """The last keys of tokenizer_config.json: `more`, then the chat template if the file has one."""
    tail = {"clean_up_tokenization_spaces": False, "model_max_length": meta.get("llama.context_length", 2048),
            **more}
    if meta.get("tokenizer.chat_template"):
        tail["chat_template"] = meta.get("tokenizer.chat_template")
    return tail


def generation_config(meta: GGUFMeta) -> dict:
    """generation_config.json: the bos and eos token ids the file names."""
    ids = {k: meta.get(f"tokenizer.ggml.{g}_token_id") for k, g in (("bos_token_id", "bos"), ("eos_token_id", "eos"))}
    return {k: v for k, v in ids.items() if v is not None}


# --- byte-level BPE ---------------------------------------------------------------------------------------
def gguf_bpe(meta: GGUFMeta, path: Path) -> tuple[int, dict]:
    """(the number of tokens, {file name: bytes or JSON object}) for a GGUF `gpt2` tokenizer."""
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ImportModelError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ImportModelError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    vocab = _vocab(tokens, path)
    tok, added = _bpe_tokenizer(meta, path, vocab, _merges(merges, path), tokens, types)
    tcfg = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": {str(vocab[t.content]): added_entry(t.content, t.special) for t in added},
        **special_names(meta, tokens),
        **config_tail(meta, tokenizer_class="PreTrainedTokenizerFast"),
    }
    return tok.get_vocab_size(with_added_tokens=True), {
        "tokenizer.json": tok.to_str(pretty=True).encode(), "tokenizer_config.json": tcfg,
        "generation_config.json": generation_config(meta)}


def _vocab(tokens: list[str], path: Path) -> dict[str, int]:
    """token -> id; a token repeating an earlier one's text keeps the first id (and is said)."""
    vocab, duplicates = {}, []
    for i, token in enumerate(tokens):
        if token in vocab:
            duplicates.append(i)
        else:
            vocab[token] = i
    if duplicates:
        log.warning("%s: %d tokens repeat an earlier token's text and cannot be produced (ids %s...)",
                    path.name, len(duplicates), duplicates[:5])
    return vocab


def _merges(merges: list[str], path: Path) -> list[tuple[str, str]]:
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or " " in b:
            raise ImportModelError(f"{path}: merge {m!r} is not two tokens separated by one space")
        pairs.append((a, b))
    return pairs


def _bpe_tokenizer(meta: GGUFMeta, path: Path, vocab: dict, pairs: list, tokens: list[str], types: list[int]):
    """(the tokenizers.Tokenizer, its added tokens) with the ids the file gives them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in GGUF_PRE_TOKENIZERS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([*GGUF_PRE_TOKENIZERS[pre](pre_tokenizers), byte_level])
    else:
        log.warning("%s: pre-tokenizer %r is approximated by GPT-2's byte-level split; text may tokenize "
                    "differently from llama.cpp (exact: %s)", path.name, pre, ", ".join(GGUF_PRE_TOKENIZERS))
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED) and vocab.get(tokens[i]) == i]
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    wrong = [t.content for t in added if tok.token_to_id(t.content) != vocab[t.content]]
    if wrong:
        raise ImportModelError(f"{path}: could not keep the ids of added tokens {wrong[:5]}")
    return tok, added
