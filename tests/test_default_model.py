"""The embedded default model: shipped in the package, good enough to be worth completing with."""

import json
import subprocess

import numpy as np
import pytest
from tokenizers import Tokenizer

import pltkit
from pltkit.export.artifact import export
from pltkit.runtime.backends import open_backend
from pltkit.runtime.generate import generate
from pltkit.train import data
from pltkit.train.evaluate import heldout_loss


@pytest.fixture(scope="module")
def model():
    return pltkit.load_model("default")


def test_default_model_is_the_described_plt2(model):
    c = model.config
    assert c.plt_num_loops == 2 and c.plt_gate_use_hidden_states and c.plt_clp_shift
    assert sum(p.numel() for p in model.parameters()) <= 10_000_000
    tok = pltkit.load_tokenizer("default")
    assert tok.fim is not None and tok.eos_ids and tok.vocab_size <= c.vocab_size


def test_default_model_predicts_held_out_code(model):
    """On two held-out files the model beats their own unigram distribution by a wide margin
    (a random or broken model does not)."""
    _, heldout = data.stdlib_split()
    tok = Tokenizer.from_file(str(pltkit.resolve_model_path("default") / "tokenizer.json"))
    files = sorted(heldout)[:2]
    ev = heldout_loss(model, tok, files, model.config.max_position_embeddings)
    _, targets = data.eval_sequences(files, tok, model.config.max_position_embeddings)
    t = targets[targets != data.IGNORE_INDEX].numpy()
    p = np.bincount(t) / len(t)
    unigram = -(p[p > 0] * np.log(p[p > 0])).sum()
    print(f"held-out loss {ev['loss']:.3f} nats/token on {ev['tokens']} tokens; unigram entropy {unigram:.3f}")
    assert ev["loss"] < unigram - 1.5


def test_default_model_on_onnx_runtime_greedy_equals_reference(tmp_path):
    export("default", tmp_path / "art")
    tok = pltkit.load_tokenizer("default")
    prompt = tok.encode("import os\n\n\ndef read_lines(path):")
    want = list(generate(open_backend("default", threads=1), prompt, 64))
    got = list(generate(open_backend(tmp_path / "art", threads=1), prompt, 64))
    print(repr(tok.decode(want)))
    assert got == want


def test_plt_complete_default():
    out = subprocess.run(["plt-complete", "--json", "--max-tokens", "16", "def add(a, b):\n"],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["backend"] == "ort" and 0 < len(r["tokens"]) <= 16 and r["text"]  # from the cached artifact
