// Thin torch binding of csrc/kernels/routing_layout.cu as the custom op overlap::routing_layout.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/routing_layout.cuh"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_layout_cuda(const at::Tensor& topk_idx,
                                                                                 int64_t num_experts,
                                                                                 int64_t num_ranks) {
  TORCH_CHECK(topk_idx.is_cuda(), "topk_idx must be a CUDA tensor");
  TORCH_CHECK(topk_idx.dim() == 2, "topk_idx must be 2-D [num_tokens, k]");
  TORCH_CHECK(topk_idx.scalar_type() == at::kLong || topk_idx.scalar_type() == at::kInt,
              "topk_idx must be int64 or int32");
  TORCH_CHECK(num_ranks >= 1 && num_experts % num_ranks == 0,
              "num_experts (", num_experts, ") must be a multiple of num_ranks (", num_ranks, ")");
  const c10::cuda::CUDAGuard guard(topk_idx.device());
  auto idx = topk_idx.contiguous();
  const int64_t num_tokens = idx.size(0);
  const int topk = static_cast<int>(idx.size(1));
  auto i32 = idx.options().dtype(at::kInt);
  auto per_rank = at::empty({num_ranks}, i32);
  auto per_expert = at::empty({num_experts}, i32);
  auto in_rank = at::empty({num_tokens, num_ranks}, idx.options().dtype(at::kBool));
  auto slot = at::empty({num_tokens, num_ranks}, i32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  int status;
  if (idx.scalar_type() == at::kLong) {
    status = overlap::launch_routing_layout<int64_t>(idx.data_ptr<int64_t>(), num_tokens, topk, (int)num_experts,
                                                     (int)num_ranks, per_rank.data_ptr<int>(),
                                                     per_expert.data_ptr<int>(), in_rank.data_ptr<bool>(),
                                                     slot.data_ptr<int>(), stream);
  } else {
    status = overlap::launch_routing_layout<int32_t>(idx.data_ptr<int32_t>(), num_tokens, topk, (int)num_experts,
                                                     (int)num_ranks, per_rank.data_ptr<int>(),
                                                     per_expert.data_ptr<int>(), in_rank.data_ptr<bool>(),
                                                     slot.data_ptr<int>(), stream);
  }
  TORCH_CHECK(status == overlap::kOk, "routing_layout kernel failed with status ", status,
              " (num_experts must be <= 4096 and topk >= 1)");
  return {per_rank, per_expert, in_rank, slot};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(overlap, m) {
  m.def("routing_layout(Tensor topk_idx, int num_experts, int num_ranks) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(overlap, CUDA, m) { m.impl("routing_layout", &routing_layout_cuda); }
