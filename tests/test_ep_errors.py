"""Bad input to EPBuffer raises an exception that names the argument, before any transfer."""
import pytest
import torch

from overlap.testing import run_distributed


def _expect(fn, exc_type, must_mention):
    try:
        fn()
    except exc_type as exc:
        msg = str(exc)
        return None if must_mention in msg else f"{exc_type.__name__} raised but message lacks {must_mention!r}: {msg}"
    except Exception as exc:  # wrong exception type
        return f"expected {exc_type.__name__} mentioning {must_mention!r}, got {type(exc).__name__}: {exc}"
    return f"expected {exc_type.__name__} mentioning {must_mention!r}, nothing raised"


def _bad_inputs(rank, world_size):
    from overlap.ep import EPBuffer

    E, H, T, k = 4 * world_size, 32, 8, 2
    buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T)
    x = torch.randn(T, H)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    recv_x, recv_idx, recv_w, counts, handle = buf.dispatch(x, idx, w)
    y = torch.randn(recv_x.shape[0], H)
    other = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T)
    bad_idx = idx.clone()
    bad_idx[0, 0] = E
    dup_idx = idx.clone()
    dup_idx[1, 1] = dup_idx[1, 0]
    cases = {
        "x wrong dtype": (lambda: buf.dispatch(x.to(torch.int32), idx, w), TypeError, "x must be"),
        "x wrong rank": (lambda: buf.dispatch(x[0], idx, w), ValueError, "x must be 2-D"),
        "x wrong hidden": (lambda: buf.dispatch(torch.randn(T, H + 1), idx, w), ValueError, "hidden"),
        "x not a tensor": (lambda: buf.dispatch(x.numpy(), idx, w), TypeError, "x must be a torch.Tensor"),
        "x on meta device": (lambda: buf.dispatch(x.to("meta"), idx, w), ValueError, "x is on meta"),
        "too many tokens": (lambda: buf.dispatch(torch.randn(T + 1, H), torch.cat([idx, idx[:1]]),
                                                 torch.cat([w, w[:1]])), ValueError, "max_tokens_per_rank"),
        "topk_idx float": (lambda: buf.dispatch(x, idx.float(), w), TypeError, "topk_idx"),
        "topk_idx rows": (lambda: buf.dispatch(x, idx[:-1], w[:-1]), ValueError, "topk_idx has"),
        "expert id too large": (lambda: buf.dispatch(x, bad_idx, w), ValueError, "topk_idx values"),
        "expert id below -1": (lambda: buf.dispatch(x, idx - E, w), ValueError, "topk_idx values"),
        "repeated expert": (lambda: buf.dispatch(x, dup_idx, w), ValueError, "same expert twice"),
        "weights shape": (lambda: buf.dispatch(x, idx, w[:, :1]), ValueError, "topk_weights"),
        "weights int": (lambda: buf.dispatch(x, idx, w.to(torch.int64)), TypeError, "topk_weights"),
        "y rows mismatch": (lambda: buf.combine(torch.randn(y.shape[0] + 1, H), handle), ValueError, "y has"),
        "y hidden mismatch": (lambda: buf.combine(torch.randn(y.shape[0], H + 2), handle), ValueError, "y has hidden"),
        "y int": (lambda: buf.combine(y.to(torch.int64), handle), TypeError, "y must be"),
        "handle from other buffer": (lambda: other.combine(y, handle), ValueError, "handle"),
        "handle wrong type": (lambda: buf.combine(y, "handle"), TypeError, "handle"),
        "expert-major rows": (lambda: buf.combine(torch.randn(handle.num_expert_rows + 1, H), handle,
                                                  expert_major=True), ValueError, "y has"),
        "unknown backend": (lambda: EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="nope"),
                            ValueError, "backend='nope'"),
        "experts not divisible": (lambda: EPBuffer(None, num_experts=E + 1, hidden=H, max_tokens_per_rank=T),
                                  ValueError, "num_experts"),
        "num_sms zero": (lambda: EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, num_sms=0),
                         ValueError, "num_sms"),
        "hidden negative": (lambda: EPBuffer(None, num_experts=E, hidden=-1, max_tokens_per_rank=T),
                            ValueError, "hidden"),
        "fp8 on a backend without it": (lambda: buf.dispatch_fp8(x, idx, w), NotImplementedError, "backend='torch'"),
        "layout bad ids": (lambda: buf.get_dispatch_layout(bad_idx), ValueError, "topk_idx values"),
    }
    problems = {}
    for name, (fn, exc, text) in cases.items():
        p = _expect(fn, exc, text)
        if p:
            problems[name] = p
    # After all the rejected calls the buffer must still work (nothing half-sent).
    out = buf.combine(buf.dispatch(x, idx, w)[0] * 0 + 1, buf.dispatch(x, idx, w)[4])
    if out.shape != x.shape:
        problems["buffer unusable after errors"] = str(out.shape)
    return problems


def test_bad_inputs_raise_named_errors():
    results = run_distributed(_bad_inputs, 2, backend="gloo", timeout_s=120)
    problems = {f"rank{r}: {k}": v for r, res in enumerate(results) for k, v in res.items()}
    assert not problems, "\n".join(f"{k}: {v}" for k, v in problems.items())


def _cuda_backend_unavailable(rank, world_size):
    from overlap.ep import EPBuffer

    try:
        EPBuffer(None, num_experts=4, hidden=8, max_tokens_per_rank=4, backend="cuda")
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    return None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_backend_not_built_here_is_a_clear_error():
    msgs = run_distributed(_cuda_backend_unavailable, 1, backend="gloo", timeout_s=60)
    assert msgs[0] is not None and "cuda" in msgs[0], msgs


def test_needs_initialised_process_group():
    from overlap.ep import EPBuffer

    with pytest.raises(RuntimeError, match="init_process_group"):
        EPBuffer(None, num_experts=4, hidden=8, max_tokens_per_rank=4)
