"""overlap.ep.kernel_stamps: phase times from synthetic stamps (the GPU side is exercised by
experiments/kernel_phases.py and tests/test_ep_kernel_backends.py)."""
import pytest
import torch

from overlap.ep.kernel_stamps import median_summary, summarize


def _warp(start, ready, first, done, wait_ns, rows, role, end):
    return [start, ready, first, done, wait_ns, rows, role, end]


def test_summarize_phases():
    base = 1_000_000
    us = 1000
    # One block, two warps: a sender busy 10 us with 2 us of fences, a receiver busy 14 us
    # waiting 7 us; the block ends 1 us after the receiver.
    stamps = torch.tensor([[
        _warp(base, base + 3 * us, base + 5 * us, base + 13 * us, 2 * us, 8, 0, base + 18 * us),
        _warp(base + 1 * us, base + 3 * us, base + 6 * us, base + 17 * us, 7 * us, 4, 1, base + 18 * us),
    ]], dtype=torch.int64)
    s = summarize(stamps)
    assert s["total_us"] == pytest.approx(18)
    assert s["launch_skew_us"] == pytest.approx(1)
    assert s["handshake_us"] == pytest.approx(2.5)
    assert s["after_ready_us"] == pytest.approx(15)
    assert s["send_busy_us"] == pytest.approx(10) and s["send_wait_share"] == pytest.approx(0.2)
    assert s["recv_busy_us"] == pytest.approx(14) and s["recv_wait_share"] == pytest.approx(0.5)
    assert s["send_first_row_us"] == pytest.approx(2) and s["recv_first_row_us"] == pytest.approx(3)
    assert s["send_rows"] == 8 and s["recv_rows"] == 4
    assert s["tail_us"] == pytest.approx(1)
    m = median_summary([s, dict(s, total_us=20.0), dict(s, total_us=30.0)])
    assert m["total_us"] == pytest.approx(20)


def test_summarize_counts_sender_help():
    """A sender that joins the receivers after its last send: its rows count as received, and
    the help's end (not the role's) sets the tail."""
    base, us = 1_000_000, 1000
    sender = _warp(base, base + 1 * us, base + 2 * us, base + 10 * us, 0, 8, 0, base + 16 * us) + [3, base + 15 * us]
    receiver = _warp(base, base + 1 * us, base + 3 * us, base + 12 * us, 0, 5, 1, base + 16 * us) + [0, 0]
    s = summarize(torch.tensor([[sender, receiver]], dtype=torch.int64))
    assert s["send_rows"] == 8 and s["recv_rows"] == 8 and s["help_rows"] == 3
    assert s["help_busy_us"] == pytest.approx(5) and s["tail_us"] == pytest.approx(1)


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="stamps must be"):
        summarize(torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="no warp recorded"):
        summarize(torch.zeros(1, 2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="no summaries"):
        median_summary([])


def test_stamp_words_are_the_kernels():
    """The word indices summarize() reads are csrc/kernels/intranode.cuh's StampWord."""
    import pathlib
    import re

    from overlap.ep import kernel_stamps as ks

    header = (pathlib.Path(__file__).resolve().parents[1] / "csrc/kernels/intranode.cuh").read_text()
    cuda = {name: int(v) for name, v in re.findall(r"kStamp(\w+) = (\d+)", header)}
    ours = {"Start": ks.START, "Ready": ks.READY, "FirstRow": ks.FIRST_ROW, "RoleDone": ks.ROLE_DONE,
            "WaitNs": ks.WAIT_NS, "Rows": ks.ROWS, "Role": ks.ROLE, "End": ks.END, "HelpRows": ks.HELP_ROWS,
            "HelpDone": ks.HELP_DONE}
    assert {k: cuda[k] for k in ours} == ours
    assert cuda["Words"] == len(ours)

