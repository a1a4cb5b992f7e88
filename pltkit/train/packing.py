"""Training rows (steps 4 to 6 of the data recipe in pltkit.train.data): documents tokenized
once and cut into chunks, each chunk made an example every epoch (pltkit.train.fim), the examples
packed whole into rows, the rows shuffled and cut into batches."""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer

from pltkit.model.tokenizer import plain_text
from pltkit.train.data import IGNORE_INDEX, inputs_and_targets, read_source
from pltkit.train.fim import Part, fim_transform

log = logging.getLogger(__name__)

# Special tokens of the largest example (FIM) and room for the few extra tokens
# that tokenizing P, S and M separately adds at the two cuts.
_FIM_OVERHEAD = 4
_RETOKENIZE_SLACK = 8

# How many of the most recent rows stay open for packing more examples.
_OPEN_ROWS = 32


@dataclass(frozen=True)
class Chunk:
    """A piece of one document that fits a training row."""

    text: str
    ids: np.ndarray  # the tokens of ``text`` as tokenized within its document


# --- chunks -----------------------------------------------------------------


def max_chunk_tokens(seq_len: int) -> int:
    """The chunk size that lets any example built from a chunk fit a row of ``seq_len + 1``."""
    size = seq_len + 1 - _FIM_OVERHEAD - _RETOKENIZE_SLACK
    if size < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for a chunk")
    return size


def load_chunks(
    files: Sequence[str | os.PathLike], tokenizer: Tokenizer, max_tokens: int
) -> list[list[Chunk]]:
    """Tokenize every file once and cut it into chunks of at most ``max_tokens`` tokens."""
    texts = [read_source(path) for path in files]
    encodings = plain_text(tokenizer).encode_batch(texts, add_special_tokens=False)
    chunks = [_chunk_document(text, enc, max_tokens) for text, enc in zip(texts, encodings)]
    log.info(
        "%d files, %d tokens, %d chunks",
        len(texts),
        sum(len(enc.ids) for enc in encodings),
        sum(map(len, chunks)),
    )
    return chunks


def _chunk_document(text: str, encoding: Encoding, max_tokens: int) -> list[Chunk]:
    ids = np.asarray(encoding.ids, dtype=np.int32)
    if len(ids) == 0:
        return []
    offsets = np.asarray(encoding.offsets, dtype=np.int64)
    cuts = _token_cuts(text, offsets, max_tokens)
    chars = [0, *(int(offsets[cut, 0]) for cut in cuts[1:-1]), len(text)]
    return [
        Chunk(text[chars[k] : chars[k + 1]], ids[cuts[k] : cuts[k + 1]])
        for k in range(len(cuts) - 1)
    ]


def _token_cuts(text: str, offsets: np.ndarray, max_tokens: int) -> list[int]:
    """Token indices that cut a document into pieces of at most ``max_tokens`` tokens.

    Each cut is the last token boundary within reach that starts with a
    newline, or else the last one that falls between two characters (a byte
    level token may hold part of a character).
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    clean = np.flatnonzero(starts[1:] >= ends[:-1]) + 1
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    at_newline = clean[codepoints[starts[clean]] == ord("\n")]
    cuts = [0]
    while len(starts) - cuts[-1] > max_tokens:
        lo, hi = cuts[-1], cuts[-1] + max_tokens
        cuts.append(_last_in(at_newline, lo, hi) or _last_in(clean, lo, hi) or hi)
    cuts.append(len(starts))
    return cuts


def _last_in(sorted_indices: np.ndarray, lo: int, hi: int) -> int:
    """The largest index in (lo, hi], or 0 when there is none."""
    k = np.searchsorted(sorted_indices, hi, side="right")
    return int(sorted_indices[k - 1]) if k and sorted_indices[k - 1] > lo else 0


# --- packing and batches ----------------------------------------------------


def encode_examples(examples: Sequence[Sequence[Part]], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Token ids of each example; all text parts are tokenized in one batch."""
    texts = [part for example in examples for part in example if isinstance(part, str)]
    encoded = iter(plain_text(tokenizer).encode_batch(texts, add_special_tokens=False))

    def part_ids(part: Part) -> np.ndarray:
        if isinstance(part, str):
            return np.asarray(next(encoded).ids, dtype=np.int32)
        if isinstance(part, np.ndarray):
            return part
        return np.array([part], dtype=np.int32)

    return [np.concatenate([part_ids(part) for part in example]) for example in examples]


def pack_examples(
    examples: Sequence[np.ndarray], row_len: int, open_rows: int = _OPEN_ROWS
) -> np.ndarray:
    """Pack whole examples into rows of ``row_len`` tokens padded with IGNORE_INDEX.

    Each example goes into the first of the last ``open_rows`` rows that has
    room for it, or else starts a new row: short examples fill the gaps that
    long ones leave, and the bounded window keeps packing linear in time. An
    example longer than a row is truncated to the row.
    """
    used, placements, truncated = [], [], 0
    for ids in examples:
        length = min(len(ids), row_len)
        truncated += length < len(ids)
        candidates = range(max(0, len(used) - open_rows), len(used))
        row = next((r for r in candidates if used[r] + length <= row_len), len(used))
        if row == len(used):
            used.append(0)
        placements.append((row, used[row], length))
        used[row] += length
    rows = np.full((len(used), row_len), IGNORE_INDEX, dtype=np.int32)
    for ids, (row, offset, length) in zip(examples, placements):
        rows[row, offset : offset + length] = ids[:length]
    log.debug("packed %d examples into %d rows, %d truncated", len(examples), len(rows), truncated)
    return rows


def epoch_rows(
    chunks: Sequence[Sequence[Chunk]],
    tokenizer: Tokenizer,
    seq_len: int,
    rng: np.random.Generator,
    fim_rate: float = 0.5,
) -> np.ndarray:
    """One epoch of packed rows ``[N, seq_len + 1]``, files in an order drawn from ``rng``."""
    examples = [
        fim_transform(chunk.text, rng, fim_rate, ids=chunk.ids)
        for file_index in rng.permutation(len(chunks))
        for chunk in chunks[file_index]
    ]
    return pack_examples(encode_examples(examples, tokenizer), seq_len + 1)


def batches(
    files: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    fim_rate: float = 0.5,
    epochs: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches ``(inputs, targets)``, each a LongTensor ``[batch_size, seq_len]``.

    ``targets`` is ``inputs`` shifted by one, with IGNORE_INDEX on padding.
    Files are tokenized once, on the first batch. Each epoch draws a new file
    order and new FIM examples from ``(seed, epoch)`` and shuffles the packed
    rows; the rows that do not fill a last batch are dropped. Runs for
    ``epochs`` epochs, or forever when it is None.
    """
    chunks = load_chunks(files, tokenizer, max_chunk_tokens(seq_len))
    for epoch in itertools.count() if epochs is None else range(epochs):
        rng = np.random.default_rng([seed, epoch])
        rows = epoch_rows(chunks, tokenizer, seq_len, rng, fim_rate)
        rows = rows[rng.permutation(len(rows))]
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield inputs_and_targets(rows[start : start + batch_size])
