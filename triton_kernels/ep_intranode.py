"""Triton kernels of the ``triton`` EP backend: NVLink dispatch and combine over symmetric memory.

They speak the CUDA backend's ready handshake on the same buffer layout
(csrc/kernels/intranode.cuh), so both backends share the buffer management, the counts exchange
and the signal words. Sequence numbers come from the host here (the CUDA kernels keep theirs on
the GPU; program 0 records each one there, so the CUDA counts exchange that follows agrees).
Unlike the CUDA kernels, sending and receiving are two phases with a grid-wide barrier between:

1. ready: program 0 publishes ``seq * 4 + kind`` into every peer's ready[me]; every program
   waits until every ready[r] reached it (a smaller value: the peer is behind; a different one:
   the peer runs another operation under the same number).
2. send: stores straight into peers' regions, through pointers made from the int64 peer bases.
3. done: a CTA barrier, then one release-add per peer to done[me]; then wait (acquire) until
   every done[r] reached the running block total ``done_target``.
4. receive: copy the rows out (dispatch) or sum them in fp32 (combine).

Every wait is bounded; a timeout or mismatch writes ``{code, peer, seq, kind}`` to the status
words (host-mapped int32[4]) once per GPU (a sticky word in the buffer picks the first), and
later kernels on that GPU return at once.

The grid is persistent: exactly ``num_sms`` programs, dealt work items round-robin, an item
being a tile of ``BLOCK_T`` rows by ``BLOCK_H`` columns (small items keep the programs evenly
loaded). A tile is loaded whole before it is stored, so each program keeps a tile's worth of
bytes in flight (a row at a time is far too little for NVLink). Peer row addresses are hinted
16-byte aligned so that loads and stores are 16-byte vectors. The dispatch loops and the combine
reduce have no CTA barriers (picking a peer's values out of a [MAX_RANKS] vector stays within one
warp); the combine send-back exchanges its row addresses through shared memory once per tile.

``USE_GLOBALTIMER=False`` (the CPU interpreter, which has no inline assembly) bounds waits by
counting spins as 1 microsecond each instead of reading the GPU clock.
"""
from __future__ import annotations

import triton
import triton.language as tl

try:  # the GPU clock; absent from some Triton builds (then only the interpreter mode works)
    from triton.language.extra.cuda import globaltimer as _globaltimer
except ImportError:  # pragma: no cover
    _globaltimer = None

# Signal area of every rank's buffer (bytes from its base): kept equal to intranode.cuh.
# (tl.constexpr: the kernels read them as globals.)
READY_OFFSET = tl.constexpr(0)     # int64 ready[MAX_RANKS], written by rank r at index r
DONE_OFFSET = tl.constexpr(512)    # int64 done[MAX_RANKS], incremented by rank r's programs at index r
ERROR_OFFSET = tl.constexpr(1024)  # int32 sticky error word (local only)
OP_COUNT_OFFSET = tl.constexpr(1088)  # int64 last finished operation's sequence number (local only)
MAX_RANKS = tl.constexpr(32)

KIND_DISPATCH, KIND_COMBINE = tl.constexpr(1), tl.constexpr(2)
READY_TIMEOUT, DATA_TIMEOUT, OP_MISMATCH = tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
BUDGET_EXCEEDED = tl.constexpr(4)
FP8_BLOCK = tl.constexpr(128)
_SPIN_NS = tl.constexpr(1000)  # interpreter: what one spin counts for against the timeout


@triton.jit
def _now_ns(spins, USE_GLOBALTIMER: tl.constexpr):
    if USE_GLOBALTIMER:
        return _globaltimer()
    else:
        return spins * _SPIN_NS


@triton.jit
def _record_failure(my_base, status_addr, code, peer, seq, kind):
    """First failure on this GPU wins the sticky word and fills the status words (code last)."""
    sticky = (my_base + ERROR_OFFSET).to(tl.pointer_type(tl.int32))
    if tl.atomic_cas(sticky, 0, code, sem="relaxed", scope="gpu") == 0:
        status = status_addr.to(tl.pointer_type(tl.int32))
        tl.store(status + 1, peer.to(tl.int32))
        tl.store(status + 2, seq.to(tl.int32))
        tl.store(status + 3, kind)
        # The host reads the words after the kernel ends (or treats code != 0 as "rest valid").
        tl.store(status, code)


@triton.jit
def _spin_until_all(flags, rmask, target, timeout_ns, USE_GLOBALTIMER: tl.constexpr):
    """Acquire-read ``flags`` (masked lanes read as ``target``) until all are >= target or time runs out."""
    v = tl.atomic_add(flags, 0, mask=rmask, sem="acquire", scope="sys")
    v = tl.where(rmask, v, target)
    spins = tl.full([], 0, tl.int64)
    start = _now_ns(spins, USE_GLOBALTIMER)
    elapsed = start - start
    while (tl.min(v, axis=0) < target) & (elapsed <= timeout_ns):
        v = tl.atomic_add(flags, 0, mask=rmask, sem="acquire", scope="sys")
        v = tl.where(rmask, v, target)
        spins += 1
        elapsed = _now_ns(spins, USE_GLOBALTIMER) - start
    # Other threads of the program read peer data next: order them after the acquire.
    tl.debug_barrier()
    return v


@triton.jit
def _first_lane(cond, r):
    """Smallest lane index where cond holds (MAX_RANKS if none)."""
    return tl.min(tl.where(cond, r, MAX_RANKS), axis=0)


@triton.jit
def _start(peers_ptr, rank, W, seq, kind, timeout_ns, status_addr, USE_GLOBALTIMER: tl.constexpr):
    """Sticky-error check and ready handshake. Returns (ok, lane ids, lane mask, peer bases, my base)."""
    r = tl.arange(0, MAX_RANKS)
    rmask = r < W
    bases = tl.load(peers_ptr + r, mask=rmask, other=0)
    my_base = tl.load(peers_ptr + rank)
    sticky = tl.load((my_base + ERROR_OFFSET).to(tl.pointer_type(tl.int32)))
    ok = sticky == 0
    if ok:
        want = seq * 4 + kind
        if tl.program_id(0) == 0:
            slots = (bases + READY_OFFSET + rank * 8).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(slots, tl.zeros_like(bases) + want, mask=rmask, sem="release", scope="sys")
            # Only kernels launched after this one read it (stream order), so any time is fine.
            tl.store((my_base + OP_COUNT_OFFSET).to(tl.pointer_type(tl.int64)), seq)
        flags = (my_base + READY_OFFSET + r.to(tl.int64) * 8).to(tl.pointer_type(tl.int64))
        v = _spin_until_all(flags, rmask, seq * 4, timeout_ns, USE_GLOBALTIMER)
        bad = rmask & (v != want)
        peer = _first_lane(bad, r)
        if peer < MAX_RANKS:
            late = tl.max(tl.where(r == peer, v, 0), axis=0) < seq * 4
            code = tl.where(late, READY_TIMEOUT, OP_MISMATCH)
            _record_failure(my_base, status_addr, code, peer, seq, kind)
            ok = False
    return ok, r, rmask, bases, my_base


@triton.jit
def _finish_send(r, rmask, bases, my_base, rank, seq, kind, done_target, timeout_ns, status_addr,
                 USE_GLOBALTIMER: tl.constexpr):
    """Signal done to every peer, then wait for every peer's programs. Returns ok."""
    tl.debug_barrier()  # every thread's stores of this program are issued before the release
    slots = (bases + DONE_OFFSET + rank * 8).to(tl.pointer_type(tl.int64))
    tl.atomic_add(slots, tl.full(bases.shape, 1, tl.int64), mask=rmask, sem="release", scope="sys")
    flags = (my_base + DONE_OFFSET + r.to(tl.int64) * 8).to(tl.pointer_type(tl.int64))
    v = _spin_until_all(flags, rmask, done_target, timeout_ns, USE_GLOBALTIMER)
    peer = _first_lane(rmask & (v < done_target), r)
    ok = peer >= MAX_RANKS
    if peer < MAX_RANKS:
        _record_failure(my_base, status_addr, DATA_TIMEOUT, peer, seq, kind)
    return ok


@triton.jit
def _rows_ptr(base, offset, rows, stride_bytes, dtype: tl.constexpr, ALIGN: tl.constexpr = 16):
    """Pointers to the first element of ``rows`` of a region (``ALIGN``-byte aligned by construction:
    bases, region offsets and row strides all are)."""
    addr = base + offset + rows.to(tl.int64) * stride_bytes
    return tl.multiple_of(addr.to(tl.pointer_type(dtype)), ALIGN)


@triton.jit
def _quantise(v, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """e4m3 values and one fp32 scale per 128 columns: scale = amax / 448 (1 if all zero)."""
    nb: tl.constexpr = BLOCK_H // FP8_BLOCK
    f = tl.reshape(v.to(tl.float32), (BLOCK_T, nb, FP8_BLOCK))
    amax = tl.max(tl.abs(f), axis=2)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
    q = tl.math.div_rn(f, tl.broadcast_to(scale[:, :, None], (BLOCK_T, nb, FP8_BLOCK)))
    return tl.reshape(q.to(tl.float8e4nv), (BLOCK_T, BLOCK_H)), scale


@triton.jit
def _send_rows(r, t, tmask, slot_ptr, send_row, bases, d, W, offset, stride_bytes, dtype: tl.constexpr,
               ALIGN: tl.constexpr):
    """Pointers to the destination rows on rank ``d`` of a token tile, and which tokens go there.

    ``send_row``/``bases`` are [MAX_RANKS] vectors that one warp holds whole, so picking lane d
    is a few shuffles (no shared memory, no barrier in the send loop).
    """
    slot = tl.load(slot_ptr + t * W + d, mask=tmask, other=-1)
    first = tl.sum(tl.where(r == d, send_row, 0), axis=0)
    base = tl.sum(tl.where(r == d, bases, 0), axis=0)
    return _rows_ptr(base, offset, first + slot, stride_bytes, dtype, ALIGN), slot >= 0


@triton.jit(do_not_specialize=["rank", "seq", "done_target", "num_tokens", "timeout_ns", "status_addr",
                               "num_out_rows"])
def ep_dispatch_kernel(x_ptr, topk_idx_ptr, topk_w_ptr, slot_ptr, matrix_ptr, peers_ptr,
                       recv_x_ptr, recv_idx_ptr, recv_w_ptr, counts_ptr, recv_scales_ptr,
                       rank, W, max_tokens, seq, done_target, timeout_ns, status_addr,
                       num_tokens, hidden, topk, num_local_experts,
                       x_offset, row_stride, meta_offset, num_out_rows,
                       FP8: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, USE_GLOBALTIMER: tl.constexpr):
    """One dispatch (see the module docstring); grid = (num_sms,)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = seq.to(tl.int64)
    ok, r, rmask, bases, my_base = _start(peers_ptr, rank, W, seq, KIND_DISPATCH, timeout_ns, status_addr,
                                          USE_GLOBALTIMER)

    # Column d of the count matrix: this rank's rows on rank d start after those of ranks < me;
    # this rank receives from every source s, rows in order of s.
    s2 = tl.arange(0, MAX_RANKS)[:, None]
    counts_sd = tl.load(matrix_ptr + s2 * W + r[None, :], mask=(s2 < rank) & rmask[None, :], other=0)
    send_row = tl.sum(counts_sd, axis=0).to(tl.int64)  # [MAX_RANKS], by destination
    num_recv = tl.sum(tl.load(matrix_ptr + r * W + rank, mask=rmask, other=0), axis=0)
    if ok:
        if pid == 0:
            if num_recv > num_out_rows:  # more rows than the caller's budget: keep what fits, report
                _record_failure(my_base, status_addr, BUDGET_EXCEEDED, num_recv, seq, KIND_DISPATCH)
    num_recv = tl.minimum(num_recv, num_out_rows)
    out_ty: tl.constexpr = tl.float8e4nv if FP8 else x_ptr.dtype.element_ty
    cols0 = tl.arange(0, BLOCK_H)
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < topk

    n_hb = tl.cdiv(hidden, BLOCK_H)  # work items: (row tile, column block), dealt round-robin

    if ok:
        # ---- send: a tile of tokens is read once and stored to every rank that hosts one of its experts.
        item = pid
        while item < tl.cdiv(num_tokens, BLOCK_T) * n_hb:
            t64 = ((item // n_hb) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            tmask = t64 < num_tokens
            hh = (item % n_hb) * BLOCK_H
            if hh == 0:  # the routing metadata travels with a tile's first column block
                tk = t64[:, None] * topk + kk[None, :]
                tkmask = tmask[:, None] & kmask[None, :]
                e = tl.load(topk_idx_ptr + tk, mask=tkmask, other=-1)
                wbits = tl.load(topk_w_ptr + tk, mask=tkmask, other=0.0).to(tl.int32, bitcast=True)
                d = 0
                while d < W:
                    meta, to_d = _send_rows(r, t64, tmask, slot_ptr, send_row, bases, d, W, meta_offset,
                                            topk * 8, tl.int64, 8)
                    local = e - d * num_local_experts
                    here = (e >= 0) & (local >= 0) & (local < num_local_experts)
                    lo = tl.where(here, local, -1) & 0xFFFFFFFF
                    hi = tl.where(here, wbits, 0).to(tl.int64) << 32
                    tl.store(meta[:, None] + kk[None, :], hi | lo, mask=to_d[:, None] & kmask[None, :])
                    d += 1
            cols = hh + cols0
            m = tmask[:, None] & (cols < hidden)[None, :]
            v = tl.load(x_ptr + t64[:, None] * hidden + cols[None, :], mask=m, other=0.0)
            if FP8:
                v, scale = _quantise(v, BLOCK_T, BLOCK_H)
            d = 0
            while d < W:
                rows, to_d = _send_rows(r, t64, tmask, slot_ptr, send_row, bases, d, W, x_offset,
                                        row_stride, out_ty, 16)
                tl.store(rows[:, None] + cols[None, :], v, mask=m & to_d[:, None])
                if FP8:
                    sc = hh // FP8_BLOCK + tl.arange(0, BLOCK_H // FP8_BLOCK)
                    srow = (rows + hidden).to(tl.pointer_type(tl.float32), bitcast=True)
                    tl.store(srow[:, None] + sc[None, :], scale,
                             mask=(tmask & to_d)[:, None] & (sc * FP8_BLOCK < hidden)[None, :])
                d += 1
            item += nprog
        ok = _finish_send(r, rmask, bases, my_base, rank, seq, KIND_DISPATCH, done_target, timeout_ns, status_addr,
                          USE_GLOBALTIMER)

    if ok:
        # ---- receive: rows [0, num_recv) of the local region are already in final order.
        item = pid
        while item < tl.cdiv(num_recv, BLOCK_T) * n_hb:
            i = ((item // n_hb) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            imask = i < num_recv
            hh = (item % n_hb) * BLOCK_H
            src = _rows_ptr(my_base, x_offset, i, row_stride, out_ty)
            cols = hh + cols0
            m = imask[:, None] & (cols < hidden)[None, :]
            v = tl.load(src[:, None] + cols[None, :], mask=m, cache_modifier=".cg")
            tl.store(recv_x_ptr + i[:, None] * hidden + cols[None, :], v, mask=m)
            if hh == 0:  # scales and metadata once per row tile
                if FP8:
                    ns = hidden // FP8_BLOCK
                    sc = tl.arange(0, BLOCK_S)
                    sm = imask[:, None] & (sc < ns)[None, :]
                    srow = (src + hidden).to(tl.pointer_type(tl.float32), bitcast=True)
                    sv = tl.load(srow[:, None] + sc[None, :], mask=sm, cache_modifier=".cg")
                    tl.store(recv_scales_ptr + i[:, None] * ns + sc[None, :], sv, mask=sm)
                mm = imask[:, None] & kmask[None, :]
                meta = _rows_ptr(my_base, meta_offset, i, topk * 8, tl.int64, 8)
                pair = tl.load(meta[:, None] + kk[None, :], mask=mm, cache_modifier=".cg", other=-1)
                local = (pair & 0xFFFFFFFF).to(tl.int32)
                weight = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                tl.store(recv_idx_ptr + i[:, None] * topk + kk[None, :], local.to(tl.int64), mask=mm)
                tl.store(recv_w_ptr + i[:, None] * topk + kk[None, :], weight, mask=mm)
                tl.atomic_add(counts_ptr + local, 1, mask=mm & (local >= 0), sem="relaxed", scope="gpu")
            item += nprog


@triton.jit(do_not_specialize=["rank", "seq", "done_target", "num_tokens", "timeout_ns", "status_addr"])
def ep_combine_kernel(y_ptr, slot_ptr, matrix_ptr, peers_ptr, out_ptr,
                      rank, W, max_tokens, seq, done_target, timeout_ns, status_addr,
                      num_tokens, hidden, region_offset, row_stride,
                      BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_TS: tl.constexpr,
                      USE_GLOBALTIMER: tl.constexpr):
    """One combine (see the module docstring); grid = (num_sms,). The reduce moves tiles of
    BLOCK_T rows (two ranks' tiles in flight plus fp32 accumulators), the send-back BLOCK_TS rows."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = seq.to(tl.int64)
    ok, r, rmask, bases, my_base = _start(peers_ptr, rank, W, seq, KIND_COMBINE, timeout_ns, status_addr,
                                          USE_GLOBALTIMER)
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    recv_from = tl.load(matrix_ptr + r * W + rank, mask=rmask, other=0)
    recv_start = tl.cumsum(recv_from, axis=0) - recv_from          # exclusive prefix, by source
    num_recv = tl.sum(recv_from, axis=0)
    cols0 = tl.arange(0, BLOCK_H)
    n_hb = tl.cdiv(hidden, BLOCK_H)  # work items: (row tile, column block), dealt round-robin

    if ok:
        # ---- send back: received row i came from the last source whose rows start at or before i
        # (an empty source shares the next one's start).
        item = pid
        while item < tl.cdiv(num_recv, BLOCK_TS) * n_hb:
            i = (item // n_hb) * BLOCK_TS + tl.arange(0, BLOCK_TS)
            imask = i < num_recv
            hh = (item % n_hb) * BLOCK_H
            base = tl.zeros([BLOCK_TS], tl.int64)
            slot = i
            d = 0
            while d < W:  # 1-D and per-lane only: no 2-D reduction (and no CTA barrier) per item
                start_d = tl.sum(tl.where(r == d, recv_start, 0), axis=0)
                later = i >= start_d
                base = tl.where(later, tl.sum(tl.where(r == d, bases, 0), axis=0), base)
                slot = tl.where(later, i - start_d, slot)
                d += 1
            dst = _rows_ptr(base, region_offset, rank * max_tokens + slot.to(tl.int64), row_stride, dtype)
            cols = hh + cols0
            m = imask[:, None] & (cols < hidden)[None, :]
            v = tl.load(y_ptr + i.to(tl.int64)[:, None] * hidden + cols[None, :], mask=m)
            tl.store(dst[:, None] + cols[None, :], v, mask=m)
            item += nprog
        ok = _finish_send(r, rmask, bases, my_base, rank, seq, KIND_COMBINE, done_target, timeout_ns, status_addr,
                          USE_GLOBALTIMER)

    if ok:
        # ---- reduce: token t's row from rank d sits at (d * max_tokens + slot[t, d]); sum in
        # fp32 in ascending rank order (absent ranks add +0, which changes nothing).
        item = pid
        while item < tl.cdiv(num_tokens, BLOCK_T) * n_hb:
            t = ((item // n_hb) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            tmask = t < num_tokens
            cols = (item % n_hb) * BLOCK_H + cols0
            cmask = (cols < hidden)[None, :]
            acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
            d = 0
            while d < W:  # two ranks' rows in flight per step, added in rank order
                slot_a = tl.load(slot_ptr + t * W + d, mask=tmask, other=-1)
                slot_b = tl.load(slot_ptr + t * W + d + 1, mask=tmask & (d + 1 < W), other=-1)
                rows_a = _rows_ptr(my_base, region_offset, d * max_tokens + slot_a.to(tl.int64), row_stride, dtype)
                rows_b = _rows_ptr(my_base, region_offset, (d + 1) * max_tokens + slot_b.to(tl.int64), row_stride,
                                   dtype)
                a = tl.load(rows_a[:, None] + cols[None, :], mask=(tmask & (slot_a >= 0))[:, None] & cmask,
                            other=0.0, cache_modifier=".cg")
                b = tl.load(rows_b[:, None] + cols[None, :], mask=(tmask & (slot_b >= 0))[:, None] & cmask,
                            other=0.0, cache_modifier=".cg")
                acc += a.to(tl.float32)
                acc += b.to(tl.float32)
                d += 2
            tl.store(out_ptr + t[:, None] * hidden + cols[None, :], acc.to(dtype), mask=tmask[:, None] & cmask)
            item += nprog
