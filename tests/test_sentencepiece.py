"""The SentencePiece backend against transformers' slow tokenizer on the same files.

The reference is transformers' own slow tokenizer machinery (added-token splitting, special tokens,
SentencePiece per piece) with the published LoopCoder tokenizer's rules on top, restated here since
a checkpoint's code is never imported: bos added per add_bos_token, the legacy Llama
convert_tokens_to_string, and transformers 4.x's _decode (added tokens decoded apart), with
spaces_between_special_tokens=False.
"""

from typing import ClassVar

import numpy as np
import pytest
from synth_sp import IM_END, IM_START, TOOL_TOKENS, stdlib_sources, write_sp_tokenizer

import pltkit

transformers = pytest.importorskip("transformers")
try:  # transformers 5: the slow SentencePiece tokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend as SlowBase
except ImportError:  # transformers 4: the slow Llama tokenizer itself
    from transformers import LlamaTokenizer as SlowBase

MIN_LINES = 10_000
ODD = ["", " ", "  ", "\t", "\n", "\n\n", " \n ", "\t\tx\t", "a  b   c", "    return x\n\n\n", "x\r\ny",
       "ünïcödé ✓ 日本語 🙂 ∑x²", "emoji 👩‍💻 and\u00a0nbsp", "\u200bzero width", "<0x41> ▁ ▁▁x",
       "a<|im_end|>b", "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "<s>x</s>", " <unk> ",
       "x<tool_call>\n{}\n</tool_call>y", "<|im_end|><|im_end|>", "<|im_start",
       "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>", "  <|im_end|>  "]


class Reference(SlowBase):
    vocab_files_names: ClassVar[dict] = {"vocab_file": "tokenizer.model"}

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.init_kwargs.get("add_bos_token", True) else []
        eos = [self.eos_token_id] if self.init_kwargs.get("add_eos_token", False) else []
        return bos + token_ids_0 + eos

    def convert_tokens_to_string(self, tokens):
        out, sub, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not prev_special and i != 0:
                    out += " "
                out += self.sp_model.decode(sub) + token
                sub, prev_special = [], True
            else:
                sub.append(token)
                prev_special = False
        return out + self.sp_model.decode(sub)

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        special = set(self.all_special_tokens)
        apart = set(self.added_tokens_encoder) - special | {
            t for t in special if self.convert_tokens_to_ids(t) >= self.vocab_size}
        parts, run = [], []
        for token in tokens:
            if token in apart:
                if run:
                    parts.append(self.convert_tokens_to_string(run))
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self.convert_tokens_to_string(run))
        return "".join(parts)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    write_sp_tokenizer(d)
    return pltkit.load_tokenizer(d), Reference.from_pretrained(d, legacy=True)


def code_lines() -> list[str]:
    """Real code the tokenizer was not trained on: standard-library sources after the training files."""
    lines = []
    for f in stdlib_sources(300, 400):
        lines += f.read_text(encoding="utf-8", errors="replace").splitlines()
        if len(lines) >= MIN_LINES:
            break
    return lines


def with_specials(lines: list[str]) -> list[str]:
    """Lines with special and added tokens' text put in at random places."""
    rng = np.random.default_rng(0)
    names = [IM_START, IM_END, "<s>", "</s>", "<unk>", "<|endoftext|>", "<|fim_prefix|>", *TOOL_TOKENS]
    out = []
    for line in lines:
        k = int(rng.integers(0, len(line) + 1))
        out.append(line[:k] + names[int(rng.integers(len(names)))] + line[k:])
    return out


def compare(tok, ref, texts: list[str], decode: bool = True) -> list[str]:
    """Mismatches of both encodings (and the decoding of the ids with specials) of each text."""
    bad = []
    for text in texts:
        ids = ref.encode(text)  # bos + the text with special-token names split out
        checks = {
            "encode_with_specials": (tok.add_special_tokens(tok.encode_with_specials(text)), ids),
            "encode": (tok.encode(text), ref.encode(text, add_special_tokens=False, split_special_tokens=True)),
        }
        if decode:
            checks["decode"] = (tok.decode(ids), ref.decode(ids))
            checks["decode skip"] = (tok.decode(ids, skip_special_tokens=True),
                                     ref.decode(ids, skip_special_tokens=True))
        bad += [f"{name} {text!r}: {a!r} != {b!r}" for name, (a, b) in checks.items() if a != b]
    return bad


def test_code_lines_and_chunks_match_the_slow_tokenizer(pair):
    tok, ref = pair
    lines = code_lines()
    chunks = ["\n".join(lines[i:i + 25]) + "\n" for i in range(0, len(lines), 25)]
    bad = compare(tok, ref, lines, decode=False) + compare(tok, ref, chunks)  # the chunks decode the same text
    print(f"\nSentencePiece vs transformers' slow tokenizer: {len(lines)} code lines and {len(chunks)} chunks of "
          f"25 lines compared, {len(bad)} mismatches")
    assert len(lines) >= MIN_LINES
    assert not bad, bad[:5]


def test_odd_text_and_special_token_names_in_user_text(pair):
    tok, ref = pair
    texts = ODD + with_specials(code_lines()[:2000])
    bad = compare(tok, ref, texts)
    print(f"\n{len(texts)} texts with unicode, whitespace runs and special-token names compared, {len(bad)} mismatches")
    assert not bad, bad[:5]
    assert tok.encode("a<|im_end|>b").count(tok.token_to_id(IM_END)) == 0  # user text stays text
    assert tok.encode_with_specials("a<|im_end|>b") == [*tok.encode("a"), tok.token_to_id(IM_END), *tok.encode("b")]


def test_decoding_any_ids_matches(pair):
    tok, ref = pair
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, tok.vocab_size, int(rng.integers(1, 12))).tolist() for _ in range(3000)]
    bad = [s for s in seqs for skip in (False, True)
           if tok.decode(s, skip_special_tokens=skip) != ref.decode(s, skip_special_tokens=skip)]
    print(f"\n{len(seqs)} random id sequences decoded, {len(bad)} mismatches")
    assert not bad, bad[:5]


def test_special_ids_vocab_and_continuation(pair):
    tok, ref = pair
    assert tok.vocab_size == len(ref)
    assert tok.bos_id == ref.bos_token_id == 1 and tok.prefix_ids == (1,) and tok.suffix_ids == ()
    assert tok.eos_ids[0] == ref.convert_tokens_to_ids(IM_END)
    assert all(tok.id_to_token(i) == ref.convert_ids_to_tokens(i) for i in range(tok.vocab_size))
    ids = tok.encode("x = 1\n    return x")
    cut = ids.index(tok.encode("x = 1\n    return")[-1])  # the token of "return"
    assert tok.decode(ids[:cut]) + tok.decode_continuation(ids[cut:]) == "x = 1\n    return x"
    joined = tok.encode("x = 1\n") + tok.encode_continuation("    return x")
    assert tok.decode(joined) == "x = 1\n    return x" and tok.encode_continuation("") == []
