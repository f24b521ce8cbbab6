"""Replica placement at run time: logical routing -> physical slots, and load statistics.

An EPLB plan for one layer says which logical expert each *physical slot* holds. The
expert-parallel buffer is then built over physical slots (``EPBuffer(num_experts=P)``, slot
``p`` on rank ``p // (P / W)``), the router keeps choosing *logical* experts, and
:class:`ExpertPlacement` turns each choice into one of that expert's replicas just before
dispatch. :class:`LoadCounter` accumulates how many tokens chose each logical expert, the
input of the next :func:`~overlap.eplb.rebalance_experts`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _check_int_tensor(name: str, t, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D for one layer, got shape {tuple(t.shape)}")
    return t.to(torch.int64)


class ExpertPlacement:
    """Where the replicas of each logical expert live, for one MoE layer.

    Args:
        phy2log: ``[P]`` logical expert of each physical slot (one layer of
            :func:`~overlap.eplb.rebalance_experts`' ``phy2log``).
        log2phy: optional ``[E, M]`` slots of each expert by replica rank, -1 padded.
        logcnt: optional ``[E]`` replicas per expert.
        num_logical: number of logical experts E (default: ``logcnt``'s length, else
            ``phy2log.max() + 1``).

    ``log2phy`` and ``logcnt`` are derived from ``phy2log`` when not given, and checked
    against it when given. Every logical expert needs at least one slot.

    Example::

        phy2log, log2phy, logcnt = rebalance_experts(load, P, groups, nodes, world_size)
        placement = ExpertPlacement.from_plan(phy2log, log2phy, logcnt, layer=0)
        buf = EPBuffer(group, num_experts=placement.num_physical, hidden=H, max_tokens_per_rank=T)
        phys_idx = placement.to_physical(topk_idx, salt=rank)
        recv_x, recv_idx, recv_w, counts, handle = buf.dispatch(x, phys_idx, topk_weights)
        # local slot s of this rank computes logical expert placement.local_logical(rank, W)[s]
    """

    def __init__(self, phy2log: torch.Tensor, log2phy: Optional[torch.Tensor] = None,
                 logcnt: Optional[torch.Tensor] = None, *, num_logical: Optional[int] = None):
        phy2log = _check_int_tensor("phy2log", phy2log, 1).cpu()
        if phy2log.numel() == 0:
            raise ValueError("phy2log is empty")
        if num_logical is None:
            num_logical = logcnt.shape[0] if logcnt is not None else int(phy2log.max()) + 1
        if phy2log.min() < 0 or phy2log.max() >= num_logical:
            raise ValueError(f"phy2log values must lie in [0, {num_logical}), got "
                             f"[{int(phy2log.min())}, {int(phy2log.max())}]")
        count = torch.bincount(phy2log, minlength=num_logical)
        if (count == 0).any():
            missing = (count == 0).nonzero().flatten()[:8].tolist()
            raise ValueError(f"logical experts {missing} have no physical slot in phy2log")
        if logcnt is not None:
            logcnt = _check_int_tensor("logcnt", logcnt, 1).cpu()
            if not torch.equal(logcnt, count):
                raise ValueError("logcnt does not match the replica counts in phy2log")
        # Slots of each expert in replica-rank order; without log2phy, rank = slot order.
        order = torch.sort(phy2log, stable=True).indices
        width = int(count.max())
        start = torch.cumsum(count, 0) - count
        rank_of_sorted = torch.arange(phy2log.numel()) - start[phy2log[order]]
        derived = torch.full((num_logical, width), -1, dtype=torch.int64)
        derived[phy2log[order], rank_of_sorted] = order
        if log2phy is not None:
            log2phy = _check_int_tensor("log2phy", log2phy, 2).cpu()
            if log2phy.shape[0] != num_logical or log2phy.shape[1] < width:
                raise ValueError(f"log2phy must be [{num_logical}, >= {width}], got {tuple(log2phy.shape)}")
            # A plan pads to the widest layer; this layer's extra columns must be padding.
            if (log2phy[:, width:] != -1).any():
                raise ValueError("log2phy lists more replicas than phy2log holds")
            log2phy = log2phy[:, :width].contiguous()
            valid = log2phy >= 0
            # Replica r of expert e must be at column r < count[e]: to_physical indexes by rank.
            if not torch.equal(valid, torch.arange(width) < count.unsqueeze(1)) or not torch.equal(
                    torch.sort(torch.where(valid, log2phy, -1), dim=1).values,
                    torch.sort(derived, dim=1).values):
                raise ValueError("log2phy does not list the same slots as phy2log")
        else:
            log2phy = derived
        self.phy2log, self.log2phy, self.logcnt = phy2log, log2phy, count
        self.num_physical, self.num_logical = phy2log.numel(), num_logical
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_plan(cls, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                  layer: int = 0) -> "ExpertPlacement":
        """The placement of ``layer`` from the three outputs of ``rebalance_experts``."""
        if phy2log.dim() != 2:
            raise ValueError(f"phy2log must be [layers, slots], got shape {tuple(phy2log.shape)}")
        if not 0 <= layer < phy2log.shape[0]:
            raise ValueError(f"layer must be in [0, {phy2log.shape[0]}), got {layer}")
        return cls(phy2log[layer], log2phy[layer], logcnt[layer])

    @classmethod
    def identity(cls, num_experts: int) -> "ExpertPlacement":
        """One slot per expert, slot ``e`` holding expert ``e`` (no replication)."""
        return cls(torch.arange(num_experts))

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.log2phy.to(device), self.logcnt.to(device))
        return self._on_device[device]

    def to_physical(self, topk_idx: torch.Tensor, token_ids: Optional[torch.Tensor] = None,
                    salt: int = 0, check_values: bool = True) -> torch.Tensor:
        """Map logical ``topk_idx`` ``[T, k]`` to physical slots, one replica per choice; -1 stays -1.

        Replica choice is deterministic and vectorised, on ``topk_idx``'s device:

        - default: the ``j``-th choice of expert ``e`` in this call (row-major over
          ``[T, k]``) goes to replica ``(j + salt) % logcnt[e]``, so each expert's tokens split
          over its replicas evenly to within one token. Pass ``salt=rank`` so that the
          remainders of different ranks land on different replicas.
        - with ``token_ids`` ``[T]`` (e.g. global token indices): replica
          ``(token_ids[t] + salt) % logcnt[e]``, a function of the token alone, even across
          calls with different batches.

        ``check_values=False`` skips the range check of ``topk_idx`` (a device-to-host sync on
        GPU); out-of-range ids then give undefined slots.
        """
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError("topk_idx must be an int32/int64 tensor")
        if topk_idx.dim() != 2:
            raise ValueError(f"topk_idx must be [num_tokens, k], got shape {tuple(topk_idx.shape)}")
        log2phy, logcnt = self._tables(topk_idx.device)
        idx = topk_idx.to(torch.int64)
        valid = idx >= 0
        # Out-of-range ids are the router's bug; fail loudly rather than index garbage.
        if check_values and bool(((idx >= self.num_logical) | (idx < -1)).any()):
            raise ValueError(f"topk_idx values must be -1 or in [0, {self.num_logical})")
        expert = torch.where(valid, idx, 0)
        count = logcnt[expert]
        if token_ids is not None:
            if token_ids.shape != (idx.shape[0],):
                raise ValueError(f"token_ids must be [{idx.shape[0]}], got shape {tuple(token_ids.shape)}")
            pick = token_ids.to(idx.device, torch.int64).unsqueeze(1) + salt
        else:
            pick = self._occurrence(torch.where(valid, idx, self.num_logical)) + salt
        replica = torch.remainder(pick, count)
        phys = log2phy[expert, replica]
        return torch.where(valid, phys, -1).to(topk_idx.dtype)

    def _occurrence(self, key: torch.Tensor) -> torch.Tensor:
        """For each entry, how many earlier entries (row-major) share its key."""
        flat = key.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=self.num_logical + 1)
        start = torch.cumsum(counts, 0) - counts
        occ = torch.empty_like(flat)
        occ[order] = torch.arange(flat.numel(), device=flat.device) - start[flat[order]]
        return occ.view_as(key)

    def slots_of_rank(self, rank: int, world_size: int) -> torch.Tensor:
        """Physical slot ids hosted by ``rank`` (contiguous, as ``EPBuffer`` places experts)."""
        if self.num_physical % world_size:
            raise ValueError(f"{self.num_physical} physical slots do not split over {world_size} ranks")
        per = self.num_physical // world_size
        return torch.arange(rank * per, (rank + 1) * per)

    def local_logical(self, rank: int, world_size: int) -> torch.Tensor:
        """``[P / W]`` logical expert computed by each local slot of ``rank``."""
        return self.phy2log[self.slots_of_rank(rank, world_size)]

    def logical_counts(self, physical_counts: torch.Tensor) -> torch.Tensor:
        """Sum per-slot counts ``[P]`` (e.g. tokens each replica received) into ``[E]`` per logical expert."""
        if physical_counts.shape != (self.num_physical,):
            raise ValueError(f"physical_counts must be [{self.num_physical}], got {tuple(physical_counts.shape)}")
        p2l = self.phy2log.to(physical_counts.device)
        out = torch.zeros(self.num_logical, dtype=physical_counts.dtype, device=physical_counts.device)
        return out.index_add_(0, p2l, physical_counts)

    def __repr__(self) -> str:
        return (f"ExpertPlacement(num_logical={self.num_logical}, num_physical={self.num_physical}, "
                f"max_replicas={self.log2phy.shape[1]})")


class LoadCounter:
    """Tokens per logical expert, per layer, accumulated over steps to feed the next rebalance.

    Args:
        num_layers: MoE layers tracked.
        num_experts: logical experts per layer.
        device: where counts live (the device of the ``topk_idx`` you add; CUDA for NCCL).

    Example::

        counter = LoadCounter(num_layers, num_experts, device="cuda")
        for step in ...:
            counter.add(topk_idx, layer=i)           # the router's logical choices
        load = counter.reduce(group)                 # summed over ranks
        plan = rebalance_experts(load, P, groups, nodes, world_size)
        counter.reset()
    """

    def __init__(self, num_layers: int, num_experts: int, device=None):
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64,
                                  device=torch.device(device) if device is not None else None)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    def add(self, topk_idx: torch.Tensor, layer: int = 0, check_values: bool = True) -> None:
        """Count each logical choice in ``topk_idx`` (any shape; -1 ignored).

        ``check_values=False`` skips the range check (a device-to-host sync on GPU).
        """
        self._check_layer(layer)
        idx = topk_idx.reshape(-1).to(self.counts.device, torch.int64)
        if check_values and bool(((idx >= self.num_experts) | (idx < -1)).any()):
            raise ValueError(f"topk_idx values must be -1 or in [0, {self.num_experts})")
        # -1 adds 0 to expert 0: no boolean indexing, so no sync and a fixed-shape update.
        self.counts[layer].index_add_(0, idx.clamp(min=0), (idx >= 0).to(torch.int64))

    def add_counts(self, counts: torch.Tensor, layer: int = 0) -> None:
        """Add ready-made per-logical-expert counts ``[E]`` (e.g. :meth:`ExpertPlacement.logical_counts`)."""
        self._check_layer(layer)
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts must be [{self.num_experts}], got shape {tuple(counts.shape)}")
        self.counts[layer] += counts.to(self.counts.device, torch.int64)

    def reduce(self, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        """``[layers, experts]`` counts summed over the ranks of ``group`` (a copy; local counts kept).

        Without an initialised process group, the local counts. Every rank of ``group`` must call it.
        """
        out = self.counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    def reset(self) -> None:
        """Zero the counts (start a new statistics window)."""
        self.counts.zero_()
