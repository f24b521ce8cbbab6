"""Argument checks shared by every backend: a bad input fails here, by name, before any transfer."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int64, torch.int32)


def _check_tensor(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != device.type or (device.index is not None and t.device.index not in (None, device.index)):
        raise ValueError(f"{name} is on {t.device}, but this EPBuffer communicates on {device}; "
                         f"move it with {name}.to('{device}')")


def _check_rows(name: str, t, *, hidden: int, device: torch.device) -> None:
    """A ``[rows, hidden]`` floating tensor on the buffer's device."""
    _check_tensor(name, t, device)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, hidden], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {[str(d) for d in FLOAT_DTYPES]}, got {t.dtype}")
    if t.shape[1] != hidden:
        raise ValueError(f"{name} has hidden size {t.shape[1]}, but the EPBuffer was built with hidden={hidden}")


def check_dispatch_inputs(x, topk_idx, topk_weights, *, hidden: int, num_experts: int,
                          max_tokens_per_rank: int, device: torch.device, check_values: bool) -> None:
    _check_rows("x", x, hidden=hidden, device=device)
    if x.shape[0] > max_tokens_per_rank:
        raise ValueError(f"x has {x.shape[0]} tokens, more than max_tokens_per_rank={max_tokens_per_rank}; "
                         "build the EPBuffer with a larger max_tokens_per_rank")
    check_topk_idx(topk_idx, num_tokens=x.shape[0], num_experts=num_experts, device=device,
                   check_values=check_values)
    _check_tensor("topk_weights", topk_weights, device)
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights has shape {tuple(topk_weights.shape)}, "
                         f"but topk_idx has shape {tuple(topk_idx.shape)}; they must match")
    if topk_weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"topk_weights must be a floating dtype (float32 preferred), got {topk_weights.dtype}")


def check_topk_idx(topk_idx, *, num_tokens: int | None, num_experts: int, device: torch.device,
                   check_values: bool) -> None:
    _check_tensor("topk_idx", topk_idx, device)
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be 2-D [num_tokens, k], got shape {tuple(topk_idx.shape)}")
    if topk_idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"topk_idx must be int64 or int32, got {topk_idx.dtype}")
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx has {topk_idx.shape[0]} rows but x has {num_tokens} tokens")
    if topk_idx.shape[1] < 1:
        raise ValueError("topk_idx must have at least one column (k >= 1)")
    if check_values and topk_idx.numel() > 0:
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_idx values must lie in [-1, {num_experts - 1}] (-1 = no expert), "
                             f"found range [{lo}, {hi}]")
        # A token listing the same expert twice would be sent once but counted twice.
        srt, _ = topk_idx.sort(dim=1)
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            row = int(dup.any(dim=1).nonzero()[0, 0])
            raise ValueError(f"topk_idx row {row} names the same expert twice: {topk_idx[row].tolist()}")


def check_combine_input(y, *, expected_rows: int, hidden: int, device: torch.device, what: str) -> None:
    _check_rows("y", y, hidden=hidden, device=device)
    if y.shape[0] != expected_rows:
        raise ValueError(f"y has {y.shape[0]} rows but the handle expects {expected_rows} ({what})")


def check_num_worst_tokens(num_worst_tokens) -> None:
    """None, or a non-negative int (the rows a budgeted dispatch's outputs hold)."""
    if num_worst_tokens is None:
        return
    if not isinstance(num_worst_tokens, int) or isinstance(num_worst_tokens, bool) or num_worst_tokens < 0:
        raise ValueError(f"num_worst_tokens must be None or an int >= 0, got {num_worst_tokens!r}")
