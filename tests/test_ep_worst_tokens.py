"""Dispatch with a worst-case budget (``num_worst_tokens``): fixed-size outputs, no host sync,
and (backend cuda) a dispatch -> combine step captured in a CUDA graph and replayed."""
import pytest

from overlap.testing import assert_ranks_pass, gpu_world_sizes, run_distributed
from overlap.testing import ep_budget_checks as checks


def _need(world_size):
    if world_size not in gpu_world_sizes((1, 2, 4, 8)):
        pytest.skip(f"needs {world_size} GPUs")


def test_torch_backend_budget_on_gloo():
    assert_ranks_pass(checks.budget_matches_exact, 2, "torch", False, backend="gloo", timeout_s=120)


def test_torch_backend_budget_too_small_raises_on_every_rank():
    for msg in run_distributed(checks.budget_too_small, 2, "torch", False, backend="gloo", timeout_s=120):
        assert msg and "num_worst_tokens=1" in msg, msg


def test_budget_argument_is_checked():
    from overlap.ep.validation import check_num_worst_tokens

    check_num_worst_tokens(None)
    check_num_worst_tokens(0)
    for bad in (-1, 2.0, True, "8"):
        with pytest.raises(ValueError, match="num_worst_tokens"):
            check_num_worst_tokens(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_kernel_backend_budget(backend, world_size):
    _need(world_size)
    assert_ranks_pass(checks.budget_matches_exact, world_size, backend, True, backend="nccl", timeout_s=300)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_kernel_step_captures_in_a_graph(backend, world_size):
    _need(world_size)
    assert_ranks_pass(checks.graph_replay, world_size, backend, 4, backend="nccl", timeout_s=300)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernel_backend_budget_too_small_raises(backend):
    _need(2)
    msgs = run_distributed(checks.budget_too_small, 2, backend, True, backend="nccl", timeout_s=120,
                           env={"OVERLAP_KERNEL_TIMEOUT_S": "3"})
    for msg in msgs:
        assert msg and "num_worst_tokens" in msg, msg
