"""plt-complete: complete code from the command line (prompt from the argument or stdin)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plt-complete", description=__doc__)
    p.add_argument("prompt", nargs="?", help="text to complete (default: read stdin)")
    p.add_argument("--model", default="default", help="checkpoint or artifact folder, or 'default'")
    p.add_argument("--backend", choices=["torch", "ort"], help="default: ort for an artifact, torch for a checkpoint")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="default: the physical cores")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from pltkit.model.config import ConfigError
    from pltkit.model.paths import CheckpointError, resolve_model_path
    from pltkit.model.tokenizer import PLTTokenizer
    from pltkit.runtime.artifact import ArtifactError
    from pltkit.runtime.backends import open_backend
    from pltkit.runtime.generate import generate
    from pltkit.runtime.sampling import SamplingParams

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p)
        backend = open_backend(args.model, args.backend, args.threads)
        tok = PLTTokenizer.from_dir(resolve_model_path(args.model))
    except (ValueError, ArtifactError, CheckpointError, ConfigError) as e:
        print(f"plt-complete: {e}", file=sys.stderr)
        return 2
    ids = tok.encode(prompt)
    if not ids:
        print("plt-complete: the prompt is empty", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    tokens, shown, t_first = [], "", None
    for token in generate(backend, ids, args.max_tokens, params, args.seed, tok.eos_ids):
        t_first = t_first or time.perf_counter()
        tokens.append(token)
        if not args.json:
            text = tok.decode(tokens)
            if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    t1 = time.perf_counter()
    text = tok.decode(tokens)
    t_first = t_first or t1
    prompt_ms, decode_ms = (t_first - t0) * 1e3, (t1 - t_first) * 1e3
    if args.json:
        print(json.dumps({"text": text, "tokens": tokens, "backend": backend.name, "timings": {
            "prompt_n": len(ids), "prompt_ms": round(prompt_ms, 2), "predicted_n": len(tokens),
            "predicted_ms": round(decode_ms, 2),
            "predicted_per_second": round((len(tokens) - 1) / decode_ms * 1e3, 2) if len(tokens) > 1 else None}}))
    else:
        sys.stdout.write(text[len(shown):] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
