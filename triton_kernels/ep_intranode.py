"""Triton kernels of the ``triton`` EP backend: NVLink dispatch and combine over symmetric memory.

They speak the CUDA kernels' protocol on the same buffer layout (csrc/kernels/intranode.cuh),
so both backends share the buffer management, the counts exchange, the signal words and the
per-row arrival flags:

1. numbering: every program takes ``seq = op_count + 1`` from its own buffer; the last program
   to finish stores ``op_count = seq`` (a counter of finished programs picks it), so launches
   carry no per-call argument and a captured CUDA graph replays correctly.
2. ready: program 0 publishes ``seq * 4 + kind`` into every peer's ready[me]; every program
   waits until every ready[r] reached ``seq * 4`` (a peer may be one operation ahead; the same
   number with another kind is a mismatch). A rank starts operation ``seq`` only once its
   operation ``seq - 1`` has finished reading its regions, so nobody writes into them early.
3. Work is claimed, not assigned (Triton has no warp specialisation to rely on): the first
   ``num_send`` programs send, claiming tiles one at a time from a counter in the local signal
   area, then join the others, which receive (dispatch) or reduce (combine), claiming their
   tiles from a second counter; the last program to finish resets both. A fixed round-robin
   split left the slowest program holding up the operation (the CUDA kernels measured the same),
   and a sender with nothing left to send now receives instead of idling. Senders sit at the
   lowest program ids, which the GPU schedules first and the CPU interpreter runs first (there,
   program 0 thus claims every tile).
   Senders: a tile of rows is loaded whole, then stored straight into every destination's
   region (a rank's own rows skip it: dispatch writes them into the outputs, combine reads them
   from y); after the tile, a CTA barrier and one system-scope release store of ``seq`` per
   row into that row's u64 arrival flag (the threads release in parallel: one fence each).
   Receivers: wait (relaxed spin, then acquire) until a tile's flags reach ``seq``, then copy
   the rows out (dispatch, rows of the peers visited source-interleaved) or sum each token's
   rows in fp32, in ascending rank order, exactly like the CUDA combine (bit for bit).

Every wait is bounded; a timeout or mismatch writes ``{code, peer, seq, kind}`` to the status
words (host-mapped int32[4]) once per GPU (a sticky word in the buffer picks the first), and
later kernels on that GPU return at once. A dispatch that receives more rows than its outputs
hold keeps the rows that fit and reports BUDGET_EXCEEDED.

Peer row addresses are hinted 16-byte aligned (bases, region offsets and row strides are) so
that loads and stores are 16-byte vectors. ``USE_GLOBALTIMER=False`` (the CPU interpreter, which
has no inline assembly) bounds waits by counting spins as 1 microsecond each instead.
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
READY_OFFSET = tl.constexpr(0)      # int64 ready[MAX_RANKS], written by rank r at index r
DONE_OFFSET = tl.constexpr(512)     # int64 done[MAX_RANKS]: part of the shared layout, unused here
ERROR_OFFSET = tl.constexpr(1024)   # int32 sticky error word (local only)
OP_COUNT_OFFSET = tl.constexpr(1088)  # int64 last finished operation's sequence number (local only)
FINISHED_OFFSET = tl.constexpr(1152)  # int32 programs of the running operation that finished (local only)
SEND_WORK_OFFSET = tl.constexpr(1216)  # int32 send tiles claimed so far in the running operation (local only)
RECV_WORK_OFFSET = tl.constexpr(1220)  # int32 receive (dispatch) / reduce (combine) tiles claimed (local only)
MAX_RANKS = tl.constexpr(32)        # slots of ready[] (the kernels' rank vectors have BLOCK_W <= 32 lanes)

KIND_DISPATCH, KIND_COMBINE = tl.constexpr(1), tl.constexpr(2)
READY_TIMEOUT, DATA_TIMEOUT, OP_MISMATCH = tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
BUDGET_EXCEEDED = tl.constexpr(4)
FP8_BLOCK = tl.constexpr(128)
_SPIN_NS = tl.constexpr(1000)  # interpreter: what one spin counts for against the timeout


# ---------------------------------------------------------------------------------------------- protocol
@triton.jit
def _now_ns(spins, USE_GLOBALTIMER: tl.constexpr):
    if USE_GLOBALTIMER:
        return _globaltimer()
    else:
        return spins * _SPIN_NS


@triton.jit
def _ptr(addr, dtype: tl.constexpr):
    """An int64 address (or tensor of them) as a pointer to ``dtype``."""
    return addr.to(tl.pointer_type(dtype))


@triton.jit
def _pick(vec, r, i):
    """Lane ``i`` of a [BLOCK_W] vector (one warp holds it whole: a few shuffles)."""
    return tl.sum(tl.where(r == i, vec, 0), axis=0)


@triton.jit
def _all_min(v):
    """Smallest element of a 1-D or 2-D tensor."""
    if len(v.shape) == 2:
        return tl.min(tl.min(v, axis=1), axis=0)
    else:
        return tl.min(v, axis=0)


@triton.jit
def _record_failure(my_base, status_addr, code, peer, seq, kind):
    """First failure on this GPU wins the sticky word and fills the status words (code last)."""
    sticky = _ptr(my_base + ERROR_OFFSET, tl.int32)
    if tl.atomic_cas(sticky, 0, code, sem="relaxed", scope="gpu") == 0:
        status = _ptr(status_addr, tl.int32)
        tl.store(status + 1, peer.to(tl.int32))
        tl.store(status + 2, seq.to(tl.int32))
        tl.store(status + 3, kind)
        # The host reads the words after the kernel ends (or treats code != 0 as "rest valid").
        tl.store(status, code)


@triton.jit
def _wait_at_least(flags, mask, target, timeout_ns, USE_GLOBALTIMER: tl.constexpr):
    """Wait until every masked flag is >= ``target`` or ``timeout_ns`` passed; returns the
    flags, acquired (masked lanes read as ``target``).

    The spin reads relaxed (volatile); one acquire read per flag follows, and a CTA barrier
    orders the other threads' reads of the data after it.
    """
    # Only a scalar is carried through the loop (a loop-carried tile of flags followed by the
    # atomics below trips Triton 3.6's layout pass on 2-D tiles).
    pending = _all_min(tl.load(flags, mask=mask, other=target, volatile=True)) < target
    if pending:
        spins = tl.full([], 0, tl.int64)
        start = _now_ns(spins, USE_GLOBALTIMER)
        elapsed = start - start
        while pending & (elapsed <= timeout_ns):
            pending = _all_min(tl.load(flags, mask=mask, other=target, volatile=True)) < target
            spins += 1
            elapsed = _now_ns(spins, USE_GLOBALTIMER) - start
    v = tl.atomic_add(flags, 0, mask=mask, sem="acquire", scope="sys")
    v = tl.where(mask, v, target)
    tl.debug_barrier()
    return v


@triton.jit
def _raise_flags(addr, mask, seq):
    """Release ``seq`` into the u64 flags at ``addr`` (int64 addresses) once this program's
    earlier stores are issued: a CTA barrier, then one release store per flag, in parallel."""
    tl.debug_barrier()
    tl.atomic_xchg(_ptr(addr, tl.int64), tl.zeros_like(addr) + seq, mask=mask, sem="release", scope="sys")


@triton.jit
def _begin_operation(peers_ptr, rank, W, kind, timeout_ns, status_addr, BLOCK_W: tl.constexpr,
                     USE_GLOBALTIMER: tl.constexpr):
    """Sequence number, sticky-error check and ready handshake.

    Returns (ok, seq, lane ids, lane mask, peer bases, my base); ok is False when an earlier
    operation failed on this GPU or this one's handshake failed (then it was recorded).
    """
    r = tl.arange(0, BLOCK_W)
    rmask = r < W
    bases = tl.load(peers_ptr + r, mask=rmask, other=0)
    my_base = tl.load(peers_ptr + rank)
    # Every program reads op_count before the last one finishes and bumps it.
    seq = tl.load(_ptr(my_base + OP_COUNT_OFFSET, tl.int64), volatile=True) + 1
    ok = tl.load(_ptr(my_base + ERROR_OFFSET, tl.int32), volatile=True) == 0
    if ok:
        want = seq * 4 + kind
        if tl.program_id(0) == 0:
            slots = _ptr(bases + READY_OFFSET + rank * 8, tl.int64)
            tl.atomic_xchg(slots, tl.zeros_like(bases) + want, mask=rmask, sem="release", scope="sys")
        v = _wait_at_least(_ptr(my_base + READY_OFFSET + r.to(tl.int64) * 8, tl.int64), rmask, seq * 4,
                           timeout_ns, USE_GLOBALTIMER)
        late = v < seq * 4
        bad = rmask & (late | (((v >> 2) == seq) & (v != want)))
        peer = tl.min(tl.where(bad, r, W), axis=0)
        if peer < W:
            code = tl.where(_pick(late.to(tl.int32), r, peer) != 0, READY_TIMEOUT, OP_MISMATCH)
            _record_failure(my_base, status_addr, code, peer, seq, kind)
            ok = False
    return ok, seq, r, rmask, bases, my_base


@triton.jit
def _end_operation(my_base, seq):
    """The last program to get here records ``seq`` as finished (the next kernel on the stream
    starts after this one, so it reads it). Returns whether this program was the last."""
    tl.debug_barrier()
    finished = _ptr(my_base + FINISHED_OFFSET, tl.int32)
    last = tl.atomic_add(finished, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1
    if last:
        tl.store(finished, 0)
        tl.store(_ptr(my_base + SEND_WORK_OFFSET, tl.int32), 0)  # every program is past its last claim
        tl.store(_ptr(my_base + RECV_WORK_OFFSET, tl.int32), 0)
        tl.store(_ptr(my_base + OP_COUNT_OFFSET, tl.int64), seq)
    return last


@triton.jit
def _claim(my_base, counter_offset):
    """The next tile of this operation's work counter at ``counter_offset`` (one atomic per program)."""
    return tl.atomic_add(_ptr(my_base + counter_offset, tl.int32), 1, sem="relaxed", scope="gpu").to(tl.int64)


@triton.jit
def _receive_counts(matrix_ptr, r, rmask, rank, W):
    """Rows this rank receives from each source (column ``rank`` of the count matrix), where
    each source's rows start (exclusive prefix: receive order is source rank, then token), and
    the most rows any one peer sends here."""
    recv_from = tl.load(matrix_ptr + r * W + rank, mask=rmask, other=0).to(tl.int64)
    recv_start = tl.cumsum(recv_from, axis=0) - recv_from
    most = tl.max(tl.where(r != rank, recv_from, 0), axis=0)
    return recv_from, recv_start, most


@triton.jit
def _peer_tile(w, r, rank, W, recv_from, recv_start, BLOCK: tl.constexpr):
    """Work item ``w`` over the rows received from peers, source-interleaved (item w: peer
    w % (W - 1), skipping this rank, its tile w // (W - 1)): (source, its first row, the
    tile's rows, which of them exist). With one rank there is no item (the kernels keep W
    unspecialised, so W - 1 never becomes a constant zero divisor)."""
    p = w % (W - 1)
    s = p + (p >= rank).to(tl.int32)
    start = _pick(recv_start, r, s)
    q = (w // (W - 1)) * BLOCK + tl.arange(0, BLOCK)
    return s, start, start + q, q < _pick(recv_from, r, s)


# ---------------------------------------------------------------------------------------------- rows
@triton.jit
def _rows_ptr(base, offset, rows, stride_bytes, dtype: tl.constexpr, ALIGN: tl.constexpr = 16):
    """Pointers to the first element of ``rows`` of a region (``ALIGN``-byte aligned by construction:
    bases, region offsets and row strides all are)."""
    addr = base + offset + rows.to(tl.int64) * stride_bytes
    # The hint must sit on the cast itself (a hint on a helper's return value is lost when the
    # helper is inlined).
    return tl.multiple_of(addr.to(tl.pointer_type(dtype)), ALIGN)


@triton.jit
def _quantise(v, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """e4m3 values and one fp32 scale per 128 columns: scale = amax / 448 (1 if all zero), value =
    x * (1 / scale) (one division per block, so every backend rounds the same way)."""
    nb: tl.constexpr = BLOCK_H // FP8_BLOCK
    f = tl.reshape(v.to(tl.float32), (BLOCK_T, nb, FP8_BLOCK))
    amax = tl.max(tl.abs(f), axis=2)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    q = f * tl.broadcast_to(inv[:, :, None], (BLOCK_T, nb, FP8_BLOCK))
    return tl.reshape(q.to(tl.float8e4nv), (BLOCK_T, BLOCK_H)), scale


@triton.jit
def _write_meta(recv_idx_ptr, recv_w_ptr, counts_ptr, rows, kk, topk, mask, local, weight):
    """Output rows' routing metadata, and their (token, local expert) pairs counted."""
    at = rows[:, None] * topk + kk[None, :]
    tl.store(recv_idx_ptr + at, local.to(tl.int64), mask=mask)
    tl.store(recv_w_ptr + at, weight, mask=mask)
    tl.atomic_add(counts_ptr + local, 1, mask=mask & (local >= 0), sem="relaxed", scope="gpu")


# ---------------------------------------------------------------------------------------------- dispatch
@triton.jit
def _dispatch_send_meta(topk_idx_ptr, topk_w_ptr, slot_ptr, recv_idx_ptr, recv_w_ptr, counts_ptr, t, tmask,
                        r, bases, send_row, own_start, rank, W, topk, num_local_experts, meta_offset, num_out_rows,
                        BLOCK_K: tl.constexpr):
    """A token tile's metadata ({local expert id or -1, weight bits} per k) to every destination."""
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < topk
    tk = t[:, None] * topk + kk[None, :]
    tkmask = tmask[:, None] & kmask[None, :]
    e = tl.load(topk_idx_ptr + tk, mask=tkmask, other=-1)
    wt = tl.load(topk_w_ptr + tk, mask=tkmask, other=0.0)
    d = 0
    while d < W:
        slot = tl.load(slot_ptr + t * W + d, mask=tmask, other=-1)
        local = e - d * num_local_experts
        here = (e >= 0) & (local >= 0) & (local < num_local_experts)
        local = tl.where(here, local, -1)
        weight = tl.where(here, wt, 0.0)
        if d == rank:
            own = own_start + slot
            _write_meta(recv_idx_ptr, recv_w_ptr, counts_ptr, own, kk, topk,
                        ((slot >= 0) & (own < num_out_rows))[:, None] & kmask[None, :], local, weight)
        else:
            meta = _rows_ptr(_pick(bases, r, d), meta_offset, _pick(send_row, r, d) + slot, topk * 8, tl.int64, 8)
            pair = (weight.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (local & 0xFFFFFFFF)
            tl.store(meta[:, None] + kk[None, :], pair, mask=(slot >= 0)[:, None] & kmask[None, :])
        d += 1


@triton.jit
def _dispatch_send(x_ptr, topk_idx_ptr, topk_w_ptr, slot_ptr, recv_x_ptr, recv_idx_ptr, recv_w_ptr, counts_ptr,
                   recv_scales_ptr, r, rmask, bases, send_row, own_start, rank, W, seq, num_tokens, hidden, topk,
                   num_local_experts, x_offset, row_stride, meta_offset, flag_offset, num_out_rows, my_base,
                   FP8: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Token tiles, claimed one at a time: each row read once, stored to every rank that hosts
    one of its experts (this rank's own rows straight into the outputs), then the peers' arrival
    flags of the tile raised together."""
    out_ty: tl.constexpr = tl.float8e4nv if FP8 else x_ptr.dtype.element_ty
    tile = _claim(my_base, SEND_WORK_OFFSET)
    while tile < tl.cdiv(num_tokens, BLOCK_T):
        t = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        tmask = t < num_tokens
        # Metadata first (tiny), so its stores overlap with the row loads below.
        _dispatch_send_meta(topk_idx_ptr, topk_w_ptr, slot_ptr, recv_idx_ptr, recv_w_ptr, counts_ptr, t, tmask,
                            r, bases, send_row, own_start, rank, W, topk, num_local_experts, meta_offset,
                            num_out_rows, BLOCK_K)
        hb = 0  # column block (counting blocks, not columns, keeps their alignment visible to the compiler)
        while hb < tl.cdiv(hidden, BLOCK_H):
            cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            m = tmask[:, None] & (cols < hidden)[None, :]
            v = tl.load(x_ptr + t[:, None] * hidden + cols[None, :], mask=m, other=0.0)
            if FP8:
                v, scale = _quantise(v, BLOCK_T, BLOCK_H)
                sc = hb * (BLOCK_H // FP8_BLOCK) + tl.arange(0, BLOCK_H // FP8_BLOCK)
                scmask = (sc * FP8_BLOCK < hidden)[None, :]
            d = 0
            while d < W:
                slot = tl.load(slot_ptr + t * W + d, mask=tmask, other=-1)
                if d == rank:
                    own = own_start + slot
                    to_me = (slot >= 0) & (own < num_out_rows)  # past the budget: dropped (and reported)
                    tl.store(recv_x_ptr + own[:, None] * hidden + cols[None, :], v, mask=m & to_me[:, None])
                    if FP8:
                        tl.store(recv_scales_ptr + own[:, None] * (hidden // FP8_BLOCK) + sc[None, :], scale,
                                 mask=to_me[:, None] & scmask)
                else:
                    rows = _rows_ptr(_pick(bases, r, d), x_offset, _pick(send_row, r, d) + slot, row_stride, out_ty)
                    to_d = slot >= 0
                    tl.store(rows[:, None] + cols[None, :], v, mask=m & to_d[:, None])
                    if FP8:  # the scales follow the row's e4m3 bytes
                        srow = (rows + hidden).to(tl.pointer_type(tl.float32), bitcast=True)
                        tl.store(srow[:, None] + sc[None, :], scale, mask=to_d[:, None] & scmask)
                d += 1
            hb += 1
        slots = tl.load(slot_ptr + t[:, None] * W + r[None, :], mask=tmask[:, None] & rmask[None, :], other=-1)
        to_peer = (slots >= 0) & (r != rank)[None, :]
        _raise_flags(bases[None, :] + flag_offset + (send_row[None, :] + slots) * 8, to_peer, seq)
        tile = _claim(my_base, SEND_WORK_OFFSET)


@triton.jit
def _dispatch_receive(recv_x_ptr, recv_idx_ptr, recv_w_ptr, counts_ptr, recv_scales_ptr, r, my_base, rank, W, seq,
                      timeout_ns, status_addr, recv_from, recv_start, most, hidden, topk, x_offset, row_stride,
                      meta_offset, flag_offset, num_out_rows,
                      FP8: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_S: tl.constexpr, USE_GLOBALTIMER: tl.constexpr):
    """Peers' rows, a claimed tile at a time as their flags come up, from the local region
    (already in receive order) into the outputs; a timeout is recorded and ends the loop."""
    out_ty: tl.constexpr = tl.float8e4nv if FP8 else recv_x_ptr.dtype.element_ty
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < topk
    ok = tl.full([], 1, tl.int1)
    w = _claim(my_base, RECV_WORK_OFFSET)
    while (w < (W - 1) * tl.cdiv(most, BLOCK_T)) & ok:
        s, _, i, imask = _peer_tile(w, r, rank, W, recv_from, recv_start, BLOCK_T)
        imask = imask & (i < num_out_rows)  # past the budget: dropped (and reported)
        v = _wait_at_least(_ptr(my_base + flag_offset + i * 8, tl.int64), imask, seq, timeout_ns, USE_GLOBALTIMER)
        if _all_min(v) < seq:
            _record_failure(my_base, status_addr, DATA_TIMEOUT, s, seq, KIND_DISPATCH)
            ok = False
        else:
            src = _rows_ptr(my_base, x_offset, i, row_stride, out_ty)
            hb = 0
            while hb < tl.cdiv(hidden, BLOCK_H):
                cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
                m = imask[:, None] & (cols < hidden)[None, :]
                tl.store(recv_x_ptr + i[:, None] * hidden + cols[None, :],
                         tl.load(src[:, None] + cols[None, :], mask=m, cache_modifier=".cg"), mask=m)
                hb += 1
            if FP8:
                ns = hidden // FP8_BLOCK
                sc = tl.arange(0, BLOCK_S)
                sm = imask[:, None] & (sc < ns)[None, :]
                srow = (src + hidden).to(tl.pointer_type(tl.float32), bitcast=True)
                tl.store(recv_scales_ptr + i[:, None] * ns + sc[None, :],
                         tl.load(srow[:, None] + sc[None, :], mask=sm, cache_modifier=".cg"), mask=sm)
            mm = imask[:, None] & kmask[None, :]
            meta = _rows_ptr(my_base, meta_offset, i, topk * 8, tl.int64, 8)
            pair = tl.load(meta[:, None] + kk[None, :], mask=mm, cache_modifier=".cg", other=-1)
            local = (pair & 0xFFFFFFFF).to(tl.int32)
            weight = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            _write_meta(recv_idx_ptr, recv_w_ptr, counts_ptr, i, kk, topk, mm, local, weight)
            w = _claim(my_base, RECV_WORK_OFFSET)


@triton.jit(do_not_specialize=["rank", "W", "num_tokens", "timeout_ns", "status_addr", "num_out_rows", "num_send"])
def ep_dispatch_kernel(x_ptr, topk_idx_ptr, topk_w_ptr, slot_ptr, matrix_ptr, peers_ptr,
                       recv_x_ptr, recv_idx_ptr, recv_w_ptr, counts_ptr, recv_scales_ptr,
                       rank, W, timeout_ns, status_addr,
                       num_tokens, hidden, topk, num_local_experts,
                       x_offset, row_stride, meta_offset, flag_offset, num_out_rows, num_send,
                       FP8: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr, USE_GLOBALTIMER: tl.constexpr):
    """One dispatch (see the module docstring); grid = (num_sms,); programs [0, num_send) send
    first, then every program receives. Per-rank vectors have BLOCK_W >= W lanes (small: a tile's flags are one per thread)."""
    ok, seq, r, rmask, bases, my_base = _begin_operation(peers_ptr, rank, W, KIND_DISPATCH, timeout_ns, status_addr,
                                                         BLOCK_W, USE_GLOBALTIMER)
    started = ok
    recv_from, recv_start, most = _receive_counts(matrix_ptr, r, rmask, rank, W)
    # This rank's rows on rank d start after those of the ranks below it.
    s2 = r[:, None]
    counts_sd = tl.load(matrix_ptr + s2 * W + r[None, :], mask=(s2 < rank) & rmask[None, :], other=0)
    send_row = tl.sum(counts_sd, axis=0).to(tl.int64)  # [BLOCK_W], by destination
    own_start = _pick(recv_start, r, rank)
    if ok:
        if tl.program_id(0) < num_send:
            _dispatch_send(x_ptr, topk_idx_ptr, topk_w_ptr, slot_ptr, recv_x_ptr, recv_idx_ptr, recv_w_ptr,
                           counts_ptr, recv_scales_ptr, r, rmask, bases, send_row, own_start, rank, W, seq,
                           num_tokens, hidden, topk, num_local_experts, x_offset, row_stride, meta_offset,
                           flag_offset, num_out_rows, my_base, FP8, BLOCK_T, BLOCK_H, BLOCK_K)
        _dispatch_receive(recv_x_ptr, recv_idx_ptr, recv_w_ptr, counts_ptr, recv_scales_ptr, r, my_base, rank,
                          W, seq, timeout_ns, status_addr, recv_from, recv_start, most, hidden, topk, x_offset,
                          row_stride, meta_offset, flag_offset, num_out_rows,
                          FP8, BLOCK_T, BLOCK_H, BLOCK_K, BLOCK_S, USE_GLOBALTIMER)
    if started:
        # More rows than the caller's budget: the ones that fit were delivered; report it once
        # every program is done (a failure recorded earlier would stop programs yet to start).
        num_recv = tl.sum(recv_from, axis=0)
        if _end_operation(my_base, seq) & (num_recv > num_out_rows):
            _record_failure(my_base, status_addr, BUDGET_EXCEEDED, num_recv, seq, KIND_DISPATCH)


# ---------------------------------------------------------------------------------------------- combine
@triton.jit
def _combine_send(y_ptr, r, bases, my_base, rank, W, max_tokens, seq, recv_from, recv_start, most, hidden,
                  region_offset, row_stride, flag_offset, BLOCK_TS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows received from peers go back, once each, to row (this rank, slot) of their source's
    combine region, a claimed tile at a time (source-interleaved), each tile's flags raised
    together."""
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    w = _claim(my_base, SEND_WORK_OFFSET)
    while w < (W - 1) * tl.cdiv(most, BLOCK_TS):
        s, start, i, imask = _peer_tile(w, r, rank, W, recv_from, recv_start, BLOCK_TS)
        row = rank * max_tokens + (i - start)
        base = _pick(bases, r, s)
        dst = _rows_ptr(base, region_offset, row, row_stride, dtype)
        hb = 0
        while hb < tl.cdiv(hidden, BLOCK_H):
            cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            m = imask[:, None] & (cols < hidden)[None, :]
            v = tl.load(y_ptr + i[:, None] * hidden + cols[None, :], mask=m)
            tl.store(dst[:, None] + cols[None, :], v, mask=m)
            hb += 1
        _raise_flags(base + flag_offset + row * 8, imask, seq)
        w = _claim(my_base, SEND_WORK_OFFSET)


@triton.jit
def _rank_rows(y_ptr, my_base, d, rank, slot, own_start, max_tokens, hidden, region_offset, row_stride, cols, cmask):
    """Columns ``cols`` of the rows rank ``d`` returned for a token tile (slot -1: none, read as
    0): this rank's own rows straight from y, a peer's from the local combine region."""
    has = (slot >= 0)[:, None] & cmask
    if d == rank:
        v = tl.load(y_ptr + (own_start + slot)[:, None] * hidden + cols[None, :], mask=has, other=0.0)
    else:
        rows = _rows_ptr(my_base, region_offset, d * max_tokens + slot, row_stride, y_ptr.dtype.element_ty)
        v = tl.load(rows[:, None] + cols[None, :], mask=has, other=0.0, cache_modifier=".cg")
    return v


@triton.jit
def _combine_reduce(y_ptr, slot_ptr, out_ptr, r, rmask, my_base, rank, W, max_tokens, seq, timeout_ns, status_addr,
                    own_start, num_tokens, hidden, region_offset, row_stride, flag_offset,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, USE_GLOBALTIMER: tl.constexpr):
    """Token tiles, claimed one at a time: once the tile's rows from peers arrived, sum each
    token's rows (its own rank's straight from y) in fp32, in ascending rank order, two ranks'
    rows in flight per step; a timeout is recorded and ends the loop."""
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    ok = tl.full([], 1, tl.int1)
    tile = _claim(my_base, RECV_WORK_OFFSET)
    while (tile < tl.cdiv(num_tokens, BLOCK_T)) & ok:
        t = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        tmask = t < num_tokens
        # Token t's row from peer d sits at (d * max_tokens + slot[t, d]).
        slots = tl.load(slot_ptr + t[:, None] * W + r[None, :], mask=tmask[:, None] & rmask[None, :], other=-1)
        from_peer = (slots >= 0) & (r != rank)[None, :]
        flags = _ptr(my_base + flag_offset + (r.to(tl.int64)[None, :] * max_tokens + slots) * 8, tl.int64)
        v = _wait_at_least(flags, from_peer, seq, timeout_ns, USE_GLOBALTIMER)
        late = from_peer & (v < seq)
        peer = tl.min(tl.min(tl.where(late, r[None, :], W), axis=1), axis=0)
        if peer < W:
            _record_failure(my_base, status_addr, DATA_TIMEOUT, peer, seq, KIND_COMBINE)
            ok = False
        else:
            hb = 0
            while hb < tl.cdiv(hidden, BLOCK_H):
                cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
                cmask = (cols < hidden)[None, :]
                acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
                d = 0
                while d < W:
                    slot_a = tl.load(slot_ptr + t * W + d, mask=tmask, other=-1)
                    slot_b = tl.load(slot_ptr + t * W + d + 1, mask=tmask & (d + 1 < W), other=-1)
                    a = _rank_rows(y_ptr, my_base, d, rank, slot_a, own_start, max_tokens, hidden, region_offset,
                                   row_stride, cols, cmask)
                    b = _rank_rows(y_ptr, my_base, d + 1, rank, slot_b, own_start, max_tokens, hidden, region_offset,
                                   row_stride, cols, cmask)
                    # An absent rank adds nothing (not even +0, which would turn a -0 sum into +0).
                    acc = tl.where((slot_a >= 0)[:, None], acc + a.to(tl.float32), acc)
                    acc = tl.where((slot_b >= 0)[:, None], acc + b.to(tl.float32), acc)
                    d += 2
                tl.store(out_ptr + t[:, None] * hidden + cols[None, :], acc.to(dtype), mask=tmask[:, None] & cmask)
                hb += 1
            tile = _claim(my_base, RECV_WORK_OFFSET)


@triton.jit(do_not_specialize=["rank", "W", "num_tokens", "timeout_ns", "status_addr", "num_send"])
def ep_combine_kernel(y_ptr, slot_ptr, matrix_ptr, peers_ptr, out_ptr,
                      rank, W, max_tokens, timeout_ns, status_addr,
                      num_tokens, hidden, region_offset, row_stride, flag_offset, num_send,
                      BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_TS: tl.constexpr,
                      BLOCK_W: tl.constexpr, USE_GLOBALTIMER: tl.constexpr):
    """One combine (see the module docstring); grid = (num_sms,); programs [0, num_send) send
    first, then every program reduces.
    The reduce moves tiles of BLOCK_T rows (two ranks' tiles in flight plus fp32 accumulators),
    the send-back BLOCK_TS rows; per-rank vectors have BLOCK_W >= W lanes."""
    ok, seq, r, rmask, bases, my_base = _begin_operation(peers_ptr, rank, W, KIND_COMBINE, timeout_ns, status_addr,
                                                         BLOCK_W, USE_GLOBALTIMER)
    started = ok
    recv_from, recv_start, most = _receive_counts(matrix_ptr, r, rmask, rank, W)
    if ok:
        if tl.program_id(0) < num_send:
            _combine_send(y_ptr, r, bases, my_base, rank, W, max_tokens, seq, recv_from, recv_start, most, hidden,
                          region_offset, row_stride, flag_offset, BLOCK_TS, BLOCK_H)
        _combine_reduce(y_ptr, slot_ptr, out_ptr, r, rmask, my_base, rank, W, max_tokens, seq, timeout_ns,
                        status_addr, _pick(recv_start, r, rank), num_tokens, hidden, region_offset, row_stride,
                        flag_offset, BLOCK_T, BLOCK_H, USE_GLOBALTIMER)
    if started:
        _end_operation(my_base, seq)
