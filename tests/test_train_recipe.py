"""The training recipe end to end on a tiny fake library: a few steps, a loadable checkpoint."""

import json

import torch

import pltkit
from pltkit.runtime.backends import open_backend
from pltkit.runtime.generate import generate
from pltkit.train.train import TrainConfig, train

SOURCE = "def add(a, b):\n    return a + b\n\n\nclass Box:\n    def __init__(self, x):\n        self.x = x\n"


def test_train_writes_a_loadable_checkpoint(tmp_path):
    lib = tmp_path / "lib"
    for k in range(100):
        (lib / f"pkg{k % 3}").mkdir(parents=True, exist_ok=True)
        (lib / f"pkg{k % 3}" / f"m{k}.py").write_text(SOURCE * (1 + k % 4))
    tc = TrainConfig(hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64, window=4,
                     vocab_size=300, seq_len=64, batch_size=2, steps=3, warmup=1, threads=1)
    report = train(tc, tmp_path / "run", root=str(lib))
    assert report["heldout_files"] >= 1 and report["heldout"]["tokens"] > 0
    assert len(report["loss_history"]) == 3
    model = pltkit.load_model(tmp_path / "run" / "model")
    assert model.config.plt_num_loops == 2 and model.config.plt_gate_use_hidden_states
    tok = pltkit.load_tokenizer(tmp_path / "run" / "model")
    assert tok.fim is not None and tok.eos_ids == (0,)
    saved = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert saved["train_config"]["steps"] == 3
    out = list(generate(open_backend(tmp_path / "run" / "model", threads=1), tok.encode("def "), 5))
    assert len(out) <= 5 and all(0 <= t < model.config.vocab_size for t in out)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
