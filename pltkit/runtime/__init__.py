"""Run PLT models: one small backend interface (torch reference, ONNX Runtime), pure
sampling, and generation as a Python generator over token ids."""
