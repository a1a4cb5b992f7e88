"""A checkpoint laid out as LoopCoder-V2 is published (SentencePiece tokenizer.model, slow-tokenizer
files, auto_map to code that must never run, shards, chat template): loaded, exported and completed."""

import json
import subprocess
import sys

import pytest
import sentencepiece as spm
from synth_sp import IM_END, POISON_MARKER, make_loopcoder_checkpoint, stdlib_sources

import pltkit
from pltkit.cli import complete
from pltkit.export.artifact import export
from pltkit.model.tokenizer import text_tokenizer
from pltkit.runtime.completion import CompletionRequest, layout_with_bos
from pltkit.train import data

COPIED = ["tokenizer.model", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
          "added_tokens.json", "chat_template.jinja"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    d = tmp_path_factory.mktemp("loopcoder")
    make_loopcoder_checkpoint(d / "ckpt", shards=2)
    export(d / "ckpt", d / "art")
    return d / "ckpt", d / "art"


def never_imported(ckpt):
    return not (ckpt / POISON_MARKER).exists() and not any("tokenization_iquestcoder" in m for m in sys.modules)


def test_layout_is_the_published_one(published):
    ckpt, _ = published
    cfg = json.loads((ckpt / "config.json").read_text())
    tcfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert cfg["architectures"] == ["IQuestPLTCoderForCausalLM"] and "auto_map" in cfg
    assert tcfg["auto_map"]["AutoTokenizer"][0].startswith("tokenization_iquestcoder.")
    assert (ckpt / "model.safetensors.index.json").is_file() and not (ckpt / "tokenizer.json").exists()
    tok = pltkit.load_tokenizer(ckpt)
    pieces = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")).get_piece_size()
    assert tok.vocab_size == cfg["vocab_size"] and tok.token_to_id(IM_END) >= pieces  # added after the pieces
    assert tok.fim is not None and tok.fim.format == "qwen"
    assert never_imported(ckpt)


def test_without_fim_tokens(tmp_path):
    make_loopcoder_checkpoint(tmp_path, fim=False, shards=1)
    assert pltkit.load_tokenizer(tmp_path).fim is None
    assert never_imported(tmp_path)


def test_export_copies_the_tokenizer_and_completes(published, capsys):
    ckpt, art = published
    manifest = json.loads((art / "pltkit.json").read_text())
    assert set(COPIED) <= set(manifest["tokenizer"]) and all((art / f).is_file() for f in COPIED)
    assert not (art / "tokenization_iquestcoder.py").exists()
    for name in COPIED:
        assert (art / name).read_bytes() == (ckpt / name).read_bytes()
        assert name in manifest["files"]

    tok = pltkit.load_tokenizer(art)
    prompt = layout_with_bos(tok, CompletionRequest(prefix="def fib(n):"), 100)
    assert prompt.ids == [tok.bos_id, *tok.encode("def fib(n):")]  # add_bos_token: true
    prompt = layout_with_bos(tok, CompletionRequest(prefix="x = 1\n", prompt="    y"), 100)
    assert tok.decode(prompt.ids, skip_special_tokens=True) == "x = 1\n    y"  # the prompt continues the prefix

    assert complete.main(["--model", str(art), "--backend", "ort", "--json", "--max-tokens", "8", "def fib(n):"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"].startswith("ort") and 1 <= len(out["tokens"]) <= 8
    assert out["text"] == tok.decode_continuation(out["tokens"])
    assert never_imported(ckpt)


RUNTIME_ONLY = """
import sys, pltkit
from pltkit.runtime.backends import open_backend
from pltkit.runtime.completion import CompletionRequest
from pltkit.runtime.engine import Engine
art = sys.argv[1]
result = Engine(open_backend(art), pltkit.load_tokenizer(art)).complete(CompletionRequest(prefix="x = ", n_predict=4))
print(len(result.tokens), sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_the_artifact_runs_without_torch_or_transformers(published):
    _, art = published
    out = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(art)], capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=1)[1].strip() == "[]", out.stdout


def test_evaluation_windows_are_cut_with_the_sentencepiece_tokenizer(published):
    """What plt-export --int8 calibrates on and plt-eval measures: code windows in this tokenizer."""
    ckpt, _ = published
    files = stdlib_sources(0, 3)
    inputs, _ = data.eval_sequences(files, text_tokenizer(ckpt), 64)
    tok = pltkit.load_tokenizer(ckpt)
    first = tok.encode(data.read_source(files[0]))
    assert inputs[0, 1:1 + len(first[:63])].tolist() == first[:63]


def test_int8_export_then_chat_through_plt_serve(published, tmp_path, capsys):
    """The issue's end to end: plt-export FIXTURE --int8, then a chat through plt-serve on it,
    with the template and end-of-turn token the checkpoint ships."""
    from functools import partial

    from serving import Running

    from pltkit.cli import export as export_cli
    from pltkit.runtime.chat import prompt_ids
    from pltkit.serve.loading import open_model
    from pltkit.serve.server import Server

    ckpt, _ = published
    assert export_cli.main([str(ckpt), "--int8", "-o", str(tmp_path / "int8"), "--eval-windows", "1"]) == 0
    capsys.readouterr()
    running = Running(Server(partial(open_model, tmp_path / "int8", threads=1)), tmp_path / "s.sock")
    try:
        r = running.clients["tcp"].post("/v1/chat/completions", json={
            "messages": [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "fib?"}],
            "max_tokens": 8})
        out = r.json()
        assert r.status_code == 200, r.text
        tok = running.server.model.engine.tok
        rendered = running.server.model.chat.render(
            [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "fib?"}])
        assert rendered.startswith("<|im_start|>system\nYou write Python.") and rendered.endswith("assistant\n")
        assert out["usage"]["prompt_tokens"] == len(prompt_ids(tok, rendered))
        choice = out["choices"][0]
        assert choice["finish_reason"] in ("stop", "length") and IM_END not in choice["message"]["content"]
    finally:
        running.stop()
    assert never_imported(ckpt)
