"""Class every trace event as communication (``"comm"``) or computation (``"compute"``).

The decision is made from the event's name, in this order (the first rule that matches wins):

1. the caller's ``compute`` regexes, then the caller's ``comm`` regexes;
2. built-in exceptions that look like communication but are local work (DeepEP's
   ``get_dispatch_layout`` only counts tokens per rank/expert on the local GPU);
3. a copy between two different GPUs (``Memcpy PtoP``, or any copy whose ``fromDevice`` and
   ``toDevice`` differ): copy-engine traffic is communication however it is named;
4. built-in communication patterns: NCCL kernels and record functions, ``gloo:``/``c10d::``/
   ``record_param_comms`` host ops, NVSHMEM, collectives by name (all_to_all, all_reduce,
   all_gather, reduce_scatter, send/recv), and expert-parallel kernels named for what they do
   — DeepEP's ``dispatch``/``combine``/``notify_dispatch``/``cached_notify*``/
   ``clean_low_latency_buffer`` (in DeepSeek's trace: ``dpsk::ep::internode::...``), pplx,
   and this project's kernels (``overlap::intranode::*`` including the counts exchange
   ``notify_kernel``, ``overlap::ll::*``, the Triton ``ep_dispatch``/``ep_combine``);
5. everything else is compute. Local copies and memsets count as compute: the GPU is busy
   with work that is not inter-GPU traffic.

Patterns are Python regexes searched case-insensitively anywhere in the name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from overlap.profiling.trace import TraceEvent

COMM = "comm"
COMPUTE = "compute"
CLASSES = (COMM, COMPUTE)

DEFAULT_COMPUTE_PATTERNS: tuple[str, ...] = (
    r"dispatch_layout",  # DeepEP get_dispatch_layout: local counting, no traffic
    r"flash\w*combine|split_?kv\w*combine",  # flash-decoding merges split-KV partials locally
)

# A word boundary that treats "_" and "::" as separators, so `notify_dispatch`,
# `overlap_combine` and `internode::combine<...>` match but `dispatcher` does not.
_B = r"(?<![A-Za-z0-9])"
_E = r"(?![A-Za-z0-9])"

DEFAULT_COMM_PATTERNS: tuple[str, ...] = (
    r"nccl",                                       # ncclDevKernel_*, ncclKernel_*, nccl:all_to_all
    r"^(gloo|mpi|ucc)\s*:",                        # host-side collective ranges (gloo runs them on its own threads)
    r"^c10d::",                                    # c10d::alltoall_base_, c10d::allreduce_, ...
    r"^record_param_comms$",
    r"nvshmem",
    _B + r"(all_?to_?all|all_?reduce|all_?gather|reduce_?scatter)",  # _B: "small_reduce" is not one
    _B + r"(send_?recv|sendrecv|isend|irecv)" + _E,
    r"^Memcpy PtoP",
    _B + r"(dispatch|combine|notify_dispatch|notify_combine|cached_notify\w*|clean_low_latency_buffer)" + _E,
    r"pplx",
    r"overlap_(dispatch|combine|send|recv|notify|barrier)",
    r"overlap::(intranode|ll)::",                  # every kernel of these namespaces moves data between GPUs
)


def _compile(patterns: Iterable[str], arg: str) -> tuple[re.Pattern, ...]:
    if isinstance(patterns, str):
        raise TypeError(f"{arg} must be a list of regex strings, not one string")
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg} must hold regex strings, got {type(p).__name__}")
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"{arg}: invalid regex {p!r}: {exc}") from exc
    return tuple(out)


@dataclass
class Classifier:
    """Name-based comm/compute classifier with user overrides (see the module docstring).

    ``comm`` and ``compute`` are extra regexes that take precedence over the built-ins
    (``compute`` before ``comm``); ``use_defaults=False`` keeps only the caller's rules.
    """

    comm: Iterable[str] = ()
    compute: Iterable[str] = ()
    use_defaults: bool = True
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.comm = tuple(self.comm) if not isinstance(self.comm, str) else self.comm
        self.compute = tuple(self.compute) if not isinstance(self.compute, str) else self.compute
        self._user_compute = _compile(self.compute, "compute")
        self._user_comm = _compile(self.comm, "comm")
        self._default_compute = _compile(DEFAULT_COMPUTE_PATTERNS if self.use_defaults else (), "compute")
        self._default_comm = _compile(DEFAULT_COMM_PATTERNS if self.use_defaults else (), "comm")

    def classify_name(self, name: str, peer_copy: bool = False) -> str:
        """Class of an event called ``name``; ``peer_copy`` marks a GPU-to-GPU copy."""
        key = (name, peer_copy)
        cls = self._cache.get(key)
        if cls is None:
            cls = self._decide(name, peer_copy)
            self._cache[key] = cls
        return cls

    def classify(self, event: TraceEvent | str) -> str:
        """Class (``"comm"`` or ``"compute"``) of a :class:`TraceEvent` or a bare name."""
        if isinstance(event, str):
            return self.classify_name(event)
        if not isinstance(event, TraceEvent):
            raise TypeError(f"event must be a TraceEvent or a str, got {type(event).__name__}")
        return self.classify_name(event.name, event.is_peer_copy)

    def _decide(self, name: str, peer_copy: bool) -> str:
        if any(p.search(name) for p in self._user_compute):
            return COMPUTE
        if any(p.search(name) for p in self._user_comm):
            return COMM
        if any(p.search(name) for p in self._default_compute):
            return COMPUTE
        if peer_copy and self.use_defaults:
            return COMM
        if any(p.search(name) for p in self._default_comm):
            return COMM
        return COMPUTE


def kernel_class(name: str, comm: Iterable[str] = (), compute: Iterable[str] = ()) -> str:
    """One-off classification of a name with the built-in rules plus optional overrides."""
    return Classifier(comm=comm, compute=compute).classify_name(name)
