"""The executor in one process (one-rank pipelines, no torch.distributed), its errors, and
the stage helpers (WeightGradStore, DeferrableLinear)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from overlap.pipeline import (DualPipe, DualPipeV, OneFOneB, WeightGradStore, ZB1P, build_schedule,
                              set_p2p_tensor_dtype, set_p2p_tensor_shapes)
from overlap.pipeline.layers import DeferrableLinear, MLPStage
from overlap.pipeline.verify import Case, cosine_gap, run_case


@pytest.mark.parametrize("schedule", ["dualpipev", "1f1b", "zb1p"])
@pytest.mark.parametrize("stage", ["mlp", "plain", "two"])
def test_one_rank_pipelines_match_the_reference(schedule, stage):
    chunks = 3 if schedule != "dualpipev" else 4
    result = run_case(Case(schedule, chunks, stage=stage, seed=7))
    assert result["max_grad_gap"] < 1e-13


def test_float64_and_repeated_steps_accumulate_like_the_reference():
    run_case(Case("dualpipev", 5, dtype="float64", train_steps=3, seed=3))
    run_case(Case("zb1p", 4, dtype="float64", train_steps=2, seed=4))


def test_trace_vocabulary_of_a_one_rank_dualpipev():
    torch.manual_seed(0)
    pipe = DualPipeV((MLPStage(4), MLPStage(4)))
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    pipe.step(x, num_chunks=4, criterion=F.mse_loss, labels=(y,))
    assert pipe.trace == build_schedule("dualpipev", 1, 4).labels(0)
    assert pipe.trace[:4] == ["F0.0", "F1.0", "F0.1", "B1.0"]
    assert "[F1.1&B0.0]" in pipe.trace and pipe.trace.count("W") == sum(t.startswith("b") for t in pipe.trace)
    with torch.no_grad():
        pipe.step(x, num_chunks=4, criterion=F.mse_loss, labels=(y,))
    assert pipe.trace == [f"F{d}.{m}" for m in range(4) for d in (0, 1)]


def test_recorded_timeline_follows_the_trace():
    pipe = ZB1P(MLPStage(4))
    pipe.record_timeline = True
    pipe.step(torch.randn(6, 4), num_chunks=3, criterion=F.mse_loss, labels=(torch.randn(6, 4),))
    labels = [label for label, _, _ in pipe.timeline_records]
    assert labels == pipe.trace == ["F0.0", "b0.0", "W", "F0.1", "b0.1", "W", "F0.2", "b0.2", "W"]
    times = [t for _, start, end in pipe.timeline_records for t in (start, end)]
    assert times == sorted(times)


def test_zb1p_defers_weight_gradients_to_w_chunks(monkeypatch):
    """In a b chunk the DeferrableLinear weights get no gradient; the W chunk adds it."""
    stage = MLPStage(4)
    seen = []
    real_put = WeightGradStore.put.__func__

    def spy(cls, func):
        seen.append(stage.layers[0][0].weight.grad is None)
        real_put(cls, func)
    monkeypatch.setattr(WeightGradStore, "put", classmethod(spy))
    pipe = ZB1P(stage)
    pipe.step(torch.randn(4, 4), num_chunks=2, criterion=F.mse_loss, labels=(torch.randn(4, 4),))
    assert seen and seen[0] is True          # the first b left the weight gradient for its W
    assert stage.layers[0][0].weight.grad is not None


def test_deferrable_linear_matches_nn_linear_and_defers_on_request():
    torch.manual_seed(1)
    ref = nn.Linear(5, 3)
    lin = DeferrableLinear(5, 3)
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref(x).square().sum().backward()
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    try:
        lin(x2).square().sum().backward()
    finally:
        WeightGradStore.enabled = False
    assert torch.equal(x2.grad, x.grad)                  # input gradient now
    assert lin.weight.grad is None and lin.bias.grad is None
    WeightGradStore.flush()
    WeightGradStore.pop()                                # weight gradients later
    assert cosine_gap(lin.weight.grad, ref.weight.grad) < 1e-13
    assert cosine_gap(lin.bias.grad, ref.bias.grad) < 1e-13
    with pytest.raises(RuntimeError, match="no deferred weight gradients"):
        WeightGradStore.pop()


def test_two_pipelines_keep_their_own_deferred_work():
    """Two ZB1P pipelines stepped in turn: each step runs exactly its own deferred closures."""
    torch.manual_seed(2)
    a, b = MLPStage(4), MLPStage(6)
    a_ref, b_ref = copy.deepcopy(a), copy.deepcopy(b)
    pa, pb = ZB1P(a), ZB1P(b)
    xa, ya, xb, yb = torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 6), torch.randn(4, 6)
    pa.step(xa, num_chunks=2, criterion=F.mse_loss, labels=(ya,))
    pb.step(xb, num_chunks=2, criterion=F.mse_loss, labels=(yb,))
    pa.step(xa, num_chunks=2, criterion=F.mse_loss, labels=(ya,))
    for ref, x, y, steps in [(a_ref, xa, ya, 2), (b_ref, xb, yb, 1)]:
        for _ in range(steps):
            for xm, ym in zip(x.tensor_split(2), y.tensor_split(2)):
                F.mse_loss(ref(xm), ym).backward()
    for got, ref in [(a, a_ref), (b, b_ref)]:
        for p, q in zip(got.parameters(), ref.parameters()):
            assert cosine_gap(p.grad, q.grad) < 1e-13


@pytest.mark.parametrize("call,exc,match", [
    (lambda: DualPipe((MLPStage(4), MLPStage(4))), ValueError, "even number of ranks"),
    (lambda: DualPipeV(MLPStage(4)), TypeError, "2 nn.Module"),
    (lambda: OneFOneB([MLPStage(4), MLPStage(4)]), TypeError, "1 nn.Module"),
    (lambda: OneFOneB(MLPStage(4), batch_dim=1.0), TypeError, "batch_dim"),
    (lambda: OneFOneB(MLPStage(4), rank_mapping=[1]), ValueError, "rank_mapping"),
])
def test_invalid_construction_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_invalid_steps_raise_clear_errors():
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    pipe = DualPipeV((MLPStage(4), MLPStage(4)))
    with pytest.raises(ValueError, match="num_chunks must be >= 2"):
        pipe.step(x, num_chunks=1, criterion=F.mse_loss, labels=(y,))
    with pytest.raises(TypeError, match="num_chunks must be an int"):
        pipe.step(x, num_chunks=None, criterion=F.mse_loss, labels=(y,))
    with pytest.raises(ValueError, match="needs a criterion"):
        pipe.step(x, num_chunks=4, labels=(y,))
    with pytest.raises(TypeError, match="criterion must be callable"):
        pipe.step(x, num_chunks=4, criterion="mse", labels=(y,))
    with pytest.raises(ValueError, match="inputs are required"):
        pipe.step(num_chunks=4, criterion=F.mse_loss, labels=(y,))
    with pytest.raises(TypeError, match="must be tensors"):
        pipe.step([1, 2], num_chunks=4, criterion=F.mse_loss, labels=(y,))
    with torch.no_grad():   # inference needs no criterion
        loss, out = pipe.step(x, num_chunks=4, return_outputs=True)
    assert loss is None and out.shape == x.shape


def test_p2p_setters_validate():
    pipe = OneFOneB(MLPStage(4))
    with pytest.raises(TypeError, match="list of shapes"):
        pipe.set_p2p_tensor_shapes((2, 4))
    with pytest.raises(TypeError, match="torch.dtype"):
        pipe.set_p2p_tensor_dtype("float32")
    with pytest.raises(TypeError, match="list of shapes"):
        set_p2p_tensor_shapes((2, 4))
    with pytest.raises(TypeError, match="torch.dtype"):
        set_p2p_tensor_dtype(None)
