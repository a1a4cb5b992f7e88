"""plt-complete: complete code from the command line (prompt from the argument or stdin);
with --suffix it fills in the middle; with --chat the prompt is a user message to an instruct
model, rendered with the model's chat template, and the reply is printed."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pltkit.cli import args as types
from pltkit.cli.args import HelpFormatter, message, one_line_errors
from pltkit.runtime.backends import BACKENDS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plt-complete", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("prompt", nargs="?", help="text before the cursor (default: read stdin)")
    p.add_argument("--model", default="default", help="checkpoint or artifact folder, or 'default'")
    p.add_argument("--backend", choices=list(BACKENDS),
                   help="default: ort (a checkpoint is exported once to the user cache; torch runs it directly); "
                        "ort-cuda and trt need an NVIDIA GPU; onnx-reference is slow, for bfloat16 artifacts on a CPU")
    p.add_argument("--chat", action="store_true", help="the prompt is a user message (needs a chat template)")
    p.add_argument("--system", help="with --chat: a system message first")
    p.add_argument("--suffix", help="text after the cursor: infill with the model's FIM tokens (a model without "
                                            "them continues the prefix, cut where it reaches the suffix)")
    p.add_argument("--suffix-file", type=types.existing_file, help="read the text after the cursor from a file")
    p.add_argument("--stop", action="append", default=[], type=types.nonempty, help="stop string (repeatable)")
    p.add_argument("--n-indent", type=types.nonneg_int, default=0, help="stop at a new line indented less than this")
    p.add_argument("--single-line", action="store_true", help="stop at the end of the line")
    p.add_argument("--max-tokens", type=types.max_tokens, default=64, help="tokens to generate at most (-1: no limit)")
    p.add_argument("--temperature", type=types.nonneg_float,
                   help="0 = greedy (default: 0; with --chat, the model's generation_config.json, else 0)")
    p.add_argument("--top-k", type=types.nonneg_int, help="sample from the k likeliest tokens, 0: all (default: 0; "
                                                          "with --chat, the model's generation_config.json, else 0)")
    p.add_argument("--top-p", type=types.probability,
                   help="sample from the likeliest tokens whose probabilities add up to p, 1: all (default: 1; "
                        "with --chat, the model's generation_config.json, else 1)")
    p.add_argument("--seed", type=types.nonneg_int, help="sampling seed (default: a random one)")
    p.add_argument("--threads", type=types.positive_int, help="default: the physical cores")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the artifact's files against the sha256s in its manifest (each file is "
                        "hashed once; later runs only stat it)")
    return p


@one_line_errors("plt-complete")
def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.chat and (args.suffix is not None or args.suffix_file):
        p.error("--chat and --suffix exclude each other")
    if args.system is not None and not args.chat:
        p.error("--system needs --chat")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from pltkit.model.config import ConfigError
    from pltkit.model.paths import CheckpointError
    from pltkit.model.tokenizer import PLTTokenizer
    from pltkit.runtime.artifact import ArtifactError
    from pltkit.runtime.backends import open_fastest
    from pltkit.runtime.completion import CompletionRequest
    from pltkit.runtime.engine import Engine

    prefix = args.prompt if args.prompt is not None else sys.stdin.read()
    try:
        suffix = args.suffix_file.read_text() if args.suffix_file else args.suffix
        sampling = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
        given = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p))
                 if v is not None}
        req = CompletionRequest(prefix=prefix, suffix=suffix, stop=tuple(args.stop), n_indent=args.n_indent,
                                single_line=args.single_line, n_predict=args.max_tokens, seed=args.seed,
                                **sampling, **given)
        backend, path = open_fastest(args.model, args.backend, args.threads, verify=not args.no_verify)
        engine = Engine(backend, PLTTokenizer.from_dir(path))
        stream = None if args.json else (lambda piece, _: (sys.stdout.write(piece), sys.stdout.flush()))
        if args.chat:
            ids, req = chat_request(path, engine, req, prefix, args.system, given)
            result = engine.run(engine.prompt(req, ids).ids, req, on_text=stream)
        else:
            result = engine.complete(req, on_text=stream)
    except (OSError, ValueError, ArtifactError, CheckpointError, ConfigError) as e:
        print(f"plt-complete: {message(e)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "stop_type": result.stop_type,
                          "stopping_word": result.stopping_word, "tokens_cached": result.tokens_cached,
                          "tokens_evaluated": result.tokens_evaluated, "truncated": result.truncated,
                          "backend": backend.name, "timings": result.timings}))
    else:
        print()
    return 0


def chat_request(path, engine, req, message: str, system: str | None, given: dict):
    """The prompt ids of a one-message chat, and the request with the template's sampling
    defaults (under the options given) and end-of-turn tokens."""
    from dataclasses import replace

    from pltkit.runtime.chat import ChatTemplate, NoChatTemplate, end_of_turn_ids, prompt_ids

    template = ChatTemplate.from_dir(path)
    if template is None:
        raise NoChatTemplate(f"{path}: the model has no chat template (no chat_template.jinja, nor chat_template in "
                             "tokenizer_config.json): --chat is not available")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": message}]
    ids = prompt_ids(engine.tok, template.render(messages))
    return ids, replace(req, **{**template.sampling, **given}, end_ids=end_of_turn_ids(engine.tok))


if __name__ == "__main__":
    sys.exit(main())
