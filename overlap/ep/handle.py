"""The handle a dispatch returns and its combine consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from overlap.ep.layout import RoutingLayout


@dataclass
class DispatchHandle:
    """Everything a combine needs to send rows back to where a dispatch took them from.

    Attributes:
        buffer_id: id of the EPBuffer that made it (a handle is not portable across buffers).
        num_tokens: tokens this rank dispatched (rows of the combine output).
        layout: the routing layout of those tokens.
        num_recv_tokens: rows of the dispatch outputs, i.e. rows ``combine`` expects in ``y``:
            the rows this rank received, or ``num_worst_tokens`` when the dispatch was given
            that budget (rows past the received ones have no expert: ids -1, weights 0).
        recv_counts: ``[W]`` tokens received from each rank (host list, or None when a
            backend keeps them on the device only).
        recv_topk_idx / recv_topk_weights: per received row, local expert ids (-1 where the
            slot's expert is elsewhere) and their weights (0 there).
        backend_state: whatever the backend needs beyond this (opaque to callers).
        num_worst_tokens: the dispatch's worst-case budget, or None for exact-size outputs.
        recv_rank_counts: ``[W]`` integer tensor on the dispatch's device, rows received from
            each rank; valid once the dispatch's event has been waited for. Unlike
            ``recv_counts`` it never costs a host sync, so budget-mode callers read it.
    """

    buffer_id: int
    num_tokens: int
    layout: RoutingLayout
    num_recv_tokens: int
    recv_counts: Optional[list[int]]
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    backend_state: Any = None
    num_worst_tokens: Optional[int] = None
    recv_rank_counts: Optional[torch.Tensor] = None
    _expert_positions: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    @property
    def num_expert_rows(self) -> int:
        """Rows of the expert-major layout: received (token, local expert) pairs."""
        return int((self.recv_topk_idx >= 0).sum().item())
