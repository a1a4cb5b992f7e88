"""plt-import of a GGUF file with a SentencePiece (`llama`) tokenizer: the tokenizer.model rebuilt from
its tokens, scores and types tokenizes and decodes as the original files do."""

import pytest
import sentencepiece as spm
from synth import random_weights
from synth_sp import FIM, IM_END, IM_START, TOOL_TOKENS, stdlib_sources, write_sp_tokenizer
from test_import import LLAMA, write_gguf

import pltkit
from pltkit.model.llama_import import import_gguf

gguf = pytest.importorskip("gguf")

TEXTS = ["", " ", "def f(x):\n\treturn x  # ünï ✓ 🙂\n", "a<|im_end|>b", "<|im_start|>user\nhi<|im_end|>\n",
         "x<tool_call>{}</tool_call>", "<s>  </s>", "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"]


def gguf_vocab(folder, size: int):
    """(tokens, scores, types) as llama.cpp's converter writes them: the pieces, then the added tokens,
    then padding up to the embedding's rows."""
    proto = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = proto.get_piece_size()
    tokens = [proto.id_to_piece(i) for i in range(n)]
    scores = [proto.get_score(i) for i in range(n)]
    types = [gguf.TokenType.UNKNOWN if proto.is_unknown(i) else gguf.TokenType.CONTROL if proto.is_control(i)
             else gguf.TokenType.BYTE if proto.is_byte(i) else gguf.TokenType.NORMAL for i in range(n)]
    for t in ["<|endoftext|>", IM_START, IM_END, *FIM, *TOOL_TOKENS]:
        tokens.append(t)
        scores.append(-1000.0)
        types.append(gguf.TokenType.USER_DEFINED if t in TOOL_TOKENS else gguf.TokenType.CONTROL)
    for i in range(len(tokens), size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def test_gguf_sentencepiece_tokenizer_is_rebuilt(tmp_path):
    (tmp_path / "hf").mkdir()
    ids = write_sp_tokenizer(tmp_path / "hf")
    hf = {**LLAMA, "vocab_size": ids["vocab_size"] + 5, "head_dim": 8, "bos_token_id": 1,
          "eos_token_id": ids["eos_token_id"]}
    w = random_weights({**hf, "plt_num_loops": 1}, 0)
    write_gguf(tmp_path / "spm.gguf", hf, w, tmp_path / "hf", tokenizer_model="llama",
               vocab=gguf_vocab(tmp_path / "hf", hf["vocab_size"]))
    out = import_gguf(tmp_path / "spm.gguf", tmp_path / "out")
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer.json").exists()

    tok, ref = pltkit.load_tokenizer(out), pltkit.load_tokenizer(tmp_path / "hf")
    assert (tok.bos_id, tok.eos_ids[0], tok.prefix_ids, tok.fim) == (ref.bos_id, ref.eos_ids[0], (1,), ref.fim)
    lines = [line for f in stdlib_sources(300, 20) for line in f.read_text(errors="replace").splitlines()]
    bad = [t for t in TEXTS + lines
           if tok.encode(t) != ref.encode(t) or tok.encode_with_specials(t) != ref.encode_with_specials(t)
           or tok.decode(ref.encode_with_specials(t)) != ref.decode(ref.encode_with_specials(t))]
    print(f"\nGGUF SentencePiece tokenizer: {len(TEXTS) + len(lines)} texts compared, {len(bad)} mismatches")
    assert not bad, bad[:5]
