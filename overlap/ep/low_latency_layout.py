"""Byte layout of the low-latency (decode) symmetric buffer; pure Python, mirrors csrc/kernels/ll.cuh.

Every rank's buffer is ``[signals | dispatch slots x K | combine slots x K]``. A slot holds one
region per source rank; a region is a 16-byte header (row count) and ``max_tokens`` rows. The
staging buffer of the copy-engine and NCCL transports has the same slot layout without the
signal prefix (region ``d`` of a staging slot is what goes to rank ``d``).
"""
from __future__ import annotations

from dataclasses import dataclass

DISPATCH, COMBINE = 0, 1
KIND_NAMES = {DISPATCH: "dispatch", COMBINE: "combine"}
FP8_BLOCK = 128
REGION_HEADER = 16
MAX_TOPK = 16           # ll.cuh kMaxTopk: headers are sized for it, so any topk <= 16 fits
SLOT_ALIGN = 4096


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


MAX_LOCAL_EXPERTS = 32767   # ll.cuh kMaxLocalExperts: a row header names its local expert in an int16


def header_bytes(topk: int) -> int:
    """Bytes of a dispatch row's header: topk int16 local experts, 16-aligned, then topk fp32
    weights, 16-aligned (the receive hook scans only the experts of every row)."""
    return align(topk * 2, 16) + align(topk * 4, 16)


def dispatch_row_stride(hidden: int, topk: int, fp8: bool) -> int:
    payload = hidden + hidden // FP8_BLOCK * 4 if fp8 else hidden * 2
    return align(header_bytes(topk) + payload, 16)


def combine_row_stride(hidden: int) -> int:
    return align(hidden * 2, 16)


def region_stride(max_tokens: int, row_stride: int) -> int:
    return align(REGION_HEADER + max_tokens * row_stride, 16)


@dataclass(frozen=True)
class LowLatencyLayout:
    """Offsets of the receive slots; ``signal_bytes`` comes from the compiled kernels (ll_layout)."""

    world_size: int
    max_tokens: int
    hidden: int
    num_slots: int
    signal_bytes: int

    def slot_bytes(self, kind: int) -> int:
        """Bytes of one slot of ``kind`` (sized for its largest rows: bf16, topk = MAX_TOPK)."""
        if kind == DISPATCH:
            stride = dispatch_row_stride(self.hidden, MAX_TOPK, fp8=False)
        else:
            stride = combine_row_stride(self.hidden)
        return align(self.world_size * region_stride(self.max_tokens, stride), SLOT_ALIGN)

    def slot_offset(self, kind: int, slot: int) -> int:
        """Byte offset of slot ``slot`` of ``kind`` from the symmetric buffer's base."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} not in [0, {self.num_slots})")
        first = self.signal_bytes if kind == DISPATCH else self.signal_bytes + self.num_slots * self.slot_bytes(DISPATCH)
        return first + slot * self.slot_bytes(kind)

    @property
    def nbytes(self) -> int:
        return self.signal_bytes + self.num_slots * (self.slot_bytes(DISPATCH) + self.slot_bytes(COMBINE))

    @property
    def staging_bytes(self) -> int:
        return self.nbytes - self.signal_bytes

    def staging_offset(self, kind: int, slot: int) -> int:
        return self.slot_offset(kind, slot) - self.signal_bytes
