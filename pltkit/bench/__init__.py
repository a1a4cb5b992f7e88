"""plt-bench: decode latency, memory and quality against the paper and against llama.cpp."""

import hashlib
from functools import cache
from pathlib import Path


@cache
def export_stamp() -> str:
    """A short hash of the export and quantization code. Artifacts cached between runs are named
    with it, so a run never times graphs that an older exporter wrote."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted([*(root / "export").glob("*.py"), *(root / "quant").glob("*.py")]):
        h.update(f.read_bytes())
    return h.hexdigest()[:10]
