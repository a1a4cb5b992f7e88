"""GPU paths: the Triton LoopAttention kernel, the TensorRT engine builder and backend, and the
ONNX Runtime CUDA provider. Nothing here is imported unless asked for: pltkit runs without
torch CUDA, triton or tensorrt."""
