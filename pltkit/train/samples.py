"""Greedy samples from held-out files, plain and infill, for the model card.

The prompts are chosen by rule, not by hand: the first `n` held-out files (sorted by
path), each cut at the end of the line 40 % into the file. Plain: the text before the
cut. Infill: the same prefix, the line after the cut is the middle to fill, and the
ten lines after it are the suffix. Every sample is printed as it came out.

    python -m pltkit.train.samples [MODEL] [--n 4] [--max-new 48]
"""

from __future__ import annotations

import argparse
import sysconfig

import torch

from pltkit.model.checkpoint import load_model, resolve_model_path
from pltkit.model.tokenizer import PLTTokenizer
from pltkit.train import data
from pltkit.train.evaluate import greedy

PREFIX_CHARS = 900  # keep prompts well inside the default model's 512-token context


def held_out_prompts(n: int, root: str | None = None) -> list[dict]:
    root = root or sysconfig.get_paths()["stdlib"]
    _, heldout = data.split_files(data.stdlib_sources(root), root)
    prompts = []
    for path in sorted(heldout, key=lambda p: p.relative_to(root).as_posix())[:n]:
        lines = data.read_source(path).splitlines(keepends=True)
        cut = max(1, int(len(lines) * 0.4))
        prompts.append({"file": path.relative_to(root).as_posix(), "line": cut + 1,
                        "prefix": "".join(lines[:cut])[-PREFIX_CHARS:],
                        "middle": lines[cut] if cut < len(lines) else "",
                        "suffix": "".join(lines[cut + 1:cut + 11])})
    return prompts


def complete(model, tok: PLTTokenizer, prompt: dict, max_new: int) -> dict:
    plain = tok.encode(prompt["prefix"])
    fim = tok.fim
    infill = [fim.prefix, *tok.encode(prompt["prefix"]), fim.suffix, *tok.encode(prompt["suffix"]), fim.middle]
    return {"plain": tok.decode(greedy(model, plain, max_new, tok.eos_ids)),
            "infill": tok.decode(greedy(model, infill, max_new, tok.eos_ids))}


def card_markdown(model_name: str, n: int = 4, max_new: int = 48) -> str:
    path = resolve_model_path(model_name)
    model, tok = load_model(path), PLTTokenizer.from_dir(path)
    out = []
    for p in held_out_prompts(n):
        with torch.no_grad():
            got = complete(model, tok, p, max_new)
        tail = "".join(p["prefix"].splitlines(keepends=True)[-6:])
        out += [f"#### `{p['file']}`, cut before line {p['line']}", "",
                "Last lines of the prompt:", "```python", tail.rstrip("\n"), "```",
                f"Plain completion ({max_new} tokens at most, greedy):", "```python", got["plain"], "```",
                "Infill: the file's own middle line, then the model's:", "```python",
                p["middle"].rstrip("\n"), "```", "```python", got["infill"], "```", ""]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=48)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    print(card_markdown(args.model, args.n, args.max_new))


if __name__ == "__main__":
    main()
