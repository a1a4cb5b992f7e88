"""Held-out evaluation of a checkpoint with the reference model: per-token loss and
perplexity on the held-out standard-library files."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from pltkit.model.checkpoint import load_model
from pltkit.model.plt import PLTForCausalLM
from pltkit.model.tokenizer import text_tokenizer
from pltkit.train import data


@torch.no_grad()
def heldout_loss(model: PLTForCausalLM, tokenizer: Tokenizer, files, seq_len: int, batch_size: int = 8,
                 windows: int | None = None) -> dict:
    """Mean next-token cross-entropy over every token of `files` (windows of seq_len, each
    evaluated from an empty state), or of `windows` windows spread evenly over them."""
    inputs, targets = data.eval_sequences(files, tokenizer, seq_len)
    total_windows, sample = len(inputs), data.spread(len(inputs), windows)
    inputs, targets = inputs[sample], targets[sample]
    total, count = 0.0, 0
    for i in tqdm(range(0, len(inputs), batch_size), desc="held-out loss", unit="batch", disable=None):
        logits = model(inputs[i:i + batch_size])
        t = targets[i:i + batch_size]
        total += F.cross_entropy(logits.flatten(0, 1).float(), t.flatten(), ignore_index=data.IGNORE_INDEX,
                                 reduction="sum").item()
        count += int((t != data.IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("no held-out tokens to evaluate")
    loss = total / count
    return {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 3), "tokens": count,
            "windows": len(inputs), "windows_total": total_windows}


def checkpoint_report(path, seq_len: int | None = None, windows: int | None = None) -> dict:
    """plt-eval's figures for the checkpoint in `path`: heldout_loss on the held-out split in windows
    of seq_len (default: the model's context), with its loop count, the window length and the
    number of held-out files."""
    model = load_model(path)
    _, heldout = data.stdlib_split()
    seq_len = seq_len or model.config.max_position_embeddings
    result = heldout_loss(model, text_tokenizer(path), heldout, seq_len, windows=windows)
    return {"loops": model.config.plt_num_loops, "seq_len": seq_len, "heldout_files": len(heldout), **result}
