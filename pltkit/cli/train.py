"""plt-train: train a small PLT code model on the standard library (the default model's recipe)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from pltkit.train.train import TrainConfig, train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="plt-train", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="run folder: tokenizer/, model/, train_report.json")
    p.add_argument("--tokenizer", type=Path, help="reuse this tokenizer folder instead of training one")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"default {f.default}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    train(tc, args.out, args.tokenizer)


if __name__ == "__main__":
    main()
