"""Overlap analysis of a PyTorch-profiler trace; by default DeepSeek's published training trace.

    python experiments/analyze_trace.py

reads ``../shared/data/deepseek_v3_train_ep64_trace.json`` (beside the repository) and writes
``experiments/results/trace_deepseek_v3_train_ep64.json`` and
``experiments/figures/trace_deepseek_v3_train_ep64.png``. Any other trace:

    python experiments/analyze_trace.py TRACE --name NAME [--note TEXT] [analyzer options]

writes ``trace_NAME.json`` / ``trace_NAME.png`` in the same folders. Unknown options go to
``python -m overlap.profiling.analyze`` (``--sms``, ``--comm REGEX``, ``--compute REGEX``, ...).
"""
from __future__ import annotations

import argparse
import os
import sys

from overlap.profiling.analyze import main as analyze_main

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEEPSEEK_TRACE = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "deepseek_v3_train_ep64_trace.json"))
DEEPSEEK_NOTE = ("DeepSeek's public PyTorch-profiler trace, not produced by this project: one DualPipe "
                 "forward/backward chunk pair of DeepSeek-V3 training (4 MoE layers), EP64 on H800 GPUs, "
                 "rank 0 only. Analysed on CPU; meta.device is the analysing machine, trace_* the traced one.")


def run(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", nargs="?", default=DEEPSEEK_TRACE)
    p.add_argument("--name", default=None, help="output stem (default: deepseek_v3_train_ep64 for the default trace)")
    p.add_argument("--note", default=None)
    args, rest = p.parse_known_args(argv)
    default_trace = os.path.abspath(args.trace) == DEEPSEEK_TRACE
    if not os.path.exists(args.trace):
        raise SystemExit(f"trace not found: {args.trace}")
    name = args.name or ("deepseek_v3_train_ep64" if default_trace else
                         os.path.basename(args.trace).split(".")[0])
    note = args.note or (DEEPSEEK_NOTE if default_trace else None)
    out = [args.trace,
           "--json", os.path.join(HERE, "results", f"trace_{name}.json"),
           "--png", os.path.join(HERE, "figures", f"trace_{name}.png")]
    if note:
        out += ["--note", note]
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python experiments/analyze_trace.py"] + list(given))
    return analyze_main(out + rest, command=command)


if __name__ == "__main__":
    run()
