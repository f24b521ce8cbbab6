"""The four pipelines: each is the one engine plus a schedule name and a module count.

=============  =============  =================================================================
class          modules/rank   where the batch goes in (inputs) and the loss comes out (labels)
=============  =============  =================================================================
DualPipe       2              half the micro-batches enter at rank 0, half at rank N-1; each
                              end computes the loss of the half that entered at the other end
DualPipeV      2              rank 0: inputs, labels, loss (the V turns at rank N-1)
OneFOneB       1              rank 0: inputs; rank N-1: labels and loss
ZB1P           1              as OneFOneB
=============  =============  =================================================================
"""
from __future__ import annotations

from overlap.pipeline.engine import PipelineEngine


class DualPipe(PipelineEngine):
    """DualPipe (DeepSeek-V3): two pipelines in opposite directions, forward chunks of one
    overlapped with backward chunks of the other. Interface of deepseek-ai/DualPipe.

    ``modules = (stage r, stage N-1-r)`` on rank ``r`` of an even ``N``: module 0 runs the
    direction that starts at rank 0, module 1 the one that starts at rank N-1. ``step`` needs
    an even ``num_chunks >= 2N``; on rank 0 pass the first half of the batch as inputs and the
    labels of the second half (which enters at rank N-1), and the other way round on rank N-1.
    The loss on rank 0 is that of the second half; on rank N-1, that of the first half. The
    two copies of each stage get separate gradients: sum them (e.g. with an all-reduce over
    the pair of ranks ``r`` and ``N-1-r``) before the optimizer step.
    """

    schedule_name = "dualpipe"
    num_modules = 2


class DualPipeV(PipelineEngine):
    """DualPipeV ("cut-in-half" DualPipe): one pipeline folded into a V over ``N`` ranks.

    ``modules = (stage r, stage 2N-1-r)`` of a ``2N``-stage model on rank ``r``; any ``N >= 1``.
    ``step`` needs ``num_chunks >= 2N``; inputs, labels and the loss all live on rank 0.
    """

    schedule_name = "dualpipev"
    num_modules = 2


class OneFOneB(PipelineEngine):
    """1F1B: stage ``r`` on rank ``r``; one forward, one backward in the steady state.

    ``modules``: this rank's stage (a module or a one-element sequence). Inputs on rank 0;
    labels, criterion and loss on rank N-1.
    """

    schedule_name = "1f1b"
    num_modules = 1


class ZB1P(PipelineEngine):
    """ZB1P (ZB-H1): 1F1B with each backward split into an input-gradient chunk and a
    deferred weight chunk that fills the bubbles; same memory as 1F1B.

    Weight gradients are deferred only for layers that use ``WeightGradStore`` (see
    ``overlap.pipeline.layers.DeferrableLinear``); others compute them in the ``b`` chunk.
    """

    schedule_name = "zb1p"
    num_modules = 1
