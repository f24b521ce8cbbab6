"""Helpers for tests and benchmarks that need several ranks on one machine."""
from overlap.testing.distributed import (DistributedTimeout, assert_ranks_pass, RankFailed, free_port, gpu_world_sizes,
                                         run_distributed, SAFE_ENV)

__all__ = ["DistributedTimeout", "assert_ranks_pass", "RankFailed", "free_port", "gpu_world_sizes", "run_distributed", "SAFE_ENV"]
