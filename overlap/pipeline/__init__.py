"""Pipeline parallelism: DualPipe, DualPipeV, 1F1B and ZB1P on one schedule core.

- ``ops``: the op vocabulary (``F0.3``, ``B1.2``, ``b0.1``, ``W``, ``[F0.3&B1.2]``) shared
  by schedules, the executor's trace and the simulator.
- ``schedules``: a schedule is a placement plus per-rank op lists; one generator writes
  DualPipe and DualPipeV, another 1F1B and ZB1P.
- ``engine``: the one executor (``PipelineEngine``); ``pipelines``: the four classes, with
  the constructor and ``step()`` of deepseek-ai/DualPipe.
- ``simulator``: timelines, bubbles, peak activations; ``draw``: schedule pictures.
"""
from overlap.pipeline.comm import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from overlap.pipeline.engine import PipelineEngine
from overlap.pipeline.ops import Op, parse_op, parse_trace
from overlap.pipeline.pipelines import DualPipe, DualPipeV, OneFOneB, ZB1P
from overlap.pipeline.schedules import SCHEDULES, Chain, Schedule, build_schedule, check_schedule
from overlap.pipeline.simulator import (Durations, SimResult, Timeline, dependency_violations, peak_activations,
                                        published_activations, published_bubble, simulate, simulate_timeline)
from overlap.pipeline.utils import WeightGradStore, run_backward

__all__ = [
    "DualPipe", "DualPipeV", "OneFOneB", "ZB1P", "PipelineEngine", "WeightGradStore", "run_backward",
    "set_p2p_tensor_shapes", "set_p2p_tensor_dtype", "Op", "parse_op", "parse_trace",
    "SCHEDULES", "Chain", "Schedule", "build_schedule", "check_schedule",
    "Durations", "SimResult", "Timeline", "simulate", "simulate_timeline", "peak_activations",
    "dependency_violations",
    "published_bubble", "published_activations",
]
