"""CPU checks of small shared helpers: time_fn's after_each hook and temporary_env."""
import os

from overlap.bench import time_fn
from overlap.testing.env import temporary_env


def test_time_fn_runs_after_each_once_per_timed_call():
    events = []
    result = time_fn(lambda: events.append("call"), warmup=2, iters=3, flush=False,
                     after_each=lambda: events.append("after"))
    assert events == ["call"] * 2 + ["call", "after"] * 3
    assert result["iters"] == 3


def test_temporary_env_sets_and_restores(monkeypatch):
    monkeypatch.setenv("OVERLAP_TEST_SET", "old")
    monkeypatch.delenv("OVERLAP_TEST_UNSET", raising=False)
    try:
        with temporary_env({"OVERLAP_TEST_SET": "new", "OVERLAP_TEST_UNSET": "1"}):
            assert os.environ["OVERLAP_TEST_SET"] == "new" and os.environ["OVERLAP_TEST_UNSET"] == "1"
            raise KeyError("inside")
    except KeyError:
        pass
    assert os.environ["OVERLAP_TEST_SET"] == "old"
    assert "OVERLAP_TEST_UNSET" not in os.environ
