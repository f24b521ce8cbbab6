"""Timing helpers and result records shared by every benchmark and experiment."""
from overlap.bench.records import environment_meta, git_state, make_meta, read_results, save_figure, write_results
from overlap.bench.timing import capture_graph, flush_l2, time_fn, time_graph_replay

__all__ = ["environment_meta", "git_state", "make_meta", "read_results", "save_figure", "write_results",
           "capture_graph", "flush_l2", "time_fn", "time_graph_replay"]
