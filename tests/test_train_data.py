"""Tests of the training data pipeline (pltkit.train.data) on a small fake library."""

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from pltkit.train import bpe, data, fim, packing
from pltkit.train.data import (
    EOT,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    IGNORE_INDEX,
    SPECIAL_TOKENS,
)

VOCAB_SIZE = 400
SEQ_LEN = 64

KEPT = [
    "abc.py",
    "json/__init__.py",
    "json/decoder.py",
    "unittest/case.py",
    "testing_tools.py",
]
SKIPPED = [
    "test/test_abc.py",
    "test/support/helper.py",
    "idlelib/idle_test/test_x.py",
    "lib2to3/tests/data/py2.py",
    "ctypes/test/test_x.py",
    "sqlite3/test_data/x.py",
    "site-packages/pkg/mod.py",
    "dist-packages/pkg/mod.py",
    "pydoc_data/topics.py",
    "encodings/cp1252.py",
    "notes.txt",
]


def _source(rng: random.Random, n_functions: int) -> str:
    """Python-like source with indentation, tabs, unicode and long lines."""
    words = ["value", "größe", "名前", "count", "résumé", "items", "🙂", "x"]
    lines = ['"""Module docstring with ünïcödé and\ttabs."""', "", "import os", ""]
    for k in range(n_functions):
        a, b = rng.sample(words, 2)
        lines += [
            f"def f{k}_{rng.randint(0, 99)}(arg, *rest):",
            f'    """Return {a} of {b}."""',
            f"    if arg > {rng.randint(0, 999)}:",
            f"\treturn [{a!r}, {b!r}]  # tab-indented",
            f"    total = sum(len(item) for item in rest) + {rng.random():.3f}",
            "    return {" + ", ".join(f"'{w}': {i}" for i, w in enumerate(words)) + "}",
            "",
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lib")
    rng = random.Random(0)
    for rel in [*KEPT, *SKIPPED] + [f"pkg/m{k}.py" for k in range(30)]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_source(rng, rng.randint(0, 8)), encoding="utf-8")
    (root / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    (root / "crlf.py").write_bytes(b"x = 1\r\n\r\nif x:\r\n    y = 2\r\n")
    (root / "pkg" / "specials.py").write_text('s = "<|fim_prefix|> and <|endoftext|>"\n')
    return root


@pytest.fixture(scope="module")
def files(corpus) -> list[Path]:
    return data.stdlib_sources(corpus)


@pytest.fixture(scope="module")
def tokenizer(files, tmp_path_factory):
    return bpe.train_tokenizer(files, VOCAB_SIZE, tmp_path_factory.mktemp("tok"))


def _relative(files, root) -> set[str]:
    return {path.relative_to(root).as_posix() for path in files}


def test_sources_skip_tests_packages_and_non_utf8(corpus, files):
    found = _relative(files, corpus)
    assert set(KEPT) <= found
    assert "crlf.py" in found
    assert not found & set(SKIPPED)
    assert "latin1.py" not in found
    assert files == sorted(files) == data.stdlib_sources(corpus)


def test_real_stdlib_listing_and_split():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = data.stdlib_sources()
    found = _relative(files, root)
    assert {"os.py", "json/decoder.py", "unittest/case.py"} <= found
    assert not any(
        part in {"test", "tests", "idle_test", "site-packages"}
        for rel in found
        for part in rel.split("/")
    )
    train, heldout = data.split_files(files, root)
    assert 0.02 < len(heldout) / len(files) < 0.09


def test_split_is_deterministic_disjoint_and_about_five_percent(tmp_path):
    names = [f"pkg{k % 7}/module_{k}.py" for k in range(2000)]
    train, heldout = data.split_files([tmp_path / n for n in names], tmp_path)
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(tmp_path / n for n in names)
    assert 0.035 < len(heldout) / len(names) < 0.065
    # Only the relative path matters, not where the library lives or the list order.
    other = tmp_path / "elsewhere"
    again = data.split_files([other / n for n in reversed(names)], other)
    assert _relative(again[1], other) == _relative(heldout, tmp_path)
    # The hash is fixed: a change here would move files between train and held-out.
    assert data.split_files([tmp_path / "os.py", tmp_path / "chunk.py"], tmp_path) == (
        [tmp_path / "os.py"],
        [tmp_path / "chunk.py"],
    )


def test_special_tokens_and_saved_files(tokenizer, files, tmp_path):
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id
        assert tokenizer.encode(token).ids == [token_id]
    assert tokenizer.get_vocab_size() == VOCAB_SIZE

    again = bpe.train_tokenizer(files, VOCAB_SIZE, tmp_path)
    assert again.to_str() == tokenizer.to_str()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == config["eos_token"] == "<|endoftext|>"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert [config["added_tokens_decoder"][str(i)]["content"] for i in range(6)] == list(
        SPECIAL_TOKENS
    )
    assert (tmp_path / "tokenizer.json").is_file()


def test_tokenizer_round_trips_arbitrary_source(tokenizer):
    samples = [
        "def f(x):\n\treturn x  # tab\n",
        "    \n\n\t\t  trailing   \r\n",
        "größe = '名前' + \"🙂\"  # ünïcödé\u200b\ufeff",
        "\x00\x0c\x1b[0m\\n\\t",
        " leading space and  double",
    ]
    rng = random.Random(1)
    alphabet = "abc XYZ_01(){}[]:.,'\"\\\t\n\r#éß名🙂\u0301\u00a0"
    samples += ["".join(rng.choices(alphabet, k=200)) for _ in range(20)]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


@pytest.mark.parametrize("max_tokens", [5, 150])
def test_chunks_cover_documents(files, tokenizer, max_tokens):
    as_text = Tokenizer.from_str(tokenizer.to_str())
    as_text.encode_special_tokens = True
    chunks = packing.load_chunks(files, tokenizer, max_tokens)
    for path, doc_chunks in zip(files, chunks):
        text = data.read_source(path)
        assert "".join(chunk.text for chunk in doc_chunks) == text
        ids = np.concatenate([chunk.ids for chunk in doc_chunks])
        assert ids.tolist() == as_text.encode(text).ids
        assert all(0 < len(chunk.ids) <= max_tokens for chunk in doc_chunks)
        if max_tokens > 100:  # longer than any line: every cut is at a newline
            assert all(chunk.text.startswith("\n") for chunk in doc_chunks[1:])


def _split_at(ids, *markers):
    parts, rest = [], list(ids)
    for marker in markers:
        index = rest.index(marker)
        parts.append(rest[:index])
        rest = rest[index + 1 :]
    return parts, rest


def test_fim_example_rearranges_to_the_chunk(files, tokenizer):
    chunks = [c for doc in packing.load_chunks(files, tokenizer, 50) for c in doc]
    rng = np.random.default_rng(0)
    examples = [fim.fim_transform(c.text, rng, fim_rate=1.0, ids=c.ids) for c in chunks]
    for chunk, ids in zip(chunks, packing.encode_examples(examples, tokenizer)):
        assert ids[0] == FIM_PREFIX and ids[-1] == EOT
        (_, prefix, suffix), middle = _split_at(ids, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)
        decode = tokenizer.decode
        assert decode(prefix) + decode(middle[:-1]) + decode(suffix) == chunk.text

    plain = fim.fim_transform(chunks[0].text, rng, fim_rate=0.0, ids=chunks[0].ids)
    assert plain[1] == EOT and plain[0] is chunks[0].ids


def test_middle_spans_favour_line_completions(files):
    rng = np.random.default_rng(0)
    text = max((data.read_source(path) for path in files), key=len)
    spans = [fim.fim_middle_span(text, rng) for _ in range(500)]
    assert all(0 <= start <= end <= len(text) for start, end in spans)
    at_line_end = [end == len(text) or text[end] == "\n" for _, end in spans]
    one_line = ["\n" not in text[start:end] for start, end in spans]
    assert np.mean(at_line_end) > 0.7
    assert 0.35 < np.mean(one_line) < 0.9


def test_packing_keeps_examples_whole():
    examples = [np.full(n, n, dtype=np.int32) for n in (5, 9, 3, 7, 2, 10, 1)]
    rows = packing.pack_examples(examples, row_len=10)
    assert rows.shape[1] == 10
    assert (rows == IGNORE_INDEX).sum() == rows.size - sum(map(len, examples))
    for example in examples:
        n = len(example)
        assert any(np.array_equal(row[row == n], example) for row in rows)


def test_batches_are_seeded(files, tokenizer):
    def take(seed, n=4):
        stream = packing.batches(files, tokenizer, SEQ_LEN, batch_size=4, seed=seed, epochs=2)
        return [torch.cat(batch) for batch in stream][:n]

    first, again, other = take(0), take(0), take(1)
    inputs, targets = next(packing.batches(files, tokenizer, SEQ_LEN, 4, seed=0))
    assert inputs.shape == targets.shape == (4, SEQ_LEN)
    assert inputs.dtype == targets.dtype == torch.long
    real = targets[:, :-1] != IGNORE_INDEX
    assert torch.equal(inputs[:, 1:][real], targets[:, :-1][real])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert {FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE} <= set(torch.cat(first).flatten().tolist())


def test_eval_sequences_are_plain_and_cover_every_token(files, tokenizer):
    inputs, targets = data.eval_sequences(files, tokenizer, SEQ_LEN)
    assert inputs.shape == targets.shape and inputs.shape[1] == SEQ_LEN
    assert not set(inputs.flatten().tolist()) & set(range(1, len(SPECIAL_TOKENS)))
    stream = targets[targets != IGNORE_INDEX].tolist()
    texts = [data.read_source(path) for path in files]
    assert stream.count(EOT) == len(files)
    assert tokenizer.decode(stream) == "".join(texts)
    assert torch.equal(inputs, data.eval_sequences(files, tokenizer, SEQ_LEN)[0])
