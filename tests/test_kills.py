"""SIGKILL at every stage of plt-export (fresh and --force) and plt-import (GGUF), through the
PLTKIT_KILL_AT=<stage> hook (pltkit.model.folders.kill_point).

After each kill the output is either a complete artifact (checkpoint) whose files match its manifest,
or absent; a --force replacement keeps the old one until the new one is complete. The next run
removes the leftovers of the killed one and puts an old folder left aside back. A damaged cached
export (plt-serve, plt-complete) is exported again by itself.

The commands run in children forked by one driver process that has imported pltkit, torch and onnx
once (a fresh `python -m pltkit.cli.export` per kill spends 2-3 s importing them)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from synth import make_checkpoint, make_config

from pltkit.export.artifact import GRAPHS, WEIGHTS, export
from pltkit.model.checkpoint import open_checkpoint
from pltkit.runtime.artifact import Artifact

EXPORT_STAGES = ["start", *(g[0] for g in GRAPHS), WEIGHTS, "checked", "tokenizer", "before-rename"]
KILLED = -9

DRIVER = r"""
import json, os, sys
import pltkit.export.artifact, pltkit.model.llama_import  # torch, onnx, gguf: imported once, before forking
from pltkit.cli import export, import_model
pltkit.model.checkpoint.open_checkpoint(sys.argv[1])  # and what it imports on first use
for line in sys.stdin:
    stage, cli, argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(2, 1)  # the command's output stays off the answers
        if stage:
            os.environ["PLTKIT_KILL_AT"] = stage
        os._exit({"export": export, "import": import_model}[cli].main(argv))
    status = os.waitpid(pid, 0)[1]
    print(json.dumps([pid, os.waitstatus_to_exitcode(status)]), flush=True)
"""


@pytest.fixture(scope="module")
def run(ckpt):
    """run(cli, *argv, kill_at=None) -> (pid, exit code; -9 when killed) of `plt-<cli> argv`."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(ckpt)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def command(cli, *argv, kill_at=None):
        driver.stdin.write(json.dumps([kill_at, cli, [str(a) for a in argv]]) + "\n")
        driver.stdin.flush()
        return tuple(json.loads(driver.stdout.readline()))

    yield command
    driver.stdin.close()
    driver.wait(timeout=30)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("kills") / "ckpt"
    make_checkpoint(path, make_config(), seed=1)
    return path


@pytest.fixture(scope="module")
def artifact(ckpt):
    return export(ckpt, ckpt.parent / "artifact")


def owners(folder: Path) -> set[int]:
    """PIDs of the temporary and set-aside folders in `folder`."""
    names = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    found = [re.search(r"(?:partial-|old-)(\d+)$|\.(\d+)\.\w+\.partial$", n) for n in names]
    assert all(found), names  # no other hidden leftovers (e.g. an old version's `.X.PID.old`)
    return {int(m[1] or m[2]) for m in found}


def state(out: Path, opens=lambda p: Artifact.open(p).verify()) -> str:
    """'missing', or 'old' / 'new' for a complete output with / without the OLD marker file."""
    if not out.exists():
        return "missing"
    opens(out)  # raises for a damaged folder
    return "old" if (out / "OLD").exists() else "new"


def test_kills_during_a_fresh_export_leave_nothing(run, ckpt, tmp_path):
    out = tmp_path / "a"
    for stage in ("decode.onnx", "before-rename", "between-renames"):
        pid, rc = run("export", ckpt, "-o", out, kill_at=stage)
        assert rc == KILLED and state(out) == "missing" and owners(tmp_path) <= {pid}, stage
    assert run("export", ckpt, "-o", out)[1] == 0
    assert state(out) == "new" and owners(tmp_path) == set()


def test_kills_during_a_forced_export_keep_the_old_artifact(run, ckpt, artifact, tmp_path):
    out = tmp_path / "a"
    shutil.copytree(artifact, out)
    (out / "OLD").write_text("the artifact --force replaces")
    for stage in EXPORT_STAGES:
        pid, rc = run("export", ckpt, "-o", out, "--force", kill_at=stage)
        assert rc == KILLED and state(out) == "old" and owners(tmp_path) <= {pid}, stage

    pid, rc = run("export", ckpt, "-o", out, "--force", kill_at="between-renames")
    assert rc == KILLED and state(out) == "missing" and owners(tmp_path) == {pid}  # the old one, set aside
    assert run("export", ckpt, "-o", out)[1] == 2  # put back, so not empty: refused without --force
    assert state(out) == "old" and owners(tmp_path) == set()

    pid, rc = run("export", ckpt, "-o", out, "--force", kill_at="after-rename")
    assert rc == KILLED and state(out) == "new" and owners(tmp_path) <= {pid}
    assert run("export", ckpt, "-o", out, "--force")[1] == 0
    assert state(out) == "new" and owners(tmp_path) == set()


def test_kills_during_a_gguf_import(run, tmp_path):
    pytest.importorskip("gguf")
    from test_import import make_hf_llama, write_gguf

    hf, w = make_hf_llama(tmp_path / "hf", seed=2, head_dim=8, rms_norm_eps=1e-5)
    src, out = tmp_path / "tiny.gguf", tmp_path / "m"
    write_gguf(src, hf, w, tmp_path / "hf")

    def loads(p):
        open_checkpoint(p)

    pid, rc = run("import", src, "-o", out, kill_at="written")
    assert rc == KILLED and state(out, loads) == "missing" and owners(tmp_path) <= {pid}
    assert run("import", src, "-o", out)[1] == 0
    assert state(out, loads) == "new" and owners(tmp_path) == set()

    (out / "OLD").write_text("the checkpoint --force replaces")
    for stage in ("written", "before-rename"):
        pid, rc = run("import", src, "-o", out, "--force", kill_at=stage)
        assert rc == KILLED and state(out, loads) == "old" and owners(tmp_path) <= {pid}, stage
    pid, rc = run("import", src, "-o", out, "--force", kill_at="between-renames")
    assert rc == KILLED and state(out, loads) == "missing" and owners(tmp_path) == {pid}
    assert run("import", src, "-o", out)[1] == 2  # put back, so not empty
    assert state(out, loads) == "old" and owners(tmp_path) == set()
    pid, rc = run("import", src, "-o", out, "--force", kill_at="after-rename")
    assert rc == KILLED and state(out, loads) == "new" and owners(tmp_path) <= {pid}
    assert run("import", src, "-o", out, "--force")[1] == 0
    assert state(out, loads) == "new" and owners(tmp_path) == set()


def test_a_damaged_cached_export_is_exported_again(tmp_path, monkeypatch, caplog):
    """plt-serve and plt-complete run the default model from its export in the user cache: one that
    lost a file (e.g. to a kill in an older version's --force) is rebuilt, not a 500 for good."""
    from pltkit.runtime.backends import open_fastest

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _, path = open_fastest("default")
    (path / WEIGHTS).unlink()
    with caplog.at_level("WARNING"):
        backend, again = open_fastest("default")
    assert again == path and "exporting it again" in caplog.text
    Artifact.open(path).verify()
    assert backend is not None and owners(path.parent) == set()
