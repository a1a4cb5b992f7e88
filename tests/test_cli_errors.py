"""Every command-line tool driven through bad invocations, as real processes: each exits with code 2
and says what is wrong in its last stderr line, naming the flag or the file, without a traceback.

A value argparse rejects prints its usage, then `prog: error: argument --flag: ...`; any other
error is one line, `prog: message`. The table runs once, its processes a few at a time; most fail
before torch is imported."""

import importlib
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="writing GGUF files needs the gguf package")

MODULES = {"plt-complete": "complete", "plt-eval": "eval", "plt-export": "export", "plt-serve": "serve",
           "plt-import": "import_model", "plt-train": "train", "plt-bench": "bench", "plt-lsp": "lsp"}

# (id, command line, text the last stderr line must hold); {d} is a folder holding notamodel.txt, an
# empty folder `empty`, GGUF files and a truncated one, whose size is {n} and full size {m}
CASES = [
    # the cases
    ("eval-missing-model", "plt-eval {d}/nothing", "{d}/nothing: not a model folder"),
    ("eval-text-file", "plt-eval notamodel.txt", "notamodel.txt: not a model folder"),
    ("eval-missing-relative", "plt-eval notamodel.md", "notamodel.md: not a model folder"),
    ("serve-port-too-large", "plt-serve --port 99999", "argument --port"),
    ("serve-port-negative", "plt-serve --port -1", "argument --port"),
    ("complete-threads-negative", "plt-complete --threads -1 x", "argument --threads"),
    ("eval-windows-zero", "plt-eval --windows 0", "argument --windows"),
    ("import-truncated-gguf", "plt-import {d}/truncated.gguf -o {d}/out",
     "truncated.gguf: file truncated at byte {n}, expected {m} bytes"),
    ("import-truncated-header", "plt-import {d}/header.gguf -o {d}/out", "header.gguf: file truncated at byte 40"),
    ("complete-gguf-model", "plt-complete --model {d}/model.gguf x", "plt-import {d}/model.gguf"),
    ("serve-gguf-model", "plt-serve --model {d}/model.gguf --socket {d}/s.sock", "plt-import {d}/model.gguf"),
    ("eval-gguf-model", "plt-eval {d}/weights.bin", "plt-import {d}/weights.bin"),
    ("export-gguf-model", "plt-export {d}/model.gguf -o {d}/out", "plt-import {d}/model.gguf"),
    ("complete-max-tokens-zero", "plt-complete --max-tokens 0 x", "argument --max-tokens"),
    # plt-complete
    ("complete-max-tokens-word", "plt-complete --max-tokens many x", "argument --max-tokens"),
    ("complete-temperature-negative", "plt-complete --temperature -0.5 x", "argument --temperature"),
    ("complete-temperature-nan", "plt-complete --temperature nan x", "argument --temperature"),
    ("complete-top-p-zero", "plt-complete --top-p 0 x", "argument --top-p"),
    ("complete-top-p-above-one", "plt-complete --top-p 1.5 x", "argument --top-p"),
    ("complete-top-k-negative", "plt-complete --top-k -1 x", "argument --top-k"),
    ("complete-seed-negative", "plt-complete --seed -2 x", "argument --seed"),
    ("complete-n-indent-negative", "plt-complete --n-indent -4 x", "argument --n-indent"),
    ("complete-empty-stop", "plt-complete --stop= x", "argument --stop"),
    ("complete-suffix-file-missing", "plt-complete --suffix-file {d}/nothing x", "argument --suffix-file: {d}/nothing"),
    ("complete-suffix-file-folder", "plt-complete --suffix-file {d}/empty x", "argument --suffix-file: {d}/empty"),
    ("complete-model-empty-folder", "plt-complete --model {d}/empty x", "{d}/empty/config.json"),
    ("complete-unknown-backend", "plt-complete --backend gpu x", "argument --backend"),
    # plt-eval
    ("eval-threads-zero", "plt-eval --threads 0", "argument --threads"),
    ("eval-seq-len-negative", "plt-eval --seq-len -8", "argument --seq-len"),
    ("eval-unknown-backend", "plt-eval --backend onnx", "argument --backend"),
    ("eval-empty-folder", "plt-eval {d}/empty", "{d}/empty/config.json"),
    # plt-serve
    ("serve-port-word", "plt-serve --port http", "argument --port"),
    ("serve-threads-zero", "plt-serve --threads 0", "argument --threads"),
    ("serve-slots-zero", "plt-serve --slots 0", "argument --slots"),
    ("serve-queue-negative", "plt-serve --max-queue -1", "argument --max-queue"),
    ("serve-cache-negative", "plt-serve --cache-mb -256", "argument --cache-mb"),
    ("serve-max-body-zero", "plt-serve --max-body 0", "argument --max-body"),
    ("serve-max-predict-zero", "plt-serve --max-predict 0", "argument --max-predict"),
    ("serve-missing-model", "plt-serve --model {d}/nothing --socket {d}/s.sock", "{d}/nothing: not a model folder"),
    ("serve-socket-is-a-file", "plt-serve --socket {d}/notamodel.txt", "{d}/notamodel.txt"),
    ("serve-public-without-key", "plt-serve --host 0.0.0.0 --port 8013", "--api-key"),
    # plt-lsp
    ("lsp-threads-zero", "plt-lsp --threads 0", "argument --threads"),
    ("lsp-missing-model", "plt-lsp --model {d}/nothing", "{d}/nothing: not a model folder"),
    # plt-export
    ("export-missing-checkpoint", "plt-export {d}/nothing -o {d}/out", "{d}/nothing: not a model folder"),
    ("export-eval-windows-zero", "plt-export --int8 --eval-windows 0", "argument --eval-windows"),
    ("export-calib-file", "plt-export --int8 --target trt --calib {d}/notamodel.txt", "argument --calib"),
    ("export-int8-dq-for-trt", "plt-export --int8-dq --target trt", "--target trt applies to --int8"),
    ("export-int8-and-int8-dq", "plt-export --int8 --int8-dq", "argument --int8-dq: not allowed with argument --int8"),
    # plt-import
    ("import-missing-source", "plt-import {d}/nothing.gguf -o {d}/out", "{d}/nothing.gguf"),
    ("import-unknown-dtype", "plt-import {d}/model.gguf --dtype int3", "argument --dtype"),
    # plt-train
    ("train-lr-zero", "plt-train --out {d}/run --lr 0", "argument --lr"),
    ("train-heads-kv-heads", "plt-train --out {d}/run --heads 6 --kv-heads 4", "--heads = 6"),
    ("train-tokenizer-missing", "plt-train --out {d}/run --tokenizer {d}/nothing", "argument --tokenizer"),
    # plt-bench
    ("bench-steps-above-56", "plt-bench --steps 57", "argument --steps"),
    ("bench-context-zero", "plt-bench --contexts 256 0", "argument --contexts"),
    ("bench-repeats-zero", "plt-bench --repeats 0", "argument --repeats"),
]
GGUF_CASES = {"import-truncated-gguf", "import-truncated-header"}


def write_gguf_files(d):
    """model.gguf and weights.bin (GGUF files by name and by magic), and, with the gguf package, a
    small GGUF file cut inside its tensor data (truncated.gguf) and inside its header (header.gguf)."""
    (d / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    (d / "weights.bin").write_bytes(b"GGUF" + bytes(60))
    if not HAS_GGUF:
        return {}
    import gguf
    import numpy as np

    full = d / "full.gguf"
    w = gguf.GGUFWriter(str(full), "llama")
    w.add_block_count(1)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.ones((3, 64), np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    last = gguf.GGUFReader(full).tensors[-1]
    m = int(last.data_offset + last.n_bytes)
    n = m - 100  # inside the last tensor's data
    data = full.read_bytes()
    (d / "truncated.gguf").write_bytes(data[:n])
    (d / "header.gguf").write_bytes(data[:40])
    return {"n": n, "m": m}


def run_case(argv: list[str], cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"pltkit.cli.{MODULES[argv[0]]}", *argv[1:]]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Every case's result, run once as processes a few at a time; and the values of the placeholders."""
    d = tmp_path_factory.mktemp("cli")
    (d / "notamodel.txt").write_text("not a model\n")
    (d / "empty").mkdir()
    values = {"d": str(d), **write_gguf_files(d)}
    cases = [(cid, cmd.format(**values).split()) for cid, cmd, _ in CASES if HAS_GGUF or cid not in GGUF_CASES]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        done = {cid: pool.submit(run_case, argv, d) for cid, argv in cases}
        return {cid: f.result() for cid, f in done.items()}, values


@pytest.mark.parametrize("cid, cmd, want", [
    pytest.param(*case, id=case[0], marks=[needs_gguf] if case[0] in GGUF_CASES else []) for case in CASES])
def test_bad_invocation_exits_2_with_one_line(table, cid, cmd, want):
    results, values = table
    r, prog, want = results[cid], cmd.split()[0], want.format(**values)
    print(f"$ {cmd.format(**values)}\n{r.stderr}")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert lines and want in lines[-1]
    if len(lines) == 1:
        assert lines[0].startswith(f"{prog}: ")
    else:  # argparse's form: its usage (wrapped), then the error
        assert lines[0].startswith(f"usage: {prog} ") and all(line.startswith(" ") for line in lines[1:-1])
        assert lines[-1].startswith(f"{prog}: error: ")


def test_the_table_covers_every_command():
    assert len(CASES) >= 30 and len({cid for cid, _, _ in CASES}) == len(CASES)
    assert {cmd.split()[0] for _, cmd, _ in CASES} == set(MODULES)


def option_help(text: str, flag: str) -> str:
    """The help of one option in --help output: its line and the indented lines that follow."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag + " "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-")), len(lines))
    return " ".join(line.strip() for line in lines[start:end])


def help_text(prog: str, capsys) -> str:
    module = importlib.import_module(f"pltkit.cli.{MODULES[prog]}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("prog, flags", [
    ("plt-complete", ["--max-tokens", "--top-k", "--top-p", "--seed", "--temperature", "--n-indent"]),
    ("plt-serve", ["--slots", "--max-queue", "--cache-mb", "--max-predict", "--max-body", "--host"]),
    ("plt-eval", ["--windows", "--reference"]),
    ("plt-bench", ["--forms", "--contexts", "--steps", "--repeats", "--llamacpp-ctx", "--shape"]),
    ("plt-export", ["--target", "--dtype", "--eval-windows"]),
])
def test_help_shows_defaults(prog, flags, capsys):
    text = help_text(prog, capsys)
    for flag in flags:
        assert "(default: " in option_help(text, flag), (flag, option_help(text, flag))


def test_help_texts(capsys):
    threads = {prog: option_help(help_text(prog, capsys), "--threads")
               for prog in ("plt-complete", "plt-serve", "plt-eval", "plt-bench")}
    assert all("default: the physical cores" in h for h in threads.values()), threads
    assert "{torch,ort," in option_help(help_text("plt-eval", capsys), "--backend")
    serve = option_help(help_text("plt-serve", capsys), "--backend")
    assert "torch for a checkpoint" not in serve and "exported once to an ONNX artifact" in serve
    bench = " ".join(help_text("plt-bench", capsys).split())
    assert "about 4 minutes on a 2-core CPU" in bench
