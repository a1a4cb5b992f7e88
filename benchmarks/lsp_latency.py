"""plt-lsp's warm latency against plt-serve's, in one run, each as its editors use it, in two
sampling modes, each the same on both sides:

  llama_vim  llama.vim's sampling: samplers ["top_k", "top_p", "infill"], top_k 40, top_p 0.90
             (plt-lsp: those initializationOptions; plt-serve: llama.vim's /infill request).
  greedy     temperature 0 with the default samplers (plt-lsp's defaults; plt-serve: the same
             /infill request without its samplers, at temperature 0).

  lsp    plt-lsp over stdio with a real LSP client (pygls's), one server per mode: open the
         standard library's textwrap.py, then type line 120 of it three characters at a time (on
         to the next line when one is done); each keystroke is an incremental didChange followed
         by a one-line textDocument/completion at the cursor (single_line, n_predict 128, as
         llama.vim asks). Timed from sending the didChange to the completion's reply.
  serve  plt-serve over TCP: the same keystrokes as llama.vim's /infill requests, exactly as
         benchmarks/serve_bench.py's latency() sends them (its `typing` half), one line each;
         then the same requests greedy.

The median length of the completions is reported for each run: llama.vim's samplers (its
"infill" sampler) often end at once with an empty line, greedy decoding seldom, so the modes do
different work; within a mode both sides sample alike (greedy: the same texts).

Both warm: one untimed request first. The servers run one after the other, with the same
--model, --threads and --cache-mb.

    python benchmarks/lsp_latency.py [--model default] [--typing 100]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import free_port, infill_at, p95, typing_requests, wait_healthy  # noqa: E402

START = 120  # the line typed, as in serve_bench.py
LLAMA_VIM = {"samplers": ["top_k", "top_p", "infill"], "top_k": 40, "top_p": 0.90}  # serve_bench.infill_at's
MODES = {"llama_vim": LLAMA_VIM, "greedy": {}}  # plt-lsp's settings on top of its defaults (greedy)


def u16(s: str) -> int:
    """An LSP character offset (UTF-16 code units)."""
    return len(s.encode("utf-16-le")) // 2


def typing_states(lines: list[str], start: int, n: int):
    """(line, typed) for each request of serve_bench.typing_requests: the same keystrokes."""
    k = start
    while True:
        line = lines[k].rstrip("\n")
        for j in range(3, len(line) + 3, 3):
            yield k, line[:j]
            n -= 1
            if n == 0:
                return
        k += 1


def summary(times: list[float], texts: list[str]) -> dict:
    return {"requests": len(times), "median_ms": round(statistics.median(times), 1), "p95_ms": round(p95(times), 1),
            "completion_chars_median": statistics.median([len(t) for t in texts]), "texts": texts}


async def lsp_latency(cmd: list[str], lines: list[str], n: int, options: dict, method: str) -> dict:
    from lsprotocol import types as T
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("plt-lsp-latency", "1")

    @client.feature(T.WORKSPACE_CONFIGURATION)
    def configuration(params: T.ConfigurationParams):
        return [options if item.section in (None, "pltkit") else None for item in params.items]

    await client.start_io(*cmd)
    stderr: list[bytes] = []

    async def drain():  # pygls pipes the server's stderr: keep it flowing (and its tail for errors)
        async for line in client._server.stderr:
            stderr.append(line)
            del stderr[:-40]

    drainer = asyncio.create_task(drain())
    try:
        await client.initialize_async(T.InitializeParams(
            process_id=os.getpid(), root_uri="file:///bench", initialization_options=options,
            capabilities=T.ClientCapabilities(
                workspace=T.WorkspaceClientCapabilities(configuration=True),
                text_document=T.TextDocumentClientCapabilities(
                    synchronization=T.TextDocumentSyncClientCapabilities(),
                    completion=T.CompletionClientCapabilities(),
                    inline_completion=T.InlineCompletionClientCapabilities()))))
        client.initialized(T.InitializedParams())
        result = await typing_run(client, lines, n, method)
        await client.shutdown_async(None)
        client.exit(None)
        try:
            await asyncio.wait_for(client._server.wait(), 30)
        except asyncio.TimeoutError:
            client._server.kill()
        return result
    except BaseException:
        sys.stderr.write(b"".join(stderr).decode(errors="replace"))
        if client._server.returncode is None:
            client._server.kill()
        raise
    finally:
        drainer.cancel()
        await client.stop()


async def lsp_complete(client, uri: str, line: int, character: int, method: str) -> str:
    """The completion's text at a position, by textDocument/completion or inlineCompletion."""
    from lsprotocol import types as T

    pos = T.Position(line=line, character=character)
    if method == "inline":
        r = await client.text_document_inline_completion_async(T.InlineCompletionParams(
            text_document=T.TextDocumentIdentifier(uri=uri), position=pos,
            context=T.InlineCompletionContext(trigger_kind=T.InlineCompletionTriggerKind.Automatic)))
        items = r.items if isinstance(r, T.InlineCompletionList) else (r or [])
        text = items[0].insert_text if items else ""
        return text if isinstance(text, str) else text.value
    r = await client.text_document_completion_async(T.CompletionParams(
        text_document=T.TextDocumentIdentifier(uri=uri), position=pos))
    items = r.items if isinstance(r, T.CompletionList) else (r or [])
    if not items:
        return ""
    edit = items[0].text_edit
    return edit.new_text if edit is not None else (items[0].insert_text or items[0].label)


async def typing_run(client, lines: list[str], n: int, method: str) -> dict:
    """Open textwrap.py as it stands when line START is about to be typed (that line empty), warm
    up, then time n keystrokes: each a didChange and a completion at the cursor."""
    from lsprotocol import types as T

    uri = "file:///bench/textwrap.py"
    doc = lines[:START] + ["\n"] + lines[START + 1:]
    client.text_document_did_open(T.DidOpenTextDocumentParams(
        T.TextDocumentItem(uri=uri, language_id="python", version=1, text="".join(doc))))
    await lsp_complete(client, uri, START, 0, method)  # warm, as serve_bench warms its slot
    times, texts, typed, version = [], [], {}, 1  # typed: line -> what is typed on it so far
    for k, text in typing_states(lines, START, n):
        before = typed.get(k)
        if before is None:  # a new line: its old text gives way to the first keystrokes
            span = T.Range(start=T.Position(line=k, character=0),
                           end=T.Position(line=k, character=u16(doc[k].rstrip("\n"))))
            change = T.TextDocumentContentChangePartial(range=span, text=text)
        else:
            at = T.Position(line=k, character=u16(before))
            change = T.TextDocumentContentChangePartial(range=T.Range(start=at, end=at), text=text[len(before):])
        typed[k], version = text, version + 1
        t = time.perf_counter()
        client.text_document_did_change(T.DidChangeTextDocumentParams(
            text_document=T.VersionedTextDocumentIdentifier(uri=uri, version=version), content_changes=[change]))
        texts.append(await lsp_complete(client, uri, k, u16(text), method))
        times.append((time.perf_counter() - t) * 1e3)
    return summary(times, texts)


def serve_latency(cmd: list[str], lines: list[str], n: int) -> dict:
    """The typing run twice on one server: with llama.vim's request as serve_bench.py sends it,
    and the same made greedy with the default samplers (temperature 0, as plt-lsp samples by
    default), so that the lengths generated, the work, can be compared too."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(cmd + ["--port", str(port)])
    try:
        c = httpx.Client(base_url=base, timeout=60)
        wait_healthy(c)
        out = {}
        for kind in ("llama_vim", "greedy"):
            c.post("/infill", json=infill_at(lines, START - 1))  # warm the slot, as serve_bench's latency()
            times, texts, predicted, cached, prompt_ms = [], [], [], [], []
            for body in typing_requests(lines, START, n):  # serve_bench's timed(), keeping the text's length
                body["response_fields"] = body["response_fields"] + ["content"]
                if kind == "greedy":
                    body = {**{k: v for k, v in body.items() if k != "samplers"}, "temperature": 0}
                t = time.perf_counter()
                r = c.post("/infill", json=body).json()
                times.append((time.perf_counter() - t) * 1e3)
                texts.append(r["content"])
                predicted.append(r["timings"]["predicted_n"])
                cached.append(r["tokens_cached"])
                prompt_ms.append(r["timings"]["prompt_ms"])
            out[kind] = {**summary(times, texts), "predicted_n_median": statistics.median(predicted),
                         "tokens_cached_median": statistics.median(cached),
                         "server_prompt_ms_median": round(statistics.median(prompt_ms), 1)}
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--typing", type=int, default=100, help="keystrokes timed, each side and mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-mb", type=int, default=256)
    ap.add_argument("--n-predict", type=int, default=128, help="plt-lsp's n_predict (llama.vim's default)")
    ap.add_argument("--method", choices=("completion", "inline"), default="completion",
                    help="textDocument/completion or textDocument/inlineCompletion")
    args = ap.parse_args(argv)
    common = ["--model", args.model, "--threads", str(args.threads), "--cache-mb", str(args.cache_mb)]
    lines = open(sysconfig.get_paths()["stdlib"] + "/textwrap.py").read().splitlines(keepends=True)
    options = {mode: {"single_line": True, "n_predict": args.n_predict, **settings} for mode, settings in MODES.items()}
    lsp_cmd = [sys.executable, "-m", "pltkit.cli.lsp", *common]
    lsp = {mode: asyncio.run(lsp_latency(lsp_cmd, lines, args.typing, options[mode], args.method)) for mode in MODES}
    serve = serve_latency(["plt-serve", *common], lines, args.typing)
    out = {"model": args.model, "threads": args.threads, "cache_mb": args.cache_mb, "lsp_method": args.method,
           "lsp_options": options, "lsp": lsp, "serve": serve,
           "lsp_minus_serve_median_ms": {m: round(lsp[m]["median_ms"] - serve[m]["median_ms"], 1) for m in MODES},
           "lsp_minus_serve_p95_ms": {m: round(lsp[m]["p95_ms"] - serve[m]["p95_ms"], 1) for m in MODES},
           "greedy_same_text": sum(a == b for a, b in zip(lsp["greedy"]["texts"], serve["greedy"]["texts"]))}
    for x in (*lsp.values(), *serve.values()):
        del x["texts"]
    report(out, args)
    print(json.dumps(out))


def report(out: dict, args) -> None:
    """The table, on stderr."""
    print(f"warm one-line completion while typing, {args.typing} keystrokes each ({args.model}, "
          f"{args.threads} threads; plt-lsp: didChange + {args.method})", file=sys.stderr)
    print(f"  {'':36} {'median ms':>10} {'p95 ms':>10} {'chars':>6}", file=sys.stderr)
    for mode in MODES:
        for name, x in ((f"plt-lsp, {mode}", out["lsp"][mode]), (f"plt-serve /infill, {mode}", out["serve"][mode])):
            print(f"  {name:36} {x['median_ms']:>10} {x['p95_ms']:>10} {x['completion_chars_median']:>6}",
                  file=sys.stderr)
        print(f"  {'lsp - serve, ' + mode:36} {out['lsp_minus_serve_median_ms'][mode]:>10} "
              f"{out['lsp_minus_serve_p95_ms'][mode]:>10}", file=sys.stderr)
    print(f"  chars: the completions' median length; greedy, plt-lsp's equal plt-serve's in "
          f"{out['greedy_same_text']} of {args.typing}", file=sys.stderr)


if __name__ == "__main__":
    main()
