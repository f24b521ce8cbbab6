"""Point-to-point traffic of a pipeline step: what crosses ranks, in which order, and how.

Every stage boundary that crosses ranks carries one activation message per micro-batch
forward and one gradient message back. :func:`transfer_plan` puts all of them in one order
that every rank agrees on: by the time the producing chunk ends in a simulated run of the
schedule, ties broken by a fixed key. Each rank posts its own messages in that order
(:class:`Mailbox`): a receive when a chunk needs it (or earlier), a send as soon as its chunk
has run. Why this cannot deadlock, even where NCCL serialises a rank's p2p on one stream:
a message comes before another only if its producer ended no later, so whenever a rank must
post message X, every earlier message of its own has been produced; and the earliest
unfinished message is at the head of both its ranks' queues.

Sends are never waited for before the next compute chunk; they are reaped (and a sent
activation's storage released) once complete, and all are waited for at the end of a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from overlap.pipeline.schedules import Schedule
from overlap.pipeline.simulator import Durations, simulate_timeline

# Module-level defaults, as in deepseek-ai/DualPipe; a pipeline's own
# set_p2p_tensor_shapes / set_p2p_tensor_dtype take precedence over them.
TENSOR_SHAPES: Optional[list] = None
TENSOR_DTYPE = None


def _check_shapes(shapes) -> list:
    if isinstance(shapes, (tuple, list)) and shapes and all(isinstance(s, int) for s in shapes):
        raise TypeError(f"shapes must be a list of shapes (one per tensor), e.g. [{tuple(shapes)}], got {shapes!r}")
    if not isinstance(shapes, (tuple, list)) or not shapes:
        raise TypeError(f"shapes must be a non-empty list of shapes, got {shapes!r}")
    out = []
    for s in shapes:
        if not isinstance(s, (tuple, list, torch.Size)) or not all(isinstance(v, int) and v >= 0 for v in s):
            raise TypeError(f"each shape must be a tuple of non-negative ints, got {s!r}")
        out.append(tuple(s))
    return out


def _check_dtype(dtype):
    items = dtype if isinstance(dtype, (tuple, list)) else [dtype]
    if not items or not all(isinstance(d, torch.dtype) for d in items):
        raise TypeError(f"dtype must be a torch.dtype (or a list of them, one per tensor), got {dtype!r}")
    return list(dtype) if isinstance(dtype, (tuple, list)) else dtype


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """Default shapes of the tensors one micro-batch sends across a stage boundary."""
    global TENSOR_SHAPES
    TENSOR_SHAPES = _check_shapes(shapes)


def set_p2p_tensor_dtype(dtype) -> None:
    """Default dtype of those tensors (one dtype, or a list with one per tensor)."""
    global TENSOR_DTYPE
    TENSOR_DTYPE = _check_dtype(dtype)


@dataclass(frozen=True)
class P2PSpec:
    """Shapes and dtypes of one micro-batch's boundary tensors."""

    shapes: tuple
    dtypes: tuple

    @classmethod
    def resolve(cls, shapes, dtype) -> "P2PSpec":
        shapes = shapes if shapes is not None else TENSOR_SHAPES
        dtype = dtype if dtype is not None else TENSOR_DTYPE
        if shapes is None or dtype is None:
            raise RuntimeError("this pipeline sends tensors between ranks: call set_p2p_tensor_shapes and "
                               "set_p2p_tensor_dtype (module-level or on the pipeline) before step()")
        dtypes = list(dtype) if isinstance(dtype, (tuple, list)) else [dtype] * len(shapes)
        if len(dtypes) != len(shapes):
            raise ValueError(f"{len(dtypes)} p2p dtypes for {len(shapes)} p2p shapes")
        return cls(tuple(tuple(s) for s in shapes), tuple(dtypes))

    def check(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Raise ValueError unless ``tensors`` match the declared shapes and dtypes."""
        if len(tensors) != len(self.shapes):
            raise ValueError(f"{what}: {len(tensors)} tensors, but set_p2p_tensor_shapes declared {len(self.shapes)}")
        for i, (t, shape, dtype) in enumerate(zip(tensors, self.shapes, self.dtypes)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{what}: tensor {i} is {type(t).__name__}, not a tensor")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{what}: tensor {i} is {tuple(t.shape)} {t.dtype}, but the p2p "
                                 f"shapes/dtype declare {shape} {dtype}")

    def empty(self, device) -> list[torch.Tensor]:
        return [torch.empty(s, dtype=d, device=device) for s, d in zip(self.shapes, self.dtypes)]


ACTIVATION, GRADIENT = "act", "grad"


@dataclass(frozen=True)
class Transfer:
    """One message: ``kind`` of micro-batch ``m`` leaving stage ``stage`` of ``chain``."""

    kind: str
    chain: int
    stage: int
    m: int
    src: int      # pipeline ranks
    dst: int

    @property
    def key(self) -> tuple:
        return (self.kind, self.chain, self.stage, self.m)


# Integer durations keep the plan exact; any positive durations give a deadlock-free order.
def transfer_plan(schedule: Schedule, forward_only: bool) -> list[Transfer]:
    """All cross-rank messages of one step, in the one order every rank posts them in."""
    timeline = simulate_timeline(schedule, Durations(F=1, B=2, W=1, FB=3))
    keyed = []
    for rank, intervals in enumerate(timeline.ranks):
        for iv in intervals:
            op = iv.op
            if op.is_forward:
                chain, j = schedule.locate(rank, op.d)
                if j + 1 < schedule.num_stages_of(chain):
                    dst = schedule.stage(chain, j + 1)[0]
                    if dst != rank:
                        keyed.append((iv.end, Transfer(ACTIVATION, chain, j, op.m, rank, dst)))
            if op.is_backward and not forward_only:
                part = op.backward_part()
                chain, j = schedule.locate(rank, part.d)
                if j > 0:
                    dst = schedule.stage(chain, j - 1)[0]
                    if dst != rank:
                        keyed.append((iv.end, Transfer(GRADIENT, chain, j, part.m, rank, dst)))
    keyed.sort(key=lambda item: (item[0], item[1].key))
    return [t for _, t in keyed]


class Mailbox:
    """One rank's side of the plan: posts its messages in plan order, never waits on a send."""

    def __init__(self, plan: Sequence[Transfer], rank: int, spec: Optional[P2PSpec], device,
                 group, global_rank_of) -> None:
        self._mine = [t for t in plan if rank in (t.src, t.dst)]
        self._index = {t.key: i for i, t in enumerate(self._mine)}
        self._rank = rank
        self._spec = spec
        self._device = device
        self._group = group
        self._global_rank_of = global_rank_of
        self._next = 0
        self._outbox: dict[tuple, tuple[list, list]] = {}   # key -> (wire tensors, to release)
        self._inbox: dict[tuple, tuple[list, list[torch.Tensor]]] = {}
        self._in_flight: list[tuple[list, list, list]] = []  # (works, wire tensors, to release)

    def send(self, key: tuple, tensors: Sequence[torch.Tensor], release: bool, what: str) -> None:
        """Send the tensors of message ``key`` (after the earlier messages of the plan).

        ``release``: drop the tensors' storage once the send completes (autograd keeps the
        graph; the data itself is no longer needed).
        """
        self._spec.check(tensors, what)
        wire = [t.detach() if t.is_contiguous() else t.detach().contiguous() for t in tensors]
        self._outbox[key] = (wire, list(tensors) if release else [])
        self._post_through(key)

    def receive(self, key: tuple) -> list[torch.Tensor]:
        """Tensors of message ``key``, waited for (for NCCL: the current stream waits)."""
        self._post_through(key)
        works, tensors = self._inbox.pop(key)
        for work in works:
            work.wait()
        return tensors

    def reap(self, block: bool = False) -> None:
        """Forget completed sends, releasing storage where asked; with ``block``, all of them."""
        still = []
        for works, wire, to_release in self._in_flight:
            if block:
                for work in works:
                    work.wait()
            elif not all(work.is_completed() for work in works):
                still.append((works, wire, to_release))
                continue
            for t in to_release:
                if t._base is None and t.numel():
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self._in_flight = still

    def advance(self) -> None:
        """Post every message that can go now: receives, and sends already produced, up to the
        first send still waiting for its chunk. Receives posted early arrive sooner."""
        while self._next < len(self._mine):
            t = self._mine[self._next]
            if t.src == self._rank and t.key not in self._outbox:
                return
            self._post_through(t.key)

    def check_drained(self) -> None:
        if self._next != len(self._mine) or self._inbox or self._outbox:
            raise RuntimeError(f"pipeline rank {self._rank}: {len(self._mine) - self._next} messages never posted, "
                               f"{len(self._inbox)} never consumed")

    def _post_through(self, key: tuple) -> None:
        try:
            last = self._index[key]
        except KeyError:
            raise RuntimeError(f"pipeline rank {self._rank}: message {key} is not in the plan") from None
        while self._next <= last:
            t = self._mine[self._next]
            if t.src == self._rank:
                try:
                    wire, to_release = self._outbox.pop(t.key)
                except KeyError:
                    raise RuntimeError(f"pipeline rank {self._rank}: message {t.key} must be sent before "
                                       f"{key} but has not been produced (schedule and plan disagree)") from None
                peer = self._global_rank_of(t.dst)
                works = [dist.isend(x, dst=peer, group=self._group) for x in wire]
                self._in_flight.append((works, wire, to_release))
            else:
                tensors = self._spec.empty(self._device)
                peer = self._global_rank_of(t.src)
                works = [dist.irecv(x, src=peer, group=self._group) for x in tensors]
                self._inbox[t.key] = (works, tensors)
            self._next += 1
