"""Read an exported artifact folder through its manifest (pltkit.json); nothing else is trusted."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pltkit.model.config import ConfigError, PLTConfig
from pltkit.model.folders import write_file
from pltkit.model.formats import ARTIFACT_FORMAT, MANIFEST, READABLE_VERSIONS
from pltkit.model.paths import file_sha256, user_cache_dir

log = logging.getLogger(__name__)

VERIFIED = "verified.json"  # in the user cache: the sha256 of each file already hashed, by file identity


class ArtifactError(ValueError):
    """An artifact folder that this runtime cannot run."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path, verify: bool = True) -> Artifact:
        """The artifact in folder `path`; with `verify`, its files checked against the manifest (see verify)."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: no readable {MANIFEST} ({e})") from None
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{path / MANIFEST}: not a JSON object")
        if manifest.get("format") != ARTIFACT_FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
            raise ArtifactError(f"{path}: {MANIFEST} is format {manifest.get('format')!r} version "
                                f"{manifest.get('format_version')!r}; this pltkit reads {ARTIFACT_FORMAT} {READABLE_VERSIONS}")
        try:
            PLTConfig.from_dict(manifest.get("config"))
        except (ConfigError, AttributeError, TypeError) as e:  # checked before anything is sized by it
            raise ArtifactError(f"{path / MANIFEST}: {e if isinstance(e, ConfigError) else 'no config object'}") \
                from None
        files, sizes = manifest.get("files"), manifest.get("sizes", {})
        if not (isinstance(files, dict) and all(_plain_name(f) and isinstance(d, str) for f, d in files.items())):
            raise ArtifactError(f"{path / MANIFEST}: field 'files' must map file names in the folder to sha256 digests")
        if not (isinstance(sizes, dict) and all(f in files and type(n) is int for f, n in sizes.items())):
            raise ArtifactError(f"{path / MANIFEST}: field 'sizes' must map the files' names to byte counts")
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ArtifactError(f"{path}: files named in the manifest are missing: {', '.join(missing)}")
        artifact = cls(path, manifest)
        if verify:
            artifact.verify()
        return artifact

    @property
    def config(self) -> PLTConfig:
        return PLTConfig.from_dict(self.manifest["config"])

    @property
    def attention_variants(self) -> list[str]:
        return list(self.manifest["graphs"])

    def graph_path(self, phase: str, attention: str = "function") -> Path:
        return self.path / self.manifest["graphs"][attention][phase]["file"]

    def cache_writes(self, phase: str, attention: str) -> int:
        """How many positions of the global cache one token of the graph writes: more than one where a
        decode step writes copies after its token (see GQA.step), so the buffers keep spare positions."""
        return self.manifest["graphs"][attention][phase].get("cache_writes", 1)

    def verify(self, remember: bool = True) -> None:
        """Check every file against the manifest: its size where known (the manifest's "sizes", or the
        size it had when it last matched), then its sha256. A file is hashed once per identity (size,
        mtime, ctime, inode, device), remembered in the user cache: later checks only stat it.
        remember=False hashes every file now."""
        known = _remembered() if remember else {}
        sizes = self.manifest.get("sizes", {})
        files = []
        for name, want in self.manifest["files"].items():  # sizes first: a truncated file fails before any hashing
            file = self.path / name
            key, st = str(file.resolve()), file.stat()
            seen = known.get(key)
            size = sizes.get(name, seen["id"][0] if seen and seen["sha256"] == want else None)
            if size is not None and st.st_size != size:
                raise ArtifactError(f"{file}: {st.st_size} bytes where the exported file had {size} (truncated or "
                                    "changed since export); re-export it")
            files.append((file, key, st, seen, want))
        learned = {}
        try:
            for file, key, st, seen, want in files:
                if seen and seen["id"] == _identity(st):
                    got = seen["sha256"]
                else:
                    got = file_sha256(file)
                    if _identity(file.stat()) == _identity(st):  # not written to while it was hashed
                        learned[key] = {"id": _identity(st), "sha256": got}
                if got != want:
                    raise ArtifactError(f"{file}: its sha256 differs from the artifact's manifest (changed or damaged "
                                        "since export); re-export it, or pass --no-verify to run it anyway")
        finally:
            if learned and remember:
                _remember(learned)


def update_manifest(folder, change: Callable[[dict], None]) -> None:
    """Rewrite an artifact's manifest with change(manifest) applied, atomically: a kill leaves the old one."""
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    write_file(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))


def _plain_name(name) -> bool:
    """A file name inside the folder: no path separators, not '.' or '..'."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _identity(st: os.stat_result) -> list[int]:
    """What stays the same while a file's bytes do: any write, truncation, touch or replacement changes it."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _verified_path() -> Path:
    return user_cache_dir() / VERIFIED


def _remembered() -> dict:
    """{resolved path: {"id": identity, "sha256": digest}} from the user cache; a missing, unreadable or
    damaged cache, or entry, counts as nothing hashed yet."""
    try:
        entries = json.loads(_verified_path().read_text())["files"]
        return {k: e for k, e in entries.items() if isinstance(e, dict) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("id"), list) and len(e["id"]) == 5 and all(type(v) is int for v in e["id"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _remember(learned: dict) -> None:
    """Adds digests to the cache (entries of files that are gone are dropped), atomically: a concurrent
    writer can at worst make a later open hash a file again. A cache that cannot be written is skipped."""
    path = _verified_path()
    entries = {k: e for k, e in {**_remembered(), **learned}.items() if os.path.exists(k)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{VERIFIED}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"files": entries}, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log.debug("could not remember verified files in %s: %s", path, e)


def is_artifact(path) -> bool:
    return (Path(path) / MANIFEST).is_file()
