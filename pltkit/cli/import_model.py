"""plt-import: import a Llama-architecture model (a llama.cpp GGUF file or a Hugging Face
LlamaForCausalLM folder) as a PLT checkpoint with one loop, which every pltkit command runs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pltkit.cli.args import HelpFormatter, one_line_errors


@one_line_errors("plt-import")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plt-import", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("source", type=Path, help="a .gguf file (architecture llama, gpt2 or llama tokenizer) or a Hugging "
                                             "Face Llama folder (config.json, safetensors, tokenizer.json or "
                                             "tokenizer.model)")
    p.add_argument("-o", "--out", type=Path, help="checkpoint folder to write (default: ./<source name>-plt)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="stored weight type (default: float32 for GGUF, the stored type for Hugging Face)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        from pltkit.model.llama_import import ImportModelError, import_model
    except ImportError as e:
        print(f"plt-import: needs PyTorch ({e.name} is not installed): pip install 'pltkit[torch]'", file=sys.stderr)
        return 2
    from pltkit.model.config import ConfigError
    from pltkit.model.paths import CheckpointError

    src = args.source
    name = src.stem if src.suffix == ".gguf" else src.resolve().name
    out = args.out or Path(f"{name}-plt")
    try:
        import_model(src, out, dtype=args.dtype, force=args.force)
    except ImportError as e:  # the gguf package is missing
        print(f"plt-import: {e}", file=sys.stderr)
        return 2
    except (ImportModelError, CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"plt-import: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plt-import: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
