"""Export at LoopCoder-V2's real widths (2 layers, ~1.75B parameters with untied head): it must
fit this machine. Slow: about a minute and ~10 GB of disk. Run with `python -m pytest -m slow -s`."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

LOOPCODER_2_LAYERS = dict(
    architectures=["IQuestPLTCoderForCausalLM"], model_type="iquestpltcoder", vocab_size=75904,
    hidden_size=5120, intermediate_size=27648, num_hidden_layers=2, num_attention_heads=40,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
    eos_token_id=[2, 75864, 75869], bos_token_id=1, plt_num_loops=2, plt_window_size=[64, 0],
    plt_emb_scale=0.707, plt_hidden_scale=0.053, plt_gate_use_hidden_states=True, torch_dtype="bfloat16")

EXPORT = """
import re, sys, time
from pltkit.export.artifact import export
t = time.time()
export(sys.argv[1], sys.argv[2])
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(time.time() - t, hwm)
"""


@pytest.mark.slow
def test_export_loopcoder_widths(tmp_path):
    from pltkit.model.config import PLTConfig
    from pltkit.model.plt import PLTForCausalLM

    cfg = PLTConfig.from_dict(LOOPCODER_2_LAYERS)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PLTForCausalLM(cfg).state_dict().items()}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    gen = torch.Generator().manual_seed(0)
    index, n_params = {}, 0
    for i, names in enumerate([[k for k in shapes if ".layers.0." in k], [k for k in shapes if ".layers.0." not in k]]):
        part = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16) for k in names}
        n_params += sum(t.numel() for t in part.values())
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(part, ckpt / fname)
        index.update({k: fname for k in names})
        del part
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (ckpt / "config.json").write_text(json.dumps(LOOPCODER_2_LAYERS))

    out = subprocess.run([sys.executable, "-c", EXPORT, str(ckpt), str(tmp_path / "art")],
                         capture_output=True, text=True, check=True)
    seconds, peak = map(float, out.stdout.split())
    size = sum(f.stat().st_size for f in (tmp_path / "art").iterdir())
    print(f"{n_params / 1e9:.2f}B parameters: export {seconds:.0f} s, peak RSS {peak / 2**30:.1f} GiB, "
          f"artifact {size / 2**30:.1f} GiB")
    assert peak < 16 * 2**30
    manifest = json.loads((tmp_path / "art" / "pltkit.json").read_text())
    assert manifest["config"]["hidden_size"] == 5120
