"""The default model's tokenizer: a byte-level BPE trained on the training files, with the
special tokens of :data:`pltkit.train.data.SPECIAL_TOKENS` at ids 0..5."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pltkit.train.data import EOT, SPECIAL_TOKENS, read_source

log = logging.getLogger(__name__)


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    model_max_length: int = 2048,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``files`` and save it to ``out_dir``.

    Pass the training files only. Writes ``tokenizer.json`` and an HF-style
    ``tokenizer_config.json``; ``model_max_length`` is the context length the
    model is trained for. The result depends only on the contents and order
    of ``files``.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [read_source(path) for path in files]
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = _tokenizer_config(model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("trained a %d-token BPE on %d files", tokenizer.get_vocab_size(), len(texts))
    return tokenizer


def _tokenizer_config(model_max_length: int) -> dict:
    added = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": SPECIAL_TOKENS[EOT],
        "eos_token": SPECIAL_TOKENS[EOT],
        "pad_token": SPECIAL_TOKENS[EOT],
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
