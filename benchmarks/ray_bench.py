"""The team server on Ray Serve (plt-serve --ray) against plain plt-serve, in one run; the figures
of docs/scale.md. Every server decodes with 1 thread.

  overhead  a user typing (serve_bench.py's typing requests: llama.vim's warm one-line /infill),
            each request sent to plain plt-serve and to the Ray ingress in turn: median and p95 of
            each, and the difference.
  affinity  --editors editors typing in as many files, --requests requests each, interleaved: the
            share of each editor's requests after its first that reused a cached prefix
            (tokens_cached > 0), with prefix-affinity routing and with Ray's default router.
  capacity  per replica: cold latency (a file's first request), requests per second with all the
            editors typing at once for --seconds, a replica's resident memory, and the prompt-state
            bytes per cached client.

    python benchmarks/ray_bench.py [--model default] [--typing 100] [--editors 4] [--seconds 15]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import free_port, p95, rss_mb, typing_requests, wait_healthy  # noqa: E402

START = 120  # the line typed, as in serve_bench.py
FILES = ["textwrap", "string", "argparse", "shutil", "tempfile", "pathlib", "inspect", "typing", "enum", "json/decoder"]


def stdlib(name: str) -> str:
    return Path(sysconfig.get_paths()["stdlib"], f"{name}.py").read_text()


def summary(times: list[float]) -> dict:
    return {"requests": len(times), "median_ms": round(statistics.median(times), 1), "p95_ms": round(p95(times), 1)}


def overhead(plain: httpx.Client, team: httpx.Client, lines: list[str], n: int) -> dict:
    times = {"plain": [], "ray": []}
    clients = {"plain": plain, "ray": team}
    for c in clients.values():  # warm: the slot holds the file, as serve_bench's latency() starts
        c.post("/infill", json=next(typing_requests(lines, START - 1, 1)))
    for i, body in enumerate(typing_requests(lines, START, n)):
        for name in (("plain", "ray") if i % 2 == 0 else ("ray", "plain")):  # alternate who goes first
            t = time.perf_counter()
            r = clients[name].post("/infill", json=body)
            times[name].append((time.perf_counter() - t) * 1e3)
            assert r.status_code == 200, r.text
    out = {k: summary(v) for k, v in times.items()}
    out["ray_minus_plain_median_ms"] = round(out["ray"]["median_ms"] - out["plain"]["median_ms"], 1)
    out["ray_minus_plain_p95_ms"] = round(out["ray"]["p95_ms"] - out["plain"]["p95_ms"], 1)
    return out


def editor_bodies(source: str, header: str, n: int, start: int = 2500):
    for i in range(n):
        end = start + 7 * i
        yield {"input_prefix": header + source[:end], "input_suffix": source[end:end + 400], "n_predict": 4,
               "temperature": 0, "cache_prompt": True, "response_fields": ["tokens_cached", "timings/prompt_n", "timings/prompt_ms"]}


def affinity(team: httpx.Client, editors: int, requests: int, header: str) -> dict:
    """Editors interleaved; each a client of its own (its User-Agent), with no id_slot."""
    runs = {f"editor-{i}": editor_bodies(stdlib(FILES[i]), header, requests) for i in range(editors)}
    hits, cold, replicas, evaluated, prompt_ms = {e: [] for e in runs}, [], {}, [], []
    for k in range(requests):
        for name, run in runs.items():
            t = time.perf_counter()
            r = team.post("/infill", json=next(run), headers={"User-Agent": name})
            if k == 0:
                cold.append((time.perf_counter() - t) * 1e3)
            out = r.json()
            hits[name].append(out["tokens_cached"] > 0)
            if k > 0:
                evaluated.append(out["timings/prompt_n"])
                prompt_ms.append(out["timings/prompt_ms"])
            replicas.setdefault(name, set()).add(r.headers["x-pltkit-replica"])
    after_first = [h for v in hits.values() for h in v[1:]]
    return {"hit_rate": round(sum(after_first) / len(after_first), 3),
            "per_editor": {e: round(sum(v[1:]) / len(v[1:]), 3) for e, v in hits.items()},
            "replicas_per_editor": {e: len(v) for e, v in replicas.items()},
            "cold_median_ms": round(statistics.median(cold), 1),
            "evaluated_median": statistics.median(evaluated), "prompt_ms_median": round(statistics.median(prompt_ms), 1)}


def load(team: httpx.Client, editors: int, seconds: float, header: str) -> dict:
    """All the editors typing at once, each waiting for its answer before the next keystroke."""
    done, times, stop = [], [], time.monotonic() + seconds

    def editor(i):
        with httpx.Client(base_url=team.base_url, headers={"User-Agent": f"load-{i}"}, timeout=600) as c:
            for body in editor_bodies(stdlib(FILES[i]), header, 10_000):
                if time.monotonic() > stop:
                    return
                t = time.perf_counter()
                r = c.post("/infill", json=body)
                times.append((time.perf_counter() - t) * 1e3)
                done.append((r.status_code, r.headers.get("x-pltkit-replica")))

    threads = [threading.Thread(target=editor, args=(i,)) for i in range(editors)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    ok = sum(1 for s, _ in done if s == 200)
    return {"editors": editors, "seconds": round(elapsed, 1), "answered": ok, "errors": len(done) - ok,
            "requests_per_s": round(ok / elapsed, 2), **summary(times),
            "requests_per_replica": {rep: sum(1 for _, r in done if r == rep) for rep in {r for _, r in done}}}


def state_bytes(c: httpx.Client, headers=None) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    text = c.get("/metrics", headers=headers).text
    return int(next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "pltkit_state_bytes"))


def per_client(plain: httpx.Client, header: str) -> dict:
    """The prompt-state memory one more cached client adds (plain plt-serve: one engine)."""
    before = state_bytes(plain)
    body = next(editor_bodies(stdlib(FILES[-1]), header, 1))
    r = plain.post("/infill", json={**body, "response_fields": ["timings/prompt_n"]}, headers={"User-Agent": "one-more"})
    return {"prompt_tokens": r.json()["timings/prompt_n"], "state_bytes": state_bytes(plain) - before}


def replicas(team: httpx.Client) -> dict:
    """Each engine replica's resident memory and prompt-state bytes."""
    import ray

    out = {}
    for actor in ray._private.state.actors().values():
        if "#Engine#" in actor["Name"] and actor["State"] == "ALIVE":
            replica = actor["Name"].rsplit("#", 1)[1]
            out[replica] = {"rss_mb": round(rss_mb(actor["Pid"]), 1),
                            "state_bytes": state_bytes(team, {"x-pltkit-replica": replica})}
    return out


def deploy(router: str, args):
    from ray import serve

    from pltkit.serve.ray.app import TeamOptions, build

    serve.run(build(TeamOptions(model=args.model, replicas=args.replicas, threads=1, router=router,
                                cache_mb=args.cache_mb)), name="pltkit", route_prefix="/")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--typing", type=int, default=100, help="keystrokes timed in the overhead run")
    ap.add_argument("--editors", type=int, default=4)
    ap.add_argument("--requests", type=int, default=20, help="requests per editor in the affinity runs")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--cache-mb", type=int, default=256)
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    lines = stdlib("textwrap").splitlines(keepends=True)
    port, team_port = free_port(), free_port()
    plain_server = subprocess.Popen([str(Path(sys.executable).parent / "plt-serve"), "--model", args.model,
                                     "--threads", "1", "--cache-mb", str(args.cache_mb), "--port", str(port)])
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="error")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": team_port})
        deploy("affinity", args)
        plain = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        team = httpx.Client(base_url=f"http://127.0.0.1:{team_port}", timeout=600)
        wait_healthy(plain)
        out = {"overhead": overhead(plain, team, lines, args.typing),
               "per_client": per_client(plain, "# per client\n")}
        out["affinity"] = affinity(team, args.editors, args.requests, "# affinity\n")
        out["load"] = load(team, args.editors, args.seconds, "# load\n")
        out["replicas"] = replicas(team)
        out["plain_rss_mb"] = round(rss_mb(plain_server.pid), 1)
        deploy("pow2", args)
        out["pow2"] = affinity(team, args.editors, args.requests, "# pow2\n")
    finally:
        serve.shutdown()
        ray.shutdown()
        plain_server.terminate()
        plain_server.wait(timeout=30)
    report(out)


def report(out: dict) -> None:
    o = out["overhead"]
    print(f"warm one-line infill, {o['plain']['requests']} requests each, interleaved:")
    for name in ("plain", "ray"):
        print(f"  {name:6s} median {o[name]['median_ms']:7.1f} ms   p95 {o[name]['p95_ms']:7.1f} ms")
    print(f"  ray - plain: median {o['ray_minus_plain_median_ms']:+.1f} ms, p95 {o['ray_minus_plain_p95_ms']:+.1f} ms")
    for key in ("affinity", "pow2"):
        a = out[key]
        print(f"{key:8s}: tokens_cached > 0 on {a['hit_rate']:.0%} of the requests after each editor's first "
              f"(per editor {a['per_editor']}); replicas per editor {a['replicas_per_editor']}; after the first, "
              f"median {a['evaluated_median']} prompt tokens evaluated in {a['prompt_ms_median']} ms; "
              f"cold median {a['cold_median_ms']} ms")
    lo = out["load"]
    print(f"load: {lo['editors']} editors for {lo['seconds']} s: {lo['requests_per_s']} requests/s "
          f"(median {lo['median_ms']} ms, p95 {lo['p95_ms']} ms, {lo['errors']} errors), per replica "
          f"{lo['requests_per_replica']}")
    print(f"replicas: {out['replicas']}; plain plt-serve RSS {out['plain_rss_mb']} MB; one more cached client: "
          f"{out['per_client']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
