"""Triton kernels (overlap.triton_kernels) against the PyTorch definitions in overlap.ep.layout.

On CPU these run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which
is slow and computes bf16 arithmetic wrongly: sizes stay small, and bf16 arithmetic (gather_reduce)
is only tested on GPU. permute_rows only loads and stores, so its bf16/fp8 cases run on CPU too.
GPU-marked tests add realistic sizes (4096 tokens, hidden 7168, top-8 of 256 experts, bf16),
torch.compile and opcheck.
"""
from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from overlap.ep import layout as ref  # noqa: E402
from overlap.triton_kernels import gather_reduce, permute_rows, routing_layout  # noqa: E402
from overlap.triton_kernels.layout import layout_launch_config  # noqa: E402
from triton_sm90 import ptx_for_sm90, run_without_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUT_FIELDS = ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank", "token_slot_in_rank")
gpu = pytest.mark.gpu


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_topk(num_tokens: int, k: int, num_experts: int, *, seed: int, drop: float = 0.2,
                experts: torch.Tensor | None = None, dtype=torch.int64) -> torch.Tensor:
    """CPU ``[T, k]``: distinct experts per token (from ``experts`` if given), a fraction ``drop``
    of the slots set to -1."""
    g = _gen(seed)
    pool = torch.arange(num_experts) if experts is None else experts
    order = torch.rand(num_tokens, len(pool), generator=g).argsort(dim=1)[:, :k]
    idx = pool[order]
    idx[torch.rand(num_tokens, k, generator=g) < drop] = -1
    return idx.to(dtype)


def _case_one_expert(seed):
    idx = torch.full((70, 3), -1, dtype=torch.int64)
    idx[:, 0] = 5
    return idx, 16, 4


def _case_duplicate_expert(seed):
    # Every slot of every token names expert 9: counted k times per token, sent once per token.
    return torch.full((33, 4), 9, dtype=torch.int64), 16, 4


def _case_all_dropped(seed):
    return torch.full((20, 2), -1, dtype=torch.int64), 8, 2


def _case_empty_rank(seed):
    # 4 ranks x 4 experts; rank 2 (experts 8..11) receives nothing.
    pool = torch.tensor([e for e in range(16) if e // 4 != 2])
    return random_topk(90, 3, 16, seed=seed, experts=pool), 16, 4


def _case_below_minus_one(seed):
    # Anything < 0 means "no expert" in the reference, not only -1.
    idx = random_topk(40, 3, 8, seed=seed)
    idx[::3, 1] = -2
    return idx, 8, 2


def _case_random(num_tokens, k, num_experts, num_ranks, drop=0.2):
    return lambda seed: (random_topk(num_tokens, k, num_experts, seed=seed, drop=drop), num_experts,
                         num_ranks)


LAYOUT_CASES = {
    "random": _case_random(64, 4, 16, 4),
    "k1": _case_random(50, 1, 8, 2),
    "experts_per_rank_1": _case_random(40, 3, 8, 8),
    "one_rank": _case_random(30, 2, 6, 1),
    "k0": _case_random(12, 0, 8, 2),
    "T0": _case_random(0, 4, 16, 4),
    "T1": _case_random(1, 2, 8, 4, drop=0.0),
    "one_expert": _case_one_expert,
    "duplicate_expert": _case_duplicate_expert,
    "all_dropped": _case_all_dropped,
    "empty_rank": _case_empty_rank,
    "below_minus_one": _case_below_minus_one,
    # Larger than one token block: count -> scan -> slot kernels.
    "multi_block": _case_random(600, 2, 16, 8, drop=0.3),
    # More ranks than one program's rank chunk, fused and multi-block.
    "rank_chunks_fused": _case_random(100, 2, 96, 96),
    "rank_chunks_multi_block": _case_random(200, 3, 128, 128),
}


def make_layout_case(name: str, seed: int, dtype: torch.dtype):
    idx, num_experts, num_ranks = LAYOUT_CASES[name](seed)
    return idx.to(dtype).to(DEVICE), num_experts, num_ranks


def assert_layout_equal(got: ref.RoutingLayout, want: ref.RoutingLayout) -> None:
    for field in LAYOUT_FIELDS:
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == w.dtype and g.shape == w.shape, (field, g.dtype, w.dtype, g.shape, w.shape)
        assert g.device == w.device, field
        assert torch.equal(g, w), f"{field} differs:\n{g}\nvs reference\n{w}"


# ---------------------------------------------------------------------------------------------
# routing_layout
# ---------------------------------------------------------------------------------------------

def test_layout_cases_cover_every_launch_path():
    """The cases above must exercise the fused, multi-block and multi-rank-chunk launches."""
    configs = []
    for name in LAYOUT_CASES:
        idx, _, num_ranks = LAYOUT_CASES[name](0)
        if idx.shape[0]:
            block_t, block_w, fused = layout_launch_config(idx.shape[0], num_ranks)
            configs.append((fused, num_ranks > block_w))
    assert {(True, False), (False, False), (True, True), (False, True)} <= set(configs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_routing_layout_matches_reference(case, seed, dtype):
    idx, num_experts, num_ranks = make_layout_case(case, seed, dtype)
    assert_layout_equal(routing_layout(idx, num_experts, num_ranks),
                        ref.routing_layout(idx, num_experts, num_ranks))


@pytest.mark.parametrize("seed", range(16))
def test_routing_layout_random_configs(seed):
    """Fresh random shapes: ranks, experts per rank, tokens, k, drop rate and index dtype."""
    g = _gen(1000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    num_ranks, experts_per_rank = pick([1, 2, 3, 4, 8, 16, 24, 40]), pick([1, 2, 3, 8])
    num_experts = num_ranks * experts_per_rank
    k = min(pick([1, 2, 4, 6, 8]), num_experts)
    num_tokens = int(torch.randint(0, 700, (1,), generator=g))
    idx = random_topk(num_tokens, k, num_experts, seed=seed, drop=pick([0.0, 0.1, 0.5, 0.9]),
                      dtype=pick([torch.int32, torch.int64])).to(DEVICE)
    assert_layout_equal(routing_layout(idx, num_experts, num_ranks),
                        ref.routing_layout(idx, num_experts, num_ranks))


def test_scan_kernel_carries_across_chunks():
    """Block counts longer than one scan chunk (needs > 16K tokens through the public API)."""
    from overlap.triton_kernels.layout import _scan_kernel

    num_blocks, num_ranks = 50, 5
    counts = torch.randint(0, 300, (num_blocks, num_ranks), generator=_gen(11), dtype=torch.int32)
    counts = counts.to(DEVICE)
    base = torch.empty_like(counts)
    totals = torch.empty(num_ranks, dtype=torch.int32, device=DEVICE)
    _scan_kernel[(2,)](counts, base, totals, num_blocks, num_ranks, BLOCK_B=16, BLOCK_W=4)
    inclusive = counts.cumsum(0, dtype=torch.int32)
    assert torch.equal(base, inclusive - counts)
    assert torch.equal(totals, inclusive[-1])


def test_routing_layout_op_is_registered():
    idx, num_experts, num_ranks = make_layout_case("random", 3, torch.int64)
    outs = torch.ops.overlap_triton.routing_layout(idx, num_experts, num_ranks)
    want = ref.routing_layout(idx, num_experts, num_ranks)
    for field, got in zip(LAYOUT_FIELDS, outs):
        assert torch.equal(got, getattr(want, field)), field


@gpu
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("num_tokens", [128, 4096, 40000])
def test_routing_layout_realistic_gpu(num_tokens, num_ranks, dtype):
    idx = random_topk(num_tokens, 8, 256, seed=num_ranks, drop=0.05, dtype=dtype).to(DEVICE)
    assert_layout_equal(routing_layout(idx, 256, num_ranks), ref.routing_layout(idx, 256, num_ranks))


# ---------------------------------------------------------------------------------------------
# permute_rows
# ---------------------------------------------------------------------------------------------

def random_rows(num_rows: int, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(num_rows, hidden, generator=_gen(seed)) * 3
    return x.to(dtype).to(DEVICE)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def permute_inputs(case: str, seed: int, slot_dtype=torch.int32, offset_dtype=torch.int64):
    idx, num_experts, num_ranks = make_layout_case(case, seed, torch.int64)
    lay = ref.routing_layout(idx, num_experts, num_ranks)
    num_rows = int(lay.num_tokens_per_rank.sum())
    return (lay.token_slot_in_rank.to(slot_dtype), lay.rank_offsets.to(offset_dtype), num_rows)


def check_permute(x, token_slot, group_offsets, num_rows):
    got = permute_rows(x, token_slot, group_offsets, num_rows)
    # Reference on the bit pattern: exact for every dtype, fp8 included.
    want = ref.permute_rows(_bits(x), token_slot, group_offsets, num_rows)
    assert got.dtype == x.dtype and got.shape == (num_rows, x.shape[1])
    assert torch.equal(_bits(got), want)


PERMUTE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", PERMUTE_DTYPES)
@pytest.mark.parametrize("hidden", [1, 100, 130, 259])
@pytest.mark.parametrize("case", ["random", "empty_rank", "one_expert", "k1"])
def test_permute_rows_matches_reference(case, hidden, dtype):
    token_slot, group_offsets, num_rows = permute_inputs(case, seed=hidden)
    x = random_rows(token_slot.shape[0], hidden, dtype, seed=hidden + 1)
    check_permute(x, token_slot, group_offsets, num_rows)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_permute_rows_index_dtypes(slot_dtype, offset_dtype):
    token_slot, group_offsets, num_rows = permute_inputs("experts_per_rank_1", 5, slot_dtype, offset_dtype)
    check_permute(random_rows(token_slot.shape[0], 48, torch.float32, 6), token_slot, group_offsets,
                  num_rows)


def test_permute_rows_expert_major_groups():
    """Groups can be experts (one column per expert) rather than ranks."""
    idx = random_topk(40, 2, 12, seed=7).to(DEVICE)
    lay = ref.routing_layout(idx, 12, 12)
    x = random_rows(40, 72, torch.float16, 8)
    check_permute(x, lay.token_slot_in_rank, lay.rank_offsets, int(lay.num_tokens_per_rank.sum()))


@pytest.mark.parametrize("num_tokens,hidden,num_rows", [(0, 64, 0), (5, 0, 3)])
def test_permute_rows_empty(num_tokens, hidden, num_rows):
    x = random_rows(num_tokens, hidden, torch.float32, 0)
    token_slot = torch.full((num_tokens, 2), -1, dtype=torch.int32, device=DEVICE)
    token_slot[:num_rows, 0] = torch.arange(num_rows, dtype=torch.int32, device=DEVICE)
    out = permute_rows(x, token_slot, torch.zeros(2, dtype=torch.int64, device=DEVICE), num_rows)
    assert out.shape == (num_rows, hidden) and out.dtype == x.dtype


@gpu
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_permute_rows_realistic_gpu(num_ranks):
    idx = random_topk(4096, 8, 256, seed=num_ranks, drop=0.05).to(DEVICE)
    lay = ref.routing_layout(idx, 256, num_ranks)
    x = random_rows(4096, 7168, torch.bfloat16, num_ranks)
    check_permute(x, lay.token_slot_in_rank, lay.rank_offsets, int(lay.num_tokens_per_rank.sum()))


# ---------------------------------------------------------------------------------------------
# gather_reduce
# ---------------------------------------------------------------------------------------------

def random_index(num_tokens: int, num_j: int, num_src: int, seed: int, drop: float = 0.25):
    g = _gen(seed)
    index = torch.randint(0, num_src, (num_tokens, num_j), generator=g)
    index[torch.rand(num_tokens, num_j, generator=g) < drop] = -1
    return index.to(DEVICE)


def random_weights(shape, dtype, seed: int):
    return torch.rand(shape, generator=_gen(seed)).add_(0.1).to(dtype).to(DEVICE)


def check_gather(src, index, weights=None, out_dtype=None):
    got = gather_reduce(src, index, weights, out_dtype)
    want = ref.gather_reduce(src, index, weights, out_dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    # fp32 sums in another order: equal up to rounding (one output ulp).
    torch.testing.assert_close(got, want)
    return got


def _cpu_or_gpu(dtype):
    """bf16 arithmetic is wrong in the interpreter: such cases run only on GPU."""
    return pytest.param(dtype, marks=gpu) if dtype == torch.bfloat16 else dtype


FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("src_dtype", [_cpu_or_gpu(d) for d in FLOATS])
@pytest.mark.parametrize("weights_dtype", [None, torch.float32, _cpu_or_gpu(torch.bfloat16)])
@pytest.mark.parametrize("num_j", [1, 3, 8, 11])
def test_gather_reduce_matches_reference(num_j, weights_dtype, src_dtype):
    index = random_index(24, num_j, 30, seed=num_j)
    weights = None if weights_dtype is None else random_weights(index.shape, weights_dtype, num_j + 1)
    check_gather(random_rows(30, 100, src_dtype, num_j + 2), index, weights)


@pytest.mark.parametrize("out_dtype", [_cpu_or_gpu(d) for d in FLOATS])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [1, 130])
def test_gather_reduce_out_dtype(hidden, src_dtype, out_dtype):
    index = random_index(16, 4, 20, seed=hidden).to(torch.int32)
    weights = random_weights(index.shape, torch.float32, hidden + 1)
    check_gather(random_rows(20, hidden, src_dtype, hidden + 2), index, weights, out_dtype)


def test_gather_reduce_skips_dropped_slots_entirely():
    """A -1 slot contributes nothing, even when its weight is inf/nan; all-dropped rows are 0."""
    index = random_index(20, 5, 12, seed=4, drop=0.4)
    index[3] = -1
    weights = random_weights(index.shape, torch.float32, 5)
    weights[index < 0] = float("nan")
    weights[0, index[0] < 0] = float("inf")
    out = check_gather(random_rows(12, 64, torch.float32, 6), index, weights)
    assert torch.isfinite(out).all()
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_gather_reduce_empty():
    src = random_rows(10, 32, torch.float32, 0)
    out = gather_reduce(src, torch.empty(0, 3, dtype=torch.int64, device=DEVICE))
    assert out.shape == (0, 32) and out.dtype == src.dtype


@pytest.mark.parametrize("case", ["random", "empty_rank", "one_expert"])
def test_permute_then_gather_round_trip(case):
    """Send-buffer permute, then the combine-side sum over ranks: each token comes back once per
    rank it was sent to."""
    idx, num_experts, num_ranks = make_layout_case(case, 9, torch.int64)
    lay = routing_layout(idx, num_experts, num_ranks)
    x = random_rows(idx.shape[0], 40, torch.float32, 10)
    sent = permute_rows(x, lay.token_slot_in_rank, lay.rank_offsets, int(lay.num_tokens_per_rank.sum()))
    slot = lay.token_slot_in_rank.to(torch.int64)
    rows = torch.where(slot >= 0, lay.rank_offsets[None, :] + slot, -1)
    back = gather_reduce(sent, rows, out_dtype=torch.float32)
    torch.testing.assert_close(back, x * lay.is_token_in_rank.sum(1, keepdim=True))


@gpu
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_gather_reduce_realistic_gpu(num_ranks):
    num_tokens, hidden, k = 4096, 7168, 8
    # Expert side: weighted un-permute of each token's k expert rows.
    src = random_rows(num_tokens * k, hidden, torch.bfloat16, 1)
    index = torch.randperm(num_tokens * k, generator=_gen(2)).view(num_tokens, k).to(DEVICE)
    index[torch.rand(num_tokens, k, generator=_gen(3)).to(DEVICE) < 0.05] = -1
    weights = random_weights(index.shape, torch.float32, 4)
    check_gather(src, index, weights)
    # Combine side: one partial row from each rank, summed in fp32.
    index = random_index(num_tokens, num_ranks, num_tokens * num_ranks, seed=5)
    check_gather(random_rows(num_tokens * num_ranks, hidden, torch.bfloat16, 6), index)


# ---------------------------------------------------------------------------------------------
# Compiled for Hopper: the interpreter checks results, not what the GPU build does. Triton compiles
# to PTX and cubin with its bundled ptxas, so this runs without a GPU -- but in a fresh process,
# because the interpreter patches triton.language in ways that break the compiler.
# ---------------------------------------------------------------------------------------------

def compile_all_for_sm90() -> None:
    """Compile every kernel variant the launchers pick; check 16-byte row accesses."""
    from overlap.triton_kernels import layout as tk_layout, permute as tk_permute, reduce as tk_reduce
    from overlap.triton_kernels._common import NUM_WARPS, row_block

    warps = tk_layout._NUM_WARPS
    for num_tokens, num_ranks in [(128, 8), (4096, 8), (4096, 64)]:
        block_t, block_w, fused = layout_launch_config(num_tokens, num_ranks)
        ptx_for_sm90(tk_layout._count_kernel, {"topk_ptr": "*i64", "in_rank_ptr": "*i1"},
                     {"FUSED": fused, "BLOCK_T": block_t, "BLOCK_W": block_w}, warps)
        if not fused:
            ptx_for_sm90(tk_layout._scan_kernel, {}, {"BLOCK_B": 16, "BLOCK_W": block_w}, warps)
            ptx_for_sm90(tk_layout._slot_kernel, {"in_rank_ptr": "*i1"}, {"BLOCK_T": block_t, "BLOCK_W": block_w},
                         warps)
    for dtype, size in [("bf16", 2), ("fp32", 4), ("fp8e4nv", 1)]:
        ptx = ptx_for_sm90(tk_permute._permute_rows_kernel,
                           {"x_ptr": f"*{dtype}", "group_offsets_ptr": "*i64", "out_ptr": f"*{dtype}"},
                           {"BLOCK_H": row_block(size, 7168)}, NUM_WARPS, aligned=("x_ptr", "out_ptr", "hidden"))
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, f"permute_rows {dtype}"
    for has_weights in (True, False):
        ptx = ptx_for_sm90(tk_reduce._gather_reduce_kernel,
                           {"src_ptr": "*bf16", "index_ptr": "*i64", "weights_ptr": "*fp32", "out_ptr": "*bf16"},
                           {"HAS_WEIGHTS": has_weights, "BLOCK_J": 8, "BLOCK_H": row_block(2, 7168)}, NUM_WARPS,
                           aligned=("src_ptr", "out_ptr", "hidden"))
        # One 16-byte load per gathered row (BLOCK_J of them in flight), one 16-byte store.
        assert ptx.count("ld.global.v4.b32") >= 8 and "st.global.v4.b32" in ptx, f"gather {has_weights}"


def test_kernels_compile_for_sm90():
    run_without_interpreter(__file__)


# ---------------------------------------------------------------------------------------------
# torch.library integration (GPU: compile and fake tensors need compiled Triton kernels)
# ---------------------------------------------------------------------------------------------

@gpu
def test_ops_under_torch_compile():
    idx = random_topk(256, 8, 64, seed=0).to(DEVICE)
    x = random_rows(256, 7168, torch.bfloat16, 1)
    weights = random_weights(idx.shape, torch.float32, 2)
    num_rows = int(ref.routing_layout(idx, 64, 4).num_tokens_per_rank.sum())

    def step(idx, x, weights):
        lay = routing_layout(idx, 64, 4)
        sent = permute_rows(x, lay.token_slot_in_rank, lay.rank_offsets, num_rows)
        slot = lay.token_slot_in_rank.to(torch.int64)
        rows = torch.where(slot >= 0, lay.rank_offsets[None, :] + slot, -1)
        back = gather_reduce(sent, rows, weights[:, :4].contiguous(), out_dtype=torch.float32)
        return lay.num_tokens_per_expert, lay.token_slot_in_rank, sent, back

    got = torch.compile(step, fullgraph=True)(idx, x, weights)
    want = step(idx, x, weights)
    for g, w in zip(got[:3], want[:3]):
        assert torch.equal(g, w)
    torch.testing.assert_close(got[3], want[3])


@gpu
def test_opcheck():
    idx = random_topk(64, 4, 16, seed=0).to(DEVICE)
    lay = ref.routing_layout(idx, 16, 4)
    x = random_rows(64, 256, torch.bfloat16, 1)
    num_rows = int(lay.num_tokens_per_rank.sum())
    src = random_rows(50, 256, torch.bfloat16, 2)
    index = random_index(64, 4, 50, seed=3)
    utils = ("test_schema", "test_faketensor")
    ops = torch.ops.overlap_triton
    torch.library.opcheck(ops.routing_layout, (idx, 16, 4), test_utils=utils)
    torch.library.opcheck(ops.permute_rows, (x, lay.token_slot_in_rank, lay.rank_offsets, num_rows),
                          test_utils=utils)
    torch.library.opcheck(ops.gather_reduce, (src, index, None, torch.float32), test_utils=utils)


@gpu
def test_bench_runs():
    from overlap.triton_kernels.bench import bench_local_kernels

    rows = bench_local_kernels(num_tokens=256, hidden=1024, num_ranks=4, iters=3)
    assert rows and all(r["time_us"] > 0 and r["hbm_gbps"] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument
# ---------------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.int64, device=None):
    return torch.zeros(*shape, dtype=dtype, device=device or DEVICE)


_X = lambda: random_rows(4, 8, torch.float32, 0)  # noqa: E731
_SLOT = lambda: _t(4, 2, dtype=torch.int32)  # noqa: E731
_OFF = lambda: _t(2)  # noqa: E731
_SRC = lambda: random_rows(6, 8, torch.float32, 0)  # noqa: E731

# name: (call, exception, the argument the message must name, why)
BAD_INPUTS = {
    "topk_list": (lambda: routing_layout([[0, 1]], 4, 2), TypeError, "topk_idx", "torch.Tensor"),
    "topk_float": (lambda: routing_layout(_t(3, 2, dtype=torch.float32), 4, 2), TypeError,
                   "topk_idx", "dtype"),
    "topk_1d": (lambda: routing_layout(_t(3), 4, 2), ValueError, "topk_idx", "2-D"),
    "topk_strided": (lambda: routing_layout(_t(2, 3).t(), 4, 2), ValueError, "topk_idx", "contiguous"),
    "topk_meta": (lambda: routing_layout(_t(3, 2, device="meta"), 4, 2), ValueError, "topk_idx",
                  "CUDA"),
    "experts_not_multiple": (lambda: routing_layout(_t(3, 2), 6, 4), ValueError, "num_experts",
                             "multiple"),
    "experts_float": (lambda: routing_layout(_t(3, 2), 4.0, 2), TypeError, "num_experts", "int"),
    "ranks_zero": (lambda: routing_layout(_t(3, 2), 4, 0), ValueError, "num_ranks", ">= 1"),
    "ranks_bool": (lambda: routing_layout(_t(3, 2), 4, True), TypeError, "num_ranks", "int"),
    "x_int": (lambda: permute_rows(_t(4, 8), _SLOT(), _OFF(), 4), TypeError, "x", "dtype"),
    "x_3d": (lambda: permute_rows(_X().view(4, 2, 4), _SLOT(), _OFF(), 4), ValueError, "x", "2-D"),
    "x_strided": (lambda: permute_rows(_X()[:, ::2], _SLOT(), _OFF(), 4), ValueError, "x",
                  "contiguous"),
    "slot_float": (lambda: permute_rows(_X(), _SLOT().float(), _OFF(), 4), TypeError, "token_slot",
                   "dtype"),
    "slot_rows": (lambda: permute_rows(_X(), _t(3, 2), _OFF(), 4), ValueError, "token_slot",
                  "one row per token"),
    "slot_meta": (lambda: permute_rows(_X(), _t(4, 2, device="meta"), _OFF(), 4), ValueError,
                  "token_slot", "CUDA"),
    "offsets_len": (lambda: permute_rows(_X(), _SLOT(), _t(3), 4), ValueError, "group_offsets",
                    "one entry per column"),
    "offsets_2d": (lambda: permute_rows(_X(), _SLOT(), _t(2, 1), 4), ValueError, "group_offsets",
                   "1-D"),
    "offsets_float": (lambda: permute_rows(_X(), _SLOT(), _OFF().double(), 4), TypeError,
                      "group_offsets", "dtype"),
    "num_rows_negative": (lambda: permute_rows(_X(), _SLOT(), _OFF(), -1), ValueError, "num_rows",
                          ">= 0"),
    "num_rows_float": (lambda: permute_rows(_X(), _SLOT(), _OFF(), 4.0), TypeError, "num_rows", "int"),
    "src_int": (lambda: gather_reduce(_t(6, 8), _t(4, 2)), TypeError, "src", "dtype"),
    "src_1d": (lambda: gather_reduce(_SRC()[0], _t(4, 2)), ValueError, "src", "2-D"),
    "src_fp8": (lambda: gather_reduce(_SRC().to(torch.float8_e4m3fn), _t(4, 2)), TypeError, "src",
                "dtype"),
    "index_float": (lambda: gather_reduce(_SRC(), _t(4, 2).float()), TypeError, "index", "dtype"),
    "index_strided": (lambda: gather_reduce(_SRC(), _t(2, 4).t()), ValueError, "index", "contiguous"),
    "weights_shape": (lambda: gather_reduce(_SRC(), _t(4, 2), random_rows(4, 3, torch.float32, 1)),
                      ValueError, "weights", "shape of index"),
    "weights_int": (lambda: gather_reduce(_SRC(), _t(4, 2), _t(4, 2)), TypeError, "weights", "dtype"),
    "out_dtype_str": (lambda: gather_reduce(_SRC(), _t(4, 2), out_dtype="float32"), TypeError,
                      "out_dtype", "torch.dtype"),
    "out_dtype_int": (lambda: gather_reduce(_SRC(), _t(4, 2), out_dtype=torch.int32), TypeError,
                      "out_dtype", "one of"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(name):
    call, exc, arg, why = BAD_INPUTS[name]
    with pytest.raises(exc, match=rf"^{arg}\b.*{re.escape(why)}"):
        call()


@gpu
def test_cpu_tensor_with_cuda_tensors_raises():
    x = random_rows(4, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="token_slot"):
        permute_rows(x, _SLOT().cpu(), _OFF(), 4)
