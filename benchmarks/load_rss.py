"""What loading a checkpoint costs in memory: peak RSS of a fresh process before and after
pltkit.load_model, against the checkpoint's size on disk. Random weights at d 1024 x 8 layers
(a 403 MB float32 checkpoint: big enough that a second copy of the weights would show).
Prints one line, then one JSON line.

    python benchmarks/load_rss.py [--hidden 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LOAD = """
import re, sys, torch, pltkit
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = hwm()
model = pltkit.load_model(sys.argv[1], dtype=torch.float32)
print(before, hwm())
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    import torch

    from pltkit.model.checkpoint import save_checkpoint
    from pltkit.model.plt import PLTForCausalLM
    from pltkit.train.train import TrainConfig, init_weights

    tc = TrainConfig(hidden_size=args.hidden, layers=args.layers, heads=args.hidden // 64, kv_heads=4,
                     intermediate_size=args.hidden * 3)
    torch.manual_seed(0)
    model = PLTForCausalLM(tc.model_config())
    init_weights(model)
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "ckpt"
        save_checkpoint(model, ckpt, dtype=torch.float32)
        del model
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", LOAD, str(ckpt)], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    mb = 1e6
    print(f"checkpoint {size / mb:.0f} MB: peak RSS {before / mb:.0f} MB before load_model, {after / mb:.0f} MB "
          f"after (+{(after - before) / mb:.0f} MB)", file=sys.stderr)
    print(json.dumps({"checkpoint_mb": round(size / mb, 1), "peak_rss_growth_mb": round((after - before) / mb, 1),
                      "growth_over_size": round((after - before) / size, 2)}))


if __name__ == "__main__":
    main()
