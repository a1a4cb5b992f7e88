"""plt-eval: held-out quality on the standard library's held-out files (the split the
default model was trained with).

A checkpoint: per-token loss and perplexity with the torch reference. An artifact: its
perplexity, next-token top-1 agreement and mean greedy-match length against a reference
(`--reference`, default: the default model), as written into quantized artifacts at export.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys



def heldout_windows(tokenizer_dir, seq_len: int, limit: int | None = None):
    from tokenizers import Tokenizer

    from pltkit.train import data
    from pltkit.train.samples import held_out_prompts

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    _, heldout = data.stdlib_split()
    inputs, targets = data.eval_sequences(heldout, tok, seq_len)
    prompts = [tok.encode(p["prefix"]).ids[-seq_len // 2:] for p in held_out_prompts(8)]
    return inputs.numpy()[:limit], targets.numpy()[:limit], prompts


def accuracy_report(model, reference="default", threads=None, limit=None, backend=None) -> dict:
    from pltkit.model.paths import resolve_model_path
    from pltkit.runtime.backends import open_backend
    from pltkit.runtime.evaluate import compare

    ref = open_backend(reference, threads=threads)
    backend = open_backend(model, backend, threads=threads)
    seq_len = min(backend.config.max_position_embeddings, 512)
    inputs, targets, prompts = heldout_windows(resolve_model_path(model), seq_len, limit)
    return compare(backend, ref, inputs, targets, prompts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plt-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="default", help="checkpoint or artifact folder, or 'default'")
    p.add_argument("--reference", default="default", help="what an artifact is compared with")
    p.add_argument("--seq-len", type=int, help="evaluation window of a checkpoint (default: its context)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", help="what runs an artifact (default: ort; onnx-reference for bfloat16 on a CPU)")
    p.add_argument("--windows", type=int, help="evaluate the first N held-out windows only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from pltkit.model.paths import resolve_model_path
    from pltkit.runtime.artifact import is_artifact

    path = resolve_model_path(args.model)
    if is_artifact(path):
        try:
            report = accuracy_report(path, args.reference, args.threads, args.windows, args.backend)
        except ValueError as e:
            print(f"plt-eval: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"model": str(args.model), "reference": str(args.reference), **report}))
        return 0

    import torch
    from tokenizers import Tokenizer

    from pltkit.model.checkpoint import load_model
    from pltkit.train import data
    from pltkit.train.evaluate import heldout_loss

    torch.set_num_threads(args.threads)
    model = load_model(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    _, heldout = data.stdlib_split()
    seq_len = args.seq_len or model.config.max_position_embeddings
    result = heldout_loss(model, tokenizer, heldout, seq_len)
    print(json.dumps({"model": str(args.model), "loops": model.config.plt_num_loops, "seq_len": seq_len,
                      "heldout_files": len(heldout), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
