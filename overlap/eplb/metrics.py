"""How balanced a placement is: per-GPU load, max/mean ratio, co-located replicas."""
from __future__ import annotations

import torch


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 1 else t


def gpu_loads(weight, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[layers, num_gpus]`` float64 load of each GPU.

    Each logical expert's load is split evenly over its replicas (the split
    :meth:`ExpertPlacement.to_physical` produces); a GPU's load is the sum over its slots.
    ``weight`` is ``[layers, experts]`` (or ``[experts]``), ``phy2log`` ``[layers, slots]``.
    """
    w = _as_2d(torch.as_tensor(weight)).double().cpu()
    p2l = _as_2d(phy2log).cpu()
    if p2l.shape[1] % num_gpus:
        raise ValueError(f"num_gpus ({num_gpus}) must divide the number of physical slots ({p2l.shape[1]})")
    count = torch.zeros_like(w).scatter_add_(1, p2l, torch.ones_like(p2l, dtype=w.dtype))
    share = w.gather(1, p2l) / count.gather(1, p2l)
    return share.view(p2l.shape[0], num_gpus, -1).sum(-1)


def balance_ratio(weight, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[layers]`` max/mean GPU load (1.0 is perfect balance); layers with no load give 1.0."""
    loads = gpu_loads(weight, phy2log, num_gpus)
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.max(-1).values / mean.clamp_min(1e-300), torch.ones_like(mean))


def colocated_replicas(phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[layers]`` number of slots holding an expert that an earlier slot of the same GPU holds.

    Zero means every GPU's replicas are of distinct experts; a co-located replica splits
    nothing (its GPU computes both shares), it only takes a slot from another expert.
    """
    p2l = _as_2d(phy2log).cpu()
    per_gpu = p2l.view(p2l.shape[0], num_gpus, -1)
    distinct = torch.sort(per_gpu, dim=-1).values.diff(dim=-1).ne(0).sum(-1) + 1
    return (per_gpu.shape[-1] - distinct).sum(-1)
