"""What editor users get from a model, at every line of a source file: llama.vim's and
llama.vscode's exact FIM requests (their sampling: llama.cpp's defaults with samplers
["top_k", "top_p", "infill"]), parsed by plt-serve's llama.cpp protocol and run on its engine.
Prints, over cursors and seeds: how often the reply is empty (the infill sampler ends the
completion at once), how often llama.vscode's three alternatives are all alike, and how often
special-token text would reach the buffer (must be 0). Then one JSON line.

    python benchmarks/editor_replies.py [--model default] [--file F] [--seeds 4] [--n-predict 32]

The cursor sits after the indent and 4 more characters of each non-blank line; the context is
llama.vim's: 256 lines before, the rest of the line and 64 lines after.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from pltkit.serve.loading import open_model
from pltkit.serve.protocols import LlamaCpp

HERE = Path(__file__).resolve().parent


def vim_body(prefix: str, suffix: str, line: str, indent: int) -> dict:
    return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": [], "prompt": line,
            "n_predict": 128, "n_indent": indent, "top_k": 40, "top_p": 0.90,
            "samplers": ["top_k", "top_p", "infill"], "t_max_prompt_ms": 500, "t_max_predict_ms": 1000}


def vscode_body(prefix: str, suffix: str, line: str, indent: int) -> dict:
    return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": [], "prompt": line,
            "n_predict": 128, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "samplers": ["top_k", "top_p", "infill"],
            "t_max_prompt_ms": 500, "t_max_predict_ms": 2500}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--file", type=Path, default=HERE.parent / "tests" / "data" / "buffer.py.txt")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--n-predict", type=int, default=32, help="tokens per completion (the editors send 128)")
    args = ap.parse_args()

    engine = open_model(args.model).engine
    specials = [t for t in (engine.tok.id_to_token(i) for i in engine.tok.eog_ids) if t]
    lines = args.file.read_text().splitlines(keepends=True)
    proto = LlamaCpp(infill=True)
    vim_empty = vscode_alike = leaked = cursors = 0
    for y, text in enumerate(lines):
        if not text.strip():
            continue
        cursors += 1
        indent = len(text) - len(text.lstrip())
        x = indent + 4
        prefix = "".join(lines[max(0, y - 256):y])
        suffix = "".join([text.rstrip("\n")[x:] + "\n", *lines[y + 1:y + 65]])
        line = text[:x]
        for seed in range(args.seeds):
            vim = replace(proto.parse(vim_body(prefix, suffix, line, indent)).req, n_predict=args.n_predict,
                          seed=seed, t_max_predict_ms=0)
            code = replace(proto.parse(vscode_body(prefix, suffix, line, indent)).req, n_predict=args.n_predict,
                           seed=100 + 3 * seed, t_max_predict_ms=0)
            one = engine.complete(vim, slot_id=0)
            three = engine.complete_all(code, slot_id=1)
            vim_empty += one.text == ""
            vscode_alike += len({r.text for r in three}) == 1
            leaked += sum(s in r.text for r in (one, *three) for s in specials)
    n = cursors * args.seeds
    out = {"model": args.model, "file": args.file.name, "cursors": cursors, "seeds": args.seeds,
           "llama_vim_empty": vim_empty / n, "llama_vscode_all_alike": vscode_alike / n, "special_text": leaked}
    print(f"{cursors} cursors x {args.seeds} seeds: llama.vim's reply empty {vim_empty}/{n} "
          f"({out['llama_vim_empty']:.0%}); llama.vscode's 3 alternatives all alike {vscode_alike}/{n} "
          f"({out['llama_vscode_all_alike']:.0%}); special-token text in replies: {leaked}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
