// Counts exchange before a dispatch: one block publishes this rank's per-destination token
// counts into every peer's signal area, raises counts_flag[me] there, and collects everyone's,
// with the same ready handshake (and the same bounded waits) as dispatch and combine. The host
// then reads the matrix once to size the dispatch outputs exactly, unless the caller gave a
// worst-case budget (then nothing leaves the GPU).
#include "intranode_device.cuh"

namespace overlap {
namespace intranode {
namespace {

using namespace dev;

constexpr int kNotifyThreads = 128;

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(const CommonParams c, const int* send_counts, int* out) {
  __shared__ int64_t s_peer[kMaxRanks];
  __shared__ uint64_t s_seq;
  __shared__ int s_flag;
  const int tid = threadIdx.x, W = c.num_ranks;
  if (tid < W) s_peer[tid] = c.peer_bases[tid];
  __syncthreads();
  const int64_t my_base = s_peer[c.rank];
  const uint64_t seq = begin_operation(my_base, &s_seq);
  if (block_sees_sticky_error(my_base, &s_flag)) return;
  if (!ready_handshake(c, s_peer, seq, kNotify, &s_flag)) return;
  // Row `rank` of every peer's matrix gets this rank's counts, then its flag (after the barrier).
  for (int i = tid; i < W * W; i += kNotifyThreads) {
    const int peer = i / W, dst = i % W;
    int* row = reinterpret_cast<int*>(s_peer[peer] + kCountsOffset) + c.rank * kMaxRanks;
    row[dst] = send_counts[dst];
  }
  __syncthreads();
  if (tid < W) st_release_sys(signal_word(s_peer[tid], kCountsFlagOffset, c.rank), seq);
  if (tid == 0) s_flag = 0;
  __syncthreads();
  if (tid < W && !wait_at_least(signal_word(my_base, kCountsFlagOffset, tid), seq, c.timeout_ns)) {
    record_failure(c, my_base, seq, kDataTimeout, tid, kNotify);
    atomicExch(&s_flag, 1);
  }
  __syncthreads();
  if (s_flag != 0) return;
  const int* mine = reinterpret_cast<const int*>(my_base + kCountsOffset);
  for (int i = tid; i < W * W; i += kNotifyThreads) out[i] = ld_coherent(mine + (i / W) * kMaxRanks + i % W);
  end_operation(my_base, seq);
}

}  // namespace

int launch_notify(const CommonParams& c, const int* send_counts, int* out, cudaStream_t stream) {
  if (!common_params_ok(c) || c.num_blocks != 1 || send_counts == nullptr || out == nullptr) return kBadArgument;
  notify_kernel<<<1, kNotifyThreads, 0, stream>>>(c, send_counts, out);
  return record_launch();
}

}  // namespace intranode
}  // namespace overlap
