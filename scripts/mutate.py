"""Mutation run over pltkit's numeric cores: break each core function in turn (one small edit per
mutant), run the tests that should notice, and report which mutants the suite kills.

Every mutant runs in a scratch copy of the repository (the working tree as it is now, uncommitted
work included, without .git and .venv); the repository itself is never touched. A mutant is
`killed` when its tests fail, `survived` when they pass, `error` when it cannot be applied or its
tests do not even pass unmutated (the baseline, run once per test selection).

    python scripts/mutate.py              # all mutants
    python scripts/mutate.py -k sampling  # the mutants whose name contains 'sampling'
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EV, SA, PLT = "pltkit/runtime/evaluate.py", "pltkit/runtime/sampling.py", "pltkit/model/plt.py"
EN, ORT, LA = "pltkit/runtime/engine.py", "pltkit/runtime/ort_backend.py", "pltkit/export/loop_attention.py"
ST = "pltkit/runtime/stopping.py"
NEW = "tests/test_numeric_cores.py"  # the tests written for mutants the rest of the suite let through
DECODE = "tests/test_decode.py", NEW, "-k", "matches_full_forward or restored or reset_carry or rewind"
ORT_TESTS = "tests/test_export_ort.py", "-k", "prefill_chunks_and_decode or interleaved"

# (name, file, original text (must occur exactly once), replacement, pytest arguments that should kill it)
MUTANTS = [
    ("compare.top1_constant", EV, "round(agree / count, 5)", "round(1.0, 5)", ("tests/test_evaluate.py", NEW)),
    ("compare.ppl_wrong_mean", EV, "math.exp(v / count)", "math.exp(v / len(inputs))",
     ("tests/test_evaluate.py", NEW)),
    ("compare.greedy_longer", EV, "min(len(a), len(b)))\n", "max(len(a), len(b)))\n", ("tests/test_evaluate.py", NEW)),
    ("sampling.top_k_smallest", SA, "np.argpartition(-c.logits, k - 1)[:k]", "np.argpartition(c.logits, k - 1)[:k]",
     ("tests/test_sampling.py", NEW)),
    ("sampling.top_p_one_short", SA, "int(np.searchsorted(cum, params.top_p)) + 1, len(cum)",
     "int(np.searchsorted(cum, params.top_p)), len(cum)", ("tests/test_sampling.py", NEW)),
    ("sampling.min_p_strict", SA, "c.logits >= c.logits.max() + np.log(params.min_p)",
     "c.logits > c.logits.max() + np.log(params.min_p)", ("tests/test_sampling.py", NEW)),
    ("sampling.temperature_times", SA, "c.logits / params.temperature if", "c.logits * params.temperature if",
     ("tests/test_sampling.py", NEW)),
    ("sampling.penalty_swapped", SA, "z <= 0, z * params.repeat_penalty, z / params.repeat_penalty",
     "z <= 0, z / params.repeat_penalty, z * params.repeat_penalty", ("tests/test_sampling.py", NEW)),
    ("sampling.frequency_count_dropped", SA, "(n * params.frequency_penalty +", "(params.frequency_penalty +",
     ("tests/test_sampling.py", NEW)),
    ("sampling.infill_eog_n_dropped", SA, "3 * p[eog].sum() * len(p) > p[~eog].sum()", "3 * p[eog].sum() > p[~eog].sum()",
     ("tests/test_sampling.py", NEW)),
    ("sampling.draw_not_mapped_to_ids", SA, "return int(ids[rng.choice(len(ids), p=p / p.sum())])",
     "return int(rng.choice(len(ids), p=p / p.sum()))", ("tests/test_sampling.py", NEW)),
    ("plt.ring_keeps_one_more", PLT, "start = max(0, k.shape[-2] - n)", "start = max(0, k.shape[-2] - n - 1)",
     DECODE),
    ("plt.ring_positions_off_by_one", PLT, "torch.arange(int(pos[-1]) + 1 - ring_k.shape[2], int(pos[-1]) + 1)",
     "torch.arange(int(pos[-1]) - ring_k.shape[2], int(pos[-1]))", DECODE),
    ("plt.window_strict", PLT, "(d >= 0) & (d <= left)", "(d >= 0) & (d < left)", DECODE),
    ("plt.clp_shift_carry_dropped", PLT, "prev = torch.cat([state.carry[loop - 1][:, None], prev[:, :-1]], 1)",
     "prev = torch.cat([0 * state.carry[loop - 1][:, None], prev[:, :-1]], 1)", DECODE),
    ("plt.decode_carry_wrong_loop", PLT, "self.loop_output(x[:, :-1])", "self.loop_output(x[:, 1:])", DECODE),
    ("plt.rewind_keeps_one_more", PLT, "c.k, c.v = c.k[:, :, :pos], c.v[:, :, :pos]",
     "c.k, c.v = c.k[:, :, :pos + 1], c.v[:, :, :pos + 1]", DECODE),
    ("engine.snapshot_one_position_off", EN, "slot.snapshots[pos] = slot.state.snapshot()",
     "slot.snapshots[pos - 1] = slot.state.snapshot()", ("tests/test_engine.py", "-k", "reuse_equals_cold", NEW)),
    ("gqa.past_len_one_early", ORT, 'np.array(state.pos, np.int64)', 'np.array(max(state.pos - 1, 0), np.int64)',
     ORT_TESTS),
    ("gqa.seqlens_off_by_one", LA, "g.op(\"Sub\", total32, g.const(1, np.int32))", "total32", ORT_TESTS),
    ("stop.n_predict_one_late", ST, "self.n >= self.req.n_predict", "self.n > self.req.n_predict",
     ("tests/test_completion.py", NEW)),
    ("stop.no_look_back", ST, "max(0, self._checked - self._longest - 4)", "max(0, self._checked)",
     ("tests/test_completion.py", NEW)),
    ("stop.held_back_one_short", ST, "held = i + 1", "held = i", ("tests/test_completion.py", NEW)),
    ("stop.trim_skips_one_char", ST, "range(min(len(text), len(suffix)), 0, -1)",
     "range(min(len(text), len(suffix)), 1, -1)", ("tests/test_completion.py", NEW)),
]


def copy_repo(dest: Path) -> None:
    """The working tree as it is now (tracked, untracked, uncommitted edits), minus caches."""
    skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info")
    shutil.copytree(REPO, dest, ignore=skip, dirs_exist_ok=True)


def pytest_args(args: tuple[str, ...], root: Path) -> list[str]:
    """The mutant's pytest arguments, without test files the working tree does not have."""
    return [a for a in args if not (a.startswith("tests/") and not (root / a).exists())]


def run_tests(root: Path, args: list[str], timeout: int) -> tuple[bool | None, float]:
    """(True: passed, False: failed, None: timed out or pytest could not run), seconds."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args],
                           cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0
    # 0: passed; 1: a test failed; 2: collection failed (a mutant that breaks the import is killed too);
    # anything else (no tests collected, pytest crashed) is an error
    return {0: True, 1: False, 2: False}.get(r.returncode), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", "--only", default="", help="run only the mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per pytest run (default 300)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    opts = ap.parse_args()
    mutants = [m for m in MUTANTS if opts.only in m[0]]
    if opts.list:
        for name, path, _, _, args in mutants:
            print(f"{name:34} {path:34} {' '.join(args)}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="pltkit-mutate-"))
    try:
        copy_repo(tmp)
        where = subprocess.run([sys.executable, "-c", "import pltkit; print(pltkit.__file__)"], cwd=tmp,
                               env=dict(os.environ, PYTHONPATH=str(tmp)), capture_output=True, text=True).stdout
        assert where.startswith(str(tmp)), f"the scratch copy's pltkit is not the one imported: {where!r}"
        baseline: dict[tuple, bool | None] = {}
        rows = []
        for name, rel, old, new, args in mutants:
            path = tmp / rel
            source = path.read_text()
            found = source.count(old)
            targs = pytest_args(args, tmp)
            if found != 1:
                rows.append((name, "error", f"original text found {found} times", 0.0))
                continue
            key = tuple(targs)
            if key not in baseline:
                baseline[key], secs = run_tests(tmp, targs, opts.timeout)
                print(f"baseline {' '.join(targs)}: {'passed' if baseline[key] else 'FAILED'} ({secs:.0f} s)",
                      flush=True)
            if not baseline[key]:
                rows.append((name, "error", "tests fail unmutated", 0.0))
                continue
            path.write_text(source.replace(old, new))
            try:
                passed, secs = run_tests(tmp, targs, opts.timeout)
            finally:
                path.write_text(source)
            status = {True: "survived", False: "killed", None: "error"}[passed]
            rows.append((name, status, " ".join(targs), secs))
            print(f"{name:34} {status:8} {secs:5.0f} s", flush=True)
    finally:
        if opts.keep:
            print(f"scratch copy kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"{'mutant':34} {'result':8} {'time':>6}  tests")
    for name, status, detail, secs in rows:
        print(f"{name:34} {status:8} {secs:5.0f}s  {detail}")
    killed = sum(r[1] == "killed" for r in rows)
    survived = sum(r[1] == "survived" for r in rows)
    errors = len(rows) - killed - survived
    print(f"{len(rows)} mutants, {killed} killed, {survived} survived" + (f", {errors} errors" if errors else ""))
    return 1 if survived or errors else 0


if __name__ == "__main__":
    sys.exit(main())
