"""Triton backend: the CUDA backend's NVLink protocol with the data movement written in Triton.

Everything around the data movement is the CUDA backend's (it is subclassed): the symmetric
buffer and its region layout, the counts exchange (its one-block ``notify`` kernel), the
host-mapped status words, the comm stream, events and error reporting. Only the dispatch and
combine kernels are replaced, by the Triton kernels in :mod:`overlap.triton_kernels.ep_intranode`,
which follow the same protocol on the same buffer (per-row arrival flags, sequence numbers kept
on the GPU), so researchers can edit the data path in Python. Each is a persistent grid of
exactly ``EPBuffer.num_sms`` programs; waits are bounded by ``OVERLAP_KERNEL_TIMEOUT_S`` and a
timeout raises a RuntimeError, exactly as for the CUDA backend. Like it, a dispatch with
``num_worst_tokens`` and a combine can be captured in a CUDA graph.

Tuning knobs (environment, read at every launch):

- ``OVERLAP_TRITON_SEND_FRACTION`` (default per kernel, :data:`DEFAULT_SEND_FRACTION`: bf16
  dispatch 0.75, FP8 dispatch 0.875, combine 0.375; the variable overrides all three): the
  fraction of the programs that send (the first ``ceil(fraction * num_sms)``, at least one); the
  others start receiving (dispatch) or reducing (combine) at once. Tiles are claimed from
  per-operation counters, not assigned, and a sender with nothing left to send joins the
  receivers, so the fraction sets only how many programs start on each side. At 1 (and always
  on a grid of one program) every program sends, then receives. The defaults are the best of
  0.25 ... 0.875 on 2 H200 at 8/20/32 SMs (9ddaf3e, 4096 tokens, hidden 7168, top-8): the
  dispatch's senders store over NVLink and want most programs, the combine's reducers read
  several ranks' rows per token and want most of them.
- ``OVERLAP_TRITON_EP_TILE_BYTES`` (default 65536): bytes of a tile of ``BLOCK_T`` rows x
  ``BLOCK_H`` columns, loaded whole before it is stored, i.e. the bytes each program keeps in
  flight. The combine's reduce loads two ranks' tiles of half that at once (plus fp32
  accumulators). Senders raise their rows' arrival flags once per tile of rows.
"""
from __future__ import annotations

import contextlib
import math

import torch

from overlap.ep.backends.base import register_backend
from overlap.ep.backends.cuda_backend import FP8_BLOCK, CudaBackend
from overlap.ep.backends.env import env_number

TILE_BYTES_ENV = "OVERLAP_TRITON_EP_TILE_BYTES"
DEFAULT_TILE_BYTES = 65536
SEND_FRACTION_ENV = "OVERLAP_TRITON_SEND_FRACTION"
DEFAULT_SEND_FRACTION = {"dispatch": 0.75, "dispatch_fp8": 0.875, "combine": 0.375}
NUM_WARPS = 16
_MAX_ROW_BLOCK_BYTES = 2048   # columns per tile: 1024 bf16 (hidden 7168 = 7 blocks, no masked tail)
_MAX_RANKS = 32


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile_bytes() -> int:
    """Bytes per tile from ``OVERLAP_TRITON_EP_TILE_BYTES`` (default 65536)."""
    return env_number(TILE_BYTES_ENV, DEFAULT_TILE_BYTES, int, lambda v: 16 <= v <= 1 << 22,
                      "an integer number of bytes in [16, 4194304]")


def tile_shape(hidden: int, element_size: int, budget_bytes: int, *, min_block_h: int = 16) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_H): powers of two, BLOCK_H covering at most 2 KiB of a row (and no more
    than the row), BLOCK_T rows so that a tile holds about ``budget_bytes``."""
    if hidden < 1 or element_size < 1:
        raise ValueError(f"hidden={hidden} and element_size={element_size} must be positive")
    block_h = max(min_block_h, min(_next_pow2(hidden), _MAX_ROW_BLOCK_BYTES // element_size))
    block_t = max(1, min(64, _next_pow2(budget_bytes // (block_h * element_size) + 1) // 2))
    return block_t, block_h


def combine_tiles(hidden: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_T of the reduce, BLOCK_TS of the send-back, BLOCK_H) of a combine: the reduce has
    two ranks' tiles in flight plus fp32 accumulators, so half the rows of the send-back's."""
    block_ts, block_h = tile_shape(hidden, element_size, tile_bytes())
    return max(1, block_ts // 2), block_ts, block_h


def send_programs(num_programs: int, kernel: str = "dispatch") -> int:
    """How many of ``num_programs`` programs of ``kernel`` ("dispatch", "dispatch_fp8" or
    "combine") send first (the first ones; every program then receives):
    ``ceil(fraction * num_programs)``, at least 1, with the fraction from
    ``OVERLAP_TRITON_SEND_FRACTION`` or else :data:`DEFAULT_SEND_FRACTION` of ``kernel``."""
    if num_programs < 1:
        raise ValueError(f"num_programs={num_programs} must be >= 1")
    if kernel not in DEFAULT_SEND_FRACTION:
        raise ValueError(f"kernel must be one of {sorted(DEFAULT_SEND_FRACTION)}, got {kernel!r}")
    fraction = env_number(SEND_FRACTION_ENV, DEFAULT_SEND_FRACTION[kernel], float, lambda v: 0 < v <= 1,
                          "a number in (0, 1] (the fraction of the programs that send; the others receive)")
    return min(num_programs, max(1, math.ceil(fraction * num_programs - 1e-9)))


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a one-element stand-in of its dtype when it is empty (a kernel never touches an
    empty tensor, but the launcher wants a real device pointer of the right type)."""
    return t if t.numel() > 0 else torch.empty(1, dtype=t.dtype, device=t.device)


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current device: make it ``t``'s (ranks may not have set theirs)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _block_w(world: int) -> int:
    """Lanes of the kernels' per-rank vectors: the world size rounded up to a power of two."""
    return max(2, _next_pow2(world))


def _use_globaltimer() -> bool:
    import triton

    return not bool(triton.knobs.runtime.interpret)


def launch_dispatch(x, topk_idx, topk_weights, token_slot, count_matrix, peer_bases, recv_x, recv_topk_idx,
                    recv_topk_weights, recv_expert_counts, rank, num_blocks, max_tokens, timeout_ns, status_ptr,
                    x_region_offset, x_row_stride, meta_region_offset, flag_region_offset, recv_scales=None) -> None:
    """The Triton dispatch kernel, with the CUDA op's arguments.

    ``recv_scales`` given: quantise to e4m3 on the way (``recv_x`` is float8_e4m3fn then).
    Rows past ``recv_x.shape[0]`` (a worst-case budget that was too small) are dropped and
    reported through the status words.
    """
    from overlap.triton_kernels.ep_intranode import ep_dispatch_kernel

    world = peer_bases.numel()
    num_tokens, hidden = x.shape
    topk = topk_idx.shape[1]
    fp8 = recv_scales is not None
    _check_common(world, rank, num_blocks, max_tokens, num_tokens, flag_region_offset)
    if x_row_stride % 16 or x_region_offset % 16 or meta_region_offset % 8:
        raise ValueError(f"x_row_stride={x_row_stride} and x_region_offset={x_region_offset} must be multiples "
                         f"of 16 and meta_region_offset={meta_region_offset} of 8")
    if fp8:
        if hidden % FP8_BLOCK:
            raise ValueError(f"FP8 dispatch needs hidden to be a multiple of {FP8_BLOCK}, got hidden={hidden}")
        if x_row_stride < hidden + hidden // FP8_BLOCK * 4:
            raise ValueError(f"x_row_stride={x_row_stride} cannot hold {hidden} e4m3 values and their scales")
    elif x_row_stride < hidden * x.element_size():
        raise ValueError(f"x_row_stride={x_row_stride} is shorter than a row ({hidden * x.element_size()} bytes)")
    block_t, block_h = tile_shape(hidden, x.element_size(), tile_bytes(), min_block_h=FP8_BLOCK if fp8 else 16)
    scales = recv_scales if fp8 else recv_topk_weights  # unused placeholder when not quantising
    tensors = (x, topk_idx, topk_weights, token_slot, count_matrix, peer_bases, recv_x, recv_topk_idx,
               recv_topk_weights, recv_expert_counts, scales)
    with _on_device_of(peer_bases):
        ep_dispatch_kernel[(num_blocks,)](
            *(_nonempty(t) for t in tensors), rank, world, timeout_ns, status_ptr, num_tokens, hidden, topk,
            recv_expert_counts.numel(), x_region_offset, x_row_stride, meta_region_offset, flag_region_offset,
            recv_x.shape[0], send_programs(num_blocks, "dispatch_fp8" if fp8 else "dispatch"), FP8=fp8, BLOCK_T=block_t, BLOCK_H=block_h,
            BLOCK_K=max(2, _next_pow2(topk)), BLOCK_S=max(2, _next_pow2(hidden // FP8_BLOCK)),
            BLOCK_W=_block_w(world), USE_GLOBALTIMER=_use_globaltimer(), num_warps=NUM_WARPS)


def launch_combine(y, token_slot, count_matrix, peer_bases, out, rank, num_blocks, max_tokens, timeout_ns,
                   status_ptr, region_offset, row_stride, flag_region_offset) -> None:
    """The Triton combine kernel, with the CUDA op's arguments."""
    from overlap.triton_kernels.ep_intranode import ep_combine_kernel

    world = peer_bases.numel()
    num_tokens, hidden = out.shape
    _check_common(world, rank, num_blocks, max_tokens, num_tokens, flag_region_offset)
    if row_stride % 16 or region_offset % 16 or row_stride < hidden * y.element_size():
        raise ValueError(f"row_stride={row_stride} and region_offset={region_offset} must be multiples of 16 and "
                         f"row_stride must hold a row ({hidden * y.element_size()} bytes)")
    block_t, block_ts, block_h = combine_tiles(hidden, y.element_size())
    with _on_device_of(peer_bases):
        ep_combine_kernel[(num_blocks,)](
            *(_nonempty(t) for t in (y, token_slot, count_matrix, peer_bases, out)), rank, world, max_tokens,
            timeout_ns, status_ptr, num_tokens, hidden, region_offset, row_stride, flag_region_offset,
            send_programs(num_blocks, "combine"), BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_TS=block_ts, BLOCK_W=_block_w(world),
            USE_GLOBALTIMER=_use_globaltimer(), num_warps=NUM_WARPS)


def _check_common(world, rank, num_blocks, max_tokens, num_tokens, flag_region_offset) -> None:
    if not 1 <= world <= _MAX_RANKS:
        raise ValueError(f"peer_bases must hold 1..{_MAX_RANKS} ranks, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, {world})")
    if num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks} must be >= 1")
    if not 0 <= num_tokens <= max_tokens:
        raise ValueError(f"num_tokens={num_tokens} must be in [0, max_tokens={max_tokens}]")
    if flag_region_offset % 8:
        raise ValueError(f"flag_region_offset={flag_region_offset} must be a multiple of 8")


@register_backend
class TritonBackend(CudaBackend):
    """The CUDA backend's buffers, protocol and CUDA-graph capture rules, with dispatch and
    combine kernels in Triton."""

    name = "triton"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        try:
            import triton
        except ImportError as exc:
            return False, f"triton is not installed ({exc})"
        if triton.knobs.runtime.interpret:
            return False, "TRITON_INTERPRET is set: Triton kernels would run on the CPU interpreter"
        ok, why = CudaBackend.availability()
        if not ok:
            return False, f"it reuses the cuda backend's buffers and counts exchange, which are unavailable: {why}"
        return True, ""

    def _launch_dispatch(self, x, idx, weights, slot, matrix, peers, recv_x, recv_idx, recv_w, counts, regions,
                         row_stride, recv_scales) -> None:
        self._launch("dispatch", launch_dispatch, x, idx, weights, slot, matrix, peers, recv_x, recv_idx, recv_w,
                     counts, *self._op_args(self.buffer.num_sms), regions.x_offset, row_stride, regions.meta_offset,
                     regions.dispatch_flags_offset, recv_scales)

    def _launch_combine(self, y, slot, matrix, peers, out, regions, row_stride) -> None:
        self._launch("combine", launch_combine, y, slot, matrix, peers, out, *self._op_args(self.buffer.num_sms),
                     regions.combine_offset, row_stride, regions.combine_flags_offset)
