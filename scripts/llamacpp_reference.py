"""Regenerate tests/data/llamacpp_tiny/: a tiny quantized Llama GGUF and llama.cpp's logits for it.

tests/test_import_reference.py imports the file with pltkit and compares pltkit's logits with the ones
llama.cpp computed here, so CI checks the GGUF import against llama.cpp without llama.cpp installed.

The model is laid out like SmolLM2-135M's Q4_1 file (Q8_0 token embedding tied to the output, Q4_1
matrices, F32 norms, the smollm byte-level BPE pre-tokenizer), with one more layer whose seven
matrices are each of another type pltkit dequantizes: Q8_0, Q4_0, Q5_0, Q5_1, F16, BF16, Q4_1.
Weights are random (fixed seed); the vocabulary is the 256 byte tokens, two specials and BPE merges
learned from a fixed text. llama.cpp runs the file converted to F32 by its own quantizer (as
tests/test_import.py's SmolLM2 test does), with an F32 KV cache, so both sides compute in float32 on
the same dequantized weights and a difference is an import or model error, not llama.cpp's int8
activations. The prompt ids are llama.cpp's tokenization of a fixed text.

Needs llama-cpp-python and gguf (pip install 'pltkit[bench]'). Run from the repository root:
    python scripts/llamacpp_reference.py
The GGUF file comes out byte-identical on every run; the logits may move in their last bits with
llama.cpp's version or the machine's SIMD kernels.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import platform
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
from tokenizers import pre_tokenizers

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "llamacpp_tiny"
SEED = 20240615
SHAPE = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, context=256, eps=1e-5, theta=10000.0)
SPECIALS = ["<|endoftext|>", "<|im_start|>"]  # ids 0 and 1: eos and bos
N_MERGES = 62  # 2 + 256 + 62 = 320 tokens
PROMPT_TOKENS = 128
Q = gguf.GGMLQuantizationType
LAYER_TYPES = [  # the storage type of each matrix, layer by layer
    dict.fromkeys(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"), Q.Q4_1),
    dict(attn_q=Q.Q8_0, attn_k=Q.Q4_0, attn_v=Q.Q5_0, attn_output=Q.Q5_1, ffn_gate=Q.F16, ffn_up=Q.BF16,
         ffn_down=Q.Q4_1),
]
EMBEDDING_TYPE = Q.Q8_0
TEXT = '''\
def fibonacci(n: int) -> int:
    """The n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

    def __len__(self):
        return len(self.items)


print(fibonacci(10), len(Stack()))
'''


# --- the vocabulary -------------------------------------------------------------------------------------------
def byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet in byte order: printable bytes stand for themselves, the others for
    the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return [chars[b] for b in range(256)]


def learn_merges(text: str, n: int) -> list[tuple[str, str]]:
    """n BPE merges learned from `text`: the most frequent adjacent pair first, ties by the pair's text."""
    split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    words = Counter(w for w, _ in split.pre_tokenize_str(text))
    pieces = {w: list(w) for w in words}
    merges = []
    for _ in range(n):
        pairs = Counter()
        for w, count in words.items():
            for pair in zip(pieces[w], pieces[w][1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, p in pieces.items():
            i, out = 0, []
            while i < len(p):
                if tuple(p[i:i + 2]) == best:
                    out.append(p[i] + p[i + 1])
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[w] = out
    return merges


# --- the model ------------------------------------------------------------------------------------------------
def random_tensors(vocab: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, Q]]:
    """GGUF name -> (float32 array in numpy's [rows, row length] shape, the type it is stored as)."""
    s = SHAPE
    D, hd = s["hidden"], s["hidden"] // s["heads"]
    shapes = dict(attn_q=(s["heads"] * hd, D), attn_k=(s["kv_heads"] * hd, D), attn_v=(s["kv_heads"] * hd, D),
                  attn_output=(D, s["heads"] * hd), ffn_gate=(s["ffn"], D), ffn_up=(s["ffn"], D),
                  ffn_down=(D, s["ffn"]))

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t = {"token_embd.weight": (normal((vocab, D), 0.5), EMBEDDING_TYPE)}
    for i, types in enumerate(LAYER_TYPES):
        t[f"blk.{i}.attn_norm.weight"] = (1 + normal(D, 0.1), Q.F32)
        for name, shape in shapes.items():
            t[f"blk.{i}.{name}.weight"] = (normal(shape, 1.5 / np.sqrt(shape[1])), types[name])
        t[f"blk.{i}.ffn_norm.weight"] = (1 + normal(D, 0.1), Q.F32)
    t["output_norm.weight"] = (1 + normal(D, 0.1), Q.F32)
    return t


def write_gguf(file: Path) -> None:
    s = SHAPE
    merges = learn_merges(TEXT, N_MERGES)
    tokens = SPECIALS + byte_tokens() + [a + b for a, b in merges]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    wr = gguf.GGUFWriter(str(file), "llama")
    wr.add_name("tiny-llama-reference")
    wr.add_context_length(s["context"])
    wr.add_embedding_length(s["hidden"])
    wr.add_block_count(s["layers"])
    wr.add_feed_forward_length(s["ffn"])
    wr.add_head_count(s["heads"])
    wr.add_head_count_kv(s["kv_heads"])
    wr.add_rope_freq_base(s["theta"])
    wr.add_layer_norm_rms_eps(s["eps"])
    wr.add_vocab_size(len(tokens))
    wr.add_rope_dimension_count(s["hidden"] // s["heads"])
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("smollm")
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges([f"{a} {b}" for a, b in merges])
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(0)
    wr.add_add_bos_token(False)
    for name, (a, qtype) in random_tensors(len(tokens), np.random.default_rng(SEED)).items():
        if qtype == Q.F32:
            wr.add_tensor(name, a)
        else:
            wr.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# --- llama.cpp ------------------------------------------------------------------------------------------------
def llama_cpp_reference(file: Path) -> tuple[list[int], np.ndarray]:
    """llama.cpp's tokenization of TEXT (first PROMPT_TOKENS ids) and its logits [T, vocab] for them, computed
    on the file converted to F32 by llama.cpp, with an F32 KV cache and no flash attention."""
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = 0, True  # LLAMA_FTYPE_ALL_F32
        if llama_cpp.llama_model_quantize(str(file).encode(), str(f32).encode(), ctypes.byref(params)) != 0:
            raise SystemExit("llama.cpp could not convert the file to F32")
        llm = llama_cpp.Llama(model_path=str(f32), n_ctx=SHAPE["context"], n_batch=PROMPT_TOKENS,
                              n_ubatch=PROMPT_TOKENS, n_threads=2, logits_all=True, flash_attn=False,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
        ids = llm.tokenize(TEXT.encode(), add_bos=False, special=False)[:PROMPT_TOKENS]
        if len(ids) < PROMPT_TOKENS:
            raise SystemExit(f"TEXT is only {len(ids)} tokens; {PROMPT_TOKENS} are asked for")
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
        del llm
    return ids, logits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=OUT, help="folder to write (default: %(default)s)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    file = args.out / "tiny.gguf"
    write_gguf(file)
    ids, logits = llama_cpp_reference(file)
    np.save(args.out / "logits.npy", logits)
    meta = {
        "made_by": "scripts/llamacpp_reference.py",
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
        "gguf": importlib.metadata.version("gguf"),
        "machine": platform.machine(),
        "seed": SEED,
        "llama_cpp_settings": "file converted to F32 by llama_model_quantize; F32 KV cache; flash attention off",
        "text": TEXT,
        "ids": ids,
    }
    (args.out / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {file} ({os.path.getsize(file)} bytes), {len(ids)} ids, logits {logits.shape} "
          f"(|max| {np.abs(logits).max():.2f}) with llama-cpp-python {meta['llama_cpp_python']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
