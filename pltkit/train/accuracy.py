"""An artifact's accuracy against a reference on held-out code: the held-out windows of the
default model's split (a fixed sample spread evenly over the set, or all), measured by
pltkit.runtime.evaluate.compare. What plt-eval prints and plt-export stores in a quantized
artifact's manifest."""

from __future__ import annotations

# what needs torch is imported inside the functions: the CLIs read SAMPLE_WINDOWS before they know
# that torch is installed
SAMPLE_WINDOWS = 8  # held-out windows measured by default: about 4k tokens of the ~94k


def heldout_windows(tokenizer_dir, seq_len: int, windows: int | None = SAMPLE_WINDOWS):
    """(inputs, targets, prompts, total): `windows` of the `total` held-out windows, spread evenly
    (all when None), and the 8 greedy prompts."""
    from pltkit.model.tokenizer import text_tokenizer
    from pltkit.train import data
    from pltkit.train.samples import held_out_prompts

    tok = text_tokenizer(tokenizer_dir)
    _, heldout = data.stdlib_split()
    inputs, targets = data.eval_sequences(heldout, tok, seq_len)
    prompts = [tok.encode(p["prefix"]).ids[-seq_len // 2:] for p in held_out_prompts(8)]
    sample = data.spread(len(inputs), windows)
    return inputs.numpy()[sample], targets.numpy()[sample], prompts, len(inputs)


def accuracy_report(model, reference="default", threads=None, windows=SAMPLE_WINDOWS, backend=None,
                    verify=True) -> dict:
    """compare()'s figures for `model` (an artifact, run by `backend`) against `reference` (the
    torch reference of a checkpoint, by default the default model) on `windows` held-out windows
    of the model's context (at most 512), with the windows' count and length."""
    from pltkit.model.paths import resolve_model_path
    from pltkit.runtime.backends import open_backend
    from pltkit.runtime.evaluate import compare

    # the torch reference on one thread unless told: on 2 cores two threads ran its windows 1.6x faster at
    # best, and 2-16x slower whenever other work shared the cores (its small steps wait on the busy core)
    ref = open_backend(reference, threads=threads or 1, verify=verify)
    backend = open_backend(model, backend, threads=threads, verify=verify)
    seq_len = min(backend.config.max_position_embeddings, 512)
    inputs, targets, prompts, total = heldout_windows(resolve_model_path(model), seq_len, windows)
    return {**compare(backend, ref, inputs, targets, prompts), "windows": len(inputs), "windows_total": total,
            "seq_len": seq_len}
