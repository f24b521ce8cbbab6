"""CUDA backend: SM-limited NVLink dispatch/combine kernels over symmetric memory.

Each operation is one kernel on exactly ``EPBuffer.num_sms`` thread blocks that stores tokens
straight into peers' buffers (csrc/kernels/intranode*.cu; protocol in intranode.cuh):

- dispatch = a one-block counts exchange (``notify``), one host read of the counts to size
  the outputs exactly like the reference backend, then the dispatch kernel. With
  ``num_worst_tokens`` the outputs are sized by that budget instead and nothing waits on the
  host: the step can be captured in a CUDA graph;
- combine = one kernel: rows go back to their source ranks, which sum them in fp32.

Inside each dispatch and combine kernel the warps of every block split into senders and
receivers, and every row carries an arrival flag raised after each chunk of rows a sender warp
sent (one system-scope fence per chunk), so receiving overlaps sending. Sequence numbers live on
the GPU. Tuning knobs (environment, read when the buffer is set up; see :class:`KernelTuning`;
the defaults are csrc/kernels/intranode.cuh's, read through ``intranode_layout()``):
``OVERLAP_CUDA_SEND_WARPS`` (warps of 16 that send), ``OVERLAP_CUDA_FP8_SEND_WARPS`` (the same for
the quantising FP8 dispatch), ``OVERLAP_CUDA_SEND_CHUNK`` (dispatch tokens per fence),
``OVERLAP_CUDA_COMBINE_SEND_CHUNK`` (combine rows per fence), ``OVERLAP_CUDA_COPY_UNROLL``
(16-byte vectors per lane in flight in a dispatch receiver, 8 or 16). ``OVERLAP_CUDA_STAMPS=1`` makes every warp record %globaltimer phase stamps,
read back with :meth:`CudaBackend.last_phase_stamps` (see :mod:`overlap.ep.kernel_stamps`).

Kernels run on a communication stream of the buffer, ordered after the caller's stream by
events; ``*_async`` calls return an :class:`EPEvent` that makes the current stream wait.
Every spin-wait in the kernels is bounded (env ``OVERLAP_KERNEL_TIMEOUT_S``, default 10 s).
A timeout is reported through host-mapped status words and raised as a RuntimeError naming the
operation and the peer: at the next dispatch or combine of the buffer (a dispatch waits for
earlier operations anyway), when an async event is waited on if the kernel already failed, or
at once by :meth:`CudaBackend.check_status`. After a failure the buffer is unusable.

CUDA-graph capture: combine always; dispatch with ``num_worst_tokens``. Call each once before
capturing (the first call allocates the symmetric buffer, collectively).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from overlap.ep.backends.base import DispatchOutput, EPBackend, register_backend
from overlap.ep.backends.env import env_number
from overlap.ep.events import EPEvent
from overlap.ep.handle import DispatchHandle
from overlap.ep.layout import RoutingLayout

TIMEOUT_ENV = "OVERLAP_KERNEL_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 10.0
SEND_WARPS_ENV = "OVERLAP_CUDA_SEND_WARPS"
SEND_CHUNK_ENV = "OVERLAP_CUDA_SEND_CHUNK"
COMBINE_SEND_CHUNK_ENV = "OVERLAP_CUDA_COMBINE_SEND_CHUNK"
FP8_SEND_WARPS_ENV = "OVERLAP_CUDA_FP8_SEND_WARPS"
COPY_UNROLL_ENV = "OVERLAP_CUDA_COPY_UNROLL"
STAMPS_ENV = "OVERLAP_CUDA_STAMPS"
FP8_BLOCK = 128             # channels per fp32 scale of the FP8 dispatch
_INITIAL_ELEMENT_SIZE = 2   # bf16 rows; grows (collectively) on the first wider dtype
_INITIAL_TOPK = 8
_KIND_NAMES = {1: "dispatch", 2: "combine", 3: "dispatch (counts exchange)"}
_ERRORS = {
    1: "timed out after {t:g} s waiting for rank {peer} to start the same operation "
       "(does every rank of the group call dispatch/combine the same number of times?)",
    2: "timed out after {t:g} s waiting for rank {peer} to finish sending its data",
    3: "found rank {peer} running a different operation under the same sequence number "
       "(every rank must call dispatch and combine in the same order)",
    4: "received {peer} rows, more than num_worst_tokens allows; pass a larger num_worst_tokens "
       "(at most world_size * max_tokens_per_rank rows can arrive)",
}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def kernel_timeout_s() -> float:
    """The spin-wait bound from ``OVERLAP_KERNEL_TIMEOUT_S`` (seconds, default 10)."""
    return env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float, lambda v: 0 < v < 1e6,
                      "a positive number of seconds")


@dataclass(frozen=True)
class KernelTuning:
    """How the dispatch and combine kernels split and pace their work (the same on every rank).

    ``send_warps`` of the 16 warps of a block send and the rest receive (``fp8_send_warps`` for
    the FP8 dispatch, whose quantising send needs more arithmetic); a sender warp fences once
    per ``send_chunk`` tokens in a dispatch and per ``combine_send_chunk`` rows in a combine (senders
    and receivers claim such chunks from a counter); a row copy keeps ``copy_unroll`` 16-byte vectors per lane in flight;
    ``stamps``: every warp records phase stamps.
    """

    send_warps: int
    fp8_send_warps: int
    send_chunk: int
    copy_unroll: int
    combine_send_chunk: int
    stamps: bool = False

    def split(self, op: str, fp8: bool = False) -> tuple[int, int]:
        """``(send_warps, send_chunk)`` the kernel of ``op`` ("dispatch" or "combine") runs with."""
        if op == "dispatch":
            return (self.fp8_send_warps if fp8 else self.send_warps), self.send_chunk
        if op == "combine":
            return self.send_warps, self.combine_send_chunk
        raise ValueError(f"op must be 'dispatch' or 'combine', got {op!r}")

    @classmethod
    def from_env(cls, num_warps: int, default_warps: int, max_chunk: int, default_chunk: int,
                 default_fp8_warps: int, default_unroll: int, default_combine_chunk: int) -> "KernelTuning":
        """The kernels' defaults (from ``intranode_layout``, i.e. intranode.cuh), overridden by ``OVERLAP_CUDA_SEND_WARPS``, ``OVERLAP_CUDA_FP8_SEND_WARPS``,
        ``OVERLAP_CUDA_SEND_CHUNK``, ``OVERLAP_CUDA_COMBINE_SEND_CHUNK``, ``OVERLAP_CUDA_COPY_UNROLL`` and
        ``OVERLAP_CUDA_STAMPS``."""
        def warps(name: str, default: int) -> int:
            return env_number(name, default, int, lambda v: 1 <= v < num_warps,
                              f"an integer in [1, {num_warps - 1}] (warps per block that send; the others receive)")

        def chunk(name: str, default: int) -> int:
            return env_number(name, default, int, lambda v: 1 <= v <= max_chunk,
                              f"an integer in [1, {max_chunk}] (rows a sender warp sends per fence)")

        stamps = os.environ.get(STAMPS_ENV, "").strip().lower()
        if stamps not in ("", "0", "1"):
            raise ValueError(f"{STAMPS_ENV}={stamps!r} must be 0 or 1")
        return cls(send_warps=warps(SEND_WARPS_ENV, default_warps),
                   fp8_send_warps=warps(FP8_SEND_WARPS_ENV, default_fp8_warps),
                   send_chunk=chunk(SEND_CHUNK_ENV, default_chunk),
                   copy_unroll=env_number(COPY_UNROLL_ENV, default_unroll, int, lambda v: v in (8, 16), "8 or 16"),
                   stamps=stamps == "1",
                   combine_send_chunk=chunk(COMBINE_SEND_CHUNK_ENV, default_combine_chunk))


class _RegionLayout:
    """Byte offsets of the regions in every rank's symmetric buffer (see intranode.cuh).

    The signal area and the per-row arrival flags (``zero_bytes``) start zeroed.
    """

    def __init__(self, signal_bytes: int, world: int, max_tokens: int, hidden: int, elem_cap: int, topk_cap: int):
        rows = world * max_tokens
        self.elem_cap, self.topk_cap = elem_cap, topk_cap
        self.dispatch_flags_offset = signal_bytes
        self.combine_flags_offset = self.dispatch_flags_offset + rows * 8
        self.zero_bytes = _align(self.combine_flags_offset + rows * 8, 4096)
        self.x_offset = self.zero_bytes
        self.meta_offset = self.x_offset + rows * _align(hidden * elem_cap, 16)
        self.combine_offset = _align(self.meta_offset + rows * topk_cap * 8, 4096)
        self.nbytes = self.combine_offset + rows * _align(hidden * elem_cap, 16)

    def fits(self, elem: int, topk: int) -> bool:
        return elem <= self.elem_cap and topk <= self.topk_cap


@register_backend
class CudaBackend(EPBackend):
    """NVLink kernels on ``num_sms`` blocks; one GPU per rank, all ranks on one host."""

    name = "cuda"
    graph_capturable = True   # the Triton backend inherits it: its sequence numbers live on the GPU too

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        try:
            import overlap

            overlap.load_cuda_extension()
        except RuntimeError as exc:
            return False, str(exc)
        try:
            torch.ops.overlap.intranode_dispatch
        except (AttributeError, RuntimeError):
            return False, "overlap._C was built without the intranode kernels; reinstall the package"
        try:
            importlib.import_module("torch.distributed._symmetric_memory")
        except ImportError as exc:
            return False, f"this torch has no torch.distributed._symmetric_memory ({exc})"
        return True, ""

    def __init__(self, buffer):
        super().__init__(buffer)
        self._timeout_s = kernel_timeout_s()
        self._symm = None
        self._regions: Optional[_RegionLayout] = None
        self._generation = 0
        self._failure: Optional[str] = None
        self._stream = None
        self._status = None
        self._status_ptr = 0
        self._signal_bytes = self._canary_offset = 0
        self.tuning: Optional[KernelTuning] = None
        self._stamps: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------ setup
    def check_group(self, buffer) -> None:
        if buffer.device.type != "cuda":
            raise ValueError(f"backend={self.name!r} needs CUDA tensors, but this EPBuffer communicates on {buffer.device}")
        if "nccl" not in str(dist.get_backend(buffer.group)).lower():
            raise ValueError(f"backend={self.name!r} needs an NCCL process group, got {dist.get_backend(buffer.group)!r}")
        (signal_bytes, canary_offset, max_ranks, status_words, num_warps, send_warps, max_chunk, send_chunk,
         fp8_send_warps, copy_unroll, stamp_words, combine_chunk) = torch.ops.overlap.intranode_layout()
        self.tuning = KernelTuning.from_env(num_warps, send_warps, max_chunk, send_chunk, fp8_send_warps, copy_unroll,
                                            combine_chunk)
        if buffer.world_size > max_ranks:
            raise ValueError(f"backend={self.name!r} supports at most {max_ranks} ranks, the group has {buffer.world_size}")
        # Kernels count blocks across ranks and index rows by max_tokens_per_rank: all must agree.
        mine = torch.tensor([buffer.num_sms, buffer.hidden, buffer.max_tokens_per_rank, buffer.num_experts],
                            dtype=torch.int64, device=buffer.device)
        every = torch.empty(buffer.world_size, 4, dtype=torch.int64, device=buffer.device)
        dist.all_gather_into_tensor(every, mine, group=buffer.group)
        for col, name in enumerate(("num_sms", "hidden", "max_tokens_per_rank", "num_experts")):
            values = every[:, col].tolist()
            if len(set(values)) != 1:
                raise ValueError(f"backend={self.name!r} needs the same {name} on every rank, got {values} (by rank)")
        self._signal_bytes, self._canary_offset = signal_bytes, canary_offset
        self._stream = torch.cuda.Stream(device=buffer.device)
        self._status, self._status_ptr = torch.ops.overlap.intranode_alloc_status(status_words)
        if self.tuning.stamps:
            self._stamps = {op: torch.zeros(buffer.num_sms, num_warps, stamp_words, dtype=torch.int64,
                                            device=buffer.device) for op in ("dispatch", "combine")}

    def _stamps_ptr(self, op: str) -> int:
        t = self._stamps.get(op)
        return 0 if t is None else t.data_ptr()

    def last_phase_stamps(self, op: str) -> torch.Tensor:
        """Phase stamps of this buffer's last ``op`` ("dispatch" or "combine") kernel.

        int64 ``[num_sms, 16 warps, 10 words]`` on the CPU (waits for the comm stream); the words
        are csrc/kernels/intranode.cuh's ``StampWord``; :func:`overlap.ep.kernel_stamps.summarize`
        turns them into phase times. Needs ``OVERLAP_CUDA_STAMPS=1`` when the buffer is set up.
        """
        if op not in ("dispatch", "combine"):
            raise ValueError(f"op must be 'dispatch' or 'combine', got {op!r}")
        if not self._stamps:
            raise RuntimeError(f"phase stamps are off; set {STAMPS_ENV}=1 before the EPBuffer's first operation")
        self._stream.synchronize()
        return self._stamps[op].cpu()

    def _ensure_capacity(self, elem: int, topk: int) -> None:
        """(Re)allocate the symmetric buffer if rows of ``elem``-byte elements or ``topk`` do not fit.

        Collective: every rank calls it with the same arguments (they come from the same call).
        """
        if self._regions is not None and self._regions.fits(elem, topk):
            return
        buf = self.buffer
        old = self._regions
        elem_cap = max(elem, old.elem_cap if old else _INITIAL_ELEMENT_SIZE)
        topk_cap = max(topk, old.topk_cap if old else _INITIAL_TOPK)
        if self._symm is not None:
            self._stream.synchronize()  # earlier kernels are done with the old buffer
            self._raise_if_failed()
            self._symm = None
        regions = _RegionLayout(self._signal_bytes, buf.world_size, buf.max_tokens_per_rank, buf.hidden,
                                elem_cap, topk_cap)
        self._generation += 1
        from overlap.ep.symm_buffer import SymmetricBuffer

        self._symm = SymmetricBuffer(buf.group, regions.nbytes, buf.device, zero_bytes=regions.zero_bytes,
                                     canary_offset=self._canary_offset, generation=self._generation)
        self._symm.record_stream(self._stream)
        self._regions = regions

    # ------------------------------------------------------------------------------------ status
    def _raise_if_failed(self) -> None:
        if self._failure is None and self._status is not None:
            code, peer, seq, kind = self._status.tolist()
            if code != 0:
                what = _ERRORS.get(code, "failed with code {code}").format(t=self._timeout_s, peer=peer, code=code)
                self._failure = (f"EPBuffer backend {self.name!r}, rank {self.buffer.rank}: {_KIND_NAMES.get(kind, kind)} "
                                 f"(operation #{seq}) {what}. This EPBuffer cannot be used any more; "
                                 f"build a new one (and check {TIMEOUT_ENV} if peers are just slow).")
        if self._failure is not None:
            raise RuntimeError(self._failure)

    def check_status(self, wait: bool = True) -> None:
        """Raise a RuntimeError if a kernel of this buffer failed (timed out).

        With ``wait=True`` first wait for every operation queued so far (a host sync).
        """
        if wait and self._stream is not None:
            self._stream.synchronize()
        self._raise_if_failed()

    def _op_args(self, num_blocks: int) -> tuple:
        """The arguments every kernel op takes, in their schema order (the kernels number
        operations on the GPU, so nothing per call travels from the host)."""
        buf = self.buffer
        return (buf.rank, num_blocks, buf.max_tokens_per_rank, int(self._timeout_s * 1e9), self._status_ptr)

    def _check_capturable(self, what: str, reads_host: bool) -> None:
        if torch.cuda.is_current_stream_capturing() and reads_host:
            raise RuntimeError(f"backend={self.name!r}: a {what} without num_worst_tokens reads token counts on the host "
                               "and cannot be captured in a CUDA graph; pass num_worst_tokens (e.g. "
                               "world_size * max_tokens_per_rank) to capture it")

    def _launch(self, what: str, op, *args) -> None:
        # A launch that raises has already advanced this rank's sequence number: the ranks are
        # out of step from here on, so the buffer is marked failed rather than left half-usable.
        try:
            op(*args)
        except Exception as exc:
            self._failure = (f"EPBuffer backend {self.name!r}, rank {self.buffer.rank}: launching the {what} kernel failed "
                             f"({exc}). This EPBuffer cannot be used any more; build a new one.")
            raise RuntimeError(self._failure) from exc

    def _finish(self, caller: torch.cuda.Stream, async_op: bool) -> EPEvent:
        event = torch.cuda.Event()
        event.record(self._stream)
        if async_op:
            return EPEvent(cuda_event=event, finalize=self._raise_if_failed)
        caller.wait_event(event)
        self._raise_if_failed()
        return EPEvent.completed()

    # ------------------------------------------------------------------------------------ dispatch
    def dispatch(self, x, topk_idx, topk_weights, layout: RoutingLayout, *, async_op: bool,
                 num_worst_tokens: Optional[int] = None) -> DispatchOutput:
        recv_x, _, recv_idx, recv_w, counts, handle, event = self._dispatch(x, topk_idx, topk_weights, layout,
                                                                            async_op, False, num_worst_tokens)
        return recv_x, recv_idx, recv_w, counts, handle, event

    def dispatch_fp8(self, x, topk_idx, topk_weights, layout: RoutingLayout, *, async_op: bool,
                     num_worst_tokens: Optional[int] = None):
        """Dispatch with the cast to FP8 fused into the send (about half the bytes of bf16 on the wire).

        Each row is sent as e4m3 values with one fp32 scale per 128 channels: ``scale = amax /
        448`` over the block (1 for an all-zero block), ``value = x * (1 / scale)`` (each step
        rounded to nearest; one division per block) and saturated. ``hidden`` must be a multiple of 128. Inputs arrive validated, as for
        :meth:`dispatch` (see :meth:`EPBuffer.dispatch_fp8`).

        Returns ``(recv_x [R, hidden] float8_e4m3fn, recv_scales [R, hidden / 128] float32,
        recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, handle, event)``.
        """
        if self.buffer.hidden % FP8_BLOCK:
            raise ValueError(f"FP8 dispatch needs hidden to be a multiple of {FP8_BLOCK}, got hidden={self.buffer.hidden}")
        x, topk_idx, topk_weights = x.contiguous(), topk_idx.contiguous(), topk_weights.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()  # the quantising send reads 16-byte vectors
        return self._dispatch(x, topk_idx, topk_weights, layout, async_op, True, num_worst_tokens)

    def _dispatch(self, x, topk_idx, topk_weights, layout, async_op, fp8, num_worst_tokens):
        buf = self.buffer
        self._raise_if_failed()
        self._check_capturable("dispatch", reads_host=num_worst_tokens is None)
        num_tokens, topk = topk_idx.shape
        self._ensure_capacity(x.element_size(), topk)
        regions, peers, comm = self._regions, self._symm.peer_bases, self._stream
        caller = torch.cuda.current_stream(buf.device)
        idx = topk_idx.to(torch.int64).contiguous()
        weights = topk_weights.to(torch.float32).contiguous()
        slot = layout.token_slot_in_rank.to(torch.int32).contiguous()
        send_counts = layout.num_tokens_per_rank.to(torch.int32).contiguous()
        for t in (x, idx, weights, slot, send_counts):
            t.record_stream(comm)  # the caller may free them before comm is done

        comm.wait_stream(caller)
        with torch.cuda.stream(comm):
            matrix = torch.empty(buf.world_size, buf.world_size, dtype=torch.int32, device=buf.device)
            self._launch("dispatch counts exchange", torch.ops.overlap.intranode_notify, send_counts, peers, matrix,
                         *self._op_args(1))
            if num_worst_tokens is None:
                recv_counts = matrix[:, buf.rank].tolist()  # the one host sync of an exact-size dispatch
        if num_worst_tokens is None:
            self._raise_if_failed()  # everything queued on comm so far has finished: a failure is known now
            num_recv = sum(recv_counts)
        else:
            recv_counts, num_recv = None, num_worst_tokens

        # Outputs live on the caller's stream (that is where they are used and freed).
        if fp8:
            recv_x = torch.empty(num_recv, buf.hidden, dtype=torch.float8_e4m3fn, device=buf.device)
            recv_scales = torch.empty(num_recv, buf.hidden // FP8_BLOCK, dtype=torch.float32, device=buf.device)
            row_stride = _align(buf.hidden + buf.hidden // FP8_BLOCK * 4, 16)
        else:
            recv_x = x.new_empty(num_recv, buf.hidden)
            recv_scales = None
            row_stride = _align(buf.hidden * x.element_size(), 16)
        recv_idx = torch.empty(num_recv, topk, dtype=torch.int64, device=buf.device)
        recv_w = torch.empty(num_recv, topk, dtype=torch.float32, device=buf.device)
        counts = torch.empty(buf.num_local_experts, dtype=torch.int32, device=buf.device)
        for t in (recv_x, recv_scales, recv_idx, recv_w, counts):
            if t is not None:
                t.record_stream(comm)
        with torch.cuda.stream(comm):
            counts.zero_()
            if num_worst_tokens is not None:  # rows past the ones that arrive stay "no expert"
                recv_idx.fill_(-1)
                recv_w.zero_()
            self._launch_dispatch(x, idx, weights, slot, matrix, peers, recv_x, recv_idx, recv_w, counts,
                                  regions, row_stride, recv_scales)
        event = self._finish(caller, async_op)
        handle = DispatchHandle(buffer_id=id(buf), num_tokens=num_tokens, layout=layout, num_recv_tokens=num_recv,
                                recv_counts=recv_counts, recv_topk_idx=recv_idx, recv_topk_weights=recv_w,
                                backend_state={"count_matrix": matrix, "token_slot": slot},
                                num_worst_tokens=num_worst_tokens,
                                recv_rank_counts=matrix[:, buf.rank])  # column r: rows each source sends r
        return recv_x, recv_scales, recv_idx, recv_w, counts, handle, event

    def _launch_dispatch(self, x, idx, weights, slot, matrix, peers, recv_x, recv_idx, recv_w, counts, regions,
                         row_stride, recv_scales) -> None:
        self._launch("dispatch", torch.ops.overlap.intranode_dispatch, x, idx, weights, slot, matrix, peers,
                     recv_x, recv_idx, recv_w, counts, *self._op_args(self.buffer.num_sms), regions.x_offset,
                     row_stride, regions.meta_offset, regions.dispatch_flags_offset,
                     *self.tuning.split("dispatch", fp8=recv_scales is not None), recv_scales,
                     self.tuning.copy_unroll, self._stamps_ptr("dispatch"))

    def _launch_combine(self, y, slot, matrix, peers, out, regions, row_stride) -> None:
        self._launch("combine", torch.ops.overlap.intranode_combine, y, slot, matrix, peers, out,
                     *self._op_args(self.buffer.num_sms), regions.combine_offset, row_stride,
                     regions.combine_flags_offset, *self.tuning.split("combine"),
                     self.tuning.copy_unroll, self._stamps_ptr("combine"))

    # ------------------------------------------------------------------------------------ combine
    def combine(self, y, handle: DispatchHandle, *, async_op: bool):
        buf = self.buffer
        self._raise_if_failed()
        self._check_capturable("combine", reads_host=False)
        state = handle.backend_state
        if not isinstance(state, dict) or "count_matrix" not in state:
            raise ValueError("handle was not made by a 'cuda' backend dispatch")
        y = y.contiguous()
        self._ensure_capacity(y.element_size(), 1)
        regions, peers, comm = self._regions, self._symm.peer_bases, self._stream
        caller = torch.cuda.current_stream(buf.device)
        out = y.new_empty(handle.num_tokens, buf.hidden)
        slot = state["token_slot"]
        for t in (y, out, slot):
            t.record_stream(comm)
        comm.wait_stream(caller)
        with torch.cuda.stream(comm):
            self._launch_combine(y, slot, state["count_matrix"], peers, out, regions,
                                 _align(buf.hidden * y.element_size(), 16))
        return out, self._finish(caller, async_op)
