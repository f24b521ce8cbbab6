// Routing layout on the GPU: which ranks each token goes to and its slot in each rank's send
// block. Semantics are those of overlap/ep/layout.py::routing_layout (the PyTorch reference).
#pragma once

#include "common.cuh"

namespace overlap {

// topk_idx: [num_tokens, topk] (int64 or int32, -1 = no expert), row-major, device memory.
// Outputs (device memory, fully written by the kernel):
//   num_tokens_per_rank [num_ranks] int32, num_tokens_per_expert [num_experts] int32,
//   is_token_in_rank [num_tokens, num_ranks] bool, token_slot_in_rank [num_tokens, num_ranks] int32.
// Returns kOk, kBadArgument (sizes the kernel does not support) or kLaunchFailed.
template <typename IdxT>
int launch_routing_layout(const IdxT* topk_idx, int64_t num_tokens, int topk, int num_experts, int num_ranks,
                          int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
                          int* token_slot_in_rank, cudaStream_t stream);

}  // namespace overlap
