"""Measure communication/computation overlap in a PyTorch-profiler (Chrome) trace.

What is measured, per device (a GPU, or a host process for CPU-only traces):

* per stream (GPU) or thread (CPU): busy time = length of the union of its events;
* ``comm`` = union of every communication interval on the device, ``compute`` = union of every
  compute interval (see :mod:`overlap.profiling.classify`). Within one CPU thread, time covered
  by a comm op is comm even where a compute op encloses it (ops nest: a ``c10d::`` call contains
  ``aten::`` children). GPU events are never nested: eager work on one stream runs one at a
  time, and where events of one stream do overlap (nodes of a CUDA-graph replay may all be
  reported on the launch stream) they ran concurrently, so a comm copy under a compute kernel
  counts as overlapped there too;
* ``overlapped = |comm ∩ compute|``, ``overlap_share = overlapped / |comm|``, and
  ``exposed = |comm| - overlapped`` (comm with no compute running anywhere on the device);
* ``span`` = first start to last end of the device's events; ``exposed_share_of_span``;
* per kernel: grid, blocks (CTAs), and SMs held = ``min(blocks, num_sms)``. A launch with at
  most one block per SM (persistent kernels: DeepEP's, this project's comm kernels, GEMMs
  sized to 112 CTAs) holds exactly ``blocks`` SMs for its whole life (``single_wave``); a
  larger grid runs in waves and is reported as holding all SMs. Copies use copy engines and
  hold 0 SMs. Time-weighted SM figures per class summarise this;
* GPU traces also get :mod:`overlap.profiling.breakdown`'s split of comm into zero-SM transfers
  (and how much of them compute covered), SM-holding comm kernels, time those kernels spent
  waiting (beyond their fastest launch), and the GPU's idle share (a host-paced trace).

GPU work is analysed when the trace has any; otherwise CPU ops and record_function ranges
(gloo labels its collectives ``gloo:<op>`` on its own threads; only annotations classed as
comm are kept, because user ranges such as ``ProfilerStep#3`` enclose everything).

On DeepSeek's public DualPipe trace (``deepseek_v3_train_ep64_trace.json``, H800, EP64,
rank 0) this gives 96.3% of comm time overlapped and 3.2% of the span exposed, comm kernels on
20 SMs (``notify_dispatch`` on 9) and the grouped GEMMs on 112 CTAs, as DeepSeek reported.

CLI::

    python -m overlap.profiling.analyze TRACE [--png out.png] [--json out.json] [--sms 132]
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from overlap.profiling import intervals as iv
from overlap.profiling.breakdown import FIGURES as BREAKDOWN_FIGURES
from overlap.profiling.breakdown import breakdown_events, comm_breakdown, kernel_minima
from overlap.profiling.classify import COMM, COMPUTE, Classifier
from overlap.profiling.trace import Trace, TraceEvent, load_trace

SOURCES = ("auto", "gpu", "cpu")


@dataclass
class StreamStats:
    """Busy time of one stream (GPU) or thread (CPU)."""

    device: str
    stream: Any
    label: str
    num_events: int
    num_comm: int
    busy_us: float
    comm_us: float
    compute_us: float


@dataclass
class KernelStats:
    """All launches of one kernel (same name and geometry) on one stream."""

    device: str
    stream: Any
    name: str
    short_name: str
    cls: str
    kind: str
    count: int
    total_us: float
    mean_us: float
    max_us: float
    grid: tuple[int, int, int] | None
    block: tuple[int, int, int] | None
    blocks: int | None
    threads_per_block: int | None
    sms: int | None
    single_wave: bool | None
    registers: int | None
    shared_mem: int | None


@dataclass
class DeviceStats:
    """Overlap figures of one device (all times in microseconds)."""

    device: str
    device_name: str | None
    num_sms: int | None
    num_events: int
    num_comm: int
    span_us: float
    busy_us: float
    comm_us: float
    compute_us: float
    overlapped_us: float
    exposed_us: float
    overlap_share: float | None  # None when the device has no comm
    exposed_share_of_span: float | None
    comm_mean_sms: float | None = None
    comm_sms_mode: int | None = None
    compute_mean_sms: float | None = None
    compute_sms_mode: int | None = None
    compute_sms_under_comm_mode: int | None = None  # SMs of the compute that runs beside comm
    # overlap.profiling.breakdown (GPU traces): transfers that hold no SM vs SM-holding comm kernels.
    transfer_us: float | None = None
    transfer_overlapped_us: float | None = None
    transfer_overlap_share: float | None = None
    comm_kernel_us: float | None = None
    comm_kernel_overlapped_us: float | None = None
    comm_wait_us: float | None = None             # comm kernels' time beyond their fastest launch (waiting)
    idle_us: float | None = None
    idle_share: float | None = None
    host_bound: bool | None = None                # GPU idle most of the span: launch-paced trace
    copy_start_lag_us: float | None = None


@dataclass
class TraceAnalysis:
    """Result of :func:`analyze_trace`; :meth:`to_rows` gives flat rows for ``write_results``."""

    source: str | None
    mode: str  # "gpu" or "cpu"
    devices: list[DeviceStats]
    streams: list[StreamStats]
    kernels: list[KernelStats]
    # For the timeline: per lane (comm union, compute union), per device the exposed comm and the
    # compute union.
    lane_intervals: dict = field(default_factory=dict, repr=False)
    exposed_intervals: dict = field(default_factory=dict, repr=False)
    compute_intervals: dict = field(default_factory=dict, repr=False)
    classified: list = field(default_factory=list, repr=False)  # (TraceEvent, cls)
    start_us: float = 0.0

    @property
    def comm_us(self) -> float:
        return sum(d.comm_us for d in self.devices)

    @property
    def compute_us(self) -> float:
        return sum(d.compute_us for d in self.devices)

    @property
    def overlapped_us(self) -> float:
        return sum(d.overlapped_us for d in self.devices)

    @property
    def exposed_us(self) -> float:
        return sum(d.exposed_us for d in self.devices)

    @property
    def overlap_share(self) -> float | None:
        """Comm time overlapped by compute over all devices, or None without comm."""
        comm = self.comm_us
        return self.overlapped_us / comm if comm > 0 else None

    def exposed_by_kernel(self, device: str) -> dict[str, float]:
        """Each communication kernel's (short name's) exposed time on ``device``: its time with no
        compute beside it, summed over launches, largest first. Kernels that run at once each
        count the shared time, so the values may add up to more than the device's exposed_us.
        Says which transfer a schedule leaves in the open."""
        exposed = self.exposed_intervals.get(device)
        if exposed is None:
            raise KeyError(f"no device {device!r} in this analysis (have {list(self.exposed_intervals)})")
        out: dict[str, float] = collections.defaultdict(float)
        starts = [s for s, _ in exposed]
        for e, cls in self.classified:
            if cls == COMM and e.lane[0] == device:
                out[short_kernel_name(e.name)] += iv.covered_length(e.ts, e.end, exposed, starts)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def overlap_share_of(self, device: str, keep: Callable[[str], bool]) -> float | None:
        """Share of the time of the comm events whose name passes ``keep`` that compute covers
        on ``device`` (None when none passes): e.g. the EP kernels alone, leaving out a
        pipeline's NCCL send/recv that waits through bubbles."""
        if device not in self.exposed_intervals:
            raise KeyError(f"no device {device!r} in this analysis (have {list(self.exposed_intervals)})")
        comm_u = iv.union((e.ts, e.end) for e, cls in self.classified
                          if cls == COMM and e.lane[0] == device and keep(e.name))
        comp_u = self.compute_intervals[device]   # per lane, as analyze_trace took it
        total = iv.total(comm_u)
        return iv.total(iv.intersect(comm_u, comp_u)) / total if total > 0 else None

    def device(self, device: str) -> DeviceStats:
        for d in self.devices:
            if d.device == device:
                return d
        raise KeyError(f"no device {device!r} in this analysis (have {[d.device for d in self.devices]})")

    def to_rows(self, top: int | None = None) -> list[dict[str, Any]]:
        """Flat rows: one ``trace_device`` per device, ``trace_stream`` per lane, ``trace_kernel``
        per kernel (the ``top`` longest by total time, all when None)."""
        base = {"source": os.path.basename(self.source) if self.source else None, "mode": self.mode}
        rows: list[dict[str, Any]] = []
        for d in self.devices:
            row = {"op": "trace_device", **base, **_rounded(asdict(d))}
            row["overlap_pct"] = None if d.overlap_share is None else round(100 * d.overlap_share, 3)
            row["exposed_pct_of_span"] = (None if d.exposed_share_of_span is None
                                          else round(100 * d.exposed_share_of_span, 3))
            row["num_sms"] = d.num_sms
            rows.append(row)
        for s in self.streams:
            rows.append({"op": "trace_stream", **base, **_rounded(asdict(s))})
        for k in self.kernels[: top if top is not None else len(self.kernels)]:
            row = {"op": "trace_kernel", **base, **_rounded(asdict(k))}
            row["class"] = row.pop("cls")
            row["time_us"] = row.pop("total_us")
            row["num_sms"] = row.pop("sms")
            row["grid"] = _fmt_dim3(k.grid)
            row["block"] = _fmt_dim3(k.block)
            rows.append(row)
        return rows

    def summary(self, top: int = 15) -> str:
        """Human-readable report: devices, streams, top kernels by total time."""
        out = []
        what = "GPU kernels/copies" if self.mode == "gpu" else "CPU ops (no GPU activity in the trace)"
        n_ev = sum(d.num_events for d in self.devices)
        out.append(f"trace: {self.source or '<in memory>'}")
        out.append(f"analysed: {what}; {len(self.devices)} device(s), {len(self.streams)} lane(s), {n_ev} events")
        for d in self.devices:
            name = f" ({d.device_name}, {d.num_sms} SMs)" if d.device_name or d.num_sms else ""
            out.append(f"\n{d.device}{name}: span {_ms(d.span_us)}, busy {_ms(d.busy_us)}")
            ov = "n/a" if d.overlap_share is None else f"{100 * d.overlap_share:.1f}%"
            ex = "n/a" if d.exposed_share_of_span is None else f"{100 * d.exposed_share_of_span:.1f}%"
            out.append(f"  communication {_ms(d.comm_us)} in {d.num_comm} events; overlapped by compute "
                       f"{_ms(d.overlapped_us)} = {ov}; exposed {_ms(d.exposed_us)} = {ex} of span")
            out.append(f"  compute       {_ms(d.compute_us)}")
            if d.transfer_us is not None:
                tov = "n/a" if d.transfer_overlap_share is None else f"{100 * d.transfer_overlap_share:.1f}%"
                lag = "-" if d.copy_start_lag_us is None else f"{d.copy_start_lag_us:.1f} us"
                out.append(f"  of which: transfers holding no SM {_ms(d.transfer_us)}, under compute {tov} "
                           f"(median copy start lag after its comm kernel {lag}); comm kernels holding SMs "
                           f"{_ms(d.comm_kernel_us)} ({_ms(d.comm_kernel_overlapped_us)} beside compute), "
                           f"of it beyond each kernel's fastest launch (waiting, where launches do equal work) "
                           f"{_ms(d.comm_wait_us)}")
                idle = "n/a" if d.idle_share is None else f"{100 * d.idle_share:.1f}%"
                out.append(f"  GPU idle {_ms(d.idle_us)} = {idle} of span"
                           + ("  <- launch-bound: this trace shows the host's pace, not the device schedule "
                              "(trace a CUDA-graph replay)" if d.host_bound else ""))
            if d.comm_mean_sms is not None or d.compute_mean_sms is not None:
                out.append(f"  SMs held (time-weighted mean / most common): comm {_f(d.comm_mean_sms)} / "
                           f"{_f(d.comm_sms_mode)}, compute {_f(d.compute_mean_sms)} / {_f(d.compute_sms_mode)}, "
                           f"compute beside comm most often {_f(d.compute_sms_under_comm_mode)}")
        out.append("\nlanes:")
        for s in self.streams:
            out.append(f"  {s.device:<10} {s.label:<36.36} busy {_ms(s.busy_us):>10}  comm {_ms(s.comm_us):>10}  "
                       f"compute {_ms(s.compute_us):>10}  events {s.num_events}")
        out.append(f"\ntop {min(top, len(self.kernels))} {'kernels' if self.mode == 'gpu' else 'ops'} by total time:")
        out.append(f"  {'class':<8}{'stream':>7}{'count':>7}{'total ms':>10}{'mean us':>10}"
                   f"{'grid':>12}{'block':>10}{'SMs':>5}  name")
        for k in self.kernels[:top]:
            out.append(f"  {k.cls:<8}{str(k.stream):>7.7}{k.count:>7}{k.total_us / 1e3:>10.3f}{k.mean_us:>10.1f}"
                       f"{_fmt_dim3(k.grid) or '-':>12}{_fmt_dim3(k.block) or '-':>10}"
                       f"{'-' if k.sms is None else k.sms:>5}  {k.short_name[:90]}")
        return "\n".join(out)


def _ms(us: float) -> str:
    return f"{us / 1e3:.3f} ms"


def _f(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _fmt_dim3(d) -> str | None:
    return None if d is None else "x".join(str(x) for x in d)


def _rounded(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            v = round(v, 6) if math.isfinite(v) else None
        elif isinstance(v, tuple):
            v = _fmt_dim3(v)
        out[k] = v
    return out


_TEMPLATE_RE = re.compile(r"<[^<>]*>")
# Generic launch wrappers whose first template argument names the real kernel.
_WRAPPERS = ("cutlass::device_kernel", "cutlass::Kernel", "cutlass::Kernel2")


def _first_template_arg(s: str, start: int) -> str:
    """The first top-level template argument of the list opening at ``s[start] == '<'``."""
    depth = 0
    for i in range(start, len(s)):
        ch = s[i]
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
            if depth == 0:
                return s[start + 1:i]
        elif ch == "," and depth == 1:
            return s[start + 1:i]
    return s[start + 1:]


def short_kernel_name(name: str) -> str:
    """Strip return type, template arguments and parameter list from a demangled name.

    ``void dpsk::ep::internode::combine<false, 8>(int4*, ...)`` -> ``dpsk::ep::internode::combine``;
    launch wrappers keep the kernel they wrap: ``cutlass::device_kernel<ns::GemmKernel>(...)`` ->
    ``cutlass::device_kernel<ns::GemmKernel>``. Names that are not C++ signatures
    (``Memcpy DtoD (Device -> Device)``, ``rotary_kernel``) are returned unchanged.
    """
    s = name.strip()
    if ("(" not in s and "<" not in s) or s.startswith(("Memcpy", "Memset")):
        return s
    s = s.replace("(anonymous namespace)", "{anon}")
    # Peel nested templates from the inside out; lambdas like {lambda()#1} go with them.
    bare, prev = s, None
    while prev != bare:
        prev = bare
        bare = _TEMPLATE_RE.sub("", bare)
    bare = bare.split("(", 1)[0].strip()
    if bare.startswith("void "):
        bare = bare[5:]
    bare = bare.split(" ")[-1] if " " in bare else bare
    if bare in _WRAPPERS:
        at = s.find(bare + "<")
        if at >= 0:
            inner = _first_template_arg(s, at + len(bare))
            bare = f"{bare}<{short_kernel_name(inner.replace('{anon}', '(anonymous namespace)'))}>"
    return bare.replace("{anon}", "(anonymous)") or name


def kernel_label(name: str) -> str:
    """A record's name for one-line summaries and timeline bars: the bare kernel name (namespaces
    make a line unreadable), a launch wrapper's wrapped kernel (``cutlass::device_kernel<ns::GemmKernel>``
    -> ``ns::GemmKernel``), copy and memset records as the profiler names them."""
    short = short_kernel_name(name)
    if "<" in short:  # a launch wrapper: the wrapped kernel says more
        short = short[short.index("<") + 1:].rstrip(">")
    parts = [p for p in short.split("::") if p]
    return (parts[-2] + "::" + parts[-1]) if len(parts) >= 2 and parts[-1] in ("GemmKernel", "Kernel") else parts[-1]


def _natural_key(v: Any) -> tuple:
    """Sort "cuda:10" after "cuda:2" and stream 27 after stream 7."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(v)))


def _lane_key(lane: tuple) -> tuple:
    return (_natural_key(lane[0]), _natural_key(lane[1]))


def _sms_of(event: TraceEvent, num_sms: int | None) -> tuple[int | None, bool | None]:
    if event.kind == "memcpy":
        return 0, True  # copy engines, no SM
    blocks = event.blocks
    if blocks is None:
        return None, None
    if num_sms is None:
        return blocks, None
    return min(blocks, num_sms), blocks <= num_sms


def _select_events(trace: Trace, source: str, classifier: Classifier) -> tuple[str, list[tuple[TraceEvent, str]]]:
    gpu = trace.gpu_events
    if source == "gpu" or (source == "auto" and gpu):
        return "gpu", [(e, classifier.classify(e)) for e in gpu]
    picked = []
    for e in trace.cpu_events:
        cls = classifier.classify(e)
        if e.kind == "annotation" and cls != COMM:
            continue  # user ranges (ProfilerStep#N, model sections) would cover everything
        picked.append((e, cls))
    return "cpu", picked


def _mode_weighted(weights: dict) -> int | None:
    return max(weights.items(), key=lambda kv: (kv[1], kv[0]))[0] if weights else None


def analyze_trace(trace: Trace | str | os.PathLike | dict | list, *, classifier: Classifier | None = None,
                  comm: Iterable[str] = (), compute: Iterable[str] = (), num_sms: int | None = None,
                  source: str = "auto", wait_baseline_us: dict | None = None) -> TraceAnalysis:
    """Analyse a trace (a :class:`Trace`, a path, or parsed JSON); see the module docstring.

    ``comm``/``compute`` add classification regexes (ignored when ``classifier`` is given);
    ``num_sms`` overrides the SM count read from the trace's ``deviceProperties``;
    ``source`` picks ``"gpu"`` or ``"cpu"`` events (``"auto"``: GPU if the trace has any);
    ``wait_baseline_us``: fastest durations of comm kernels from other traces (e.g. every rank's,
    :func:`overlap.profiling.breakdown.kernel_minima`) for the ``comm_wait_us`` estimate.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if num_sms is not None and (not isinstance(num_sms, int) or num_sms < 1):
        raise ValueError(f"num_sms must be a positive int or None, got {num_sms!r}")
    if classifier is None:
        classifier = Classifier(comm=comm, compute=compute)
    elif not isinstance(classifier, Classifier):
        raise TypeError(f"classifier must be a Classifier, got {type(classifier).__name__}")
    trace = load_trace(trace)
    mode, classified = _select_events(trace, source, classifier)
    if not classified:
        raise ValueError(f"trace {trace.path or '<in memory>'} has no {mode.upper()} events to analyse "
                         f"(source={source!r})")

    by_lane: dict[tuple, list[tuple[TraceEvent, str]]] = collections.defaultdict(list)
    for e, cls in classified:
        by_lane[e.lane].append((e, cls))

    streams: list[StreamStats] = []
    lane_intervals: dict[tuple, tuple[list, list]] = {}
    for lane in sorted(by_lane, key=_lane_key):
        evs = by_lane[lane]
        comm_u = iv.union((e.ts, e.end) for e, c in evs if c == COMM)
        all_u = iv.union((e.ts, e.end) for e, _ in evs)
        comp_u = iv.union((e.ts, e.end) for e, c in evs if c == COMPUTE)
        if mode == "cpu":
            comp_u = iv.subtract(comp_u, comm_u)   # nested CPU ops: the enclosing comm op owns the time
        lane_intervals[lane] = (comm_u, comp_u)
        streams.append(StreamStats(device=lane[0], stream=lane[1], label=trace.lane_name(lane),
                                   num_events=len(evs), num_comm=sum(c == COMM for _, c in evs),
                                   busy_us=iv.total(all_u), comm_us=iv.total(comm_u), compute_us=iv.total(comp_u)))

    devices: list[DeviceStats] = []
    exposed_intervals: dict[str, list] = {}
    compute_intervals: dict[str, list] = {}
    for dev in sorted({lane[0] for lane in by_lane}, key=_natural_key):
        lanes = [lane for lane in lane_intervals if lane[0] == dev]
        comm_u = iv.union(x for lane in lanes for x in lane_intervals[lane][0])
        comp_u = iv.union(x for lane in lanes for x in lane_intervals[lane][1])
        evs = [(e, c) for lane in lanes for e, c in by_lane[lane]]
        comm_us, overlapped = iv.total(comm_u), iv.total(iv.intersect(comm_u, comp_u))
        exposed_u = iv.subtract(comm_u, comp_u)
        exposed_intervals[dev], compute_intervals[dev] = exposed_u, comp_u
        span = max(e.end for e, _ in evs) - min(e.ts for e, _ in evs)
        dev_sms = num_sms if num_sms is not None else trace.num_sms(dev)
        stats = DeviceStats(
            device=dev, device_name=trace.device_name(dev), num_sms=dev_sms, num_events=len(evs),
            num_comm=sum(c == COMM for _, c in evs), span_us=span,
            busy_us=iv.total(iv.union((e.ts, e.end) for e, _ in evs)), comm_us=comm_us,
            compute_us=iv.total(comp_u), overlapped_us=overlapped, exposed_us=iv.total(exposed_u),
            overlap_share=overlapped / comm_us if comm_us > 0 else None,
            exposed_share_of_span=iv.total(exposed_u) / span if span > 0 else None)
        if mode == "gpu":
            _sm_figures(stats, evs, dev_sms, comm_u)
            _breakdown_figures(stats, breakdown_events(dev, evs, comp_u, baseline_us=wait_baseline_us))
        devices.append(stats)

    kernels = _kernel_table(classified, {d.device: d.num_sms for d in devices})
    start = min((e.ts for e, _ in classified), default=0.0)
    return TraceAnalysis(source=trace.path, mode=mode, devices=devices, streams=streams, kernels=kernels,
                         lane_intervals=lane_intervals, exposed_intervals=exposed_intervals,
                         compute_intervals=compute_intervals,
                         classified=classified, start_us=start)


def _breakdown_figures(stats: DeviceStats, b) -> None:
    for name in BREAKDOWN_FIGURES:
        setattr(stats, name, getattr(b, name))


def analyze_ranks(traces: Sequence, **kwargs) -> list[TraceAnalysis]:
    """:func:`analyze_trace` of one trace per rank, with one wait baseline for all of them.

    A hook kernel that waited for a lagging peer in every launch has no fast launch of its own
    to compare with; the fastest launch of the same kernel on any rank is the baseline instead
    (``comm_wait_us``). ``kwargs`` go to :func:`analyze_trace`.
    """
    if "wait_baseline_us" in kwargs:
        raise TypeError("analyze_ranks computes wait_baseline_us itself (from every rank's trace)")
    analyses = [analyze_trace(t, **kwargs) for t in traces]
    gpu = [a for a in analyses if a.mode == "gpu"]
    baseline = kernel_minima(a.classified for a in gpu)
    for a in gpu:
        for d in a.devices:
            _breakdown_figures(d, comm_breakdown(a, d.device, baseline_us=baseline))
    return analyses


def _sm_figures(stats: DeviceStats, evs: Sequence[tuple[TraceEvent, str]], num_sms: int | None,
                comm_u: list) -> None:
    """Time-weighted SM occupancy per class, and of the compute that runs beside comm."""
    weights = {COMM: collections.Counter(), COMPUTE: collections.Counter()}
    beside_comm: collections.Counter = collections.Counter()
    starts = [s for s, _ in comm_u]
    for e, cls in evs:
        if e.kind != "kernel":
            continue
        sms, _ = _sms_of(e, num_sms)
        if sms is None:
            continue
        weights[cls][sms] += e.dur
        if cls == COMPUTE:
            beside_comm[sms] += iv.covered_length(e.ts, e.end, comm_u, starts)
    for cls, w in weights.items():
        tot = sum(w.values())
        mean = sum(k * v for k, v in w.items()) / tot if tot > 0 else None
        setattr(stats, f"{cls}_mean_sms", mean)
        setattr(stats, f"{cls}_sms_mode", _mode_weighted({k: v for k, v in w.items() if v > 0}))
    stats.compute_sms_under_comm_mode = _mode_weighted({k: v for k, v in beside_comm.items() if v > 0})


def _kernel_table(classified: Sequence[tuple[TraceEvent, str]], num_sms: dict) -> list[KernelStats]:
    groups: dict[tuple, list[TraceEvent]] = collections.defaultdict(list)
    classes: dict[tuple, str] = {}
    for e, cls in classified:
        key = (e.device, e.stream, e.name, e.grid, e.block)
        groups[key].append(e)
        classes[key] = cls
    out = []
    for key, evs in groups.items():
        e0 = evs[0]
        durs = [e.dur for e in evs]
        sms, single = _sms_of(e0, num_sms.get(e0.device))
        out.append(KernelStats(
            device=e0.device, stream=e0.stream, name=e0.name,
            short_name=short_kernel_name(e0.name) if e0.kind == "kernel" else e0.name,
            cls=classes[key], kind=e0.kind, count=len(evs), total_us=sum(durs), mean_us=sum(durs) / len(durs),
            max_us=max(durs), grid=e0.grid, block=e0.block, blocks=e0.blocks,
            threads_per_block=e0.threads_per_block, sms=sms, single_wave=single,
            registers=e0.registers, shared_mem=e0.shared_mem))
    out.sort(key=lambda k: (-k.total_us, k.name))
    return out


def trace_meta(trace_path: str, analysis: TraceAnalysis, trace: Trace | None = None) -> dict[str, Any]:
    """Facts about the analysed trace itself (device, rank, world size) for results metadata."""
    meta: dict[str, Any] = {"trace_file": os.path.basename(trace_path), "trace_mode": analysis.mode}
    if analysis.devices:
        meta["trace_device"] = analysis.devices[0].device_name
        meta["trace_num_sms"] = analysis.devices[0].num_sms
    if trace is not None and trace.distributed_info:
        meta["trace_rank"] = trace.distributed_info.get("rank")
        meta["trace_world_size"] = trace.distributed_info.get("world_size")
        meta["trace_backend"] = trace.distributed_info.get("backend")
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m overlap.profiling.analyze",
                                description="Communication/computation overlap in a PyTorch-profiler trace.")
    p.add_argument("trace", help="Chrome trace JSON (optionally gzipped)")
    p.add_argument("--png", help="write a timeline PNG here")
    p.add_argument("--json", help="write a results file (DESIGN.md section 5 format) here")
    p.add_argument("--sms", type=int, default=None, help="SMs per device (default: from the trace)")
    p.add_argument("--source", choices=SOURCES, default="auto", help="analyse GPU or CPU events")
    p.add_argument("--comm", action="append", default=[], metavar="REGEX", help="extra comm kernel pattern")
    p.add_argument("--compute", action="append", default=[], metavar="REGEX",
                   help="extra compute kernel pattern (wins over --comm)")
    p.add_argument("--top", type=int, default=15, help="kernels in the printed table")
    p.add_argument("--study", default="trace_analysis", help="meta.study of the results file")
    p.add_argument("--world-size", type=int, default=1, help="meta.world_size of the results file")
    p.add_argument("--note", default=None, help="free text stored as meta.note")
    p.add_argument("--title", default=None, help="timeline title")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("START_US", "END_US"),
                   help="timeline x-range, microseconds from the trace's first event")
    return p


def main(argv: Sequence[str] | None = None, command: str | None = None) -> TraceAnalysis:
    """CLI entry point; returns the analysis (so wrappers can reuse it)."""
    args = build_parser().parse_args(argv)
    if args.sms is not None and args.sms < 1:
        raise SystemExit(f"--sms must be positive, got {args.sms}")
    if args.window is not None and not args.png:
        raise SystemExit("--window sets the timeline's x-range: pass --png too")
    if args.window is not None and args.window[1] <= args.window[0]:
        raise SystemExit(f"--window needs START_US < END_US, got {args.window[0]:g} {args.window[1]:g}")
    trace = load_trace(args.trace)
    analysis = analyze_trace(trace, comm=args.comm, compute=args.compute, num_sms=args.sms, source=args.source)
    print(analysis.summary(top=args.top))
    if args.png:
        from overlap.profiling.timeline import plot_timeline

        plot_timeline(analysis, args.png, title=args.title, window_us=args.window)
        print(f"\ntimeline: {args.png}")
    if args.json:
        from overlap.bench import make_meta, write_results

        extra = trace_meta(args.trace, analysis, trace)
        if args.note:
            extra["note"] = args.note
        if command is None:
            command = " ".join(["python -m overlap.profiling.analyze"] + list(sys.argv[1:] if argv is None else argv))
        meta = make_meta(args.study, args.world_size, command=command, **extra)
        write_results(args.json, meta, analysis.to_rows())
        print(f"results: {args.json}")
    return analysis


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so the classes it returns are the
    # ones the rest of the package (timeline.py) imports.
    from overlap.profiling.analyze import main as _main

    _main()
