"""The `triton` backend (Triton dispatch/combine kernels over the CUDA backend's symmetric memory).

CPU: the module imports and says why it is unavailable; knobs and launch arguments are checked;
and the kernels run in the Triton interpreter on fake ranks whose symmetric buffers are CPU
tensors (peer_bases = their addresses). The interpreter runs programs one after the other in
program-id order (senders first), so one rank runs the whole protocol (sequence numbers on the
buffer, ready, send, receive) with any grid; two ranks run one after the other, the first one's
waits faked by presetting the other's ready word and arrival flags, the second one for real
(dispatch, FP8, budget overflow and combine across ranks); timeouts and operation mismatches
use fake peers. The kernels also compile for sm_90 with 16-byte row accesses. Its GPU tests are
shared with every kernel backend: tests/test_ep_kernel_backends.py (where it must also match the
cuda backend's combine bit for bit) and tests/test_ep_worst_tokens.py.
"""
from __future__ import annotations

import pytest
import torch

from overlap.ep.backends.triton_backend import NUM_WARPS
from overlap.testing.ep_kernel_checks import _expert_rows, _fp8_reference
from triton_sm90 import ptx_for_sm90, run_without_interpreter

triton = pytest.importorskip("triton")

BACKEND = "triton"
INTERPRET = bool(triton.knobs.runtime.interpret)
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs kernels on CPU tensors in the Triton interpreter")


# ---------------------------------------------------------------------------------------------- CPU: module
def test_module_imports_and_says_why_not_available(monkeypatch):
    from overlap.ep.backends import backend_names, get_backend_class
    from overlap.ep.backends.triton_backend import TritonBackend

    assert BACKEND in backend_names()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = TritonBackend.availability()
    assert not ok and "CUDA" in why, why
    with pytest.raises(RuntimeError, match="backend='triton' is not available"):
        get_backend_class(BACKEND)


@needs_interpreter
def test_unavailable_under_the_interpreter(monkeypatch):
    from overlap.ep.backends.triton_backend import TritonBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, why = TritonBackend.availability()
    assert not ok and "TRITON_INTERPRET" in why, why


def test_tile_bytes_env_and_tile_shape(monkeypatch):
    from overlap.ep.backends.triton_backend import DEFAULT_TILE_BYTES, TILE_BYTES_ENV, tile_bytes, tile_shape

    monkeypatch.delenv(TILE_BYTES_ENV, raising=False)
    assert tile_bytes() == DEFAULT_TILE_BYTES
    monkeypatch.setenv(TILE_BYTES_ENV, "16384")
    assert tile_bytes() == 16384
    for bad in ("0", "-5", "lots", str(1 << 30)):
        monkeypatch.setenv(TILE_BYTES_ENV, bad)
        with pytest.raises(ValueError, match=TILE_BYTES_ENV):
            tile_bytes()
    assert tile_shape(7168, 2, 65536) == (32, 1024)      # 7 column blocks, no masked tail
    assert tile_shape(7168, 4, 32768) == (16, 512)
    assert tile_shape(3, 4, 65536) == (64, 16)           # short rows: many rows per tile (capped)
    assert tile_shape(128, 2, 65536, min_block_h=128) == (64, 128)
    for hidden, size, budget in ((7168, 2, 65536), (100, 2, 1000), (5000, 1, 300)):
        block_t, block_h = tile_shape(hidden, size, budget)
        assert block_t & (block_t - 1) == 0 and block_h & (block_h - 1) == 0
        assert block_h * size <= 2048 and (block_t == 1 or block_t * block_h * size <= budget)
    with pytest.raises(ValueError, match="hidden"):
        tile_shape(0, 2, 65536)


def test_send_fraction_env_and_split(monkeypatch):
    from overlap.ep.backends.triton_backend import SEND_FRACTION_ENV, send_programs

    monkeypatch.delenv(SEND_FRACTION_ENV, raising=False)
    assert [send_programs(n) for n in (1, 2, 3, 8, 20, 24)] == [1, 2, 3, 6, 15, 18]          # 0.75
    assert [send_programs(n, "dispatch_fp8") for n in (1, 8, 20)] == [1, 7, 18]            # 0.875
    assert [send_programs(n, "combine") for n in (1, 2, 8, 20, 32)] == [1, 1, 3, 8, 12]   # 0.375
    with pytest.raises(ValueError, match="kernel must be one of"):
        send_programs(4, "reduce")
    monkeypatch.setenv(SEND_FRACTION_ENV, "0.3")   # overrides every kernel's default
    assert [send_programs(n) for n in (1, 2, 10, 20)] == [1, 1, 3, 6]
    assert [send_programs(n, "combine") for n in (1, 2, 10, 20)] == [1, 1, 3, 6]
    monkeypatch.setenv(SEND_FRACTION_ENV, "1")  # every program sends, then receives
    assert [send_programs(n) for n in (1, 7)] == [1, 7]
    for bad in ("0", "-0.5", "1.5", "nan", "half"):
        monkeypatch.setenv(SEND_FRACTION_ENV, bad)
        with pytest.raises(ValueError, match=SEND_FRACTION_ENV):
            send_programs(4)
    monkeypatch.delenv(SEND_FRACTION_ENV)
    with pytest.raises(ValueError, match="num_programs=0"):
        send_programs(0)


def test_capture_rules_are_the_cuda_backends():
    """Sequence numbers live on the GPU now: the triton backend captures whatever cuda captures."""
    from overlap.ep.backends.cuda_backend import CudaBackend
    from overlap.ep.backends.triton_backend import TritonBackend

    assert TritonBackend._check_capturable is CudaBackend._check_capturable
    assert TritonBackend.graph_capturable


def _cuda_signal_offsets() -> dict:
    """The signal-word offsets csrc/kernels/intranode.cuh defines (``kErrorOffset``: 1024, ...)."""
    import pathlib
    import re

    header = (pathlib.Path(__file__).resolve().parents[1] / "csrc/kernels/intranode.cuh").read_text()
    return {name: int(value) for name, value in re.findall(r"constexpr int64_t (k\w+Offset) = (\d+);", header)}


def test_signal_offsets_are_the_cuda_kernels():
    """Both backends use one buffer: every signal word the Triton kernels touch sits where
    csrc/kernels/intranode.cuh puts it."""
    from overlap.triton_kernels import ep_intranode as k

    cuda = _cuda_signal_offsets()
    pairs = {"READY_OFFSET": "kReadyOffset", "DONE_OFFSET": "kDoneOffset", "ERROR_OFFSET": "kErrorOffset",
             "OP_COUNT_OFFSET": "kOpCountOffset", "FINISHED_OFFSET": "kFinishedOffset",
             "SEND_WORK_OFFSET": "kWorkOffset", "RECV_WORK_OFFSET": "kRecvWorkOffset"}
    for ours, theirs in pairs.items():
        assert getattr(k, ours).value == cuda[theirs], (ours, theirs)


# ---------------------------------------------------------------------------------------------- CPU: fake ranks
_OP_COUNT, _FINISHED, _ERROR, _SEND_WORK, _RECV_WORK = (_cuda_signal_offsets()[name] for name in (
    "kOpCountOffset", "kFinishedOffset", "kErrorOffset", "kWorkOffset", "kRecvWorkOffset"))


class _FakeRanks:
    """Symmetric buffers (and status words) of ``world`` ranks as CPU tensors in this process,
    for the interpreter. Kernels of different ranks run one after the other, so a rank that
    waits for another one that has not run yet needs that rank's words preset (``ready``,
    ``flags``)."""

    def __init__(self, world, max_tokens, hidden, elem_cap, topk_cap, num_local_experts=8):
        from overlap.ep.backends.cuda_backend import _RegionLayout

        self.regions = _RegionLayout(8192, world, max_tokens, hidden, elem_cap, topk_cap)
        self.bufs = [torch.zeros(self.regions.nbytes, dtype=torch.uint8) for _ in range(world)]
        self.peers = torch.tensor([b.data_ptr() for b in self.bufs], dtype=torch.int64)
        self.status = [torch.zeros(4, dtype=torch.int32) for _ in range(world)]
        self.max_tokens, self.num_local_experts = max_tokens, num_local_experts

    def word(self, rank, offset, dtype=torch.int64):
        return self.bufs[rank][offset:offset + 8].view(dtype)[:1]

    def flags(self, rank, op):
        """Rank ``rank``'s u64 arrival flags of ``op``'s rows ("dispatch" or "combine")."""
        r = self.regions
        start = r.dispatch_flags_offset if op == "dispatch" else r.combine_flags_offset
        return self.bufs[rank][start:start + (r.combine_flags_offset - r.dispatch_flags_offset)].view(torch.int64)

    def ready(self, rank, peer, seq, kind):
        """Preset ``peer``'s ready word in ``rank``'s buffer: "started operation seq of kind"."""
        self.word(rank, 8 * peer).fill_(seq * 4 + kind)

    def args(self, rank, num_blocks, timeout_ns):
        return rank, num_blocks, self.max_tokens, timeout_ns, self.status[rank].data_ptr()

    def dispatch(self, rank, x, idx, w, slot, matrix, num_out, *, fp8=False, num_blocks=1, timeout_ns=10 ** 6):
        """Rank ``rank``'s dispatch into fresh zeroed outputs of ``num_out`` rows; returns them."""
        from overlap.ep.backends.cuda_backend import FP8_BLOCK, _align
        from overlap.ep.backends.triton_backend import launch_dispatch

        H, K = x.shape[1], idx.shape[1]
        if fp8:
            recv_x = torch.zeros(num_out, H, dtype=torch.float8_e4m3fn)
            scales = torch.zeros(num_out, H // FP8_BLOCK)
            stride = _align(H + H // FP8_BLOCK * 4, 16)
        else:
            recv_x, scales, stride = torch.zeros(num_out, H, dtype=x.dtype), None, _align(H * x.element_size(), 16)
        outs = (recv_x, torch.zeros(num_out, K, dtype=torch.int64), torch.zeros(num_out, K),
                torch.zeros(self.num_local_experts, dtype=torch.int32))
        r = self.regions
        launch_dispatch(x, idx, w, slot, matrix, self.peers, *outs, *self.args(rank, num_blocks, timeout_ns),
                        r.x_offset, stride, r.meta_offset, r.dispatch_flags_offset, scales)
        return (*outs, scales)

    def combine(self, rank, y, slot, matrix, num_tokens, *, num_blocks=1, timeout_ns=10 ** 6):
        """Rank ``rank``'s combine into an output prefilled with 7 (so untouched rows show)."""
        from overlap.ep.backends.cuda_backend import _align
        from overlap.ep.backends.triton_backend import launch_combine

        out = torch.full((num_tokens, y.shape[1]), 7.0, dtype=y.dtype)
        launch_combine(y, slot, matrix, self.peers, out, *self.args(rank, num_blocks, timeout_ns),
                       self.regions.combine_offset, _align(y.shape[1] * y.element_size(), 16),
                       self.regions.combine_flags_offset)
        return out


def _routing(T, E, K, gen):
    idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    idx[torch.rand(T, K, generator=gen) < 0.3] = -1
    return idx, torch.rand(T, K, generator=gen)


def _rank_inputs(gen, world, T, H, E, K, dtype=torch.bfloat16, scale=4.0):
    """Per rank (x, topk_idx, weights, token_slot [T, world] int32), and the count matrix
    [source, destination] the counts exchange would produce."""
    from overlap.ep.layout import routing_layout

    ins, counts = [], []
    for _ in range(world):
        x = (torch.randn(T, H, generator=gen) * scale).to(dtype)
        idx, w = _routing(T, E, K, gen)
        lay = routing_layout(idx, E, world)
        ins.append((x, idx, w, lay.token_slot_in_rank.to(torch.int32).contiguous()))
        counts.append(lay.num_tokens_per_rank)
    return ins, torch.stack(counts).to(torch.int32)


def _reference_dispatch(ins, matrix, rank, epl):
    """What ``rank`` receives: rows from rank 0, then rank 1, ..., each in source-token order,
    with local expert ids (-1 elsewhere) and their weights (0 elsewhere)."""
    lo, hi = rank * epl, (rank + 1) * epl
    sel = [(idx >= lo).logical_and(idx < hi).any(dim=1) for _, idx, _, _ in ins]
    x = torch.cat([inp[0][s] for inp, s in zip(ins, sel)])
    glob = torch.cat([inp[1][s] for inp, s in zip(ins, sel)])
    w = torch.cat([inp[2][s] for inp, s in zip(ins, sel)])
    here = (glob >= lo) & (glob < hi)
    assert x.shape[0] == int(matrix[:, rank].sum())
    return x, torch.where(here, glob - lo, torch.full_like(glob, -1)), torch.where(here, w, torch.zeros_like(w))


def _reference_combine(ys, ins, matrix, rank):
    """fp32 sum, in rank order, of the rows every rank returns for ``rank``'s tokens."""
    slot = ins[rank][3]
    acc = torch.zeros(slot.shape[0], ys[0].shape[1])
    for d in range(len(ys)):
        start = int(matrix[:rank, d].sum())  # rank's rows at d follow those of lower ranks
        has = slot[:, d] >= 0
        acc[has] += ys[d][start + slot[has, d].long()].float()
    return acc


def _bf16_truncated(acc):
    """The interpreter's fp32 -> bf16 cast truncates (the GPU rounds to nearest, checked there)."""
    return (acc.view(torch.int32) & -65536).view(torch.float32)


def _ops_done(fake, rank):
    return fake.word(rank, _OP_COUNT).item(), fake.word(rank, _FINISHED, torch.int32).item()


@needs_interpreter
@pytest.mark.parametrize("tile,num_blocks,fraction", [("default", 1, None), ("4096", 3, None), ("default", 3, "1")])
def test_interpreted_dispatch_combine_one_rank(tile, num_blocks, fraction, monkeypatch):
    """One rank (its rows skip the region): four operations in a row per case; outputs are
    exact; sequence numbers continue from the op_count already in the buffer. Small tiles give
    many row tiles; rows over 2 KiB several column blocks (with a masked tail)."""
    from overlap.ep.backends.triton_backend import SEND_FRACTION_ENV, TILE_BYTES_ENV

    if tile != "default":
        monkeypatch.setenv(TILE_BYTES_ENV, tile)
    if fraction is not None:
        monkeypatch.setenv(SEND_FRACTION_ENV, fraction)
    gen = torch.Generator().manual_seed(5 + num_blocks)
    for T, H, K, dtype in ((37, 256, 3, torch.bfloat16), (19, 36, 2, torch.float16), (17, 3, 2, torch.float32),
                           (29, 7, 8, torch.bfloat16), (13, 2560, 4, torch.bfloat16), (11, 1100, 2, torch.float32)):
        fake = _FakeRanks(1, T, H, 4, 8)
        fake.word(0, _OP_COUNT).fill_(40)  # earlier operations (e.g. counts exchanges) ran
        for it in range(2):
            ins, matrix = _rank_inputs(gen, 1, T, H, 8, K, dtype, scale=5.0)
            x, idx, w, slot = ins[0]
            n = int(matrix[0, 0])
            recv_x, ridx, rw, counts, _ = fake.dispatch(0, x, idx, w, slot, matrix, n, num_blocks=num_blocks)
            tag = f"T={T} H={H} {dtype} iter={it}"
            assert fake.status[0].tolist() == [0, 0, 0, 0], tag
            sent = (idx >= 0).any(dim=1)
            assert torch.equal(recv_x, x[sent]), tag
            assert torch.equal(ridx, idx[sent]), tag
            assert torch.equal(rw, torch.where(idx[sent] >= 0, w[sent], torch.zeros_like(w[sent]))), tag
            assert torch.equal(counts, torch.bincount(idx[idx >= 0], minlength=8).to(torch.int32)), tag
            y = _expert_rows(recv_x)
            out = fake.combine(0, y, slot, matrix, T, num_blocks=num_blocks)
            expected = torch.zeros(T, H, dtype=dtype)
            expected[sent] = y
            assert torch.equal(out, expected), tag
        assert _ops_done(fake, 0) == (44, 0)            # op_count: the last finished operation
        assert fake.word(0, 0).item() == 44 * 4 + 2     # ready[0]: the last operation was a combine
        # Both work counters are back at 0 for the next operation.
        assert fake.word(0, _SEND_WORK, torch.int32).item() == 0 and fake.word(0, _RECV_WORK, torch.int32).item() == 0


@needs_interpreter
def test_interpreted_fp8_dispatch_scales_and_metadata():
    """Scales and metadata exactly; the interpreter's float->e4m3 cast is not the GPU's (the
    values are checked bit-exactly on GPU), so here values are only checked to round-trip."""
    from overlap.ep.layout import routing_layout

    gen = torch.Generator().manual_seed(9)
    for dtype, H in ((torch.bfloat16, 384), (torch.float32, 384), (torch.float16, 128), (torch.bfloat16, 2304)):
        T = 21
        fake = _FakeRanks(1, T, H, 4, 8)
        x = (torch.randn(T, H, generator=gen) * torch.rand(T, 1, generator=gen) * 50).to(dtype)
        x[0, :128] = 0
        idx, w = _routing(T, 8, 3, gen)
        idx[0, 0] = 1  # token 0 (with its all-zero block) is sent
        lay = routing_layout(idx, 8, 1)
        slot = lay.token_slot_in_rank.to(torch.int32).contiguous()
        matrix = lay.num_tokens_per_rank.view(1, 1).to(torch.int32)
        q, ridx, rw, _, scales = fake.dispatch(0, x, idx, w, slot, matrix, int(matrix[0, 0]), fp8=True, num_blocks=2)
        sent = (idx >= 0).any(dim=1)
        _, exp_scales = _fp8_reference(x[sent])
        assert fake.status[0].tolist() == [0, 0, 0, 0]
        assert torch.equal(scales, exp_scales), dtype
        assert scales[0, 0] == 1 and torch.all(q[0, :128].float() == 0)
        assert torch.equal(ridx, idx[sent])
        _assert_fp8_round_trips(q, scales, x[sent])


def _assert_fp8_round_trips(q, scales, x):
    """The interpreter's float -> e4m3 cast keeps little more than the exponent (the GPU's is
    checked bit for bit there): each value dequantises to at most 1/8 above |x| (or the
    smallest subnormal step, 2^-9, times its block's scale), with x's sign."""
    s = scales.repeat_interleave(128, dim=1)
    back, xf = q.float() * s, x.float()
    assert torch.all(back.abs() <= xf.abs() * 1.125 + s * 2.0 ** -9) and torch.all(back * xf >= 0)


def _quantised_on_one_rank(x):
    """x's rows as the dispatch kernel quantises them on a rank of its own (no region)."""
    n = x.shape[0]
    fake = _FakeRanks(1, n, x.shape[1], 4, 1)
    slot = torch.arange(n, dtype=torch.int32).view(n, 1)
    q, _, _, _, scales = fake.dispatch(0, x, torch.zeros(n, 1, dtype=torch.int64), torch.ones(n, 1), slot,
                                       torch.tensor([[n]], dtype=torch.int32), n, fp8=True)
    assert fake.status[0].tolist() == [0, 0, 0, 0]
    return q, scales


# Fake ranks run one after the other, in `order`: each one's waits for the ranks still to come
# are faked by presetting their ready words and the arrival flags of their rows in its buffer
# (that data stays zero, so only the last rank's outputs are checked); the last rank runs on
# what the others really wrote into its regions and must get exactly the reference (this checks
# the per-rank row arithmetic, flags, metadata, receive order, and with 3 ranks the order of
# the fp32 sum).
_RANKS_CASES = {
    # name: (order, dtype, hidden, fp8, num_blocks, send fraction, tile bytes, rows short of the budget, peers ahead)
    "bf16_split_01": ((0, 1), torch.bfloat16, 1100, False, 3, None, "4096", 0, False),
    "bf16_split_10": ((1, 0), torch.bfloat16, 1100, False, 3, None, "4096", 0, False),
    "fp32_3ranks": ((2, 0, 1), torch.float32, 40, False, 4, None, "1024", 0, False),  # fp32 sums show the order
    "fp8_one_program_01": ((0, 1), torch.bfloat16, 256, True, 1, None, None, 0, True),
    "fp8_one_program_10": ((1, 0), torch.bfloat16, 256, True, 1, None, None, 0, True),
    "budget_all_send_01": ((0, 1), torch.float32, 48, False, 2, "1", None, 3, False),
    "budget_all_send_10": ((1, 0), torch.float32, 48, False, 2, "1", None, 3, False),
}


def _preset_later_ranks(fake, order, ins, matrix, seq, ahead):
    """For each rank of ``order``, the ranks after it: "started operation seq" (or, ``ahead``,
    one more) and, for a dispatch (odd seq here) or a combine, "sent you its rows"."""
    T = fake.max_tokens
    for pos, rank in enumerate(order):
        for later in order[pos + 1:]:
            kind = 1 if seq % 2 else 2
            fake.ready(rank, later, seq + 1 if ahead else seq, 3 - kind if ahead else kind)
            if kind == 1:  # rows from `later` are rows [start, start + n) of `rank`'s region
                start = int(matrix[:later, rank].sum())
                fake.flags(rank, "dispatch")[start:start + int(matrix[later, rank])] = seq
            else:  # `later` returns `rank`'s tokens at rows later * T + their slot there
                slot = ins[rank][3][:, later]
                fake.flags(rank, "combine")[later * T + slot[slot >= 0].long()] = seq


@needs_interpreter
@pytest.mark.parametrize("case", list(_RANKS_CASES))
def test_interpreted_ranks_one_after_the_other(case, monkeypatch):
    from overlap.ep.backends.triton_backend import SEND_FRACTION_ENV, TILE_BYTES_ENV

    order, dtype, H, fp8, num_blocks, fraction, tile, short, ahead = _RANKS_CASES[case]
    if fraction is not None:
        monkeypatch.setenv(SEND_FRACTION_ENV, fraction)
    if tile is not None:
        monkeypatch.setenv(TILE_BYTES_ENV, tile)
    world, T, K = len(order), 23, 3
    epl, last = 4, order[-1]
    gen = torch.Generator().manual_seed(40 + list(_RANKS_CASES).index(case))
    ins, matrix = _rank_inputs(gen, world, T, H, epl * world, K, dtype)
    assert bool((matrix > 0).all()), matrix
    fake = _FakeRanks(world, T, H, 4, K, epl)

    # Dispatch = operation 1 on every rank.
    _preset_later_ranks(fake, order, ins, matrix, 1, ahead)
    num_out = [int(matrix[:, rank].sum()) - (short if rank == last else 0) for rank in range(world)]
    outs = {rank: fake.dispatch(rank, *ins[rank], matrix, num_out[rank], fp8=fp8, num_blocks=num_blocks)
            for rank in order}
    assert all(fake.status[rank].tolist() == [0, 0, 0, 0] for rank in order[:-1])
    exp_x, exp_idx, exp_w = (t[:num_out[last]] for t in _reference_dispatch(ins, matrix, last, epl))
    recv_x, recv_idx, recv_w, counts, scales = outs[last]
    if fp8:  # through the region bit for bit: as quantised without one
        exp_q, exp_scales = _quantised_on_one_rank(exp_x)
        assert torch.equal(scales, exp_scales) and torch.equal(scales, _fp8_reference(exp_x)[1])
        assert torch.equal(recv_x.view(torch.uint8), exp_q.view(torch.uint8))
    else:
        assert torch.equal(recv_x, exp_x)
    assert torch.equal(recv_idx, exp_idx) and torch.equal(recv_w, exp_w)
    assert torch.equal(counts, torch.bincount(exp_idx[exp_idx >= 0], minlength=epl).to(torch.int32))
    assert _ops_done(fake, last) == (1, 0)
    if short:  # the rows that fit arrived; the overflow is reported (rows that arrived, op 1, dispatch)
        assert fake.status[last].tolist() == [4, num_out[last] + short, 1, 1]
        return
    assert fake.status[last].tolist() == [0, 0, 0, 0]

    # Combine = operation 2: every rank returns its received rows (scaled by rank); the last
    # rank's tokens get the fp32 sum, in rank order, of the rows of the ranks they went to (its
    # own rank's straight from y).
    _preset_later_ranks(fake, order, ins, matrix, 2, ahead)
    ys = [(torch.randn(num_out[rank], H, generator=gen) * (rank + 1)).to(dtype) for rank in range(world)]
    out = {rank: fake.combine(rank, ys[rank], ins[rank][3], matrix, T, num_blocks=num_blocks) for rank in order}
    assert all(fake.status[rank].tolist() == [0, 0, 0, 0] for rank in order)
    acc = _reference_combine(ys, ins, matrix, last)  # tokens sent nowhere sum to 0
    assert torch.equal(out[last].float(), acc if dtype == torch.float32 else _bf16_truncated(acc))
    assert all(_ops_done(fake, rank) == (2, 0) for rank in order)


@needs_interpreter
@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_interpreted_data_timeout_is_recorded_and_sticky(op):
    """Rank 0 of two runs alone with rank 1's ready word preset but none of its rows: its
    receiver program times out naming rank 1, after its sender program delivered everything;
    later kernels on rank 0 see the sticky error and do nothing."""
    T, H, E, K = 16, 64, 8, 2
    gen = torch.Generator().manual_seed(3)
    ins, matrix = _rank_inputs(gen, 2, T, H, E, K)
    assert matrix[1, 0] > 0 and matrix[0, 1] > 0
    fake = _FakeRanks(2, T, H, 2, K, E // 2)
    kind = 1 if op == "dispatch" else 2
    fake.ready(0, 1, 1, kind)
    n = int(matrix[:, 0].sum())
    if op == "dispatch":
        recv_x, _, _, counts, _ = fake.dispatch(0, *ins[0], matrix, n, num_blocks=2, timeout_ns=200_000)
        own = int(matrix[0, 0])  # rank 0's own rows come first, straight from its sender
        x0, idx0 = ins[0][0], ins[0][1]
        assert torch.equal(recv_x[:own], x0[(idx0 >= 0).logical_and(idx0 < E // 2).any(dim=1)])
        assert int((fake.flags(1, "dispatch") == 1).sum()) == int(matrix[0, 1])  # its rows reached rank 1
    else:
        y = torch.randn(n, H, generator=gen).to(torch.bfloat16)
        out = fake.combine(0, y, ins[0][3], matrix, T, num_blocks=2, timeout_ns=200_000)
        assert int((fake.flags(1, "combine") == 1).sum()) == int(matrix[1, 0])  # rank 1's rows went back
        assert torch.all(out == 7)
    assert fake.status[0].tolist() == [2, 1, 1, kind]  # data timeout, rank 1, operation 1
    assert fake.word(0, _ERROR, torch.int32).item() == 2
    ready_at_1 = fake.word(1, 0).item()
    out = fake.combine(0, torch.randn(n, H, generator=gen).to(torch.bfloat16), ins[0][3], matrix, T,
                       timeout_ns=200_000)
    assert torch.all(out == 7) and fake.status[0].tolist() == [2, 1, 1, kind]
    assert fake.word(1, 0).item() == ready_at_1  # nothing announced to rank 1 either


@needs_interpreter
def test_interpreted_ready_handshake():
    """Rank 0 of two combines (operation 1) rows it received from rank 1; rank 1's ready word
    is faked: behind (timeout), another operation under the same number (mismatch), or one
    operation ahead (accepted)."""
    T, H = 8, 32
    matrix = torch.tensor([[0, 0], [5, 0]], dtype=torch.int32)  # rank 1 sent rank 0 five rows
    slot = torch.full((T, 2), -1, dtype=torch.int32)  # rank 0's own tokens went nowhere
    for ready1, code in ((0, 1), (1 * 4 + 1, 3), (2 * 4 + 1, 0)):
        fake = _FakeRanks(2, T, H, 2, 2)
        fake.word(0, 8).fill_(ready1)  # ready[1] in rank 0's buffer
        y = torch.randn(5, H).to(torch.bfloat16)
        out = fake.combine(0, y, slot, matrix, T, timeout_ns=100_000)
        assert fake.word(1, 0).item() == 1 * 4 + 2  # rank 0 announced its combine to rank 1 either way
        sent = int((fake.flags(1, "combine") == 1).sum())
        if code:
            assert fake.status[0].tolist() == [code, 1, 1, 2], (ready1, fake.status[0])
            assert sent == 0 and _ops_done(fake, 0) == (0, 0) and torch.all(out == 7)  # did nothing else
        else:  # rank 1's rows went back to it; rank 0's tokens, sent nowhere, sum to 0
            assert fake.status[0].tolist() == [0, 0, 0, 0] and sent == 5 and _ops_done(fake, 0) == (1, 0)
            assert torch.all(out == 0)


def test_launch_arguments_are_checked():
    from overlap.ep.backends.triton_backend import launch_combine, launch_dispatch

    y = torch.zeros(4, 128, dtype=torch.bfloat16)
    slot = torch.zeros(4, 2, dtype=torch.int32)
    m = torch.zeros(2, 2, dtype=torch.int32)
    peers = torch.zeros(2, dtype=torch.int64)
    out = torch.zeros(4, 128, dtype=torch.bfloat16)
    status = 0
    good = dict(rank=0, num_blocks=1, max_tokens=4, timeout_ns=1, status_ptr=status, region_offset=4096,
                row_stride=256, flag_region_offset=8192)
    for key, value, match in (("rank", 2, "rank=2"), ("num_blocks", 0, "num_blocks=0"),
                              ("max_tokens", 3, "num_tokens=4"), ("row_stride", 200, "row_stride=200"),
                              ("region_offset", 8, "region_offset=8"),
                              ("flag_region_offset", 12, "flag_region_offset=12")):
        with pytest.raises(ValueError, match=match):
            launch_combine(y, slot, m, peers, out, **dict(good, **{key: value}))
    with pytest.raises(ValueError, match="peer_bases"):
        launch_combine(y, slot, m, torch.zeros(33, dtype=torch.int64), out, **good)
    x = torch.zeros(4, 100, dtype=torch.bfloat16)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    w = torch.zeros(4, 2)
    counts = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 128"):
        launch_dispatch(x, idx, w, slot, m, peers, x, idx, w, counts, 0, 1, 4, 1, status, 8192, 208, 4096, 8192,
                        torch.zeros(4, 1))
    with pytest.raises(ValueError, match="x_row_stride=100"):
        launch_dispatch(x, idx, w, slot, m, peers, x, idx, w, counts, 0, 1, 4, 1, status, 8192, 100, 4096, 8192)


# ---------------------------------------------------------------------------------------------- CPU: sm_90 build
_COMMON_TYPES = {"topk_idx_ptr": "*i64", "topk_w_ptr": "*fp32", "slot_ptr": "*i32", "matrix_ptr": "*i32",
                 "peers_ptr": "*i64", "recv_idx_ptr": "*i64", "recv_w_ptr": "*fp32", "counts_ptr": "*i32",
                 "recv_scales_ptr": "*fp32", "timeout_ns": "i64", "status_addr": "i64", "x_offset": "i64",
                 "meta_offset": "i64", "flag_offset": "i64", "region_offset": "i64"}
# Ready announcement and row flags (release), flag waits (relaxed spin, then acquire), the
# clock, and the finished-programs counter that moves op_count (GPU-side sequence numbers).
_PROTOCOL_PTX = ("atom.global.sys.release.exch.b64", "ld.volatile.global.b64", "atom.global.sys.acquire.add.u64",
                 "%globaltimer", "atom.global.gpu.acq_rel.add.u32")


def _check_protocol(ptx: str, what: str) -> None:
    import re

    missing = [p for p in _PROTOCOL_PTX if p not in ptx]
    assert not missing, f"{what}: {missing} missing from the PTX"
    assert "atom.global.sys.release.add" not in ptx, f"{what}: still counts done[] (the grid-wide barrier)"
    assert not re.search(r"atom\.global\.[a-z.]*f32", ptx), f"{what}: float atomics"


def compile_all_for_sm90() -> None:
    """Compile the kernels as launched at 4096 x 7168 bf16; check that row copies are 16-byte
    vector loads/stores (ld/st.global.v4) and that the protocol's flag operations are there."""
    from overlap.ep.backends.triton_backend import DEFAULT_TILE_BYTES, combine_tiles, tile_shape
    from overlap.triton_kernels import ep_intranode as k

    dispatch_aligned = ("x_ptr", "recv_x_ptr", "hidden", "x_offset", "row_stride", "meta_offset", "flag_offset")
    for fp8 in (False, True):
        block_t, block_h = tile_shape(7168, 2, DEFAULT_TILE_BYTES, min_block_h=128 if fp8 else 16)
        types = dict(_COMMON_TYPES, x_ptr="*bf16", recv_x_ptr="*fp8e4nv" if fp8 else "*bf16")
        constexprs = {"FP8": fp8, "BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_K": 8, "BLOCK_S": 64,
                      "BLOCK_W": 8, "USE_GLOBALTIMER": True}
        ptx = ptx_for_sm90(k.ep_dispatch_kernel, types, constexprs, NUM_WARPS, dispatch_aligned)
        in_vecs = block_t * block_h * 2 // (16 * 512)                  # 16-byte vectors per thread: x tile
        out_vecs = block_t * block_h * (1 if fp8 else 2) // (16 * 512)  # a tile as sent / received
        tag = f"dispatch fp8={fp8}"
        assert ptx.count("ld.global.v4.b32") >= in_vecs, f"{tag}: x tile not read in 16-byte vectors"
        # Three row stores: own rows into the outputs, peers' regions, received rows into the outputs.
        assert ptx.count("st.global.v4.b32") >= 3 * out_vecs, f"{tag}: rows not stored in 16-byte vectors"
        assert ptx.count("ld.global.cg.v4.b32") >= out_vecs, f"{tag}: region not read in 16-byte vectors"
        _check_protocol(ptx, tag)
        if fp8:
            assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx
    block_t, block_ts, block_h = combine_tiles(7168, 2)
    ptx = ptx_for_sm90(k.ep_combine_kernel, dict(_COMMON_TYPES, y_ptr="*bf16", out_ptr="*bf16"),
                       {"BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_TS": block_ts, "BLOCK_W": 8,
                        "USE_GLOBALTIMER": True},
                       NUM_WARPS, ("y_ptr", "out_ptr", "hidden", "region_offset", "row_stride", "flag_offset"))
    reduce_vecs, send_vecs = block_t * block_h * 2 // (16 * 512), block_ts * block_h * 2 // (16 * 512)
    # y is read by the send-back and, for this rank's own rows, by the reduce (two ranks per step).
    assert ptx.count("ld.global.v4.b32") >= send_vecs + 2 * reduce_vecs, "combine: y not read in 16-byte vectors"
    assert ptx.count("ld.global.cg.v4.b32") >= 2 * reduce_vecs, "combine: two ranks' rows not read in 16 B"
    assert ptx.count("st.global.v4.b32") >= send_vecs + reduce_vecs, "combine: rows not stored in 16 B"
    _check_protocol(ptx, "combine")
    # The other shapes the oracle cases launch: odd rows (no 16-byte hints), other dtypes, FP8 from them.
    for dtype, size, hidden, topk, fp8 in (("fp32", 4, 3, 2, False), ("fp16", 2, 36, 2, False),
                                           ("bf16", 2, 7, 9, False), ("fp32", 4, 256, 3, True),
                                           ("fp16", 2, 128, 2, True)):
        block_t, block_h = tile_shape(hidden, size, DEFAULT_TILE_BYTES, min_block_h=128 if fp8 else 16)
        aligned = ("x_ptr", "recv_x_ptr", "hidden") if hidden % 16 == 0 else ("x_ptr", "recv_x_ptr")
        types = dict(_COMMON_TYPES, x_ptr=f"*{dtype}", recv_x_ptr="*fp8e4nv" if fp8 else f"*{dtype}")
        block_k = max(2, 1 << (topk - 1).bit_length())
        ptx_for_sm90(k.ep_dispatch_kernel, types, {"FP8": fp8, "BLOCK_T": block_t, "BLOCK_H": block_h,
                                                   "BLOCK_K": block_k, "BLOCK_S": 2, "BLOCK_W": 2,
                                                   "USE_GLOBALTIMER": True},
                     NUM_WARPS, aligned)
        if not fp8:
            block_t, block_ts, block_h = combine_tiles(hidden, size)
            ptx_for_sm90(k.ep_combine_kernel, dict(_COMMON_TYPES, y_ptr=f"*{dtype}", out_ptr=f"*{dtype}"),
                         {"BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_TS": block_ts, "BLOCK_W": 2,
                          "USE_GLOBALTIMER": True}, NUM_WARPS, ("y_ptr", "out_ptr"))


def test_kernels_compile_for_sm90():
    run_without_interpreter(__file__)
