#!/usr/bin/env python3
"""Simulated schedules: pictures like the DualPipe README's and a bubble/memory table.

    python experiments/pipeline_schedules.py            # figures + results/pipeline_simulated_bubbles.json

Compares the four schedules at the same number of PP stages (1F1B, ZB1P and DualPipe on PP
ranks, DualPipeV on PP/2), with chunk durations in units of a forward: the README's setting
F=1, B=2, W=1, F&B=3 (no overlap gain) and F&B=2.5 (the pair hides a sixth of its work).
Each row gives the simulated step, the largest per-rank bubble, the README's formula for it,
and the peak number of live activations. No GPU involved: the numbers are the schedules'.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlap.bench import make_meta, write_results  # noqa: E402
from overlap.pipeline import (Durations, build_schedule, published_activations, published_bubble,  # noqa: E402
                              simulate)
from overlap.pipeline.draw import save_timelines  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PARAMS_PER_DEVICE = {"1f1b": 1, "zb1p": 1, "dualpipe": 2, "dualpipev": 2}


def ranks_for(name: str, pp: int) -> int:
    return pp // 2 if name == "dualpipev" else pp


def table(pps, chunks, settings) -> list[dict]:
    rows = []
    for fb in settings:
        d = Durations(F=1, B=2, W=1, FB=fb)
        for pp in pps:
            for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
                n = ranks_for(name, pp)
                sched = build_schedule(name, n, chunks)
                sim = simulate(sched, d)
                rows.append({"op": "pipeline_schedule_sim", "backend": "simulator", "schedule": name,
                             "pp_stages": pp, "num_ranks": n, "num_chunks": chunks, "F": d.F, "B": d.B,
                             "W": d.W, "FB": d.pair, "sim_step": sim.makespan, "sim_max_bubble": sim.max_bubble,
                             "sim_min_bubble": min(sim.bubbles),
                             "formula_bubble": published_bubble(name, pp, d),
                             "peak_activations": max(sim.peak_activations),
                             "formula_activations": published_activations(name, pp),
                             "params_per_device": PARAMS_PER_DEVICE[name]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "pipeline_simulated_bubbles.json"))
    parser.add_argument("--figures", default=os.path.join(HERE, "figures"))
    parser.add_argument("--pp", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--chunks", type=int, default=32, help="micro-batches per step in the table")
    args = parser.parse_args(argv)

    rows = table(args.pp, args.chunks, settings=(3.0, 2.5))
    meta = make_meta("pipeline_simulated_bubbles", 0, simulated=True,
                     note="world_size 0: simulated, no ranks; durations in units of one forward chunk")
    write_results(args.out, meta, rows)
    print(f"{'schedule':<10} {'PP':>3} {'ranks':>5} {'F&B':>4} {'step':>7} {'bubble':>7} {'formula':>7} "
          f"{'act':>4} {'formula':>7}")
    for r in rows:
        print(f"{r['schedule']:<10} {r['pp_stages']:>3} {r['num_ranks']:>5} {r['FB']:>4} {r['sim_step']:>7.1f} "
              f"{r['sim_max_bubble']:>7.1f} {r['formula_bubble']:>7.1f} {r['peak_activations']:>4} "
              f"{r['formula_activations']:>7}")
    print(f"wrote {args.out}")

    published = Durations(F=1, B=2, W=1, FB=3)
    figures = {
        # The README's two examples.
        "pipeline_dualpipe.png": [("dualpipe", 8, 20, "DualPipe, 8 ranks, 20 micro-batches (README example)")],
        "pipeline_dualpipev.png": [("dualpipev", 4, 10, "DualPipeV, 4 ranks (8 stages), 10 micro-batches "
                                                        "(README example)")],
        # All four at 8 PP stages and 20 micro-batches.
        "pipeline_schedules.png": [("1f1b", 8, 20, "1F1B, 8 stages"), ("zb1p", 8, 20, "ZB1P, 8 stages"),
                                   ("dualpipe", 8, 20, "DualPipe, 8 stages"),
                                   ("dualpipev", 4, 20, "DualPipeV, 8 stages on 4 ranks")],
    }
    for filename, panels in figures.items():
        timelines = [simulate(build_schedule(name, n, c), published).timeline for name, n, c, _ in panels]
        path = save_timelines(timelines, os.path.join(args.figures, filename),
                              titles=[f"{t}; F=1 B=2 W=1 F&B=3" for *_, t in panels])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
