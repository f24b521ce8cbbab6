#!/usr/bin/env python3
"""Plot ep_bench results: per-GPU wire bandwidth against num_sms, dispatch and combine side by side.

    python experiments/plot_ep_bench.py experiments/results/ep_bench_gpu_ws2.json [...]

Backends with an SM knob are lines over num_sms; the torch backend and the raw
all_to_all_single (which choose their own SMs) are horizontal reference lines.
Writes experiments/figures/<results name>.png next to nothing else.
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from overlap.bench import read_results, save_figure  # noqa: E402

FIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


_MODE_LABELS = {"exact": "", "budget": " (num_worst_tokens)", "graph": " (num_worst_tokens, graph replay)"}
_MODE_STYLES = {"exact": "-", "budget": "--", "graph": "-."}


def plot(path: str, out_dir: str = FIG_DIR) -> str:
    data = read_results(path)
    meta, rows = data["meta"], data["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    a2a = [r for r in rows if r["op"] == "all_to_all_single"]
    for ax, op in zip(axes, ("dispatch", "combine")):
        op_rows = [r for r in rows if r["op"] == op]
        # One line per (backend, dtype, mode): "budget" rows skip the host sync, "graph" rows are
        # CUDA-graph replays (no launch cost).
        series = sorted({(r["backend"], r.get("dtype", ""), r.get("mode") or "exact") for r in op_rows})
        for backend, dtype, mode in series:
            mine = [r for r in op_rows if r["backend"] == backend and r.get("dtype", "") == dtype
                    and (r.get("mode") or "exact") == mode]
            pts = sorted((r["num_sms"], r["wire_gbps"]) for r in mine if r["num_sms"] is not None)
            flat = [r["wire_gbps"] for r in mine if r["num_sms"] is None]
            if pts:
                label = f"{backend} {dtype}" + _MODE_LABELS.get(mode, f" ({mode})")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                        linestyle=_MODE_STYLES.get(mode, "-"))
            for v in flat:
                ax.axhline(v, linestyle=":", color="gray", label=f"{backend} {dtype} (SMs chosen by NCCL)")
        for r in a2a:
            ax.axhline(r["wire_gbps"], linestyle="--", color="black", label=f"{r['backend']} all_to_all_single, same bytes")
        ax.set_title(op)
        ax.set_xlabel("num_sms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("wire GB/s per GPU (bytes to other GPUs)")
    r0 = rows[0]
    fig.suptitle(f"{meta.get('device')} x{meta['world_size']}: {r0['num_tokens']} tokens/rank, hidden {r0['hidden']}, "
                 f"top-{r0['topk']}, {r0['num_experts']} experts (commit {str(meta.get('commit'))[:8]})",
                 fontsize=10)
    return save_figure(fig, os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="ep_bench JSON files")
    p.add_argument("--out-dir", default=FIG_DIR)
    args = p.parse_args(argv)
    for path in args.results:
        print(plot(path, args.out_dir))


if __name__ == "__main__":
    main()
