"""Train a small PLT code model on CPU: the recipe of the embedded default model.

`plt-train --out runs/plt2` with the defaults below reproduces the shipped model
(`--loops 1` its PLT-1 twin). Everything random is drawn from `--seed`: the
weights, the FIM examples and the batch order (see pltkit.train.data).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from pltkit.model.checkpoint import save_checkpoint
from pltkit.model.config import PLTConfig
from pltkit.model.plt import PLTForCausalLM
from pltkit.train import bpe, data, packing
from pltkit.train.evaluate import heldout_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    loops: int = 2
    hidden_size: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    intermediate_size: int = 768
    window: int = 64
    vocab_size: int = 4096
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 1400  # the shipped model
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    fim_rate: float = 0.5
    seed: int = 0
    threads: int = 2
    bf16: int = 1  # bf16 autocast for matmuls (fp32 weights and optimizer): 1.35x faster here

    def model_config(self) -> PLTConfig:
        return PLTConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.hidden_size // self.heads, max_position_embeddings=self.seq_len, rope_theta=10000.0,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=[data.EOT], plt_num_loops=self.loops,
            plt_window_size=[self.window, 0], plt_gate_use_hidden_states=True,
            plt_emb_scale=0.707, plt_hidden_scale=0.053,  # as reported for the released LoopCoder-v2
        )


def init_weights(model: PLTForCausalLM, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) matrices, residual outputs scaled down by depth, gates start at 0.5."""
    depth = model.config.num_hidden_layers * model.config.plt_num_loops
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 2 and ".plt_gate." not in name:
                scale = 1 / math.sqrt(2 * depth) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
                p.normal_(0, std * scale)
            else:  # biases and the loop gate
                p.zero_()


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(tc: TrainConfig, out: Path, tokenizer_dir: Path | None = None, root: str | None = None) -> dict:
    """Train on the standard library under `root` (default: this interpreter's) and write
    out/model (checkpoint, fp16), out/tokenizer and out/train_report.json."""
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    train_files, heldout_files = data.stdlib_split(root)
    log.info("%d training files, %d held out", len(train_files), len(heldout_files))
    tok_dir = tokenizer_dir or out / "tokenizer"
    if tokenizer_dir is None:
        bpe.train_tokenizer(train_files, tc.vocab_size, tok_dir, model_max_length=tc.seq_len)
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tc = TrainConfig(**{**asdict(tc), "vocab_size": tokenizer.get_vocab_size()})

    model = PLTForCausalLM(tc.model_config())
    init_weights(model)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and ".plt_gate." not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and ".plt_gate." not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %d loops", n_params / 1e6, tc.loops)

    history, start = [], time.time()
    batches = packing.batches(train_files, tokenizer, tc.seq_len, tc.batch_size, tc.seed, tc.fim_rate)
    bar = tqdm(range(tc.steps), desc=f"train PLT-{tc.loops}", unit="step", disable=None)
    model.train()
    for step in bar:
        inputs, targets = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(tc.bf16)):
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=data.IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.3f}")
    train_seconds = time.time() - start

    model.eval()
    with torch.no_grad():
        ev = heldout_loss(model, tokenizer, heldout_files, tc.seq_len)
    report = {"train_config": asdict(tc), "parameters": n_params, "train_seconds": round(train_seconds),
              "train_tokens": tc.steps * tc.batch_size * tc.seq_len, "train_files": len(train_files),
              "heldout_files": len(heldout_files), "heldout": ev, "loss_history": history}
    save_checkpoint(model, out / "model", dtype=torch.float16, tokenizer_from=tok_dir)
    gen = {"bos_token_id": None, "eos_token_id": [data.EOT], "max_length": tc.seq_len}
    (out / "model" / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("held-out loss %.4f, perplexity %.2f, %.0f s", ev["loss"], ev["perplexity"], train_seconds)
    return report
