"""Deferred weight gradients, through the pipeline's ``WeightGradStore``.

A layer's backward computes input gradients at once and hands its weight-gradient closure to
:func:`defer_or_run`: while ``WeightGradStore.enabled`` is set (a pipeline's zero-bubble ``b``
chunk) the closure is stored for a later ``W`` chunk, otherwise it runs now.
:func:`capture_weight_grads` lets the overlapped forward-backward collect the closures of one
piece (``mlp(B)``) so that it can run them as ``mlp(W)`` at the place the schedule gives them.

The store is imported lazily from :mod:`overlap.pipeline.utils` (the interface of
deepseek-ai/DualPipe's ``dualpipe.utils.WeightGradStore``: ``enabled``, ``cache``, ``put``);
without that package a private stand-in with the same interface is used.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List

import torch


class _LocalWeightGradStore:
    """Stand-in with the published interface, used only when overlap.pipeline is missing."""

    enabled: bool = False
    cache: List[Callable[[], None]] = []

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        cls.cache.append(func)


def weight_grad_store():
    """The ``WeightGradStore`` class the pipelines use (imported on first use)."""
    try:
        from overlap.pipeline.utils import WeightGradStore
    except ImportError:  # the pipeline package is optional for a plain MoE model
        return _LocalWeightGradStore
    return WeightGradStore


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad += grad`` (the closures write ``.grad`` directly, as autograd would)."""
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


def defer_or_run(func: Callable[[], None]) -> None:
    """Store ``func`` while the pipeline defers weight gradients; otherwise run it now."""
    store = weight_grad_store()
    if store.enabled:
        store.put(func)
    else:
        with torch.no_grad():
            func()


@contextmanager
def capture_weight_grads(into: List[Callable[[], None]]) -> Iterator[None]:
    """Collect the weight-gradient closures of the backward run inside the block into ``into``.

    Whatever the store held and whether it was enabled are restored afterwards, so this nests
    inside a pipeline chunk that uses the store itself.
    """
    store = weight_grad_store()
    prev_enabled, prev_cache = store.enabled, store.cache
    store.enabled, store.cache = True, []
    try:
        yield
    finally:
        into.extend(store.cache)
        store.enabled, store.cache = prev_enabled, prev_cache


def run_or_forward(funcs: List[Callable[[], None]]) -> None:
    """Run captured closures now, or pass them on to the store if the caller defers them."""
    store = weight_grad_store()
    if store.enabled:
        for f in list(funcs):   # a copy: funcs may be the store's own cache
            store.put(f)
        return
    with torch.no_grad():
        for f in funcs:
            f()
