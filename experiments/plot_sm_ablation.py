#!/usr/bin/env python3
"""Plots and the markdown summary of an sm_ablation results file, redrawn from its JSON.

    python experiments/plot_sm_ablation.py experiments/results/sm_ablation_gpu_ws2.json
    python experiments/plot_sm_ablation.py RESULTS.json --fig-dir /tmp/figs --md /tmp/summary.md

One PNG per part: (a) wire GB/s against num_sms, (b) GEMM throughput under communication as a
fraction of alone, with the ideal (SMs - k) / SMs, (c) the two-micro-batch MoE layer's time.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from overlap.bench import save_figure  # noqa: E402

_STYLE = ["C0", "C1", "C2", "C3", "C4", "C5"]


def _by_backend(rows):
    out = defaultdict(list)
    for r in rows:
        out[r["backend"]].append(r)
    for v in out.values():
        v.sort(key=lambda r: r["num_sms"])
    return dict(sorted(out.items()))


def _colors(rows):
    names = sorted({r["backend"] for r in rows})
    return {n: _STYLE[i % len(_STYLE)] for i, n in enumerate(names)}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(meta, what):
    return (f"{what}: {meta.get('device', '?')}, {meta.get('world_size', '?')} ranks "
            f"({meta.get('commit', '?')[:8]}{'+dirty' if meta.get('dirty') else ''})")


def plot_part_a(data, path):
    rows = [r for r in data["rows"] if r["op"] in ("dispatch", "combine")]
    if not rows:
        return None
    plt = _plt()
    colors = _colors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, op in zip(axes, ("dispatch", "combine")):
        for b, rs in _by_backend([r for r in rows if r["op"] == op]).items():
            ks, gb = [r["num_sms"] for r in rs], [r["wire_gbps"] for r in rs]
            label = b if len(rs) > 1 else f"{b} ({rs[0]['num_tokens']} tok, 0 SMs in flight)"
            ax.plot(ks, gb, "o-" if len(rs) > 1 else "*", color=colors[b], label=label,
                    markersize=6 if len(rs) > 1 else 12)
        ax.set_title(op)
        ax.set_xlabel("SMs held by communication (k)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("wire GB/s per GPU")
    axes[0].legend(fontsize=8)
    fig.suptitle(_title(data["meta"], "(a) all-to-all bandwidth alone"), fontsize=10)
    return save_figure(fig, path)


def plot_part_b(data, path):
    rows = [r for r in data["rows"] if r["op"] == "gemm_with_comm"]
    if not rows:
        return None
    plt = _plt()
    colors = _colors(rows)
    sms = rows[0]["device_sms"]
    names = sorted({r["gemm"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r["gemm"] == name]
        kmax = max(r["num_sms"] for r in sub)
        ax.plot([0, kmax], [1.0, (sms - kmax) / sms], "k--", lw=1, label=f"ideal ({sms}-k)/{sms}")
        for b, rs in _by_backend(sub).items():
            ks, ratio = [r["num_sms"] for r in rs], [r["ratio_alone"] for r in rs]
            ax.plot(ks, ratio, "o-" if len(rs) > 1 else "*", color=colors[b], label=b,
                    markersize=6 if len(rs) > 1 else 12)
        rep = [r for r in data["rows"] if r["op"] == "gemm_alone_repeat" and r["gemm"] == name]
        if rep:   # the run's noise: the same GEMM alone, timed again after the sweep
            ax.axhspan(min(1.0, rep[0]["ratio_alone"]), max(1.0, rep[0]["ratio_alone"]), color="grey", alpha=0.2,
                       label="alone, rerun")
        ax.set_title(f"{name} {sub[0]['shape']} ({sub[0]['alone_tflops']:.0f} TFLOP/s alone)", fontsize=9)
        ax.set_xlabel("SMs held by communication (k)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("throughput with comm / alone")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(data["meta"], "(b) GEMM while communication runs"), fontsize=10)
    return save_figure(fig, path)


def plot_part_c(data, path):
    rows = [r for r in data["rows"] if r["op"].startswith("moe_")]
    if not rows:
        return None
    plt = _plt()
    colors = _colors(rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"moe_overlapped": ("o-", "overlapped"), "moe_serial": ("s--", "serial"),
              "moe_comm_only": ("^:", "comm only")}
    for b, rs in _by_backend(rows).items():
        for op, (style, what) in styles.items():
            pts = [r for r in rs if r["op"] == op]
            ax.plot([r["num_sms"] for r in pts], [r["time_us"] for r in pts], style, color=colors[b],
                    label=f"{b} {what}", alpha=1.0 if op == "moe_overlapped" else 0.6)
    comp = [r["time_us"] for r in rows if r["op"] == "moe_compute_only"]
    if comp:
        mid = sorted(comp)[len(comp) // 2]
        ax.axhline(mid, color="k", lw=1, ls="-.", label="compute only (median)")
    ax.set_xlabel("SMs held by communication (k)")
    ax.set_ylabel("MoE layer, 2 micro-batches (us)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(_title(data["meta"], "(c) dispatch -> experts -> combine"), fontsize=9)
    return save_figure(fig, path)


def plot_all(data, fig_dir, stem):
    """Write ``{fig_dir}/{stem}_{a,b,c}.png`` for the parts present; return their paths."""
    os.makedirs(fig_dir, exist_ok=True)
    paths = [plot_part_a(data, os.path.join(fig_dir, f"{stem}_a_bandwidth.png")),
             plot_part_b(data, os.path.join(fig_dir, f"{stem}_b_gemm_interference.png")),
             plot_part_c(data, os.path.join(fig_dir, f"{stem}_c_moe_layer.png"))]
    return [p for p in paths if p]


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def summary_markdown(data):
    """A markdown report of one results file: provenance, notes and one table per part."""
    meta, rows = data["meta"], data["rows"]
    out = [f"# SM ablation ({meta.get('device', '?')}, {meta.get('world_size')} ranks)", "",
           f"- commit `{meta.get('commit')}`{' (dirty)' if meta.get('dirty') else ''}, {meta.get('date')}; "
           f"torch {meta.get('torch')}, triton {meta.get('triton')}, NCCL {meta.get('nccl')}",
           f"- command: `{meta.get('command')}`"]
    if meta.get("device") == "cpu":
        out.append("- **CPU smoke run (gloo): the numbers mean nothing; nothing runs concurrently.**")
    for note in meta.get("notes", []):
        out.append(f"- note: {note}")
    a = [r for r in rows if r["op"] in ("dispatch", "combine")]
    if a:
        out += ["", "## (a) all-to-all alone", "",
                "| backend | k | tokens | dispatch us | dispatch wire GB/s | combine us | combine wire GB/s | limit |"
                " comm kernel blocks (dispatch/combine) |",
                "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        pairs = defaultdict(dict)
        for r in a:
            pairs[(r["backend"], r["num_sms"])][r["op"]] = r
        for (b, k), p in sorted(pairs.items()):
            d, c = p.get("dispatch", {}), p.get("combine", {})
            out.append(f"| {b} | {k} | {d.get('num_tokens', c.get('num_tokens'))} | {_f(d.get('time_us'))} | "
                       f"{_f(d.get('wire_gbps'))} | {_f(c.get('time_us'))} | {_f(c.get('wire_gbps'))} | "
                       f"{d.get('sm_limit', '')} | {_f(d.get('comm_kernel_blocks'), '{}')}/"
                       f"{_f(c.get('comm_kernel_blocks'), '{}')} |")
    b_rows = [r for r in rows if r["op"] == "gemm_with_comm"]
    if b_rows:
        alone = {r["gemm"]: r for r in rows if r["op"] == "gemm_alone"}
        rep = {r["gemm"]: r for r in rows if r["op"] == "gemm_alone_repeat"}
        out += ["", "## (b) GEMM throughput while communication holds k SMs", ""]
        for g, r in sorted(alone.items()):
            noise = f", rerun after the sweep {rep[g]['tflops']:.4g}" if g in rep else ""
            out.append(f"- {g} {r['shape']} alone: {r['tflops']:.4g} TFLOP/s{noise}")
        out += ["", "| backend | k | gemm | TFLOP/s | ratio to alone | ideal (SMs-k)/SMs |"
                " comm step us alone -> during | comm covered window |", "|---|---:|---|---:|---:|---:|---:|---|"]
        for r in sorted(b_rows, key=lambda r: (r["backend"], r["num_sms"], r["gemm"])):
            out.append(f"| {r['backend']} | {r['num_sms']} | {r['gemm']} | {r['tflops']:.4g} | "
                       f"{r['ratio_alone']:.3f} | {r['ideal_ratio']:.3f} | "
                       f"{r['comm_step_us_alone']:.0f} -> {r['comm_step_us_during_gemm']:.0f} | "
                       f"{r['comm_covered_window']} |")
    c = [r for r in rows if r["op"].startswith("moe_")]
    if c:
        out += ["", "## (c) MoE layer, two micro-batches (time in us)", "",
                "| backend | k | overlapped | serial | compute only | comm only | overlapped / max(compute, comm) |"
                " speedup vs serial |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        groups = defaultdict(dict)
        for r in c:
            groups[(r["backend"], r["num_sms"])][r["op"]] = r
        for (b, k), g in sorted(groups.items()):
            ov = g.get("moe_overlapped", {})
            t = lambda op: _f(g.get(op, {}).get("time_us"), "{:.0f}")  # noqa: E731
            out.append(f"| {b} | {k} | {t('moe_overlapped')} | {t('moe_serial')} | {t('moe_compute_only')} | "
                       f"{t('moe_comm_only')} | {_f(ov.get('ratio_to_bound'), '{:.3f}')} | "
                       f"{_f(ov.get('speedup_vs_serial'), '{:.3f}')} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    from overlap.bench import read_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="an sm_ablation_*.json file")
    p.add_argument("--fig-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures"))
    p.add_argument("--md", default=None, help="markdown path (default: next to the JSON)")
    args = p.parse_args(argv)
    data = read_results(args.results)
    stem = os.path.splitext(os.path.basename(args.results))[0]
    paths = plot_all(data, args.fig_dir, stem)
    md = args.md or os.path.splitext(args.results)[0] + ".md"
    with open(md, "w") as f:
        f.write(summary_markdown(data))
    print("wrote", ", ".join(paths + [md]))


if __name__ == "__main__":
    main()
