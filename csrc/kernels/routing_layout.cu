// One thread block computes the whole layout: a token's slot in a rank is a prefix count over
// *all* earlier tokens, and one block scanning 1024 contiguous chunks does that without any
// inter-block synchronisation. At the sizes EP uses (<= tens of thousands of tokens, <= 64
// ranks) this is a few microseconds, well below the all-to-all it prepares.
#include <cub/block/block_scan.cuh>

#include "routing_layout.cuh"

namespace overlap {
namespace {

constexpr int kThreads = 1024;
constexpr int kMaxExperts = 4096;  // shared-memory histogram size

template <typename IdxT>
__global__ void __launch_bounds__(kThreads, 1)
routing_layout_kernel(const IdxT* __restrict__ topk_idx, int64_t num_tokens, int topk, int num_experts,
                      int num_ranks, int* __restrict__ num_tokens_per_rank, int* __restrict__ num_tokens_per_expert,
                      bool* __restrict__ is_token_in_rank, int* __restrict__ token_slot_in_rank) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int expert_hist[kMaxExperts];

  const int tid = threadIdx.x;
  const int experts_per_rank = num_experts / num_ranks;
  const int64_t chunk = (num_tokens + kThreads - 1) / kThreads;
  const int64_t start = static_cast<int64_t>(tid) * chunk;
  const int64_t begin = start < num_tokens ? start : num_tokens;
  const int64_t end = begin + chunk < num_tokens ? begin + chunk : num_tokens;

  for (int e = tid; e < num_experts; e += kThreads) expert_hist[e] = 0;
  __syncthreads();
  for (int64_t t = begin; t < end; ++t) {
    for (int j = 0; j < topk; ++j) {
      const int64_t e = static_cast<int64_t>(topk_idx[t * topk + j]);
      if (e >= 0) atomicAdd(&expert_hist[e], 1);
    }
  }

  // One pass per destination rank: count my chunk's tokens, block-scan, write slots.
  for (int r = 0; r < num_ranks; ++r) {
    const int64_t lo = static_cast<int64_t>(r) * experts_per_rank, hi = lo + experts_per_rank;
    int mine = 0;
    for (int64_t t = begin; t < end; ++t) {
      bool hit = false;
      for (int j = 0; j < topk; ++j) {
        const int64_t e = static_cast<int64_t>(topk_idx[t * topk + j]);
        hit |= (e >= lo && e < hi);
      }
      mine += hit;
    }
    int prefix, total;
    BlockScan(scan_storage).ExclusiveSum(mine, prefix, total);
    __syncthreads();  // scan_storage is reused by the next rank's scan
    for (int64_t t = begin; t < end; ++t) {
      bool hit = false;
      for (int j = 0; j < topk; ++j) {
        const int64_t e = static_cast<int64_t>(topk_idx[t * topk + j]);
        hit |= (e >= lo && e < hi);
      }
      is_token_in_rank[t * num_ranks + r] = hit;
      token_slot_in_rank[t * num_ranks + r] = hit ? prefix++ : -1;
    }
    if (tid == 0) num_tokens_per_rank[r] = total;
  }
  __syncthreads();
  for (int e = tid; e < num_experts; e += kThreads) num_tokens_per_expert[e] = expert_hist[e];
}

}  // namespace

template <typename IdxT>
int launch_routing_layout(const IdxT* topk_idx, int64_t num_tokens, int topk, int num_experts, int num_ranks,
                          int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                          int* token_slot_in_rank, cudaStream_t stream) {
  if (num_tokens < 0 || topk < 1 || num_ranks < 1 || num_experts < num_ranks || num_experts % num_ranks != 0 ||
      num_experts > kMaxExperts) {
    return kBadArgument;
  }
  routing_layout_kernel<IdxT><<<1, kThreads, 0, stream>>>(topk_idx, num_tokens, topk, num_experts, num_ranks,
                                                         num_tokens_per_rank, num_tokens_per_expert,
                                                         is_token_in_rank, token_slot_in_rank);
  return cudaGetLastError() == cudaSuccess ? kOk : kLaunchFailed;
}

template int launch_routing_layout<int64_t>(const int64_t*, int64_t, int, int, int, int*, int*, bool*, int*,
                                            cudaStream_t);
template int launch_routing_layout<int32_t>(const int32_t*, int64_t, int, int, int, int*, int*, bool*, int*,
                                            cudaStream_t);

}  // namespace overlap
