"""Triton kernels for the local (on-GPU, no communication) work of expert parallelism.

Each public function validates its inputs and calls a ``torch.library`` op in the
``overlap_triton`` namespace (``torch.ops.overlap_triton.*``), built with
``torch.library.triton_op`` so that ``torch.compile`` sees the kernels. Outputs match the
pure-PyTorch definitions in :mod:`overlap.ep.layout`.

On a machine without a GPU, set ``TRITON_INTERPRET=1`` before importing triton to run the
kernels on CPU tensors in the Triton interpreter (slow; for tests only).
"""
from overlap.triton_kernels.layout import routing_layout
from overlap.triton_kernels.permute import permute_rows
from overlap.triton_kernels.reduce import gather_reduce

__all__ = ["routing_layout", "permute_rows", "gather_reduce"]
