"""The default paths stay quick: plt-complete runs a checkpoint from its cached ONNX Runtime
artifact (exported once), accuracy reports measure a fixed sample of held-out windows unless asked
for all, and plt-export refuses a bad output folder before it calibrates."""

import json
import os
import subprocess

import numpy as np
import pytest
from serving import torch_hidden
from synth import make_checkpoint, make_config
from tokenizers import Tokenizer

from pltkit.cli import args as cli_args
from pltkit.cli import eval as cli_eval
from pltkit.cli import export as cli_export
from pltkit.runtime.artifact import is_artifact
from pltkit.train import calibrate as train_calibrate
from pltkit.train import data
from pltkit.train.accuracy import SAMPLE_WINDOWS

CODE = "def f(x):\n    return [i * x for i in range(10)]\n\n\nclass A:\n    def g(self):\n        return 1\n"


def run_complete(ckpt, cache, *extra, env=()):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), **dict(env)}
    return subprocess.run(["plt-complete", "--model", str(ckpt), "--json", "--max-tokens", "8", *extra, "def f(x):"],
                          capture_output=True, text=True, env=env, check=True)


def test_plt_complete_exports_a_checkpoint_once_then_runs_the_cached_artifact(tmp_path, monkeypatch, caplog):
    make_checkpoint(tmp_path / "ckpt", seed=1)
    cache = tmp_path / "cache"
    first = run_complete(tmp_path / "ckpt", cache)
    artifacts = list((cache / "pltkit" / "artifacts").iterdir())
    assert len(artifacts) == 1 and is_artifact(artifacts[0])
    assert "exporting ckpt to" in first.stderr and str(artifacts[0]) in first.stderr
    assert json.loads(first.stdout)["backend"] == "ort"
    stamp = (artifacts[0] / "pltkit.json").stat().st_mtime_ns

    # later runs: no export, and no torch needed (here it cannot be imported); the same tokens
    second = run_complete(tmp_path / "ckpt", cache, env={"PYTHONPATH": torch_hidden(tmp_path / "blocker")})
    assert "exporting" not in second.stderr
    assert (artifacts[0] / "pltkit.json").stat().st_mtime_ns == stamp
    assert json.loads(second.stdout)["tokens"] == json.loads(first.stdout)["tokens"]

    # plt-serve opens the same artifact through the same function
    from pltkit.serve.loading import open_model
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    model = open_model(tmp_path / "ckpt", threads=1)
    assert model.details["backend"] == "ort" and model.engine.backend.artifact.path == artifacts[0]
    assert "exporting" not in caplog.text


def test_spread_is_a_fixed_even_sample():
    for n in (1, 2, 7, 184):
        for k in range(1, n + 1):
            s = data.spread(n, k)
            assert len(set(s)) == k and list(s) == sorted(s) and s[0] == 0 and (k == 1 or s[-1] == n - 1)
    assert list(data.spread(5, None)) == list(data.spread(5, 9)) == [0, 1, 2, 3, 4]


@pytest.fixture
def small_heldout(tmp_path, monkeypatch):
    """A tiny checkpoint with a 64-token context, and a held-out set of a few files (many windows)."""
    files = []
    for i in range(4):
        files.append(tmp_path / f"held{i}.py")
        files[-1].write_text(CODE.replace("f(", f"f{i}(") * (6 + i))
    monkeypatch.setattr(data, "stdlib_split", lambda root=None: ([], files))
    monkeypatch.setattr("pltkit.train.samples.held_out_prompts", lambda n: [{"prefix": CODE}])
    for backend in ("torch_backend", "ort_backend"):  # a tiny model runs fastest on one thread
        monkeypatch.setattr(f"pltkit.runtime.{backend}.physical_cores", lambda: 1)
    make_checkpoint(tmp_path / "ckpt", make_config(max_position_embeddings=64), seed=4)
    _, targets = data.eval_sequences(files, Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json")), 64)
    total_tokens = int((targets != data.IGNORE_INDEX).sum())
    assert len(targets) > 2 * SAMPLE_WINDOWS  # so that a sample is visibly not the whole set
    return tmp_path / "ckpt", len(targets), total_tokens


def test_export_report_measures_the_fixed_sample_and_says_so(small_heldout, tmp_path, capsys):
    ckpt, windows, total_tokens = small_heldout
    assert cli_export.main([str(ckpt), "--int8", "-o", str(tmp_path / "int8")]) == 0
    err = capsys.readouterr().err
    assert f"on {SAMPLE_WINDOWS} held-out windows" in err and "--eval-windows all" in err
    report = json.loads((tmp_path / "int8" / "pltkit.json").read_text())["accuracy"]
    assert report["windows"] == SAMPLE_WINDOWS and report["windows_total"] == windows
    assert 0 < report["tokens"] <= 64 * SAMPLE_WINDOWS < total_tokens
    assert json.dumps(report["tokens"]) in err  # the printed report names its token count

    # plt-eval: the same sample by default, every window with --windows all
    assert cli_eval.main([str(tmp_path / "int8"), "--reference", str(ckpt)]) == 0
    sample = json.loads(capsys.readouterr().out)
    assert (sample["windows"], sample["tokens"]) == (report["windows"], report["tokens"])
    assert sample["top1_agreement"] == report["top1_agreement"]  # the same windows every run
    assert cli_eval.main([str(tmp_path / "int8"), "--reference", str(ckpt), "--windows", "all"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["windows"] == full["windows_total"] == windows and full["tokens"] == total_tokens


def test_eval_of_a_checkpoint_samples_windows_too(small_heldout, capsys):
    ckpt, windows, total_tokens = small_heldout
    assert cli_eval.main([str(ckpt), "--windows", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["windows"] == 3 and r["windows_total"] == windows and r["tokens"] <= 3 * 64
    assert cli_eval.main([str(ckpt), "--windows", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == total_tokens


@pytest.mark.parametrize("flags", [["--fp8"], ["--int8", "--target", "trt"]])
def test_export_refuses_a_busy_folder_before_calibrating(tmp_path, monkeypatch, capsys, flags):
    def calibrate(*a, **k):
        raise AssertionError("calibrated before checking the output folder")
    monkeypatch.setattr(train_calibrate, "calibrate", calibrate)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert cli_export.main(["default", *flags, "-o", str(tmp_path / "busy")]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_calibration_checks_its_folder_before_loading_the_model(tmp_path, monkeypatch):
    def load_model(*a, **k):
        raise AssertionError("loaded the model before checking --calib")
    monkeypatch.setattr("pltkit.model.checkpoint.load_model", load_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .py files"):
        train_calibrate.calibrate("default", tmp_path / "empty")


def test_window_count_parses_numbers_and_all():
    import argparse
    assert cli_args.window_count("all") is None and cli_args.window_count("12") == 12
    for bad in ("0", "-3", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_args.window_count(bad)
    assert np.array_equal(data.spread(10, 3), [0, 4, 9])
