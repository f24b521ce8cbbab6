"""Low-latency (decode) dispatch and combine whose transfers hold no SM, with receive hooks.

A call runs a short pack kernel (routing slots, optional FP8 cast) and then issues the transfer;
with ``return_recv_hook=True`` it returns at once and the data flies while the GPU runs other
work; calling the hook later makes the current stream wait for arrival and unpacks. Transports
(``transport=``):

- ``"copy_engine"`` (default): the pack writes one fixed-size region per peer into local staging,
  then per peer, on its own side stream, a ``cudaMemcpyAsync`` over NVLink moves the region and
  an 8-byte copy of this rank's send count for the slot raises the peer's counting arrival flag;
  stream order lands it after the data. Copy engines do the work: between send and hook no
  kernel of ours is resident. The hook kernel waits for the
  flags itself, so it is queued right behind the caller's work, not behind this rank's own
  copies (the caller's stream joins the side streams after the hook). Under CUDA-graph capture
  the copies and flag writes go into the graph directly, as a branch off the pack kernel that
  no later node waits for (no join: see ``ll_graph_add_copies`` in csrc/ll_copy_ops.cpp); the
  hook adds them, so it must be called inside the same capture. A copy reads the send count at
  every replay, so the flags count in graphs too and the hook resets nothing (see ll.cuh).
- ``"sm"``: the pack kernel stores rows straight into peers' buffers and raises the flags itself
  (the SMs are busy until the stores finish); for comparison.
- ``"nccl"``: the packed regions go through ``all_to_all_single``; for comparison.

Receive layout (DeepEP-style): ``recv_x [E/W, W * max_tokens, hidden]``; expert e's tokens are
rows ``[0, counts[e])`` of ``recv_x[e]``, ordered by source rank, then source token. Combine
takes ``y`` of the same shape (the experts' outputs, rows past counts[e] ignored), applies the
routing weights on the expert side in fp32 and sends one bf16 row per (token, rank) back; the
hook sums the rows of all ranks in fp32. The weights therefore travel with the dispatch:
pass ``topk_weights`` to :func:`LowLatencyEP.dispatch` to combine.

Up to ``num_slots`` (default 3) operations *of each kind* may be in flight (issued, hook not yet
called); slots are reused only after every receiver acknowledged the previous use (the pack
kernel waits for the acks, bounded), and issuing one more raises. Everything after setup is
CUDA-graph capturable: sizes are fixed (each transfer moves the worst-case region) and
sequence numbers live on the device. All ranks must issue the same low-latency operations
(and hooks) in the same order. Waits are bounded by ``OVERLAP_KERNEL_TIMEOUT_S`` (default 10 s);
a timeout is reported through host-mapped status words and raised as RuntimeError by the next
call, a hook, or :meth:`LowLatencyEP.check_status`; the buffer is then unusable.
With ``OVERLAP_LL_STAMPS=1`` the kernels stamp each block's phases (:meth:`LowLatencyEP.kernel_stamps`);
``OVERLAP_LL_COPY_UNROLL`` tunes the dispatch hook's copy (:func:`hook_copy_unroll`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from overlap.ep import validation
from overlap.ep.low_latency_layout import (COMBINE, DISPATCH, FP8_BLOCK, KIND_NAMES, MAX_LOCAL_EXPERTS, MAX_TOPK,
                                           LowLatencyLayout, combine_row_stride, dispatch_row_stride, header_bytes,
                                           region_stride)

TRANSPORTS = ("copy_engine", "sm", "nccl")
_MODE = {"sm": 0, "copy_engine": 1, "nccl": 2}   # ll.cuh Mode
DEFAULT_NUM_SLOTS = 3
_STATUS_KINDS = {5: "dispatch send", 6: "dispatch receive hook", 7: "combine send", 8: "combine receive hook"}
_ERRORS = {
    1: "timed out after {t:g} s waiting for rank {peer} to consume the previous use of this slot "
       "(does every rank call the hook of every low-latency operation?)",
    2: "timed out after {t:g} s waiting for rank {peer}'s data (does every rank issue the same "
       "low-latency operations in the same order?)",
}


def hook_parts(sm_count: int, num_local_experts: int, max_parts: int = 16) -> int:
    """Blocks per local expert in the dispatch hook: ``sm_count // num_local_experts``, clamped
    to ``[1, max_parts]``, so the grid covers every SM about once."""
    if sm_count < 1 or num_local_experts < 1 or max_parts < 1:
        raise ValueError(f"hook_parts needs positive arguments, got sm_count={sm_count}, "
                         f"num_local_experts={num_local_experts}, max_parts={max_parts}")
    return max(1, min(max_parts, sm_count // num_local_experts))


def check_transport(transport) -> str:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    return transport


HOOK_COPY_UNROLLS = (8, 16)
DEFAULT_HOOK_COPY_UNROLL = 8


def hook_copy_unroll() -> int:
    """16-byte loads each copy thread of the dispatch hook has in flight before its stores:
    ``OVERLAP_LL_COPY_UNROLL`` (8 or 16; default 8). The hook block of the expert with the most
    rows sets the kernel's end; 16 halves its rounds of loads but measured no faster (2 H200, 128
    tokens, hidden 7168: the overlapped decode layer read 1.097-1.103x compute-only with 8 and
    1.100-1.101x with 16, bf16; experiments/results/tuning/ll_ab/run7_*)."""
    want = os.environ.get("OVERLAP_LL_COPY_UNROLL", "") or str(DEFAULT_HOOK_COPY_UNROLL)
    if want not in {str(u) for u in HOOK_COPY_UNROLLS}:
        raise ValueError(f"OVERLAP_LL_COPY_UNROLL must be one of {HOOK_COPY_UNROLLS}, got {want!r}")
    return int(want)


def check_dispatch_args(x, topk_idx, topk_weights, *, hidden: int, num_experts: int, max_tokens: int,
                        device: torch.device, check_values: bool) -> None:
    """Validate low-latency dispatch inputs (no CUDA needed; value checks sync, so optional)."""
    validation._check_rows("x", x, hidden=hidden, device=device)
    if x.dtype != torch.bfloat16:
        raise TypeError(f"x must be bfloat16 for the low-latency dispatch, got {x.dtype}")
    if hidden % FP8_BLOCK:
        raise ValueError(f"the low-latency path needs hidden to be a multiple of {FP8_BLOCK}, got hidden={hidden}")
    if x.shape[0] > max_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, more than max_tokens_per_rank={max_tokens}")
    validation.check_topk_idx(topk_idx, num_tokens=x.shape[0], num_experts=num_experts, device=device,
                              check_values=check_values)
    if topk_idx.shape[1] > MAX_TOPK:
        raise ValueError(f"topk_idx has k={topk_idx.shape[1]} columns; the low-latency path supports k <= {MAX_TOPK}")
    if topk_weights is not None:
        validation._check_tensor("topk_weights", topk_weights, device)
        if topk_weights.shape != topk_idx.shape:
            raise ValueError(f"topk_weights has shape {tuple(topk_weights.shape)}, but topk_idx has shape "
                             f"{tuple(topk_idx.shape)}; they must match")
        if topk_weights.dtype not in validation.FLOAT_DTYPES:
            raise TypeError(f"topk_weights must be a floating dtype, got {topk_weights.dtype}")


@dataclass
class LowLatencyHandle:
    """What a low-latency combine needs from its dispatch (device tensors filled by the hook)."""

    owner_id: int
    transport: str
    num_tokens: int
    topk: int
    has_weights: bool
    token_slot: torch.Tensor    # [T, W] int32: row of each token in each rank's region, -1 = not sent
    row_pos: torch.Tensor       # [W * M, k] int32: row of (received row, k) in its expert's block
    row_expert: torch.Tensor    # [W * M, k] int32: local expert, -1 elsewhere
    row_weight: torch.Tensor    # [W * M, k] float32
    src_counts: torch.Tensor    # [W] int32: rows received from each source
    topk_weights: Optional[torch.Tensor] = None
    received: list = field(default_factory=lambda: [False])


@dataclass
class _Transfer:
    """What a send left for its hook: side-stream events to join (eager copies, NCCL), or, under
    CUDA-graph capture, the call that adds the copies to the graph."""

    events: list = field(default_factory=list)
    graph_branch: Optional[Callable[[], None]] = None
    capture_id: Optional[int] = None


class RecvHook:
    """Callable returned by a low-latency call: queues the wait for arrival (and the unpack) on the
    current stream. Calling it again does nothing."""

    def __init__(self, fn: Callable[[], None]):
        self._fn = fn
        self.called = False

    def __call__(self) -> None:
        if not self.called:
            self.called = True
            self._fn()


class LowLatencyEP:
    """The decode path of one :class:`overlap.ep.EPBuffer` (built by :func:`low_latency_state`).

    Collective to build: every rank of the buffer's group must construct it together, outside
    CUDA-graph capture. Needs an NCCL group with one GPU per rank on one NVLink host.
    """

    def __init__(self, buffer, num_slots: int = DEFAULT_NUM_SLOTS):
        from overlap.ep.backends.cuda_backend import kernel_timeout_s

        if buffer.device.type != "cuda":
            raise ValueError(f"the low-latency path needs CUDA tensors, but this EPBuffer communicates on {buffer.device}")
        if "nccl" not in str(dist.get_backend(buffer.group)).lower():
            raise ValueError(f"the low-latency path needs an NCCL process group, got {dist.get_backend(buffer.group)!r}")
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the low-latency buffer is set up collectively on the first call, which cannot be "
                               "captured: make one low-latency call (or low_latency_state(buffer)) before capture")
        import overlap

        overlap.load_cuda_extension()
        (signal_bytes, max_ranks, max_slots, max_tokens, _max_topk, _flags_off, _acks_off, _seq_off,
         _hdr, _blk, max_hook_parts) = torch.ops.overlap.ll_layout()
        W, M = buffer.world_size, buffer.max_tokens_per_rank
        if W > max_ranks:
            raise ValueError(f"the low-latency path supports at most {max_ranks} ranks, the group has {W}")
        if M > max_tokens:
            raise ValueError(f"max_tokens_per_rank={M} exceeds the low-latency limit {max_tokens}; build a decode "
                             "EPBuffer with max_tokens_per_rank set to the decode batch (e.g. 128)")
        if not (isinstance(num_slots, int) and 1 <= num_slots <= max_slots):
            raise ValueError(f"num_slots must be an int in [1, {max_slots}], got {num_slots!r}")
        if buffer.hidden % FP8_BLOCK:
            raise ValueError(f"the low-latency path needs hidden to be a multiple of {FP8_BLOCK}, got {buffer.hidden}")
        if buffer.num_local_experts > MAX_LOCAL_EXPERTS:
            raise ValueError(f"the low-latency path supports at most {MAX_LOCAL_EXPERTS} experts per rank, this "
                             f"EPBuffer has {buffer.num_local_experts} (num_experts / world_size)")
        sms = torch.cuda.get_device_properties(buffer.device).multi_processor_count
        mine = torch.tensor([buffer.hidden, M, buffer.num_experts, num_slots, sms], dtype=torch.int64,
                            device=buffer.device)
        every = torch.empty(W, 5, dtype=torch.int64, device=buffer.device)
        dist.all_gather_into_tensor(every, mine, group=buffer.group)
        for col, name in enumerate(("hidden", "max_tokens_per_rank", "num_experts", "num_slots")):
            values = every[:, col].tolist()
            if len(set(values)) != 1:
                raise ValueError(f"the low-latency path needs the same {name} on every rank, got {values} (by rank)")
        # Dispatch-hook blocks per local expert: enough that the grid covers every SM once. Every
        # rank must launch the same hook grid (senders count one ack per hook block), so the
        # smallest GPU of the group decides.
        self.hook_parts = hook_parts(int(every[:, 4].min().item()), buffer.num_local_experts, max_hook_parts)

        from overlap.ep.symm_buffer import SymmetricBuffer

        self.buffer = buffer
        self.num_slots = num_slots
        self.layout = LowLatencyLayout(W, M, buffer.hidden, num_slots, signal_bytes)
        self._timeout_s = kernel_timeout_s()
        self._status, self._status_ptr = torch.ops.overlap.intranode_alloc_status(4)
        canary_offset = torch.ops.overlap.intranode_layout()[1]
        self._symm = SymmetricBuffer(buffer.group, self.layout.nbytes, buffer.device, zero_bytes=signal_bytes,
                                     canary_offset=canary_offset, generation=0x4C4C)
        self._peer_list = self._symm.peer_bases.tolist()
        self._my_base = self._peer_list[buffer.rank]
        self._staging = torch.empty(self.layout.staging_bytes, dtype=torch.uint8, device=buffer.device)
        self._nccl_recv: dict[int, torch.Tensor] = {}  # per kind, ordinary memory (see _send)
        self._side = {d: torch.cuda.Stream(device=buffer.device) for d in range(W) if d != buffer.rank}
        # Per (kind, slot): [this rank's arrival flag in every peer's buffer, the slot's send count
        # in this rank's], the offsets of a copy-engine send's flag copy (ll.cuh).
        self._flag_copy = {(k, s): torch.ops.overlap.ll_flag_copy_offsets(k, s, buffer.rank)
                           for k in (DISPATCH, COMBINE) for s in range(num_slots)}
        self.copy_unroll = hook_copy_unroll()
        # Diagnostics: per-block phase stamps of the last pack and hook kernels (kernel_stamps()).
        self._stamps = (torch.zeros(2, 4096, 8, dtype=torch.int64, device=buffer.device)
                        if os.environ.get("OVERLAP_LL_STAMPS") == "1" else None)
        self._comm = torch.cuda.Stream(device=buffer.device)
        self._views: dict = {}
        self._busy = {DISPATCH: [False] * num_slots, COMBINE: [False] * num_slots}
        self._next = {DISPATCH: 0, COMBINE: 0}
        self._failure: Optional[str] = None

    # ------------------------------------------------------------------------------------ status
    def _raise_if_failed(self) -> None:
        if self._failure is None:
            code, peer, seq, kind = self._status.tolist()
            if code != 0:
                what = _ERRORS.get(code, "failed with code {code}").format(t=self._timeout_s, peer=peer, code=code)
                self._failure = (f"EPBuffer low-latency path, rank {self.buffer.rank}: {_STATUS_KINDS.get(kind, kind)} "
                                 f"(slot use #{seq}) {what}. This buffer cannot be used any more; build a new EPBuffer.")
        if self._failure is not None:
            raise RuntimeError(self._failure)

    def check_status(self, wait: bool = True) -> None:
        """Raise a RuntimeError if a low-latency kernel of this buffer timed out.

        With ``wait=True`` first synchronise the device (every queued operation has finished).
        """
        if wait:
            torch.cuda.synchronize(self.buffer.device)
        self._raise_if_failed()

    # ------------------------------------------------------------------------------------ slots
    def _acquire(self, kind: int) -> int:
        busy = self._busy[kind]
        for i in range(self.num_slots):
            s = (self._next[kind] + i) % self.num_slots
            if not busy[s]:
                busy[s] = True
                self._next[kind] = (s + 1) % self.num_slots
                return s
        raise RuntimeError(f"{self.num_slots} low-latency {KIND_NAMES[kind]}es are already in flight (issued, hook not "
                           f"called); call a hook first (a slot is reused only once its data was consumed)")

    def _release(self, kind: int, slot: int) -> None:
        self._busy[kind][slot] = False

    # ------------------------------------------------------------------------------------ plumbing
    def _common(self, kind: int, slot: int, transport: str, rstride: int, row_stride: int, topk: int) -> list:
        buf, lay = self.buffer, self.layout
        staging = self._staging.data_ptr() + lay.staging_offset(kind, slot)
        return [buf.rank, buf.world_size, kind, slot, _MODE[transport], self._my_base, lay.slot_offset(kind, slot),
                rstride, row_stride, lay.max_tokens, staging, buf.hidden, topk, buf.num_local_experts,
                int(self._timeout_s * 1e9), self._status_ptr,
                0 if self._stamps is None else self._stamps.data_ptr(), self.hook_parts]

    STAMP_PHASES = ("start", "prologue", "setup", "rows", "epilogue", "end")

    def kernel_stamps(self) -> dict:
        """Diagnostics (``OVERLAP_LL_STAMPS=1`` at construction): when each block of the last pack
        and hook kernels reached each phase (start, prologue done, set-up done, rows written,
        epilogue, end), in microseconds from the kernel's first block start, as
        ``{"pack"|"hook": {phase: (min, median, max)}}``. Synchronises the device."""
        if self._stamps is None:
            raise RuntimeError("build the low-latency state with OVERLAP_LL_STAMPS=1 to record kernel stamps")
        torch.cuda.synchronize(self.buffer.device)
        out = {}
        for which, name in enumerate(("pack", "hook")):
            st = self._stamps[which].cpu()
            st = st[st[:, 0] != 0]
            if not len(st):
                continue
            rel = (st - st[:, 0].min()).double() / 1e3
            out[name] = {}
            for i, ph in enumerate(self.STAMP_PHASES):
                col = rel[:, i][st[:, i] != 0]   # blocks that reached the phase
                if len(col):
                    out[name][ph] = (col.min().item(), col.median().item(), col.max().item())
            out[name]["blocks"] = len(st)
        return out

    def _view(self, key, ptr: int, nbytes: int) -> torch.Tensor:
        v = self._views.get(key)
        if v is None:
            v = torch.ops.overlap.ll_view(ptr, nbytes, self._staging)
            self._views[key] = v
        return v

    def _flag_copy_addresses(self, kind: int, slot: int, peer: int) -> tuple[int, int]:
        """``(destination, source)`` of the 8-byte copy that raises a copy-engine send's arrival
        flag at ``peer``: the peer's flag for this rank, and this rank's send count for the slot
        (the pack wrote this operation's count there)."""
        flag, send_seq = self._flag_copy[(kind, slot)]
        return self._peer_list[peer] + flag, self._my_base + send_seq

    def _send(self, kind: int, slot: int, transport: str, rstride: int) -> "_Transfer":
        """Issue the transfer of the packed slot (under CUDA-graph capture, prepare it for the hook)."""
        if transport == "sm":
            return _Transfer()
        buf, lay = self.buffer, self.layout
        me, W = buf.rank, buf.world_size
        stage_off = lay.staging_offset(kind, slot)
        caller = torch.cuda.current_stream(buf.device)
        if transport == "nccl":
            send = self._staging[stage_off:stage_off + W * rstride]
            recv = self._view(("slot", kind, slot), self._my_base + lay.slot_offset(kind, slot), lay.slot_bytes(kind))
            # NCCL receives into ordinary memory, then one local copy fills the slot: with the
            # symmetric-memory slot as its receive buffer, a graph-captured all_to_all_single
            # never finished its first replay (2 and 4 H200, NCCL 2.28), while the same call
            # on ordinary tensors replays fine. One buffer per kind is enough: every NCCL
            # transfer and its copy run in order on the one communication stream.
            scratch = self._nccl_recv.get(kind)
            if scratch is None:
                scratch = torch.empty(lay.slot_bytes(kind), dtype=torch.uint8, device=buf.device)
                self._nccl_recv[kind] = scratch
            self._comm.wait_stream(caller)
            with torch.cuda.stream(self._comm):
                dist.all_to_all_single(scratch[:W * rstride], send, group=buf.group)
                recv[:W * rstride].copy_(scratch[:W * rstride])
            done = torch.cuda.Event()
            done.record(self._comm)
            return _Transfer(events=[done])
        if torch.cuda.is_current_stream_capturing():
            # Straight into the graph, as a branch off the pack kernel that nothing waits for (see
            # ll_graph_add_copies), added by the hook: by then the caller's next node is the pack's
            # first child and keeps the pack's hardware queue.
            point = torch.ops.overlap.ll_capture_point()   # [capture id, graph, the pack's node]
            peers = list(self._side)
            flags = [self._flag_copy_addresses(kind, slot, d) for d in peers]
            args = ([self._peer_list[d] + lay.slot_offset(kind, slot) + me * rstride for d in peers],
                    [self._staging.data_ptr() + stage_off + d * rstride for d in peers], [rstride] * len(peers),
                    [addr for addr, _ in flags], [src for _, src in flags], self._staging)
            return _Transfer(capture_id=point[0],
                             graph_branch=lambda: torch.ops.overlap.ll_graph_add_copies(point, *args))
        packed = torch.cuda.Event()
        packed.record(caller)
        events = []
        for d, side in self._side.items():
            dst = self._view(("peer", kind, slot, d), self._peer_list[d] + lay.slot_offset(kind, slot),
                             lay.slot_bytes(kind))
            flag_addr, flag_src = self._flag_copy_addresses(kind, slot, d)
            side.wait_event(packed)
            with torch.cuda.stream(side):
                # The rows, then the arrival flag, in one stream: the flag lands only after the rows.
                dst[me * rstride:(me + 1) * rstride].copy_(self._staging[stage_off + d * rstride:
                                                                         stage_off + (d + 1) * rstride])
                self._view(("flag", kind, slot, d), flag_addr, 8).copy_(self._view(("seq", kind, slot), flag_src, 8))
            sent = torch.cuda.Event()
            sent.record(side)
            events.append(sent)
        return _Transfer(events=events)

    def _hook(self, kind: int, slot: int, send_stream, transfer: "_Transfer", launch: Callable[[], None],
              outputs: tuple, on_done: Callable[[], None], *, kernel_waits: bool) -> RecvHook:
        """``kernel_waits``: the hook kernel itself waits for arrival (flags), so it need not queue
        behind this rank's own transfers; the stream joins them after it. Otherwise (NCCL) the
        stream waits for the transfer's events before the kernel."""
        packed = torch.cuda.Event()
        packed.record(send_stream)

        def run():
            self._raise_if_failed()
            if transfer.graph_branch is not None and not (
                    torch.cuda.is_current_stream_capturing()
                    and torch.ops.overlap.ll_capture_point()[0] == transfer.capture_id):
                self._release(kind, slot)
                raise RuntimeError(f"the hook of a low-latency {KIND_NAMES[kind]} sent during a CUDA-graph capture "
                                   "must be called inside that capture (its copies join the graph there); nothing "
                                   "was sent")
            stream = torch.cuda.current_stream(self.buffer.device)
            if stream != send_stream:
                # The hook reads this operation's sequence number, which its pack kernel wrote.
                stream.wait_event(packed)
                for t in outputs:
                    if t is not None:
                        t.record_stream(stream)
            if not kernel_waits:
                for ev in transfer.events:
                    stream.wait_event(ev)
            try:
                launch()
                if transfer.graph_branch is not None:
                    transfer.graph_branch()
            finally:
                self._release(kind, slot)
            if kernel_waits:
                for ev in transfer.events:   # join the side streams (CUDA-graph capture needs every fork joined)
                    stream.wait_event(ev)
            on_done()

        return RecvHook(run)

    # ------------------------------------------------------------------------------------ dispatch
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor] = None, *,
                 use_fp8: bool = False, return_recv_hook: bool = False, transport: str = "copy_engine"):
        """Send each token once to every rank hosting one of its experts; see the module docstring.

        Args:
            x: ``[T, hidden]`` bf16, ``T <= max_tokens_per_rank``.
            topk_idx: ``[T, k]`` int64/int32 global expert ids, -1 = none (``k <= 16``).
            topk_weights: ``[T, k]`` routing weights; needed by :meth:`combine` (they travel with
                the tokens so the expert side can weight its partial sums).
            use_fp8: cast to e4m3 in the pack kernel, one fp32 scale per 128 channels
                (``scale = amax / 448``, 1 for an all-zero block; ``value = x * (1 / scale)``).
            return_recv_hook: return before the data arrived; call the hook to receive.
            transport: ``"copy_engine"``, ``"sm"`` or ``"nccl"``.

        Returns:
            ``(recv_x, recv_count, handle, hook)``: ``recv_x`` is ``[E/W, W * M, hidden]`` bf16, or
            ``(values e4m3, scales [E/W, W * M, hidden / 128] float32)`` with ``use_fp8``;
            ``recv_count [E/W]`` int32 rows per local expert. Outputs are valid once the hook
            ran (at once when ``return_recv_hook`` is False).
        """
        buf = self.buffer
        check_transport(transport)
        capturing = torch.cuda.is_current_stream_capturing()
        check_dispatch_args(x, topk_idx, topk_weights, hidden=buf.hidden, num_experts=buf.num_experts,
                            max_tokens=self.layout.max_tokens, device=buf.device,
                            check_values=buf.validate_values and not capturing)
        self._raise_if_failed()
        T, K = topk_idx.shape
        W, M, H, L = buf.world_size, self.layout.max_tokens, buf.hidden, buf.num_local_experts
        dev = buf.device
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()  # the pack reads 16-byte vectors
        idx = topk_idx.to(torch.int64).contiguous()
        has_w = topk_weights is not None
        w = (topk_weights.to(torch.float32).contiguous() if has_w
             else torch.zeros(T, K, dtype=torch.float32, device=dev))
        hdr = header_bytes(K)
        row_stride = dispatch_row_stride(H, K, use_fp8)
        rstride = region_stride(M, row_stride)
        slot = self._acquire(DISPATCH)
        try:
            common = self._common(DISPATCH, slot, transport, rstride, row_stride, K)
            if self._stamps is not None:
                self._stamps.zero_()
            token_slot = torch.empty(T, W, dtype=torch.int32, device=dev)
            torch.ops.overlap.ll_dispatch_send(x, idx, w, token_slot, self._symm.peer_bases, common,
                                               int(use_fp8), hdr)
            transfer = self._send(DISPATCH, slot, transport, rstride)
        except Exception:
            self._release(DISPATCH, slot)
            raise
        if use_fp8:
            recv_x = torch.empty(L, W * M, H, dtype=torch.float8_e4m3fn, device=dev)
            scales = torch.empty(L, W * M, H // FP8_BLOCK, dtype=torch.float32, device=dev)
        else:
            recv_x = torch.empty(L, W * M, H, dtype=torch.bfloat16, device=dev)
            scales = None
        counts = torch.empty(L, dtype=torch.int32, device=dev)
        row_pos = torch.empty(W * M, K, dtype=torch.int32, device=dev)
        row_expert = torch.empty(W * M, K, dtype=torch.int32, device=dev)
        row_weight = torch.empty(W * M, K, dtype=torch.float32, device=dev)
        src_counts = torch.empty(W, dtype=torch.int32, device=dev)
        handle = LowLatencyHandle(owner_id=id(self), transport=transport, num_tokens=T, topk=K, has_weights=has_w,
                                  token_slot=token_slot, row_pos=row_pos, row_expert=row_expert,
                                  row_weight=row_weight, src_counts=src_counts,
                                  topk_weights=topk_weights if has_w else None)
        wait_flags = int(transport != "nccl")
        unroll = self.copy_unroll

        def launch():
            torch.ops.overlap.ll_dispatch_recv(self._symm.peer_bases, recv_x, scales, counts, row_pos, row_expert,
                                               row_weight, src_counts, common, wait_flags, hdr, unroll)

        def done():
            handle.received[0] = True

        hook = self._hook(DISPATCH, slot, torch.cuda.current_stream(dev), transfer, launch,
                          (recv_x, scales, counts, row_pos, row_expert, row_weight, src_counts), done,
                          kernel_waits=bool(wait_flags))
        if not return_recv_hook:
            hook()
        return ((recv_x, scales) if use_fp8 else recv_x), counts, handle, hook

    # ------------------------------------------------------------------------------------ combine
    def combine(self, y: torch.Tensor, topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
                handle: LowLatencyHandle, *, return_recv_hook: bool = False, transport: Optional[str] = None,
                out: Optional[torch.Tensor] = None):
        """Return each token's ``Σ_k w[t,k] · y_{e(t,k)}(t)`` (fp32 accumulation) as bf16 ``[T, hidden]``.

        Args:
            y: ``[E/W, W * M, hidden]`` bf16 expert outputs in the layout ``dispatch`` returned.
            topk_idx, topk_weights: the tensors given to the dispatch (checked, for DeepEP-style
                calls; the weights applied are the dispatched ones, on the expert side). ``None``
                skips the check.
            handle: the dispatch's handle; its hook must have been called.
            transport: defaults to the dispatch's.
            out: optional ``[T, hidden]`` bf16 output (e.g. a static tensor of a CUDA graph).

        Returns:
            ``(combined, hook)``; ``combined`` is valid once the hook ran.
        """
        buf = self.buffer
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle must be the handle low_latency_dispatch returned, got {type(handle).__name__}")
        transport = check_transport(handle.transport if transport is None else transport)
        if handle.owner_id != id(self):
            raise ValueError("handle was made by a different EPBuffer; combine with the buffer that dispatched")
        if not handle.received[0]:
            raise RuntimeError("call the dispatch's receive hook before combining its outputs")
        if not handle.has_weights:
            raise ValueError("low_latency_combine applies the routing weights on the expert side (one row per "
                             "(token, rank) on the wire): pass topk_weights to low_latency_dispatch")
        if topk_weights is not None and topk_weights is not handle.topk_weights:
            raise ValueError("topk_weights must be the tensor given to low_latency_dispatch (the expert side applies "
                             "the dispatched weights)")
        if topk_idx is not None and tuple(topk_idx.shape) != (handle.num_tokens, handle.topk):
            raise ValueError(f"topk_idx has shape {tuple(topk_idx.shape)}, but the dispatch had "
                             f"{(handle.num_tokens, handle.topk)}")
        W, M, H, L = buf.world_size, self.layout.max_tokens, buf.hidden, buf.num_local_experts
        validation._check_tensor("y", y, buf.device)
        if tuple(y.shape) != (L, W * M, H) or y.dtype != torch.bfloat16:
            raise ValueError(f"y must be bf16 [{L}, {W * M}, {H}] (the dispatch's receive layout), "
                             f"got {y.dtype} {tuple(y.shape)}")
        if out is None:
            out = torch.empty(handle.num_tokens, H, dtype=torch.bfloat16, device=buf.device)
        elif tuple(out.shape) != (handle.num_tokens, H) or out.dtype != torch.bfloat16 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous bf16 [{handle.num_tokens}, {H}] tensor")
        self._raise_if_failed()
        y = y.contiguous()
        row_stride = combine_row_stride(H)
        rstride = region_stride(M, row_stride)
        slot = self._acquire(COMBINE)
        try:
            common = self._common(COMBINE, slot, transport, rstride, row_stride, handle.topk)
            if self._stamps is not None:
                self._stamps.zero_()
            torch.ops.overlap.ll_combine_send(y, handle.row_pos, handle.row_expert, handle.row_weight,
                                              handle.src_counts, self._symm.peer_bases, common)
            transfer = self._send(COMBINE, slot, transport, rstride)
        except Exception:
            self._release(COMBINE, slot)
            raise
        wait_flags = int(transport != "nccl")

        def launch():
            torch.ops.overlap.ll_combine_recv(handle.token_slot, self._symm.peer_bases, out, common, wait_flags)

        hook = self._hook(COMBINE, slot, torch.cuda.current_stream(buf.device), transfer, launch, (out,), lambda: None,
                          kernel_waits=bool(wait_flags))
        if not return_recv_hook:
            hook()
        return out, hook


def low_latency_state(buffer, num_slots: Optional[int] = None) -> LowLatencyEP:
    """The :class:`LowLatencyEP` of ``buffer``, built (collectively) on first use.

    Call it once on every rank before capturing low-latency calls in a CUDA graph (setup
    allocates symmetric memory and communicates). ``num_slots``: operations of each kind that
    may be in flight at once (default 3).
    """
    state = getattr(buffer, "_low_latency", None)
    if state is None:
        state = LowLatencyEP(buffer, num_slots=DEFAULT_NUM_SLOTS if num_slots is None else num_slots)
        buffer._low_latency = state
    elif num_slots is not None and num_slots != state.num_slots:
        raise ValueError(f"this EPBuffer's low-latency state was built with num_slots={state.num_slots}")
    return state
