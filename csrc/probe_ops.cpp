// Thin torch binding of the link probe (csrc/kernels/link_probe.cu), used by
// experiments/link_probe.py to measure the NVLink ceiling of the machine at hand.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/intranode.cuh"
#include "kernels/link_probe.cuh"

namespace {

void link_probe_copy(const at::Tensor& src, int64_t dst_ptr, int64_t num_blocks, int64_t threads, int64_t unroll,
                     bool store_only) {
  TORCH_CHECK(src.is_cuda() && src.is_contiguous() && src.scalar_type() == at::kByte,
              "src must be a contiguous uint8 CUDA tensor");
  TORCH_CHECK(src.numel() % 16 == 0, "src must hold a multiple of 16 bytes, got ", src.numel());
  TORCH_CHECK(dst_ptr != 0 && dst_ptr % 16 == 0, "dst_ptr must be a 16-byte aligned device address");
  TORCH_CHECK(num_blocks >= 1, "num_blocks must be >= 1, got ", num_blocks);
  TORCH_CHECK(threads >= 32 && threads <= 1024 && threads % 32 == 0, "threads must be a multiple of 32 in [32, 1024]");
  TORCH_CHECK(unroll == 4 || unroll == 8 || unroll == 16, "unroll must be 4, 8 or 16, got ", unroll);
  const c10::cuda::CUDAGuard guard(src.device());
  overlap::probe::CopyProbeParams p;
  p.src = src.data_ptr();
  p.dst = reinterpret_cast<void*>(dst_ptr);
  p.bytes = src.numel();
  p.num_blocks = static_cast<int>(num_blocks);
  p.threads = static_cast<int>(threads);
  p.unroll = static_cast<int>(unroll);
  p.store_only = store_only;
  const int status = overlap::probe::launch_copy_probe(p, c10::cuda::getCurrentCUDAStream(src.device().index()));
  TORCH_CHECK(status == overlap::kOk, "link_probe_copy failed: ",
              status == overlap::kBadArgument ? "bad argument" : overlap::intranode::last_launch_error());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(overlap, m) {
  m.def("link_probe_copy(Tensor src, int dst_ptr, int num_blocks, int threads, int unroll, bool store_only) -> ()");
}

TORCH_LIBRARY_IMPL(overlap, CUDA, m) { m.impl("link_probe_copy", &link_probe_copy); }
