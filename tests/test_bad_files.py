"""Malformed model files fail fast, small and in one line: each case breaks one thing of a tiny checkpoint
(config.json, safetensors, tokenizer.json) or GGUF file, runs a CLI's main(argv) in a forked child of this
(already imported) process, and checks exit code 2, ONE stderr line naming the file and the field or
tensor, under 10 s and under 500 MB more peak memory than the process it was forked from. Exported
artifacts too: their manifest, missing, truncated and damaged files."""

import json
import os
import shutil
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from synth import make_checkpoint, make_config
from test_import import make_hf_llama, write_gguf

import pltkit.cli.complete
import pltkit.cli.export
import pltkit.cli.import_model
import pltkit.export.artifact  # noqa: F401  (imported here, not in every child)
import pltkit.model.llama_import  # noqa: F401
import pltkit.runtime.backends  # noqa: F401
import pltkit.runtime.torch_backend  # noqa: F401  (the tokenizer cases run a checkpoint on torch)

MAX_SECONDS, MAX_MB = 10, 500
HUGE = 10 ** 9


# --- mutations: each takes the copied folder (or GGUF file) and breaks one thing ----------------------------
def config(**change):
    def mutate(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        for key, value in change.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))  # NaN, Infinity as Python's json writes them
    return mutate


def config_text(text):
    return lambda d: (d / "config.json").write_text(text)


def header(edit):
    """Rewrite model.safetensors's JSON header with edit(header dict), keeping the data bytes."""
    def mutate(d: Path):
        f = d / "model.safetensors"
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        h = json.loads(raw[8:8 + n])
        edit(h)
        text = json.dumps(h).encode()
        f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return mutate


def raw_bytes(edit):
    def mutate(d: Path):
        f = d / "model.safetensors"
        f.write_bytes(edit(f.read_bytes()))
    return mutate


def tensor(name, **fields):
    def edit(h):
        h[name].update(fields)
    return header(edit)


EMB = "model.embed_tokens.weight"
NORM = "model.norm.weight"


def swap_offsets(h):
    a, b = h[EMB]["data_offsets"], h[NORM]["data_offsets"]
    h[NORM]["data_offsets"] = [a[0], a[0] + b[1] - b[0]]  # inside the embedding's bytes


def tokenizer_text(text):
    return lambda d: (d / "tokenizer.json").write_text(text)


def json_file(name: str, edit):
    """Rewrite the JSON file `name` of the folder with edit(its value) applied."""
    def mutate(d: Path):
        value = json.loads((d / name).read_text())
        edit(value)
        (d / name).write_text(json.dumps(value))
    return mutate


def tokenizer_json(edit):
    return json_file("tokenizer.json", edit)


def gguf_meta(**change):
    """Rewrite the GGUF with the source config changed (block_count from num_hidden_layers, ...)."""
    return ("rewrite", change)


def gguf_patch(find: bytes, skip: int, fmt: str, value):
    """Overwrite the value `skip` bytes after the first `find` in the file."""
    def mutate(f: Path):
        raw = bytearray(f.read_bytes())
        at = raw.index(find) + len(find) + skip
        raw[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
        f.write_bytes(bytes(raw))
    return mutate


def gguf_at(offset: int, fmt: str, value):
    def mutate(f: Path):
        raw = bytearray(f.read_bytes())
        raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
        f.write_bytes(bytes(raw))
    return mutate


def gguf_cut(keep):
    return lambda f: f.write_bytes(f.read_bytes()[:keep(f.stat().st_size)])


TOKEN_EMBD = b"token_embd.weight"  # its tensor info: n_dims u32, dims u64 x n, type u32, offset u64
TOKENS = b"tokenizer.ggml.tokens"  # array: item type u32, count u64



def manifest(edit):
    return json_file("pltkit.json", edit)


def artifact_file(name, edit):
    def mutate(d: Path):
        f = d / name
        f.write_bytes(edit(f.read_bytes()))
    return mutate


def flip(data: bytes) -> bytes:
    at = len(data) // 2
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


# (id, what is broken, the file the message names, what else it must name)
CASES = [
    # exported artifacts (plt-complete runs them): the manifest, missing, truncated or damaged files
    ("art-manifest-not-json", lambda d: (d / "pltkit.json").write_text("{"), "pltkit.json", "readable"),
    ("art-manifest-version-99", manifest(lambda m: m.update(format_version=99)), "pltkit.json", "version 99"),
    ("art-manifest-loops-1e6", manifest(lambda m: m["config"].update(plt_num_loops=10 ** 6)), "pltkit.json",
     "plt_num_loops"),
    ("art-weights-missing", lambda d: (d / "weights.bin").unlink(), "weights.bin", "missing"),
    ("art-weights-truncated", artifact_file("weights.bin", lambda b: b[:len(b) // 2]), "weights.bin", "bytes"),
    ("art-weights-bit-flipped", artifact_file("weights.bin", flip), "weights.bin", "sha256"),
    ("art-graph-missing", lambda d: (d / "decode.gqa.onnx").unlink(), "decode.gqa.onnx", "missing"),
    ("art-graph-bit-flipped", artifact_file("prefill.gqa.onnx", flip), "prefill.gqa.onnx", "sha256"),
    ("art-tokenizer-bit-flipped", artifact_file("tokenizer.json", flip), "tokenizer.json", "sha256"),
    ("art-manifest-a-list", lambda d: (d / "pltkit.json").write_text("[1]"), "pltkit.json", "object"),
    ("art-files-a-list", manifest(lambda m: m.update(files=list(m["files"]))), "pltkit.json", "'files'"),
    ("art-files-outside", manifest(lambda m: m["files"].update({"../x": "0" * 64})), "pltkit.json", "'files'"),
    ("art-sizes-a-list", manifest(lambda m: m.update(sizes=[1])), "pltkit.json", "'sizes'"),
    # a Hugging Face Llama folder (plt-import): its safetensors index
    ("hf-index-ints", lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": 1}})), "model.safetensors.index.json", "weight_map"),
    ("hf-index-outside", lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "../hf/model.safetensors"}})),
     "model.safetensors.index.json", "weight_map"),
    # config.json: bounds, types, non-finite numbers
    ("loops-1e6", config(plt_num_loops=10 ** 6), "config.json", "plt_num_loops"),
    ("loops-0", config(plt_num_loops=0), "config.json", "plt_num_loops"),
    ("layers-1e9", config(num_hidden_layers=HUGE), "config.json", "num_hidden_layers"),
    ("layers-more-than-stored", config(num_hidden_layers=1000), "config.json", "num_hidden_layers"),
    ("context-1e8", config(max_position_embeddings=10 ** 8), "config.json", "max_position_embeddings"),
    ("vocab-1e9", config(vocab_size=HUGE), "config.json", "vocab_size"),
    ("hidden-1e9", config(hidden_size=HUGE), "config.json", "hidden_size"),
    ("intermediate-1e9", config(intermediate_size=HUGE), "config.json", "intermediate_size"),
    ("heads-1e6", config(num_attention_heads=10 ** 6), "config.json", "num_attention_heads"),
    ("kv-heads-0", config(num_key_value_heads=0), "config.json", "num_key_value_heads"),
    ("head-dim-odd", config(head_dim=7), "config.json", "head_dim"),
    ("head-dim-string", config(head_dim="8"), "config.json", "head_dim"),
    ("eps-nan", config(rms_norm_eps=float("nan")), "config.json", "rms_norm_eps"),
    ("eps-negative", config(rms_norm_eps=-1e-5), "config.json", "rms_norm_eps"),
    ("theta-inf", config(rope_theta=float("inf")), "config.json", "rope_theta"),
    ("theta-zero", config(rope_theta=0), "config.json", "rope_theta"),
    ("rope-factor-x", config(rope_scaling={"rope_type": "linear", "factor": "x"}), "config.json", "factor"),
    ("rope-factor-0", config(rope_scaling={"rope_type": "linear", "factor": 0}), "config.json", "factor"),
    ("rope-factor-nan", config(rope_scaling={"rope_type": "linear", "factor": float("nan")}), "config.json",
     "factor"),
    ("rope-llama3-lowfreq-neg", config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": -1,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}),
     "config.json", "low_freq_factor"),
    ("rope-scaling-list", config(rope_scaling=[1, 2]), "config.json", "rope_scaling"),
    ("window-huge", config(plt_window_size=[HUGE, 0]), "config.json", "plt_window_size"),
    ("emb-scale-inf", config(plt_emb_scale=float("inf")), "config.json", "plt_emb_scale"),
    ("eos-string", config(eos_token_id="2"), "config.json", "eos_token_id"),
    ("bos-negative", config(bos_token_id=-1), "config.json", "bos_token_id"),
    ("config-not-json", config_text("{\"vocab_size\": 320,"), "config.json", "config.json"),
    ("config-a-list", config_text("[1, 2]"), "config.json", "JSON object"),
    # safetensors: header length, JSON, dtypes, shapes, offsets, truncation
    ("st-empty", raw_bytes(lambda b: b""), "model.safetensors", "header length"),
    ("st-header-length-huge", raw_bytes(lambda b: struct.pack("<Q", 1 << 62) + b[8:]), "model.safetensors",
     "header length"),
    ("st-header-length-past-end", raw_bytes(lambda b: struct.pack("<Q", len(b)) + b[8:]), "model.safetensors",
     "header length"),
    ("st-header-not-json", raw_bytes(lambda b: b[:8] + b"\xff" * (len(b) - 8)), "model.safetensors", "not JSON"),
    ("st-header-a-list", header(lambda h: (h.clear(), h.update({"x": [1]}))), "model.safetensors", "tensor x"),
    ("st-dtype-unknown", tensor(NORM, dtype="F99"), "model.safetensors", "'dtype'"),
    ("st-dtype-int", tensor(NORM, dtype="I32"), "model.safetensors", NORM),
    ("st-shape-mismatch", tensor(NORM, shape=[33]), "model.safetensors", NORM),
    ("st-shape-negative", tensor(NORM, shape=[-32]), "model.safetensors", "'shape'"),
    ("st-shape-huge", tensor(NORM, shape=[1 << 40, 1 << 40]), "model.safetensors", NORM),
    ("st-offsets-out-of-range", tensor(NORM, data_offsets=[1 << 40, (1 << 40) + 128]), "model.safetensors",
     "data_offsets"),
    ("st-offsets-reversed", tensor(NORM, data_offsets=[128, 0]), "model.safetensors", "data_offsets"),
    ("st-offsets-overlap", header(swap_offsets), "model.safetensors", "data_offsets"),
    ("st-offsets-not-a-pair", tensor(NORM, data_offsets="0-128"), "model.safetensors", "data_offsets"),
    ("st-truncated", raw_bytes(lambda b: b[:len(b) // 2]), "model.safetensors", "data_offsets"),
    ("st-metadata-not-object", header(lambda h: h.update({"__metadata__": 5})), "model.safetensors",
     "__metadata__"),
    # tokenizer.json (plt-complete loads it; the rest of the checkpoint is fine)
    ("tok-not-json", tokenizer_text("{\"model\": "), "tokenizer.json", "tokenizer.json"),
    ("tok-empty", tokenizer_text(""), "tokenizer.json", "tokenizer.json"),
    ("tok-model-missing", tokenizer_json(lambda t: t.pop("model")), "tokenizer.json", "tokenizer.json"),
    ("tok-vocab-a-list", tokenizer_json(lambda t: t["model"].update(vocab=[1, 2])), "tokenizer.json",
     "tokenizer.json"),
    ("tok-config-not-json", lambda d: (d / "tokenizer_config.json").write_text("{"), "tokenizer_config.json",
     "tokenizer_config.json"),
    # GGUF (plt-import): metadata values, counts, lengths, types, truncation
    ("gguf-block-count-1e9", gguf_meta(num_hidden_layers=HUGE), "tiny.gguf", "block_count"),
    ("gguf-block-count-1000", gguf_meta(num_hidden_layers=1000), "tiny.gguf", "block_count"),
    ("gguf-context-1e8", gguf_meta(max_position_embeddings=10 ** 8), "tiny.gguf", "context_length"),
    ("gguf-eps-nan", gguf_meta(rms_norm_eps=float("nan")), "tiny.gguf", "layer_norm_rms_epsilon"),
    ("gguf-theta-inf", gguf_meta(rope_theta=float("inf")), "tiny.gguf", "rope.freq_base"),
    ("gguf-ffn-1e9", gguf_meta(intermediate_size=HUGE), "tiny.gguf", "feed_forward_length"),
    ("gguf-version-99", gguf_at(4, "<I", 99), "tiny.gguf", "version"),
    ("gguf-tensor-count-huge", gguf_at(8, "<Q", 1 << 60), "tiny.gguf", "the 1152921504606846976 the header"),
    ("gguf-kv-count-huge", gguf_at(16, "<Q", 1 << 60), "tiny.gguf", "truncated"),
    ("gguf-key-length-huge", gguf_at(24, "<Q", 1 << 60), "tiny.gguf", "truncated"),
    ("gguf-key-length-2-63", gguf_at(24, "<Q", 1 << 63), "tiny.gguf", "truncated"),
    ("gguf-string-length-2-64", gguf_patch(b"general.architecture", 4, "<Q", (1 << 64) - 1), "tiny.gguf",
     "truncated"),
    ("gguf-value-type-99", gguf_patch(b"general.architecture", 0, "<I", 99), "tiny.gguf", "general.architecture"),
    ("gguf-string-array-count-huge", gguf_patch(TOKENS, 8, "<Q", 1 << 60), "tiny.gguf", "truncated"),
    ("gguf-tensor-dims-99", gguf_patch(TOKEN_EMBD, 0, "<I", 99), "tiny.gguf", "token_embd.weight"),
    ("gguf-tensor-type-99", gguf_patch(TOKEN_EMBD, 4 + 16, "<I", 99), "tiny.gguf", "token_embd.weight"),
    ("gguf-tensor-dim-huge", gguf_patch(TOKEN_EMBD, 4, "<Q", 1 << 40), "tiny.gguf", "truncated"),
    ("gguf-truncated-data", gguf_cut(lambda n: n - 100), "tiny.gguf", "truncated"),
    ("gguf-truncated-header", gguf_cut(lambda n: 100), "tiny.gguf", "header"),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, served_artifact):
    d = tmp_path_factory.mktemp("bad-sources")
    make_checkpoint(d / "ckpt", make_config(plt_num_loops=2))
    hf, w = make_hf_llama(d / "hf", seed=2, head_dim=8, rms_norm_eps=1e-5)
    write_gguf(d / "tiny.gguf", hf, w, d / "hf")
    shutil.copytree(served_artifact, d / "art")
    return d, hf, w


def run_forked(main, argv) -> tuple[int, str, float, int]:
    """main(argv) in a forked child: (exit code, stderr, seconds, its peak RSS in MB above the RSS it was
    forked with)."""
    read, write = os.pipe()
    base_kb = current_rss_kb()  # what the child starts with (its pages shared with this process)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: stderr to the pipe, stdout away, then main
        code = 3
        signal.alarm(3 * MAX_SECONDS)  # a hang (the old code's) ends the child by SIGALRM, not the suite
        try:
            torch.set_num_threads(1)  # no OpenMP region after fork: this process may have run one before

            os.close(read)
            os.dup2(write, 2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.stdout = os.fdopen(1, "w")
            code = main(argv)
            sys.stderr.flush()
        except BaseException as e:  # noqa: BLE001  an escaped exception is a failure the parent reports
            import traceback
            traceback.print_exc(file=sys.stderr)
            sys.stderr.write(f"ESCAPED {type(e).__name__}\n")
            sys.stderr.flush()
            code = 99
        finally:
            os._exit(code if isinstance(code, int) else 98)
    os.close(write)
    chunks = []
    with os.fdopen(read, "rb") as r:
        while chunk := r.read(65536):
            chunks.append(chunk)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    return code, b"".join(chunks).decode(errors="replace"), seconds, max(0, usage.ru_maxrss - base_kb) // 1024


def current_rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


MAINS = {"export": pltkit.cli.export.main, "complete": pltkit.cli.complete.main,
         "import": pltkit.cli.import_model.main}
SEEN = {"cases": 0, "seconds": 0.0, "mb": 0}


def prepare(case, sources, tmp_path):
    """(CLI name, argv) of one case, with its broken input written under tmp_path."""
    name, mutate, _, _ = case
    d, hf, w = sources
    if name.startswith("gguf-"):
        f = tmp_path / "tiny.gguf"
        if isinstance(mutate, tuple):
            write_gguf(f, {**hf, **mutate[1]}, w, d / "hf")
        else:
            shutil.copy(d / "tiny.gguf", f)
            mutate(f)
        return "import", [str(f), "-o", str(tmp_path / "out")]
    if name.startswith("hf-"):
        src = tmp_path / "hf"
        shutil.copytree(d / "hf", src)
        mutate(src)
        return "import", [str(src), "-o", str(tmp_path / "out")]
    if name.startswith("art-"):
        art = tmp_path / "art"
        shutil.copytree(d / "art", art)
        mutate(art)
        return "complete", ["--model", str(art), "--max-tokens", "1", "def f("]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(d / "ckpt", ckpt)
    mutate(ckpt)
    if name.startswith("tok-"):
        return "complete", ["--model", str(ckpt), "--backend", "torch", "--max-tokens", "1", "def f("]
    return "export", [str(ckpt), "-o", str(tmp_path / "out")]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_file_fails_in_one_line(case, sources, tmp_path):
    name, _, file, field = case
    cli, argv = prepare(case, sources, tmp_path)
    code, err, seconds, mb = run_forked(MAINS[cli], argv)
    SEEN.update(cases=SEEN["cases"] + 1, seconds=max(SEEN["seconds"], seconds), mb=max(SEEN["mb"], mb))
    print(f"{name}: {seconds:.2f} s, +{mb} MB: {err.strip()}")
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}: {err[-2000:]}"
    assert len(lines) == 1, err
    assert file in lines[0] and field in lines[0], lines[0]
    assert seconds < MAX_SECONDS and mb < MAX_MB


def test_zz_summary():
    """The count of cases and the worst time and memory seen (run last: pytest keeps file order)."""
    print(f"{SEEN['cases']} malformed inputs: slowest {SEEN['seconds']:.2f} s, peak RSS growth {SEEN['mb']} MB")
    assert len(CASES) >= 40
