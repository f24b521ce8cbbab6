"""The contract every dispatch/combine backend implements, and the registry that names them."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from overlap.ep.events import EPEvent
from overlap.ep.handle import DispatchHandle
from overlap.ep.layout import RoutingLayout

if TYPE_CHECKING:
    from overlap.ep.buffer import EPBuffer

DispatchOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, DispatchHandle, EPEvent]


class EPBackend(ABC):
    """One way of moving tokens between the ranks of an EPBuffer.

    A backend receives already-validated inputs and the routing layout, and must follow the
    conventions in :mod:`overlap.ep.layout` (receive order: source rank, then source token),
    so that every backend's dispatch output equals the reference backend's exactly.
    """

    name: ClassVar[str]
    # Whether a dispatch with num_worst_tokens and its combine can be captured in a CUDA graph
    # (sequence numbers on the GPU, no host syncs); experiments/ep_bench.py's "graph" mode reads it.
    graph_capturable: ClassVar[bool] = False

    def __init__(self, buffer: "EPBuffer"):
        self.buffer = buffer

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable on this machine, why not). Checked before construction."""
        return True, ""

    def check_group(self, buffer: "EPBuffer") -> None:
        """Raise if this backend cannot run on ``buffer``'s process group / device."""

    @abstractmethod
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 layout: RoutingLayout, *, async_op: bool, num_worst_tokens: Optional[int] = None) -> DispatchOutput:
        """Return ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, handle, event)``.

        With ``num_worst_tokens`` the outputs have exactly that many rows; rows past the
        received ones have ids -1 and weights 0 (and any ``recv_x`` content).
        """

    @abstractmethod
    def combine(self, y: torch.Tensor, handle: DispatchHandle, *, async_op: bool) -> tuple[torch.Tensor, EPEvent]:
        """Sum each token's per-rank rows ``y`` back at its source rank, in fp32; return ``(out, event)``."""


_REGISTRY: dict[str, type[EPBackend]] = {}


def register_backend(cls: type[EPBackend]) -> type[EPBackend]:
    """Class decorator: make a backend selectable by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"backend {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    """All registered backend names, usable here or not."""
    return sorted(_REGISTRY)


def available_backends() -> list[str]:
    """Backend names usable on this machine."""
    return [n for n in backend_names() if _REGISTRY[n].availability()[0]]


def get_backend_class(name: str) -> type[EPBackend]:
    """The backend class called ``name``; a clear error if it is unknown or not built here."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is not a known backend; choose one of {backend_names()}")
    cls = _REGISTRY[name]
    ok, why = cls.availability()
    if not ok:
        raise RuntimeError(f"backend={name!r} is not available on this machine: {why}")
    return cls
