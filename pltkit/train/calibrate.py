"""Calibration of the static quantization forms (int8 Q/DQ, fp8) on code: the activation ranges of
a checkpoint's linear layers (pltkit.quant.calibrate) over windows of a folder's .py files or of
the default model's held-out split."""

from __future__ import annotations

from pathlib import Path


def calibrate(checkpoint, folder: Path | None, windows: int = 16, say=lambda message: None) -> dict:
    """{weight name: per-channel activation amax} of every linear layer over `windows` windows of
    code: the files of `folder`, or the default model's held-out split. say(message) is told what
    it runs on."""
    from pltkit.model.checkpoint import load_model
    from pltkit.model.paths import resolve_model_path
    from pltkit.model.tokenizer import text_tokenizer
    from pltkit.quant.calibrate import activation_amax
    from pltkit.train import data

    if folder is None:
        _, files = data.stdlib_split()
    else:
        files = sorted(folder.rglob("*.py"))
        if not files:
            raise ValueError(f"--calib {folder}: no .py files")
    path = resolve_model_path(checkpoint)
    model = load_model(path)
    tok = text_tokenizer(path)
    inputs, _ = data.eval_sequences(files, tok, min(512, model.config.max_position_embeddings))
    say(f"calibrating on {min(windows, len(inputs))} windows of {len(files)} files")
    return activation_amax(model, inputs[:windows])
