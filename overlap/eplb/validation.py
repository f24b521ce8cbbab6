"""Argument checks for :func:`overlap.eplb.rebalance_experts`.

Every check raises a ``ValueError``/``TypeError`` naming the argument, so a bad plan request
fails at the call instead of deep inside a packing loop (the published code only asserts).
"""
from __future__ import annotations

import numbers

import torch

POLICIES = ("balanced", "reference")
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_weight(weight) -> torch.Tensor:
    """Return ``weight`` as a 2-D float32 CPU tensor of finite, non-negative loads."""
    if not isinstance(weight, torch.Tensor):
        try:
            weight = torch.as_tensor(weight)
        except Exception as exc:  # lists of mixed junk, objects, ...
            raise TypeError(f"weight must be a tensor or array of loads, got {type(weight).__name__}") from exc
    if not (weight.is_floating_point() or weight.dtype in _INT_DTYPES):
        raise TypeError(f"weight must hold real numbers (float or int), got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [layers, logical experts], got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have at least one layer and one expert, got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float32)
    if torch.isnan(w).any():
        raise ValueError("weight contains NaN loads")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains infinite loads (or values too large for float32)")
    if (w < 0).any():
        bad = (w < 0).nonzero()[0].tolist()
        raise ValueError(f"weight must be non-negative; weight[{bad[0]}, {bad[1]}] = {w[bad[0], bad[1]].item()}")
    if not torch.isfinite(w.sum(-1)).all():
        raise ValueError("weight rows sum past the float32 range; rescale the loads")
    return w.contiguous()


def check_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus, policy):
    """Validate every argument; return ``(weight_f32_cpu, num_replicas, num_groups, num_nodes, num_gpus)``."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    w = check_weight(weight)
    num_replicas = check_positive_int("num_replicas", num_replicas)
    num_groups = check_positive_int("num_groups", num_groups)
    num_nodes = check_positive_int("num_nodes", num_nodes)
    num_gpus = check_positive_int("num_gpus", num_gpus)
    num_experts = w.shape[1]
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the number of logical experts ({num_experts}): "
                         "every expert needs at least one replica")
    if num_replicas % num_gpus != 0:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_gpus % num_nodes != 0:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_experts % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of logical experts ({num_experts})")
    if policy == "balanced":
        # Distinct replicas per GPU need at least as many experts in a packing domain (a node under
        # the hierarchical policy, the whole cluster otherwise) as slots on one GPU.
        domain_nodes = num_nodes if num_groups % num_nodes == 0 else 1
        experts_per_domain = num_experts // domain_nodes
        slots_per_gpu = num_replicas // num_gpus
        if slots_per_gpu > experts_per_domain:
            raise ValueError(
                f"policy='balanced' never puts two replicas of one expert on a GPU, which needs at least "
                f"{slots_per_gpu} experts per {'node' if domain_nodes > 1 else 'cluster'} "
                f"(num_replicas/num_gpus), got {experts_per_domain}; lower num_replicas or use policy='reference'")
    return w, num_replicas, num_groups, num_nodes, num_gpus
