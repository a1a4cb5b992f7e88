import json

from synth import write_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers

import pltkit
from pltkit.model.tokenizer import PLTTokenizer

CODE = 'def f(x):\n\treturn x + "ünïcode ✓"  # <|fim_prefix|> in a comment\n'


def test_special_ids_and_fim_by_name(tmp_path):
    ids = write_tokenizer(tmp_path)
    tok = pltkit.load_tokenizer(tmp_path)
    assert tok.bos_id == ids["bos_token_id"] == 1
    assert tok.eos_ids == tuple(ids["eos_token_id"]) == (2, 3)
    assert tok.fim.format == "qwen"
    assert (tok.fim.prefix, tok.fim.suffix, tok.fim.middle) == tuple(
        tok.token_to_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    assert tok.fim.file_sep == tok.token_to_id("<|file_sep|>") and tok.fim.pad is None


def test_round_trip_and_user_text_never_becomes_control_tokens(tmp_path):
    write_tokenizer(tmp_path)
    tok = pltkit.load_tokenizer(tmp_path)
    ids = tok.encode(CODE)
    assert tok.decode(ids) == CODE
    assert tok.fim.prefix not in ids
    assert tok.fim.prefix in tok.encode_with_specials("<|fim_prefix|>x")


def test_eos_list_merged_from_all_files(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert PLTTokenizer.from_dir(tmp_path).eos_ids == (5, 2, 3)


def test_tokenizer_without_fim_tokens(tmp_path):
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = PLTTokenizer.from_dir(tmp_path)
    assert tok.fim is None and tok.eos_ids == ()
