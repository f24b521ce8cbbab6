"""The one executor: runs any :class:`~overlap.pipeline.schedules.Schedule` on its rank.

:class:`PipelineEngine` is the base of DualPipe, DualPipeV, OneFOneB and ZB1P; a subclass only
names its schedule and how many local modules each rank holds. A step walks this rank's op
list; each op takes its inputs (micro-batch slices, a received message, or a hand-off from
another module of this rank), computes, and passes its results on. Messages go through a
:class:`~overlap.pipeline.comm.Mailbox` (gloo on CPU, NCCL on GPU; sends never block the next
chunk).
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from overlap.pipeline import ops as O
from overlap.pipeline.comm import ACTIVATION, GRADIENT, Mailbox, P2PSpec, _check_dtype, _check_shapes, transfer_plan
from overlap.pipeline.schedules import SCHEDULES, Schedule
from overlap.pipeline.utils import (WeightGradStore, gather_microbatches, run_backward, run_weight_grads,
                                    split_microbatches)


def _as_list(outputs) -> list:
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


class PipelineEngine(nn.Module):
    """Base of every pipeline; subclasses set ``schedule_name`` and ``num_modules``.

    Args:
        modules: this rank's stage module(s): a module, or a sequence of ``num_modules``.
        batch_dim: dimension along which ``step`` splits inputs and labels into micro-batches.
        process_group: the pipeline's ranks (default: the default group; none needed for a
            one-rank pipeline outside torch.distributed).
        rank_mapping: ``rank_mapping[group_rank]`` is that rank's pipeline rank (default: same).

    ``use_overlap_hook`` is True when both modules are of one class that defines the
    ``overlapped_forward_backward`` classmethod; then each ``[F&B]`` pair runs through it.
    After each ``step``, ``trace`` lists the compute chunks this rank ran, in order (see
    ``overlap.pipeline.ops``). Set ``record_timeline = True`` to also get
    ``timeline_records``: ``(label, start_s, end_s)`` per chunk, for
    ``Timeline.from_records`` and the drawing functions.
    """

    schedule_name: str = ""
    num_modules: int = 1

    def __init__(self, modules, batch_dim: int = 0, process_group: Optional["dist.ProcessGroup"] = None,
                 rank_mapping: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        cls = type(self).__name__
        if self.schedule_name not in SCHEDULES:
            raise TypeError(f"{cls} names no schedule; use DualPipe, DualPipeV, OneFOneB or ZB1P, or set "
                            f"schedule_name to one of {sorted(SCHEDULES)}")
        # One-module pipelines take the module itself (even an nn.Sequential); two-module ones
        # take a pair, as a tuple, list, ModuleList or Sequential.
        if self.num_modules == 1 and isinstance(modules, nn.Module) and not isinstance(modules, nn.ModuleList):
            modules = [modules]
        modules = list(modules) if isinstance(modules, (list, tuple, nn.ModuleList, nn.Sequential)) else modules
        if not isinstance(modules, list) or len(modules) != self.num_modules or \
                not all(isinstance(m, nn.Module) for m in modules):
            raise TypeError(f"{cls}: modules must be {self.num_modules} nn.Module(s) for this rank, got {modules!r:.200}")
        if not isinstance(batch_dim, int) or isinstance(batch_dim, bool):
            raise TypeError(f"{cls}: batch_dim must be an int, got {batch_dim!r}")
        self.module = nn.ModuleList(modules)
        self.batch_dim = batch_dim
        self.group, self.num_ranks, group_rank = self._resolve_group(process_group)
        mapping = self._check_rank_mapping(rank_mapping, self.num_ranks)
        self.rank = mapping[group_rank]
        self._group_rank_of = {pp: g for g, pp in enumerate(mapping)}
        SCHEDULES[self.schedule_name](self.num_ranks, 4 * self.num_ranks)  # raises for a bad rank count
        # The overlap hook runs a forward of one module with a backward of the other; it must
        # be the same class on both sides (as in deepseek-ai/DualPipe). Set False to run every
        # pair as two chunks instead.
        self.use_overlap_hook = (len(modules) == 2 and type(modules[0]) is type(modules[1])
                                 and hasattr(type(modules[0]), "overlapped_forward_backward"))
        self._p2p_shapes = None
        self._p2p_dtype = None
        self._schedules: dict[int, Schedule] = {}
        self._plans: dict[tuple[int, bool], list] = {}
        self.trace: list[str] = []
        self.record_timeline = False
        self.timeline_records: Optional[list[tuple[str, float, float]]] = None

    # ---- configuration -------------------------------------------------------------------

    def set_p2p_tensor_shapes(self, shapes: Sequence[Sequence[int]]) -> None:
        """Shapes of one micro-batch's boundary tensors for this pipeline only."""
        self._p2p_shapes = _check_shapes(shapes)

    def set_p2p_tensor_dtype(self, dtype) -> None:
        """Dtype of those tensors for this pipeline only (one, or a list with one per tensor)."""
        self._p2p_dtype = _check_dtype(dtype)

    def schedule(self, num_chunks: int) -> Schedule:
        """The schedule a step with ``num_chunks`` micro-batches runs (ValueError if invalid)."""
        sched = self._schedules.get(num_chunks)
        if sched is None:
            sched = SCHEDULES[self.schedule_name](self.num_ranks, num_chunks)
            if sched.num_local_modules(self.rank) != len(self.module):
                raise RuntimeError(f"schedule {sched.name} puts {sched.num_local_modules(self.rank)} modules on "
                                   f"rank {self.rank}, but {len(self.module)} were given")
            self._schedules[num_chunks] = sched
        return sched

    @staticmethod
    def _resolve_group(process_group):
        if process_group is None:
            if not (dist.is_available() and dist.is_initialized()):
                return None, 1, 0
            process_group = dist.distributed_c10d._get_default_group()
        rank = dist.get_rank(process_group)
        if rank < 0:
            raise ValueError("process_group: this process is not a member of it")
        return process_group, dist.get_world_size(process_group), rank

    @staticmethod
    def _check_rank_mapping(rank_mapping, n: int) -> list[int]:
        if rank_mapping is None:
            return list(range(n))
        mapping = list(rank_mapping)
        if sorted(mapping) != list(range(n)) or not all(isinstance(r, int) for r in mapping):
            raise ValueError(f"rank_mapping must list a distinct pipeline rank 0..{n - 1} for each of the "
                             f"{n} group ranks, got {rank_mapping!r}")
        return mapping

    def _global_rank(self, pipeline_rank: int) -> int:
        return dist.get_global_rank(self.group, self._group_rank_of[pipeline_rank])

    def _device(self) -> torch.device:
        for tensor in list(self.module.parameters()) + list(self.module.buffers()):
            return tensor.device
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- the step ------------------------------------------------------------------------

    def step(self, *inputs: Optional[torch.Tensor], num_chunks: int = 0, criterion: Optional[Callable] = None,
             labels: Sequence[Optional[torch.Tensor]] = (), return_outputs: bool = False):
        """Run one training step (or, under ``torch.no_grad()``, one inference step).

        Args:
            *inputs: the batch, on the rank(s) where micro-batches enter the pipeline.
            num_chunks: number of micro-batches.
            criterion: ``criterion(*outputs, *labels)`` gives one micro-batch's loss; needed
                for training on the rank(s) that hold a last stage.
            labels: labels of the batch, on the rank(s) that hold a last stage.
            return_outputs: also return the last stage's outputs.

        Returns ``(loss, outputs)``: on a rank holding a last stage, the per-micro-batch
        losses stacked (None without a criterion) and, if asked, the outputs concatenated
        along ``batch_dim``; elsewhere ``(None, None)``.
        """
        cls = type(self).__name__
        sched = self.schedule(num_chunks)
        forward_only = not torch.is_grad_enabled()
        starts = [k for k, chain in enumerate(sched.chains) if chain.first_rank == self.rank]
        ends = [k for k, chain in enumerate(sched.chains) if chain.last_rank == self.rank]
        if criterion is not None and not callable(criterion):
            raise TypeError(f"{cls}.step: criterion must be callable, got {type(criterion).__name__}")
        if ends and criterion is None and not forward_only:
            raise ValueError(f"{cls}.step: training needs a criterion on pipeline rank {self.rank}, "
                             "which holds a last stage and computes the loss")
        if starts and (not inputs or all(t is None for t in inputs)):
            raise ValueError(f"{cls}.step: inputs are required on pipeline rank {self.rank}, "
                             "where micro-batches enter the pipeline")
        if not isinstance(return_outputs, bool):
            raise TypeError(f"{cls}.step: return_outputs must be a bool, got {return_outputs!r}")
        labels = (labels,) if isinstance(labels, torch.Tensor) else tuple(labels)

        plan = self._plans.get((num_chunks, forward_only))
        if plan is None:
            plan = self._plans[(num_chunks, forward_only)] = transfer_plan(sched, forward_only)
        talks = any(self.rank in (t.src, t.dst) for t in plan)
        spec = P2PSpec.resolve(self._p2p_shapes, self._p2p_dtype) if talks else None
        device = self._device()
        micro_inputs = {k: split_microbatches(inputs, sched.chains[k].num_microbatches, self.batch_dim)
                        for k in starts}
        micro_labels = {k: split_microbatches(labels, sched.chains[k].num_microbatches, self.batch_dim)
                        for k in ends}
        mailbox = Mailbox(plan, self.rank, spec, device, self.group, self._global_rank) if talks else None

        if self.record_timeline:
            # Line the ranks up so their chunk times share an origin (to within a barrier).
            if self.group is not None and self.num_ranks > 1:
                if device.type == "cuda":
                    dist.barrier(group=self.group, device_ids=[device.index])
                else:
                    dist.barrier(group=self.group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        run = _StepRun(self, sched, forward_only, criterion, micro_inputs, micro_labels, return_outputs,
                       mailbox, device)
        try:
            run.execute()
        finally:
            self.trace = run.trace
            self.timeline_records = run.timeline_records() if self.record_timeline else None
        loss = outputs = None
        if ends:
            (k,) = ends   # every built-in placement ends at most one chain per rank
            if criterion is not None:
                loss = torch.stack(run.losses[k])
            if return_outputs:
                outputs = gather_microbatches(run.results[k], self.batch_dim)
        return loss, outputs


class _StepRun:
    """State of one step on one rank; gone when the step returns."""

    def __init__(self, engine: PipelineEngine, sched: Schedule, forward_only: bool, criterion, micro_inputs,
                 micro_labels, return_outputs: bool, mailbox: Optional[Mailbox], device) -> None:
        self.engine = engine
        self.sched = sched
        self.rank = engine.rank
        self.forward_only = forward_only
        self.criterion = criterion
        self.micro_inputs = micro_inputs
        self.micro_labels = micro_labels
        self.return_outputs = return_outputs
        self.mailbox = mailbox
        self.device = device
        self.local: dict[tuple, list] = {}              # same-rank hand-offs, keyed like messages
        self.inputs: dict[tuple, list] = {}             # (d, m) -> stage inputs, kept for backward
        self.outputs: dict[tuple, list] = {}            # (d, m) -> stage outputs, kept for backward
        self.losses: dict[int, list] = defaultdict(list)
        self.results: dict[int, list] = defaultdict(list)
        self.deferred: deque = deque()                  # this pipeline's own W queue (FIFO)
        self.trace: list[str] = []
        self._timing = engine.record_timeline
        self._marks: list = []

    # ---- driver ------------------------------------------------------------------------------

    def execute(self) -> None:
        if self._timing and self.device.type == "cuda":
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()
        for op in self.sched.rank_ops[self.rank]:
            if self.mailbox is not None:
                self.mailbox.advance()
                self.mailbox.reap()
            if op.kind == O.FORWARD:
                self._forward(op)
            elif op.kind in (O.BACKWARD, O.BACKWARD_INPUT):
                if not self.forward_only:
                    self._backward(op)
            elif op.kind == O.WEIGHT:
                if not self.forward_only:
                    self._weight()
            elif self.forward_only:
                self._forward(op.forward_part())
            elif self.engine.use_overlap_hook:
                self._pair(op)
            else:
                # Without a hook the pair runs as its two chunks; sends wait for both, as a pair's do.
                sends: list = []
                self._forward(op.forward_part(), sends)
                self._backward(op.backward_part(), sends)
                self._send(sends)
        if self.mailbox is not None:
            self.mailbox.reap(block=True)
            self.mailbox.check_drained()
        if self.deferred or self.local or self.inputs or self.outputs:
            raise RuntimeError(f"pipeline rank {self.rank}: step ended with {len(self.deferred)} W chunks, "
                               f"{len(self.local)} hand-offs, {len(self.inputs)} inputs left over")

    @contextmanager
    def _chunk(self, label: str):
        """Trace one compute chunk (and time it when recording a timeline)."""
        self.trace.append(label)
        if not self._timing:
            yield
            return
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._marks.append((label, start, end))

    def timeline_records(self) -> list[tuple[str, float, float]]:
        if not self._marks or self.device.type != "cuda":
            return list(self._marks)
        torch.cuda.synchronize(self.device)
        return [(label, self._origin.elapsed_time(s) / 1e3, self._origin.elapsed_time(e) / 1e3)
                for label, s, e in self._marks]

    # ---- where a stage's inputs come from and its results go -----------------------------

    def _where(self, d: int) -> tuple[int, int, bool]:
        chain, j = self.sched.locate(self.rank, d)
        return chain, j, j == self.sched.num_stages_of(chain) - 1

    def _fetch(self, key: tuple, from_rank: int) -> list:
        return self.local.pop(key) if from_rank == self.rank else self.mailbox.receive(key)

    def _forward_prepare(self, d: int, m: int):
        chain, j, last = self._where(d)
        if j == 0:
            inputs = list(self.micro_inputs[chain][m])
        else:
            inputs = self._fetch((ACTIVATION, chain, j - 1, m), self.sched.stage(chain, j - 1)[0])
            if not self.forward_only:
                for t in inputs:
                    if t.is_floating_point():
                        t.requires_grad_()
        if last and self.criterion is not None:
            return inputs, self.criterion, list(self.micro_labels[chain][m])
        return inputs, None, []

    def _forward_finish(self, d: int, m: int, inputs: list, outputs, loss, sends: list) -> None:
        chain, j, last = self._where(d)
        outputs = _as_list(outputs)
        if loss is not None:
            self.losses[chain].append(loss)
        if not self.forward_only:
            self.inputs[(d, m)] = inputs
        if last:
            if self.return_outputs:
                self.results[chain].append(outputs)
            return
        if not self.forward_only:
            self.outputs[(d, m)] = outputs
        key = (ACTIVATION, chain, j, m)
        to_rank = self.sched.stage(chain, j + 1)[0]
        if to_rank == self.rank:
            grad = not self.forward_only
            self.local[key] = [o.detach().requires_grad_(grad and o.is_floating_point()) for o in outputs]
        else:
            # A sent activation's storage can go once sent, unless it is also an input here.
            release = not self.forward_only and not any(o is i for o in outputs for i in inputs)
            sends.append((key, outputs, release, f"F{d}.{m} output (pipeline rank {self.rank})"))

    def _backward_prepare(self, d: int, m: int):
        chain, j, last = self._where(d)
        if last:
            return self.losses[chain][m], [], []
        outputs = self.outputs.pop((d, m))
        grads = self._fetch((GRADIENT, chain, j + 1, m), self.sched.stage(chain, j + 1)[0])
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        return None, [o for o, _ in pairs], [g for _, g in pairs]

    def _backward_finish(self, d: int, m: int, sends: list) -> None:
        chain, j, _ = self._where(d)
        inputs = self.inputs.pop((d, m))
        if j == 0:
            return
        key = (GRADIENT, chain, j, m)
        to_rank = self.sched.stage(chain, j - 1)[0]
        if to_rank == self.rank:
            self.local[key] = [t.grad for t in inputs]
        else:
            # An input this stage did not use gets a zero gradient: the peer expects every tensor.
            grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs]
            sends.append((key, grads, False, f"B{d}.{m} input gradient (pipeline rank {self.rank})"))

    def _send(self, sends: list) -> None:
        for key, tensors, release, what in sends:
            self.mailbox.send(key, tensors, release, what)

    # ---- the chunks ----------------------------------------------------------------------------

    def _forward(self, op: O.Op, sends: Optional[list] = None) -> None:
        own_sends = sends is None
        sends = [] if own_sends else sends
        inputs, criterion, labels = self._forward_prepare(op.d, op.m)
        with self._chunk(str(op)):
            outputs = self.engine.module[op.d](*inputs)
            loss = criterion(*_as_list(outputs), *labels) if criterion is not None else None
        self._forward_finish(op.d, op.m, inputs, outputs, loss, sends)
        if own_sends:
            self._send(sends)

    def _backward(self, op: O.Op, sends: Optional[list] = None) -> None:
        own_sends = sends is None
        sends = [] if own_sends else sends
        defer = op.kind == O.BACKWARD_INPUT
        loss, outputs, grads = self._backward_prepare(op.d, op.m)
        with self._chunk(str(op)):
            WeightGradStore.enabled = defer
            try:
                if loss is not None:
                    loss.backward()
                    loss.detach_()
                elif outputs:
                    run_backward(outputs, grads)
            finally:
                WeightGradStore.enabled = False
        if defer:
            self.deferred.append(WeightGradStore.take())
        self._backward_finish(op.d, op.m, sends)
        if own_sends:
            self._send(sends)

    def _weight(self) -> None:
        if not self.deferred:
            raise RuntimeError(f"pipeline rank {self.rank}: a W chunk with no deferred backward")
        funcs = self.deferred.popleft()
        with self._chunk("W"):
            run_weight_grads(funcs)

    def _pair(self, op: O.Op) -> None:
        """A forward and a backward through the stage class's overlapped_forward_backward hook."""
        sends: list = []
        inputs0, criterion0, labels0 = self._forward_prepare(op.d, op.m)
        loss1, outputs1, grads1 = self._backward_prepare(op.d1, op.m1)
        module0, module1 = self.engine.module[op.d], self.engine.module[op.d1]
        with self._chunk(str(op)):
            outputs0, loss0 = type(module0).overlapped_forward_backward(
                module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1)
        if loss1 is not None:
            loss1.detach_()
        self._forward_finish(op.d, op.m, inputs0, outputs0, loss0 if criterion0 is not None else None, sends)
        self._backward_finish(op.d1, op.m1, sends)
        self._send(sends)
