"""Load a Chrome-format trace (as written by the PyTorch profiler / Kineto) into plain events.

Only complete events (``"ph": "X"``) that occupy a stream or a thread are kept:

* GPU activity: categories ``kernel``, ``gpu_memcpy``, ``gpu_memset`` (older Kineto wrote
  ``Kernel``, ``Memcpy``, ``Memset``). Their lane is the CUDA stream, their device the GPU.
* CPU activity: ``cpu_op`` (older: ``Operator``) and ``user_annotation`` (record_function
  ranges, which is also how gloo labels its collectives, e.g. ``gloo:all_to_all`` on a
  ``pt_gloo_runloop`` thread). Their lane is the thread, their device ``cpu:<pid>``.

``gpu_user_annotation`` ranges are dropped on purpose: they mirror CPU annotations onto GPU
streams and would count the same time twice. Timestamps and durations are microseconds, as
in the file.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

GPU_KINDS = {"kernel": "kernel", "gpu_memcpy": "memcpy", "memcpy": "memcpy",
             "gpu_memset": "memset", "memset": "memset"}
CPU_KINDS = {"cpu_op": "cpu_op", "operator": "cpu_op", "user_annotation": "annotation"}


@dataclass(frozen=True)
class TraceEvent:
    """One GPU kernel/copy/memset or one CPU op/annotation, normalised.

    ``device`` is ``"cuda:<id>"`` for GPU work and ``"cpu:<pid>"`` for host work; ``stream``
    is the CUDA stream id (GPU) or the thread id (CPU). Launch geometry and resource fields
    are ``None`` when the profiler did not record them (copies, memsets, CPU ops).
    """

    name: str
    kind: str  # "kernel" | "memcpy" | "memset" | "cpu_op" | "annotation"
    device: str
    stream: Any
    pid: Any
    tid: Any
    ts: float
    dur: float
    grid: tuple[int, int, int] | None = None
    block: tuple[int, int, int] | None = None
    registers: int | None = None
    shared_mem: int | None = None
    bytes: int | None = None
    src_device: int | None = None
    dst_device: int | None = None
    correlation: int | None = None

    @property
    def end(self) -> float:
        return self.ts + self.dur

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("kernel", "memcpy", "memset")

    @property
    def lane(self) -> tuple[str, Any]:
        """The (device, stream-or-thread) pair the event ran on."""
        return (self.device, self.stream)

    @property
    def blocks(self) -> int | None:
        """Thread blocks (CTAs) in the launch grid."""
        return None if self.grid is None else math.prod(self.grid)

    @property
    def threads_per_block(self) -> int | None:
        return None if self.block is None else math.prod(self.block)

    @property
    def is_peer_copy(self) -> bool:
        """A copy whose source and destination are different GPUs (NVLink/PCIe traffic)."""
        return (self.kind == "memcpy" and self.src_device is not None and self.dst_device is not None
                and self.src_device != self.dst_device)


@dataclass
class Trace:
    """The events of one trace file plus what it says about its devices and its run."""

    events: list[TraceEvent]
    path: str | None = None
    device_properties: dict[str, dict] = field(default_factory=dict)
    distributed_info: dict = field(default_factory=dict)
    lane_names: dict[tuple[str, Any], str] = field(default_factory=dict)

    @property
    def gpu_events(self) -> list[TraceEvent]:
        return [e for e in self.events if e.is_gpu]

    @property
    def cpu_events(self) -> list[TraceEvent]:
        return [e for e in self.events if not e.is_gpu]

    def num_sms(self, device: str) -> int | None:
        """SM count of ``device`` from the trace's ``deviceProperties``, if recorded."""
        props = self.device_properties.get(device) or {}
        n = props.get("numSms")
        return int(n) if n else None

    def device_name(self, device: str) -> str | None:
        return (self.device_properties.get(device) or {}).get("name")

    def lane_name(self, lane: tuple[str, Any]) -> str:
        if lane in self.lane_names:
            return self.lane_names[lane]
        device, stream = lane
        return f"stream {stream}" if device.startswith("cuda") else f"thread {stream}"


def read_trace_json(path: str | os.PathLike) -> Any:
    """Parse a trace file, gzipped or not (detected from the content, not the name)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"trace file {path!r} is not valid JSON: {exc}") from exc


def _int_or_none(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _dim3(v: Any) -> tuple[int, int, int] | None:
    if not isinstance(v, (list, tuple)) or not v:
        return None
    dims = [int(x) for x in v][:3]
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def _normalise(ev: dict) -> TraceEvent | None:
    if ev.get("ph") != "X":
        return None
    cat = str(ev.get("cat", "")).lower()
    ts, dur = ev.get("ts"), ev.get("dur")
    if ts is None or dur is None:
        return None
    ts, dur = float(ts), float(dur)
    if dur < 0:
        return None
    args = ev.get("args") or {}
    name = str(ev.get("name", ""))
    pid, tid = ev.get("pid"), ev.get("tid")
    if cat in GPU_KINDS:
        kind = GPU_KINDS[cat]
        # Peer copies carry fromDevice/inDevice/toDevice instead of "device".
        dev = args.get("device", args.get("inDevice", pid))
        stream = args.get("stream", tid)
        return TraceEvent(
            name=name, kind=kind, device=f"cuda:{dev}", stream=stream, pid=pid, tid=tid, ts=ts, dur=dur,
            grid=_dim3(args.get("grid")), block=_dim3(args.get("block")),
            registers=_int_or_none(args.get("registers per thread")),
            shared_mem=_int_or_none(args.get("shared memory")),
            bytes=_int_or_none(args.get("bytes")),
            src_device=_int_or_none(args.get("fromDevice", args.get("src device"))),
            dst_device=_int_or_none(args.get("toDevice", args.get("dst device"))),
            correlation=_int_or_none(args.get("correlation")),
        )
    if cat in CPU_KINDS:
        return TraceEvent(name=name, kind=CPU_KINDS[cat], device=f"cpu:{pid}", stream=tid, pid=pid, tid=tid,
                          ts=ts, dur=dur, correlation=_int_or_none(args.get("External id")))
    return None


def _lane_names(raw_events: Iterable[dict], events: list[TraceEvent]) -> dict[tuple[str, Any], str]:
    thread_names: dict[tuple[Any, Any], str] = {}
    for ev in raw_events:
        if ev.get("ph") == "M" and ev.get("name") == "thread_name":
            label = str((ev.get("args") or {}).get("name", "")).strip()
            # Kineto may name one thread twice ("python", then the real one); keep the more specific.
            key = (ev.get("pid"), ev.get("tid"))
            if label and (key not in thread_names or thread_names[key].endswith("(python)")):
                thread_names[key] = label
    names: dict[tuple[str, Any], str] = {}
    for e in events:
        if e.lane in names:
            continue
        if e.is_gpu:
            names[e.lane] = f"stream {e.stream}"
        else:
            names[e.lane] = thread_names.get((e.pid, e.tid), f"thread {e.tid}")
    return names


def load_trace(source: Any) -> Trace:
    """Load a trace from a path (``.json`` or gzipped), a parsed dict, or a bare event list.

    Returns a :class:`Trace` whose events are sorted by start time. Raises ``ValueError`` when
    the content is not a Chrome trace, ``TypeError`` for an unsupported ``source`` type.
    """
    path = None
    if isinstance(source, Trace):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        data = read_trace_json(path)
    elif isinstance(source, (dict, list)):
        data = source
    else:
        raise TypeError(f"source must be a path, a dict or a list of events, got {type(source).__name__}")
    if isinstance(data, list):
        data = {"traceEvents": data}
    raw_events = data.get("traceEvents") if isinstance(data, dict) else None
    if not isinstance(raw_events, list):
        where = f" {path!r}" if path else ""
        raise ValueError(f"source{where} is not a Chrome trace: no 'traceEvents' list")
    events = [e for e in (_normalise(ev) for ev in raw_events if isinstance(ev, dict)) if e is not None]
    events.sort(key=lambda e: (e.ts, -e.dur))
    props = {}
    for p in data.get("deviceProperties") or []:
        if isinstance(p, dict) and "id" in p:
            props[f"cuda:{p['id']}"] = p
    return Trace(events=events, path=path, device_properties=props,
                 distributed_info=dict(data.get("distributedInfo") or {}),
                 lane_names=_lane_names(raw_events, events))
