"""plt-train: train a small PLT code model on the standard library (the default model's recipe)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path

from pltkit.cli import args as types
from pltkit.cli.args import HelpFormatter, one_line_errors
from pltkit.model.config import ConfigError
from pltkit.train.train import TrainConfig, train

# what each TrainConfig field accepts: a positive integer or number unless named here
CHECKS = {int: types.positive_int, float: types.positive_float, "window": types.nonneg_int,
          "warmup": types.nonneg_int, "seed": types.nonneg_int, "bf16": types.integer(0, 1),
          "min_lr_ratio": types.fraction, "weight_decay": types.nonneg_float, "fim_rate": types.fraction}
# the model config's fields a ConfigError may name, as the flags that set them
FLAGS = {"vocab_size": "--vocab-size", "hidden_size": "--hidden-size", "intermediate_size": "--intermediate-size",
         "num_hidden_layers": "--layers", "num_attention_heads": "--heads", "num_key_value_heads": "--kv-heads",
         "head_dim": "--hidden-size/--heads", "max_position_embeddings": "--seq-len", "plt_num_loops": "--loops",
         "plt_window_size": "--window"}


@one_line_errors("plt-train")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plt-train", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder: tokenizer/, model/, train_report.json")
    p.add_argument("--tokenizer", type=types.existing_dir, help="reuse this tokenizer folder instead of training one")
    for f in dataclasses.fields(TrainConfig):
        check = CHECKS.get(f.name, CHECKS[type(f.default)])
        p.add_argument("--" + f.name.replace("_", "-"), type=check, default=f.default,
                       help=f"default {f.default}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        tc.model_config()  # a bad combination fails now, not after the tokenizer is trained
    except ConfigError as e:
        p.error(re.sub(rf"'?\b({'|'.join(FLAGS)})\b'?", lambda m: FLAGS[m[1]], str(e)).replace("config field ", ""))
    train(tc, args.out, args.tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
