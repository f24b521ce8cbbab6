"""The `triton` backend (Triton dispatch/combine kernels over the CUDA backend's symmetric memory).

CPU: the module imports and says why it is unavailable; launch arguments are checked; and the
kernels run in the Triton interpreter on one "rank" whose symmetric buffer is a CPU tensor
(peer_bases = its address): the whole protocol (ready, send, done, receive) with one program,
timeouts and operation mismatches with fake peers (the interpreter runs programs one after the
other, so it cannot run waits across programs or ranks). They also compile for sm_90 with
16-byte row accesses. Its GPU tests are shared with every kernel backend:
tests/test_ep_kernel_backends.py (where it must also match the cuda backend's combine bit for bit).
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


# ---------------------------------------------------------------------------------------------- CPU: one fake rank
class _FakeRanks:
    """Symmetric buffers of ``world`` ranks as CPU tensors in this process (for the interpreter)."""

    def __init__(self, world, max_tokens, hidden, elem_cap, topk_cap):
        from overlap.ep.backends.cuda_backend import _RegionLayout

        self.regions = _RegionLayout(8192, world, max_tokens, hidden, elem_cap, topk_cap)
        self.bufs = [torch.zeros(self.regions.nbytes, dtype=torch.uint8) for _ in range(world)]
        self.peers = torch.tensor([b.data_ptr() for b in self.bufs], dtype=torch.int64)
        self.status = torch.zeros(4, dtype=torch.int32)
        self.max_tokens, self.hidden = max_tokens, hidden
        self.seq = self.done = 0

    def word(self, rank, offset, dtype=torch.int64):
        return self.bufs[rank][offset:offset + 8].view(dtype)

    def op_args(self, num_blocks, timeout_ns):
        self.seq += 1
        self.done += num_blocks
        return (0, num_blocks, self.max_tokens, self.seq, self.done, timeout_ns, self.status.data_ptr())


def _routing(T, E, K, gen):
    idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    idx[torch.rand(T, K, generator=gen) < 0.3] = -1
    return idx, torch.rand(T, K, generator=gen)


def _dispatch_one_rank(fake, x, idx, w, *, fp8=False, num_blocks=1, timeout_ns=10 ** 9):
    """Dispatch on a world of one rank (rank 0 sends every routed token to itself)."""
    from overlap.ep.backends.cuda_backend import FP8_BLOCK, _align
    from overlap.ep.backends.triton_backend import launch_dispatch
    from overlap.ep.layout import routing_layout

    T, H = x.shape
    E = 8
    lay = routing_layout(idx, E, 1)
    slot = lay.token_slot_in_rank.to(torch.int32).contiguous()
    n = int(lay.num_tokens_per_rank[0])
    matrix = torch.tensor([[n]], dtype=torch.int32)
    if fp8:
        recv_x = torch.zeros(n, H, dtype=torch.float8_e4m3fn)
        scales = torch.zeros(n, H // FP8_BLOCK)
        stride = _align(H + H // FP8_BLOCK * 4, 16)
    else:
        recv_x, scales, stride = torch.zeros(n, H, dtype=x.dtype), None, _align(H * x.element_size(), 16)
    ridx = torch.zeros(n, idx.shape[1], dtype=torch.int64)
    rw = torch.zeros(n, idx.shape[1])
    counts = torch.zeros(E, dtype=torch.int32)
    r = fake.regions
    launch_dispatch(x, idx, w, slot, matrix, fake.peers, recv_x, ridx, rw, counts,
                    *fake.op_args(num_blocks, timeout_ns),
                    r.x_offset, stride, r.meta_offset, scales)
    return recv_x, scales, ridx, rw, counts, slot, matrix


def _combine_one_rank(fake, y, slot, matrix, num_tokens, *, num_blocks=1, timeout_ns=10 ** 9):
    from overlap.ep.backends.cuda_backend import _align
    from overlap.ep.backends.triton_backend import launch_combine

    out = torch.full((num_tokens, y.shape[1]), 7.0, dtype=y.dtype)
    launch_combine(y, slot, matrix, fake.peers, out, *fake.op_args(num_blocks, timeout_ns),
                   fake.regions.combine_offset, _align(y.shape[1] * y.element_size(), 16))
    return out


@needs_interpreter
@pytest.mark.parametrize("tile", ["default", "4096"])
def test_interpreted_dispatch_combine_one_rank(tile, monkeypatch):
    """Four operations in a row per case (counters only grow); outputs are exact. Small tiles
    give many row tiles; rows over 2 KiB several column blocks (with a masked tail)."""
    from overlap.ep.backends.triton_backend import TILE_BYTES_ENV

    if tile != "default":
        monkeypatch.setenv(TILE_BYTES_ENV, tile)
    gen = torch.Generator().manual_seed(5)
    for T, H, K, dtype in ((37, 256, 3, torch.bfloat16), (19, 36, 2, torch.float16), (17, 3, 2, torch.float32),
                           (29, 7, 8, torch.bfloat16), (13, 2560, 4, torch.bfloat16), (11, 1100, 2, torch.float32)):
        fake = _FakeRanks(1, T, H, 4, 8)
        for _ in range(2):
            x = (torch.randn(T, H, generator=gen) * 5).to(dtype)
            idx, w = _routing(T, 8, K, gen)
            recv_x, _, ridx, rw, counts, slot, matrix = _dispatch_one_rank(fake, x, idx, w)
            tag = f"T={T} H={H} {dtype} seq={fake.seq}"
            assert fake.status.tolist() == [0, 0, 0, 0], tag
            sent = (idx >= 0).any(dim=1)
            assert torch.equal(recv_x, x[sent]), tag
            assert torch.equal(ridx, idx[sent]), tag
            assert torch.equal(rw, torch.where(idx[sent] >= 0, w[sent], torch.zeros_like(w[sent]))), tag
            assert torch.equal(counts, torch.bincount(idx[idx >= 0], minlength=8).to(torch.int32)), tag
            y = _expert_rows(recv_x)
            out = _combine_one_rank(fake, y, slot, matrix, T)
            expected = torch.zeros(T, H, dtype=dtype)
            expected[sent] = y
            assert torch.equal(out, expected), tag
        assert fake.word(0, 512).item() == fake.done       # done[0]: one add per program per operation
        assert fake.word(0, 0).item() == fake.seq * 4 + 2  # ready[0]: the last operation was a combine


@needs_interpreter
def test_interpreted_fp8_dispatch_scales_and_metadata():
    """Scales and metadata exactly; the interpreter's float->e4m3 cast is not the GPU's (the
    values are checked bit-exactly on GPU), so here values are only checked to round-trip."""
    gen = torch.Generator().manual_seed(9)
    for dtype, H in ((torch.bfloat16, 384), (torch.float32, 384), (torch.float16, 128), (torch.bfloat16, 2304)):
        T = 21
        fake = _FakeRanks(1, T, H, 4, 8)
        x = (torch.randn(T, H, generator=gen) * torch.rand(T, 1, generator=gen) * 50).to(dtype)
        x[0, :128] = 0
        idx, w = _routing(T, 8, 3, gen)
        idx[0, 0] = 1  # token 0 (with its all-zero block) is sent
        q, scales, ridx, rw, _, _, _ = _dispatch_one_rank(fake, x, idx, w, fp8=True)
        sent = (idx >= 0).any(dim=1)
        _, exp_scales = _fp8_reference(x[sent])
        assert fake.status.tolist() == [0, 0, 0, 0]
        assert torch.equal(scales, exp_scales), dtype
        assert scales[0, 0] == 1 and torch.all(q[0, :128].float() == 0)
        assert torch.equal(ridx, idx[sent])
        back = (q.float().view(-1, H // 128, 128) * scales[..., None]).view(-1, H)
        assert torch.all(back.abs() <= x[sent].float().abs().amax() * 1.0001)


@needs_interpreter
def test_interpreted_data_timeout_is_recorded_and_sticky():
    """Two programs: the interpreter runs program 0 to the end first, so it never sees program
    1's done signal and times out; program 1 and later kernels see the sticky error and do nothing."""
    gen = torch.Generator().manual_seed(3)
    fake = _FakeRanks(1, 16, 64, 2, 4)
    x = torch.randn(16, 64, generator=gen).to(torch.bfloat16)
    idx, w = _routing(16, 8, 2, gen)
    _, _, _, _, counts, slot, matrix = _dispatch_one_rank(fake, x, idx, w, num_blocks=2, timeout_ns=200_000)
    assert fake.status.tolist() == [2, 0, 1, 1]  # data timeout, peer 0, operation 1, dispatch
    assert fake.word(0, 1024, torch.int32)[0].item() == 2
    assert counts.sum() == 0  # the receive phase never ran
    out = _combine_one_rank(fake, x[: int(matrix[0, 0])], slot, matrix, 16, timeout_ns=200_000)
    assert torch.all(out == 7) and fake.status.tolist() == [2, 0, 1, 1]


@needs_interpreter
def test_interpreted_ready_handshake_failures():
    """Rank 0 of two; rank 1's ready word is faked: behind (timeout) or another operation (mismatch)."""
    from overlap.ep.backends.triton_backend import launch_combine

    for ready1, code in ((0, 1), (1 * 4 + 1, 3)):  # rank 1 never started / runs a dispatch as op 1
        fake = _FakeRanks(2, 8, 32, 2, 2)
        fake.word(0, 8).fill_(ready1)  # ready[1] in rank 0's buffer
        y = torch.randn(0, 32).to(torch.bfloat16)
        slot = torch.full((8, 2), -1, dtype=torch.int32)
        out = torch.full((8, 32), 7.0, dtype=torch.bfloat16)
        launch_combine(y, slot, torch.zeros(2, 2, dtype=torch.int32), fake.peers, out, *fake.op_args(1, 100_000),
                       fake.regions.combine_offset, 64)
        assert fake.status.tolist() == [code, 1, 1, 2], (ready1, fake.status)
        assert fake.word(1, 0).item() == 1 * 4 + 2  # rank 0 still announced its combine to rank 1
        assert fake.word(1, 512).item() == 0 and torch.all(out == 7)  # and sent nothing


def _two_rank_inputs(gen, T, H, E, K):
    from overlap.ep.layout import routing_layout

    ins = []
    for _ in range(2):
        x = (torch.randn(T, H, generator=gen) * 4).to(torch.bfloat16)
        idx, w = _routing(T, E, K, gen)
        lay = routing_layout(idx, E, 2)
        ins.append((x, idx, w, lay.token_slot_in_rank.to(torch.int32).contiguous(), lay.num_tokens_per_rank))
    matrix = torch.stack([lay_counts for *_, lay_counts in ins]).to(torch.int32)  # [source, destination]
    return ins, matrix


@needs_interpreter
@pytest.mark.parametrize("first", [0, 1])
def test_interpreted_two_ranks_one_after_the_other(first):
    """Two ranks whose buffers are CPU tensors. Rank ``first`` runs first, its wait for the other
    rank faked by presetting that rank's flags; then the other rank runs for real and must get
    exactly the reference dispatch and combine (this checks the per-rank row arithmetic)."""
    from overlap.ep.backends.cuda_backend import _align
    from overlap.ep.backends.triton_backend import launch_combine, launch_dispatch

    T, H, E, K = 23, 48, 8, 3
    epl = E // 2
    second = 1 - first
    gen = torch.Generator().manual_seed(40 + first)
    ins, matrix = _two_rank_inputs(gen, T, H, E, K)
    fake = _FakeRanks(2, T, H, 2, K)
    reg, stride = fake.regions, _align(H * 2, 16)
    outs = {}
    args = fake.op_args(1, 10 ** 9)[1:]
    fake.word(first, 8 * second).fill_(1 * 4 + 1)        # ready[second]: "started dispatch #1"
    fake.word(first, 512 + 8 * second).fill_(fake.done)  # done[second]: "sent everything"
    for rank in (first, second):
        x, idx, w, slot, _ = ins[rank]
        n = int(matrix[:, rank].sum())
        out = (torch.zeros(n, H, dtype=torch.bfloat16), torch.zeros(n, K, dtype=torch.int64), torch.zeros(n, K),
               torch.zeros(epl, dtype=torch.int32))
        launch_dispatch(x, idx, w, slot, matrix, fake.peers, *out, rank, *args, reg.x_offset, stride, reg.meta_offset)
        outs[rank] = out
    # The reference for `second`: rows from rank 0 then rank 1, each in source-token order.
    sel = [ins[s][1].ge(second * epl).logical_and(ins[s][1].lt((second + 1) * epl)).any(dim=1) for s in (0, 1)]
    exp_x = torch.cat([ins[s][0][sel[s]] for s in (0, 1)])
    exp_global = torch.cat([ins[s][1][sel[s]] for s in (0, 1)])
    here = (exp_global >= second * epl) & (exp_global < (second + 1) * epl)
    exp_idx = torch.where(here, exp_global - second * epl, torch.full_like(exp_global, -1))
    exp_w = torch.where(here, torch.cat([ins[s][2][sel[s]] for s in (0, 1)]), torch.zeros(exp_idx.shape))
    recv_x, recv_idx, recv_w, counts = outs[second]
    assert fake.status.tolist() == [0, 0, 0, 0]
    assert torch.equal(recv_x, exp_x) and torch.equal(recv_idx, exp_idx) and torch.equal(recv_w, exp_w)
    assert torch.equal(counts, torch.bincount(exp_idx[exp_idx >= 0], minlength=epl).to(torch.int32))

    # Combine: every rank returns its received rows (times a rank-dependent factor); `second`'s
    # tokens get the fp32 sum, in rank order, of the rows of the ranks they went to.
    args = fake.op_args(1, 10 ** 9)[1:]
    fake.word(first, 8 * second).fill_(2 * 4 + 2)
    fake.word(first, 512 + 8 * second).fill_(fake.done)
    ys = {}
    for rank in (first, second):
        n = int(matrix[:, rank].sum())
        ys[rank] = (torch.randn(n, H, generator=gen) * (rank + 1)).to(torch.bfloat16)
        out = torch.zeros(T, H, dtype=torch.bfloat16)
        launch_combine(ys[rank], ins[rank][3], matrix, fake.peers, out, rank, *args, reg.combine_offset, stride)
        outs[rank] = out
    acc = torch.zeros(T, H)
    slot = ins[second][3]
    for d in (0, 1):
        start = int(matrix[:second, d].sum())  # `second`'s rows at rank d follow those of lower ranks
        has = slot[:, d] >= 0
        acc[has] += ys[d][start + slot[has, d].long()].float()
    assert fake.status.tolist() == [0, 0, 0, 0]
    # The interpreter's fp32 -> bf16 cast truncates (the GPU rounds to nearest, checked there).
    truncated = (acc.view(torch.int32) & -65536).view(torch.float32)
    assert torch.equal(outs[second].float(), truncated)


def test_launch_arguments_are_checked():
    from overlap.ep.backends.triton_backend import launch_combine, launch_dispatch

    y = torch.zeros(4, 128, dtype=torch.bfloat16)
    slot = torch.zeros(4, 2, dtype=torch.int32)
    m = torch.zeros(2, 2, dtype=torch.int32)
    peers = torch.zeros(2, dtype=torch.int64)
    out = torch.zeros(4, 128, dtype=torch.bfloat16)
    status = 0
    good = dict(rank=0, num_blocks=1, max_tokens=4, seq=1, done_target=1, timeout_ns=1, status_ptr=status,
                region_offset=4096, row_stride=256)
    for key, value, match in (("rank", 2, "rank=2"), ("num_blocks", 0, "num_blocks=0"),
                              ("max_tokens", 3, "num_tokens=4"),
                              ("row_stride", 200, "row_stride=200"), ("region_offset", 8, "region_offset=8")):
        with pytest.raises(ValueError, match=match):
            launch_combine(y, slot, m, peers, out, **dict(good, **{key: value}))
    with pytest.raises(ValueError, match="peer_bases"):
        launch_combine(y, slot, m, torch.zeros(33, dtype=torch.int64), out, **good)
    x = torch.zeros(4, 100, dtype=torch.bfloat16)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    w = torch.zeros(4, 2)
    counts = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 128"):
        launch_dispatch(x, idx, w, slot, m, peers, x, idx, w, counts, 0, 1, 4, 1, 1, 1, status, 8192, 208, 4096,
                        torch.zeros(4, 1))
    with pytest.raises(ValueError, match="x_row_stride=100"):
        launch_dispatch(x, idx, w, slot, m, peers, x, idx, w, counts, 0, 1, 4, 1, 1, 1, status, 8192, 100, 4096)


# ---------------------------------------------------------------------------------------------- CPU: sm_90 build
def compile_all_for_sm90() -> None:
    """Compile the kernels as launched at 4096 x 7168 bf16; check what the data path and flags became."""
    import re

    from overlap.ep.backends.triton_backend import DEFAULT_TILE_BYTES, combine_tiles, tile_shape
    from overlap.triton_kernels import ep_intranode as k

    common = {"topk_idx_ptr": "*i64", "topk_w_ptr": "*fp32", "slot_ptr": "*i32", "matrix_ptr": "*i32",
              "peers_ptr": "*i64", "recv_idx_ptr": "*i64", "recv_w_ptr": "*fp32", "counts_ptr": "*i32",
              "recv_scales_ptr": "*fp32", "seq": "i64", "done_target": "i64", "timeout_ns": "i64",
              "status_addr": "i64"}
    flags = ("atom.global.sys.release.exch.b64", "atom.global.sys.release.add.u64", "atom.global.sys.acquire.add.u64",
             "%globaltimer")
    for fp8 in (False, True):
        block_t, block_h = tile_shape(7168, 2, DEFAULT_TILE_BYTES, min_block_h=128 if fp8 else 16)
        types = dict(common, x_ptr="*bf16", recv_x_ptr="*fp8e4nv" if fp8 else "*bf16")
        constexprs = {"FP8": fp8, "BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_K": 8, "BLOCK_S": 64,
                      "USE_GLOBALTIMER": True}
        ptx = ptx_for_sm90(k.ep_dispatch_kernel, types, constexprs, NUM_WARPS,
                           ("x_ptr", "recv_x_ptr", "hidden", "x_offset", "row_stride", "meta_offset"))
        per_thread = block_t * block_h * (1 if fp8 else 2) // (16 * 512)  # 16-byte vectors per thread per tile
        assert ptx.count("ld.global.v4.b32") >= 8, f"dispatch fp8={fp8}: x tile not read in 16-byte vectors"
        assert ptx.count("st.global.v4.b32") >= 2 * per_thread, f"dispatch fp8={fp8}: rows not stored in 16 B"
        assert ptx.count("ld.global.cg.v4.b32") >= per_thread, f"dispatch fp8={fp8}: region not read in 16 B"
        assert all(f in ptx for f in flags), f"dispatch fp8={fp8}: flag atomics/clock missing"
        if fp8:
            assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx
    block_t, block_ts, block_h = combine_tiles(7168, 2)
    ptx = ptx_for_sm90(k.ep_combine_kernel, dict(common, y_ptr="*bf16", out_ptr="*bf16"),
                       {"BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_TS": block_ts, "USE_GLOBALTIMER": True},
                       NUM_WARPS, ("y_ptr", "out_ptr", "hidden", "region_offset", "row_stride"))
    reduce_vecs, send_vecs = block_t * block_h * 2 // (16 * 512), block_ts * block_h * 2 // (16 * 512)
    assert ptx.count("ld.global.v4.b32") >= send_vecs, "combine: y not read in 16-byte vectors"
    assert ptx.count("ld.global.cg.v4.b32") >= 2 * reduce_vecs, "combine: two ranks' rows not read in 16 B"
    assert ptx.count("st.global.v4.b32") >= send_vecs + reduce_vecs, "combine: rows not stored in 16 B"
    assert all(f in ptx for f in flags)
    assert not re.search(r"atom\.global\.sys\.[a-z.]*f32", ptx)  # the reduction uses no atomics
    # The other shapes the oracle cases launch: odd rows (no 16-byte hints), other dtypes, FP8 from them.
    for dtype, size, hidden, topk, fp8 in (("fp32", 4, 3, 2, False), ("fp16", 2, 36, 2, False),
                                           ("bf16", 2, 7, 9, False), ("fp32", 4, 256, 3, True),
                                           ("fp16", 2, 128, 2, True)):
        block_t, block_h = tile_shape(hidden, size, DEFAULT_TILE_BYTES, min_block_h=128 if fp8 else 16)
        aligned = ("x_ptr", "recv_x_ptr", "hidden") if hidden % 16 == 0 else ("x_ptr", "recv_x_ptr")
        types = dict(common, x_ptr=f"*{dtype}", recv_x_ptr="*fp8e4nv" if fp8 else f"*{dtype}")
        block_k = max(2, 1 << (topk - 1).bit_length())
        ptx_for_sm90(k.ep_dispatch_kernel, types, {"FP8": fp8, "BLOCK_T": block_t, "BLOCK_H": block_h,
                                                   "BLOCK_K": block_k, "BLOCK_S": 2, "USE_GLOBALTIMER": True},
                     NUM_WARPS, aligned)
        if not fp8:
            block_t, block_ts, block_h = combine_tiles(hidden, size)
            ptx_for_sm90(k.ep_combine_kernel, dict(common, y_ptr=f"*{dtype}", out_ptr=f"*{dtype}"),
                         {"BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_TS": block_ts, "USE_GLOBALTIMER": True},
                         NUM_WARPS, ("y_ptr", "out_ptr"))


def test_kernels_compile_for_sm90():
    run_without_interpreter(__file__)


# ---------------------------------------------------------------------------------------------- GPU: rank bodies
















# ---------------------------------------------------------------------------------------------- GPU tests










