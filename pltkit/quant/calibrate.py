"""Activation ranges for static quantization, from the torch reference run on code.

For every linear layer the calibration records amax = max |input| over the calibration
windows, every loop included (the layers are shared by the loops). The output head's
input is model.norm's output. Scales derived from amax are per tensor.
"""

from __future__ import annotations

import torch

from pltkit.model.plt import PLTForCausalLM


@torch.no_grad()
def activation_amax(model: PLTForCausalLM, windows: torch.Tensor, batch: int = 4) -> dict[str, float]:
    """{weight name: amax of the input of the layer that uses it} over LongTensor windows [N, T]."""
    amax: dict[str, float] = {}

    def record(name):
        def hook(module, args, output=None):
            x = output if output is not None else args[0]
            amax[name] = max(amax.get(name, 0.0), float(x.abs().max()))
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".plt_gate" not in name:
            handles.append(module.register_forward_pre_hook(record(name + ".weight")))
    head = "model.embed_tokens.weight" if model.lm_head is None else "lm_head.weight"
    if model.lm_head is None:  # tied head: its input is model.norm's output
        handles.append(model.model.norm.register_forward_hook(record(head)))
    try:
        for i in range(0, len(windows), batch):
            model(windows[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return amax
