"""Process groups for pipeline x expert parallelism, and the EP buffer a stage communicates through.

Ranks are laid out EP-innermost: ``rank = pp_rank * ep + ep_rank``, so an EP group is ``ep``
consecutive ranks (neighbours on one NVLink island) and a PP group takes one rank from each.
PP2 x EP2 on 4 ranks: EP groups {0, 1} and {2, 3}; PP groups {0, 2} and {1, 3}.

On NCCL the EP groups can be confined to ``num_sms`` SMs (NCCL's ``max_ctas``; one CTA per
SM) and given a high-priority stream, so their all-to-alls leave the other SMs to the GEMMs
they overlap with, as in DeepSeek-V3 (20 of 132 SMs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from overlap.ep import EPBuffer
from overlap.moe.config import MoEConfig


@dataclass
class PPxEPGroups:
    """This rank's place in a PP x EP mesh and the groups it belongs to."""

    pp: int
    ep: int
    pp_rank: int
    ep_rank: int
    pp_group: Optional["dist.ProcessGroup"]
    ep_group: Optional["dist.ProcessGroup"]


def mesh_ranks(pp: int, ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(pp_groups, ep_groups)``: the global ranks of every PP group and every EP group."""
    for name, value in (("pp", pp), ("ep", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    ep_groups = [[p * ep + e for e in range(ep)] for p in range(pp)]
    pp_groups = [[p * ep + e for p in range(pp)] for e in range(ep)]
    return pp_groups, ep_groups


def _nccl_options(num_sms: Optional[int]):
    if num_sms is None or not hasattr(dist, "ProcessGroupNCCL"):
        return None
    opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    opts.config.max_ctas = num_sms
    return opts


def pp_ep_groups(pp: int, ep: int, *, num_sms: Optional[int] = None) -> PPxEPGroups:
    """Build every PP and EP group of a ``pp x ep`` mesh (a collective: all ranks call it).

    ``num_sms`` (NCCL only) caps the CTAs of the EP groups' kernels. Raises ValueError when
    ``pp * ep`` differs from the world size.
    """
    if not dist.is_initialized():
        raise RuntimeError("pp_ep_groups needs torch.distributed to be initialised first")
    world = dist.get_world_size()
    pp_groups, ep_groups = mesh_ranks(pp, ep)
    if pp * ep != world:
        raise ValueError(f"pp={pp} x ep={ep} = {pp * ep} ranks, but the world has {world}")
    if num_sms is not None and (not isinstance(num_sms, int) or num_sms < 1):
        raise ValueError(f"num_sms must be a positive int or None, got {num_sms!r}")
    rank = dist.get_rank()
    nccl = "nccl" in str(dist.get_backend())
    ep_opts = _nccl_options(num_sms) if nccl else None
    mine_pp = mine_ep = None
    # new_group is collective over the world: every rank creates every group, in one order.
    for ranks in ep_groups:
        g = dist.new_group(ranks, pg_options=ep_opts) if ep_opts is not None else dist.new_group(ranks)
        if rank in ranks:
            mine_ep = g
    for ranks in pp_groups:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine_pp = g
    return PPxEPGroups(pp=pp, ep=ep, pp_rank=rank // ep, ep_rank=rank % ep, pp_group=mine_pp, ep_group=mine_ep)


# Tried in this order by backend="auto": the fastest first, the reference last.
PREFERRED_BACKENDS = ("cuda", "triton", "torch")


def make_ep_buffer(config: MoEConfig, group, max_tokens_per_rank: int, *, backend: str = "torch",
                   num_sms: int = 20, validate_values: bool = True) -> EPBuffer:
    """The :class:`~overlap.ep.EPBuffer` for ``config``'s experts over ``group``.

    ``backend="auto"`` takes the first of :data:`PREFERRED_BACKENDS` that is built here and
    accepts the group (its name is then ``buffer.backend_name``). ``validate_values`` checks
    routing ids on every call (a host sync); turn it off when timing.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
    kw = dict(num_experts=config.num_experts, hidden=config.hidden, max_tokens_per_rank=max_tokens_per_rank,
              num_sms=num_sms, validate_values=validate_values)
    if backend != "auto":
        return EPBuffer(group, backend=backend, **kw)
    from overlap.ep import available_backends

    built = available_backends()
    errors = []
    for name in [b for b in PREFERRED_BACKENDS if b in built] + [b for b in built if b not in PREFERRED_BACKENDS]:
        try:
            return EPBuffer(group, backend=name, **kw)
        except (RuntimeError, ValueError) as exc:   # e.g. a GPU backend on a gloo group
            errors.append(f"{name}: {exc}")
    raise RuntimeError("no EP backend accepts this group: " + "; ".join(errors))
