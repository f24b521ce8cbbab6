"""Trace capture per rank and trace analysis: comm/compute overlap, exposed comm, SMs per kernel.

* :func:`capture_trace` — torch.profiler around a callable, one Chrome trace per rank;
* :func:`load_trace` — read any PyTorch-profiler / Chrome trace (optionally gzipped);
* :class:`Classifier` — communication vs compute by kernel/op name, with user regexes;
* :func:`analyze_trace` — per-stream busy time, overlap share, exposed comm, grid/SMs per kernel;
* :func:`comm_breakdown` — comm split into zero-SM transfers, SM-holding comm kernels, waiting, idle;
* :func:`plot_timeline` — a timeline PNG, one lane per stream.

CLI: ``python -m overlap.profiling.analyze TRACE [--png out.png] [--json out.json] [--sms 132]``.
"""
import importlib

# Names resolve lazily (PEP 562) so `python -m overlap.profiling.analyze` does not find its own
# module already imported by the package, and importing the package stays cheap.
_EXPORTS = {
    "analyze": ("DeviceStats", "KernelStats", "StreamStats", "TraceAnalysis", "analyze_ranks", "analyze_trace",
                "kernel_label", "short_kernel_name"),
    "breakdown": ("CommBreakdown", "comm_breakdown", "kernel_minima"),
    "capture": ("capture_trace", "trace_path"),
    "classify": ("COMM", "COMPUTE", "Classifier", "kernel_class"),
    "timeline": ("plot_timeline",),
    "trace": ("Trace", "TraceEvent", "load_trace"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"overlap.profiling.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'overlap.profiling' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
