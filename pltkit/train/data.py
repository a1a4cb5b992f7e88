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
   ids 0..5 in the Qwen2.5-Coder naming that pltkit's FIM prompts use
   (:mod:`pltkit.train.bpe`).
4. Chunks. Each document is tokenized once and cut into chunks that fit one
   training row, preferably just before a newline. Special-token strings that
   occur in source text are tokenized as ordinary text: only the pipeline
   inserts special tokens (:mod:`pltkit.train.packing`).
5. Examples. Every epoch, each chunk independently becomes, with probability
   ``fim_rate``, a fill-in-the-middle example in prefix-suffix-middle order
   (``<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>M<|endoftext|>``, with P, S
   and M tokenized separately, exactly as a server tokenizes an editor's
   prefix and suffix), and otherwise stays plain text followed by
   ``<|endoftext|>``. See :func:`pltkit.train.fim.fim_middle_span` for how M
   is chosen.
6. Packing. Examples are packed whole, in shuffled file order, into rows of
   ``seq_len + 1`` tokens; an example never straddles two rows, so a middle is
   always trained together with its prefix and suffix. The unused tail of a
   row is padding whose targets are :data:`IGNORE_INDEX`. Examples in a row
   attend to each other (no document mask), as is usual for packed training.
   Rows are shuffled before they are cut into batches
   (:mod:`pltkit.train.packing`).
7. Evaluation. Held-out files are tokenized as plain text, each followed by
   ``<|endoftext|>``, concatenated in order, and cut into windows so that every
   held-out token is predicted exactly once.

Everything random takes an explicit seed or :class:`numpy.random.Generator`,
so the same inputs give the same batches on every run.

This module holds steps 1, 2 and 7 and the special tokens' ids.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from pltkit.model.tokenizer import plain_text

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


# --- evaluation -------------------------------------------------------------


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
    encodings = plain_text(tokenizer).encode_batch(texts, add_special_tokens=False)
    stream = np.concatenate([[EOT], *([*enc.ids, EOT] for enc in encodings)]).astype(np.int32)
    n_windows = -(-(len(stream) - 1) // seq_len)
    padded = np.full(n_windows * seq_len + 1, IGNORE_INDEX, dtype=np.int32)
    padded[: len(stream)] = stream
    windows = np.arange(n_windows)[:, None] * seq_len + np.arange(seq_len + 1)
    return inputs_and_targets(padded[windows])


def spread(n: int, k: int | None) -> np.ndarray:
    """k distinct indices of range(n), evenly spaced from 0 to n - 1 (the same on every run): a
    fixed sample of n evaluation windows. All n when k is None or k >= n."""
    if k is None or k >= n:
        return np.arange(n)
    return np.arange(k) * (n - 1) // max(k - 1, 1)


def inputs_and_targets(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Split rows ``[B, T + 1]`` into inputs (padding read as EOT) and targets ``[B, T]``."""
    rows = torch.from_numpy(rows.astype(np.int64))
    inputs = rows[:, :-1].masked_fill(rows[:, :-1] == IGNORE_INDEX, EOT)
    return inputs, rows[:, 1:].clone()
