"""Synthetic checkpoints laid out as LoopCoder-V2 is published: a SentencePiece tokenizer.model
(trained here on the Python standard library's sources) with the special tokens added at the end
of the vocabulary, a slow-tokenizer tokenizer_config.json whose auto_map names a
tokenization_*.py, sharded safetensors, a ChatML chat template and a generation config.

The tokenization_iquestcoder.py written beside them must never be imported: importing it writes
the file named by POISON_MARKER next to it and raises.
"""

import io
import json
import sysconfig
from functools import partial
from pathlib import Path

import sentencepiece as spm
from synth import make_checkpoint, make_config

SP_VOCAB_SIZE = 1200
TRAIN_FILES = 300
BOS, UNK = "<s>", "<unk>"
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
FIM = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]  # added, not special: split out of text, decoded as text
POISON_MARKER = "tokenization_iquestcoder.imported"
AUTO_MAP_MODEL = {"AutoConfig": "configuration_iquestplt.IQuestPLTCoderConfig",
                  "AutoModelForCausalLM": "modeling_iquestplt.IQuestPLTCoderForCausalLM"}

CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> tags.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls or [] %}
{%- set fn = tool_call.function or tool_call %}
{{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' + (fn.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

POISON = f'''"""Stands for the checkpoint's own tokenizer code: loading the checkpoint must never import it."""
import pathlib

pathlib.Path(__file__).with_name({POISON_MARKER!r}).write_text("imported")
raise ImportError("tokenization_iquestcoder.py was imported: checkpoint code must never run")
'''

_MODELS: dict[int, bytes] = {}  # trained once per test session: the training is deterministic


def stdlib_sources(start: int, count: int) -> list[Path]:
    """`count` of the standard library's .py files (sorted, tests left out), from the start-th."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts))
    return files[start:start + count]


def sp_model(vocab_size: int = SP_VOCAB_SIZE) -> bytes:
    """A Llama-style SentencePiece BPE model (byte fallback, digits split, no normalization) trained
    on TRAIN_FILES standard-library sources."""
    if vocab_size not in _MODELS:
        lines = [line for f in stdlib_sources(0, TRAIN_FILES)
                 for line in f.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, input_sentence_size=60000, shuffle_input_sentence=False, max_sentence_length=1 << 16,
            minloglevel=2)
        _MODELS[vocab_size] = out.getvalue()
    return _MODELS[vocab_size]


def write_sp_tokenizer(path, fim: bool = True) -> dict:
    """Write tokenizer.model and the slow tokenizer's files into `path`; return the ids (and
    vocab_size) config.json must carry."""
    path = Path(path)
    model = sp_model()
    (path / "tokenizer.model").write_bytes(model)
    n = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    specials = [EOT, IM_START, IM_END, *(FIM if fim else [])]
    added = {tok: n + k for k, tok in enumerate(specials + TOOL_TOKENS)}

    def entry(content, special=True):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": special}

    decoder = {"0": entry(UNK), "1": entry(BOS), "2": entry("</s>")}
    decoder.update({str(i): entry(t, t not in TOOL_TOKENS) for t, i in added.items()})
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False, "legacy": True,
        "added_tokens_decoder": decoder, "additional_special_tokens": specials,
        "auto_map": {"AutoTokenizer": ["tokenization_iquestcoder.IQuestCoderTokenizer", None]},
        "bos_token": BOS, "eos_token": IM_END, "pad_token": EOT, "unk_token": UNK,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072, "sp_model_kwargs": {},
        "tokenizer_class": "IQuestCoderTokenizer", "use_default_system_prompt": False,
    }
    _write_json(path / "tokenizer_config.json", tokenizer_config)
    _write_json(path / "special_tokens_map.json", {
        "additional_special_tokens": specials, "bos_token": entry(BOS), "eos_token": entry(IM_END),
        "pad_token": entry(EOT), "unk_token": entry(UNK)})
    _write_json(path / "added_tokens.json", added)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "tokenization_iquestcoder.py").write_text(POISON)
    ids = {"bos_token_id": 1, "eos_token_id": [added[IM_END], added[EOT]]}
    _write_json(path / "generation_config.json", {
        **ids, "pad_token_id": added[EOT], "do_sample": True, "temperature": 0.6, "top_p": 0.85, "top_k": 20})
    return {**ids, "vocab_size": n + len(added)}


def make_loopcoder_checkpoint(path, *, fim: bool = True, shards: int = 2, seed: int = 0, **overrides) -> dict:
    """A tiny random PLT checkpoint in LoopCoder-V2's published layout; returns its config."""
    cfg = make_config(auto_map=AUTO_MAP_MODEL, **overrides)
    return make_checkpoint(path, cfg, seed=seed, shards=shards, tokenizer=partial(write_sp_tokenizer, fim=fim))


def _write_json(file: Path, obj) -> None:
    file.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
