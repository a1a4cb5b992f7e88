"""plt-export: export a PLT checkpoint to an ONNX artifact folder that ONNX Runtime runs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plt-export", description=__doc__)
    p.add_argument("checkpoint", nargs="?", default="default", help="checkpoint folder or 'default'")
    p.add_argument("-o", "--out", type=Path, help="artifact folder (default: ./<checkpoint name>-fp32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        from pltkit.export.artifact import ExportError, export
    except ImportError as e:
        print(f"plt-export: needs PyTorch ({e.name} is not installed): pip install 'pltkit[torch]'", file=sys.stderr)
        return 2
    from pltkit.model.config import ConfigError
    from pltkit.model.paths import CheckpointError

    out = args.out or Path(f"{Path(str(args.checkpoint)).name}-fp32")
    try:
        export(args.checkpoint, out, force=args.force)
    except (ExportError, CheckpointError, ConfigError) as e:
        print(f"plt-export: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plt-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
