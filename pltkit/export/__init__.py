"""pltkit.export"""

import hashlib
from functools import cache
from pathlib import Path


@cache
def export_stamp() -> str:
    """A short hash of the export and quantization code. Artifacts cached between runs (plt-complete's of a
    checkpoint, plt-bench's) are named with it, so no run uses graphs that an older exporter wrote."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted([*(root / "export").glob("*.py"), *(root / "quant").glob("*.py")]):
        h.update(f.read_bytes())
    return h.hexdigest()[:10]
