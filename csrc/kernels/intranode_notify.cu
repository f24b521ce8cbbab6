// Counts exchange before a dispatch: one block publishes this rank's per-destination token
// counts into every peer's signal area and collects everyone's, with the same ready/done
// handshake (and the same bounded waits) as dispatch and combine. The host then reads the
// matrix once to size the dispatch outputs exactly.
#include "intranode_device.cuh"

namespace overlap {
namespace intranode {
namespace {

using namespace dev;

constexpr int kNotifyThreads = 128;

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(const CommonParams c, const int* send_counts, int* out) {
  __shared__ int64_t s_peer[kMaxRanks];
  __shared__ int s_flag;
  const int tid = threadIdx.x, W = c.num_ranks;
  if (tid < W) s_peer[tid] = c.peer_bases[tid];
  __syncthreads();
  const int64_t my_base = s_peer[c.rank];
  if (block_sees_sticky_error(my_base, &s_flag)) return;
  if (!ready_handshake(c, s_peer, kNotify, &s_flag)) return;
  // Row `rank` of every peer's matrix gets this rank's counts.
  for (int i = tid; i < W * W; i += kNotifyThreads) {
    const int peer = i / W, dst = i % W;
    int* row = reinterpret_cast<int*>(s_peer[peer] + kCountsOffset) + c.rank * kMaxRanks;
    row[dst] = send_counts[dst];
  }
  signal_done(c, s_peer);
  if (!wait_all_done(c, s_peer, kNotify, &s_flag)) return;
  const int* mine = reinterpret_cast<const int*>(my_base + kCountsOffset);
  for (int i = tid; i < W * W; i += kNotifyThreads) out[i] = ld_coherent(mine + (i / W) * kMaxRanks + i % W);
}

}  // namespace

int launch_notify(const CommonParams& c, const int* send_counts, int* out, cudaStream_t stream) {
  if (!common_params_ok(c) || c.num_blocks != 1 || send_counts == nullptr || out == nullptr) return kBadArgument;
  notify_kernel<<<1, kNotifyThreads, 0, stream>>>(c, send_counts, out);
  return record_launch();
}

}  // namespace intranode
}  // namespace overlap
