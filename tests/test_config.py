import json

import pytest

from pltkit import ConfigError, PLTConfig

PUBLISHED = {  # the fields of a LoopCoder-v2 config.json, plus fields pltkit does not model
    "architectures": ["IQuestPLTCoderForCausalLM"], "model_type": "iquestpltcoder",
    "vocab_size": 75904, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 14,
    "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": [2, 75864, 75869], "plt_num_loops": 2,
    "plt_window_size": [64, 0], "plt_normalize_per_loop": True, "plt_emb_scale": 0.707,
    "plt_hidden_scale": 0.053, "plt_gate_use_hidden_states": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.57.1", "auto_map": {"AutoConfig": "x.Y"},
}


def test_defaults_are_the_published_ones():
    c = PLTConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (5120, 14, 40, 8)
    assert c.plt_window_size == (64, 0) and c.plt_num_loops == 2 and c.plt_clp_shift
    assert c.emb_scale == 1.0 and c.hidden_scale == 1.0 and c.eos_token_ids == (2, 75864, 75869)


def test_round_trip_loses_nothing(tmp_path):
    c = PLTConfig.from_dict(PUBLISHED)
    assert c.extra == {k: PUBLISHED[k] for k in ("torch_dtype", "transformers_version", "auto_map")}
    c.to_json(tmp_path / "config.json")
    back = json.loads((tmp_path / "config.json").read_text())
    assert {k: back[k] for k in PUBLISHED} == PUBLISHED
    assert PLTConfig.from_json(tmp_path / "config.json") == c
    assert back["plt_clp_shift"] is True


@pytest.mark.parametrize("change, field", [
    ({"num_key_value_heads": 7}, "num_attention_heads"),
    ({"plt_window_size": [64, 4]}, "plt_window_size"),
    ({"plt_window_size": [-1, 0]}, "plt_window_size"),
    ({"plt_window_size": 64}, "plt_window_size"),
    ({"plt_num_loops": 0}, "plt_num_loops"),
    ({"hidden_size": "5120"}, "hidden_size"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"eos_token_id": [2, 80000]}, "eos_token_id"),
    ({"plt_emb_scale": "0.7"}, "plt_emb_scale"),
    ({"plt_gate_use_hidden_states": 1}, "plt_gate_use_hidden_states"),
])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'") as e:
        PLTConfig.from_dict({**PUBLISHED, **change})
    print(e.value)


def test_yarn_is_refused_by_name():
    with pytest.raises(ConfigError, match="'yarn' is not supported"):
        PLTConfig(rope_scaling={"type": "yarn", "factor": 2.0})


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        PLTConfig.from_json(tmp_path / "config.json")
