"""Timeline PNG of an analysed trace: a simplified Perfetto view.

One lane per stream (GPU) or thread (CPU), comm and compute in two colours, plus one lane per
device showing the exposed communication (comm with no compute running on that device).
Drawn with matplotlib's object API on an Agg canvas, so it neither needs a display nor changes
the caller's pyplot backend.
"""
from __future__ import annotations

import os
from typing import Sequence

from overlap.profiling.analyze import TraceAnalysis, kernel_label
from overlap.profiling.classify import COMM, COMPUTE

COLOURS = {COMM: "#d62728", COMPUTE: "#1f77b4", "exposed": "#111111"}


def plot_timeline(analysis: TraceAnalysis, out_path: str, *, title: str | None = None,
                  window_us: Sequence[float] | None = None, width: float = 16.0, dpi: int = 130,
                  label_min_share: float = 0.02) -> str:
    """Draw ``analysis`` to ``out_path`` (PNG) and return the path.

    ``window_us`` = (start, end) in microseconds relative to the first event limits the x-axis;
    bars wider than ``label_min_share`` of the window carry the kernel's short name.
    """
    if not isinstance(analysis, TraceAnalysis):
        raise TypeError(f"analysis must be a TraceAnalysis, got {type(analysis).__name__}")
    if window_us is not None and (len(window_us) != 2 or window_us[1] <= window_us[0]):
        raise ValueError(f"window_us must be (start, end) with end > start, got {window_us!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    t0 = analysis.start_us
    lanes = []  # (label, [(interval list, colour)])
    for dev in analysis.devices:
        for s in analysis.streams:
            if s.device != dev.device:
                continue
            comm_u, comp_u = analysis.lane_intervals[(s.device, s.stream)]
            label = f"{s.device} {s.label}" if len(analysis.devices) > 1 else s.label
            if s.busy_us > 0:
                label += f" ({'comm' if s.comm_us >= s.compute_us else 'compute'})"
            lanes.append((label, [(comp_u, COLOURS[COMPUTE]), (comm_u, COLOURS[COMM])], (s.device, s.stream)))
        if dev.comm_us > 0:
            prefix = f"{dev.device} " if len(analysis.devices) > 1 else ""
            lanes.append((prefix + "exposed comm", [(analysis.exposed_intervals[dev.device], COLOURS["exposed"])], None))

    end_all = max((e.end for e, _ in analysis.classified), default=t0) - t0
    lo, hi = (0.0, end_all) if window_us is None else (float(window_us[0]), float(window_us[1]))
    span = max(hi - lo, 1e-9)
    # Milliseconds read best for traces longer than a few ms.
    scale, unit = (1e3, "ms") if span >= 2e3 else (1.0, "us")

    fig = Figure(figsize=(width, 1.4 + 0.5 * len(lanes)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    axes_width_pt = 0.82 * width * 72  # the lane labels take the rest
    n = len(lanes)
    for i, (label, layers, lane_key) in enumerate(lanes):
        y = n - 1 - i
        for u, colour in layers:
            bars = [((s - t0) / scale, (e - s) / scale) for s, e in u if e - t0 > lo and s - t0 < hi]
            if bars:
                ax.broken_barh(bars, (y - 0.38, 0.76), facecolors=colour, edgecolor="none")
        if lane_key is None:
            continue
        for e, _ in analysis.classified:
            if e.lane != lane_key or e.dur < label_min_share * span:
                continue
            a, b = max(e.ts - t0, lo), min(e.end - t0, hi)
            text = kernel_label(e.name)
            # Label only bars the text fits in (about 0.5 em per character at 6 pt).
            if b > a and (b - a) / span * axes_width_pt > 0.5 * 6 * len(text):
                ax.text((a + b) / 2 / scale, y, text, ha="center", va="center", fontsize=6, color="white",
                        clip_on=True)
    ax.set_yticks(range(n))
    ax.set_yticklabels([lanes[n - 1 - y][0] for y in range(n)], fontsize=8)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(lo / scale, hi / scale)
    ax.set_xlabel(f"time since first event ({unit})")
    ax.grid(axis="x", alpha=0.3)
    if title is None:
        title = os.path.basename(analysis.source) if analysis.source else "trace"
        share = analysis.overlap_share
        if share is not None:
            exposed = analysis.exposed_us
            span_dev = max(d.span_us for d in analysis.devices)
            title += (f": comm {analysis.comm_us / 1e3:.2f} ms, {100 * share:.1f}% overlapped by compute, "
                      f"exposed {exposed / 1e3:.2f} ms ({100 * exposed / span_dev:.1f}% of span)")
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles=[Patch(color=COLOURS[COMPUTE], label="compute"), Patch(color=COLOURS[COMM], label="communication"),
                        Patch(color=COLOURS["exposed"], label="exposed communication (no compute running)")],
               loc="lower right", fontsize=8, ncol=3, frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
    fig.savefig(out_path)
    return out_path
