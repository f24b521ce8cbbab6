"""Where a `cuda` dispatch or combine kernel spends its time, from its phase stamps.

With ``OVERLAP_CUDA_STAMPS=1`` every warp of the intranode kernels records %globaltimer values
(csrc/kernels/intranode.cuh, ``StampWord``); :meth:`CudaBackend.last_phase_stamps` returns them
as ``[blocks, warps, 10]`` (stamps saved by older kernels have the first 8 words).
:func:`summarize` turns one kernel's stamps into phase times in microseconds, so a researcher can
tell whether senders, receivers, the ready handshake or the tail bound the kernel without
hardware counters. %globaltimer ticks coarsely (about 1 us on some GPUs): single intervals are
rounded, sums over many waits are unbiased.
"""
from __future__ import annotations

from statistics import median

import torch

START, READY, FIRST_ROW, ROLE_DONE, WAIT_NS, ROWS, ROLE, END, HELP_ROWS, HELP_DONE = range(10)
SENDER, RECEIVER = 0, 1


def summarize(stamps: torch.Tensor) -> dict[str, float]:
    """Phase times (us) of one kernel from its ``[blocks, warps, words]`` int64 stamps (10 words, or 8).

    - ``total_us``: first warp's start to the last block's end (the kernel on this GPU);
    - ``launch_skew_us``: spread of the warps' start times (blocks scheduled late);
    - ``handshake_us``: median over warps of start to ready (waiting for every peer to start);
    - ``after_ready_us``: the median warp's ready to the last block's end: the kernel without its
      wait for the peers' kernels to start, which in eager calls is mostly the ranks' launch skew;
    - per role (``send_``/``recv_``): ``busy_us`` median and ``busy_max_us`` of ready to the
      role's last row, ``first_row_us`` median of ready to its first row, ``wait_share`` the
      fraction of busy time spent waiting (receivers: for flags; senders: in fences), ``rows``;
    - ``help_rows`` / ``help_busy_us`` (kernels with 10 stamp words): rows the senders
      received (dispatch) or tokens they reduced (combine) after their last send, and the
      median time that took; they count in ``recv_rows``;
    - ``tail_us``: the last role (or help) to finish to the last block's end.
    """
    if stamps.dim() != 3 or stamps.shape[-1] < 8:
        raise ValueError(f"stamps must be [blocks, warps, >= 8 words], got shape {tuple(stamps.shape)}")
    s = stamps.reshape(-1, stamps.shape[-1]).tolist()
    s = [w for w in s if w[START] > 0 and w[READY] >= w[START]]
    if not s:
        raise ValueError("no warp recorded its stamps (phase stamps off, or the kernel failed early)")
    t0 = min(w[START] for w in s)
    end = max(w[END] for w in s)
    out = {"total_us": (end - t0) / 1e3,
           "launch_skew_us": (max(w[START] for w in s) - t0) / 1e3,
           "handshake_us": median((w[READY] - w[START]) / 1e3 for w in s),
           "after_ready_us": (end - median(w[READY] for w in s)) / 1e3}
    last_done = t0
    for role, name in ((SENDER, "send"), (RECEIVER, "recv")):
        ws = [w for w in s if w[ROLE] == role and w[ROLE_DONE] >= w[READY]]
        if not ws:
            continue
        busy = [(w[ROLE_DONE] - w[READY]) / 1e3 for w in ws]
        first = [(w[FIRST_ROW] - w[READY]) / 1e3 for w in ws if w[ROWS] > 0 and w[FIRST_ROW] >= w[READY]]
        busy_ns = sum(w[ROLE_DONE] - w[READY] for w in ws)
        out.update({f"{name}_busy_us": median(busy), f"{name}_busy_max_us": max(busy),
                    f"{name}_first_row_us": median(first) if first else 0.0,
                    f"{name}_wait_share": sum(w[WAIT_NS] for w in ws) / busy_ns if busy_ns else 0.0,
                    f"{name}_rows": float(sum(w[ROWS] for w in ws))})
        last_done = max(last_done, max(w[ROLE_DONE] for w in ws))
    if stamps.shape[-1] > HELP_DONE:
        helpers = [w for w in s if w[ROLE] == SENDER and w[HELP_ROWS] > 0 and w[HELP_DONE] >= w[ROLE_DONE]]
        help_rows = float(sum(w[HELP_ROWS] for w in helpers))
        out["help_rows"] = help_rows
        out["help_busy_us"] = median((w[HELP_DONE] - w[ROLE_DONE]) / 1e3 for w in helpers) if helpers else 0.0
        if "recv_rows" in out:
            out["recv_rows"] += help_rows
        if helpers:
            last_done = max(last_done, max(w[HELP_DONE] for w in helpers))
    out["tail_us"] = (end - last_done) / 1e3
    return out


def median_summary(summaries: list[dict[str, float]]) -> dict[str, float]:
    """Per-key median of several :func:`summarize` results (keys present in all of them)."""
    if not summaries:
        raise ValueError("no summaries to combine")
    keys = set(summaries[0]).intersection(*summaries[1:])
    return {k: median(s[k] for s in summaries) for k in sorted(keys)}
