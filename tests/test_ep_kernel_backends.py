"""GPU tests every kernel backend (cuda, triton) must pass: the oracle cases, exact equality
with the reference backend at the standard size, back-to-back calls, FP8, and failures that
raise instead of hanging. The checks themselves live in overlap/testing/ep_kernel_checks.py."""
import pytest

from overlap.testing import assert_ranks_pass, gpu_world_sizes, run_distributed
from overlap.testing import ep_kernel_checks as checks

KERNEL_BACKENDS = ["cuda", "triton"]
MODES = ("sync", "async", "expert_major")

pytestmark = [pytest.mark.gpu, pytest.mark.parametrize("backend", KERNEL_BACKENDS)]


def _need(world_size):
    if world_size not in gpu_world_sizes((1, 2, 4, 8)):
        pytest.skip(f"needs {world_size} GPUs")


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_oracle_cases(backend, world_size):
    _need(world_size)
    assert_ranks_pass(checks.oracle_cases, world_size, backend, MODES, backend="nccl", timeout_s=500)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_dispatch_equals_reference_at_standard_size(backend, world_size):
    _need(world_size)
    assert_ranks_pass(checks.realistic_vs_torch, world_size, backend, (1, 8, 24), backend="nccl", timeout_s=500)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_back_to_back_calls(backend, world_size):
    _need(world_size)
    assert_ranks_pass(checks.back_to_back, world_size, backend, backend="nccl", timeout_s=300)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_fp8_dispatch(backend, world_size):
    _need(world_size)
    assert_ranks_pass(checks.fp8_vs_reference, world_size, backend, backend="nccl", timeout_s=300)


def test_timeout_raises_instead_of_hanging(backend):
    _need(2)
    timeout_s = 2.0
    r0, r1 = run_distributed(checks.one_rank_skips_combine, 2, backend, timeout_s, backend="nccl", timeout_s=120,
                             env={"OVERLAP_KERNEL_TIMEOUT_S": str(timeout_s)})
    assert r0["raised"] and "combine" in r0["raised"] and "rank 1" in r0["raised"], r0
    assert "start the same operation" in r0["raised"], r0
    assert r1["raised"] and "rank 0" in r1["raised"], r1
    assert r0["elapsed"] < timeout_s + 10, r0


def test_mismatched_operations_raise(backend):
    _need(2)
    results = run_distributed(checks.mismatched_operations, 2, backend, backend="nccl", timeout_s=120,
                              env={"OVERLAP_KERNEL_TIMEOUT_S": "5"})
    for rank, res in enumerate(results):
        assert res["raised"] and "different operation" in res["raised"], (rank, res)
        assert f"rank {1 - rank}" in res["raised"], (rank, res)
        assert res["elapsed"] < 5, (rank, res)
