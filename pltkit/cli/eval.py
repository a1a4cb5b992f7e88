"""plt-eval: held-out per-token loss and perplexity of a checkpoint on the standard library's
held-out files (the split the default model was trained with)."""

from __future__ import annotations

import argparse
import json
import logging
import sysconfig

import torch
from tokenizers import Tokenizer

from pltkit.model.checkpoint import load_model, resolve_model_path
from pltkit.train import data
from pltkit.train.evaluate import heldout_loss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="plt-eval", description=__doc__)
    p.add_argument("model", nargs="?", default="default", help="checkpoint folder or 'default'")
    p.add_argument("--seq-len", type=int, help="evaluation window (default: the model's context)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    model = load_model(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    root = sysconfig.get_paths()["stdlib"]
    _, heldout = data.split_files(data.stdlib_sources(root), root)
    seq_len = args.seq_len or model.config.max_position_embeddings
    result = heldout_loss(model, tokenizer, heldout, seq_len)
    print(json.dumps({"model": str(args.model), "loops": model.config.plt_num_loops, "seq_len": seq_len,
                      "heldout_files": len(heldout), **result}))


if __name__ == "__main__":
    main()
