"""Take a schedule apart for timing: its computation alone and its communication alone.

:class:`RecordingComm` wraps a real comm and remembers every call and its result.
:class:`ReplayComm` then serves those results again without transferring anything, so the
same schedule runs its computation only; :func:`replay_transfers` issues the recorded
transfers again back to back, with no computation: its communication only. The overlapped
F&B time is then compared with ``max(compute only, communication only)``.
Replaying is valid while the inputs (hence the routing and every shape) stay the same.
"""
from __future__ import annotations

from typing import Any, List, Tuple

from overlap.moe.comm import Pending

OPS = ("dispatch_forward", "combine_forward", "combine_backward", "dispatch_backward")


class RecordingComm:
    """Forward every call to ``comm`` and record ``(op, args, pending)`` in call order."""

    def __init__(self, comm):
        self.comm = comm
        self.calls: List[Tuple[str, tuple, Any]] = []

    def _call(self, op: str, *args):
        pending = getattr(self.comm, op)(*args)
        self.calls.append((op, args, pending))
        return pending

    def dispatch_forward(self, *args):
        return self._call("dispatch_forward", *args)

    def combine_forward(self, *args):
        return self._call("combine_forward", *args)

    def combine_backward(self, *args):
        return self._call("combine_backward", *args)

    def dispatch_backward(self, *args):
        return self._call("dispatch_backward", *args)


class ReplayComm:
    """Serve recorded results in the recorded order (cycling), transferring nothing.

    The i-th call must be the same op as the i-th recorded one; anything else means the
    schedule changed and raises RuntimeError.
    """

    def __init__(self, calls: List[Tuple[str, tuple, Any]]):
        if not calls:
            raise ValueError("calls is empty: record a run with RecordingComm first")
        self.results = [(op, pending.wait()) for op, _, pending in calls]
        self.i = 0

    def _call(self, op: str):
        want, value = self.results[self.i % len(self.results)]
        if want != op:
            raise RuntimeError(f"replayed call {self.i} is {op}, but the recording has {want} there")
        self.i += 1
        return Pending.ready(value)

    def dispatch_forward(self, *args):
        return self._call("dispatch_forward")

    def combine_forward(self, *args):
        return self._call("combine_forward")

    def combine_backward(self, *args):
        return self._call("combine_backward")

    def dispatch_backward(self, *args):
        return self._call("dispatch_backward")


def replay_transfers(comm, calls: List[Tuple[str, tuple, Any]]) -> None:
    """Issue the recorded transfers on ``comm`` again, all at once, then wait for them all."""
    pending = [getattr(comm, op)(*args) for op, args, _ in calls]
    for p in pending:
        p.wait()
