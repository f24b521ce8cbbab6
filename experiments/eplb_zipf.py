"""Zipf-skewed routing through EPBuffer, before and after EPLB rebalancing.

Every rank routes tokens to top-k of 256 experts with Zipf-skewed popularity (the same hot
experts on every rank, shuffled over expert ids). A calibration window of routing steps is
counted with ``LoadCounter`` and all-reduced; ``rebalance_experts`` plans replicas
(``--redundant`` extra slots in all) with the published policy and with the balanced one.
On a fresh batch from the same distribution we then dispatch and combine

- ``none``: no replicas, ``EPBuffer(num_experts=256)``, experts contiguous per rank;
- ``reference`` / ``balanced``: ``EPBuffer(num_experts=256 + redundant)`` over physical slots,
  logical choices mapped to replicas by ``ExpertPlacement.to_physical(salt=rank)``;

and record, per policy and skew, max/mean over ranks of the received (token, expert) pairs
(expert compute per GPU) and of the received token rows (dispatch volume per GPU), and the
dispatch and combine times (median over iterations, max over ranks).

    python experiments/eplb_zipf.py                          # all GPUs, NCCL
    python experiments/eplb_zipf.py --world-size 2 --out experiments/results
    python experiments/eplb_zipf.py --cpu --world-size 4     # gloo ranks, small sizes
    python experiments/eplb_zipf.py --plot-only experiments/results/eplb_zipf_ws2.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
POLICIES = ("none", "reference", "balanced")


def _worker(rank: int, world_size: int, cfg: dict) -> list[dict] | None:
    import torch.distributed as dist

    from overlap.bench import time_fn
    from overlap.ep import EPBuffer
    from overlap.ep.layout import routing_layout
    from overlap.eplb import ExpertPlacement, LoadCounter, balance_ratio, rebalance_experts
    from overlap.eplb.workloads import sample_topk, zipf_popularity

    device = torch.device("cuda", torch.cuda.current_device()) if cfg["backend_pg"] == "nccl" else torch.device("cpu")
    dtype = getattr(torch, cfg["dtype"])
    E, k, T, H = cfg["experts"], cfg["topk"], cfg["tokens"], cfg["hidden"]
    P = E + cfg["redundant"]
    elem = torch.finfo(dtype).bits // 8
    rows = []
    for skew in cfg["skews"]:
        popularity = zipf_popularity(E, skew, torch.Generator().manual_seed(cfg["seed"]))   # same on all ranks
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank + int(skew * 100))
        counter = LoadCounter(1, E, device=device)
        for _ in range(cfg["calib_steps"]):
            counter.add(sample_topk(T, popularity, k, gen).to(device))
        load = counter.reduce().cpu()
        topk = sample_topk(T, popularity, k, gen).to(device)
        x = torch.randn(T, H, generator=gen).to(device, dtype)
        weights = torch.softmax(torch.randn(T, k, generator=gen), dim=-1).to(device)
        placements = {"none": ExpertPlacement.identity(E)}
        planned = {"none": balance_ratio(load, torch.arange(E).unsqueeze(0), world_size).item()}
        for policy in ("reference", "balanced"):
            plan = rebalance_experts(load, P, cfg["groups"], 1, world_size, policy=policy)
            placements[policy] = ExpertPlacement.from_plan(*plan, layer=0)
            planned[policy] = balance_ratio(load, plan[0], world_size).item()
        for policy, placement in placements.items():
            buf = EPBuffer(None, num_experts=placement.num_physical, hidden=H, max_tokens_per_rank=T,
                           backend=cfg["backend"], num_sms=cfg["num_sms"], validate_values=False)
            phys = placement.to_physical(topk, salt=rank)
            recv_x, _, _, recv_counts, handle = buf.dispatch(x, phys, weights)
            sent = routing_layout(phys, placement.num_physical, world_size).num_tokens_per_rank.long()
            stats = torch.tensor([float(recv_counts.sum()), float(recv_x.shape[0]),
                                  float(sent.sum() - sent[rank])], device=device)
            gathered = [torch.zeros_like(stats) for _ in range(world_size)]
            dist.all_gather(gathered, stats)
            per_rank = torch.stack(gathered).cpu()                        # [W, (pairs, recv rows, remote rows)]
            barrier = dist.barrier
            t_dispatch = time_fn(lambda: buf.dispatch(x, phys, weights), warmup=cfg["warmup"], iters=cfg["iters"],
                                 barrier=barrier)["time_us"]
            # A handle from after the timed dispatches (a backend may reuse buffers per call).
            recv_x, _, _, _, handle = buf.dispatch(x, phys, weights)
            y = recv_x  # identity experts: combine moves the same rows back
            t_combine = time_fn(lambda: buf.combine(y, handle), warmup=cfg["warmup"], iters=cfg["iters"],
                                barrier=barrier)["time_us"]
            times = torch.tensor([t_dispatch, t_combine], device=device)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)                  # a collective ends with its slowest rank
            if rank != 0:
                continue
            pairs, recv_rows, remote_rows = per_rank.unbind(1)
            common = {"backend": cfg["backend"], "num_sms": cfg["num_sms"], "policy": policy, "skew": skew,
                      "num_tokens": T, "hidden": H, "topk": k, "num_experts": E,
                      "num_physical": placement.num_physical, "dtype": cfg["dtype"], "world_size": world_size,
                      "max_mean_expert_tokens": (pairs.max() / pairs.mean()).item(),
                      "max_mean_recv_tokens": (recv_rows.max() / recv_rows.mean()).item(),
                      "max_expert_tokens": int(pairs.max()), "max_recv_tokens": int(recv_rows.max()),
                      "planned_max_mean": planned[policy]}
            for op, t in (("dispatch", times[0].item()), ("combine", times[1].item())):
                # Per-GPU average bytes over the slowest rank's time (DESIGN.md §5).
                wire = remote_rows.mean().item() * H * elem
                logical = recv_rows.mean().item() * H * elem
                rows.append(dict(op=op, time_us=t, wire_gbps=wire / t / 1e3, logical_gbps=logical / t / 1e3, **common))
            print(f"skew {skew:.2f} {policy:9s}: max/mean expert tokens {common['max_mean_expert_tokens']:.3f}, "
                  f"recv tokens {common['max_mean_recv_tokens']:.3f}; dispatch {times[0]:.0f} us, "
                  f"combine {times[1]:.0f} us", flush=True)
    return rows if rank == 0 else None


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from overlap.bench import save_figure

    rows = results["rows"]
    skews = sorted({r["skew"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / len(POLICIES)
    colors = dict(zip(POLICIES, ("tab:gray", "tab:blue", "tab:orange")))
    for i, policy in enumerate(POLICIES):
        def val(key, skew, op="dispatch"):
            return next(r[key] for r in rows if r["policy"] == policy and r["skew"] == skew and r["op"] == op)
        xs = [j + i * width for j in range(len(skews))]
        color = colors[policy]
        # Ratio bars start at 1.0 (perfect balance): their height is the imbalance.
        axes[0].bar(xs, [val("max_mean_expert_tokens", s) - 1 for s in skews], width, bottom=1.0, label=policy,
                    color=color)
        axes[1].bar(xs, [val("max_mean_recv_tokens", s) - 1 for s in skews], width, bottom=1.0, label=policy,
                    color=color)
        d = [val("time_us", s, "dispatch") for s in skews]
        c = [val("time_us", s, "combine") for s in skews]
        axes[2].bar(xs, d, width, label=f"{policy}: dispatch", color=color)
        axes[2].bar(xs, c, width, bottom=d, label=f"{policy}: combine (hatched)", color=color, alpha=0.5,
                    hatch="//")
    titles = ("max/mean (token, expert) pairs per GPU", "max/mean received tokens per GPU",
              "dispatch + combine time (us)")
    for ax, title in zip(axes, titles):
        ax.set_xticks([j + width for j in range(len(skews))], [f"zipf {s:g}" for s in skews])
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.35)    # room for the legend above the bars
        ax.legend(fontsize=7, ncol=2)
    m = results["meta"]
    r0 = max(rows, key=lambda r: r["num_physical"])
    fig.suptitle(f"EPLB on {m.get('world_size')} x {m.get('device')} ({r0['backend']} backend): {r0['num_tokens']} "
                 f"tokens/rank, hidden {r0['hidden']}, top-{r0['topk']} of {r0['num_experts']}, "
                 f"{r0['num_physical'] - r0['num_experts']} redundant slots", fontsize=10)
    print(f"wrote {save_figure(fig, path)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default: all GPUs; 4 with --cpu)")
    parser.add_argument("--cpu", action="store_true", help="gloo ranks on the CPU, small sizes")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the JSON")
    parser.add_argument("--fig-dir", default=os.path.join(HERE, "figures"), help="directory for the PNG")
    parser.add_argument("--backend", default="torch", help="EPBuffer backend")
    parser.add_argument("--num-sms", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per rank (4096; 256 with --cpu)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (7168; 512 with --cpu)")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--redundant", type=int, default=16, help="extra physical slots in all")
    parser.add_argument("--skews", default="0.8,1.2", help="comma-separated Zipf exponents")
    parser.add_argument("--calib-steps", type=int, default=4)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (20; 5 with --cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the figure from a results file")
    args = parser.parse_args(argv)

    from overlap.bench import make_meta, read_results, write_results
    from overlap.testing import run_distributed

    if args.plot_only:
        name = os.path.splitext(os.path.basename(args.plot_only))[0]
        plot(read_results(args.plot_only), os.path.join(args.fig_dir, name + ".png"))
        return
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu to run on gloo ranks")
    world = args.world_size or (4 if args.cpu else torch.cuda.device_count())
    if args.cpu:
        defaults = dict(tokens=256, hidden=512, iters=5, dtype="float32", backend_pg="gloo")
    else:
        defaults = dict(tokens=4096, hidden=7168, iters=20, dtype="bfloat16", backend_pg="nccl")
    # Round the slot count up to a multiple of the world size: every rank hosts as many slots.
    redundant = -(-(args.experts + args.redundant) // world) * world - args.experts
    cfg = dict(experts=args.experts, topk=args.topk, groups=args.groups, redundant=redundant,
               skews=[float(s) for s in args.skews.split(",")], calib_steps=args.calib_steps, seed=args.seed,
               backend=args.backend, num_sms=args.num_sms, warmup=3,
               tokens=args.tokens or defaults["tokens"], hidden=args.hidden or defaults["hidden"],
               iters=args.iters or defaults["iters"], dtype=defaults["dtype"], backend_pg=defaults["backend_pg"])
    results = run_distributed(_worker, world, cfg, backend=cfg["backend_pg"], timeout_s=1800)
    rows = results[0]
    tag = f"eplb_zipf{'_cpu' if args.cpu else ''}_ws{world}"
    meta = make_meta("eplb_zipf", world, command=" ".join(["python"] + sys.argv), **{k: v for k, v in cfg.items()
                                                                                        if k != "skews"})
    meta["skews"] = ",".join(str(s) for s in cfg["skews"])
    path = write_results(os.path.join(args.out, tag + ".json"), meta, rows)
    print(f"wrote {path}")
    plot(read_results(path), os.path.join(args.fig_dir, tag + ".png"))


if __name__ == "__main__":
    main()
