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


def test_device_time_by_name_sums_device_records_per_replay():
    from types import SimpleNamespace

    import torch

    from overlap.bench.timing import device_time_by_name

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def evt(name, us, kind=cuda):
        return SimpleNamespace(name=name, device_time_total=us, device_type=kind)

    prof = SimpleNamespace(events=lambda: [
        evt("void overlap::ll::(anonymous namespace)::pack_kernel<int>(P)", 10.0),
        evt("Memcpy PtoP (Device -> Device)", 30.0), evt("Memcpy PtoP (Device -> Device)", 34.0),
        evt("cudaGraphLaunch", 500.0, cpu),   # host records are not device time
        evt("void overlap::ll::(anonymous namespace)::pack_kernel<int>(P)", 14.0),
        evt("hook_kernel", 5.0), evt("hook_kernel", 6.0), evt("hook_kernel", 9000.0)])   # one stalled record
    got = device_time_by_name(prof, per=2)
    assert got == "Memcpy PtoP (Device -> Device)=32.0us x1; pack_kernel=12.0us x1; hook_kernel=9.0us x1.5", got


def test_environment_meta_records_overlap_knobs(monkeypatch):
    from overlap.bench.records import environment_meta

    monkeypatch.setenv("OVERLAP_TRITON_SEND_FRACTION", "0.5")
    monkeypatch.setenv("OVERLAP_GIT_COMMIT", "abc")   # recorded as meta.commit, not as a knob
    assert "OVERLAP_TRITON_SEND_FRACTION=0.5" in environment_meta()["overlap_env"].split()
    assert "OVERLAP_GIT_COMMIT" not in environment_meta()["overlap_env"]


def test_replay_timeline_gives_median_offsets_from_each_replays_first_record():
    from types import SimpleNamespace

    import torch

    from overlap.bench.timing import replay_timeline

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def evt(name, start, end, kind=cuda):
        return SimpleNamespace(name=name, device_type=kind, time_range=SimpleNamespace(start=start, end=end))

    prof = SimpleNamespace(events=lambda: [
        evt("pack_kernel", 100.0, 110.0), evt("Memcpy PtoP (Device -> Device)", 113.0, 119.0),
        evt("hook_kernel", 121.0, 135.0), evt("cudaGraphLaunch", 90.0, 140.0, cpu),
        evt("pack_kernel", 200.0, 212.0), evt("Memcpy PtoP (Device -> Device)", 215.0, 221.0),
        evt("hook_kernel", 223.0, 235.0)])
    got = replay_timeline(prof, per=2)
    assert got == ("pack_kernel@0.0-11.0; Memcpy PtoP (Device -> Device)@14.0-20.0; hook_kernel@22.0-35.0"), got
    assert replay_timeline(prof, per=4).startswith("unavailable: 6 device records")
    # Records of two streams that start together may swap places between replays: they pair by name.
    swapped = SimpleNamespace(events=lambda: [
        evt("pack_kernel", 100.0, 110.0), evt("hook_kernel", 113.0, 130.0), evt("Memcpy PtoP", 113.5, 119.0),
        evt("pack_kernel", 200.0, 210.0), evt("Memcpy PtoP", 212.5, 219.0), evt("hook_kernel", 213.0, 232.0)])
    assert replay_timeline(swapped, per=2) == "pack_kernel@0.0-10.0; hook_kernel@13.0-31.0; Memcpy PtoP@13.0-19.0"
    other = SimpleNamespace(events=lambda: [evt("pack_kernel", 0.0, 1.0), evt("hook_kernel", 2.0, 3.0),
                                            evt("pack_kernel", 10.0, 11.0), evt("combine_kernel", 12.0, 13.0)])
    assert replay_timeline(other, per=2).startswith("unavailable: the 2 profiled replays recorded different")
