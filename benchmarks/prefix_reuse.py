"""Time to first token of a completion whose prefix is cached (one line appended, as when a
user types on) against the same request cold. One run, medians of interleaved repeats.

    python benchmarks/prefix_reuse.py ARTIFACT_OR_CHECKPOINT [--prefix-tokens 440]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig

from pltkit.model.paths import resolve_model_path
from pltkit.model.tokenizer import PLTTokenizer
from pltkit.runtime.backends import open_backend
from pltkit.runtime.completion import CompletionRequest
from pltkit.runtime.engine import Engine


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--prefix-tokens", type=int, default=440)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    tok = PLTTokenizer.from_dir(resolve_model_path(args.model))
    backend = open_backend(args.model, threads=args.threads)
    source = open(sysconfig.get_paths()["stdlib"] + "/textwrap.py").read()
    ids = tok.encode(source)[:args.prefix_tokens]
    prefix = tok.decode(ids)
    line = "\n    result = dedent(text)"
    cold, warm, cached = [], [], []
    for _ in range(args.repeats):
        e = Engine(backend, tok)
        r0 = e.complete(CompletionRequest(prefix=prefix, n_predict=1))
        r1 = e.complete(CompletionRequest(prefix=prefix + line, n_predict=1))
        cold.append(r0.timings["prompt_ms"])
        warm.append(r1.timings["prompt_ms"])
        cached.append(r1.tokens_cached)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"prefix {len(tok.encode(prefix))} tokens: cold {c:.1f} ms, cached + one line {w:.1f} ms "
          f"({cached[-1]} tokens reused)")
    print(json.dumps({"cold_ttft_ms": round(c, 2), "warm_ttft_ms": round(w, 2), "warm_over_cold": round(w / c, 3),
                      "tokens_cached": cached[-1], "backend": backend.name}))


if __name__ == "__main__":
    main()
