#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the GPU checks and a short decode benchmark. Its three steps are
# capped at 7.5 minutes together (plus a pip install of pltkit's pure-Python needs where missing).
# Prints what it ran and what it could not run (and why). Run from anywhere:
#   bash scripts/gpu_check.sh
# Uses the machine's torch, triton and onnxruntime; installs only what pltkit needs besides them.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
ran=()
skipped=()
pytest=(python -m pytest -q -s -rs -p no:cacheprovider)

python - <<'PY' || { echo "gpu_check: PyTorch with CUDA is required"; exit 2; }
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False")
print("gpu_check:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "torch", torch.__version__)
PY
python -c "import pltkit" 2>/dev/null || pip install -q --no-deps -e . || exit 2
python -c "import safetensors, tokenizers, onnx, onnxruntime, tqdm, starlette, httpx, pytest, hypothesis" 2>/dev/null \
  || pip install -q safetensors tokenizers onnx onnxruntime tqdm starlette uvicorn prometheus-client httpx pytest \
     hypothesis gguf || exit 2

check() {  # check NAME TIMEOUT COMMAND...: run it, record it
  local name=$1 limit=$2; shift 2
  if timeout "$limit" "$@"; then ran+=("$name"); else status=1; ran+=("$name: FAILED"); fi
}

if python -c "import triton" 2>/dev/null; then
  # the kernel on CUDA in float32/16/bf16 against the reference, its AOT PTX compiled for this GPU
  # and driver and launched through the driver API with the TensorRT plugin's argument layout
  check "Triton LoopAttention kernel and its AOT PTX on CUDA (tests/test_loop_attention_kernel.py)" 150 \
    "${pytest[@]}" tests/test_loop_attention_kernel.py -m "gpu or not gpu"
else
  skipped+=("Triton kernel: triton is not installed")
fi

python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" 2>/dev/null \
  || skipped+=("ONNX Runtime CUDA: onnxruntime-gpu is not installed (or finds no CUDA)")
python -c "import tensorrt" 2>/dev/null \
  || skipped+=("TensorRT engines (build, plugin, backend): tensorrt is not installed (pip install 'pltkit[gpu]')")
check "GPU backends against ONNX Runtime on the CPU, where installed (tests/test_gpu.py -m gpu)" 210 \
  "${pytest[@]}" tests/test_gpu.py -m gpu

check "torch CUDA decode: plain / serial L=2 / PLT-2 (scripts/gpu_decode_bench.py)" 90 python scripts/gpu_decode_bench.py

echo
echo "gpu_check: ran:"
for r in "${ran[@]}"; do echo "  - $r"; done
echo "gpu_check: could not run:"
for s in "${skipped[@]}"; do echo "  - $s"; done
exit $status
