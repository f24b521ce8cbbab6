"""Per-rank checks of an EPBuffer backend against the oracle in :mod:`overlap.testing.ep_cases`.

Run inside a rank (``run_distributed``); returns a list of failure strings (empty = pass), so
one spawn checks many cases and the parent test reports every failing case at once.
"""
from __future__ import annotations

import torch

from overlap.ep import EPBuffer
from overlap.testing.ep_cases import (EPCase, expected_combine, expected_dispatch, expert_fn,
                                      local_expert_outputs, make_inputs)

COMBINE_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def check_case(case: EPCase, rank: int, world_size: int, backend: str, device: torch.device,
               mode: str = "sync") -> list[str]:
    """Dispatch + combine one case; compare with the oracle. mode: sync | async | expert_major."""
    fails: list[str] = []
    tag = f"[{backend}/{mode}/{case.name}/rank{rank}]"
    max_tokens = max(max(case.tokens_per_rank), 1)
    buf = EPBuffer(None, num_experts=case.num_experts, hidden=case.hidden, max_tokens_per_rank=max_tokens,
                   backend=backend, device=device)
    x, idx, w = (t.to(device) for t in make_inputs(case, rank, world_size))
    if mode == "async":
        recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch_async(x, idx, w)
        event.wait()
    else:
        recv_x, recv_idx, recv_w, counts, handle = buf.dispatch(x, idx, w)
    exp_x, exp_idx, exp_w, exp_counts = expected_dispatch(case, rank, world_size)
    for name, got, exp in (("recv_x", recv_x, exp_x), ("recv_topk_idx", recv_idx, exp_idx),
                           ("recv_topk_weights", recv_w, exp_w),
                           ("num_recv_tokens_per_expert", counts, exp_counts)):
        got = got.cpu()
        if got.shape != exp.shape or got.dtype != exp.dtype or not torch.equal(got, exp):
            fails.append(f"{tag} {name} differs: got {tuple(got.shape)} {got.dtype}, "
                         f"expected {tuple(exp.shape)} {exp.dtype}")
    if fails:
        return fails

    epl = buf.num_local_experts
    if mode == "expert_major":
        expert_x, per_expert = buf.permute_to_experts(recv_x, handle)
        if not torch.equal(per_expert.cpu(), exp_counts):
            fails.append(f"{tag} permute_to_experts counts differ")
        # Expert outputs row by row in expert-major order; combine applies the weights.
        bounds = torch.cumsum(per_expert.to(torch.int64), 0).tolist()
        ey = torch.empty(expert_x.shape, dtype=torch.float32, device=device)
        start = 0
        for e_local, end in enumerate(bounds):
            ey[start:end] = expert_fn(expert_x[start:end], rank * epl + e_local)
            start = end
        out = buf.combine(ey.to(case.dtype), handle, expert_major=True)
    else:
        y = local_expert_outputs(recv_x, recv_idx, recv_w, rank, epl).to(case.dtype)
        if mode == "async":
            out, event = buf.combine_async(y, handle)
            event.wait()
        else:
            out = buf.combine(y, handle)
    exp_out = expected_combine(case, rank, world_size)
    if out.shape != exp_out.shape or out.dtype != case.dtype:
        fails.append(f"{tag} combine shape/dtype {tuple(out.shape)} {out.dtype}, expected {tuple(exp_out.shape)} {case.dtype}")
    else:
        err = _rel_err(out, exp_out)
        # expert-major casts expert outputs to the wire dtype before weighting: one more rounding.
        tol = COMBINE_RTOL[case.dtype] * (2 if mode == "expert_major" else 1)
        if not (err <= tol):  # NaN fails too
            fails.append(f"{tag} combine relative error {err:.3g} > {tol:g}")
    return fails

