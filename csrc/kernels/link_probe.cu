// Link probe kernel (see link_probe.cuh): every warp moves chunks of 32 * kUnroll vectors,
// loads first, then stores, the pattern of the intranode kernels' row copies.
#include "intranode.cuh"
#include "link_probe.cuh"

namespace overlap {
namespace probe {
namespace {

template <int kUnroll, bool kStoreOnly>
__global__ void copy_probe_kernel(const int4* src, int4* dst, int64_t n_vec) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  constexpr int64_t kChunk = 32 * kUnroll;
  for (int64_t base = warp * kChunk; base < n_vec; base += num_warps * kChunk) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (kStoreOnly) {
        v[u] = make_int4(static_cast<int>(i), lane, u, 0);
      } else if (i < n_vec) {
        v[u] = __ldg(src + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < n_vec) dst[i] = v[u];
    }
  }
}

template <int kUnroll>
void launch_unrolled(const CopyProbeParams& p, cudaStream_t stream) {
  const int64_t n_vec = p.bytes / 16;
  const auto* src = static_cast<const int4*>(p.src);
  auto* dst = static_cast<int4*>(p.dst);
  if (p.store_only) {
    copy_probe_kernel<kUnroll, true><<<p.num_blocks, p.threads, 0, stream>>>(src, dst, n_vec);
  } else {
    copy_probe_kernel<kUnroll, false><<<p.num_blocks, p.threads, 0, stream>>>(src, dst, n_vec);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uint64_t>(ptr) % 16 == 0; }

}  // namespace

int launch_copy_probe(const CopyProbeParams& p, cudaStream_t stream) {
  if (p.dst == nullptr || !aligned16(p.dst) || p.bytes < 0 || p.bytes % 16 != 0 || p.num_blocks < 1 ||
      p.threads < 32 || p.threads > 1024 || p.threads % 32 != 0 ||
      (!p.store_only && (p.src == nullptr || !aligned16(p.src)))) {
    return kBadArgument;
  }
  switch (p.unroll) {
    case 4: launch_unrolled<4>(p, stream); break;
    case 8: launch_unrolled<8>(p, stream); break;
    case 16: launch_unrolled<16>(p, stream); break;
    default: return kBadArgument;
  }
  return intranode::record_launch();
}

}  // namespace probe
}  // namespace overlap
