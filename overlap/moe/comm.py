"""The four all-to-alls of an MoE layer, forward and backward, over an :class:`~overlap.ep.EPBuffer`.

==================  ==========================================  ===============================
op                  what travels                                 through
==================  ==========================================  ===============================
dispatch (F)        tokens (+ top-k ids, weights) to experts     ``EPBuffer.dispatch_async``
combine (F)         per-rank weighted expert sums back           ``EPBuffer.combine_async``
combine (B)         output gradient to the experts' ranks        ``EPBuffer.dispatch_async``
dispatch (B)        token and routing-weight gradients back      ``EPBuffer.combine_async``
==================  ==========================================  ===============================

The backward of dispatch is a combine of gradients (a token's copies each got a gradient;
they sum), the backward of combine a dispatch (each received row gets its token's gradient).
Every op is issued asynchronously and returns a :class:`Pending`; its value is ready after
``wait()``, which on GPU makes the current stream wait, so compute issued in between runs
under the transfer.

Routing-weight gradients (``[rows, topk]`` fp32, computed where the experts ran) go back in
one small ``all_to_all_single`` on the buffer's group, using the row counts the dispatch handle
records; a backend that keeps those counts on the device only gets them folded into the
token-gradient combine instead (exact, but a second hidden-sized transfer).

Budget mode (``EPComm(..., num_worst_tokens=N)``, see :mod:`overlap.moe.budget`): every
dispatch has ``N`` rows and the host never reads a count; the routing-weight gradients return
in an equal-split ``all_to_all_single`` placed by the per-source row counts the dispatch handle
holds on the device (``DispatchHandle.recv_rank_counts``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from overlap.ep import EPBuffer
from overlap.ep.layout import gather_reduce
from overlap.moe.budget import (check_budget, pack_weight_grads, rows_per_peer, safe_expert_capacity,
                                unpack_weight_grads)


class Pending:
    """An issued transfer: ``wait()`` orders the caller after it and returns its result."""

    def __init__(self, waits: list, result: Callable[[], Any]):
        self._waits = waits
        self._result = result
        self._value: Any = None
        self._done = False

    def wait(self) -> Any:
        if not self._done:
            for w in self._waits:
                w.wait()
            self._value = self._result()
            self._done = True
            self._waits = []
        return self._value

    @classmethod
    def ready(cls, value: Any) -> "Pending":
        p = cls([], lambda: value)
        p.wait()
        return p


@dataclass
class Dispatched:
    """A finished forward dispatch: what this rank received, and what a backward needs."""

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor
    handle: Any
    topk_idx: torch.Tensor        # the routing of this rank's tokens (the backward re-dispatches)
    topk_weights: torch.Tensor
    send_counts: Optional[list] = None   # rows sent to each rank, when the backend knows them on the host
    num_worst_tokens: Optional[int] = None   # budget mode: the rows of every dispatch output (None: exact)
    expert_capacity: Optional[int] = None    # budget mode: the expert-major positions of the received rows
    recv_rank_counts: Optional[torch.Tensor] = None   # budget mode: [W] int64 rows received from each rank


def _token_rows(handle) -> torch.Tensor:
    """``[T, W]``: the row of (token, rank) in the send order of a dispatch, -1 if not sent."""
    layout = handle.layout
    slot = layout.token_slot_in_rank.to(torch.int64)
    return torch.where(slot >= 0, slot + layout.rank_offsets.unsqueeze(0), torch.full_like(slot, -1))


def _tensors_of(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Dispatched):
        return [value.recv_x, value.recv_topk_idx, value.recv_topk_weights, value.num_recv_tokens_per_expert]
    if isinstance(value, tuple):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


class EPComm:
    """The four MoE all-to-alls over one :class:`EPBuffer` (any backend), all asynchronous.

    On CUDA every transfer is issued, waited for and post-processed on a side stream (``stream``,
    high priority), ordered after the compute queued before the issue; ``wait()`` then makes the
    compute stream wait for it with an event. A backend that synchronises the host (the torch
    reference reads counts on the host) thus waits for communication only, never for compute
    queued meanwhile, and the compute queue never runs dry while a transfer is in flight.
    ``side_stream=False`` keeps everything on the caller's stream.

    ``num_worst_tokens`` (None: exact-size outputs) turns on budget mode (:mod:`overlap.moe.budget`):
    every dispatch returns that many rows, so the host never waits for a count;
    :func:`overlap.moe.budget.worst_case_tokens` gives a budget that always suffices.
    ``expert_capacity`` (budget mode only; None: the safe bound
    :func:`~overlap.moe.budget.safe_expert_capacity`) sizes the expert-major rows.
    """

    def __init__(self, buffer: EPBuffer, side_stream: Optional[bool] = None, *,
                 num_worst_tokens: Optional[int] = None, expert_capacity: Optional[int] = None):
        if not isinstance(buffer, EPBuffer):
            raise TypeError(f"buffer must be an overlap.ep.EPBuffer, got {type(buffer).__name__}")
        check_budget(num_worst_tokens, expert_capacity)
        self.buffer = buffer
        self.num_worst_tokens = num_worst_tokens
        self.expert_capacity = expert_capacity
        cuda = buffer.device.type == "cuda"
        if side_stream and not cuda:
            raise ValueError(f"side_stream=True needs a CUDA buffer; this one communicates on {buffer.device}")
        use = cuda if side_stream is None else side_stream
        self.stream = torch.cuda.Stream(device=buffer.device, priority=-1) if use else None

    def _start(self, inputs: tuple, issue: Callable[[], Any]):
        """Run ``issue`` (which starts a transfer) after the compute queued so far; return
        ``(its result, the compute stream)``."""
        if self.stream is None:
            return issue(), None
        compute = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(compute)
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.record_stream(self.stream)   # read on the side stream: keep alive until it has
        with torch.cuda.stream(self.stream):
            return issue(), compute

    def _pending(self, compute, waits: list, result: Callable[[], Any]) -> Pending:
        if compute is None:
            return Pending(waits, result)
        stream = self.stream

        def finish():
            with torch.cuda.stream(stream):
                for w in waits:
                    w.wait()
                value = result()
            compute.wait_stream(stream)
            for t in _tensors_of(value):
                t.record_stream(compute)       # made on the side stream, used by compute
            return value
        return Pending([], finish)

    def dispatch_forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        """Tokens ``x [T, H]`` to their experts' ranks; the value is a :class:`Dispatched`."""
        budget = self.num_worst_tokens
        issued, compute = self._start((x, topk_idx, topk_weights),
                                      lambda: self.buffer.dispatch_async(x, topk_idx, topk_weights,
                                                                         num_worst_tokens=budget))
        recv_x, recv_idx, recv_w, counts, handle, event = issued
        capacity = self.expert_capacity
        if budget is not None and capacity is None:
            capacity = safe_expert_capacity(budget, topk_idx.shape[1], self.buffer.num_local_experts)

        def result() -> Dispatched:
            if budget is None:
                # Read the send counts on the host now, where the dispatch has synchronised
                # anyway, rather than in the backward, where a sync would stall the queue.
                send = handle.layout.num_tokens_per_rank.tolist() if handle.recv_counts is not None else None
                return Dispatched(recv_x, recv_idx, recv_w, counts, handle, topk_idx, topk_weights, send)
            # The backward places routing-weight gradients by source rank, with the per-source
            # row counts the dispatch already holds on the device (a copy made on this stream).
            return Dispatched(recv_x, recv_idx, recv_w, counts, handle, topk_idx, topk_weights,
                              num_worst_tokens=budget, expert_capacity=capacity,
                              recv_rank_counts=handle.recv_rank_counts.to(torch.int64))
        return self._pending(compute, [event], result)

    def combine_forward(self, y: torch.Tensor, d: Dispatched) -> Pending:
        """Per received row weighted expert sums ``y [R, H]`` back to their tokens: ``[T, H]``."""
        (out, event), compute = self._start((y,), lambda: self.buffer.combine_async(y, d.handle))
        return self._pending(compute, [event], lambda: out)

    def combine_backward(self, grad_out: torch.Tensor, d: Dispatched) -> Pending:
        """Gradient of a combine: each received row gets its token's gradient, ``[R, H]``."""
        issued, compute = self._start((grad_out, d.topk_idx, d.topk_weights),
                                      lambda: self.buffer.dispatch_async(grad_out, d.topk_idx, d.topk_weights,
                                                                         num_worst_tokens=d.num_worst_tokens))
        grad_y, _, _, _, handle, event = issued

        def result() -> torch.Tensor:
            if handle.num_recv_tokens != d.handle.num_recv_tokens:
                raise RuntimeError("the backward dispatch received a different number of rows than the "
                                   "forward one; the routing changed between forward and backward")
            return grad_y
        return self._pending(compute, [event], result)

    def dispatch_backward(self, grad_recv_x: torch.Tensor, grad_recv_w: Optional[torch.Tensor],
                          d: Dispatched) -> Pending:
        """Gradient of a dispatch: ``(grad_x [T, H], grad_topk_weights [T, k] fp32 or None)``.

        ``grad_recv_w`` is None when the routing weights need no gradient; every rank of the
        group must then pass None (the weight transfer is a collective).
        """
        handle = d.handle
        if grad_recv_w is None:
            (out, event), compute = self._start((grad_recv_x,), lambda: self.buffer.combine_async(grad_recv_x, handle))
            return self._pending(compute, [event], lambda: (out, None))
        if d.num_worst_tokens is not None:
            return self._dispatch_backward_budget(grad_recv_x, grad_recv_w, d)
        if d.send_counts is None or handle.recv_counts is None:
            return self._dispatch_backward_folded(grad_recv_x, grad_recv_w, d)

        def issue():
            out, event = self.buffer.combine_async(grad_recv_x, handle)
            back = grad_recv_w.new_empty(sum(d.send_counts), grad_recv_w.shape[1], dtype=torch.float32)
            work = dist.all_to_all_single(back, grad_recv_w.float().contiguous(), d.send_counts, handle.recv_counts,
                                          group=self.buffer.group, async_op=True)
            return out, event, back, work, _token_rows(handle)

        (out, event, back, work, rows), compute = self._start((grad_recv_x, grad_recv_w), issue)

        def result():
            # A slot's weight lives on one rank only; other ranks sent 0 for it, so summing is exact.
            return out, gather_reduce(back, rows)
        return self._pending(compute, [event, work], result)

    def _dispatch_backward_budget(self, grad_recv_x, grad_recv_w, d):
        per_peer = rows_per_peer(self.buffer, d.num_worst_tokens)

        def issue():
            out, event = self.buffer.combine_async(grad_recv_x, d.handle)
            send = pack_weight_grads(grad_recv_w, d.recv_rank_counts, per_peer)
            back = torch.empty_like(send)
            work = dist.all_to_all_single(back, send, group=self.buffer.group, async_op=True)
            return out, event, back, work

        (out, event, back, work), compute = self._start((grad_recv_x, grad_recv_w), issue)
        return self._pending(compute, [event, work],
                             lambda: (out, unpack_weight_grads(back, d.handle.layout, per_peer)))

    def _dispatch_backward_folded(self, grad_recv_x, grad_recv_w, d):
        k, hidden = grad_recv_w.shape[1], grad_recv_x.shape[1]
        if k > hidden:
            raise ValueError(f"topk={k} exceeds hidden={hidden}: routing-weight gradients cannot ride "
                             "along the token-gradient combine of this backend")

        def issue():
            padded = torch.zeros_like(grad_recv_x)
            padded[:, :k] = grad_recv_w.to(grad_recv_x.dtype)
            out_x, ev_x = self.buffer.combine_async(grad_recv_x, d.handle)
            out_w, ev_w = self.buffer.combine_async(padded, d.handle)
            return out_x, ev_x, out_w, ev_w

        (out_x, ev_x, out_w, ev_w), compute = self._start((grad_recv_x, grad_recv_w), issue)
        return self._pending(compute, [ev_x, ev_w], lambda: (out_x, out_w[:, :k].float()))
