"""plt-serve under abuse, over a real TCP socket, as a user would run it:

  abuse   a well-behaved editor client (C: /health and llama.vim's one-line /infill, back to
          back) for --seconds alone ("quiet"), then again while others abuse the server:
          A sends maximal bodies (an /infill prefix, and /tokenize content, of --max-body minus
          1 KiB), B sends /completion with 2000 stop strings of 2000 characters (more than the
          engine takes) and with 64 of 256 (its limit), and --slowloris connections send a
          request head one byte a second and never finish it (each reconnects when the server
          cuts it, so that --slowloris are open all along).
  memory  a fresh server with --cache-mb: its RSS loaded, after one request, and after
          --clients distinct clients (User-Agent) each sent a distinct prompt of a few hundred
          tokens; its peak (VmHWM) and /metrics pltkit_state_bytes.

    python benchmarks/serve_abuse.py [--seconds 60] [--clients 100] [--cache-mb 16]

Every request has a --timeout (a timeout counts as a failure, its latency the timeout).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

SOURCE = open(sysconfig.get_paths()["stdlib"] + "/argparse.py").read()


def free_port() -> int:
    with socket.socket() as s:  # plt-serve refuses --port 0
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, *extra: str):
    """plt-serve on a free port; returns (process, base URL) once it printed its "ready:" line."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pltkit.cli.serve", "--model", args.model, "--port", str(port),
                             "--threads", str(args.threads), *extra], stderr=subprocess.PIPE, text=True)
    ready, lines = threading.Event(), []

    def read():  # drains stderr for the server's whole life, so it never blocks on a full pipe
        for line in proc.stderr:
            lines.append(line.rstrip())
            if "ready:" in line:
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or proc.poll() is not None:
        stop_server(proc)
        raise SystemExit("plt-serve did not get ready:\n" + "\n".join(lines[-10:]))
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mem_mb(pid: int) -> dict:
    """VmRSS (now) and VmHWM (peak) in MB."""
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def state_mb(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("pltkit_state_bytes "):
            return round(float(line.split()[1]) / 2**20, 1)
    return float("nan")


ERRORS: dict = {}  # "path status": the first such error's message


def timed(c: httpx.Client, method: str, path: str, timeout: float, **kw):
    """(status or "timeout"/"error", latency in ms); a timeout's latency is the timeout."""
    t = time.perf_counter()
    try:
        r = c.request(method, path, timeout=timeout, **kw)
        status = r.status_code
        if status >= 400:
            ERRORS.setdefault(f"{path} {status}", r.text[:300])
    except httpx.TimeoutException:
        return "timeout", timeout * 1e3
    except httpx.TransportError as e:
        status = f"error {type(e).__name__}"
    return status, (time.perf_counter() - t) * 1e3


def summary(results: list) -> dict:
    ms = [m for _, m in results] or [float("nan")]
    statuses = [str(s) for s, _ in results]
    return {"count": len(results), "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(sorted(ms)[max(0, round(0.95 * len(ms)) - 1)], 1), "max_ms": round(max(ms), 1),
            "statuses": {s: statuses.count(s) for s in sorted(set(statuses))}}


# llama.vim's FIM request (tests/test_editors.py, vim_fim) on one short line, n_predict 16
VIM_INFILL = {"id_slot": 0, "input_prefix": "def add(a, b):\n", "input_suffix": "\n", "input_extra": [],
              "prompt": "    ", "n_predict": 16, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.90,
              "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
              "t_max_prompt_ms": 500, "t_max_predict_ms": 1000, "response_fields": ["content", "tokens_cached"]}


def client_c(base: str, seconds: float, timeout: float) -> dict:
    health, infill = [], []
    stop = time.time() + seconds
    with httpx.Client(base_url=base) as c:
        while time.time() < stop:
            health.append(timed(c, "GET", "/health", timeout))
            infill.append(timed(c, "POST", "/infill", timeout, json=VIM_INFILL))
    return {"health": summary(health), "infill": summary(infill)}


def fill(body: dict, key: str, size: int) -> bytes:
    """body as JSON with body[key] code text, the whole exactly `size` bytes or a few less."""
    text = SOURCE * (size // len(SOURCE) + 1)
    while True:
        body[key] = text
        data = json.dumps(body).encode()
        if len(data) <= size:
            return data
        text = text[:len(text) - (len(data) - size)]  # escapes make JSON longer than the text: cut, retry


def looping(base: str, stop: threading.Event, timeout: float, requests: list, out: dict) -> None:
    """Sends the (label, path, body) requests in turn until `stop`; out[label]: [(status, ms)]."""
    with httpx.Client(base_url=base, headers={"Content-Type": "application/json"}) as c:
        while not stop.is_set():
            for label, path, data in requests:
                out.setdefault(label, []).append(timed(c, "POST", path, timeout, content=data))


def slowloris(port: int, stop: threading.Event, out: list) -> None:
    """Keeps one slow connection open until `stop`: a request head, one byte a second, never
    finished; when the server closes it, records after how long (and what it answered) and opens
    the next."""
    head = b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    while not stop.is_set():
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        start, sent, reply, closed = time.time(), 0, b"", None
        try:
            while not stop.is_set() and closed is None:
                data = head[sent] if sent < len(head) else b"X-Slow: a\r\n"[(sent - len(head)) % 11]
                try:
                    s.send(bytes([data]))
                    sent += 1
                    if select.select([s], [], [], 1.0)[0]:  # readable: an answer, or the server closed
                        while chunk := s.recv(4096):
                            reply += chunk
                        closed = time.time() - start
                except OSError:  # reset, broken pipe
                    closed = time.time() - start
        finally:
            s.close()
        out.append({"closed_by_server": closed is not None, "after_s": closed and round(closed, 1),
                    "bytes_sent": sent, "reply": reply.split(b"\r\n", 1)[0].decode("latin-1")})


def abuse(args) -> dict:
    proc, base = start_server(args, "--max-body", str(args.max_body))
    port, loaded = int(base.rsplit(":", 1)[1]), mem_mb(proc.pid)
    try:
        quiet = client_c(base, args.seconds, args.timeout)
        size = args.max_body - 1024
        a_requests = [("/infill", "/infill", fill({"input_suffix": "\n", "n_predict": 8}, "input_prefix", size)),
                      ("/tokenize", "/tokenize", fill({}, "content", size))]

        def b_body(n, chars):  # n distinct, code-like stop strings
            stops = [(SOURCE * 3)[i * 97:i * 97 + chars] for i in range(n)]
            return json.dumps({"prompt": "def parse(args):\n    ", "n_predict": 32, "stop": stops}).encode()
        # 2000 x 2000 as asked; 64 x 256, the most the engine accepts (MAX_STOPS, MAX_STOP_CHARS)
        b_requests = [("2000x2000", "/completion", b_body(2000, 2000)), ("64x256", "/completion", b_body(64, 256))]
        stop, a, b, loris = threading.Event(), {}, {}, []
        threads = [threading.Thread(target=looping, args=(base, stop, args.timeout, a_requests, a)),
                   threading.Thread(target=looping, args=(base, stop, args.timeout, b_requests, b))]
        threads += [threading.Thread(target=slowloris, args=(port, stop, loris)) for _ in range(args.slowloris)]
        for t in threads:
            t.start()
        try:
            loud = client_c(base, args.seconds, args.timeout)
        finally:
            stop.set()
            for t in threads:
                t.join()
        server_mb = mem_mb(proc.pid)
    finally:
        stop_server(proc)
    return {"max_body": args.max_body, "body_bytes": {label: len(data) for label, _, data in a_requests + b_requests},
            "quiet": quiet, "abused": loud, "a": {k: summary(r) for k, r in a.items()},
            "b": {k: summary(r) for k, r in b.items()}, "slowloris": loris, "slowloris_open": args.slowloris,
            "server_mb_loaded": loaded,
            "server_mb_end": server_mb, "error_examples": dict(ERRORS)}


def memory(args) -> dict:
    proc, base = start_server(args, "--cache-mb", str(args.cache_mb))
    lines = SOURCE.splitlines(keepends=True)
    try:
        with httpx.Client(base_url=base, timeout=args.timeout) as c:
            loaded = mem_mb(proc.pid)
            c.post("/infill", json={"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n", "n_predict": 8},
                   headers={"User-Agent": "warm"})
            warm = mem_mb(proc.pid)

            def one(i):
                k = (i * 23) % max(1, len(lines) - 60)
                body = {"input_prefix": f"# client {i}\n" + "".join(lines[k:k + 50]),
                        "input_suffix": "".join(lines[k + 50:k + 56]), "n_predict": 4}
                return timed(c, "POST", "/infill", args.timeout, json=body, headers={"User-Agent": f"client-{i}"})

            t = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(one, range(args.clients)))
            seconds = time.perf_counter() - t
            after, states = mem_mb(proc.pid), state_mb(c)
    finally:
        stop_server(proc)
    return {"cache_mb": args.cache_mb, "clients": args.clients, "seconds": round(seconds, 1),
            "requests": summary(results), "rss_mb_loaded": loaded["VmRSS"], "rss_mb_warm": warm["VmRSS"],
            "rss_mb_after": after["VmRSS"], "peak_mb": after["VmHWM"], "state_mb": states,
            "rss_growth_mb": round(after["VmRSS"] - loaded["VmRSS"], 1),
            "rss_ratio": round(after["VmRSS"] / loaded["VmRSS"], 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--seconds", type=float, default=60, help="client C's run, quiet and again under abuse")
    ap.add_argument("--threads", type=int, default=2, help="plt-serve --threads")
    ap.add_argument("--max-body", type=int, default=4 << 20, help="plt-serve --max-body (A's bodies fill it)")
    ap.add_argument("--slowloris", type=int, default=8, help="slow connections in the abuse run")
    ap.add_argument("--timeout", type=float, default=30, help="seconds per request")
    ap.add_argument("--clients", type=int, default=100, help="distinct clients in the memory run")
    ap.add_argument("--cache-mb", type=int, default=16, help="plt-serve --cache-mb in the memory run")
    ap.add_argument("--only", choices=["abuse", "memory"], help="run one scenario")
    args = ap.parse_args(argv)
    out = {"model": args.model, "threads": args.threads, "seconds": args.seconds, "timeout": args.timeout}
    if args.only in (None, "abuse"):
        out["abuse"] = abuse(args)
    if args.only in (None, "memory"):
        out["memory"] = memory(args)
    table(out)
    print(json.dumps(out))


def table(out: dict) -> None:
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    if "abuse" in out:
        x = out["abuse"]
        say(f"client C, {out['seconds']} s each        count   p50 ms   p95 ms   max ms  statuses")
        for run in ("quiet", "abused"):
            for route in ("health", "infill"):
                s = x[run][route]
                say(f"  {run:6} {route:6}              {s['count']:5} {s['p50_ms']:8} {s['p95_ms']:8} "
                    f"{s['max_ms']:8}  {s['statuses']}")
        for who in ("a", "b"):
            for label, s in x[who].items():
                say(f"  {who.upper()} {label:10} {x['body_bytes'][label]:8} B  {s['count']:5} {s['p50_ms']:8} "
                    f"{s['p95_ms']:8} {s['max_ms']:8}  {s['statuses']}")
        closed = [c["after_s"] for c in x["slowloris"] if c["closed_by_server"]]
        say(f"slowloris ({out['abuse']['slowloris_open']} kept open): {len(x['slowloris'])} connections, "
            f"{len(closed)} closed by the server, after {min(closed, default=0)} to {max(closed, default=0)} s "
            f"(replies {sorted({c['reply'] for c in x['slowloris']})})")
        say(f"server memory: loaded {x['server_mb_loaded']}, end {x['server_mb_end']} (MB)")
        for key, message in x["error_examples"].items():
            say(f"  {key}: {message[:160]}")
    if "memory" in out:
        m = out["memory"]
        say(f"memory, --cache-mb {m['cache_mb']}, {m['clients']} clients in {m['seconds']} s "
            f"({m['requests']['statuses']}): RSS loaded {m['rss_mb_loaded']} MB, warm {m['rss_mb_warm']}, "
            f"after {m['rss_mb_after']} (+{m['rss_growth_mb']}, x{m['rss_ratio']}), peak {m['peak_mb']} MB; "
            f"states {m['state_mb']} MB")


if __name__ == "__main__":
    main()
