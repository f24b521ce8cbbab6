"""Triton kernels for the local (on-GPU, no communication) work of expert parallelism."""
