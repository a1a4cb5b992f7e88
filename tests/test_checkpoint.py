"""Checkpoint I/O: the published layout in and out, and broken checkpoints named precisely."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from synth import make_checkpoint, make_config, random_weights

import pltkit
from pltkit import CheckpointError, ConfigError


def load_error(path):
    with pytest.raises((CheckpointError, ConfigError)) as e:
        pltkit.load_model(path)
    print(e.value)
    return str(e.value)


def test_save_load_round_trip_sharded(tmp_path):
    make_checkpoint(tmp_path / "a", make_config(plt_num_loops=3), seed=1)
    model = pltkit.load_model(tmp_path / "a")
    pltkit.save_checkpoint(model, tmp_path / "b", max_shard_bytes=20_000, tokenizer_from=tmp_path / "a")
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (tmp_path / "b" / "tokenizer.json").is_file()
    assert not list((tmp_path / "b").glob("*.partial"))
    again = pltkit.load_model(tmp_path / "b")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["plt_num_loops"] == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_dtype(tmp_path, dtype):
    make_checkpoint(tmp_path, dtype="bfloat16")
    model = pltkit.load_model(tmp_path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model(torch.randint(0, 300, (1, 4))).dtype == dtype


def test_missing_tensor(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    del w["model.layers.1.mlp.up_proj.weight"]
    make_checkpoint(tmp_path, cfg, weights=w)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in load_error(tmp_path)


def test_wrong_shape_and_unexpected_in_one_message(tmp_path):
    cfg = make_config()
    w = random_weights(cfg)
    w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)
    make_checkpoint(tmp_path, cfg, weights=w)
    msg = load_error(tmp_path)
    assert "model.layers.0.self_attn.k_proj.weight has shape [8, 32], config.json implies [16, 32]" in msg
    assert "unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq" in msg


def test_config_contradicting_weights(tmp_path):
    """Weights of a query-gate model under a config that says hidden-state gates."""
    make_checkpoint(tmp_path, make_config(plt_gate_use_hidden_states=False))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["plt_gate_use_hidden_states"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    msg = load_error(tmp_path)
    assert "missing tensor model.layers.0.self_attn.plt_gate.gate_norm.weight" in msg
    assert "plt_gate.weight has shape [4, 8], config.json implies [4, 32]" in msg


def test_tied_config_with_lm_head_is_reported(tmp_path):
    cfg = make_config()
    make_checkpoint(tmp_path, cfg, weights=random_weights(cfg))
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "unexpected tensor lm_head.weight" in load_error(tmp_path)


def test_bad_config_value_is_named(tmp_path):
    make_checkpoint(tmp_path, make_config(num_key_value_heads=3))
    assert "'num_attention_heads'" in load_error(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    make_checkpoint(tmp_path, shards=2)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert shard.name in load_error(tmp_path)


def test_pickle_weights_are_not_loaded(tmp_path):
    make_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    assert "only safetensors" in load_error(tmp_path)


def test_looped_checkpoint_runs_with_one_loop(tmp_path):
    """plt_num_loops=1 on a PLT-2 checkpoint ignores the gates instead of failing."""
    cfg = make_config()
    make_checkpoint(tmp_path, cfg)
    cfg["plt_num_loops"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert pltkit.load_model(tmp_path).model.layers[0].self_attn.plt_gate is None


LOAD_RSS = """
import re, sys, torch, pltkit
import torch._dynamo  # imported lazily by torch when modules initialise on the meta device (with triton
                      # installed, ~90 MB of code): a fixed cost, not the tensors this test is about
def peak_rss():  # VmHWM: this process's peak resident memory (ru_maxrss survives exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
base = peak_rss()
model = pltkit.load_model(sys.argv[1])
model(torch.zeros(1, 4, dtype=torch.long))  # touch every weight
print(peak_rss() - base)
"""


def test_loading_reads_tensors_lazily(tmp_path):
    """Peak memory to load and run stays near the model's size, not twice it."""
    cfg = make_config(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64, num_hidden_layers=4)
    make_checkpoint(tmp_path, cfg, shards=2)
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", LOAD_RSS, str(tmp_path)], capture_output=True, text=True, check=True)
    grew = int(out.stdout.split()[-1])
    print(f"checkpoint {size / 1e6:.0f} MB, peak RSS grew {grew / 1e6:.0f} MB to load and run it")
    assert grew < 1.5 * size
