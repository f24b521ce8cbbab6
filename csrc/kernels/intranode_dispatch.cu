// Intranode dispatch: sender warps take one token row each, read it once and store it (plus its
// routing metadata) into the region of every peer that hosts one of its experts, at the row
// the receiver will hand out, then raise that row's arrival flag; the row for this rank itself
// goes straight into the outputs. Receiver warps of the same blocks copy peers' rows out of the
// local region as their flags come up. Protocol and buffer layout: intranode.cuh.
//
// How a row travels is a codec: PlainRows copies the bytes; Fp8Rows quantises to e4m3 with one
// fp32 scale per 128 channels while sending (the cast is fused into the send, so the wire
// carries about half the bytes of bf16).
#include <cuda_fp8.h>

#include "intranode_device.cuh"

namespace overlap {
namespace intranode {
namespace {

using namespace dev;

constexpr int kMaxSharedExperts = 12288;  // s_hist must fit 48 KiB of dynamic shared memory
constexpr int kRecvChunk = 4;             // interleaved (source, row) positions a receiver claims at once

// Vectors per lane a sender keeps in flight. 16 would spill: a sender also holds the next
// token's route and every destination's addresses.
constexpr int kSendUnroll = 8;

// kUnroll: vectors per lane in flight when a receiver copies a row out of the region.
template <int kVec, int kUnroll>
struct PlainRows {
  using V = typename VecOf<kVec>::type;

  static __device__ __forceinline__ int64_t row_bytes(const DispatchParams& p) {
    return p.hidden * dtype_size(p.dtype);
  }
  // Where output row i starts: {data, scales} (no scales for plain rows).
  static __device__ __forceinline__ int64_t out_data(const DispatchParams& p, int64_t i) {
    return reinterpret_cast<int64_t>(static_cast<char*>(p.recv_x) + i * row_bytes(p));
  }
  static __device__ __forceinline__ int64_t out_scales(const DispatchParams& p, int64_t i) { return 0; }
  // lane r holds destination r's row address in data_addr (scale_addr is unused here).
  static __device__ __forceinline__ void send(const DispatchParams& p, int64_t t, int64_t data_addr, int64_t scale_addr,
                                              unsigned dst_lanes, int lane) {
    const int64_t bytes = row_bytes(p);
    const V* src = reinterpret_cast<const V*>(static_cast<const char*>(p.x) + t * bytes);
    warp_copy_row<V, true, kSendUnroll>(src, data_addr, dst_lanes, bytes / kVec, lane);
  }
  static __device__ __forceinline__ void receive(const DispatchParams& p, int64_t i, int64_t region_row, int lane) {
    const int64_t bytes = row_bytes(p);
    warp_copy_received_row<V, kUnroll>(reinterpret_cast<const V*>(region_row),
                                       reinterpret_cast<V*>(static_cast<char*>(p.recv_x) + i * bytes), bytes / kVec,
                                       lane);
  }
};

constexpr int kQuantUnroll = 6;  // vectors per lane quantised at once (registers: values, e4m3 and scales; 8 spills)

// kUnroll: vectors per lane in flight when a receiver copies the e4m3 bytes out.
template <typename T, int kUnroll>
struct Fp8Rows {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  static constexpr int kGroupLanes = kFp8Block / kElems;            // lanes sharing one scale
  using Q = typename VecOf<kElems>::type;                           // kElems e4m3 bytes
  static_assert(kGroupLanes == 16 || kGroupLanes == 32, "a scale block must span whole half-warps");

  static __device__ __forceinline__ int64_t out_data(const DispatchParams& p, int64_t i) {
    return reinterpret_cast<int64_t>(static_cast<char*>(p.recv_x) + i * p.hidden);
  }
  static __device__ __forceinline__ int64_t out_scales(const DispatchParams& p, int64_t i) {
    return reinterpret_cast<int64_t>(p.recv_scales + i * (p.hidden / kFp8Block));
  }
  // lane r holds destination r's addresses: the e4m3 bytes in data_addr, the scales in
  // scale_addr (right after the bytes in a region row; recv_scales for this rank's own rows).
  static __device__ __forceinline__ void send(const DispatchParams& p, int64_t t, int64_t data_addr, int64_t scale_addr,
                                              unsigned dst_lanes, int lane) {
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + t * p.hidden * sizeof(T));
    const int64_t n_vec = p.hidden / kElems;  // a multiple of kGroupLanes: blocks never straddle
    for (int64_t base = 0; base < n_vec; base += 32 * kQuantUnroll) {
      Packed<unsigned short, kElems> q[kQuantUnroll];  // kElems / 2 e4m3 pairs
      float scale[kQuantUnroll];
      int4 v[kQuantUnroll];
#pragma unroll
      for (int u = 0; u < kQuantUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        v[u] = i < n_vec ? ld_readonly(src + i) : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kQuantUnroll; ++u) {
        Packed<T, 16> in;
        in.vec = v[u];
        float f[kElems];
        float amax = 0.0f;
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          f[e] = Elem<T>::to_f32(in.elem[e]);
          amax = fmaxf(amax, fabsf(f[e]));
        }
#pragma unroll
        for (int off = kGroupLanes / 2; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const float s = dev::fp8_scale(amax);
        const float inv = __frcp_rn(s);
        scale[u] = s;
#pragma unroll
        for (int e = 0; e < kElems; e += 2) q[u].elem[e / 2] = dev::fp8x2(f[e], f[e + 1], inv);
      }
      for (unsigned m = dst_lanes; m != 0; m &= m - 1) {
        char* row = reinterpret_cast<char*>(__shfl_sync(0xffffffffu, data_addr, __ffs(m) - 1));
        float* scales = reinterpret_cast<float*>(__shfl_sync(0xffffffffu, scale_addr, __ffs(m) - 1));
#pragma unroll
        for (int u = 0; u < kQuantUnroll; ++u) {
          const int64_t i = base + u * 32 + lane;
          if (i < n_vec) {
            reinterpret_cast<Q*>(row)[i] = q[u].vec;
            if (lane % kGroupLanes == 0) scales[i / kGroupLanes] = scale[u];
          }
        }
      }
    }
  }
  static __device__ __forceinline__ void receive(const DispatchParams& p, int64_t i, int64_t region_row, int lane) {
    warp_copy_received_row<int4, kUnroll>(reinterpret_cast<const int4*>(region_row),
                                          reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + i * p.hidden),
                                          p.hidden / 16, lane);
    const int64_t num_scales = p.hidden / kFp8Block;
    const float* scales = reinterpret_cast<const float*>(region_row + p.hidden);
    for (int64_t j = lane; j < num_scales; j += 32) p.recv_scales[i * num_scales + j] = ld_coherent(scales + j);
  }
};

// What a sender needs of token t besides its row, loaded one token ahead so that these small
// loads are in flight while the previous row moves (each would otherwise cost the warp a full
// memory latency per token): lane r < W the token's slot at rank r (-1: not sent there); lane
// j < topk its j-th global expert id and weight bits.
struct TokenRoute {
  int slot = -1;
  int64_t expert = -1;
  int weight_bits = 0;
};

__device__ __forceinline__ TokenRoute load_route(const DispatchParams& p, int64_t t, int lane) {
  TokenRoute r;
  if (lane < p.c.num_ranks) r.slot = p.token_slot[t * p.c.num_ranks + lane];
  if (lane < p.topk) {
    r.expert = p.topk_idx[t * p.topk + lane];
    r.weight_bits = __float_as_int(p.topk_weights[t * p.topk + lane]);
  }
  return r;
}

// Token t's routing metadata entry j for destination r: {local expert id or -1, weight bits}.
// Entries j < 32 come from the prefetched route (lane j holds them); larger top-k read memory.
__device__ __forceinline__ int2 meta_entry(const DispatchParams& p, const TokenRoute& route, int64_t t, int j, int r,
                                           int lane) {
  const bool prefetched = j == lane;
  const int64_t e = prefetched ? route.expert : p.topk_idx[t * p.topk + j];
  const int64_t local = e - static_cast<int64_t>(r) * p.num_local_experts;
  const bool here = e >= 0 && local >= 0 && local < p.num_local_experts;
  const int bits = prefetched ? route.weight_bits : __float_as_int(p.topk_weights[t * p.topk + j]);
  return make_int2(here ? static_cast<int>(local) : -1, here ? bits : 0);
}

// Output row i's metadata, and its (token, local expert) pairs counted into s_hist.
__device__ __forceinline__ void write_out_meta(const DispatchParams& p, int64_t i, int j, int2 m, int* s_hist) {
  p.recv_topk_idx[i * p.topk + j] = m.x;
  p.recv_topk_weights[i * p.topk + j] = __int_as_float(m.y);
  if (m.x >= 0) atomicAdd(&s_hist[m.x], 1);
}

template <class Rows>
__device__ void send_tokens(const DispatchParams& p, uint64_t seq, int64_t my_base, const int64_t* s_peer,
                            const int64_t* s_recv_start, const int64_t* s_send_row, int* s_hist, WarpStamps& stamps,
                            int lane) {
  const int me = p.c.rank, k = p.topk;
  const int C = p.send_chunk;
  TokenRoute next;
  int64_t c0 = claim_chunk(my_base, lane) * C;
  if (c0 < p.num_tokens) next = load_route(p, c0, lane);
  while (c0 < p.num_tokens) {
    // Claimed now, used at the chunk's last token: the atomic's latency hides under the rows.
    const int64_t c_after = claim_chunk(my_base, lane) * C;
    // Lane r: the rows of this chunk's tokens at peer r, [first_row, last_row] (contiguous:
    // consecutive tokens bound for r take consecutive slots there).
    int64_t first_row = -1, last_row = -1;
    const int64_t c1 = c0 + C < p.num_tokens ? c0 + C : p.num_tokens;
    for (int64_t t = c0; t < c1; ++t) {
      const TokenRoute route = next;
      const int64_t t_next = t + 1 < c1 ? t + 1 : c_after;
      if (t_next < p.num_tokens) next = load_route(p, t_next, lane);
      const int slot = route.slot;
      // Lane r: destination r's addresses. This rank's own row goes straight to the outputs
      // (unless it is past the budget: the overflow is reported by the receive side).
      int64_t data_addr = 0, scale_addr = 0, own_row = -1;
      bool sends = slot >= 0;
      if (sends && lane == me) {
        own_row = s_recv_start[me] + slot;
        sends = own_row < p.num_out_rows;
        data_addr = Rows::out_data(p, own_row);
        scale_addr = Rows::out_scales(p, own_row);
      } else if (sends) {
        const int64_t row = s_send_row[lane] + slot;
        data_addr = s_peer[lane] + p.x_region_offset + row * p.x_row_stride;
        scale_addr = data_addr + p.hidden;
        if (first_row < 0) first_row = row;
        last_row = row;
      }
      const unsigned dst_lanes = __ballot_sync(0xffffffffu, sends);
      if (dst_lanes == 0) continue;  // a token with no expert goes nowhere
      // Metadata first (tiny), so its stores overlap with the row loads below.
      for (unsigned m = dst_lanes; m != 0; m &= m - 1) {
        const int r = __ffs(m) - 1;
        const int64_t r_row = __shfl_sync(0xffffffffu, r == me ? own_row : s_send_row[r] + slot, r);
        for (int j = lane; j < k; j += 32) {
          const int2 e = meta_entry(p, route, t, j, r, lane);
          if (r == me) {
            write_out_meta(p, r_row, j, e, s_hist);
          } else {
            reinterpret_cast<int2*>(s_peer[r] + p.meta_region_offset)[r_row * k + j] = e;
          }
        }
      }
      Rows::send(p, t, data_addr, scale_addr, dst_lanes, lane);
    }
    __syncwarp();  // every lane's stores of the chunk come before the fence
    const uint64_t fence_start = stamps.now();
    fence_acq_rel_sys();
    stamps.waited_since(fence_start);
    if (first_row >= 0) {
      uint64_t* flags = reinterpret_cast<uint64_t*>(s_peer[lane] + p.flag_region_offset);
      for (int64_t row = first_row; row <= last_row; ++row) st_relaxed_sys(flags + row, seq);
    }
    stamps.moved(c1 - c0);
    c0 = c_after;
  }
}

template <class Rows>
__device__ void receive_rows(const DispatchParams& p, uint64_t seq, int64_t my_base, const int64_t* s_recv_start,
                             int64_t most_from_a_peer, int* s_hist, WarpStamps& stamps, int lane) {
  const CommonParams& c = p.c;
  const int W = c.num_ranks, k = p.topk;
  const int2* meta = reinterpret_cast<const int2*>(my_base + p.meta_region_offset);
  const uint64_t* flags = reinterpret_cast<const uint64_t*>(my_base + p.flag_region_offset);
  const int64_t items = W * most_from_a_peer;  // interleaved (source, row) positions
  int64_t w0 = claim_chunk(my_base, lane, kRecvWorkOffset) * kRecvChunk;
  while (w0 < items) {
    const int64_t w_after = claim_chunk(my_base, lane, kRecvWorkOffset) * kRecvChunk;
    const int64_t w1 = w0 + kRecvChunk < items ? w0 + kRecvChunk : items;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = interleaved_row(w, W, c.rank, s_recv_start);
      if (i < 0 || i >= p.num_out_rows) continue;
      const uint64_t wait_start = stamps.now();
      if (!__all_sync(0xffffffffu, wait_at_least(flags + i, seq, c.timeout_ns))) {
        const int src = source_of_row(i, W, s_recv_start, lane);
        if (lane == 0) record_failure(c, my_base, seq, kDataTimeout, src, kDispatch);
        return;
      }
      stamps.waited_since(wait_start);
      stamps.moved(1);
      // The metadata load is issued before the row copy, so its latency hides under it.
      const int2 m0 = lane < k ? ld_coherent(meta + i * k + lane) : make_int2(-1, 0);
      Rows::receive(p, i, my_base + p.x_region_offset + i * p.x_row_stride, lane);
      if (lane < k) write_out_meta(p, i, lane, m0, s_hist);
      for (int j = lane + 32; j < k; j += 32) write_out_meta(p, i, j, ld_coherent(meta + i * k + j), s_hist);
    }
    w0 = w_after;
  }
}

template <class Rows>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(const DispatchParams p) {
  const CommonParams& c = p.c;
  __shared__ int64_t s_peer[kMaxRanks];
  __shared__ int64_t s_recv_start[kMaxRanks + 1];
  __shared__ int64_t s_send_row[kMaxRanks];  // first row of this rank's tokens in each destination
  __shared__ int64_t s_most_from_a_peer;
  __shared__ uint64_t s_seq;
  __shared__ int s_flag;
  extern __shared__ int s_hist[];  // received (token, local expert) pairs per local expert

  const int tid = threadIdx.x, lane = tid & 31;
  const int W = c.num_ranks, epl = p.num_local_experts;
  WarpStamps stamps(c);
  stamps.mark(kStampStart);
  load_peers_and_recv_starts(c, s_peer, s_recv_start, &s_most_from_a_peer);
  if (tid < W) {
    int64_t row = 0;
    for (int s = 0; s < c.rank; ++s) row += c.count_matrix[s * W + tid];
    s_send_row[tid] = row;
  }
  for (int e = tid; e < epl; e += kThreads) s_hist[e] = 0;
  __syncthreads();
  const int64_t my_base = s_peer[c.rank];
  const uint64_t seq = begin_operation(my_base, &s_seq);
  if (block_sees_sticky_error(my_base, &s_flag)) return;
  if (!ready_handshake(c, s_peer, seq, kDispatch, &s_flag)) return;
  stamps.mark(kStampReady);

  const bool sender = (tid >> 5) < p.send_warps;
  if (sender) {
    send_tokens<Rows>(p, seq, my_base, s_peer, s_recv_start, s_send_row, s_hist, stamps, lane);
    stamps.role_done(0);
  }
  // Receivers, and senders once they have nothing left to send (one call site: registers).
  receive_rows<Rows>(p, seq, my_base, s_recv_start, s_most_from_a_peer, s_hist, stamps, lane);
  stamps.receive_done(sender);
  __syncthreads();
  for (int e = tid; e < epl; e += kThreads) {
    if (s_hist[e] != 0) atomicAdd(&p.recv_expert_counts[e], s_hist[e]);
  }
  // A budget overflow is reported once every block is done: recorded earlier, it would make
  // blocks that start late skip their part (sticky word), and peers would time out instead.
  // Rows past the budget were dropped on both sides meanwhile.
  if (end_operation(my_base, seq) && s_recv_start[W] > p.num_out_rows) {
    record_failure(c, my_base, seq, kBudgetExceeded, static_cast<int>(s_recv_start[W]), kDispatch);
  }
  stamps.mark(kStampEnd);
}

template <class Rows>
int launch_with(const DispatchParams& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.num_local_experts) * sizeof(int);
  dispatch_kernel<Rows><<<p.c.num_blocks, kThreads, smem, stream>>>(p);
  return record_launch();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uint64_t>(ptr) % 16 == 0; }

}  // namespace

int launch_dispatch(const DispatchParams& p, cudaStream_t stream) {
  if (!common_params_ok(p.c) || p.c.count_matrix == nullptr || p.topk < 1 || p.num_local_experts < 1 ||
      p.num_local_experts > kMaxSharedExperts || p.num_tokens < 0 || p.num_tokens > p.c.max_tokens || p.hidden < 1 ||
      p.x_row_stride % 16 != 0 || p.x_region_offset % 16 != 0 || p.meta_region_offset % 8 != 0 ||
      p.flag_region_offset % 8 != 0 || !send_warps_ok(p.send_warps, p.send_chunk) || p.num_out_rows < 0 ||
      (p.dtype != kFloat32 && p.dtype != kBFloat16 && p.dtype != kFloat16)) {
    return kBadArgument;
  }
  const int64_t row_bytes = p.hidden * dtype_size(p.dtype);
  if (p.recv_scales != nullptr) {  // quantising: whole scale blocks, 16-byte rows and tensors
    if (p.hidden % kFp8Block != 0 || p.x_row_stride < p.hidden + p.hidden / kFp8Block * 4 || !aligned16(p.x) ||
        !aligned16(p.recv_x)) {
      return kBadArgument;
    }
    // Receivers keep 8 vectors per lane whatever copy_unroll says: with 16 the kernel, whose
    // quantising senders need many registers, spills (and an e4m3 row is only 2 steps of 8).
    switch (p.dtype) {
      case kFloat32: return launch_with<Fp8Rows<float, 8>>(p, stream);
      case kBFloat16: return launch_with<Fp8Rows<__nv_bfloat16, 8>>(p, stream);
      default: return launch_with<Fp8Rows<__half, 8>>(p, stream);
    }
  }
  if (p.x_row_stride < row_bytes) return kBadArgument;
  // copy_unroll (the receivers' vectors per lane in flight) applies to 16-byte rows (every
  // realistic hidden size); narrower rows are rare and keep 8.
  switch (pick_vec_bytes(row_bytes, p.x, p.recv_x)) {
    case 16:
      return p.c.copy_unroll == 16 ? launch_with<PlainRows<16, 16>>(p, stream) : launch_with<PlainRows<16, 8>>(p, stream);
    case 8: return launch_with<PlainRows<8, 8>>(p, stream);
    case 4: return launch_with<PlainRows<4, 8>>(p, stream);
    case 2: return launch_with<PlainRows<2, 8>>(p, stream);
    default: return launch_with<PlainRows<1, 8>>(p, stream);
  }
}

}  // namespace intranode
}  // namespace overlap
