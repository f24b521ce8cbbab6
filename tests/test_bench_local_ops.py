"""pytest-benchmark microbenchmarks of the local (no communication) EP ops.

Disabled by default (pytest.ini: --benchmark-disable runs each body once as a test); run
`python -m pytest tests/test_bench_local_ops.py --benchmark-enable` to time them.
"""
import pytest
import torch

from overlap.ep.layout import gather_reduce, permute_rows, routing_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Standard training size on GPU; a reduced one on CPU, where these run as smoke tests.
T, H, E, K, W = (4096, 7168, 256, 8, 4) if DEVICE == "cuda" else (512, 1024, 64, 8, 4)


@pytest.fixture(scope="module")
def routing():
    gen = torch.Generator().manual_seed(0)
    idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.to(DEVICE)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(DEVICE)
    return idx, x


def _sync(out):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


def test_bench_routing_layout_torch(benchmark, routing):
    idx, _ = routing
    lay = benchmark(lambda: _sync(routing_layout(idx, E, W)))
    assert int(lay.num_tokens_per_expert.sum()) == T * K


@pytest.mark.gpu
def test_bench_routing_layout_cuda(benchmark, routing):
    from overlap.ep.cuda_ops import cuda_routing_layout

    idx, _ = routing
    lay = benchmark(lambda: _sync(cuda_routing_layout(idx, E, W)))
    assert torch.equal(lay.token_slot_in_rank, routing_layout(idx, E, W).token_slot_in_rank)


def test_bench_permute_rows_torch(benchmark, routing):
    idx, x = routing
    lay = routing_layout(idx, E, W)
    n = int(lay.num_tokens_per_rank.sum())
    out = benchmark(lambda: _sync(permute_rows(x, lay.token_slot_in_rank, lay.rank_offsets, n)))
    assert out.shape == (n, H)


def test_bench_gather_reduce_torch(benchmark, routing):
    idx, x = routing
    lay = routing_layout(idx, E, W)
    rows = torch.where(lay.is_token_in_rank, lay.rank_offsets.unsqueeze(0) + lay.token_slot_in_rank, -1)
    src = permute_rows(x, lay.token_slot_in_rank, lay.rank_offsets, int(lay.num_tokens_per_rank.sum()))
    out = benchmark(lambda: _sync(gather_reduce(src, rows)))
    assert out.shape == x.shape
