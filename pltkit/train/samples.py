"""Greedy samples from held-out files, plain and infill, for the model card.

The prompts are chosen by rule, not by hand: the first `n` held-out files (sorted by
path), each cut at the end of the line 40 % into the file, before its newline (the
tokenizer merges a newline with the next line's indentation, so a prompt that ends in
a bare newline is one the model has rarely seen). Plain: the text before the cut.
Infill (as an editor sends it with the cursor after the indentation of a line): the
prefix runs to the cursor, the middle is the rest of that line, the suffix is the next
ten lines. Every sample is printed as it came out.

    python -m pltkit.train.samples [MODEL] [--n 4] [--max-new 48]
"""

from __future__ import annotations

import argparse
import sysconfig

from pltkit.model.paths import resolve_model_path
from pltkit.model.tokenizer import PLTTokenizer
from pltkit.runtime.backends import open_backend
from pltkit.runtime.generate import generate
from pltkit.train import data

PREFIX_CHARS = 900  # keep prompts well inside the default model's 512-token context


def held_out_prompts(n: int, root: str | None = None) -> list[dict]:
    root = root or sysconfig.get_paths()["stdlib"]
    _, heldout = data.stdlib_split(root)
    prompts = []
    for path in sorted(heldout, key=lambda p: p.relative_to(root).as_posix())[:n]:
        lines = data.read_source(path).splitlines(keepends=True)
        cut = max(1, int(len(lines) * 0.4))
        line = "".join(lines[cut:cut + 1]).removesuffix("\n")
        indent = line[:len(line) - len(line.lstrip())]
        prompts.append({"file": path.relative_to(root).as_posix(), "line": cut + 1,
                        "prefix": "".join(lines[:cut])[-PREFIX_CHARS:].removesuffix("\n"),
                        "infill_prefix": "".join(lines[:cut])[-PREFIX_CHARS:] + indent,
                        "middle": line[len(indent):],
                        "suffix": "\n" + "".join(lines[cut + 1:cut + 11])})
    return prompts


def complete(backend, tok: PLTTokenizer, prompt: dict, max_new: int) -> dict:
    plain = tok.encode(prompt["prefix"])
    fim = tok.fim
    infill = [fim.prefix, *tok.encode(prompt["infill_prefix"]), fim.suffix, *tok.encode(prompt["suffix"]),
              fim.middle]
    return {name: tok.decode(list(generate(backend, ids, max_new, stop_ids=tok.eos_ids)))
            for name, ids in (("plain", plain), ("infill", infill))}


def card_markdown(model_name: str, n: int = 4, max_new: int = 48) -> str:
    path = resolve_model_path(model_name)
    backend, tok = open_backend(path, "torch", threads=2), PLTTokenizer.from_dir(path)
    out = []
    for p in held_out_prompts(n):
        got = complete(backend, tok, p, max_new)
        tail = "".join(p["prefix"].splitlines(keepends=True)[-6:])
        out += [f"#### `{p['file']}`, cut before line {p['line']}", "",
                "Last lines of the prompt:", "```python", tail.rstrip("\n"), "```",
                f"Plain completion ({max_new} tokens at most, greedy):", "```python", got["plain"], "```",
                "Infill at the indentation of the next line: the file's own text, then the model's:",
                "```python", p["middle"], "```", "```python", got["infill"], "```", ""]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=48)
    args = ap.parse_args(argv)
    print(card_markdown(args.model, args.n, args.max_new))


if __name__ == "__main__":
    main()
