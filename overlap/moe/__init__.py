"""DeepSeek-style MoE blocks whose all-to-alls hide under computation.

- ``config``: :class:`MoEConfig`, the block's sizes and routing options.
- ``router``: top-k routing, group-limited routing, auxiliary-loss-free bias balancing.
- ``linear`` / ``layers``: deferrable (WeightGradStore) linears, grouped GEMMs of the routed
  experts, attention (torch SDPA), the shared expert.
- ``comm`` / ``autograd``: the four all-to-alls over an :class:`~overlap.ep.EPBuffer`, issued
  asynchronously; dispatch and combine as autograd functions.
- ``budget``: budget mode, fixed-size buffers so that no step waits on the host.
- ``block``: :class:`MoEBlock`, cut into the pieces a schedule interleaves.
- ``schedule``: one chunk at a time, or a forward and a backward chunk overlapped.
- ``stage``: :class:`MoEStage`, a pipeline stage with DualPipe's ``overlapped_forward_backward``.
- ``groups``: PP x EP process groups and the EP buffer.
- ``measure``: computation-only and communication-only replays for timing.
"""
from overlap.moe.autograd import ExpertRows, expert_rows, moe_combine, moe_dispatch, permute, unpermute
from overlap.moe.block import LayerState, MoEBlock
from overlap.moe.budget import safe_expert_capacity, worst_case_tokens
from overlap.moe.comm import Dispatched, EPComm, Pending
from overlap.moe.config import MoEConfig
from overlap.moe.groups import PPxEPGroups, make_ep_buffer, mesh_ranks, pp_ep_groups
from overlap.moe.linear import DeferredLinear, GroupedLinear, grouped_mm, linear
from overlap.moe.measure import RecordingComm, ReplayComm, replay_transfers
from overlap.moe.router import Router, select_experts
from overlap.moe.schedule import backward_chunk, forward_chunk, overlapped_chunks, overlapped_layer
from overlap.moe.stage import MoEStage

__all__ = [
    "MoEConfig", "Router", "select_experts", "DeferredLinear", "GroupedLinear", "grouped_mm", "linear",
    "EPComm", "Pending", "Dispatched", "moe_dispatch", "moe_combine", "ExpertRows", "expert_rows", "permute",
    "unpermute", "MoEBlock", "LayerState", "forward_chunk", "backward_chunk", "overlapped_layer",
    "overlapped_chunks", "MoEStage", "PPxEPGroups", "pp_ep_groups", "mesh_ranks", "make_ep_buffer",
    "RecordingComm", "ReplayComm", "replay_transfers", "worst_case_tokens", "safe_expert_capacity",
]
