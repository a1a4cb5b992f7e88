"""Before/after: run one benchmark command on two revisions of pltkit, interleaved, and print the
ratio after/before of every number in its last JSON line (median over the rounds).

    python scripts/ab_bench.py REV [--rounds 3] -- COMMAND ...

"before" is REV, checked out into a temporary worktree; "after" is this working tree. Each round
runs COMMAND once in each, alternating which goes first, with the tree as the working directory
and first on PYTHONPATH (its subprocesses, such as plt-serve, run that tree's code too). `{tree}` in
COMMAND is replaced by the tree's path, e.g. for a per-tree `--workdir {tree}/.bench`. A ratio above
1 means the number grew: worse for latencies, better for throughputs. Memory does not compare between this
tree and the worktree: with benchmarks/serve_bench.py the worktree's server held 580 MB against 239 for the same
revision on both sides (two worktrees of different revisions: 1.00).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def flatten(obj, prefix: str = "") -> dict[str, float]:
    """'a.b.c' -> number for every numeric leaf of a JSON value (booleans left out)."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in flatten(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: float(obj)} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def run(tree: Path, command: list[str]) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [a.replace("{tree}", str(tree)) for a in command]
    out = subprocess.run(argv, cwd=tree, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    last = [line for line in out.splitlines() if line.startswith("{")][-1]
    return flatten(json.loads(last))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the 'before' revision")
    ap.add_argument("--rounds", type=int, default=3)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, command = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if not command:
        ap.error("give the benchmark command after --")
    after = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.rev], check=True)
        try:
            results = {"before": [], "after": []}
            for r in range(args.rounds):
                order = [("before", before), ("after", after)][:: 1 if r % 2 == 0 else -1]
                for name, tree in order:
                    print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                    results[name].append(run(tree, command))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], check=False)
    keys = [k for k in results["before"][0] if all(k in r for r in results["before"] + results["after"])]
    ratios = {}
    print(f"{'key':60} {'before':>12} {'after':>12} {'after/before':>13}")
    for k in keys:
        b = statistics.median(r[k] for r in results["before"])
        a = statistics.median(r[k] for r in results["after"])
        ratios[k] = round(a / b, 4) if b else None
        print(f"{k:60} {b:12.4g} {a:12.4g} {ratios[k] if ratios[k] is not None else '-':>13}")
    print(json.dumps({"before": args.rev, "rounds": args.rounds, "ratios": ratios}))


if __name__ == "__main__":
    main()
