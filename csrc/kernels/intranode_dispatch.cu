// Intranode dispatch: each warp takes one token row, reads it once and stores it (plus its
// routing metadata) into the region of every rank that hosts one of its experts, at the row the
// receiver will hand out. Then every block copies its share of the rows it received out of the
// local region. Protocol and buffer layout: intranode.cuh.
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

template <int kVec>
struct PlainRows {
  using V = typename VecOf<kVec>::type;

  static __device__ __forceinline__ int64_t row_bytes(const DispatchParams& p) {
    return p.hidden * dtype_size(p.dtype);
  }
  static __device__ __forceinline__ void send(const DispatchParams& p, int64_t t, int64_t lane_addr,
                                              unsigned dst_lanes, int lane) {
    const int64_t bytes = row_bytes(p);
    const V* src = reinterpret_cast<const V*>(static_cast<const char*>(p.x) + t * bytes);
    warp_copy_row<V, true>(src, lane_addr, dst_lanes, bytes / kVec, lane);
  }
  static __device__ __forceinline__ void receive(const DispatchParams& p, int64_t i, int64_t region_row, int lane) {
    const int64_t bytes = row_bytes(p);
    const int64_t dst = reinterpret_cast<int64_t>(static_cast<char*>(p.recv_x) + i * bytes);
    warp_copy_row<V, false>(reinterpret_cast<const V*>(region_row), dst, 1u, bytes / kVec, lane);
  }
};

template <typename T>
struct Fp8Rows {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  static constexpr int kGroupLanes = kFp8Block / kElems;            // lanes sharing one scale
  using Q = typename VecOf<kElems>::type;                           // kElems e4m3 bytes
  static_assert(kGroupLanes == 16 || kGroupLanes == 32, "a scale block must span whole half-warps");

  static __device__ __forceinline__ void send(const DispatchParams& p, int64_t t, int64_t lane_addr,
                                              unsigned dst_lanes, int lane) {
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + t * p.hidden * sizeof(T));
    const int64_t n_vec = p.hidden / kElems;  // a multiple of kGroupLanes: blocks never straddle
    for (int64_t base = 0; base < n_vec; base += 32 * kUnroll) {
      Packed<unsigned short, kElems> q[kUnroll];  // kElems / 2 e4m3 pairs
      float scale[kUnroll];
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        v[u] = i < n_vec ? ld_readonly(src + i) : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
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
        const float s = amax > 0.0f ? __fdiv_rn(amax, 448.0f) : 1.0f;
        scale[u] = s;
#pragma unroll
        for (int e = 0; e < kElems; e += 2) {
          q[u].elem[e / 2] = __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(f[e], s), __fdiv_rn(f[e + 1], s)),
                                                      __NV_SATFINITE, __NV_E4M3);
        }
      }
      for (unsigned m = dst_lanes; m != 0; m &= m - 1) {
        char* row = reinterpret_cast<char*>(__shfl_sync(0xffffffffu, lane_addr, __ffs(m) - 1));
        float* scales = reinterpret_cast<float*>(row + p.hidden);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
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
    const int64_t dst = reinterpret_cast<int64_t>(static_cast<char*>(p.recv_x) + i * p.hidden);
    warp_copy_row<int4, false>(reinterpret_cast<const int4*>(region_row), dst, 1u, p.hidden / 16, lane);
    const int64_t num_scales = p.hidden / kFp8Block;
    const float* scales = reinterpret_cast<const float*>(region_row + p.hidden);
    for (int64_t j = lane; j < num_scales; j += 32) p.recv_scales[i * num_scales + j] = ld_coherent(scales + j);
  }
};

template <class Rows>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(const DispatchParams p) {
  const CommonParams& c = p.c;
  __shared__ int64_t s_peer[kMaxRanks];
  __shared__ int64_t s_recv_start[kMaxRanks + 1];
  __shared__ int64_t s_send_row[kMaxRanks];  // first row of this rank's tokens in each destination
  __shared__ int s_flag;
  extern __shared__ int s_hist[];  // received (token, local expert) pairs per local expert

  const int tid = threadIdx.x, lane = tid & 31;
  const int W = c.num_ranks, k = p.topk, epl = p.num_local_experts;
  load_peers_and_recv_starts(c, s_peer, s_recv_start);
  if (tid < W) {
    int64_t row = 0;
    for (int s = 0; s < c.rank; ++s) row += c.count_matrix[s * W + tid];
    s_send_row[tid] = row;
  }
  for (int e = tid; e < epl; e += kThreads) s_hist[e] = 0;
  __syncthreads();
  const int64_t my_base = s_peer[c.rank];
  if (block_sees_sticky_error(my_base, &s_flag)) return;
  if (!ready_handshake(c, s_peer, kDispatch, &s_flag)) return;

  // ---- send: warp per token, one read of the row, one store per destination rank.
  for (int64_t t = global_warp(); t < p.num_tokens; t += num_global_warps()) {
    const int slot = lane < W ? p.token_slot[t * W + lane] : -1;
    const unsigned dst_lanes = __ballot_sync(0xffffffffu, slot >= 0);
    if (dst_lanes == 0) continue;  // a token with no expert goes nowhere
    int64_t row_addr = 0;
    if (slot >= 0) row_addr = s_peer[lane] + p.x_region_offset + (s_send_row[lane] + slot) * p.x_row_stride;
    // Metadata first (tiny), so its stores overlap with the row loads below.
    for (unsigned m = dst_lanes; m != 0; m &= m - 1) {
      const int r = __ffs(m) - 1;
      const int r_slot = __shfl_sync(0xffffffffu, slot, r);
      int2* meta = reinterpret_cast<int2*>(s_peer[r] + p.meta_region_offset) + (s_send_row[r] + r_slot) * k;
      for (int j = lane; j < k; j += 32) {
        const int64_t e = p.topk_idx[t * k + j];
        const int64_t local = e - static_cast<int64_t>(r) * epl;
        const bool here = e >= 0 && local >= 0 && local < epl;
        meta[j] = make_int2(here ? static_cast<int>(local) : -1, here ? __float_as_int(p.topk_weights[t * k + j]) : 0);
      }
    }
    Rows::send(p, t, row_addr, dst_lanes, lane);
  }
  signal_done(c, s_peer);
  if (!wait_all_done(c, s_peer, kDispatch, &s_flag)) return;

  // ---- receive: rows [0, R) of the local region are already in final order; copy them out.
  const int64_t num_recv = s_recv_start[W];
  const int2* meta = reinterpret_cast<const int2*>(my_base + p.meta_region_offset);
  for (int64_t i = global_warp(); i < num_recv; i += num_global_warps()) {
    Rows::receive(p, i, my_base + p.x_region_offset + i * p.x_row_stride, lane);
    for (int j = lane; j < k; j += 32) {
      const int2 mj = ld_coherent(meta + i * k + j);
      p.recv_topk_idx[i * k + j] = mj.x;
      p.recv_topk_weights[i * k + j] = __int_as_float(mj.y);
      if (mj.x >= 0) atomicAdd(&s_hist[mj.x], 1);
    }
  }
  __syncthreads();
  for (int e = tid; e < epl; e += kThreads) {
    if (s_hist[e] != 0) atomicAdd(&p.recv_expert_counts[e], s_hist[e]);
  }
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
      (p.dtype != kFloat32 && p.dtype != kBFloat16 && p.dtype != kFloat16)) {
    return kBadArgument;
  }
  const int64_t row_bytes = p.hidden * dtype_size(p.dtype);
  if (p.recv_scales != nullptr) {  // quantising: whole scale blocks, 16-byte rows and tensors
    if (p.hidden % kFp8Block != 0 || p.x_row_stride < p.hidden + p.hidden / kFp8Block * 4 || !aligned16(p.x) ||
        !aligned16(p.recv_x)) {
      return kBadArgument;
    }
    switch (p.dtype) {
      case kFloat32: return launch_with<Fp8Rows<float>>(p, stream);
      case kBFloat16: return launch_with<Fp8Rows<__nv_bfloat16>>(p, stream);
      default: return launch_with<Fp8Rows<__half>>(p, stream);
    }
  }
  if (p.x_row_stride < row_bytes) return kBadArgument;
  switch (pick_vec_bytes(row_bytes, p.x, p.recv_x)) {
    case 16: return launch_with<PlainRows<16>>(p, stream);
    case 8: return launch_with<PlainRows<8>>(p, stream);
    case 4: return launch_with<PlainRows<4>>(p, stream);
    case 2: return launch_with<PlainRows<2>>(p, stream);
    default: return launch_with<PlainRows<1>>(p, stream);
  }
}

}  // namespace intranode
}  // namespace overlap
