"""Activation ranges for static quantization, from the torch reference run on code.

For every linear layer the calibration records, per input channel, amax = max |input|
over the calibration windows, every loop included (the layers are shared by the loops).
The output head's input is model.norm's output. Activation scales are per tensor (the
largest channel, after SmoothQuant's per-channel division where a scheme applies it).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from pltkit.model.plt import PLTForCausalLM


@torch.no_grad()
def activation_amax(model: PLTForCausalLM, windows: torch.Tensor, batch: int = 4) -> dict[str, np.ndarray]:
    """{weight name: per-channel amax [K] of the input of the layer that uses it} over LongTensor
    windows [N, T]."""
    amax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output=None):
            x = (output if output is not None else args[0]).abs().flatten(0, -2).amax(0)
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".plt_gate" not in name:
            handles.append(module.register_forward_pre_hook(record(name + ".weight")))
    head = "model.embed_tokens.weight" if model.lm_head is None else "lm_head.weight"
    if model.lm_head is None:  # tied head: its input is model.norm's output
        handles.append(model.model.norm.register_forward_hook(record(head)))
    try:
        with tqdm(total=len(windows), desc="calibrate", unit="window", disable=None) as bar:
            for i in range(0, len(windows), batch):
                model(windows[i:i + batch])
                bar.update(len(windows[i:i + batch]))
    finally:
        for h in handles:
            h.remove()
    return {name: a.numpy().astype(np.float32) for name, a in amax.items()}
