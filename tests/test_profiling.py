"""Trace analyzer: synthetic traces with hand-computed overlap, and DeepSeek's published trace."""
import gzip
import json
import os
import random

import numpy as np
import pytest

from overlap.bench import read_results, write_results
from overlap.profiling import (COMM, COMPUTE, Classifier, analyze_trace, kernel_class, kernel_label, load_trace,
                               plot_timeline, short_kernel_name)
from overlap.profiling import analyze as analyze_mod
from overlap.profiling import intervals as iv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSEEK_TRACE = os.path.join(REPO, "..", "shared", "data", "deepseek_v3_train_ep64_trace.json")
needs_deepseek = pytest.mark.skipif(not os.path.exists(DEEPSEEK_TRACE),
                                    reason=f"DeepSeek's trace is absent ({os.path.normpath(DEEPSEEK_TRACE)})")


def kernel(name, ts, dur, stream, device=0, grid=(1, 1, 1), block=(128, 1, 1)):
    return {"ph": "X", "cat": "kernel", "name": name, "pid": device, "tid": stream, "ts": ts, "dur": dur,
            "args": {"device": device, "stream": stream, "grid": list(grid), "block": list(block)}}


def cpu_op(name, ts, dur, tid, pid=100, cat="cpu_op"):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": {}}


NCCL = "ncclDevKernel_AllToAll_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_kernel"


# ---------------------------------------------------------------- intervals

def _raster(intervals, n):
    m = np.zeros(n, dtype=bool)
    for s, e in intervals:
        m[int(s):int(e)] = True
    return m


def test_interval_algebra_matches_raster():
    rng = random.Random(1234)
    n = 300
    for _ in range(200):
        a = [(s, s + rng.randint(0, 40)) for s in (rng.randint(0, n - 41) for _ in range(rng.randint(0, 12)))]
        b = [(s, s + rng.randint(0, 40)) for s in (rng.randint(0, n - 41) for _ in range(rng.randint(0, 12)))]
        ua, ub = iv.union(a), iv.union(b)
        ma, mb = _raster(a, n), _raster(b, n)
        assert iv.total(ua) == ma.sum()
        assert all(x[1] < y[0] for x, y in zip(ua, ua[1:])), "union must be sorted and disjoint"
        assert iv.total(iv.intersect(ua, ub)) == (ma & mb).sum()
        assert iv.total(iv.subtract(ua, ub)) == (ma & ~mb).sum()
        q0 = rng.randint(0, n - 1)
        q1 = rng.randint(q0, n)
        assert iv.covered_length(q0, q1, ua) == ma[q0:q1].sum()


# ---------------------------------------------------------------- synthetic traces

def test_hand_computed_overlap_two_devices():
    events = [
        # device 0: compute [0,10) and [20,30) on stream 7, comm [5,25) on stream 27
        kernel(GEMM, 0, 10, 7), kernel(GEMM, 20, 10, 7), kernel(NCCL, 5, 20, 27, grid=(20, 1, 1)),
        # device 1: comm [2,4) entirely under compute [0,8)
        kernel(GEMM, 100, 8, 7, device=1), kernel(NCCL, 102, 2, 9, device=1),
    ]
    a = analyze_trace({"traceEvents": events})
    assert a.mode == "gpu" and [d.device for d in a.devices] == ["cuda:0", "cuda:1"]
    d0, d1 = a.devices
    assert (d0.comm_us, d0.compute_us, d0.overlapped_us, d0.exposed_us) == (20, 20, 10, 10)
    assert d0.overlap_share == pytest.approx(0.5)
    assert (d0.span_us, d0.busy_us) == (30, 30)
    assert d0.exposed_share_of_span == pytest.approx(10 / 30)
    assert (d1.comm_us, d1.overlapped_us, d1.exposed_us, d1.overlap_share) == (2, 2, 0, 1.0)
    assert a.overlap_share == pytest.approx(12 / 22)
    assert a.exposed_intervals["cuda:0"] == [(10.0, 20.0)]
    s27 = [s for s in a.streams if s.device == "cuda:0" and s.stream == 27][0]
    assert (s27.busy_us, s27.comm_us, s27.compute_us, s27.num_comm) == (20, 20, 0, 1)


def test_exposed_by_kernel_names_the_open_transfer():
    from overlap.profiling.analyze import short_kernel_name

    combine = "void overlap::intranode::combine_kernel<float, 16, 8>(int)"
    events = [kernel(GEMM, 0, 10, 7), kernel(NCCL, 2, 5, 27),      # NCCL hidden under the GEMM
              kernel(combine, 8, 10, 28), kernel(GEMM, 15, 10, 7)]  # combine: [10, 15) in the open
    a = analyze_trace({"traceEvents": events})
    by = a.exposed_by_kernel("cuda:0")
    assert by == {short_kernel_name(combine): 5.0, short_kernel_name(NCCL): 0.0}
    assert list(by)[0] == short_kernel_name(combine)
    with pytest.raises(KeyError, match="cuda:9"):
        a.exposed_by_kernel("cuda:9")


def test_overlap_share_of_a_subset_of_comm():
    """The EP kernels' share apart from a pipeline's NCCL send/recv that waits in the open."""
    dispatch = "void overlap::intranode::dispatch_kernel<8>(int)"
    events = [kernel(GEMM, 0, 10, 7), kernel(dispatch, 2, 6, 27), kernel(NCCL, 5, 20, 28)]
    a = analyze_trace({"traceEvents": events})
    assert a.overlap_share_of("cuda:0", lambda n: "nccl" not in n.lower()) == pytest.approx(1.0)
    assert a.overlap_share_of("cuda:0", lambda n: "nccl" in n.lower()) == pytest.approx(5 / 20)
    assert a.overlap_share_of("cuda:0", lambda n: False) is None
    assert a.devices[0].overlap_share == pytest.approx(8 / 23)   # all comm: [2, 25) against [0, 10)
    with pytest.raises(KeyError, match="cuda:3"):
        a.overlap_share_of("cuda:3", lambda n: True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_trace_matches_raster(seed):
    rng = random.Random(seed)
    n = 400
    names = {COMM: ["ncclDevKernel_SendRecv", "void deep_ep::intranode::dispatch<8>(int)", "overlap_combine_kernel"],
             COMPUTE: [GEMM, "void at::native::vectorized_elementwise_kernel<4>(int)"]}
    events, truth = [], []
    for device in range(2):
        for stream in (3, 7, 11):
            for _ in range(rng.randint(3, 10)):
                cls = rng.choice([COMM, COMPUTE])
                s = rng.randint(0, n - 60)
                dur = rng.randint(0, 50)
                events.append(kernel(rng.choice(names[cls]), s, dur, stream, device=device))
                truth.append((device, stream, cls, s, s + dur))
    a = analyze_trace({"traceEvents": events})
    for device in range(2):
        comm = np.zeros(n, bool)
        comp = np.zeros(n, bool)
        busy = np.zeros(n, bool)
        for stream in (3, 7, 11):
            lane_comm = _raster([(s, e) for d, st, c, s, e in truth if (d, st, c) == (device, stream, COMM)], n)
            lane_comp = _raster([(s, e) for d, st, c, s, e in truth if (d, st, c) == (device, stream, COMPUTE)], n)
            comm |= lane_comm
            # GPU events are never nested: where two overlap, even on one stream (the nodes of a
            # CUDA-graph replay may all be reported on the launch stream), both ran.
            comp |= lane_comp
            busy |= lane_comm | lane_comp
        d = a.device(f"cuda:{device}")
        assert d.comm_us == comm.sum()
        assert d.compute_us == comp.sum()
        assert d.busy_us == busy.sum()
        assert d.overlapped_us == (comm & comp).sum()
        assert d.exposed_us == (comm & ~comp).sum()
        assert d.exposed_us == pytest.approx(d.comm_us - d.overlapped_us)


def test_peer_copies_are_comm_local_copies_are_not():
    peer = {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy PtoP (Device -> Device)", "pid": 0, "tid": 5,
            "ts": 0, "dur": 10, "args": {"fromDevice": 0, "inDevice": 0, "toDevice": 1, "stream": 5, "bytes": 1 << 20}}
    dtod_peer = {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "pid": 0, "tid": 6,
                 "ts": 20, "dur": 10, "args": {"fromDevice": 0, "inDevice": 0, "toDevice": 3, "stream": 6}}
    local = {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "pid": 0, "tid": 7,
             "ts": 5, "dur": 20, "args": {"device": 0, "stream": 7, "bytes": 4096}}
    a = analyze_trace([peer, dtod_peer, local])
    d = a.devices[0]
    assert d.device == "cuda:0"
    assert (d.comm_us, d.compute_us, d.overlapped_us) == (20, 20, 10)
    by_stream = {k.stream: k for k in a.kernels}
    assert by_stream[5].cls == COMM and by_stream[6].cls == COMM and by_stream[7].cls == COMPUTE
    assert by_stream[5].sms == 0  # copy engines hold no SM


def test_sm_counts_cap_and_override():
    events = [kernel("persistent_overlap_dispatch", 0, 10, 1, grid=(20, 1, 1)),
              kernel(GEMM, 0, 10, 2, grid=(2, 56, 1)),
              kernel("void big_elementwise<4>(int)", 10, 30, 2, grid=(4096, 1, 1)),
              {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "pid": 0, "tid": 2, "ts": 50, "dur": 1,
               "args": {"device": 0, "stream": 2}}]
    trace = {"traceEvents": events, "deviceProperties": [{"id": 0, "name": "NVIDIA H200", "numSms": 132}]}
    a = analyze_trace(trace)
    k = {x.name: x for x in a.kernels}
    assert (k["persistent_overlap_dispatch"].sms, k["persistent_overlap_dispatch"].single_wave) == (20, True)
    assert k["persistent_overlap_dispatch"].cls == COMM
    assert (k[GEMM].blocks, k[GEMM].sms, k[GEMM].single_wave) == (112, 112, True)
    assert (k["void big_elementwise<4>(int)"].sms, k["void big_elementwise<4>(int)"].single_wave) == (132, False)
    assert k["Memset (Device)"].sms is None
    d = a.devices[0]
    assert (d.device_name, d.num_sms, d.comm_sms_mode, d.compute_sms_mode) == ("NVIDIA H200", 132, 20, 132)
    assert d.compute_mean_sms == pytest.approx((112 * 10 + 132 * 30) / 40)
    assert d.compute_sms_under_comm_mode == 112  # only the GEMM ran beside the comm kernel
    small = analyze_trace(trace, num_sms=16)
    k = {x.name: x for x in small.kernels}
    assert (k["persistent_overlap_dispatch"].sms, k[GEMM].sms, small.devices[0].num_sms) == (16, 16, 16)


def test_user_regexes_override_defaults():
    events = [kernel(GEMM, 0, 10, 7), kernel(NCCL, 5, 10, 27), kernel("my_custom_put_kernel", 20, 5, 27)]
    default = analyze_trace(events)
    assert default.devices[0].comm_us == 10
    custom = analyze_trace(events, comm=[r"custom_put"], compute=[r"^nccl"])
    assert custom.devices[0].comm_us == 5
    assert custom.devices[0].overlapped_us == 0
    only_user = Classifier(comm=["gemm"], use_defaults=False)
    assert only_user.classify(NCCL) == COMPUTE and only_user.classify(GEMM) == COMM


def test_cpu_trace_nesting_and_gloo_threads():
    events = [
        cpu_op("ProfilerStep#1", 0, 20, 1, cat="user_annotation"),  # must not count as work
        cpu_op("c10d::alltoall_base_", 0, 10, 1),
        cpu_op("aten::empty", 1, 1, 1),  # inside the collective: comm time, not compute
        cpu_op("gloo:all_to_all", 5, 10, 2, cat="user_annotation"),  # gloo's own thread
        cpu_op("aten::mm", 12, 8, 1),
    ]
    a = analyze_trace(events)
    assert a.mode == "cpu"
    d = a.devices[0]
    assert d.device == "cpu:100"
    assert (d.comm_us, d.compute_us, d.overlapped_us, d.exposed_us, d.span_us) == (15, 8, 3, 12, 20)
    # A subset of all comm covers the same compute: thread 1's matmul under gloo's thread-2 transfer.
    assert a.overlap_share_of("cpu:100", lambda n: True) == pytest.approx(d.overlap_share) == pytest.approx(3 / 15)
    assert d.comm_mean_sms is None
    names = {k.name for k in a.kernels}
    assert "ProfilerStep#1" not in names and "gloo:all_to_all" in names
    # The same trace with GPU kernels is analysed on the GPU side unless asked otherwise.
    mixed = events + [kernel(GEMM, 0, 4, 7)]
    assert analyze_trace(mixed).mode == "gpu"
    assert analyze_trace(mixed, source="cpu").devices[0].comm_us == 15


def test_loading_formats_and_errors(tmp_path):
    events = [kernel(GEMM, 0, 10, 7), kernel(NCCL, 5, 10, 27)]
    plain = tmp_path / "t.json"
    plain.write_text(json.dumps({"traceEvents": events}))
    gz = tmp_path / "t.pt.trace.json.gz"
    gz.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(events))
    shares = {p.name: analyze_trace(str(p)).overlap_share for p in (plain, gz, bare)}
    assert set(shares.values()) == {0.5}, shares
    assert load_trace(str(gz)).path == str(gz)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_trace(str(bad))
    with pytest.raises(ValueError, match="traceEvents"):
        load_trace({"events": []})
    with pytest.raises(TypeError, match="source"):
        load_trace(42)
    with pytest.raises(ValueError, match="comm: invalid regex"):
        Classifier(comm=["(unclosed"])
    with pytest.raises(TypeError, match="list of regex"):
        Classifier(compute="nccl")
    with pytest.raises(ValueError, match="num_sms"):
        analyze_trace(events, num_sms=0)
    with pytest.raises(ValueError, match="source must be"):
        analyze_trace(events, source="tpu")
    with pytest.raises(ValueError, match="no GPU events"):
        analyze_trace([cpu_op("aten::mm", 0, 1, 1)], source="gpu")


def test_kernel_labels():
    """One-line labels: bare kernel names, the wrapped kernel of a launch wrapper, copies as named."""
    assert kernel_label("void overlap::ll::(anonymous namespace)::dispatch_send_kernel("
                        "overlap::ll::DispatchSendParams)") == "dispatch_send_kernel"
    assert kernel_label("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<int> >(int)") == \
        "GemmUniversal"
    assert kernel_label("void cutlass::device_kernel<dpsk::grouped_gemm::cuda::fp8_ptp128c::GemmKernel>"
                        "(dpsk::grouped_gemm::cuda::fp8_ptp128c::GemmKernel::Params)") == "fp8_ptp128c::GemmKernel"
    assert kernel_label("Memcpy PtoP (Device -> Device)") == "Memcpy PtoP (Device -> Device)"
    assert kernel_label("rotary_kernel") == "rotary_kernel"


def test_short_kernel_names():
    assert short_kernel_name("void dpsk::ep::internode::combine<false, 8, __nv_bfloat16>(int4*, float*)") == \
        "dpsk::ep::internode::combine"
    assert short_kernel_name("void cutlass::device_kernel<dpsk::grouped_gemm::cuda::fp8_ptp128c::GemmKernel>"
                             "(dpsk::grouped_gemm::cuda::fp8_ptp128c::GemmKernel::Params)") == \
        "cutlass::device_kernel<dpsk::grouped_gemm::cuda::fp8_ptp128c::GemmKernel>"
    assert short_kernel_name("void (anonymous namespace)::elementwise_kernel_with_index<int, "
                             "at::native::arange_cuda_out(c10::Scalar const&)::{lambda()#1}>(int)") == \
        "(anonymous)::elementwise_kernel_with_index"
    assert short_kernel_name("rotary_kernel") == "rotary_kernel"
    assert short_kernel_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD (Device -> Device)"


@pytest.mark.parametrize("name,cls", [
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", COMM),
    ("void deep_ep::intranode::notify_dispatch<8>(int const*)", COMM),
    ("void deep_ep::intranode::cached_notify_combine<8>(void**)", COMM),
    ("void deep_ep::internode_ll::clean_low_latency_buffer<32>(int*)", COMM),
    ("void dpsk::ep::cuda::get_dispatch_layout<256, 32, 8>(long const*, int*)", COMPUTE),
    ("overlap_dispatch_kernel", COMM),
    ("c10d::allreduce_", COMM),
    ("gloo:all_to_all", COMM),
    ("record_param_comms", COMM),
    ("void c10d::symmetric_memory::one_shot_all_reduce_kernel<float, 8>(float**)", COMM),
    ("void at::native::reduce_kernel<512, 1>(at::native::ReduceOp<float>)", COMPUTE),
    ("void small_reduce_kernel<float>(float*)", COMPUTE),
    ("flash_fwd_splitkv_combine_kernel", COMPUTE),
    ("void at::native::dispatcher_helper<4>(int)", COMPUTE),
    ("aten::mm", COMPUTE),
    (GEMM, COMPUTE),
])
def test_default_classification(name, cls):
    assert kernel_class(name) == cls


# ---------------------------------------------------------------- DeepSeek's trace

@pytest.fixture(scope="module")
def deepseek():
    return analyze_trace(DEEPSEEK_TRACE)


@needs_deepseek
def test_deepseek_trace_overlap(deepseek):
    a = deepseek
    assert a.mode == "gpu" and len(a.devices) == 1
    d = a.devices[0]
    assert (d.device, d.device_name, d.num_sms) == ("cuda:0", "NVIDIA H800", 132)
    # Internal consistency.
    assert 0 < d.overlapped_us <= min(d.comm_us, d.compute_us)
    assert d.exposed_us == pytest.approx(d.comm_us - d.overlapped_us)
    assert max(d.comm_us, d.compute_us) <= d.busy_us <= d.span_us
    assert d.busy_us <= d.comm_us + d.compute_us
    assert sum(s.busy_us for s in a.streams) >= d.busy_us
    assert sum(k.count for k in a.kernels) == d.num_events
    # DeepSeek reported 96.3% of comm overlapped and 3.2% of the step exposed; a ~129 ms window.
    assert 120e3 < d.span_us < 140e3
    assert d.overlap_share == pytest.approx(0.963, abs=0.005)
    assert d.exposed_share_of_span == pytest.approx(0.032, abs=0.005)
    comm_streams = {s.stream for s in a.streams if s.comm_us > 0}
    assert comm_streams == {27}


@needs_deepseek
def test_deepseek_trace_kernels_and_sms(deepseek):
    comm = [k for k in deepseek.kernels if k.cls == COMM]
    assert {k.short_name for k in comm} == {f"dpsk::ep::internode::{n}" for n in
                                            ("dispatch", "combine", "notify_dispatch", "cached_notify")}
    for k in comm:
        assert k.grid is not None and k.single_wave
        assert k.sms == (9 if k.short_name.endswith("notify_dispatch") else 20), k.short_name
    gemms = [k for k in deepseek.kernels if "grouped_gemm" in k.name and "GemmKernel" in k.name]
    assert gemms and all(k.cls == COMPUTE for k in gemms)
    assert {k.blocks for k in gemms} == {112}
    layout = [k for k in deepseek.kernels if "get_dispatch_layout" in k.name]
    assert layout and layout[0].cls == COMPUTE
    d = deepseek.devices[0]
    assert (d.comm_sms_mode, d.compute_sms_mode, d.compute_sms_under_comm_mode) == (20, 112, 112)
    assert 9 <= d.comm_mean_sms <= 20


@needs_deepseek
def test_deepseek_rows_summary_and_timeline(deepseek, tmp_path):
    rows = deepseek.to_rows()
    ops = [r["op"] for r in rows]
    assert ops.count("trace_device") == 1 and ops.count("trace_stream") == 3
    assert ops.count("trace_kernel") == len(deepseek.kernels)
    dev = rows[0]
    assert dev["overlap_pct"] == pytest.approx(100 * deepseek.devices[0].overlap_share, abs=1e-3)
    path = write_results(str(tmp_path / "r.json"), {"study": "trace_analysis", "world_size": 1}, rows)
    assert read_results(path)["rows"][0]["op"] == "trace_device"
    text = deepseek.summary(top=5)
    assert "96.3%" in text and "dpsk::ep::internode::combine" in text
    png = plot_timeline(deepseek, str(tmp_path / "t.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 20_000


def test_cli_timeline_window(tmp_path, capsys):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": [kernel(GEMM, 0, 10, 7), kernel(NCCL, 5, 10, 27)]}))
    png = str(tmp_path / "w.png")
    analyze_mod.main([str(trace), "--png", png, "--window", "2", "12"])
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="--window needs START_US < END_US"):
        analyze_mod.main([str(trace), "--png", png, "--window", "5", "5"])
    with pytest.raises(SystemExit, match="pass --png too"):
        analyze_mod.main([str(trace), "--window", "2", "12"])


@needs_deepseek
def test_deepseek_cli(tmp_path, capsys):
    out_json, out_png = str(tmp_path / "d.json"), str(tmp_path / "d.png")
    analyze_mod.main([DEEPSEEK_TRACE, "--json", out_json, "--png", out_png, "--sms", "132", "--top", "3",
                      "--note", "test"])
    printed = capsys.readouterr().out
    assert "overlapped by compute" in printed and "top 3 kernels" in printed
    data = read_results(out_json)
    meta = data["meta"]
    assert (meta["study"], meta["world_size"], meta["note"]) == ("trace_analysis", 1, "test")
    assert (meta["trace_device"], meta["trace_rank"], meta["trace_world_size"]) == ("NVIDIA H800", 0, 64)
    assert os.path.getsize(out_png) > 20_000
