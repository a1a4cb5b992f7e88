"""plt-bench's tables, chart and summary line."""

from __future__ import annotations

import platform
import statistics


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def _spread(a: list, b: list) -> list | None:
    """The quartiles [q1, median, q3] of the ratios a[i] / b[i] of repeats run side by side: how far
    one repeat's ratio strays (the ratio of the medians need not be the median of the ratios)."""
    if len(a) < 4 or len(a) != len(b):
        return None
    return [round(q, 3) for q in statistics.quantiles([x / y for x, y in zip(a, b)], n=4)]


def tables(results: dict) -> str:
    lo = results["loops"]
    lines = ["decode ms per token (median): plain / serial-loop L=2 (cost model) / PLT-2"]
    lines.append(f"{'form':>11} {'context':>8} {'plain':>8} {'serial2':>8} {'plt2':>8} {'plt2/plain':>11} "
                 f"{'serial2/plt2':>13}")
    for form, by_ctx in lo["decode_ms"].items():
        for ctx, r in by_ctx.items():
            rep = lo.get("repeats", {}).get(form, {}).get(ctx)
            q = rep and _spread(rep["plt2"], rep["plain"])
            lines.append(f"{form:>11} {ctx:>8} {r['plain']:>8.2f} {r['serial2']:>8.2f} {r['plt2']:>8.2f} "
                         f"{r['plt2'] / r['plain']:>10.2f}x {r['serial2'] / r['plt2']:>12.2f}x"
                         + (f"   repeats' plt2/plain: {q[0]:.2f} {q[1]:.2f} {q[2]:.2f}" if q else ""))
    lines.append("")
    lines.append(f"{'form':>11} {'prefill tok/s: plain':>21} {'serial2':>8} {'plt2':>8}   peak RSS MB (longest "
                 f"context): plain / serial2 / plt2")
    for form, r in lo["prefill_tps"].items():
        rss = lo["peak_rss_mb"].get(form, {})
        lines.append(f"{form:>11} {r['plain']:>21.0f} {r['serial2']:>8.0f} {r['plt2']:>8.0f}   "
                     + " / ".join("-" if rss.get(v) is None else f"{rss[v]:.0f}" for v in ("plain", "serial2", "plt2")))
    lines.append("")
    lines.append("KV-cache bytes (global cache, rings, carries): plain / serial2 / plt2")
    for ctx, r in lo["kv_bytes"].items():
        lines.append(f"{ctx:>8}: {r['plain']:>12,} {r['serial2']:>12,} {r['plt2']:>12,}  "
                     f"plt2/plain {r['plt2'] / r['plain']:.4f}")
    lines += nodes_table(results)
    if "llamacpp" in results:
        lc = results["llamacpp"]
        lines += peer_table("SmolLM2-135M", lc) + ratio_lines("llamacpp", lc)
        lines.append(f"next-token top-1 agreement with llama.cpp at the comparable type (256 teacher-forced "
                     f"positions): {lc['top1_agreement']}")
        prof = lc["profile"]
        lines.append(f"pltkit int8 decode step under ONNX Runtime's profiler: {prof['kernel_us_per_step']} us in "
                     f"kernels of {prof['run_us_per_step']} us ({prof.get('unprofiled_us_per_step', '-')} us "
                     f"unprofiled: the profiler's cost per node inflates the small ops' shares); by op: " +
                     ", ".join(f"{op} {share:.0%}" for op, share in prof["op_share"].items()))
    if "ortgenai" in results:
        og = results["ortgenai"]
        lines += peer_table("SmolLM2-135M against onnxruntime-genai", og) + ratio_lines("ortgenai", og)
        lines.append(f"next-token top-1 agreement with onnxruntime-genai: {og['top1_agreement']}")
    lines.append(f"\n({results['seconds']} s)")
    return "\n".join(lines)


# peer -> (pltkit's precision, the peer's system) pairs of a comparison
PEERS = {"llamacpp": (("int8", "llamacpp-q8_0"), ("int4", "llamacpp-q4_1")),
         "ortgenai": (("int8", "genai-int8"), ("int4", "genai-int4"))}


def peer_ratios(peer: str, r: dict) -> dict:
    """The JSON line's pltkit_over_<peer>_<decode|prefill>_<precision> speed ratios (over 1: pltkit is
    faster), from the medians, and their _quartiles over the repeats (each repeat's systems run side
    by side, so a repeat's ratio is free of the machine's slower drifts)."""
    out = {}
    for prec, theirs in PEERS[peer]:
        ours, key = f"pltkit-{prec}", f"pltkit_over_{peer}"
        out[f"{key}_decode_{prec}"] = _ratio(r["decode_ms"][theirs], r["decode_ms"][ours])
        out[f"{key}_prefill_{prec}"] = _ratio(r["prefill_tps"][ours], r["prefill_tps"][theirs])
        if "repeats" in r:
            rep = r["repeats"]
            out[f"{key}_decode_{prec}_quartiles"] = _spread(rep["decode_ms"][theirs], rep["decode_ms"][ours])
            out[f"{key}_prefill_{prec}_quartiles"] = _spread(rep["prefill_tps"][ours], rep["prefill_tps"][theirs])
    return out


def peer_table(title: str, r: dict) -> list[str]:
    """A peer comparison's prefill and decode speed, a line per system."""
    lines = ["", f"{title}, {r['threads']} threads, prompt {r['ctx']} tokens: {'prefill tok/s':>14} {'decode ms':>10}"]
    return lines + [f"{name:>16} {r['prefill_tps'][name]:>14.0f} {r['decode_ms'][name]:>10.2f}" for name in r["decode_ms"]]


def ratio_lines(peer: str, r: dict) -> list[str]:
    """pltkit's speed over the peer's, median ratio and quartiles over the repeats."""
    ratios, lines = peer_ratios(peer, r), []
    for prec, theirs in PEERS[peer]:
        parts = []
        for what in ("decode", "prefill"):
            q = ratios.get(f"pltkit_over_{peer}_{what}_{prec}_quartiles")
            ratio = ratios[f"pltkit_over_{peer}_{what}_{prec}"]
            parts.append(f"{what} " + ("-" if ratio is None else f"{ratio:.2f}x")
                         + (f" (repeats' ratios: median {q[1]:.2f}, quartiles {q[0]:.2f}-{q[2]:.2f})" if q else ""))
        lines.append(f"pltkit-{prec} over {theirs}: " + ", ".join(parts))
    return lines


def _precision_order(prec: str):
    """fp32, then int8, then int4."""
    return not prec.startswith("fp"), -int("".join(c for c in prec if c.isdigit()) or 0)


def nodes_table(results: dict) -> list[str]:
    """Nodes per decoder layer of the decode graphs after ONNX Runtime's optimizations: the loop
    benchmark's plain and PLT-2 graphs, and SmolLM2's in pltkit and onnxruntime-genai."""
    loops, peers = results["loops"].get("nodes_per_layer"), results.get("ortgenai", {}).get("nodes_per_layer")
    if not loops and not peers:
        return []
    own = any(r.get("nodes_on_pltkit_kernels") for r in (results["loops"], results.get("ortgenai", {})))
    own = "pltkit's graphs on its own kernels" if own else "pltkit's own kernels did not run"
    lines = ["", "nodes per decoder layer of the decode graph after ONNX Runtime's optimizations "
                 f"(ORT_ENABLE_ALL, CPU; all nodes / layers; {own})"]
    loop_precs = sorted(loops or {}, key=_precision_order)
    peer_precs = sorted({k.split("-")[1] for k in peers or {}}, key=_precision_order)
    if loops:
        lines.append(f"{results['loops']['shape'] + ' shape':>18} " + " ".join(f"{p:>8}" for p in loop_precs))
        lines += [f"{v:>18} " + " ".join(f"{loops[p][v]:>8.1f}" for p in loop_precs)
                  for v in ("plain", "plt2")]
    if peers:
        lines.append(f"{'SmolLM2-135M':>18} " + " ".join(f"{p:>8}" for p in peer_precs))
        lines += [f"{label:>18} " + " ".join(f"{peers[f'{name}-{p}']:>8.1f}" for p in peer_precs)
                  for name, label in (("pltkit", "pltkit"), ("genai", "onnxruntime-genai"))]
    us = results.get("ort_us_per_node")
    if us is not None:
        lines.append(f"ONNX Runtime's cost of a small node here: {us:.2f} us (a chain of Adds, unprofiled); "
                     "per decoder layer and token, the node counts above differ by:")
        lines += [f"  PLT-2 over plain, {p}: {(loops[p]['plt2'] - loops[p]['plain']) * us:.1f} us" for p in loop_precs]
        lines += [f"  pltkit over onnxruntime-genai, {p}: {(peers[f'pltkit-{p}'] - peers[f'genai-{p}']) * us:.1f} us"
                  for p in peer_precs]
    return lines


def nodes_summary(results: dict) -> dict:
    """The JSON line's nodes_per_layer_<system>_<precision> keys."""
    out = {f"nodes_per_layer_{v}_{p}": n for p, by in results["loops"].get("nodes_per_layer", {}).items()
           for v, n in by.items()}
    if results.get("ort_us_per_node") is not None:
        out["ort_us_per_node"] = results["ort_us_per_node"]
    for name, n in results.get("ortgenai", {}).get("nodes_per_layer", {}).items():
        system, prec = name.split("-")
        out[f"nodes_per_layer_{'ortgenai' if system == 'genai' else system}_{prec}"] = n
    return out


def summary(results: dict, args) -> dict:
    lo = results["loops"]
    main_form = "ort-fp32" if "ort-fp32" in lo["decode_ms"] else next(iter(lo["decode_ms"]))
    ctx = max(lo["decode_ms"][main_form], key=int)  # int keys in the process, strings once read back from JSON
    d = lo["decode_ms"][main_form][ctx]
    kv_ctx = max(lo["kv_bytes"], key=int) if lo["kv_bytes"] else None
    kv = lo["kv_bytes"][kv_ctx] if lo["kv_bytes"] else {}
    out = {
        "plt2_over_plain_decode": _ratio(d["plt2"], d["plain"]),
        "serial2_over_plt2_decode": _ratio(d["serial2"], d["plt2"]),
        "plt2_over_plain_kv_bytes": _ratio(kv.get("plt2"), kv.get("plain")),
        "ratios_at": {"form": main_form, "context": ctx, "kv_context": kv_ctx},
        "plt2_over_plain_decode_all": {f: {c: _ratio(r["plt2"], r["plain"]) for c, r in by.items()}
                                       for f, by in lo["decode_ms"].items()},
        "serial2_over_plt2_decode_all": {f: {c: _ratio(r["serial2"], r["plt2"]) for c, r in by.items()}
                                         for f, by in lo["decode_ms"].items()},
        # each repeat runs the variants one after another: the quartiles of its ratios (4 repeats or more)
        "plt2_over_plain_decode_quartiles_all": {f: {c: _spread(r["plt2"], r["plain"]) for c, r in by.items()}
                                                 for f, by in lo.get("repeats", {}).items()},
    }
    for peer in PEERS:
        if peer in results:
            out.update(peer_ratios(peer, results[peer]))
    if "llamacpp" in results:
        out["llamacpp_ratio_meaning"] = "speed ratios: over 1 means pltkit is faster"
    out.update(nodes_summary(results))
    out.update(threads=args.threads, steps=args.steps, repeats=args.repeats, seconds=results["seconds"],
               machine=platform.machine(), results=results)
    return out


def plot(results: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = results["loops"]
    forms = list(lo["decode_ms"])
    fig, axes = plt.subplots(1, len(forms), figsize=(3.2 * len(forms), 3.4), sharey=False, squeeze=False)
    for ax, form in zip(axes[0], forms):
        ctxs = list(lo["decode_ms"][form])
        for i, v in enumerate(("plain", "serial2", "plt2")):
            ax.bar([x + 0.27 * (i - 1) for x in range(len(ctxs))], [lo["decode_ms"][form][c][v] for c in ctxs],
                   width=0.27, label={"serial2": "serial L=2 (cost model)", "plt2": "PLT-2"}.get(v, "plain L=1"))
        ax.set_xticks(range(len(ctxs)), [str(c) for c in ctxs])
        ax.set_title(form)
        ax.set_xlabel("context")
    axes[0][0].set_ylabel("decode ms / token")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
