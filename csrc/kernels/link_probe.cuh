// Link probe: how fast `num_blocks` thread blocks move bytes into another GPU's memory with
// plain 16-byte stores, with nothing else going on (no flags, no fences, no routing). It is the
// ceiling the intranode kernels are judged against on the machine at hand.
#pragma once

#include "common.cuh"

namespace overlap {
namespace probe {

struct CopyProbeParams {
  const void* src = nullptr;  // local, 16-byte aligned (unused when store_only)
  void* dst = nullptr;        // any mapped address (a peer's symmetric buffer), 16-byte aligned
  int64_t bytes = 0;          // a multiple of 16
  int num_blocks = 1;
  int threads = 512;          // a multiple of 32, at most 1024
  int unroll = 8;             // 16-byte vectors per lane in flight: 4, 8 or 16
  bool store_only = false;    // store register values instead of copying src
};

// kOk, kBadArgument or kLaunchFailed (intranode::last_launch_error() has the CUDA error).
int launch_copy_probe(const CopyProbeParams& p, cudaStream_t stream);

}  // namespace probe
}  // namespace overlap
