"""Reference backend: ``all_to_all_single`` with uneven splits (gloo on CPU, NCCL on GPU).

It is the oracle every other backend is tested against, so it favours obviousness over speed:
sizes are exchanged first (one host synchronisation per call), then x, the top-k ids and the
top-k weights travel in three uneven all-to-alls.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from overlap.ep.backends.base import DispatchOutput, EPBackend, register_backend
from overlap.ep.events import EPEvent
from overlap.ep.handle import DispatchHandle
from overlap.ep.layout import RoutingLayout, permute_rows


@register_backend
class TorchBackend(EPBackend):
    name = "torch"

    def _all_to_all(self, out, inp, out_splits, in_splits, async_op):
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.buffer.group,
                                      async_op=async_op)

    def _exchange_counts(self, send_counts: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.buffer.group)
        return recv, recv.tolist()

    def _check_budget(self, num_recv: int, num_worst_tokens: int) -> None:
        # Collective, so that every rank raises together instead of peers hanging in the next
        # all-to-all: the most rows any rank would overflow its budget by.
        over = torch.tensor([num_recv - num_worst_tokens], dtype=torch.int64, device=self.buffer.device)
        dist.all_reduce(over, op=dist.ReduceOp.MAX, group=self.buffer.group)
        if over.item() > 0:
            raise ValueError(f"num_worst_tokens={num_worst_tokens} is too small: a rank received {over.item()} rows more "
                             f"than that (this rank: {num_recv}); at most world_size * max_tokens_per_rank = "
                             f"{self.buffer.world_size * self.buffer.max_tokens_per_rank} rows can arrive")

    def dispatch(self, x, topk_idx, topk_weights, layout: RoutingLayout, *, async_op: bool,
                 num_worst_tokens=None) -> DispatchOutput:
        buf = self.buffer
        send_counts_t = layout.num_tokens_per_rank.to(torch.int64)
        send_counts = send_counts_t.tolist()
        recv_counts_t, recv_counts = self._exchange_counts(send_counts_t)
        num_send, num_recv = sum(send_counts), sum(recv_counts)
        if num_worst_tokens is not None:
            self._check_budget(num_recv, num_worst_tokens)
        num_rows = num_recv if num_worst_tokens is None else num_worst_tokens

        # Send rows in (destination rank, token) order; ids become local to the destination.
        rank_offsets = layout.rank_offsets
        send_x = permute_rows(x, layout.token_slot_in_rank, rank_offsets, num_send)
        send_idx = permute_rows(topk_idx.to(torch.int64), layout.token_slot_in_rank, rank_offsets, num_send)
        send_w = permute_rows(topk_weights.to(torch.float32), layout.token_slot_in_rank, rank_offsets, num_send)
        dest_rank = torch.repeat_interleave(torch.arange(buf.world_size, device=x.device),
                                            send_counts_t, output_size=num_send)
        local = send_idx - (dest_rank * buf.num_local_experts).unsqueeze(1)
        is_local = (send_idx >= 0) & (local >= 0) & (local < buf.num_local_experts)
        send_idx = torch.where(is_local, local, torch.full_like(local, -1))
        send_w = torch.where(is_local, send_w, torch.zeros_like(send_w))

        k = topk_idx.shape[1]
        # Rows past the received ones (a worst-case budget) hold zeros and "no expert".
        recv_x = x.new_empty(num_rows, buf.hidden)
        recv_x[num_recv:].zero_()
        recv_idx = torch.full((num_rows, k), -1, dtype=torch.int64, device=x.device)
        recv_w = torch.zeros(num_rows, k, dtype=torch.float32, device=x.device)
        works = [self._all_to_all(out[:num_recv], inp, recv_counts, send_counts, async_op)
                 for out, inp in ((recv_x, send_x), (recv_idx, send_idx), (recv_w, send_w))]
        counts = torch.zeros(buf.num_local_experts, dtype=torch.int32, device=x.device)

        def finalize():
            valid = recv_idx >= 0
            counts.copy_(torch.bincount(recv_idx[valid], minlength=buf.num_local_experts))

        handle = DispatchHandle(buffer_id=id(buf), num_tokens=x.shape[0], layout=layout,
                                num_recv_tokens=num_rows, recv_counts=recv_counts,
                                recv_topk_idx=recv_idx, recv_topk_weights=recv_w,
                                backend_state={"send_counts": send_counts}, num_worst_tokens=num_worst_tokens,
                                recv_rank_counts=recv_counts_t)
        if async_op:
            event = EPEvent(works, finalize)
        else:
            finalize()
            event = EPEvent.completed()
        return recv_x, recv_idx, recv_w, counts, handle, event

    def combine(self, y, handle: DispatchHandle, *, async_op: bool):
        send_counts = handle.backend_state["send_counts"]
        layout = handle.layout
        back = y.new_empty(sum(send_counts), y.shape[1])
        received = y[:sum(handle.recv_counts)]  # a budget's padding rows stay here
        work = self._all_to_all(back, received.contiguous(), send_counts, handle.recv_counts, async_op)
        out = y.new_empty(handle.num_tokens, y.shape[1])

        def finalize():
            # Row i of `back` is (rank r, slot s) of token t: sum each token's rows in fp32.
            t_idx, r_idx = torch.nonzero(layout.token_slot_in_rank >= 0, as_tuple=True)
            rows = layout.rank_offsets[r_idx] + layout.token_slot_in_rank[t_idx, r_idx].to(torch.int64)
            acc = torch.zeros(handle.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
            acc.index_add_(0, t_idx, back.index_select(0, rows).float())
            out.copy_(acc)

        if async_op:
            return out, EPEvent([work], finalize)
        finalize()
        return out, EPEvent.completed()
