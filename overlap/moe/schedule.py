"""Drive the pieces of a stack of :class:`~overlap.moe.block.MoEBlock`: one chunk at a time, or a
forward chunk and a backward chunk interleaved so each one's all-to-alls run under the
other's compute.

``comm`` is any object with the four methods of :class:`overlap.moe.comm.EPComm`
(``dispatch_forward``, ``combine_forward``, ``combine_backward``, ``dispatch_backward``), each
returning something with ``wait()``. Every rank of an expert-parallel group must drive the same
schedule (the transfers are collectives, issued in the same order everywhere).

The overlapped step for forward layer i of one micro-batch and backward layer j of another
(DeepSeek-V3's forward/backward chunk pair; each line is issued in this order)::

    comm stream            compute stream
    combine(B)   ----+     attn(F)  shared(B)
    dispatch(F)  --+ +-->  mlp(B)
    dispatch(B)  -+|       mlp(W)
                  |+--->   mlp(F)  shared(F)
    combine(F)   -|---+
                  +---->   attn(B)  attn(W)
                      +->  post(F)

Each transfer is issued as soon as its input exists and waited for only where its output is
needed, so on GPU it runs on the communication stream under the compute queued in between.
Weight gradients of mlp(B) and attn(B) are captured and run as mlp(W)/attn(W) at the places
above (or handed to an enclosing pipeline that defers them).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence

import torch

from overlap.moe.block import LayerState, MoEBlock
from overlap.moe.weight_grads import capture_weight_grads, run_or_forward

# Label every piece in profiler traces (CPU-side ranges; GPU kernels fall inside them).
LABEL_PREFIX = "moe:"


@contextmanager
def _piece(name: str, labels: bool):
    if not labels:
        yield
        return
    with torch.profiler.record_function(LABEL_PREFIX + name):
        yield


def _input_leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True)


def forward_chunk(blocks: Sequence[MoEBlock], comm, x: torch.Tensor,
                  states: Optional[List[LayerState]] = None, labels: bool = False) -> torch.Tensor:
    """Forward of ``x`` through ``blocks``, each transfer waited for at once (no overlap).

    With ``states`` (a list to fill, one :class:`LayerState` per block) the pieces record their
    graphs for :func:`backward_chunk`; without, they run as plain computation (inference).
    """
    record = states is not None
    for block in blocks:
        st = LayerState()
        with torch.enable_grad() if record else torch.no_grad():
            with _piece("attn(F)", labels):
                block.attn_forward(st, _input_leaf(x) if record else x)
            d = comm.dispatch_forward(*block.dispatch_inputs(st)).wait()
            with _piece("mlp(F)", labels):
                y = block.mlp_forward(st, d)
            combined = comm.combine_forward(y, d).wait()
            with _piece("shared(F)", labels):
                block.shared_forward(st)
            x = block.post_forward(st, combined)
        if record:
            states.append(st)
    return x


def backward_chunk(blocks: Sequence[MoEBlock], comm, states: List[LayerState], grad_out: torch.Tensor,
                   labels: bool = False) -> torch.Tensor:
    """Backward of a :func:`forward_chunk` from its output gradient; returns the input gradient.

    Weight gradients follow ``WeightGradStore`` (computed now, or deferred by a pipeline).
    """
    if len(states) != len(blocks):
        raise RuntimeError(f"{len(states)} recorded layers for {len(blocks)} blocks")
    g = grad_out
    for block, st in zip(reversed(blocks), reversed(states)):
        flat = g.reshape(-1, g.shape[-1])
        grad_rows = comm.combine_backward(flat, st.d).wait()
        with _piece("shared(B)", labels):
            block.shared_backward(st, flat)
        with _piece("mlp(B)", labels):
            grad_x, grad_w = block.mlp_backward(st, grad_rows)
        grad_hn, grad_topk_w = comm.dispatch_backward(grad_x, grad_w, st.d).wait()
        with _piece("attn(B)", labels):
            g = block.attn_backward(st, g, grad_hn, grad_topk_w)
        st.clear()
    states.clear()
    return g


def overlapped_layer(fwd_block: MoEBlock, fwd_comm, fst: LayerState, x: torch.Tensor,
                     bwd_block: MoEBlock, bwd_comm, bst: LayerState, grad_out: torch.Tensor,
                     labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of one layer for one micro-batch and backward of one layer for another, interleaved
    as in the module docstring. Returns ``(forward output, backward input gradient)``."""
    flat = grad_out.reshape(-1, grad_out.shape[-1])
    mlp_w: List[Callable[[], None]] = []
    attn_w: List[Callable[[], None]] = []
    with torch.enable_grad():
        with _piece("issue:combine(B)", labels):
            pending_cb = bwd_comm.combine_backward(flat, bst.d)
        with _piece("attn(F)", labels):
            fwd_block.attn_forward(fst, _input_leaf(x))
        with _piece("shared(B)", labels), capture_weight_grads(mlp_w):
            bwd_block.shared_backward(bst, flat)
        with _piece("issue:dispatch(F)", labels):
            pending_df = fwd_comm.dispatch_forward(*fwd_block.dispatch_inputs(fst))
        grad_rows = pending_cb.wait()
        with _piece("mlp(B)", labels), capture_weight_grads(mlp_w):
            grad_x, grad_w = bwd_block.mlp_backward(bst, grad_rows)
        with _piece("issue:dispatch(B)", labels):
            pending_db = bwd_comm.dispatch_backward(grad_x, grad_w, bst.d)
        with _piece("mlp(W)", labels):
            run_or_forward(mlp_w)
        d = pending_df.wait()
        with _piece("mlp(F)", labels):
            y = fwd_block.mlp_forward(fst, d)
        with _piece("issue:combine(F)", labels):
            pending_cf = fwd_comm.combine_forward(y, d)
        with _piece("shared(F)", labels):
            fwd_block.shared_forward(fst)
        grad_hn, grad_topk_w = pending_db.wait()
        with _piece("attn(B)", labels), capture_weight_grads(attn_w):
            grad_in = bwd_block.attn_backward(bst, grad_out, grad_hn, grad_topk_w)
        with _piece("attn(W)", labels):
            run_or_forward(attn_w)
        combined = pending_cf.wait()
        with _piece("post(F)", labels):
            out = fwd_block.post_forward(fst, combined)
    bst.clear()
    return out, grad_in


def overlapped_chunks(fwd_blocks: Sequence[MoEBlock], fwd_comm, x: torch.Tensor, fwd_states: List[LayerState],
                      bwd_blocks: Sequence[MoEBlock], bwd_comm, bwd_states: List[LayerState],
                      grad_out: torch.Tensor, labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward chunk (filling ``fwd_states``) and a backward chunk (consuming ``bwd_states``)
    overlapped layer by layer: forward layer i pairs with backward layer ``L-1-i``. Layers left
    over when the chunks differ in depth run on their own. Returns ``(output, input grad)``."""
    if len(bwd_states) != len(bwd_blocks):
        raise RuntimeError(f"{len(bwd_states)} recorded layers for {len(bwd_blocks)} blocks")
    pairs = min(len(fwd_blocks), len(bwd_blocks))
    g = grad_out
    for i in range(pairs):
        j = len(bwd_blocks) - 1 - i
        fst = LayerState()
        x, g = overlapped_layer(fwd_blocks[i], fwd_comm, fst, x, bwd_blocks[j], bwd_comm, bwd_states[j], g, labels)
        fwd_states.append(fst)
    if len(fwd_blocks) > pairs:
        x = forward_chunk(fwd_blocks[pairs:], fwd_comm, x, fwd_states, labels)
    rest = len(bwd_blocks) - pairs
    if rest > 0:
        g = backward_chunk(bwd_blocks[:rest], bwd_comm, bwd_states[:rest], g, labels)
    bwd_states.clear()
    return x, g


__all__ = ["forward_chunk", "backward_chunk", "overlapped_layer", "overlapped_chunks", "LABEL_PREFIX"]
