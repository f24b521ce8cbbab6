// Setup-time helpers of the intranode kernels: checking that every peer's symmetric buffer is
// mapped where we think it is, and keeping the last launch error for the binding's message.
#include "intranode.cuh"

namespace overlap {
namespace intranode {
namespace {

thread_local cudaError_t g_last_launch_error = cudaSuccess;

__global__ void read_peer_u64_kernel(const int64_t* peer_bases, int num_ranks, int64_t offset, uint64_t* out) {
  const int r = threadIdx.x;
  if (r < num_ranks) out[r] = *reinterpret_cast<const volatile uint64_t*>(peer_bases[r] + offset);
}

}  // namespace

int record_launch() {
  const cudaError_t err = cudaGetLastError();
  g_last_launch_error = err;
  return err == cudaSuccess ? kOk : kLaunchFailed;
}

const char* last_launch_error() {
  return g_last_launch_error == cudaSuccess ? "" : cudaGetErrorString(g_last_launch_error);
}

int launch_read_peer_u64(const int64_t* peer_bases, int num_ranks, int64_t offset, uint64_t* out, cudaStream_t stream) {
  if (peer_bases == nullptr || out == nullptr || num_ranks < 1 || num_ranks > kMaxRanks || offset % 8 != 0) {
    return kBadArgument;
  }
  read_peer_u64_kernel<<<1, 32, 0, stream>>>(peer_bases, num_ranks, offset, out);
  return record_launch();
}

}  // namespace intranode
}  // namespace overlap
