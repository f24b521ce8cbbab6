"""Shared helpers: input validation with errors that name the argument, and launch sizes.

The public functions validate once, in Python, before calling their ``torch.library`` op;
the op bodies trust their inputs. Values *inside* index tensors are not checked (that would
need a device sync): the kernels ignore out-of-range entries instead of writing out of bounds.
"""
from __future__ import annotations

import operator

import torch
import triton

# Decided when Triton is first imported, like `triton.jit` itself decides it per kernel:
# with TRITON_INTERPRET=1 every kernel here runs in the interpreter on CPU tensors.
INTERPRET = bool(triton.knobs.runtime.interpret)

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# RUNTIME_LOOPS: kernels here loop to a runtime bound with `while`, not `range(n)`. Triton
# 3.6's interpreter turns `range(n)` into `int(1-element array)`, which NumPy >= 2.4 rejects;
# a `while` condition only needs `bool()`. On GPU it is an scf.while; these loops are short.

# Threads of one program; launch sizes below assume it.
NUM_WARPS = 4


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(t, name: str, *, dtypes, ndim: int) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a usable kernel argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu"):
        return
    raise ValueError(
        f"{name} is on {t.device}; overlap.triton_kernels needs CUDA tensors "
        "(CPU tensors only when TRITON_INTERPRET=1 was set before triton was imported)")


def check_same_device(ref: torch.Tensor, ref_name: str, t: torch.Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_int(v, name: str, *, minimum: int):
    """Return ``v`` as an int (numpy integers accepted) after checking ``v >= minimum``."""
    # bool is an int subclass; True as a count is almost certainly a bug.
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got bool")
    if not isinstance(v, torch.SymInt):  # symbolic under torch.compile: keep it symbolic
        try:
            v = operator.index(v)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def row_block(element_size: int, hidden: int) -> int:
    """Columns per program: one 16-byte vector per thread, never much wider than the row."""
    per_program = (16 // element_size) * 32 * NUM_WARPS
    return max(16, min(per_program, triton.next_power_of_2(max(hidden, 1))))
