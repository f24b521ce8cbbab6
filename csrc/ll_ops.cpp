// Thin torch binding of the low-latency (decode) kernels, csrc/kernels/ll_*.cu. The Python side
// (overlap/ep/low_latency.py) owns buffers, slots and streams; these functions check shapes and
// launch on the current stream. `common` carries the fields of ll::Common as a flat int list
// (see common_from_list) so the schemas stay short. The copy-engine transfers: ll_copy_ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <optional>
#include <vector>

#include "kernels/intranode.cuh"
#include "kernels/ll.cuh"

namespace {

namespace ll = overlap::ll;

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the operation runs on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

constexpr int kCommonFields = 18;

// Order: rank, num_ranks, kind, slot, mode, my_base, slot_offset, region_stride, row_stride,
// max_tokens, staging, hidden, topk, num_local_experts, timeout_ns, status_ptr, stamps_ptr (0: off),
// hook_parts.
ll::Common common_from_list(const std::vector<int64_t>& v, const at::Tensor& peer_bases, const at::Device& device) {
  TORCH_CHECK(v.size() == kCommonFields, "common must have ", kCommonFields, " fields, got ", v.size());
  check_tensor(peer_bases, "peer_bases", at::kLong, 1, device);
  ll::Common c;
  c.rank = static_cast<int>(v[0]);
  c.num_ranks = static_cast<int>(v[1]);
  c.kind = static_cast<int>(v[2]);
  c.slot = static_cast<int>(v[3]);
  c.mode = static_cast<int>(v[4]);
  c.my_base = v[5];
  c.slot_offset = v[6];
  c.region_stride = v[7];
  c.row_stride = v[8];
  c.max_tokens = v[9];
  c.staging = v[10];
  c.hidden = v[11];
  c.topk = static_cast<int>(v[12]);
  c.num_local_experts = static_cast<int>(v[13]);
  c.timeout_ns = static_cast<uint64_t>(v[14]);
  c.status_host = reinterpret_cast<int*>(v[15]);
  c.stamps = reinterpret_cast<uint64_t*>(v[16]);
  c.hook_parts = static_cast<int>(v[17]);
  c.peer_bases = peer_bases.data_ptr<int64_t>();
  TORCH_CHECK(peer_bases.size(0) == c.num_ranks, "peer_bases must have num_ranks=", c.num_ranks, " entries");
  TORCH_CHECK(ll::common_ok(c), "low-latency kernel arguments out of range (rank ", c.rank, "/", c.num_ranks,
              ", kind ", c.kind, ", slot ", c.slot, ", mode ", c.mode, ", hidden ", c.hidden, ", topk ", c.topk,
              ", max_tokens ", c.max_tokens, "; see csrc/kernels/ll.cuh)");
  return c;
}

// The per-row routing metadata the dispatch hook writes and the combine send reads: [R, K]
// positions and local experts (int32) and weights (fp32), and the [num_ranks] rows per source.
void check_row_metadata(const at::Tensor& row_pos, const at::Tensor& row_expert, const at::Tensor& row_weight,
                        const at::Tensor& src_counts, int64_t R, int64_t K, int64_t num_ranks, const at::Device& device) {
  for (const auto* t : {&row_pos, &row_expert}) check_tensor(*t, "row_pos/row_expert", at::kInt, 2, device);
  check_tensor(row_weight, "row_weight", at::kFloat, 2, device);
  for (const auto* t : {&row_pos, &row_expert, &row_weight}) {
    TORCH_CHECK(t->size(0) == R && t->size(1) == K, "row metadata must be [", R, ", ", K, "]");
  }
  check_tensor(src_counts, "src_counts", at::kInt, 1, device);
  TORCH_CHECK(src_counts.size(0) == num_ranks, "src_counts must have num_ranks entries");
}

void check_launch(int status, const char* op) {
  TORCH_CHECK(status != overlap::kBadArgument, op, ": arguments the kernel does not support (see ll.cuh)");
  TORCH_CHECK(status == overlap::kOk, op, ": kernel launch failed: ", overlap::intranode::last_launch_error());
}

cudaStream_t stream_of(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()); }

void ll_dispatch_send(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                      const at::Tensor& token_slot, const at::Tensor& peer_bases, std::vector<int64_t> common,
                      int64_t fp8, int64_t header_bytes) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  const at::Device device = x.device();
  const c10::cuda::CUDAGuard guard(device);
  ll::DispatchSendParams p;
  p.c = common_from_list(common, peer_bases, device);
  check_tensor(x, "x", at::kBFloat16, 2, device);
  TORCH_CHECK(x.size(1) == p.c.hidden, "x must have hidden=", p.c.hidden, " columns, got ", x.size(1));
  const int64_t T = x.size(0);
  check_tensor(topk_idx, "topk_idx", at::kLong, 2, device);
  TORCH_CHECK(topk_idx.size(0) == T && topk_idx.size(1) == p.c.topk, "topk_idx must be [", T, ", ", p.c.topk, "]");
  check_tensor(topk_weights, "topk_weights", at::kFloat, 2, device);
  TORCH_CHECK(topk_weights.sizes() == topk_idx.sizes(), "topk_weights must have topk_idx's shape");
  check_tensor(token_slot, "token_slot", at::kInt, 2, device);
  TORCH_CHECK(token_slot.size(0) == T && token_slot.size(1) == p.c.num_ranks, "token_slot must be [", T, ", ",
              p.c.num_ranks, "]");
  p.x = x.data_ptr();
  p.topk_idx = topk_idx.data_ptr<int64_t>();
  p.topk_weights = topk_weights.data_ptr<float>();
  p.num_tokens = static_cast<int>(T);
  p.fp8 = fp8 != 0;
  p.header_bytes = static_cast<int>(header_bytes);
  p.token_slot = token_slot.data_ptr<int>();
  check_launch(ll::launch_dispatch_send(p, stream_of(device)), "ll_dispatch_send");
}

void ll_dispatch_recv(const at::Tensor& peer_bases, const at::Tensor& recv_x, const std::optional<at::Tensor>& recv_scales,
                      const at::Tensor& counts, const at::Tensor& row_pos, const at::Tensor& row_expert,
                      const at::Tensor& row_weight, const at::Tensor& src_counts, std::vector<int64_t> common,
                      int64_t wait_flags, int64_t header_bytes, int64_t copy_unroll) {
  const at::Device device = peer_bases.device();
  TORCH_CHECK(peer_bases.is_cuda(), "peer_bases must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(device);
  ll::DispatchRecvParams p;
  p.c = common_from_list(common, peer_bases, device);
  const int64_t L = p.c.num_local_experts, R = p.c.num_ranks * p.c.max_tokens, H = p.c.hidden, K = p.c.topk;
  p.fp8 = recv_scales.has_value();
  check_tensor(recv_x, "recv_x", p.fp8 ? at::kFloat8_e4m3fn : at::kBFloat16, 3, device);
  TORCH_CHECK(recv_x.size(0) == L && recv_x.size(1) == R && recv_x.size(2) == H, "recv_x must be [", L, ", ", R, ", ",
              H, "], got ", recv_x.sizes());
  if (p.fp8) {
    check_tensor(*recv_scales, "recv_scales", at::kFloat, 3, device);
    TORCH_CHECK(recv_scales->size(0) == L && recv_scales->size(1) == R && recv_scales->size(2) == H / ll::kFp8Block,
                "recv_scales must be [", L, ", ", R, ", ", H / ll::kFp8Block, "]");
    p.recv_scales = recv_scales->data_ptr<float>();
  }
  check_tensor(counts, "counts", at::kInt, 1, device);
  TORCH_CHECK(counts.size(0) == L, "counts must have ", L, " entries");
  check_row_metadata(row_pos, row_expert, row_weight, src_counts, R, K, p.c.num_ranks, device);
  p.wait_flags = wait_flags != 0;
  TORCH_CHECK(copy_unroll == 8 || copy_unroll == 16, "copy_unroll must be 8 or 16, got ", copy_unroll);
  p.copy_unroll = static_cast<int>(copy_unroll);
  p.header_bytes = static_cast<int>(header_bytes);
  p.recv_x = recv_x.data_ptr();
  p.counts = counts.data_ptr<int>();
  p.row_pos = row_pos.data_ptr<int>();
  p.row_expert = row_expert.data_ptr<int>();
  p.row_weight = row_weight.data_ptr<float>();
  p.src_counts = src_counts.data_ptr<int>();
  check_launch(ll::launch_dispatch_recv(p, stream_of(device)), "ll_dispatch_recv");
}

void ll_combine_send(const at::Tensor& y, const at::Tensor& row_pos, const at::Tensor& row_expert,
                     const at::Tensor& row_weight, const at::Tensor& src_counts, const at::Tensor& peer_bases,
                     std::vector<int64_t> common) {
  TORCH_CHECK(y.is_cuda(), "y must be a CUDA tensor");
  const at::Device device = y.device();
  const c10::cuda::CUDAGuard guard(device);
  ll::CombineSendParams p;
  p.c = common_from_list(common, peer_bases, device);
  const int64_t L = p.c.num_local_experts, R = p.c.num_ranks * p.c.max_tokens, H = p.c.hidden, K = p.c.topk;
  check_tensor(y, "y", at::kBFloat16, 3, device);
  TORCH_CHECK(y.size(0) == L && y.size(1) == R && y.size(2) == H, "y must be [", L, ", ", R, ", ", H, "], got ",
              y.sizes());
  check_row_metadata(row_pos, row_expert, row_weight, src_counts, R, K, p.c.num_ranks, device);
  p.y = y.data_ptr();
  p.row_pos = row_pos.data_ptr<int>();
  p.row_expert = row_expert.data_ptr<int>();
  p.row_weight = row_weight.data_ptr<float>();
  p.src_counts = src_counts.data_ptr<int>();
  check_launch(ll::launch_combine_send(p, stream_of(device)), "ll_combine_send");
}

void ll_combine_recv(const at::Tensor& token_slot, const at::Tensor& peer_bases, const at::Tensor& out,
                     std::vector<int64_t> common, int64_t wait_flags) {
  TORCH_CHECK(out.is_cuda(), "out must be a CUDA tensor");
  const at::Device device = out.device();
  const c10::cuda::CUDAGuard guard(device);
  ll::CombineRecvParams p;
  p.c = common_from_list(common, peer_bases, device);
  check_tensor(out, "out", at::kBFloat16, 2, device);
  TORCH_CHECK(out.size(1) == p.c.hidden, "out must have hidden=", p.c.hidden, " columns");
  check_tensor(token_slot, "token_slot", at::kInt, 2, device);
  TORCH_CHECK(token_slot.size(0) == out.size(0) && token_slot.size(1) == p.c.num_ranks, "token_slot must be [",
              out.size(0), ", ", p.c.num_ranks, "]");
  p.wait_flags = wait_flags != 0;
  p.num_tokens = static_cast<int>(out.size(0));
  p.token_slot = token_slot.data_ptr<int>();
  p.out = out.data_ptr();
  check_launch(ll::launch_combine_recv(p, stream_of(device)), "ll_combine_recv");
}

// Byte offsets, from a rank's buffer base, of the two words a copy-engine send of slot (kind,
// slot) from `src` uses for its arrival flag: [src's flag (in the receiver's buffer), the slot's
// send count (in src's own), which is copied into it].
std::vector<int64_t> ll_flag_copy_offsets(int64_t kind, int64_t slot, int64_t src) {
  TORCH_CHECK(kind == ll::kDispatch || kind == ll::kCombine, "kind must be 0 (dispatch) or 1 (combine), got ", kind);
  TORCH_CHECK(slot >= 0 && slot < ll::kMaxSlots, "slot must be in [0, ", ll::kMaxSlots, "), got ", slot);
  TORCH_CHECK(src >= 0 && src < ll::kMaxRanks, "src must be in [0, ", ll::kMaxRanks, "), got ", src);
  const int k = static_cast<int>(kind), s = static_cast<int>(slot);
  return {ll::flag_offset(k, s, static_cast<int>(src)), ll::send_seq_offset(k, s)};
}

std::vector<int64_t> ll_layout() {
  return {ll::kSignalBytes, ll::kMaxRanks,      ll::kMaxSlots,     ll::kMaxTokens, ll::kMaxTopk,
          ll::kFlagsOffset, ll::kAcksOffset,    ll::kSendSeqOffset, ll::kRegionHeader, ll::kFp8Block,
          ll::kMaxHookParts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(overlap, m) {
  m.def(
      "ll_dispatch_send(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor(a!) token_slot, Tensor peer_bases, "
      "int[] common, int fp8, int header_bytes) -> ()");
  m.def(
      "ll_dispatch_recv(Tensor peer_bases, Tensor(a!) recv_x, Tensor(b!)? recv_scales, Tensor(c!) counts, "
      "Tensor(d!) row_pos, Tensor(e!) row_expert, Tensor(f!) row_weight, Tensor(g!) src_counts, int[] common, "
      "int wait_flags, int header_bytes, int copy_unroll) -> ()");
  m.def(
      "ll_combine_send(Tensor y, Tensor row_pos, Tensor row_expert, Tensor row_weight, Tensor src_counts, "
      "Tensor peer_bases, int[] common) -> ()");
  m.def("ll_combine_recv(Tensor token_slot, Tensor peer_bases, Tensor(a!) out, int[] common, int wait_flags) -> ()");
  m.def("ll_layout() -> int[]", &ll_layout);
  m.def("ll_flag_copy_offsets(int kind, int slot, int src) -> int[]", &ll_flag_copy_offsets);
}

TORCH_LIBRARY_IMPL(overlap, CUDA, m) {
  m.impl("ll_dispatch_send", &ll_dispatch_send);
  m.impl("ll_dispatch_recv", &ll_dispatch_recv);
  m.impl("ll_combine_send", &ll_combine_send);
  m.impl("ll_combine_recv", &ll_combine_recv);
}
