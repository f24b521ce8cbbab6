"""Schedule pictures: one row per rank, one box per compute chunk, in the style of the
DualPipe README figures (a pair that ran through the overlap hook gets a black border).

Works on any :class:`~overlap.pipeline.simulator.Timeline`, simulated or recorded, so a real
run can be drawn beside its simulation::

    save_timelines([simulate(s, d).timeline, Timeline.from_records("recorded", records)], "x.png")
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from overlap.pipeline import ops as O
from overlap.pipeline.simulator import Timeline

# The published figures' colours (forward orange, backward green, weights blue), a lighter
# shade for direction 1.
_FORWARD = ("#f1a33a", "#f8cf8f")
_BACKWARD = ("#58b947", "#a3dc94")
_BACKWARD_INPUT = "#c5e8a6"
_WEIGHT = "#6fb4ea"


def _color(op: O.Op) -> str:
    d = (op.d or 0) % 2
    if op.kind == O.FORWARD:
        return _FORWARD[d]
    if op.kind == O.BACKWARD:
        return _BACKWARD[d]
    if op.kind == O.BACKWARD_INPUT:
        return _BACKWARD_INPUT
    return _WEIGHT


def draw_timeline(timeline: Timeline, ax, title: Optional[str] = None, annotate: bool = True) -> None:
    """Draw ``timeline`` on matplotlib axes ``ax`` (rank 0 on top)."""
    from matplotlib.patches import Rectangle

    span = timeline.makespan or 1.0
    split = _forward_share(timeline)
    for r, intervals in enumerate(timeline.ranks):
        y = timeline.num_ranks - 1 - r
        for iv in intervals:
            op, width = iv.op, iv.end - iv.start
            if op.kind == O.PAIR:
                halves = [(op.forward_part(), iv.start, width * split),
                          (op.backward_part(), iv.start + width * split, width * (1 - split))]
                for part, x, w in halves:
                    ax.add_patch(Rectangle((x, y + 0.1), w, 0.8, facecolor=_color(part),
                                           edgecolor="white", linewidth=0.3))
                    _annotate(ax, annotate, part, x + w / 2, y + 0.5, w, span)
                ax.add_patch(Rectangle((iv.start, y + 0.1), width, 0.8, fill=False, edgecolor="black",
                                       linewidth=1.4))
            else:
                ax.add_patch(Rectangle((iv.start, y + 0.1), width, 0.8, facecolor=_color(op),
                                       edgecolor="white", linewidth=0.3))
                _annotate(ax, annotate, op, iv.start + width / 2, y + 0.5, width, span)
    ax.set_xlim(0, span)
    ax.set_ylim(0, timeline.num_ranks)
    ax.set_yticks([timeline.num_ranks - 1 - r + 0.5 for r in range(timeline.num_ranks)])
    ax.set_yticklabels([f"rank {r}" for r in range(timeline.num_ranks)])
    ax.set_xlabel("time")
    bubbles = timeline.bubbles()
    ax.set_title(f"{title or timeline.name}   step {span:.4g}, max bubble {max(bubbles):.4g}", fontsize=9)


def _forward_share(timeline: Timeline) -> float:
    """Share of a pair's box given to its forward: F / (F + B) from the timeline's own
    unpaired chunks (a pair's halves are not timed separately), else one half."""
    from overlap.pipeline.simulator import Durations

    try:
        d = Durations.from_timeline(timeline)
    except ValueError:
        return 0.5
    has_backward = any(iv.op.kind in (O.BACKWARD, O.BACKWARD_INPUT) for rank in timeline.ranks for iv in rank)
    return d.F / (d.F + d.B) if has_backward else 0.5


def _annotate(ax, annotate: bool, op: O.Op, x: float, y: float, width: float, span: float) -> None:
    if annotate and op.kind != O.WEIGHT and width / span > 0.006:
        ax.text(x, y, str(op.m), ha="center", va="center", fontsize=5)


def _legend(fig) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_FORWARD[0], label="F, direction 0"), Patch(facecolor=_FORWARD[1], label="F, direction 1"),
               Patch(facecolor=_BACKWARD[0], label="B, direction 0"), Patch(facecolor=_BACKWARD[1], label="B, direction 1"),
               Patch(facecolor=_BACKWARD_INPUT, label="b (weights deferred)"), Patch(facecolor=_WEIGHT, label="W"),
               Patch(facecolor="white", edgecolor="black", linewidth=1.4, label="F&B overlapped pair")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)


def save_timelines(timelines: Sequence[Timeline], path: str, titles: Optional[Sequence[str]] = None,
                   width: float = 14.0, annotate: bool = True) -> str:
    """Draw timelines one above the other (each on its own time axis) into PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not timelines:
        raise ValueError("timelines must not be empty")
    if titles is not None and len(titles) != len(timelines):
        raise ValueError(f"{len(titles)} titles for {len(timelines)} timelines")
    heights = [0.35 * t.num_ranks + 0.7 for t in timelines]
    fig, axes = plt.subplots(len(timelines), 1, figsize=(width, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for i, (timeline, ax) in enumerate(zip(timelines, axes[:, 0])):
        draw_timeline(timeline, ax, titles[i] if titles else None, annotate)
    _legend(fig)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
