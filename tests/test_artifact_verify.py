"""An artifact's files are checked against its manifest at load: a changed or cut file is a one-line
error naming it (plt-complete: exit code 2) unless --no-verify is given, and each file is hashed once
per identity (size, times, inode), remembered in the user cache; later loads only stat it."""

import json
import os
import shutil

import pytest

from pltkit.cli import complete, eval as eval_cli, serve
from pltkit.runtime import artifact as artifact_mod
from pltkit.runtime.artifact import Artifact, ArtifactError


@pytest.fixture
def art(served_artifact, tmp_path, monkeypatch):
    """A private copy of the default model's artifact, and a private, empty user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return shutil.copytree(served_artifact, tmp_path / "art")


@pytest.fixture
def hashed(monkeypatch):
    """The files hashed, and their bytes, by every verification from here on."""
    seen = []
    digest = artifact_mod.file_sha256
    monkeypatch.setattr(artifact_mod, "file_sha256", lambda path: seen.append((path.name, path.stat().st_size)) or
                        digest(path))
    return seen


def flip_bit(path, offset=4096):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


def plt_complete(capsys, *argv):
    rc = complete.main(["--max-tokens", "3", "--threads", "1", *map(str, argv), "def "])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_flipped_bit_is_one_line_naming_the_file_and_no_verify_runs_it(art, capsys):
    flip_bit(art / "weights.bin")
    with pytest.raises(ArtifactError, match=r"weights\.bin: its sha256 differs"):
        Artifact.open(art)
    rc, err = plt_complete(capsys, "--model", art)
    assert rc == 2 and len(err) == 1 and err[0].startswith("plt-complete: ") and f"{art / 'weights.bin'}:" in err[0]
    assert plt_complete(capsys, "--model", art, "--no-verify") == (0, [])
    assert Artifact.open(art, verify=False).path == art


def test_a_truncated_weights_file_is_one_line_not_an_onnx_runtime_traceback(art, capsys, hashed):
    weights = art / "weights.bin"
    size = weights.stat().st_size
    Artifact.open(art)  # remembered: the size it had when it matched is known from now on
    os.truncate(weights, size // 2)
    hashed.clear()
    rc, err = plt_complete(capsys, "--model", art)
    assert rc == 2 and len(err) == 1 and f"{weights}: {size // 2} bytes" in err[0] and f"had {size}" in err[0]
    assert "Fail" not in err[0] and hashed == []  # caught by its size, before any hashing
    shutil.rmtree(art.parent / "cache")  # nothing remembered, and (as in artifacts of older exporters) no
    manifest = json.loads((art / "pltkit.json").read_text())  # sizes in the manifest: the hash catches it
    del manifest["sizes"]
    (art / "pltkit.json").write_text(json.dumps(manifest))
    rc, err = plt_complete(capsys, "--model", art)
    assert rc == 2 and len(err) == 1 and f"{weights}: its sha256 differs" in err[0]


def test_sizes_in_the_manifest_are_checked_before_hashing(art, hashed):
    manifest = json.loads((art / "pltkit.json").read_text())  # the exporter records them
    assert manifest["sizes"] == {name: (art / name).stat().st_size for name in manifest["files"]}
    Artifact.open(art)
    os.truncate(art / "weights.bin", 100)
    shutil.rmtree(art.parent / "cache")
    hashed.clear()
    with pytest.raises(ArtifactError, match=r"weights\.bin: 100 bytes"):
        Artifact.open(art)
    assert hashed == []


def test_each_file_is_hashed_once_until_it_is_touched(art, hashed):
    files = json.loads((art / "pltkit.json").read_text())["files"]
    Artifact.open(art)
    assert sorted(n for n, _ in hashed) == sorted(files)
    assert sum(s for _, s in hashed) == sum((art / n).stat().st_size for n in files)
    hashed.clear()
    Artifact.open(art)
    assert hashed == []
    st = (art / "weights.bin").stat()
    os.utime(art / "weights.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    Artifact.open(art)
    assert [n for n, _ in hashed] == ["weights.bin"]
    hashed.clear()
    Artifact.open(art)
    assert hashed == []


@pytest.mark.parametrize("cache", [b"{not json", b"\xff\xfe", b"[]", b'{"files": []}', b'{"files": {"x": 1}}', b""])
def test_a_damaged_cache_counts_as_nothing_verified(art, hashed, cache):
    verified = art.parent / "cache" / "pltkit" / "verified.json"
    verified.parent.mkdir(parents=True)
    verified.write_bytes(cache)
    Artifact.open(art)
    assert "weights.bin" in [n for n, _ in hashed]
    assert str((art / "weights.bin").resolve()) in json.loads(verified.read_text())["files"]
    hashed.clear()
    Artifact.open(art)
    assert hashed == []


def test_a_cache_that_cannot_be_written_is_skipped(art, hashed, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    Artifact.open(art)
    Artifact.open(art)
    assert [n for n, _ in hashed].count("weights.bin") == 2


def test_plt_complete_serve_and_eval_take_no_verify(capsys):
    for cli in (complete, serve, eval_cli):
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        assert "--no-verify" in capsys.readouterr().out
