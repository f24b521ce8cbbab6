"""Expert-parallel load balancing: replicate hot experts, place replicas on GPUs, route to them.

- :func:`rebalance_experts` plans replicas from per-expert load (``policy="reference"``
  reproduces deepseek-ai/EPLB exactly; the default ``"balanced"`` policy never co-locates
  replicas of one expert and lowers the heaviest GPU's load).
- :class:`ExpertPlacement` maps a router's logical choices to physical slots for
  ``overlap.ep.EPBuffer``; :class:`LoadCounter` gathers the load for the next plan;
  :func:`dispatch_replicated` wires the two into one dispatch call.
- :func:`gpu_loads`, :func:`balance_ratio`, :func:`colocated_replicas` measure a plan.
"""
from overlap.eplb.dispatch import dispatch_replicated
from overlap.eplb.metrics import balance_ratio, colocated_replicas, gpu_loads
from overlap.eplb.placement import ExpertPlacement, LoadCounter
from overlap.eplb.rebalance import rebalance_experts

__all__ = ["rebalance_experts", "ExpertPlacement", "LoadCounter", "dispatch_replicated",
           "gpu_loads", "balance_ratio", "colocated_replicas"]
