// Low-latency dispatch: the pack kernel (routing slots, optional FP8 cast, rows to peers or to
// staging) and the receive hook kernel (wait for arrival, per-expert unpack). See ll.cuh.
#include "ll_device.cuh"

namespace overlap {
namespace ll {
namespace {

using namespace dev;

// Which ranks token t goes to (bit d: one of its experts lives on rank d). All k ids are loaded
// before any is tested: testing each as it arrives cost one memory round trip per k.
__device__ __forceinline__ uint32_t token_mask(const DispatchSendParams& p, int t) {
  const int K = p.c.topk, L = p.c.num_local_experts;
  const int64_t num_experts = static_cast<int64_t>(L) * p.c.num_ranks;   // <= 2^30 (checked at launch)
  int64_t ids[kMaxTopk];
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) ids[k] = k < K ? p.topk_idx[static_cast<int64_t>(t) * K + k] : -1;
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) {
    // Ids outside [0, E) are ignored like -1 (the Python side validates them when it may sync).
    if (ids[k] >= 0 && ids[k] < num_experts) m |= 1u << (static_cast<int>(ids[k]) / L);
  }
  return m;
}

// Row of token t in rank d's region: tokens are packed in source order.
__device__ __forceinline__ int slot_of(const uint32_t* s_mask, const int* s_chunk, int num_ranks, int t, int d) {
  const uint32_t m = s_mask[t];
  if (!((m >> d) & 1u)) return -1;
  int pos = s_chunk[(t >> 5) * num_ranks + d];
  for (int j = t & ~31; j < t; ++j) pos += (s_mask[j] >> d) & 1u;
  return pos;
}

__global__ void __launch_bounds__(kSendThreads) dispatch_send_kernel(DispatchSendParams p) {
  __shared__ uint32_t s_mask[kMaxTokens];
  __shared__ int s_chunk[(kMaxTokens / 32) * kMaxRanks];  // exclusive prefix per 32-token chunk
  __shared__ int s_total[kMaxRanks];
  __shared__ uint64_t s_n;
  __shared__ int s_flag;
  const Common& c = p.c;
  if (!pack_begin(c, kDispatchSend, &s_n, &s_flag)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, W = c.num_ranks, T = p.num_tokens;

  // Routing slots, recomputed by every block (a few KB of topk_idx from L2) so no grid sync is needed.
  for (int t = tid; t < T; t += blockDim.x) s_mask[t] = token_mask(p, t);
  __syncthreads();
  const int num_chunks = (T + 31) / 32;
  for (int ch = warp; ch < num_chunks; ch += blockDim.x / 32) {
    const int t = ch * 32 + lane;
    const uint32_t m = t < T ? s_mask[t] : 0u;
    for (int d = 0; d < W; ++d) {
      const int n = __popc(__ballot_sync(0xffffffffu, (m >> d) & 1u));
      if (lane == 0) s_chunk[ch * W + d] = n;
    }
  }
  __syncthreads();
  if (tid < W) {
    int acc = 0;
    for (int ch = 0; ch < num_chunks; ++ch) {
      const int n = s_chunk[ch * W + tid];
      s_chunk[ch * W + tid] = acc;
      acc += n;
    }
    s_total[tid] = acc;
  }
  __syncthreads();
  if (blockIdx.x == 0) {
    if (tid < W) *reinterpret_cast<int*>(send_region(c, tid)) = s_total[tid];
    for (int i = tid; i < T * W; i += blockDim.x) p.token_slot[i] = slot_of(s_mask, s_chunk, W, i / W, i % W);
  }

  // Rows: one warp per (token, 1024-channel chunk).
  const int64_t H = c.hidden;
  const int chunks = static_cast<int>((H + kChunk - 1) / kChunk);
  const int64_t num_tasks = static_cast<int64_t>(T) * chunks;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  for (int64_t task = static_cast<int64_t>(blockIdx.x) * (kSendThreads / 32) + warp; task < num_tasks;
       task += static_cast<int64_t>(gridDim.x) * (kSendThreads / 32)) {
    const int t = static_cast<int>(task / chunks), ck = static_cast<int>(task % chunks);
    const int my_slot = lane < W ? slot_of(s_mask, s_chunk, W, t, lane) : -1;
    const unsigned dests = __ballot_sync(0xffffffffu, my_slot >= 0);
    if (dests == 0) continue;
    const int64_t c0 = static_cast<int64_t>(ck) * kChunk;
    constexpr int kIters = kChunk / 256;  // 32 lanes x 8 channels per iteration
    int4 v[kIters];
    int2 q[kIters];
    float scale[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t ch = c0 + (it * 32 + lane) * 8;
      v[it] = ch < H ? __ldg(reinterpret_cast<const int4*>(x + t * H + ch)) : make_int4(0, 0, 0, 0);
    }
    if (p.fp8) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        float f[8];
        unpack8(v[it], f);
        float amax = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(f[i]));
#pragma unroll
        for (int off = 8; off >= 1; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        scale[it] = amax > 0.f ? __fdiv_rn(amax, 448.f) : 1.f;
        const float inv = __frcp_rn(scale[it]);
        __nv_fp8x2_storage_t pairs[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          pairs[i] = __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(f[2 * i], inv), __fmul_rn(f[2 * i + 1], inv)),
                                              __NV_SATFINITE, __NV_E4M3);
        }
        q[it].x = static_cast<int>(pairs[0] | (static_cast<uint32_t>(pairs[1]) << 16));
        q[it].y = static_cast<int>(pairs[2] | (static_cast<uint32_t>(pairs[3]) << 16));
      }
    }
    for (unsigned m = dests; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      const int row = __shfl_sync(0xffffffffu, my_slot, d);
      char* dst = send_region(c, d) + kRegionHeader + static_cast<int64_t>(row) * c.row_stride;
      if (ck == 0 && lane < c.topk) {
        const int64_t e = p.topk_idx[static_cast<int64_t>(t) * c.topk + lane];
        const bool here = e >= 0 && e / c.num_local_experts == d;
        const float w = here ? p.topk_weights[static_cast<int64_t>(t) * c.topk + lane] : 0.f;
        reinterpret_cast<int2*>(dst)[lane] =
            make_int2(here ? static_cast<int>(e % c.num_local_experts) : -1, __float_as_int(w));
      }
      char* payload = dst + p.header_bytes;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t ch = c0 + (it * 32 + lane) * 8;
        if (ch >= H) continue;
        if (p.fp8) {
          reinterpret_cast<int2*>(payload)[ch / 8] = q[it];
          if ((lane & 15) == 0) reinterpret_cast<float*>(payload + H)[ch / kFp8Block] = scale[it];
        } else {
          reinterpret_cast<int4*>(payload)[ch / 8] = v[it];
        }
      }
    }
  }
  pack_end(c, s_n, &s_flag);
}

// One block per local expert: finds the rows routed to it (ordered by source rank, then source
// token), copies them into its block of recv_x and records where each (row, k) went.
__global__ void __launch_bounds__(kUnpackThreads) dispatch_recv_kernel(DispatchRecvParams p) {
  __shared__ uint64_t s_e;
  __shared__ int s_flag;
  __shared__ int s_n[kMaxRanks];
  __shared__ int s_warp[kUnpackThreads / 32 + 1];
  __shared__ const int4* s_src[kUnpackThreads];   // payload of each row found in this window
  const Common& c = p.c;
  if (!hook_begin(c, p.wait_flags != 0, kDispatchRecv, &s_e, &s_flag)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, W = c.num_ranks, K = c.topk;
  const int e = blockIdx.x;
  const int64_t M = c.max_tokens, rows = W * M, H = c.hidden, L = c.num_local_experts;
  if (tid < W) s_n[tid] = __ldcg(reinterpret_cast<const int*>(recv_region(c, tid)));
  __syncthreads();
  auto row_ptr = [&](int64_t j) {
    return recv_region(c, static_cast<int>(j / M)) + kRegionHeader + (j % M) * c.row_stride;
  };

  int running = 0;
  for (int64_t base = 0; base < rows; base += kUnpackThreads) {
    const int64_t j = base + tid;
    unsigned kmask = 0;  // the k whose expert is e (one, unless the routing repeats e)
    if (j < rows && (j % M) < s_n[j / M]) {
      const int2* hdr = reinterpret_cast<const int2*>(row_ptr(j));
      for (int k = 0; k < K; ++k) {
        if (__ldcg(&hdr[k].x) == e) kmask |= 1u << k;
      }
    }
    const unsigned bal = __ballot_sync(0xffffffffu, kmask != 0);
    if (lane == 0) s_warp[warp] = __popc(bal);
    __syncthreads();
    if (tid == 0) {
      int acc = 0;
      for (int w = 0; w < kUnpackThreads / 32; ++w) {
        const int n = s_warp[w];
        s_warp[w] = acc;
        acc += n;
      }
      s_warp[kUnpackThreads / 32] = acc;
    }
    __syncthreads();
    if (kmask != 0) {
      const int local = s_warp[warp] + __popc(bal & ((1u << lane) - 1u));
      s_src[local] = reinterpret_cast<const int4*>(row_ptr(j) + p.header_bytes);
      for (unsigned m = kmask; m != 0; m &= m - 1) p.row_pos[j * K + (__ffs(m) - 1)] = running + local;
    }
    __syncthreads();
    const int found = s_warp[kUnpackThreads / 32];
    // Copy the found rows with every thread of the block, kCopyUnroll 16-byte words per thread
    // and step, all loads issued before any store. (One warp per row, one load in flight per
    // lane, made this kernel latency-bound: ~24 us for 128 tokens x 7168 on 2 H200.) The
    // expert's rows are contiguous in recv_x, so word w of the window lands at out + w.
    const int words = static_cast<int>(p.fp8 ? H / 16 : H / 8);   // 16-byte words of values per row
    const int total = found * words;
    int4* out = reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + (e * rows + running) * words * 16);
    for (int w0 = tid; w0 < total; w0 += kUnpackThreads * kCopyUnroll) {
      int4 v[kCopyUnroll];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int w = w0 + u * kUnpackThreads;
        v[u] = w < total ? __ldcg(s_src[w / words] + w % words) : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int w = w0 + u * kUnpackThreads;
        if (w < total) out[w] = v[u];
      }
    }
    if (p.fp8) {
      const int per_row = static_cast<int>(H / kFp8Block);   // fp32 scales after the H value bytes
      float* ds = p.recv_scales + (e * rows + running) * per_row;
      for (int w = tid; w < found * per_row; w += kUnpackThreads) {
        ds[w] = __ldcg(reinterpret_cast<const float*>(reinterpret_cast<const char*>(s_src[w / per_row]) + H) +
                       w % per_row);
      }
    }
    running += found;
    __syncthreads();  // s_warp / s_src are reused by the next window
  }
  if (tid == 0) p.counts[e] = running;
  if (e == 0 && tid < W) p.src_counts[tid] = s_n[tid];
  // Per-row metadata for the combine, rows strided over the blocks (row_pos of matched entries
  // was written above by the expert's block).
  for (int64_t j = e + static_cast<int64_t>(tid) * L; j < rows; j += static_cast<int64_t>(kUnpackThreads) * L) {
    const bool valid = (j % M) < s_n[j / M];
    const int2* hdr = reinterpret_cast<const int2*>(row_ptr(j));
    for (int k = 0; k < K; ++k) {
      int2 h = valid ? __ldcg(&hdr[k]) : make_int2(-1, 0);
      p.row_expert[j * K + k] = h.x;
      p.row_weight[j * K + k] = h.x >= 0 ? __int_as_float(h.y) : 0.f;
      if (h.x < 0) p.row_pos[j * K + k] = -1;
    }
  }
  hook_end(c, s_e, &s_flag);
}

}  // namespace

int launch_dispatch_send(const DispatchSendParams& p, cudaStream_t stream) {
  const Common& c = p.c;
  // An empty batch still launches: its (empty) regions, flags and acks keep the ranks in step.
  const bool need_ptrs = p.num_tokens > 0;
  if (!common_ok(c) || (need_ptrs && (p.x == nullptr || p.topk_idx == nullptr || p.topk_weights == nullptr ||
                                      p.token_slot == nullptr)) || p.num_tokens < 0 || p.num_tokens > c.max_tokens || p.header_bytes % 16 != 0 ||
      p.header_bytes < c.topk * 8 || c.num_local_experts * c.num_ranks > (1 << 30) ||
      reinterpret_cast<uint64_t>(p.x) % 16 != 0 || c.mode < 0 || c.mode > 2) {
    return kBadArgument;
  }
  const int64_t payload = p.fp8 ? c.hidden + c.hidden / kFp8Block * 4 : c.hidden * 2;
  if (c.row_stride < p.header_bytes + payload) return kBadArgument;
  const int64_t chunks = (c.hidden + kChunk - 1) / kChunk;
  const int64_t warps = static_cast<int64_t>(p.num_tokens) * chunks;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((warps + 3) / 4, 1024)));
  dispatch_send_kernel<<<blocks, kSendThreads, 0, stream>>>(p);
  return intranode::record_launch();
}

int launch_dispatch_recv(const DispatchRecvParams& p, cudaStream_t stream) {
  const Common& c = p.c;
  if (!common_ok(c) || p.recv_x == nullptr || p.counts == nullptr || p.row_pos == nullptr ||
      p.row_expert == nullptr || p.row_weight == nullptr || p.src_counts == nullptr ||
      (p.fp8 && p.recv_scales == nullptr) || p.header_bytes % 16 != 0 || p.header_bytes < c.topk * 8 ||
      reinterpret_cast<uint64_t>(p.recv_x) % 16 != 0) {
    return kBadArgument;
  }
  dispatch_recv_kernel<<<c.num_local_experts, kUnpackThreads, 0, stream>>>(p);
  return intranode::record_launch();
}

}  // namespace ll
}  // namespace overlap
