"""GPU microbenchmark of the local EP kernels: Triton vs the PyTorch reference, achieved GB/s.

    python -m overlap.triton_kernels.bench [--num-ranks 8] [--out experiments/results/x.json]

``hbm_gbps`` counts the bytes a kernel must move at least once (rows read + rows written,
index tensors ignored) over its median time, L2 flushed between runs.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from overlap.bench import make_meta, time_fn, write_results
from overlap.ep import layout as reference
from overlap.triton_kernels import gather_reduce, permute_rows, routing_layout


def _random_topk(num_tokens: int, topk: int, num_experts: int, device) -> torch.Tensor:
    scores = torch.rand(num_tokens, num_experts, device=device)
    return scores.topk(topk, dim=1).indices


def bench_local_kernels(num_tokens: int = 4096, hidden: int = 7168, topk: int = 8,
                        num_experts: int = 256, num_ranks: int = 8,
                        dtype: torch.dtype = torch.bfloat16, iters: int = 20,
                        warmup: int = 5) -> list[dict]:
    """Time ``routing_layout``, ``permute_rows`` and ``gather_reduce`` on one GPU.

    Returns flat result rows (DESIGN.md section 5) for backends ``triton`` and ``torch``; ops:
    ``routing_layout``, ``permute_rows`` (send buffer, groups = ranks), ``gather_reduce_topk``
    (expert-side weighted un-permute of k rows per token, fp32 weights) and
    ``gather_reduce_ranks`` (combine-side sum of one row per destination rank).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_local_kernels needs a CUDA GPU")
    device = torch.device("cuda")
    esize = torch.empty((), dtype=dtype).element_size()
    topk_idx = _random_topk(num_tokens, topk, num_experts, device)
    lay = reference.routing_layout(topk_idx, num_experts, num_ranks)
    num_rows = int(lay.num_tokens_per_rank.sum())
    slot, offsets = lay.token_slot_in_rank, lay.rank_offsets
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    sent = reference.permute_rows(x, slot, offsets, num_rows)
    rank_rows = torch.where(slot >= 0, offsets[None, :] + slot.to(torch.int64), -1)
    expert_rows = torch.randperm(num_tokens * topk, device=device).view(num_tokens, topk)
    expert_out = torch.randn(num_tokens * topk, hidden, device=device).to(dtype)
    weights = torch.rand(num_tokens, topk, device=device)

    row_bytes = hidden * esize
    sent_tokens = int(lay.is_token_in_rank.any(1).sum())
    cases: dict[str, tuple[int, Callable, Callable]] = {
        "routing_layout": (
            topk_idx.numel() * topk_idx.element_size(),
            lambda: routing_layout(topk_idx, num_experts, num_ranks),
            lambda: reference.routing_layout(topk_idx, num_experts, num_ranks)),
        "permute_rows": (
            (sent_tokens + num_rows) * row_bytes,
            lambda: permute_rows(x, slot, offsets, num_rows),
            lambda: reference.permute_rows(x, slot, offsets, num_rows)),
        "gather_reduce_topk": (
            (num_tokens * topk + num_tokens) * row_bytes,
            lambda: gather_reduce(expert_out, expert_rows, weights),
            lambda: reference.gather_reduce(expert_out, expert_rows, weights)),
        "gather_reduce_ranks": (
            (num_rows + num_tokens) * row_bytes,
            lambda: gather_reduce(sent, rank_rows),
            lambda: reference.gather_reduce(sent, rank_rows)),
    }
    rows = []
    for op, (nbytes, triton_fn, torch_fn) in cases.items():
        for backend, fn in (("triton", triton_fn), ("torch", torch_fn)):
            t = time_fn(fn, warmup=warmup, iters=iters)
            rows.append({"op": op, "backend": backend, "num_tokens": num_tokens, "hidden": hidden,
                         "topk": topk, "num_experts": num_experts, "num_ranks": num_ranks,
                         "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes,
                         "time_us": t["time_us"], "min_us": t["min_us"], "max_us": t["max_us"],
                         "hbm_gbps": nbytes / (t["time_us"] * 1e3)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--num-ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--out", help="write a results JSON here")
    args = parser.parse_args(argv)
    rows = []
    for num_ranks in args.num_ranks:
        rows += bench_local_kernels(num_tokens=args.num_tokens, hidden=args.hidden,
                                    num_ranks=num_ranks)
    for r in rows:
        print(f"{r['op']:>20} {r['backend']:>6} W={r['num_ranks']}  {r['time_us']:9.1f} us "
              f"{r['hbm_gbps']:8.1f} GB/s")
    if args.out:
        write_results(args.out, make_meta("triton_local_kernels", world_size=1), rows)


if __name__ == "__main__":
    main()
