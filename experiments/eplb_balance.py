"""EPLB planner study (CPU): max/mean GPU load of the balanced policy vs the published one.

For every load distribution of ``overlap.eplb.workloads.load_suite`` (Zipf of three skews, a
few hot experts, per-layer mixed skew; 58 layers x 256 experts) and every placement setting
(DeepSeek prefill: 288 slots on 32 GPUs in 4 nodes; decode: 320 slots on 64 GPUs in 8 nodes;
the global policy on 64 GPUs), plan with ``policy="reference"`` and ``policy="balanced"`` and
record per layer the max/mean GPU load (each expert's load split evenly over its replicas),
the replicas co-located with another replica of their expert, and the planning time.

    python experiments/eplb_balance.py                    # writes results/eplb_balance_cpu.json + figure
    python experiments/eplb_balance.py --plot-only experiments/results/eplb_balance_cpu.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from overlap.bench import make_meta, read_results, save_figure, write_results
from overlap.eplb import balance_ratio, colocated_replicas, rebalance_experts
from overlap.eplb.workloads import load_suite

HERE = os.path.dirname(os.path.abspath(__file__))
# (name, num_replicas, num_groups, num_nodes, num_gpus)
SETTINGS = [("prefill_288slots_32gpus_4nodes", 288, 8, 4, 32),
            ("decode_320slots_64gpus_8nodes", 320, 8, 8, 64),
            ("global_320slots_64gpus", 320, 1, 1, 64)]


def run(num_layers: int, num_experts: int, seed: int) -> list[dict]:
    suite = load_suite(num_layers, num_experts, torch.Generator().manual_seed(seed))
    rows = []
    for setting, replicas, groups, nodes, gpus in SETTINGS:
        for dist_name, weight in suite.items():
            ratios = {}
            for policy in ("reference", "balanced"):
                times = []
                for _ in range(5):       # min of 5: the machine may be shared
                    t0 = time.perf_counter()
                    phy2log, _, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus, policy=policy)
                    times.append(time.perf_counter() - t0)
                ratio = balance_ratio(weight, phy2log, gpus)
                ratios[policy] = ratio
                rows.append({"op": "rebalance", "setting": setting, "distribution": dist_name, "policy": policy,
                             "num_layers": num_layers, "num_experts": num_experts, "num_replicas": replicas,
                             "num_groups": groups, "num_nodes": nodes, "num_gpus": gpus,
                             "max_mean_mean": ratio.mean().item(), "max_mean_median": ratio.median().item(),
                             "max_mean_worst": ratio.max().item(),
                             "colocated_replicas": int(colocated_replicas(phy2log, gpus).sum()),
                             "max_replicas": int(logcnt.max()), "time_ms": min(times) * 1e3})
            rel = ratios["balanced"] / ratios["reference"]
            rows.append({"op": "compare", "setting": setting, "distribution": dist_name,
                         "policy": "balanced/reference", "num_layers": num_layers, "num_gpus": gpus,
                         "ratio_of_max_mean": (ratios["balanced"].mean() / ratios["reference"].mean()).item(),
                         "layers_better": int((rel < 1 - 1e-9).sum()), "layers_worse": int((rel > 1 + 1e-9).sum()),
                         "worst_layer_excess": (ratios["balanced"] - ratios["reference"]).max().item()})
            print(f"{setting:32s} {dist_name:8s} max/mean ref {ratios['reference'].mean():.4f} "
                  f"bal {ratios['balanced'].mean():.4f} (x{rows[-1]['ratio_of_max_mean']:.3f})", flush=True)
    return rows


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["op"] == "rebalance"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    dists = list(dict.fromkeys(r["distribution"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for i, policy in enumerate(("reference", "balanced")):
            vals = [next(r["max_mean_mean"] for r in rows if r["setting"] == setting and r["distribution"] == d
                         and r["policy"] == policy) for d in dists]
            # Bars start at 1.0 (perfect balance): their height is the imbalance.
            ax.bar([x + 0.4 * i for x in range(len(dists))], [v - 1 for v in vals], bottom=1.0, width=0.4,
                   label=policy)
        ax.set_xticks([x + 0.2 for x in range(len(dists))], dists, rotation=20)
        ax.set_title(setting, fontsize=9)
        ax.set_ylabel("max / mean GPU load (mean over layers)")
        ax.legend(fontsize=8)
    fig.suptitle(f"EPLB: published policy vs balanced policy ({results['meta'].get('num_layers', '')} layers x "
                 f"{results['meta'].get('num_experts', '')} experts)", fontsize=10)
    print(f"wrote {save_figure(fig, path)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the JSON")
    parser.add_argument("--fig-dir", default=os.path.join(HERE, "figures"), help="directory for the PNG")
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the figure from a results file")
    args = parser.parse_args(argv)
    fig_path = os.path.join(args.fig_dir, "eplb_balance_cpu.png")
    if args.plot_only:
        plot(read_results(args.plot_only), fig_path)
        return
    rows = run(args.layers, args.experts, args.seed)
    meta = make_meta("eplb_balance", world_size=1, command=" ".join(["python"] + sys.argv),
                     num_layers=args.layers, num_experts=args.experts, seed=args.seed)
    compare = [r["ratio_of_max_mean"] for r in rows if r["op"] == "compare"]
    meta["geomean_ratio_of_max_mean"] = statistics.geometric_mean(compare)
    path = write_results(os.path.join(args.out, "eplb_balance_cpu.json"), meta, rows)
    print(f"wrote {path}; balanced/reference max/mean, geometric mean over the suite: "
          f"{meta['geomean_ratio_of_max_mean']:.4f}")
    plot(read_results(path), fig_path)


if __name__ == "__main__":
    main()
