"""Schedules, op vocabulary, simulator and drawing: pure Python, no processes."""
import random

import pytest

from overlap.pipeline import ops as O
from overlap.pipeline.comm import ACTIVATION, GRADIENT, transfer_plan
from overlap.pipeline.schedules import (SCHEDULES, Chain, Schedule, bidirectional_rank_ops, build_schedule,
                                        check_schedule)
from overlap.pipeline.simulator import (Durations, Timeline, dependency_violations, published_activations,
                                        published_bubble, simulate, simulate_timeline)

# (name, rank counts, chunk counts as functions of the rank count)
GRID = [
    ("1f1b", [1, 2, 3, 4, 5, 8], [lambda n: 1, lambda n: n, lambda n: 2 * n + 3]),
    ("zb1p", [1, 2, 3, 4, 5, 8], [lambda n: 1, lambda n: n, lambda n: 2 * n + 3]),
    ("dualpipe", [2, 4, 6, 8], [lambda n: 2 * n, lambda n: 2 * n + 2, lambda n: 4 * n]),
    ("dualpipev", [1, 2, 3, 4, 5], [lambda n: 2 * n, lambda n: 2 * n + 1, lambda n: 4 * n]),
]


def _configs():
    for name, ranks, chunk_fns in GRID:
        for n in ranks:
            for fn in chunk_fns:
                yield name, n, fn(n)


def test_op_labels_round_trip():
    ops = [O.F(0, 3), O.B(1, 0), O.b(0, 12), O.W(), O.FB(0, 3, 1, 2)]
    labels = O.format_trace(ops)
    assert labels == ["F0.3", "B1.0", "b0.12", "W", "[F0.3&B1.2]"]
    assert O.parse_trace(labels) == ops
    assert O.FB(0, 3, 1, 2).forward_part() == O.F(0, 3)
    assert O.FB(0, 3, 1, 2).backward_part() == O.B(1, 2)
    for bad in ["X0.1", "F0", "[F0.1&b1.0]", "W0", "F-1.0", ""]:
        with pytest.raises(ValueError, match="not an op"):
            O.parse_op(bad)
    with pytest.raises(TypeError):
        O.parse_op(3)
    with pytest.raises(ValueError, match="kind"):
        O.Op("Q", 0, 0)
    with pytest.raises(ValueError, match="non-negative int m"):
        O.Op("F", 0, -1)


@pytest.mark.parametrize("name,n,c", list(_configs()))
def test_every_schedule_covers_each_microbatch_once_and_runs(name, n, c):
    sched = build_schedule(name, n, c)
    check_schedule(sched)
    assert sched.num_stages == (2 * n if name == "dualpipev" else n)
    assert sum(ch.num_microbatches for ch in sched.chains) == c
    timeline = simulate_timeline(sched, Durations(F=1, B=2, W=1, FB=2.5, comm=0.25))
    assert [timeline.labels(r) for r in range(n)] == [sched.labels(r) for r in range(n)]
    assert dependency_violations(sched, timeline) == []


def test_dualpipe_is_dualpipev_cut_in_half():
    """DualPipe on N ranks runs, on rank r, the DualPipeV ops of virtual rank min(r, N-1-r) of
    N/2 with half the chunks, modules swapped on the second half: one generator for both."""
    for n in (2, 4, 6, 8):
        for c in (2 * n, 2 * n + 4):
            dp = build_schedule("dualpipe", n, c)
            dpv = build_schedule("dualpipev", n // 2, c // 2)
            for r in range(n):
                swap = r >= n // 2
                mirrored = [O.Op(op.kind, op.d if op.d is None else op.d ^ swap, op.m,
                                 op.d1 if op.d1 is None else op.d1 ^ swap, op.m1)
                            for op in dpv.rank_ops[min(r, n - 1 - r)]]
                assert list(dp.rank_ops[r]) == mirrored


def test_phase_structure_of_the_bidirectional_generator():
    # Virtual rank 0 of 2 with 4 chunks per direction, written out by hand from the 8 phases.
    got = [str(op) for op in bidirectional_rank_ops(2, 0, 4, (0, 1))]
    assert got == ["F0.0", "F0.1",                         # 1: nF0
                   "F0.2", "F1.0",                         # 2: nF0F1
                   "b1.0", "W", "F1.1",                    # 3: nB1W1F1
                   "[F0.3&B1.1]", "[F1.2&B0.0]",           # 4: main loop, once
                   "B1.2", "[F1.3&B0.1]",                  # 5: nB1F1B0
                   "B1.3", "b0.2",                         # 6: nB1B0, second half deferred
                   "W", "b0.3",                            # 7: nWB0
                   "W"]                                    # 8: nW
    # The innermost virtual rank runs its first main-loop pair as two chunks.
    inner = [str(op) for op in bidirectional_rank_ops(2, 1, 4, (0, 1))]
    assert inner[4:7] == ["F0.2", "B1.0", "[F1.2&B0.0]"]


@pytest.mark.parametrize("call,exc,match", [
    (lambda: build_schedule("dualpipe", 3, 12), ValueError, "even number of ranks"),
    (lambda: build_schedule("dualpipe", 4, 6), ValueError, "num_chunks must be >= 8"),
    (lambda: build_schedule("dualpipe", 4, 9), ValueError, "num_chunks must be even"),
    (lambda: build_schedule("dualpipev", 3, 5), ValueError, "num_chunks must be >= 6"),
    (lambda: build_schedule("dualpipev", 0, 4), ValueError, "num_ranks"),
    (lambda: build_schedule("1f1b", 4, 0), ValueError, "num_chunks must be >= 1"),
    (lambda: build_schedule("zb1p", 4, 2.0), TypeError, "num_chunks must be an int"),
    (lambda: build_schedule("gpipe", 4, 8), ValueError, "schedule must be one of"),
    (lambda: bidirectional_rank_ops(3, 0, 5, (0, 1)), ValueError, "at least 6 micro-batches"),
])
def test_invalid_configurations_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _durations(rng, kind):
    if kind == "1f1b":       # the 1F1B formula needs nothing
        b, w = rng.uniform(0.1, 3), rng.uniform(0, 1)
        return Durations(F=rng.uniform(0.1, 3), B=b + w, W=w, FB=rng.uniform(0.1, 6))
    f = rng.uniform(0.5, 2)
    w = rng.uniform(0.05, f)
    if kind == "zb1p":       # W no longer than F or b: a held-back W fits in the gaps it fills
        return Durations(F=f, B=rng.uniform(w, 3) + w, W=w)
    # DualPipe's formula is stated for the published figures' setting, F = B - W, and a pair
    # that takes between its longer half and the sum of both halves.
    B = f + w
    return Durations(F=f, B=B, W=w, FB=rng.uniform(max(f, B), f + B))


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_simulator_reproduces_the_published_bubble_formulas(name):
    rng = random.Random(hash(name) % 1000)
    ranks = {"1f1b": [2, 3, 4, 6, 8], "zb1p": [2, 3, 4, 6, 8], "dualpipe": [2, 4, 6, 8],
             "dualpipev": [1, 2, 3, 4, 5]}[name]
    for _ in range(60):
        n = rng.choice(ranks)
        if name.startswith("dual"):
            c = rng.randint(2 * n, 5 * n)
            c += c % 2 if name == "dualpipe" else 0
        else:
            c = rng.randint(n, 5 * n)
        d = _durations(rng, "1f1b" if name == "1f1b" else ("zb1p" if name == "zb1p" else "dual"))
        result = simulate(build_schedule(name, n, c), d)
        want = published_bubble(name, result.schedule.num_stages, d)
        assert result.max_bubble == pytest.approx(want, abs=1e-9), (name, n, c, d, result.bubbles)
        if name in ("1f1b", "zb1p"):   # same work everywhere: every rank idles as long
            assert max(result.bubbles) - min(result.bubbles) < 1e-9


def test_published_figure_settings():
    """The README's figures: DualPipe 8 ranks 20 micro-batches, DualPipeV 4 ranks 10, with
    F=1, B=2 (b=W=1) and F&B=3: bubble (8/2-1)(3+2-3) = 6 for both."""
    d = Durations(F=1, B=2, W=1, FB=3)
    for name, n, c in [("dualpipe", 8, 20), ("dualpipev", 4, 10)]:
        result = simulate(build_schedule(name, n, c), d)
        assert result.max_bubble == 6
        assert result.peak_activations == [9] * n
    ones = simulate(build_schedule("1f1b", 8, 20), d)
    zb = simulate(build_schedule("zb1p", 8, 20), d)
    assert (ones.max_bubble, zb.max_bubble) == (21, 7)


@pytest.mark.parametrize("name,n", [(nm, n) for nm, ranks, _ in GRID for n in ranks if not (nm == "dualpipe" and n % 2)])
def test_peak_activations_match_the_published_table(name, n):
    c = 4 * n + 2 if name.startswith("dual") else 3 * n
    sched = build_schedule(name, n, c)
    peaks = simulate(sched).peak_activations
    pp = sched.num_stages
    assert max(peaks) == published_activations(name, pp)
    if name in ("1f1b", "zb1p"):
        assert peaks == [pp - r for r in range(n)]     # 1F1B's memory profile, kept by ZB1P
    else:
        assert peaks == [pp + 1] * n                    # every DualPipe rank holds PP+1


def test_zero_bubble_variants_help_only_through_w():
    d = Durations(F=1, B=2, W=1)
    for n in (2, 4, 8):
        assert simulate(build_schedule("zb1p", n, 3 * n), d).max_bubble < \
            simulate(build_schedule("1f1b", n, 3 * n), d).max_bubble
        # With (almost) nothing to defer, ZB1P is 1F1B.
        tiny = Durations(F=1, B=2, W=1e-9)
        assert simulate(build_schedule("zb1p", n, 3 * n), tiny).max_bubble == \
            pytest.approx(simulate(build_schedule("1f1b", n, 3 * n), tiny).max_bubble, abs=1e-6)


def test_simulator_detects_a_deadlock_and_check_schedule_bad_orders():
    chain = (Chain(((0, 0), (1, 0)), 2),)
    ok0 = (O.F(0, 0), O.B(0, 0), O.F(0, 1), O.B(0, 1))
    # Rank 1 wants micro-batch 1 first; rank 0 sends it only after micro-batch 0's backward.
    stuck = Schedule("stuck", 2, 2, chain, (ok0, (O.F(0, 1), O.F(0, 0), O.B(0, 0), O.B(0, 1))))
    check_schedule(stuck)
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(stuck)
    backwards_first = Schedule("bad", 2, 2, chain, (ok0, (O.B(0, 0), O.F(0, 0), O.F(0, 1), O.B(0, 1))))
    with pytest.raises(ValueError, match="before its forward"):
        check_schedule(backwards_first)
    missing_w = Schedule("bad", 2, 2, chain, ((O.F(0, 0), O.b(0, 0), O.F(0, 1), O.B(0, 1)),
                                              (O.F(0, 0), O.B(0, 0), O.F(0, 1), O.B(0, 1))))
    with pytest.raises(ValueError, match="lack a W"):
        check_schedule(missing_w)


def _message_keys(sched, rank, op, forward_only):
    """(receives, sends) of one op on one rank, as transfer keys."""
    recv, send = [], []
    if op.is_forward:
        chain, j = sched.locate(rank, op.d)
        if j > 0 and sched.stage(chain, j - 1)[0] != rank:
            recv.append((ACTIVATION, chain, j - 1, op.m))
        if j + 1 < sched.num_stages_of(chain) and sched.stage(chain, j + 1)[0] != rank:
            send.append((ACTIVATION, chain, j, op.m))
    if op.is_backward and not forward_only:
        part = op.backward_part()
        chain, j = sched.locate(rank, part.d)
        if j + 1 < sched.num_stages_of(chain) and sched.stage(chain, j + 1)[0] != rank:
            recv.append((GRADIENT, chain, j + 1, part.m))
        if j > 0 and sched.stage(chain, j - 1)[0] != rank:
            send.append((GRADIENT, chain, j, part.m))
    return recv, send


@pytest.mark.parametrize("name,n,c", [cfg for cfg in _configs() if cfg[1] > 1])
@pytest.mark.parametrize("forward_only", [False, True])
def test_message_order_cannot_deadlock_even_on_one_serial_stream(name, n, c, forward_only):
    """Model NCCL at its strictest: each rank's p2p runs on one stream in posting order, a
    message completes when it heads both ranks' streams and its producer has run, and a
    chunk runs when its receives are complete. Every message must complete."""
    sched = build_schedule(name, n, c)
    plan = transfer_plan(sched, forward_only)
    keys = [t.key for t in plan]
    assert len(keys) == len(set(keys))
    queues = [[t for t in plan if r in (t.src, t.dst)] for r in range(n)]
    ops = [[op for op in sched.rank_ops[r] if not forward_only or op.is_forward] for r in range(n)]
    io = [[_message_keys(sched, r, op, forward_only) for op in ops[r]] for r in range(n)]
    # Every message of the plan is produced and consumed by exactly one chunk.
    assert sorted(k for r in range(n) for _, s in io[r] for k in s) == sorted(keys)
    assert sorted(k for r in range(n) for rv, _ in io[r] for k in rv) == sorted(keys)
    # The engine posts a message only in plan order, so it must never have to post a send
    # before the chunk producing it ran (host side)...
    for r in range(n):
        produced, position = set(), 0
        index = {t.key: i for i, t in enumerate(queues[r])}
        for recv, send in io[r]:
            for k in recv:
                for t in queues[r][position:index[k] + 1]:
                    assert t.dst == r or t.key in produced, f"rank {r} must send {t.key} before producing it"
                position = max(position, index[k] + 1)
            produced.update(send)
            for k in send:
                for t in queues[r][position:index[k] + 1]:
                    assert t.dst == r or t.key in produced
                position = max(position, index[k] + 1)
    # ... and the device side never stalls.
    head, pc, done_msgs, done_ops = [0] * n, [0] * n, set(), [set() for _ in range(n)]
    produced_by = {k: (r, i) for r in range(n) for i, (_, s) in enumerate(io[r]) for k in s}
    progress = True
    while progress:
        progress = False
        for r in range(n):
            while pc[r] < len(ops[r]) and all(k in done_msgs for k in io[r][pc[r]][0]):
                done_ops[r].add(pc[r])
                pc[r] += 1
                progress = True
        for t in plan:
            if t.key in done_msgs:
                continue
            a, b = t.src, t.dst
            at_heads = queues[a][head[a]].key == t.key and queues[b][head[b]].key == t.key
            if at_heads and produced_by[t.key][1] in done_ops[a]:
                done_msgs.add(t.key)
                head[a] += 1
                head[b] += 1
                progress = True
    assert all(pc[r] == len(ops[r]) for r in range(n)), f"stuck at {[pc[r] for r in range(n)]}"
    assert len(done_msgs) == len(plan)


def test_timeline_from_records_and_drawing(tmp_path):
    import matplotlib.image as mpimg

    from overlap.pipeline.draw import save_timelines

    sched = build_schedule("dualpipev", 2, 4)
    simulated = simulate(sched, Durations(F=1, B=2, W=1, FB=2.5)).timeline
    records = [[(iv.label, 100 + iv.start * 1e-3, 100 + iv.end * 1e-3) for iv in rank] for rank in simulated.ranks]
    recorded = Timeline.from_records("recorded", records)
    assert recorded.ranks[0][0].start == 0
    assert recorded.makespan == pytest.approx(simulated.makespan * 1e-3)
    assert dependency_violations(sched, recorded, tolerance=1e-12) == []
    path = save_timelines([simulated, recorded], str(tmp_path / "pipeline_test.png"), titles=["sim", "real"])
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 1000
    with pytest.raises(ValueError, match="titles"):
        save_timelines([simulated], str(tmp_path / "x.png"), titles=["a", "b"])


def test_published_formula_helpers_validate():
    with pytest.raises(ValueError, match="name must be one of"):
        published_bubble("gpipe", 4, Durations())
    with pytest.raises(ValueError, match="W must be smaller than B"):
        Durations(F=1, B=1, W=1)
    with pytest.raises(TypeError, match="Durations"):
        simulate(build_schedule("1f1b", 2, 2), durations=(1, 2, 1))
    assert set(SCHEDULES) == {"1f1b", "zb1p", "dualpipe", "dualpipev"}
