"""The reference (`torch`) backend against the communication-free oracle, on gloo and NCCL ranks."""
import pytest
import torch

from overlap.testing import assert_ranks_pass, gpu_world_sizes, run_distributed
from overlap.testing.ep_cases import standard_cases
from overlap.testing.ep_check import check_case


def _check_all(rank, world_size, backend, device_type, modes):
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    fails = []
    for case in standard_cases(world_size):
        for mode in modes:
            fails += check_case(case, rank, world_size, backend, device, mode)
    return fails


MODES = ("sync", "async", "expert_major")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_torch_backend_gloo(world_size):
    assert_ranks_pass(_check_all, world_size, "torch", "cpu", MODES, backend="gloo", timeout_s=240)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_torch_backend_nccl(world_size):
    if world_size not in gpu_world_sizes((1, 2, 4, 8)):
        pytest.skip(f"needs {world_size} GPUs")
    assert_ranks_pass(_check_all, world_size, "torch", "cuda", MODES, backend="nccl", timeout_s=300)


def _oracle_must_catch_a_wrong_backend(rank, world_size):
    """Sanity: corrupt one received row and check the checker notices (a test that can fail)."""
    from overlap.ep.backends import torch_backend
    from overlap.testing.ep_cases import EPCase

    original = torch_backend.TorchBackend.dispatch

    def corrupted(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out[0].shape[0] > 0:
            out[0][0] += 1
        return out

    torch_backend.TorchBackend.dispatch = corrupted
    try:
        case = EPCase("corrupt", [20] * world_size, 32, 2 * world_size, 2, torch.float32, seed=11)
        return check_case(case, rank, world_size, "torch", torch.device("cpu"))
    finally:
        torch_backend.TorchBackend.dispatch = original


def test_checker_detects_corruption():
    results = run_distributed(_oracle_must_catch_a_wrong_backend, 2, backend="gloo", timeout_s=120)
    assert all(any("recv_x differs" in f for f in per_rank) for per_rank in results), results
