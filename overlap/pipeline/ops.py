"""The op vocabulary every schedule, the executor's trace and the simulator share.

One op is one compute chunk on one rank:

========================  =====================================================
label                     meaning
========================  =====================================================
``F{d}.{m}``              forward of micro-batch ``m`` through local module ``d``
``B{d}.{m}``              full backward (input and weight gradients)
``b{d}.{m}``              backward whose weight gradients are deferred to a ``W``
``W``                     the oldest deferred weight-gradient chunk (FIFO)
``[F{d}.{m}&B{e}.{n}]``   a forward and a full backward run through the overlap hook
========================  =====================================================

``d`` is the local module index, which is also the direction of the stage: 0 for the
direction that starts at rank 0 (for DualPipeV, the way down the V), 1 for the other one.
``m`` counts micro-batches from 0 within that direction.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

FORWARD = "F"
BACKWARD = "B"          # full backward: input and weight gradients
BACKWARD_INPUT = "b"    # input gradients only, weight gradients deferred to a W
WEIGHT = "W"
PAIR = "FB"             # forward & full backward through the overlap hook

KINDS = (FORWARD, BACKWARD, BACKWARD_INPUT, WEIGHT, PAIR)


@dataclass(frozen=True)
class Op:
    """One compute chunk. Build with :func:`F`, :func:`B`, :func:`b`, :func:`W`, :func:`FB`."""

    kind: str
    d: Optional[int] = None
    m: Optional[int] = None
    d1: Optional[int] = None   # backward half of a PAIR
    m1: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == WEIGHT:
            if (self.d, self.m, self.d1, self.m1) != (None, None, None, None):
                raise ValueError("a W op carries no module or micro-batch index")
            return
        for name in ("d", "m") + (("d1", "m1") if self.kind == PAIR else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{self.kind} op needs a non-negative int {name}, got {value!r}")

    @property
    def is_forward(self) -> bool:
        """Runs a forward (alone or as the first half of a pair)."""
        return self.kind in (FORWARD, PAIR)

    @property
    def is_backward(self) -> bool:
        """Runs a backward of any sort (alone or as the second half of a pair)."""
        return self.kind in (BACKWARD, BACKWARD_INPUT, PAIR)

    def forward_part(self) -> "Op":
        """The forward this op runs, as a plain F op."""
        if not self.is_forward:
            raise ValueError(f"{self} has no forward part")
        return Op(FORWARD, self.d, self.m)

    def backward_part(self) -> "Op":
        """The backward this op runs, as a B or b op."""
        if self.kind == PAIR:
            return Op(BACKWARD, self.d1, self.m1)
        if self.kind in (BACKWARD, BACKWARD_INPUT):
            return self
        raise ValueError(f"{self} has no backward part")

    def __str__(self) -> str:
        if self.kind == WEIGHT:
            return "W"
        if self.kind == PAIR:
            return f"[F{self.d}.{self.m}&B{self.d1}.{self.m1}]"
        return f"{self.kind}{self.d}.{self.m}"


def F(d: int, m: int) -> Op:
    return Op(FORWARD, d, m)


def B(d: int, m: int) -> Op:
    return Op(BACKWARD, d, m)


def b(d: int, m: int) -> Op:
    return Op(BACKWARD_INPUT, d, m)


def W() -> Op:
    return Op(WEIGHT)


def FB(d: int, m: int, d1: int, m1: int) -> Op:
    return Op(PAIR, d, m, d1, m1)


_SINGLE = re.compile(r"^([FBb])(\d+)\.(\d+)$")
_PAIR = re.compile(r"^\[F(\d+)\.(\d+)&B(\d+)\.(\d+)\]$")


def parse_op(label: str) -> Op:
    """Inverse of ``str(op)``: ``parse_op("[F0.3&B1.2]") == FB(0, 3, 1, 2)``."""
    if not isinstance(label, str):
        raise TypeError(f"label must be a str, got {type(label).__name__}")
    if label == "W":
        return W()
    match = _SINGLE.match(label)
    if match:
        return Op(match.group(1), int(match.group(2)), int(match.group(3)))
    match = _PAIR.match(label)
    if match:
        return FB(*(int(g) for g in match.groups()))
    raise ValueError(f"label {label!r} is not an op (expected F0.1, B0.1, b0.1, W or [F0.1&B1.0])")


def parse_trace(labels) -> list[Op]:
    """Parse a recorded trace (a list of labels) into ops."""
    return [parse_op(label) for label in labels]


def format_trace(ops) -> list[str]:
    """Labels of a sequence of ops, the format the executor records."""
    return [str(op) for op in ops]
