"""Read an exported artifact folder through its manifest (pltkit.json); nothing else is trusted."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pltkit.model.config import PLTConfig

MANIFEST = "pltkit.json"
FORMAT = "pltkit-artifact"
SUPPORTED_VERSIONS = (1, 2)


class ArtifactError(ValueError):
    """An artifact folder that this runtime cannot run."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path) -> Artifact:
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: no readable {MANIFEST} ({e})") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") not in SUPPORTED_VERSIONS:
            raise ArtifactError(f"{path}: {MANIFEST} is format {manifest.get('format')!r} version "
                                f"{manifest.get('format_version')!r}; this pltkit reads {FORMAT} {SUPPORTED_VERSIONS}")
        missing = [f for f in manifest.get("files", {}) if not (path / f).is_file()]
        if missing:
            raise ArtifactError(f"{path}: files named in the manifest are missing: {', '.join(missing)}")
        return cls(path, manifest)

    @property
    def config(self) -> PLTConfig:
        return PLTConfig.from_dict(self.manifest["config"])

    @property
    def attention_variants(self) -> list[str]:
        return list(self.manifest["graphs"])

    def graph_path(self, phase: str, attention: str = "function") -> Path:
        return self.path / self.manifest["graphs"][attention][phase]["file"]

    def verify(self) -> None:
        """Check every file against its sha256 in the manifest."""
        for name, digest in self.manifest["files"].items():
            h = hashlib.sha256()
            with open(self.path / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            if h.hexdigest() != digest:
                raise ArtifactError(f"{self.path / name}: sha256 differs from the manifest (file changed or damaged)")


def is_artifact(path) -> bool:
    return (Path(path) / MANIFEST).is_file()
