// Low-latency dispatch: the pack kernel (routing slots, optional FP8 cast, rows to peers or to
// staging) and the receive hook kernel (wait for arrival, per-expert unpack). See ll.cuh.
#include "ll_device.cuh"

namespace overlap {
namespace ll {
namespace {

using namespace dev;

constexpr int kIters = kChunk / 256;   // 16-byte words per lane of a 1024-channel chunk

// The k routing ids of token t (-1 past K, or for t outside the batch). All k loads are issued
// before any is used: testing each as it arrived cost one memory round trip per k.
__device__ __forceinline__ void load_ids(const DispatchSendParams& p, int t, int64_t (&ids)[kMaxTopk]) {
  const int K = p.c.topk;
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) {
    ids[k] = (t < p.num_tokens && k < K) ? p.topk_idx[static_cast<int64_t>(t) * K + k] : -1;
  }
}

// Which ranks a token goes to (bit d: one of its experts lives on rank d).
__device__ __forceinline__ uint32_t rank_mask(const DispatchSendParams& p, const int64_t (&ids)[kMaxTopk]) {
  const int L = p.c.num_local_experts;
  const int64_t num_experts = static_cast<int64_t>(L) * p.c.num_ranks;   // <= 2^30 (checked at launch)
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) {
    // Ids outside [0, E) are ignored like -1 (the Python side validates them when it may sync).
    if (ids[k] >= 0 && ids[k] < num_experts) m |= 1u << (static_cast<int>(ids[k]) / L);   // 32-bit division
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

// What one warp task (token t, channels [c0, c0 + kChunk)) reads: the values, and in lane k < K
// the token's k-th routing entry (for the row header).
struct TaskInputs {
  int4 v[kIters];
  int64_t expert = -1;
  float weight = 0.f;
};

__device__ __forceinline__ void load_task(const DispatchSendParams& p, int task, int chunks, int lane,
                                          TaskInputs& in) {
  const int64_t H = p.c.hidden;
  const int t = static_cast<int>(task / chunks);
  const int64_t c0 = static_cast<int64_t>(task % chunks) * kChunk;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  const bool live = task < p.num_tokens * chunks;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t ch = c0 + (it * 32 + lane) * 8;
    in.v[it] = live && ch < H ? __ldg(reinterpret_cast<const int4*>(x + t * H + ch)) : make_int4(0, 0, 0, 0);
  }
  const bool entry = live && c0 == 0 && lane < p.c.topk;
  in.expert = entry ? p.topk_idx[static_cast<int64_t>(t) * p.c.topk + lane] : -1;
  in.weight = entry ? p.topk_weights[static_cast<int64_t>(t) * p.c.topk + lane] : 0.f;
}

// e4m3 values of 8 channels (as an int2) and the scale of the lane's 128-channel block (16 lanes).
__device__ __forceinline__ int2 quantise8(const int4& v, float* scale) {
  float f[8];
  unpack8(v, f);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(f[i]));
#pragma unroll
  for (int off = 8; off >= 1; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  *scale = idev::fp8_scale(amax);
  const float inv = __frcp_rn(*scale);
  __nv_fp8x2_storage_t pairs[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = idev::fp8x2(f[2 * i], f[2 * i + 1], inv);
  return make_int2(static_cast<int>(pairs[0] | (static_cast<uint32_t>(pairs[1]) << 16)),
                   static_cast<int>(pairs[2] | (static_cast<uint32_t>(pairs[3]) << 16)));
}

__global__ void __launch_bounds__(kSendThreads, 1) dispatch_send_kernel(DispatchSendParams p) {
  __shared__ uint32_t s_mask[kMaxTokens];
  __shared__ int s_chunk[(kMaxTokens / 32) * kMaxRanks];  // exclusive prefix per 32-token chunk
  __shared__ int s_total[kMaxRanks];
  __shared__ uint64_t s_n;
  __shared__ int s_flag;
  const Common& c = p.c;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, W = c.num_ranks, T = p.num_tokens;
  const int64_t H = c.hidden;
  const int chunks = static_cast<int>((H + kChunk - 1) / kChunk);
  const int num_tasks = T * chunks;
  const int task_stride = static_cast<int>(gridDim.x) * (kSendThreads / 32);

  // The inputs do not depend on the slot being free, so their loads go out before the prologue's
  // and the two round trips overlap: this thread's first token's ids, this warp's first task.
  int64_t ids[kMaxTopk];
  load_ids(p, tid, ids);
  int task = static_cast<int>(blockIdx.x) * (kSendThreads / 32) + warp;
  TaskInputs in;
  load_task(p, task, chunks, lane, in);
  if (!pack_begin(c, kDispatchSend, &s_n, &s_flag)) return;

  // Routing slots, recomputed by every block (a few KB of topk_idx from L2) so no grid sync is needed.
  for (int t = tid; t < T; t += blockDim.x) {
    if (t != tid) load_ids(p, t, ids);
    s_mask[t] = rank_mask(p, ids);
  }
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

  stamp(c, 0, kStampSetup);
  const unsigned arrival = pack_arrive(c);
  // Rows: one warp per (token, 1024-channel chunk).
  for (bool first = true; task < num_tasks; task += task_stride, first = false) {
    if (!first) load_task(p, task, chunks, lane, in);
    const int t = static_cast<int>(task / chunks);
    const int64_t c0 = static_cast<int64_t>(task % chunks) * kChunk;
    const int my_slot = lane < W ? slot_of(s_mask, s_chunk, W, t, lane) : -1;
    const unsigned dests = __ballot_sync(0xffffffffu, my_slot >= 0);
    if (dests == 0) continue;
    int2 q[kIters];
    float scale[kIters];
    if (p.fp8) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) q[it] = quantise8(in.v[it], &scale[it]);
    }
    for (unsigned m = dests; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      const int row = __shfl_sync(0xffffffffu, my_slot, d);
      char* dst = send_region(c, d) + kRegionHeader + static_cast<int64_t>(row) * c.row_stride;
      if (c0 == 0 && lane < c.topk) {
        const int64_t num_experts = static_cast<int64_t>(c.num_local_experts) * W;
        const int ex = in.expert >= 0 && in.expert < num_experts ? static_cast<int>(in.expert) : -1;
        const int owner = ex >= 0 ? ex / c.num_local_experts : -1;
        const bool here = owner == d;
        reinterpret_cast<int16_t*>(dst)[lane] = static_cast<int16_t>(here ? ex - owner * c.num_local_experts : -1);
        reinterpret_cast<float*>(dst + header_expert_bytes(c.topk))[lane] = here ? in.weight : 0.f;
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
          reinterpret_cast<int4*>(payload)[ch / 8] = in.v[it];
        }
      }
    }
  }
  stamp(c, 0, kStampRows);
  pack_end(c, s_n, arrival, &s_flag);
}

// The hook. Blocks (e, part): `parts` blocks per local expert e, so the grid covers the GPU when
// there are few local experts. Each block scans every received row header (one 16-byte-vector
// round trip from L2, beside the regions' row counts: headers past a count are loaded and then
// ignored), ranks the rows routed to e (by source rank, then source token), and copies its share
// of them into e's block of recv_x, the FP8 scales in the same pass (they follow the values in
// the row, so a row is one run of 16-byte words). Part 0 records where each (row, k) went; the
// owner block of row j (j mod grid) writes the row's other per-row metadata from the header it
// loaded anyway. Index arithmetic is 32-bit and the copy loop divides nothing: with 64-bit
// divisions per 16-byte word the copy was instruction-bound (~14 GB/s per SM). kUnroll: 16-byte
// loads in flight per copy thread before its stores (p.copy_unroll); the block with the most rows
// sets the kernel's end, and each round of loads is one memory round trip.
template <int kUnroll>
__global__ void __launch_bounds__(kUnpackThreads, 1) dispatch_recv_kernel(DispatchRecvParams p) {
  __shared__ uint64_t s_e;
  __shared__ int s_flag;
  __shared__ int s_n[kMaxRanks];
  __shared__ int s_warp[kUnpackThreads / 32 + 1];
  __shared__ const int4* s_src[kUnpackThreads];   // payload of each row found in this window
  const Common& c = p.c;
  const bool wait_flags = p.wait_flags != 0;
  if (!hook_begin(c, wait_flags, kDispatchRecv, &s_e, &s_flag)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, W = c.num_ranks, K = c.topk;
  const int parts = c.hook_parts, e = blockIdx.x / parts, part = blockIdx.x % parts;
  const int M = static_cast<int>(c.max_tokens), rows = W * M;
  const int64_t H = c.hidden;
  const int x_words = static_cast<int>(p.fp8 ? H / 16 : H / 8);   // 16-byte words of values per row
  const int scales = p.fp8 ? static_cast<int>(H / kFp8Block) : 0;  // fp32 scales per row
  // 16-byte words of scales copied with the values (when a row's scales fill whole words);
  // otherwise a second pass copies them one float at a time.
  const int s_words = p.fp8 && H % (4 * kFp8Block) == 0 ? scales / 4 : 0;
  const int row_words = x_words + s_words;
  // Copy threads: all but warp 0, whose thread 0 runs the epilogue; its acks then need not
  // queue behind a share of the copy's stores.
  const int copy_threads = kUnpackThreads - 32, ctid = tid - 32;
  const int step_rows = copy_threads / row_words, step_words = copy_threads % row_words;
  const int expert_bytes = header_expert_bytes(K);
  const int my_count = tid < W ? __ldcg(reinterpret_cast<const int*>(recv_region(c, tid))) : 0;

  int running = 0;
  for (int base = 0; base < rows; base += kUnpackThreads) {
    const int j = base + tid, src = j / M, i = j - src * M;
    const bool in_range = j < rows;
    const char* row = recv_region(c, in_range ? src : 0) + kRegionHeader +
                      static_cast<int64_t>(in_range ? i : 0) * c.row_stride;
    // The scan reads each row's experts (16 bytes at topk <= 8); only the row's owner block
    // (j mod grid, which writes its metadata) reads the weights too, in the same round.
    const bool owner = in_range && j % static_cast<int>(gridDim.x) == static_cast<int>(blockIdx.x);
    int4 ex4[kMaxTopk / 8];
    int4 w4[kMaxTopk / 4];
#pragma unroll
    for (int q = 0; q < kMaxTopk / 8; ++q) {
      ex4[q] = in_range && 8 * q < K ? __ldcg(reinterpret_cast<const int4*>(row) + q) : make_int4(-1, -1, -1, -1);
    }
#pragma unroll
    for (int q = 0; q < kMaxTopk / 4; ++q) {
      w4[q] = owner && 4 * q < K ? __ldcg(reinterpret_cast<const int4*>(row + expert_bytes) + q) : make_int4(0, 0, 0, 0);
    }
    if (base == 0) {   // the counts' loads went out before the headers'
      if (tid < W) s_n[tid] = my_count;
      __syncthreads();
    }
    const bool valid = in_range && i < s_n[src];
    int ex[kMaxTopk];
    unsigned kmask = 0;  // the k whose expert is e (one, unless the routing repeats e)
#pragma unroll
    for (int k = 0; k < kMaxTopk; ++k) {
      // A row past its region's count holds an older use's bytes.
      ex[k] = valid && k < K ? static_cast<int>(reinterpret_cast<const int16_t*>(ex4)[k]) : -1;
      if (ex[k] == e) kmask |= 1u << k;
    }
    const int64_t jk = static_cast<int64_t>(j) * K;
    if (owner) {
#pragma unroll
      for (int k = 0; k < kMaxTopk; ++k) {
        if (k >= K) break;
        const bool routed = ex[k] >= 0;
        p.row_expert[jk + k] = ex[k];
        p.row_weight[jk + k] = routed ? reinterpret_cast<const float*>(w4)[k] : 0.f;
        if (!routed) p.row_pos[jk + k] = -1;
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
      s_src[local] = reinterpret_cast<const int4*>(row + p.header_bytes);
      if (part == 0) {
        for (unsigned m = kmask; m != 0; m &= m - 1) p.row_pos[jk + (__ffs(m) - 1)] = running + local;
      }
    }
    __syncthreads();
    if (base == 0) stamp(c, 1, kStampSetup);
    const int found = s_warp[kUnpackThreads / 32];
    // This part's rows of the window: element (r, w) = 16-byte word w of row r, flattened and
    // dealt to the copy threads, kUnroll loads in flight per thread before any store. Each
    // thread steps its (r, w) by a fixed (step_rows, step_words) with a carry: no division.
    // e's rows are contiguous in recv_x (and in recv_scales), so word w < x_words of row r lands
    // at out_x[r * x_words + w], a scale word at out_s[r * s_words + w - x_words].
    const int r0 = found * part / parts, n = found * (part + 1) / parts - r0;
    const int64_t out_row = static_cast<int64_t>(e) * rows + running + r0;
    int4* out_x = reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + out_row * x_words * 16);
    int4* out_s = s_words > 0 ? reinterpret_cast<int4*>(p.recv_scales + out_row * scales) : nullptr;
    if (ctid >= 0) {
      int r = ctid / row_words, w = ctid - r * row_words;
      while (r < n) {
        int4 v[kUnroll];
        int rr[kUnroll], ww[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          rr[u] = r;
          ww[u] = w;
          v[u] = r < n ? __ldcg(s_src[r0 + r] + w) : make_int4(0, 0, 0, 0);
          r += step_rows;
          w += step_words;
          if (w >= row_words) {
            w -= row_words;
            ++r;
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (rr[u] >= n) continue;
          if (ww[u] < x_words) {
            out_x[rr[u] * x_words + ww[u]] = v[u];
          } else {
            out_s[rr[u] * s_words + (ww[u] - x_words)] = v[u];
          }
        }
      }
      if (p.fp8 && s_words == 0) {   // scales that do not fill whole words: one float at a time
        float* out_sf = p.recv_scales + out_row * scales;
        for (int k = ctid; k < n * scales; k += copy_threads) {
          const int rs = k / scales;
          out_sf[k] = __ldcg(reinterpret_cast<const float*>(reinterpret_cast<const char*>(s_src[r0 + rs]) + H) +
                             (k - rs * scales));
        }
      }
    }
    running += found;
    __syncthreads();  // s_warp / s_src are reused by the next window
  }
  stamp(c, 1, kStampRows);
  if (part == 0 && tid == 0) p.counts[e] = running;
  if (blockIdx.x == 0 && tid < W) p.src_counts[tid] = s_n[tid];
  hook_end(c);
}

}  // namespace

int launch_dispatch_send(const DispatchSendParams& p, cudaStream_t stream) {
  const Common& c = p.c;
  // An empty batch still launches: its (empty) regions, flags and acks keep the ranks in step.
  const bool need_ptrs = p.num_tokens > 0;
  if (!common_ok(c) ||
      (need_ptrs && (p.x == nullptr || p.topk_idx == nullptr || p.topk_weights == nullptr || p.token_slot == nullptr)) ||
      p.num_tokens < 0 || p.num_tokens > c.max_tokens || p.header_bytes != dispatch_header_bytes(c.topk) ||
      c.num_local_experts > kMaxLocalExperts || c.num_local_experts * c.num_ranks > (1 << 30) ||
      reinterpret_cast<uint64_t>(p.x) % 16 != 0 || c.mode < 0 || c.mode > 2) {
    return kBadArgument;
  }
  const int64_t payload = p.fp8 ? c.hidden + c.hidden / kFp8Block * 4 : c.hidden * 2;
  if (c.row_stride < p.header_bytes + payload) return kBadArgument;
  const int64_t chunks = (c.hidden + kChunk - 1) / kChunk;
  dispatch_send_kernel<<<grid_for_warps(static_cast<int64_t>(p.num_tokens) * chunks), kSendThreads, 0, stream>>>(p);
  return intranode::record_launch();
}

int launch_dispatch_recv(const DispatchRecvParams& p, cudaStream_t stream) {
  const Common& c = p.c;
  if (!common_ok(c) || p.recv_x == nullptr || p.counts == nullptr || p.row_pos == nullptr ||
      p.row_expert == nullptr || p.row_weight == nullptr || p.src_counts == nullptr ||
      (p.fp8 && p.recv_scales == nullptr) || p.header_bytes != dispatch_header_bytes(c.topk) ||
      c.num_local_experts > kMaxLocalExperts || (p.copy_unroll != 8 && p.copy_unroll != 16) ||
      reinterpret_cast<uint64_t>(p.recv_x) % 16 != 0) {
    return kBadArgument;
  }
  if (p.copy_unroll == 8) {
    dispatch_recv_kernel<8><<<hook_blocks(c), kUnpackThreads, 0, stream>>>(p);
  } else {
    dispatch_recv_kernel<16><<<hook_blocks(c), kUnpackThreads, 0, stream>>>(p);
  }
  return intranode::record_launch();
}

}  // namespace ll
}  // namespace overlap
