// Block 0 computes the ranks' side of the layout: a token's slot in a rank is a prefix count over
// *all* earlier tokens, and one block walking the tokens in rounds of 1024 does that without any
// inter-block synchronisation. Thread i of a round owns token round * 1024 + i (a thread per
// contiguous chunk of tokens, the earlier split, took ~40 us for 4096 tokens x top-8 on 4 H200).
// Within a round, a warp's tokens are ranked by ballot + popc, warps by one warp-wide scan per
// rank. The other blocks count tokens per expert, a slice of tokens each, into an output the
// launcher zeroes (in block 0 that histogram cost ~10% of the kernel). Block 0 still takes ~23 us
// at 1.5 GHz for 4096 tokens x top-8 (ncu, H200, W=2): each lane reads its own token's k ids,
// 64 bytes apart across the warp (L1/TEX throughput 28% of the whole GPU from this one SM); a
// coalesced load of the warp's ids through shared memory is the next step.
#include <algorithm>

#include <cub/warp/warp_scan.cuh>

#include "routing_layout.cuh"

namespace overlap {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kRanksPerPass = 32;  // one warp scans one rank's per-warp counts: 32 warps, 32 ranks
constexpr int kMaxExperts = 4096;  // shared-memory histogram size (ids fit an int)
constexpr int kIdsPerLoad = 8;     // routing ids a thread loads at once (top-8 in one batch)
constexpr int kHistTokens = 256;   // tokens per histogram block (a few atomics per thread)
constexpr int kMaxHistBlocks = 64;  // beyond that a block takes several slices

template <typename IdxT>
__global__ void __launch_bounds__(kThreads, 1)
routing_layout_kernel(const IdxT* __restrict__ topk_idx, int64_t num_tokens, int topk, int num_experts,
                      int num_ranks, int* __restrict__ num_tokens_per_rank, int* __restrict__ num_tokens_per_expert,
                      bool* __restrict__ is_token_in_rank, int* __restrict__ token_slot_in_rank) {
  using WarpScan = cub::WarpScan<int>;
  __shared__ typename WarpScan::TempStorage scan_storage[kWarps];
  __shared__ int expert_hist[kMaxExperts];            // histogram blocks only
  __shared__ short rank_of[kMaxExperts];             // expert -> rank: one table read, not a division per id
  __shared__ int warp_count[kRanksPerPass][kWarps];  // tokens of (rank, warp) in this round; then their offsets
  __shared__ int running[kRanksPerPass];             // tokens of each rank in earlier rounds

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int experts_per_rank = num_experts / num_ranks;

  if (blockIdx.x > 0) {
    // Tokens per expert: slices of kHistTokens tokens (grid-strided over the histogram blocks),
    // the routing ids read flat and coalesced, summed into the output the launcher zeroed.
    for (int e = tid; e < num_experts; e += kThreads) expert_hist[e] = 0;
    __syncthreads();
    const int64_t entries = num_tokens * topk, slice = static_cast<int64_t>(kHistTokens) * topk;
    for (int64_t s0 = (blockIdx.x - 1) * slice; s0 < entries; s0 += (gridDim.x - 1) * slice) {
      const int64_t end = s0 + slice < entries ? s0 + slice : entries;
      for (int64_t i = s0 + tid; i < end; i += kThreads) {
        const int64_t e = static_cast<int64_t>(topk_idx[i]);
        if (e >= 0 && e < num_experts) atomicAdd(&expert_hist[e], 1);
      }
    }
    __syncthreads();
    for (int e = tid; e < num_experts; e += kThreads) {
      if (expert_hist[e] != 0) atomicAdd(&num_tokens_per_expert[e], expert_hist[e]);
    }
    return;
  }
  for (int e = tid; e < num_experts; e += kThreads) rank_of[e] = static_cast<short>(e / experts_per_rank);
  for (int r0 = 0; r0 < num_ranks; r0 += kRanksPerPass) {
    const int ranks = num_ranks - r0 < kRanksPerPass ? num_ranks - r0 : kRanksPerPass;
    if (tid < kRanksPerPass) running[tid] = 0;
    __syncthreads();
    for (int64_t base = 0; base < num_tokens; base += kThreads) {
      const int64_t t = base + tid;
      unsigned hits = 0;  // bit i: the token goes to rank r0 + i
      if (t < num_tokens) {
        // A token's ids are loaded in batches before any is tested, so their loads are in flight
        // together (the loop count is a runtime value: the compiler would not batch them itself).
        const IdxT* row = topk_idx + t * topk;
        for (int j0 = 0; j0 < topk; j0 += kIdsPerLoad) {
          IdxT ids[kIdsPerLoad];
#pragma unroll
          for (int j = 0; j < kIdsPerLoad; ++j) ids[j] = j0 + j < topk ? row[j0 + j] : IdxT(-1);
#pragma unroll
          for (int j = 0; j < kIdsPerLoad; ++j) {
            // Unvalidated garbage is ignored like -1, compared at full width as the histogram
            // blocks do (narrowed first, an int64 id of 2^32 + 5 would have counted as expert 5).
            if (ids[j] < 0 || ids[j] >= num_experts) continue;
            const int i = rank_of[ids[j]] - r0;
            if (i >= 0 && i < ranks) hits |= 1u << i;
          }
        }
      }
      for (int i = 0; i < ranks; ++i) {
        const unsigned b = __ballot_sync(0xffffffffu, (hits >> i) & 1u);
        if (lane == 0) warp_count[i][warp] = __popc(b);
      }
      __syncthreads();
      // Warp i turns rank r0 + i's per-warp counts into offsets (its lane w: warp w).
      if (warp < ranks) {
        int offset, total;
        WarpScan(scan_storage[warp]).ExclusiveSum(warp_count[warp][lane], offset, total);
        warp_count[warp][lane] = running[warp] + offset;
        __syncwarp();
        if (lane == 0) running[warp] += total;
      }
      __syncthreads();
      for (int i = 0; i < ranks; ++i) {
        const bool hit = (hits >> i) & 1u;  // 0 past the last token
        const unsigned b = __ballot_sync(0xffffffffu, hit);
        if (t < num_tokens) {
          const int64_t at = t * num_ranks + r0 + i;
          is_token_in_rank[at] = hit;
          token_slot_in_rank[at] = hit ? warp_count[i][warp] + __popc(b & lanes_below) : -1;
        }
      }
      __syncthreads();  // warp_count is rewritten by the next round
    }
    if (tid < ranks) num_tokens_per_rank[r0 + tid] = running[tid];
    __syncthreads();  // running is reset by the next pass
  }
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
  if (cudaMemsetAsync(num_tokens_per_expert, 0, sizeof(int) * num_experts, stream) != cudaSuccess) return kLaunchFailed;
  const int64_t hist_blocks = std::min<int64_t>((num_tokens + kHistTokens - 1) / kHistTokens, kMaxHistBlocks);
  routing_layout_kernel<IdxT><<<static_cast<unsigned>(1 + hist_blocks), kThreads, 0, stream>>>(
      topk_idx, num_tokens, topk, num_experts, num_ranks, num_tokens_per_rank, num_tokens_per_expert,
      is_token_in_rank, token_slot_in_rank);
  return cudaGetLastError() == cudaSuccess ? kOk : kLaunchFailed;
}

template int launch_routing_layout<int64_t>(const int64_t*, int64_t, int, int, int, int*, int*, bool*, int*,
                                            cudaStream_t);
template int launch_routing_layout<int32_t>(const int32_t*, int64_t, int, int, int, int*, int*, bool*, int*,
                                            cudaStream_t);

}  // namespace overlap
