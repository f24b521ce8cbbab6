// Shared helpers for overlap's CUDA kernels. No torch headers here, so every kernel compiles
// with plain nvcc on a machine without a GPU (tests/test_nvcc_compile.py does exactly that).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace overlap {

// Status codes kernels and launchers report back; the binding turns them into Python errors.
enum Status : int {
  kOk = 0,
  kBadArgument = 1,
  kTimeout = 2,
  kLaunchFailed = 3,
};

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace overlap
