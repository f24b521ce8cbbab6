// Intranode combine: each received row goes back, once, to the rank that sent the token, at
// row (this rank, slot) of that rank's combine region; then every rank sums, in fp32 and in
// ascending rank order, the rows its tokens got back and writes them in the input dtype.
// Protocol and buffer layout: intranode.cuh.
#include "intranode_device.cuh"

namespace overlap {
namespace intranode {
namespace {

using namespace dev;

constexpr int kReduceUnroll = 4;  // vectors per lane accumulated at once (fp32 registers)

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(const CombineParams p) {
  using V = typename VecOf<kVec>::type;
  using P = Packed<T, kVec>;
  const CommonParams& c = p.c;
  __shared__ int64_t s_peer[kMaxRanks];
  __shared__ int64_t s_recv_start[kMaxRanks + 1];
  __shared__ int s_flag;

  const int tid = threadIdx.x, lane = tid & 31;
  const int W = c.num_ranks;
  load_peers_and_recv_starts(c, s_peer, s_recv_start);
  __syncthreads();
  const int64_t my_base = s_peer[c.rank];
  if (block_sees_sticky_error(my_base, &s_flag)) return;
  if (!ready_handshake(c, s_peer, kCombine, &s_flag)) return;

  // ---- send back: received row i came from rank src, slot i - start[src].
  const int64_t row_bytes = p.hidden * static_cast<int64_t>(sizeof(T));
  const int64_t n_vec = row_bytes / kVec;
  const int64_t num_recv = s_recv_start[W];
  const char* y = static_cast<const char*>(p.y);
  for (int64_t i = global_warp(); i < num_recv; i += num_global_warps()) {
    // The last source whose rows start at or before i (empty sources share the next start).
    const unsigned at_or_before = __ballot_sync(0xffffffffu, lane < W && s_recv_start[lane] <= i);
    const int src = 31 - __clz(at_or_before);
    const int64_t slot = i - s_recv_start[src];
    const int64_t dst = s_peer[src] + p.region_offset + (c.rank * c.max_tokens + slot) * p.row_stride;
    warp_copy_row<V, true>(reinterpret_cast<const V*>(y + i * row_bytes), dst, 1u, n_vec, lane);
  }
  signal_done(c, s_peer);
  if (!wait_all_done(c, s_peer, kCombine, &s_flag)) return;

  // ---- reduce: token t's rows sit at (r * max_tokens + slot[t, r]) for each rank r it went to.
  V* out = static_cast<V*>(p.out);
  for (int64_t t = global_warp(); t < p.num_tokens; t += num_global_warps()) {
    const int slot = lane < W ? p.token_slot[t * W + lane] : -1;
    const unsigned src_lanes = __ballot_sync(0xffffffffu, slot >= 0);
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
        const int64_t slot0 = __shfl_sync(0xffffffffu, slot, r0), slot1 = __shfl_sync(0xffffffffu, slot, r1);
        const V* row0 = reinterpret_cast<const V*>(my_base + p.region_offset + (r0 * c.max_tokens + slot0) * p.row_stride);
        const V* row1 = reinterpret_cast<const V*>(my_base + p.region_offset + (r1 * c.max_tokens + slot1) * p.row_stride);
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
}

template <typename T>
int launch_typed(const CombineParams& p, cudaStream_t stream) {
  const int64_t row_bytes = p.hidden * static_cast<int64_t>(sizeof(T));
  if (p.row_stride < row_bytes) return kBadArgument;
  const int vec = pick_vec_bytes(row_bytes, p.y, p.out);
  const dim3 grid(p.c.num_blocks), block(kThreads);
  // Rows and tensors of T are T-aligned, so vec >= sizeof(T) always holds.
  if (vec == 16) {
    combine_kernel<T, 16><<<grid, block, 0, stream>>>(p);
  } else if (vec == 8) {
    combine_kernel<T, 8><<<grid, block, 0, stream>>>(p);
  } else if (vec == 4 && sizeof(T) <= 4) {
    combine_kernel<T, (sizeof(T) <= 4 ? 4 : 8)><<<grid, block, 0, stream>>>(p);
  } else if (vec == 2 && sizeof(T) <= 2) {
    combine_kernel<T, (sizeof(T) <= 2 ? 2 : 8)><<<grid, block, 0, stream>>>(p);
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
      p.region_offset % 16 != 0) {
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
