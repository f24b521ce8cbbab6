"""Rank functions checking dispatch with a worst-case budget (``num_worst_tokens``).

Used by tests/test_ep_worst_tokens.py on gloo (the ``torch`` backend) and on GPUs (every
backend). Each returns a list of failure messages, or for the failure check what was raised.
"""
from __future__ import annotations

import torch

from overlap.bench import capture_graph

from overlap.testing.ep_kernel_checks import _compare_combine, _expert_rows, _random_routing


def _device(use_cuda: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def _buffers(backend, use_cuda, T, H, E, num_sms=8):
    from overlap.ep import EPBuffer

    kw = dict(num_experts=E, hidden=H, max_tokens_per_rank=T, validate_values=False)
    ref = EPBuffer(None, backend="torch", **kw)
    buf = ref if backend == "torch" else EPBuffer(None, backend=backend, num_sms=num_sms, **kw)
    return ref, buf


def _check_budgeted(tag, got, ref, budget, ref_combine, got_combine, world_size):
    recv_x, idx, w, counts, handle = got
    n = ref[0].shape[0]
    fails = []
    if recv_x.shape[0] != budget or idx.shape[0] != budget or handle.num_recv_tokens != budget:
        fails.append(f"{tag} outputs have {recv_x.shape[0]} rows, handle says {handle.num_recv_tokens}; "
                     f"expected the budget {budget}")
        return fails
    for name, g, r in (("recv_x", recv_x[:n], ref[0]), ("recv_topk_idx", idx[:n], ref[1]),
                       ("recv_topk_weights", w[:n], ref[2]), ("counts", counts, ref[3])):
        if not torch.equal(g, r):
            fails.append(f"{tag} {name} differs from the exact-size dispatch")
    rank_counts = None if handle.recv_rank_counts is None else handle.recv_rank_counts.tolist()
    if rank_counts != ref[4].recv_counts:
        fails.append(f"{tag} handle.recv_rank_counts {rank_counts} != rows received per rank {ref[4].recv_counts}")
    if not bool((idx[n:] == -1).all()) or not bool((w[n:] == 0).all()):
        fails.append(f"{tag} padding rows past the {n} received ones are not ids -1 / weights 0")
    return fails + _compare_combine(f"{tag} budgeted dispatch:", got_combine, ref_combine, world_size)


def budget_matches_exact(rank, world_size, backend, use_cuda):
    """Budgeted dispatch = exact dispatch on the received rows; padding is inert in combine."""
    T, H, E, K = 96, 256, 4 * world_size, 3
    dev = _device(use_cuda)
    gen = torch.Generator().manual_seed(40 + rank)
    ref_buf, buf = _buffers(backend, use_cuda, T, H, E)
    fails = []
    for it, budget in enumerate((world_size * T, world_size * T + 5, None)):
        n = int(torch.randint(0, T + 1, (1,), generator=gen))
        x = torch.randn(n, H, generator=gen).to(torch.bfloat16).to(dev)
        idx, w = _random_routing(n, E, K, gen, dev)
        ref = ref_buf.dispatch(x, idx, w)
        # The smallest budget that fits on every rank is only known after the fact: use the
        # rows this rank receives (the exact dispatch said) when the loop asks for None.
        b = ref[0].shape[0] if budget is None else budget
        got = buf.dispatch(x, idx, w, num_worst_tokens=b)
        y = _expert_rows(got[0])
        y[ref[0].shape[0]:] = float("nan")  # padding rows must never reach the sum
        fails += _check_budgeted(f"[rank{rank}/{backend}/budget={b}/iter{it}]", got, ref, b,
                                 ref_buf.combine(_expert_rows(ref[0]), ref[4]), buf.combine(y, got[4]), world_size)
    if use_cuda:
        torch.cuda.synchronize()
    return fails


def graph_replay(rank, world_size, backend, replays):
    """A dispatch -> experts -> combine step of ``backend`` captured once in a CUDA graph and
    replayed on fresh inputs matches the torch backend every time."""
    T, H, E, K = 256, 512, 8 * world_size, 4
    dev = _device(True)
    gen = torch.Generator().manual_seed(60 + rank)
    ref_buf, buf = _buffers(backend, True, T, H, E)
    budget = world_size * T
    x_s = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
    idx_s = torch.empty(T, K, dtype=torch.int64, device=dev)
    w_s = torch.empty(T, K, dtype=torch.float32, device=dev)

    def fill():
        x_s.copy_(torch.randn(T, H, generator=gen).to(torch.bfloat16))
        idx, w = _random_routing(T, E, K, gen, dev)
        idx_s.copy_(idx)
        w_s.copy_(w)

    def step():
        recv_x, _, _, _, handle = buf.dispatch(x_s, idx_s, w_s, num_worst_tokens=budget)
        return buf.combine(_expert_rows(recv_x), handle)

    fill()
    outs = []
    # The eager call allocates the symmetric buffer, so nothing is allocated inside the capture.
    graph = capture_graph(lambda: outs.append(step()), warmup=1)
    out_s = outs[-1]
    fails = []
    for r in range(replays):
        fill()
        graph.replay()
        ref = ref_buf.dispatch(x_s, idx_s, w_s)
        expect = ref_buf.combine(_expert_rows(ref[0]), ref[4])
        fails += _compare_combine(f"[{backend}/rank{rank}/replay{r}] graph-replayed", out_s, expect, world_size)
    torch.cuda.synchronize()
    return fails


def budget_too_small(rank, world_size, backend, use_cuda):
    """Every token goes to every rank and the budget is one row: the dispatch (or, on kernel
    backends, the next call after it finished) raises, naming num_worst_tokens."""
    T, H = 16, 128
    E = world_size
    dev = _device(use_cuda)
    _, buf = _buffers(backend, use_cuda, T, H, E)
    x = torch.randn(T, H).to(torch.bfloat16).to(dev)
    idx = torch.arange(world_size).repeat(T, 1).to(dev)
    w = torch.ones(T, world_size, device=dev)
    try:
        got = buf.dispatch(x, idx, w, num_worst_tokens=1)
        if use_cuda:
            torch.cuda.synchronize()
        buf.combine(_expert_rows(got[0]), got[4])
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return None
