"""EPBuffer: the public expert-parallel dispatch/combine API over a torch.distributed group."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from overlap.ep import validation
from overlap.ep.backends import get_backend_class
from overlap.ep.handle import DispatchHandle
from overlap.ep.layout import RoutingLayout, expert_major_positions, gather_reduce, routing_layout


class EPBuffer:
    """Expert-parallel communication for one process group.

    Experts are split evenly and contiguously over the ranks of ``group``: rank r hosts
    experts ``[r * E/W, (r + 1) * E/W)``. A token is sent once to each rank that hosts one of
    its top-k experts; the combined result of token t is ``Σ_k w[t,k] · f_{e(t,k)}(x[t])``,
    accumulated in fp32, with one row per (token, rank) on the wire back.

    Args:
        group: the process group (``None``: the default group). gloo groups work on CPU
            tensors, NCCL groups on the current CUDA device.
        num_experts: total experts E (a multiple of the group size).
        hidden: token width.
        max_tokens_per_rank: the most tokens one rank may dispatch in one call (sizes buffers
            of backends that preallocate).
        backend: ``"torch"`` (reference, all_to_all_single), or another name from
            :func:`overlap.ep.backends.backend_names`.
        num_sms: SMs the communication kernels may occupy (backends that launch their own
            kernels honour it; the ``torch`` backend leaves SM use to NCCL and records it only).
        validate_values: check ``topk_idx`` values (range, repeats) on every call. It costs a
            device-to-host sync; turn it off in timed loops.
        device: the device tensors must live on; by default CPU for gloo and the current CUDA
            device for NCCL.

    Example::

        buf = EPBuffer(group, num_experts=256, hidden=7168, max_tokens_per_rank=4096)
        recv_x, recv_idx, recv_w, counts, handle = buf.dispatch(x, topk_idx, topk_weights)
        y = my_experts(recv_x, recv_idx, recv_w)          # one row per received token
        out = buf.combine(y, handle)                       # [num_tokens, hidden]
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, *, num_experts: int, hidden: int,
                 max_tokens_per_rank: int, backend: str = "torch", num_sms: int = 20,
                 validate_values: bool = True, device: Optional[torch.device] = None):
        if not dist.is_initialized():
            raise RuntimeError("EPBuffer needs torch.distributed to be initialised "
                               "(dist.init_process_group) before it is built")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        for name, value in (("num_experts", num_experts), ("hidden", hidden),
                            ("max_tokens_per_rank", max_tokens_per_rank), ("num_sms", num_sms)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_experts % self.world_size != 0:
            raise ValueError(f"num_experts={num_experts} must be a multiple of the group size "
                             f"{self.world_size} (experts are split evenly over ranks)")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size
        self.hidden = hidden
        self.max_tokens_per_rank = max_tokens_per_rank
        self.validate_values = validate_values
        self.device = torch.device(device) if device is not None else self._default_device()
        if self.device.type == "cuda":
            sm_count = torch.cuda.get_device_properties(self.device).multi_processor_count
            if num_sms > sm_count:
                raise ValueError(f"num_sms={num_sms} exceeds this GPU's {sm_count} SMs")
        self.num_sms = num_sms
        self.backend_name = backend
        self._backend = get_backend_class(backend)(self)
        self._backend.check_group(self)

    def _default_device(self) -> torch.device:
        pg_backend = dist.get_backend(self.group)
        if "nccl" in str(pg_backend):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ----------------------------------------------------------------------------- layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(num_tokens_per_rank [W], num_tokens_per_expert [E], is_token_in_rank [T, W])`` of a routing."""
        validation.check_topk_idx(topk_idx, num_tokens=None, num_experts=self.num_experts,
                                  device=self.device, check_values=self.validate_values)
        lay = self._routing_layout(topk_idx)
        return lay.num_tokens_per_rank, lay.num_tokens_per_expert, lay.is_token_in_rank

    def _routing_layout(self, topk_idx: torch.Tensor) -> RoutingLayout:
        # The reference backend stays pure PyTorch end to end (it is the oracle); the others
        # take the layout from a kernel tested bit-identical to the reference.
        if self.device.type == "cuda" and self.backend_name != "torch":
            from overlap.ep.cuda_ops import device_routing_layout

            return device_routing_layout(topk_idx, self.num_experts, self.world_size)
        return routing_layout(topk_idx, self.num_experts, self.world_size)

    # ----------------------------------------------------------------------------- dispatch
    def _dispatch(self, x, topk_idx, topk_weights, async_op, num_worst_tokens):
        validation.check_dispatch_inputs(x, topk_idx, topk_weights, hidden=self.hidden,
                                         num_experts=self.num_experts,
                                         max_tokens_per_rank=self.max_tokens_per_rank,
                                         device=self.device, check_values=self.validate_values)
        validation.check_num_worst_tokens(num_worst_tokens)
        layout = self._routing_layout(topk_idx)
        return self._backend.dispatch(x.contiguous(), topk_idx.contiguous(), topk_weights.contiguous(),
                                      layout, async_op=async_op, num_worst_tokens=num_worst_tokens)

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                 num_worst_tokens: Optional[int] = None):
        """Send each token to every rank hosting one of its experts.

        Args:
            x: ``[T, hidden]`` bf16/fp16/fp32 tokens, ``T <= max_tokens_per_rank``.
            topk_idx: ``[T, k]`` int64/int32 global expert ids, -1 for an empty slot.
            topk_weights: ``[T, k]`` routing weights (kept in float32).
            num_worst_tokens: size the outputs by this budget instead of the rows that arrive
                (``world_size * max_tokens_per_rank`` always suffices). The host then never
                waits for the counts: on backend ``cuda`` the dispatch can be captured in a
                CUDA graph. Rows past the received ones have ids -1 and weights 0; combine
                takes ``y`` with the same number of rows. A budget that proves too small
                raises (at once on ``torch``, at the next call or wait on ``cuda``/``triton``,
                after which the buffer is unusable).

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, handle)``:
            ``recv_x [R, hidden]`` ordered by source rank then source token; ``recv_topk_idx
            [R, k]`` local expert ids (-1 where the expert lives elsewhere); ``recv_topk_weights
            [R, k]`` float32 (0 where the id is -1); ``num_recv_tokens_per_expert [E/W]`` int32;
            ``handle`` for :meth:`combine`.
        """
        out = self._dispatch(x, topk_idx, topk_weights, False, num_worst_tokens)
        out[5].wait()
        return out[:5]

    def dispatch_async(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                       num_worst_tokens: Optional[int] = None):
        """:meth:`dispatch` that returns at once with a sixth element, an :class:`EPEvent`.

        The returned tensors are valid after ``event.wait()``; compute that does not need
        them may run meanwhile.
        """
        return self._dispatch(x, topk_idx, topk_weights, True, num_worst_tokens)

    def _dispatch_fp8(self, x, topk_idx, topk_weights, async_op, num_worst_tokens):
        fp8 = getattr(self._backend, "dispatch_fp8", None)
        if fp8 is None:
            raise NotImplementedError(f"backend={self.backend_name!r} has no FP8 dispatch; "
                                      "build the EPBuffer with backend='cuda'")
        validation.check_dispatch_inputs(x, topk_idx, topk_weights, hidden=self.hidden,
                                         num_experts=self.num_experts,
                                         max_tokens_per_rank=self.max_tokens_per_rank,
                                         device=self.device, check_values=self.validate_values)
        validation.check_num_worst_tokens(num_worst_tokens)
        return fp8(x, topk_idx, topk_weights, self._routing_layout(topk_idx), async_op=async_op,
                   num_worst_tokens=num_worst_tokens)

    def dispatch_fp8(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                     num_worst_tokens: Optional[int] = None):
        """:meth:`dispatch` with the cast to FP8 fused into the send (about half the bytes on the wire).

        Rows travel as e4m3 with one fp32 scale per 128 channels (``scale = amax / 448``,
        ``value = x * (1 / scale)``; ``hidden`` must be a multiple of 128). Returns ``(recv_x float8_e4m3fn, recv_scales
        [R, hidden/128] float32, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert,
        handle)``; the handle combines like a bf16 dispatch's. ``num_worst_tokens`` as for
        :meth:`dispatch`. Backends without it raise NotImplementedError.
        """
        out = self._dispatch_fp8(x, topk_idx, topk_weights, False, num_worst_tokens)
        out[6].wait()
        return out[:6]

    def dispatch_fp8_async(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                           num_worst_tokens: Optional[int] = None):
        """:meth:`dispatch_fp8` returning a seventh element, an :class:`EPEvent`."""
        return self._dispatch_fp8(x, topk_idx, topk_weights, True, num_worst_tokens)

    # ----------------------------------------------------------------------------- combine
    def _check_handle(self, handle) -> None:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be the DispatchHandle a dispatch returned, got {type(handle).__name__}")
        if handle.buffer_id != id(self):
            raise ValueError("handle was made by a different EPBuffer; combine with the buffer that dispatched")

    def _combine(self, y, handle, expert_major, async_op):
        self._check_handle(handle)
        if expert_major:
            validation.check_combine_input(y, expected_rows=handle.num_expert_rows, hidden=self.hidden,
                                           device=self.device, what="expert-major rows: received (token, local expert) pairs")
            y = self.reduce_from_experts(y, handle)
        else:
            validation.check_combine_input(y, expected_rows=handle.num_recv_tokens, hidden=self.hidden,
                                           device=self.device, what="one row per received token")
        return self._backend.combine(y, handle, async_op=async_op)

    def combine(self, y: torch.Tensor, handle: DispatchHandle, *, expert_major: bool = False) -> torch.Tensor:
        """Return each token's expert outputs, summed over ranks in fp32, ``[T, hidden]`` in ``y.dtype``.

        Args:
            y: by default ``[R, hidden]``, one row per received token holding this rank's
                weighted partial sum ``Σ_{local k} w·f_e(x)``. With ``expert_major=True``,
                the raw expert outputs in the order of :meth:`permute_to_experts`; the routing
                weights are then applied here, in fp32.
            handle: the handle of the dispatch these rows answer.
        """
        out, event = self._combine(y, handle, expert_major, async_op=False)
        event.wait()
        return out

    def combine_async(self, y: torch.Tensor, handle: DispatchHandle, *, expert_major: bool = False):
        """:meth:`combine` returning ``(out, event)``; ``out`` is valid after ``event.wait()``."""
        return self._combine(y, handle, expert_major, async_op=True)

    # ----------------------------------------------------------------------------- local expert layout
    def _expert_positions(self, handle: DispatchHandle):
        if handle._expert_positions is None:
            handle._expert_positions = expert_major_positions(handle.recv_topk_idx, self.num_local_experts)
        return handle._expert_positions

    def permute_to_experts(self, recv_x: torch.Tensor, handle: DispatchHandle) -> tuple[torch.Tensor, torch.Tensor]:
        """Regroup received tokens by local expert for grouped GEMMs.

        Returns ``(expert_x [N, hidden], num_tokens_per_expert [E/W] int32)``: rows of expert 0
        first (ascending received-row order), then expert 1, ...; a token routed to two local
        experts appears twice.
        """
        self._check_handle(handle)
        counts, pos = self._expert_positions(handle)
        n = int(counts.sum())
        out = recv_x.new_empty(n, recv_x.shape[1])
        i_idx, j_idx = torch.nonzero(pos >= 0, as_tuple=True)
        out.index_copy_(0, pos[i_idx, j_idx], recv_x.index_select(0, i_idx))
        return out, counts

    def reduce_from_experts(self, expert_y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Weighted sum of expert-major rows back to one row per received token (fp32 math)."""
        self._check_handle(handle)
        _, pos = self._expert_positions(handle)
        return gather_reduce(expert_y, pos, handle.recv_topk_weights, out_dtype=expert_y.dtype)

    def __repr__(self) -> str:
        return (f"EPBuffer(rank={self.rank}/{self.world_size}, num_experts={self.num_experts}, hidden={self.hidden}, "
                f"max_tokens_per_rank={self.max_tokens_per_rank}, backend={self.backend_name!r}, "
                f"num_sms={self.num_sms}, device={self.device})")

    # ----------------------------------------------------------------------------- low latency (decode)
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor] = None,
                             *, use_fp8: bool = False, return_recv_hook: bool = False, transport: str = "copy_engine"):
        """Decode dispatch into a per-expert layout; returns ``(recv_x, recv_count, handle, hook)``.

        Transfers hold no SM with ``transport="copy_engine"``; see :mod:`overlap.ep.low_latency`
        (the first call sets the path up collectively, outside CUDA-graph capture).
        """
        from overlap.ep.low_latency import low_latency_state

        return low_latency_state(self).dispatch(x, topk_idx, topk_weights, use_fp8=use_fp8,
                                                return_recv_hook=return_recv_hook, transport=transport)

    def low_latency_combine(self, y: torch.Tensor, topk_idx: Optional[torch.Tensor],
                            topk_weights: Optional[torch.Tensor], handle, *, return_recv_hook: bool = False,
                            transport: Optional[str] = None, out: Optional[torch.Tensor] = None):
        """Decode combine of a :meth:`low_latency_dispatch`; returns ``(combined [T, hidden] bf16, hook)``."""
        from overlap.ep.low_latency import low_latency_state

        return low_latency_state(self).combine(y, topk_idx, topk_weights, handle, return_recv_hook=return_recv_hook,
                                               transport=transport, out=out)
