"""plt-serve as editors use it, over a real socket, in one run:

  latency  a user typing through a file: each request is llama.vim's /infill for the next line
           (the previous request's prefix plus one line), a one-line completion; client-side
           round trip, median and p95, warm cache.
  cancel   a streaming client disconnects mid-generation: time until the decode worker is idle
           (the server's /metrics busy gauge).
  load     8 concurrent clients for --seconds: statuses, latencies, and the server's resident
           memory sampled through the run.

    python benchmarks/serve_bench.py [--model default] [--seconds 30]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import sysconfig
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def p95(xs):
    return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)]


def wait_healthy(c: httpx.Client, tries: int = 600) -> None:
    """Poll /health until the server has loaded its model (a benchmark's start, not a test)."""
    for _ in range(tries):
        try:
            if c.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def infill_at(lines: list[str], k: int, slot: int = 0) -> dict:
    """llama.vim's request with the cursor at the start of line k (its defaults, one line)."""
    return {"id_slot": slot, "input_prefix": "".join(lines[max(0, k - 256):k]), "prompt": "",
            "input_suffix": "".join(lines[k:k + 64]), "n_predict": 128, "n_indent": 0, "top_k": 40, "top_p": 0.90,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1000, "stop": ["\n"], "response_fields": ["content", "tokens_cached", "timings"]}


def typing_requests(lines: list[str], start: int, n: int):
    """`n` requests of a user typing lines start, start+1, ... three characters at a time: the
    current line (`prompt`) grows; at each new line the prefix grows by the finished line."""
    k = start
    while True:
        line = lines[k].rstrip("\n")
        for j in range(3, len(line) + 3, 3):
            body = infill_at(lines, k)
            body["prompt"], body["input_suffix"] = line[:j], "\n" + "".join(lines[k + 1:k + 64])
            yield body
            n -= 1
            if n == 0:
                return
        k += 1


def timed(c: httpx.Client, bodies) -> dict:
    times, cached, prompt_ms = [], [], []
    for body in bodies:
        t = time.perf_counter()
        r = c.post("/infill", json=body).json()
        times.append((time.perf_counter() - t) * 1e3)
        cached.append(r["tokens_cached"])
        prompt_ms.append(r["timings"]["prompt_ms"])
    return {"requests": len(times), "median_ms": round(statistics.median(times), 1), "p95_ms": round(p95(times), 1),
            "server_prompt_ms_median": round(statistics.median(prompt_ms), 1),
            "tokens_cached_median": statistics.median(cached)}


def latency(c: httpx.Client, lines: list[str], start: int, n: int) -> dict:
    """Warm cache: typing on a line, and moving to the next line."""
    c.post("/infill", json=infill_at(lines, start - 1))  # warm the slot
    same_line = timed(c, typing_requests(lines, start, n))
    next_line = timed(c, (infill_at(lines, k) for k in range(start + 40, start + 40 + n)))
    return {"typing": same_line, "next_line": next_line}


def metric(c: httpx.Client, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(c.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def cancel(base: str, c: httpx.Client, repeats: int = 7) -> dict:
    """A streaming client disconnects after its first event; at once a one-token request is sent:
    its latency, against the same request on an idle server, bounds the time the worker needed
    to drop the abandoned job (disconnect detection included). The server's own figure,
    pltkit_cancel_seconds, runs from the cancellation to the worker being free."""
    probe = {"prompt": "x", "n_predict": 1, "id_slot": 2}
    after, idle = [], []
    count, total = metric(c, "pltkit_cancel_seconds_count"), metric(c, "pltkit_cancel_seconds_sum")
    for _ in range(repeats):
        t = time.perf_counter()
        c.post("/completion", json=probe)
        idle.append((time.perf_counter() - t) * 1e3)
        with httpx.Client(base_url=base, timeout=60) as s:
            with s.stream("POST", "/completion", json={"prompt": "def f(x):\n", "n_predict": -1, "stream": True,
                                                       "id_slot": 1}) as r:
                next(r.iter_bytes())
                time.sleep(0.05)  # well into the generation
        t = time.perf_counter()
        c.post("/completion", json=probe)
        after.append((time.perf_counter() - t) * 1e3)
    n = metric(c, "pltkit_cancel_seconds_count") - count
    server_ms = (metric(c, "pltkit_cancel_seconds_sum") - total) / max(n, 1) * 1e3
    return {"repeats": repeats, "cancelled": n, "next_request_ms_after_disconnect": round(statistics.median(after), 1),
            "next_request_ms_idle": round(statistics.median(idle), 1),
            "server_cancel_to_idle_ms_mean": round(server_ms, 2)}


def load(base: str, lines: list[str], pid: int, seconds: float, clients: int = 8) -> dict:
    statuses, times, rss = [], [], [rss_mb(pid)]
    stop = time.time() + seconds

    def client(i):
        with httpx.Client(base_url=base, timeout=60) as c:
            k = 40 + 37 * i
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    statuses.append(c.post("/infill", json=infill_at(lines, k % len(lines), slot=i)).status_code)
                except httpx.TransportError:
                    statuses.append("transport error")
                times.append((time.perf_counter() - t) * 1e3)
                k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    state = []
    with httpx.Client(base_url=base, timeout=60) as c:
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            rss.append(rss_mb(pid))
            state.append(metric(c, "pltkit_state_bytes") / 2**20)
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)}
    return {"clients": clients, "seconds": seconds, "statuses": counts, "median_ms": round(statistics.median(times), 1),
            "p95_ms": round(p95(times), 1), "rss_mb_start": round(rss[0], 1), "rss_mb_end": round(rss[-1], 1),
            "rss_mb_max": round(max(rss), 1), "rss_mb_at_thirds": [round(rss[len(rss) * i // 3], 1) for i in (1, 2)],
            "state_mb_end": round(state[-1], 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--typing", type=int, default=100, help="requests in the latency run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-mb", type=int, default=256, help="plt-serve --cache-mb")
    args = ap.parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(["plt-serve", "--model", args.model, "--port", str(port), "--threads", str(args.threads),
                               "--cache-mb", str(args.cache_mb)])
    lines = open(sysconfig.get_paths()["stdlib"] + "/textwrap.py").read().splitlines(keepends=True)
    try:
        c = httpx.Client(base_url=base, timeout=60)
        wait_healthy(c)
        out = {"model": args.model, "threads": args.threads, "cache_mb": args.cache_mb, "latency": latency(c, lines, 120, args.typing),
               "cancel": cancel(base, c), "load": load(base, lines, server.pid, args.seconds)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    lat, can, ld = out["latency"], out["cancel"], out["load"]
    for kind, what in (("typing", "typing on a line"), ("next_line", "at the next line")):
        x = lat[kind]
        print(f"warm one-line infill, {what}: median {x['median_ms']} ms, p95 {x['p95_ms']} ms "
              f"({x['tokens_cached_median']} tokens cached, server prompt {x['server_prompt_ms_median']} ms)",
              file=sys.stderr)
    print(f"a disconnect mid-stream: the next request takes {can['next_request_ms_after_disconnect']} ms "
          f"(idle server: {can['next_request_ms_idle']} ms); server cancellation to idle "
          f"{can['server_cancel_to_idle_ms_mean']} ms ({can['cancelled']} of {can['repeats']} cancelled)",
          file=sys.stderr)
    print(f"{ld['clients']} clients x {ld['seconds']} s: {ld['statuses']}, median {ld['median_ms']} ms, p95 "
          f"{ld['p95_ms']} ms, RSS {ld['rss_mb_start']} -> {ld['rss_mb_at_thirds']} -> {ld['rss_mb_end']} MB "
          f"(max {ld['rss_mb_max']}; states {ld['state_mb_end']} MB)",
          file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
