// Low-latency combine: the expert side sums its local experts' outputs per (token, rank) in fp32
// with the dispatched weights and sends one bf16 row back; the hook sums the rows of all ranks
// per token in fp32. See ll.cuh.
#include "ll_device.cuh"

namespace overlap {
namespace ll {
namespace {

using namespace dev;
constexpr int kIters = kChunk / 256;

constexpr int kRowsPerStep = 4;   // rows whose loads are in flight together

// acc += w_k * row_k[c0, c0 + kChunk) over the rows the warp-uniform mask `todo` selects, in
// ascending k, kRowsPerStep rows' loads in flight per step (one row per step paid a full memory
// round trip per row; at top-8 a rank rarely holds more than 4 of a token's experts). `row(k)`
// returns the row's first channel and its weight; it may shuffle, so every lane calls it.
// kCoherent: the rows were written by another GPU (L2 loads); otherwise they are read-only for
// the kernel's lifetime (the non-coherent path).
template <bool kCoherent, typename RowFn>
__device__ __forceinline__ void accumulate_rows(unsigned todo, RowFn row, int64_t c0, int64_t H, int lane,
                                                float (&acc)[kIters][8]) {
  while (todo != 0) {
    int ks[kRowsPerStep];
#pragma unroll
    for (int h = 0; h < kRowsPerStep; ++h) {
      ks[h] = todo != 0 ? __ffs(todo) - 1 : -1;
      todo &= todo - 1;   // 0 stays 0
    }
    int4 v[kRowsPerStep][kIters];
    float w[kRowsPerStep];
#pragma unroll
    for (int h = 0; h < kRowsPerStep; ++h) {
      const bool use = ks[h] >= 0;
      const auto [src, weight] = row(use ? ks[h] : ks[0]);
      w[h] = weight;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t ch = c0 + (it * 32 + lane) * 8;
        const int4* p = reinterpret_cast<const int4*>(src + ch);
        v[h][it] = use && ch < H ? (kCoherent ? __ldcg(p) : __ldg(p)) : make_int4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int h = 0; h < kRowsPerStep; ++h) {
      if (ks[h] < 0) break;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        float f[8];
        unpack8(v[h][it], f);
#pragma unroll
        for (int u = 0; u < 8; ++u) acc[it][u] += w[h] * f[u];
      }
    }
  }
}

struct RowRef {
  const __nv_bfloat16* src;
  float weight;
};

// Lane k < K: entry k of received row j (local expert, weight, row in the expert's block).
struct RowEntry {
  int expert = -1;
  int pos = 0;
  float weight = 0.f;
};

__device__ __forceinline__ RowEntry load_entry(const CombineSendParams& p, int64_t j, int lane) {
  RowEntry r;
  if (lane < p.c.topk && j < static_cast<int64_t>(p.c.num_ranks) * p.c.max_tokens) {
    const int64_t i = j * p.c.topk + lane;
    r.expert = p.row_expert[i];
    r.pos = p.row_pos[i];
    r.weight = p.row_weight[i];
  }
  return r;
}

__global__ void __launch_bounds__(kSendThreads) combine_send_kernel(CombineSendParams p) {
  __shared__ uint64_t s_n;
  __shared__ int s_flag;
  __shared__ int s_src[kMaxRanks];
  const Common& c = p.c;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int M = static_cast<int>(c.max_tokens), rows = c.num_ranks * M;
  const int64_t H = c.hidden;
  const int chunks = static_cast<int>((H + kChunk - 1) / kChunk);
  const int task_stride = static_cast<int>(gridDim.x) * (kSendThreads / 32);
  // Inputs first (the dispatch hook wrote them; they do not depend on the slot being free), so
  // their round trip overlaps the prologue's.
  const int src_count = tid < c.num_ranks ? p.src_counts[tid] : 0;
  int task = static_cast<int>(blockIdx.x) * (kSendThreads / 32) + warp;
  RowEntry entry = load_entry(p, task / chunks, lane);
  if (!pack_begin(c, kCombineSend, &s_n, &s_flag)) return;
  const unsigned arrival = pack_arrive(c);
  if (tid < c.num_ranks) s_src[tid] = src_count;
  __syncthreads();
  stamp(c, 0, kStampSetup);
  const __nv_bfloat16* y = static_cast<const __nv_bfloat16*>(p.y);
  for (bool first = true; task < rows * chunks; task += task_stride, first = false) {
    const int j = task / chunks;
    if (!first) entry = load_entry(p, j, lane);
    const int r = j / M, i = j - r * M;
    if (i >= s_src[r]) continue;
    const int64_t c0 = static_cast<int64_t>(task % chunks) * kChunk;
    const unsigned todo = __ballot_sync(0xffffffffu, entry.expert >= 0);   // the k with a local expert
    float acc[kIters][8];
#pragma unroll
    for (int it = 0; it < kIters; ++it)
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[it][u] = 0.f;
    accumulate_rows<false>(todo, [&](int k) {
      const int e = __shfl_sync(0xffffffffu, entry.expert, k);
      const int pos = __shfl_sync(0xffffffffu, entry.pos, k);
      return RowRef{y + (static_cast<int64_t>(e) * rows + pos) * H, __shfl_sync(0xffffffffu, entry.weight, k)};
    }, c0, H, lane, acc);
    char* dst = send_region(c, r) + kRegionHeader + static_cast<int64_t>(i) * c.row_stride;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t ch = c0 + (it * 32 + lane) * 8;
      if (ch < H) reinterpret_cast<int4*>(dst)[ch / 8] = pack8(acc[it]);
    }
  }
  stamp(c, 0, kStampRows);
  pack_end(c, s_n, arrival, &s_flag);
}

__global__ void __launch_bounds__(kSendThreads) combine_recv_kernel(CombineRecvParams p) {
  __shared__ uint64_t s_e;
  __shared__ int s_flag;
  const Common& c = p.c;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = c.num_ranks;
  const int64_t H = c.hidden;
  const int chunks = static_cast<int>((H + kChunk - 1) / kChunk);
  const int num_tasks = p.num_tokens * chunks;
  const int task_stride = static_cast<int>(gridDim.x) * (kSendThreads / 32);
  // The dispatch's token slots are local and final: load them before waiting for arrival.
  int task = static_cast<int>(blockIdx.x) * (kSendThreads / 32) + warp;
  int my_slot = lane < W && task < num_tasks ? p.token_slot[(task / chunks) * W + lane] : -1;
  const bool wait_flags = p.wait_flags != 0;
  if (!hook_begin(c, wait_flags, kCombineRecv, &s_e, &s_flag)) return;
  stamp(c, 1, kStampSetup);
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  for (bool first = true; task < num_tasks; task += task_stride, first = false) {
    const int t = task / chunks;
    const int64_t c0 = static_cast<int64_t>(task % chunks) * kChunk;
    if (!first) my_slot = lane < W ? p.token_slot[t * W + lane] : -1;
    const unsigned from = __ballot_sync(0xffffffffu, my_slot >= 0);
    float acc[kIters][8];
#pragma unroll
    for (int it = 0; it < kIters; ++it)
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[it][u] = 0.f;
    // Sum the rows of every source that got the token (weights were applied on the expert side).
    accumulate_rows<true>(from, [&](int d) {
      const int row = __shfl_sync(0xffffffffu, my_slot, d);
      return RowRef{reinterpret_cast<const __nv_bfloat16*>(recv_region(c, d) + kRegionHeader + row * c.row_stride),
                    1.f};
    }, c0, H, lane, acc);
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t ch = c0 + (it * 32 + lane) * 8;
      if (ch < H) reinterpret_cast<int4*>(out + static_cast<int64_t>(t) * H)[ch / 8] = pack8(acc[it]);
    }
  }
  stamp(c, 1, kStampRows);
  hook_end(c);
}

}  // namespace

int launch_combine_send(const CombineSendParams& p, cudaStream_t stream) {
  const Common& c = p.c;
  if (!common_ok(c) || p.y == nullptr || p.row_pos == nullptr || p.row_expert == nullptr || p.row_weight == nullptr ||
      p.src_counts == nullptr || c.row_stride < c.hidden * 2 || reinterpret_cast<uint64_t>(p.y) % 16 != 0) {
    return kBadArgument;
  }
  const int64_t chunks = (c.hidden + kChunk - 1) / kChunk;
  combine_send_kernel<<<grid_for_warps(c.num_ranks * c.max_tokens * chunks), kSendThreads, 0, stream>>>(p);
  return intranode::record_launch();
}

int launch_combine_recv(const CombineRecvParams& p, cudaStream_t stream) {
  const Common& c = p.c;
  if (!common_ok(c) || (p.num_tokens > 0 && (p.token_slot == nullptr || p.out == nullptr)) || p.num_tokens < 0 ||
      p.num_tokens > c.max_tokens || c.row_stride < c.hidden * 2 || reinterpret_cast<uint64_t>(p.out) % 16 != 0) {
    return kBadArgument;
  }
  // The grid is sized for max_tokens, not this batch: every rank launches the same one (hook_blocks).
  combine_recv_kernel<<<hook_blocks(c), kSendThreads, 0, stream>>>(p);
  return intranode::record_launch();
}

}  // namespace ll
}  // namespace overlap
