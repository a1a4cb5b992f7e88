"""Training data for pltkit's embedded default model.

The default model is a small PLT code model trained on CPU on the Python
standard library. The data recipe:

1. Corpus. The ``.py`` files of the running interpreter's standard library,
   without installed packages (``site-packages``, ``dist-packages``), without
   test suites (any folder named like ``test``, ``tests``, ``idle_test``,
   ``test_*``, ``*_tests``), without generated data (``pydoc_data``, the codec
   tables in ``encodings``) and without files that are not valid UTF-8. Source
   is read as bytes and decoded strictly, so newlines and tabs stay exactly as
   written.
2. Split. A file is held out when the sha256 of its path relative to the
   library root falls in the first ``holdout_percent`` of the hash range. The
   split depends only on the file's relative path, so every machine with the
   same Python version holds out the same files. Held-out files are never
   used to train the tokenizer or the model.
3. Tokenizer. Byte-level BPE (GPT-2 style pre-tokenization, no prefix space,
   all 256 bytes in the alphabet, so any text round-trips exactly) trained on
   the training files, with the special tokens of :data:`SPECIAL_TOKENS` at
   ids 0..5 in the Qwen2.5-Coder naming that pltkit's FIM prompts use.
4. Chunks. Each document is tokenized once and cut into chunks that fit one
   training row, preferably just before a newline. Special-token strings that
   occur in source text are tokenized as ordinary text: only the pipeline
   inserts special tokens.
5. Examples. Every epoch, each chunk independently becomes, with probability
   ``fim_rate``, a fill-in-the-middle example in prefix-suffix-middle order
   (``<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>M<|endoftext|>``, with P, S
   and M tokenized separately, exactly as a server tokenizes an editor's
   prefix and suffix), and otherwise stays plain text followed by
   ``<|endoftext|>``. See :func:`fim_middle_span` for how M is chosen.
6. Packing. Examples are packed whole, in shuffled file order, into rows of
   ``seq_len + 1`` tokens; an example never straddles two rows, so a middle is
   always trained together with its prefix and suffix. The unused tail of a
   row is padding whose targets are :data:`IGNORE_INDEX`. Examples in a row
   attend to each other (no document mask), as is usual for packed training.
   Rows are shuffled before they are cut into batches.
7. Evaluation. Held-out files are tokenized as plain text, each followed by
   ``<|endoftext|>``, concatenated in order, and cut into windows so that every
   held-out token is predicted exactly once.

Everything random takes an explicit seed or :class:`numpy.random.Generator`,
so the same inputs give the same batches on every run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|file_sep|>",
    "<|repo_name|>",
)
EOT, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEP, REPO_NAME = range(len(SPECIAL_TOKENS))

#: Target value of padding positions (the default ``ignore_index`` of torch's cross-entropy).
IGNORE_INDEX = -100

_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages"})
_TEST_DIRS = frozenset({"test", "tests", "testing"})
# Generated files rather than code: pydoc's topic texts (one 750 KB file of prose) and the
# codec charmap tables.
_GENERATED_DIRS = frozenset({"pydoc_data", "encodings"})

# Middle-span mix of FIM examples; the rest of the probability mass picks one line.
_RANDOM_SPAN_RATE = 0.2
_MULTI_LINE_RATE = 0.3
_MAX_MIDDLE_LINES = 8

# Special tokens of the largest example (FIM) and room for the few extra tokens
# that tokenizing P, S and M separately adds at the two cuts.
_FIM_OVERHEAD = 4
_RETOKENIZE_SLACK = 8

# How many of the most recent rows stay open for packing more examples.
_OPEN_ROWS = 32

Part = int | str | np.ndarray
"""One piece of an example: a special token id, text to tokenize, or token ids."""


@dataclass(frozen=True)
class Chunk:
    """A piece of one document that fits a training row."""

    text: str
    ids: np.ndarray  # the tokens of ``text`` as tokenized within its document


# --- corpus -----------------------------------------------------------------


def stdlib_sources(root: str | os.PathLike | None = None) -> list[Path]:
    """The UTF-8 ``.py`` files under the standard library ``root``, sorted.

    ``root`` defaults to the running interpreter's standard library. Folders
    of installed packages and of test suites are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not _is_excluded_dir(name)]
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted(path for path in files if _is_utf8(path))


def _is_excluded_dir(name: str) -> bool:
    return (
        name in _PACKAGE_DIRS
        or name in _TEST_DIRS
        or name in _GENERATED_DIRS
        or name.startswith("test_")
        or name.endswith(("_test", "_tests"))
    )


def _is_utf8(path: Path) -> bool:
    try:
        read_source(path)
    except UnicodeDecodeError:
        return False
    return True


def read_source(path: str | os.PathLike) -> str:
    """The text of a source file, decoded as strict UTF-8 without newline translation."""
    return Path(path).read_bytes().decode("utf-8")


def stdlib_split(root: str | os.PathLike | None = None) -> tuple[list[Path], list[Path]]:
    """(train, held-out) files of the standard library under root (default: this interpreter's)."""
    root = sysconfig.get_paths()["stdlib"] if root is None else root
    return split_files(stdlib_sources(root), root)


def split_files(
    files: Sequence[str | os.PathLike], root: str | os.PathLike, holdout_percent: float = 5
) -> tuple[list[Path], list[Path]]:
    """Split ``files`` into (train, held-out) by the hash of their path relative to ``root``.

    Both lists keep the order of ``files``.
    """
    train, heldout = [], []
    for path in map(Path, files):
        bucket = heldout if _hash_percentile(path, root) < holdout_percent else train
        bucket.append(path)
    return train, heldout


def _hash_percentile(path: Path, root: str | os.PathLike) -> float:
    """Where sha256 of the relative POSIX path falls in [0, 100)."""
    relative = path.relative_to(root).as_posix()
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") * 100 / 2**64


# --- tokenizer --------------------------------------------------------------


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


def _text_encoder(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of ``tokenizer`` that tokenizes special-token strings in text as plain text (a
    PlainEncoder of pltkit.model.tokenizer already does)."""
    if not isinstance(tokenizer, Tokenizer):
        return tokenizer
    encoder = Tokenizer.from_str(tokenizer.to_str())
    encoder.encode_special_tokens = True
    return encoder


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
    encodings = _text_encoder(tokenizer).encode_batch(texts, add_special_tokens=False)
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


# --- fill-in-the-middle examples --------------------------------------------


def fim_transform(
    text: str, rng: np.random.Generator, fim_rate: float = 0.5, ids: np.ndarray | None = None
) -> list[Part]:
    """Turn one chunk into a training example, as a list of parts.

    With probability ``fim_rate`` the example is prefix-suffix-middle:
    ``[FIM_PREFIX, P, FIM_SUFFIX, S, FIM_MIDDLE, M, EOT]`` with P + M + S ==
    ``text``; otherwise it is ``[text, EOT]``, where ``ids`` (the chunk's
    tokens, if given) stand in for ``text`` to save tokenizing it again.
    """
    if rng.random() >= fim_rate:
        return [text if ids is None else ids, EOT]
    start, end = fim_middle_span(text, rng)
    return [FIM_PREFIX, text[:start], FIM_SUFFIX, text[end:], FIM_MIDDLE, text[start:end], EOT]


def fim_middle_span(text: str, rng: np.random.Generator) -> tuple[int, int]:
    """Character span ``(start, end)`` of the middle of a FIM example.

    The split is made on characters, not tokens, because an editor's cursor
    can be anywhere, including inside what would be one token: a model
    trained only on token-aligned prefixes has never seen a prefix ending in
    ``ret`` and completes it badly. The span mimics what code-completion
    clients ask for: they send whole lines around the cursor as prefix and
    suffix and want the rest of the current line or a few lines after it.

    - most often (50 %) the rest of one line: the cursor falls anywhere from
      the end of the line's indentation (a whole new line after the editor
      auto-indented) to just before the line's last character (a partial
      line), and the middle ends before the newline, so the suffix starts
      with the newline as it does in an editor;
    - often (30 %) the same from the cursor to the end of a line 2 to 8 lines
      down, for multi-line completions such as a block body;
    - sometimes (20 %) a uniformly random character span, the original FIM
      recipe (Bavarian et al., 2022), which covers long middles and middles
      that end inside a line (text after the cursor, such as closing brackets).

    Lines are picked among non-blank lines; a chunk without one gets a random span.
    """
    mode = rng.random()
    lines = _nonblank_lines(text)
    if mode < _RANDOM_SPAN_RATE or not lines:
        return _random_span(len(text), rng)
    n_lines = 1 if mode < 1 - _MULTI_LINE_RATE else int(rng.integers(2, _MAX_MIDDLE_LINES + 1))
    first = int(rng.integers(len(lines)))
    line_start, line_end = lines[first]
    line = text[line_start:line_end]
    indent_end = line_start + len(line) - len(line.lstrip())
    start = int(rng.integers(indent_end, line_end))
    end = _line_end(text, line_end, n_lines - 1)
    return start, end


def _nonblank_lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line with non-whitespace text, newline excluded."""
    spans, start = [], 0
    for line in text.split("\n"):
        if line.strip():
            spans.append((start, start + len(line)))
        start += len(line) + 1
    return spans


def _line_end(text: str, pos: int, lines_down: int) -> int:
    """End (before the newline) of the line ``lines_down`` lines below the one ending at ``pos``."""
    for _ in range(lines_down):
        if pos == len(text):
            break
        newline = text.find("\n", pos + 1)
        pos = len(text) if newline < 0 else newline
    return pos


def _random_span(length: int, rng: np.random.Generator) -> tuple[int, int]:
    start, end = sorted(int(x) for x in rng.integers(0, length + 1, size=2))
    return start, end


# --- packing and batches ----------------------------------------------------


def encode_examples(examples: Sequence[Sequence[Part]], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Token ids of each example; all text parts are tokenized in one batch."""
    texts = [part for example in examples for part in example if isinstance(part, str)]
    encoded = iter(_text_encoder(tokenizer).encode_batch(texts, add_special_tokens=False))

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
            yield _inputs_and_targets(rows[start : start + batch_size])


def eval_sequences(
    files: Sequence[str | os.PathLike], tokenizer: Tokenizer, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out files as plain text windows ``(inputs, targets)``, each ``[N, seq_len]``.

    The files, in the given order, each followed by ``<|endoftext|>``, form
    one stream that starts with ``<|endoftext|>``; every token of the files
    and every separator is a target exactly once (the last window is padded
    with IGNORE_INDEX targets). A sample of them: :func:`spread`.
    """
    texts = [read_source(path) for path in files]
    encodings = _text_encoder(tokenizer).encode_batch(texts, add_special_tokens=False)
    stream = np.concatenate([[EOT], *([*enc.ids, EOT] for enc in encodings)]).astype(np.int32)
    n_windows = -(-(len(stream) - 1) // seq_len)
    padded = np.full(n_windows * seq_len + 1, IGNORE_INDEX, dtype=np.int32)
    padded[: len(stream)] = stream
    windows = np.arange(n_windows)[:, None] * seq_len + np.arange(seq_len + 1)
    return _inputs_and_targets(padded[windows])


def spread(n: int, k: int | None) -> np.ndarray:
    """k distinct indices of range(n), evenly spaced from 0 to n - 1 (the same on every run): a
    fixed sample of n evaluation windows. All n when k is None or k >= n."""
    if k is None or k >= n:
        return np.arange(n)
    return np.arange(k) * (n - 1) // max(k - 1, 1)


def _inputs_and_targets(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Split rows ``[B, T + 1]`` into inputs (padding read as EOT) and targets ``[B, T]``."""
    rows = torch.from_numpy(rows.astype(np.int64))
    inputs = rows[:, :-1].masked_fill(rows[:, :-1] == IGNORE_INDEX, EOT)
    return inputs, rows[:, 1:].clone()
