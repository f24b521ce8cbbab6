"""Dispatch with replicas: route logical choices to physical slots through an ``EPBuffer``."""
from __future__ import annotations

from typing import Optional

import torch

from overlap.eplb.placement import ExpertPlacement, LoadCounter


def dispatch_replicated(buffer, placement: ExpertPlacement, x: torch.Tensor, topk_idx: torch.Tensor,
                        topk_weights: torch.Tensor, *, counter: Optional[LoadCounter] = None, layer: int = 0,
                        token_ids: Optional[torch.Tensor] = None, salt: int = 0):
    """Count the logical load, pick one replica per choice, and dispatch to physical slots.

    ``buffer`` is an :class:`overlap.ep.EPBuffer` built with ``num_experts =
    placement.num_physical``; ``topk_idx`` holds *logical* expert ids (-1 = none). Returns
    ``buffer.dispatch``'s tuple: ``recv_topk_idx`` are this rank's *local physical* slots, whose
    logical experts are ``placement.local_logical(rank, world_size)``; combine as usual with
    ``buffer.combine(y, handle)``. With replicas computing their logical expert's function the
    combined output equals dispatch without replicas.

    Args:
        counter: if given, ``counter.add(topk_idx, layer)`` records this step's logical load.
        token_ids, salt: replica choice, see :meth:`ExpertPlacement.to_physical`; ``salt``
            defaults to 0, pass the rank to spread remainders across replicas.
    """
    if buffer.num_experts != placement.num_physical:
        raise ValueError(f"buffer has {buffer.num_experts} experts but the placement {placement.num_physical} "
                         "physical slots; build the EPBuffer with num_experts=placement.num_physical")
    if counter is not None:
        counter.add(topk_idx, layer)
    phys = placement.to_physical(topk_idx, token_ids=token_ids, salt=salt)
    return buffer.dispatch(x, phys, topk_weights)
