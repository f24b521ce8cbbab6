// Intranode combine: sender warps return each row received from a peer, once, to that peer, at
// row (this rank, slot) of its combine region, and raise the row's arrival flag; reducer warps
// of the same blocks sum, in fp32 and in ascending rank order, the rows each of this rank's
// tokens got back (its own rank's row straight from y) as their flags come up, and write them
// in the input dtype. Protocol and buffer layout: intranode.cuh.
#include "intranode_device.cuh"

namespace overlap {
namespace intranode {
namespace {

using namespace dev;

constexpr int kReduceUnroll = 4;    // vectors per lane accumulated at once (fp32 registers)
constexpr int kSendBackUnroll = 8;  // vectors per lane in flight when a row goes back
constexpr int kReduceChunk = 2;     // tokens a reducer claims at once

template <typename V, int kUnroll>
__device__ void send_back(const CombineParams& p, uint64_t seq, int64_t my_base, const int64_t* s_peer,
                          const int64_t* s_recv_start, int64_t most_from_a_peer, WarpStamps& stamps, int lane) {
  const CommonParams& c = p.c;
  const int W = c.num_ranks;
  const int64_t n_vec = p.hidden * dtype_size(p.dtype) / static_cast<int64_t>(sizeof(V));
  const V* y = static_cast<const V*>(p.y);
  const int C = p.send_chunk;
  const int64_t items = W * most_from_a_peer;
  int64_t c0 = claim_chunk(my_base, lane) * C;
  while (c0 < items) {
    const int64_t c_after = claim_chunk(my_base, lane) * C;  // latency hidden under this chunk's rows
    uint64_t* flag = nullptr;  // lane j: the arrival flag of the chunk's j-th row
    int sent = 0;
    for (int j = 0; j < C && c0 + j < items; ++j) {
      const int64_t w = c0 + j;
      const int64_t i = interleaved_row(w, W, c.rank, s_recv_start);
      if (i < 0) continue;
      const int src = static_cast<int>(w % W);
      const int64_t row = c.rank * c.max_tokens + (i - s_recv_start[src]);
      const int64_t dst = s_peer[src] + p.region_offset + row * p.row_stride;
      warp_copy_row<V, true, kUnroll>(y + i * n_vec, dst, 1u, n_vec, lane);
      if (lane == j) flag = reinterpret_cast<uint64_t*>(s_peer[src] + p.flag_region_offset) + row;
      ++sent;
    }
    __syncwarp();  // every lane's stores of the chunk come before the fence
    const uint64_t fence_start = stamps.now();
    fence_acq_rel_sys();
    stamps.waited_since(fence_start);
    if (flag != nullptr) st_relaxed_sys(flag, seq);
    if (sent > 0) stamps.moved(sent);
    c0 = c_after;
  }
}

template <typename T, int kVec>
__device__ void reduce_tokens(const CombineParams& p, uint64_t seq, int64_t my_base, const int64_t* s_recv_start,
                              WarpStamps& stamps, int lane) {
  using V = typename VecOf<kVec>::type;
  using P = Packed<T, kVec>;
  const CommonParams& c = p.c;
  const int W = c.num_ranks, me = c.rank;
  const int64_t n_vec = p.hidden * static_cast<int64_t>(sizeof(T)) / kVec;
  const V* y = static_cast<const V*>(p.y);
  const uint64_t* flags = reinterpret_cast<const uint64_t*>(my_base + p.flag_region_offset);
  V* out = static_cast<V*>(p.out);
  // Token t's rows sit at (r * max_tokens + slot[t, r]) for each peer r it went to; its own
  // rank's row is y's row (recv_start[me] + slot[t, me]). Tokens are claimed in chunks.
  int64_t t0 = claim_chunk(my_base, lane, kRecvWorkOffset) * kReduceChunk;
  while (t0 < p.num_tokens) {
    const int64_t t_after = claim_chunk(my_base, lane, kRecvWorkOffset) * kReduceChunk;
    const int64_t t1 = t0 + kReduceChunk < p.num_tokens ? t0 + kReduceChunk : p.num_tokens;
    for (int64_t t = t0; t < t1; ++t) {
      const int slot = lane < W ? p.token_slot[t * W + lane] : -1;
      const unsigned src_lanes = __ballot_sync(0xffffffffu, slot >= 0);
      const uint64_t wait_start = stamps.now();
      for (unsigned m = src_lanes & ~(1u << me); m != 0; m &= m - 1) {
        const int r = __ffs(m) - 1;
        const int64_t r_slot = __shfl_sync(0xffffffffu, slot, r);
        if (!__all_sync(0xffffffffu, wait_at_least(flags + r * c.max_tokens + r_slot, seq, c.timeout_ns))) {
          if (lane == 0) record_failure(c, my_base, seq, kDataTimeout, r, kCombine);
          return;
        }
      }
      stamps.waited_since(wait_start);
      stamps.moved(1);
      auto row_of = [&](int r) -> const V* {
        const int64_t r_slot = __shfl_sync(0xffffffffu, slot, r);
        if (r == me) return y + (s_recv_start[me] + r_slot) * n_vec;
        return reinterpret_cast<const V*>(my_base + p.region_offset + (r * c.max_tokens + r_slot) * p.row_stride);
      };
      for (int64_t base = 0; base < n_vec; base += 32 * kReduceUnroll) {
        float acc[kReduceUnroll][P::kElems];
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u) {
#pragma unroll
          for (int e = 0; e < P::kElems; ++e) acc[u][e] = 0.0f;
        }
        // Two source rows per step (loads of both in flight), added in ascending rank order.
        for (unsigned m = src_lanes; m != 0;) {
          const int r0 = __ffs(m) - 1;
          m &= m - 1;
          const bool two = m != 0;
          const int r1 = two ? __ffs(m) - 1 : r0;
          if (two) m &= m - 1;
          const V* row0 = row_of(r0);
          const V* row1 = row_of(r1);
          P in0[kReduceUnroll], in1[kReduceUnroll];
#pragma unroll
          for (int u = 0; u < kReduceUnroll; ++u) {
            const int64_t i = base + u * 32 + lane;
            in0[u].vec = V{};
            in1[u].vec = V{};
            if (i < n_vec) {
              in0[u].vec = ld_coherent(row0 + i);
              if (two) in1[u].vec = ld_coherent(row1 + i);
            }
          }
#pragma unroll
          for (int u = 0; u < kReduceUnroll; ++u) {
#pragma unroll
            for (int e = 0; e < P::kElems; ++e) acc[u][e] += Elem<T>::to_f32(in0[u].elem[e]);
          }
          if (two) {
#pragma unroll
            for (int u = 0; u < kReduceUnroll; ++u) {
#pragma unroll
              for (int e = 0; e < P::kElems; ++e) acc[u][e] += Elem<T>::to_f32(in1[u].elem[e]);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u) {
          const int64_t i = base + u * 32 + lane;
          if (i < n_vec) {
            P o;
#pragma unroll
            for (int e = 0; e < P::kElems; ++e) o.elem[e] = Elem<T>::from_f32(acc[u][e]);
            out[t * n_vec + i] = o.vec;
          }
        }
      }
    }
    t0 = t_after;
  }
}

template <typename T, int kVec, int kUnroll>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(const CombineParams p) {
  using V = typename VecOf<kVec>::type;
  const CommonParams& c = p.c;
  WarpStamps stamps(c);
  stamps.mark(kStampStart);
  __shared__ int64_t s_peer[kMaxRanks];
  __shared__ int64_t s_recv_start[kMaxRanks + 1];
  __shared__ int64_t s_most_from_a_peer;
  __shared__ uint64_t s_seq;
  __shared__ int s_flag;

  load_peers_and_recv_starts(c, s_peer, s_recv_start, &s_most_from_a_peer);
  __syncthreads();
  const int64_t my_base = s_peer[c.rank];
  const uint64_t seq = begin_operation(my_base, &s_seq);
  if (block_sees_sticky_error(my_base, &s_flag)) return;
  if (!ready_handshake(c, s_peer, seq, kCombine, &s_flag)) return;
  stamps.mark(kStampReady);
  const int lane = threadIdx.x & 31;
  const bool sender = (threadIdx.x >> 5) < p.send_warps;
  if (sender) {
    send_back<V, kUnroll>(p, seq, my_base, s_peer, s_recv_start, s_most_from_a_peer, stamps, lane);
    stamps.role_done(0);
  }
  // Reducers, and senders once they have nothing left to send (one call site: registers).
  reduce_tokens<T, kVec>(p, seq, my_base, s_recv_start, stamps, lane);
  stamps.receive_done(sender);
  end_operation(my_base, seq);
  stamps.mark(kStampEnd);
}

template <typename T>
int launch_typed(const CombineParams& p, cudaStream_t stream) {
  const int64_t row_bytes = p.hidden * static_cast<int64_t>(sizeof(T));
  if (p.row_stride < row_bytes) return kBadArgument;
  const int vec = pick_vec_bytes(row_bytes, p.y, p.out);
  const dim3 grid(p.c.num_blocks), block(kThreads);
  // Rows and tensors of T are T-aligned, so vec >= sizeof(T) always holds.
  // The send-back keeps 8 vectors per lane whatever copy_unroll says: with 16, the kernel
  // (whose reducers need ~120 registers) spills.
  if (vec == 16) {
    combine_kernel<T, 16, kSendBackUnroll><<<grid, block, 0, stream>>>(p);
  } else if (vec == 8) {
    combine_kernel<T, 8, kSendBackUnroll><<<grid, block, 0, stream>>>(p);
  } else if (vec == 4 && sizeof(T) <= 4) {
    combine_kernel<T, (sizeof(T) <= 4 ? 4 : 8), kSendBackUnroll><<<grid, block, 0, stream>>>(p);
  } else if (vec == 2 && sizeof(T) <= 2) {
    combine_kernel<T, (sizeof(T) <= 2 ? 2 : 8), kSendBackUnroll><<<grid, block, 0, stream>>>(p);
  } else {
    return kBadArgument;
  }
  return record_launch();
}

}  // namespace

int launch_combine(const CombineParams& p, cudaStream_t stream) {
  const CommonParams& c = p.c;
  if (!common_params_ok(c) || c.count_matrix == nullptr ||
      p.num_tokens < 0 || p.num_tokens > c.max_tokens || p.hidden < 1 || p.row_stride % 16 != 0 ||
      p.region_offset % 16 != 0 || p.flag_region_offset % 8 != 0 || !send_warps_ok(p.send_warps, p.send_chunk)) {
    return kBadArgument;
  }
  switch (p.dtype) {
    case kFloat32: return launch_typed<float>(p, stream);
    case kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
    case kFloat16: return launch_typed<__half>(p, stream);
    default: return kBadArgument;
  }
}

}  // namespace intranode
}  // namespace overlap
