#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the GPU tests and a short decode benchmark, under 8 minutes.
# Prints what it ran and what it could not run (and why). Run from anywhere:
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
ran=()
skipped=()

python - <<'PY' || { echo "gpu_check: PyTorch with CUDA is required"; exit 2; }
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False")
print("gpu_check:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "torch", torch.__version__)
PY
# pltkit itself, without replacing the machine's torch / triton / onnxruntime
python -c "import pltkit" 2>/dev/null || pip install -q --no-deps -e . || exit 2
python -c "import safetensors, tokenizers, onnx, onnxruntime, tqdm, starlette, httpx, pytest" 2>/dev/null \
  || pip install -q safetensors tokenizers onnx onnxruntime tqdm starlette uvicorn prometheus-client httpx pytest \
     hypothesis gguf || exit 2

if python -c "import triton" 2>/dev/null; then
  timeout 240 python -m pytest tests/test_loop_attention_kernel.py -q -s -p no:cacheprovider || status=1
  ran+=("Triton LoopAttention kernel on CUDA against the reference (tests/test_loop_attention_kernel.py)")
else
  skipped+=("Triton kernel: triton is not installed")
fi

timeout 240 python -m pytest tests/test_gpu.py -m gpu -q -s -rs -p no:cacheprovider || status=1
python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" 2>/dev/null \
  && ran+=("ONNX Runtime CUDA provider against the CPU") \
  || skipped+=("ONNX Runtime CUDA: onnxruntime-gpu is not installed (or finds no CUDA)")
python -c "import tensorrt" 2>/dev/null \
  && ran+=("TensorRT engine build and decode against ONNX Runtime CPU") \
  || skipped+=("TensorRT: not installed (pip install 'pltkit[gpu]')")

timeout 180 python scripts/gpu_decode_bench.py && ran+=("torch CUDA decode: plain / serial L=2 / PLT-2") \
  || { status=1; skipped+=("decode benchmark failed"); }

echo
echo "gpu_check: ran:"
for r in "${ran[@]}"; do echo "  - $r"; done
echo "gpu_check: could not run:"
for s in "${skipped[@]}"; do echo "  - $s"; done
exit $status
