"""Python face of the compiled CUDA ops in ``overlap._C`` (registered as ``torch.ops.overlap.*``)."""
from __future__ import annotations

import torch

from overlap import load_cuda_extension
from overlap.ep.layout import RoutingLayout

_fake_registered = False


def _ensure_loaded() -> None:
    global _fake_registered
    load_cuda_extension()
    if not _fake_registered:
        # Shapes depend only on the arguments, so torch.compile can trace through the op.
        @torch.library.register_fake("overlap::routing_layout")
        def _(topk_idx, num_experts, num_ranks):
            t = topk_idx.shape[0]
            i32 = dict(dtype=torch.int32, device=topk_idx.device)
            return (topk_idx.new_empty(num_ranks, **i32), topk_idx.new_empty(num_experts, **i32),
                    topk_idx.new_empty(t, num_ranks, dtype=torch.bool, device=topk_idx.device),
                    topk_idx.new_empty(t, num_ranks, **i32))

        _fake_registered = True


def cuda_routing_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> RoutingLayout:
    """:func:`overlap.ep.layout.routing_layout` computed by the CUDA kernel (one launch, no host sync)."""
    _ensure_loaded()
    per_rank, per_expert, in_rank, slot = torch.ops.overlap.routing_layout(topk_idx, num_experts, num_ranks)
    return RoutingLayout(num_tokens_per_rank=per_rank, num_tokens_per_expert=per_expert,
                         is_token_in_rank=in_rank, token_slot_in_rank=slot)


MAX_KERNEL_EXPERTS = 4096  # csrc/kernels/routing_layout.cu keeps a per-expert histogram in shared memory


def device_routing_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> RoutingLayout:
    """The fastest routing layout available for a CUDA tensor: the CUDA kernel, else Triton.

    Both are tested bit-identical to :func:`overlap.ep.layout.routing_layout`; the reference
    itself costs ~0.8 ms at 4096 tokens on an H200 (many small launches and a sync), which
    would dominate a fast dispatch.
    """
    from overlap import has_cuda_extension

    if has_cuda_extension() and num_experts <= MAX_KERNEL_EXPERTS:
        return cuda_routing_layout(topk_idx, num_experts, num_ranks)
    import overlap.triton_kernels as tk

    return tk.routing_layout(topk_idx, num_experts, num_ranks)
