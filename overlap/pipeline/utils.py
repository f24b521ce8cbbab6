"""Helpers a pipeline stage uses, with the names of deepseek-ai/DualPipe's ``dualpipe.utils``.

A stage that defers its weight gradients does, in its autograd backward::

    if WeightGradStore.enabled:
        WeightGradStore.put(compute_weight_grad)   # run later, by a W chunk
    else:
        compute_weight_grad()

and its ``overlapped_forward_backward`` hook calls :func:`run_backward` on outputs whose
tensors may already have been freed after sending.
"""
from __future__ import annotations

import queue
from typing import Callable, List, Optional, Sequence

import torch
from torch.autograd import Variable


class WeightGradStore:
    """Where deferred weight-gradient closures go while ``enabled`` is set.

    The pipeline sets ``enabled`` around a backward chunk whose weight gradients it defers,
    then takes the closures with :meth:`take` into its own queue, so two pipelines in one
    process never share deferred work. ``flush`` / ``pop`` / ``clear`` keep the published
    queue interface for code that drives the store itself.
    """

    enabled: bool = False
    cache: List[Callable[[], None]] = []
    funcs_queue: "queue.Queue[List[Callable[[], None]]]" = queue.Queue()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        """Record a weight-gradient closure of the running backward."""
        cls.cache.append(func)

    @classmethod
    def take(cls) -> List[Callable[[], None]]:
        """Return the closures recorded since the last take/flush, and forget them."""
        funcs, cls.cache = cls.cache, []
        return funcs

    @classmethod
    def flush(cls) -> None:
        """Close the current group of closures and queue it for :meth:`pop`."""
        cls.funcs_queue.put(cls.take())

    @classmethod
    def pop(cls) -> None:
        """Run the oldest queued group of closures."""
        if cls.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop: no deferred weight gradients are queued")
        run_weight_grads(cls.funcs_queue.get())

    @classmethod
    def clear(cls) -> None:
        cls.cache = []
        cls.funcs_queue = queue.Queue()


def run_weight_grads(funcs: Sequence[Callable[[], None]]) -> None:
    """Run deferred closures as the autograd engine would have: without recording a graph."""
    with torch.no_grad():
        for func in funcs:
            func()


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[Optional[torch.Tensor]]) -> None:
    """Backpropagate ``grad_tensors`` from ``tensors`` into leaf ``.grad`` s.

    Calls the autograd engine directly: unlike ``torch.autograd.backward`` it does not compare
    each grad with its tensor's current shape, so a stage output whose storage was released
    after it was sent still backpropagates through its graph.
    """
    Variable._execution_engine.run_backward(
        tuple(tensors), tuple(grad_tensors), keep_graph=False, create_graph=False,
        allow_unreachable=True, accumulate_grad=True)


def backward_from(loss: Optional[torch.Tensor], outputs: Sequence[torch.Tensor],
                  output_grads: Sequence[Optional[torch.Tensor]]) -> None:
    """Run a chunk's backward as the overlap hook receives it: from its loss (which is then
    detached, freeing the graph's head) on the last stage, else from its outputs' grads."""
    if loss is not None:
        loss.backward()
        loss.detach_()
    else:
        run_backward(outputs, output_grads)


def sequential_forward_backward(module0, inputs0, criterion0, labels0, loss1, outputs1, output_grads1):
    """The overlap hook's contract with nothing overlapped: forward ``module0``, then backward.

    Returns ``(outputs0, loss0)`` as ``overlapped_forward_backward`` must. Stages with nothing
    to hide (or an overlapping stage that cannot pair two chunks) fall back to this.
    """
    outputs0 = module0(*inputs0)
    outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
    loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
    backward_from(loss1, outputs1, output_grads1)
    return outputs0, loss0


def split_microbatches(tensors: Sequence[Optional[torch.Tensor]], num_microbatches: int,
                       dim: int) -> list[tuple]:
    """``[(t0[m], t1[m], ...) for m in range(num_microbatches)]``, splitting each along ``dim``.

    ``None`` entries stay ``None`` in every micro-batch.
    """
    columns = []
    for i, t in enumerate(tensors):
        if t is None:
            columns.append([None] * num_microbatches)
        elif isinstance(t, torch.Tensor):
            if t.dim() == 0:
                raise ValueError(f"input {i} is a 0-d tensor; it has no batch dimension to split")
            columns.append(list(t.tensor_split(num_microbatches, dim=dim)))
        else:
            raise TypeError(f"inputs and labels must be tensors or None, got {type(t).__name__} at position {i}")
    return [tuple(col[m] for col in columns) for m in range(num_microbatches)]


def gather_microbatches(per_microbatch: Sequence[Sequence[torch.Tensor]], dim: int):
    """Concatenate per-micro-batch outputs along ``dim``; a single output comes back bare."""
    columns = list(zip(*per_microbatch))
    out = tuple(None if col[0] is None else torch.cat(col, dim=dim) for col in columns)
    return out[0] if len(out) == 1 else out
