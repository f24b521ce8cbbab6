// Thin torch binding of the intranode NVLink kernels (csrc/kernels/intranode*.cu) as ops in the
// `overlap` namespace. The Python side (overlap/ep/backends/cuda_backend.py) owns the symmetric
// buffer, the sequence numbers and the streams; these functions only check shapes and launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstring>
#include <optional>

#include "kernels/intranode.cuh"

namespace {

namespace in = overlap::intranode;

void check_cuda_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim,
                       const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the operation runs on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return in::kFloat32;
    case at::kBFloat16: return in::kBFloat16;
    case at::kHalf: return in::kFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t, " (float32, bfloat16 or float16)");
  }
  return -1;
}

void check_launch(int status, const char* op) {
  TORCH_CHECK(status != overlap::kBadArgument, op, ": arguments the kernel does not support (see intranode.cuh)");
  TORCH_CHECK(status == overlap::kOk, op, ": kernel launch failed: ", in::last_launch_error());
}

// Fills the fields every operation shares.
in::CommonParams common_params(const at::Tensor& peer_bases, const at::Device& device, int64_t rank, int64_t num_blocks,
                               int64_t max_tokens, int64_t timeout_ns, int64_t status_ptr) {
  check_cuda_tensor(peer_bases, "peer_bases", at::kLong, 1, device);
  const int64_t world = peer_bases.size(0);
  TORCH_CHECK(world >= 1 && world <= in::kMaxRanks, "world size ", world, " not in [1, ", in::kMaxRanks, "]");
  TORCH_CHECK(rank >= 0 && rank < world, "rank ", rank, " not in [0, ", world, ")");
  TORCH_CHECK(num_blocks >= 1, "num_blocks must be >= 1, got ", num_blocks);
  TORCH_CHECK(timeout_ns > 0, "timeout_ns must be > 0, got ", timeout_ns);
  TORCH_CHECK(status_ptr != 0, "status_ptr must be a mapped host pointer");
  in::CommonParams c;
  c.rank = static_cast<int>(rank);
  c.num_ranks = static_cast<int>(world);
  c.num_blocks = static_cast<int>(num_blocks);
  c.max_tokens = max_tokens;
  c.timeout_ns = static_cast<uint64_t>(timeout_ns);
  c.peer_bases = peer_bases.data_ptr<int64_t>();
  c.status_host = reinterpret_cast<int*>(status_ptr);
  return c;
}

// The per-op tuning and profiling arguments every data kernel takes.
void set_copy_options(in::CommonParams& c, int64_t copy_unroll, int64_t stamps_ptr) {
  TORCH_CHECK(copy_unroll == 8 || copy_unroll == 16, "copy_unroll must be 8 or 16, got ", copy_unroll);
  c.copy_unroll = static_cast<int>(copy_unroll);
  c.stamps = reinterpret_cast<uint64_t*>(stamps_ptr);  // 0: no phase stamps
}

void check_send_split(int64_t send_warps, int64_t send_chunk) {
  TORCH_CHECK(send_warps >= 1 && send_warps < in::kWarps, "send_warps must be in [1, ", in::kWarps - 1,
              "] (the other warps of a block receive), got ", send_warps);
  TORCH_CHECK(send_chunk >= 1 && send_chunk <= in::kMaxSendChunk, "send_chunk must be in [1, ", in::kMaxSendChunk,
              "], got ", send_chunk);
}

const int* count_matrix_ptr(const at::Tensor& count_matrix, int64_t world, const at::Device& device) {
  check_cuda_tensor(count_matrix, "count_matrix", at::kInt, 2, device);
  TORCH_CHECK(count_matrix.size(0) == world && count_matrix.size(1) == world, "count_matrix must be [", world, ", ",
              world, "], got ", count_matrix.sizes());
  return count_matrix.data_ptr<int>();
}

void intranode_notify(const at::Tensor& send_counts, const at::Tensor& peer_bases, const at::Tensor& count_matrix,
                      int64_t rank, int64_t num_blocks, int64_t max_tokens, int64_t timeout_ns, int64_t status_ptr) {
  TORCH_CHECK(num_blocks == 1, "the counts exchange runs on one block, got num_blocks=", num_blocks);
  TORCH_CHECK(send_counts.is_cuda(), "send_counts must be a CUDA tensor");
  const at::Device device = send_counts.device();
  const c10::cuda::CUDAGuard guard(device);
  const in::CommonParams c =
      common_params(peer_bases, device, rank, num_blocks, max_tokens, timeout_ns, status_ptr);
  check_cuda_tensor(send_counts, "send_counts", at::kInt, 1, device);
  TORCH_CHECK(send_counts.size(0) == c.num_ranks, "send_counts must have ", c.num_ranks, " entries");
  int* out = const_cast<int*>(count_matrix_ptr(count_matrix, c.num_ranks, device));
  check_launch(in::launch_notify(c, send_counts.data_ptr<int>(), out, c10::cuda::getCurrentCUDAStream(device.index())),
               "intranode_notify");
}

void intranode_dispatch(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                        const at::Tensor& token_slot, const at::Tensor& count_matrix, const at::Tensor& peer_bases,
                        const at::Tensor& recv_x, const at::Tensor& recv_topk_idx, const at::Tensor& recv_topk_weights,
                        const at::Tensor& recv_expert_counts, int64_t rank, int64_t num_blocks, int64_t max_tokens,
                        int64_t timeout_ns, int64_t status_ptr, int64_t x_region_offset, int64_t x_row_stride,
                        int64_t meta_region_offset, int64_t flag_region_offset, int64_t send_warps,
                        int64_t send_chunk, const std::optional<at::Tensor>& recv_scales, int64_t copy_unroll,
                        int64_t stamps_ptr) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  const at::Device device = x.device();
  const c10::cuda::CUDAGuard guard(device);
  check_cuda_tensor(x, "x", x.scalar_type(), 2, device);
  const int dtype = dtype_code(x.scalar_type());
  const bool quantise = recv_scales.has_value();
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  check_cuda_tensor(topk_idx, "topk_idx", at::kLong, 2, device);
  TORCH_CHECK(topk_idx.size(0) == num_tokens, "topk_idx has ", topk_idx.size(0), " rows, x has ", num_tokens);
  const int64_t topk = topk_idx.size(1);
  check_cuda_tensor(topk_weights, "topk_weights", at::kFloat, 2, device);
  TORCH_CHECK(topk_weights.sizes() == topk_idx.sizes(), "topk_weights must have topk_idx's shape");
  in::DispatchParams p;
  p.c = common_params(peer_bases, device, rank, num_blocks, max_tokens, timeout_ns, status_ptr);
  const int64_t world = p.c.num_ranks;
  p.c.count_matrix = count_matrix_ptr(count_matrix, world, device);
  set_copy_options(p.c, copy_unroll, stamps_ptr);
  check_cuda_tensor(token_slot, "token_slot", at::kInt, 2, device);
  TORCH_CHECK(token_slot.size(0) == num_tokens && token_slot.size(1) == world, "token_slot must be [", num_tokens,
              ", ", world, "], got ", token_slot.sizes());
  check_cuda_tensor(recv_x, "recv_x", quantise ? at::kFloat8_e4m3fn : x.scalar_type(), 2, device);
  TORCH_CHECK(recv_x.size(1) == hidden, "recv_x must have hidden ", hidden);
  const int64_t num_recv = recv_x.size(0);
  if (quantise) {
    TORCH_CHECK(hidden % in::kFp8Block == 0, "FP8 dispatch needs hidden to be a multiple of ", in::kFp8Block,
                ", got ", hidden);
    check_cuda_tensor(*recv_scales, "recv_scales", at::kFloat, 2, device);
    TORCH_CHECK(recv_scales->size(0) == num_recv && recv_scales->size(1) == hidden / in::kFp8Block,
                "recv_scales must be [", num_recv, ", ", hidden / in::kFp8Block, "], got ", recv_scales->sizes());
  }
  check_send_split(send_warps, send_chunk);
  check_cuda_tensor(recv_topk_idx, "recv_topk_idx", at::kLong, 2, device);
  TORCH_CHECK(recv_topk_idx.size(0) == num_recv && recv_topk_idx.size(1) == topk, "recv_topk_idx must be [", num_recv,
              ", ", topk, "]");
  check_cuda_tensor(recv_topk_weights, "recv_topk_weights", at::kFloat, 2, device);
  TORCH_CHECK(recv_topk_weights.sizes() == recv_topk_idx.sizes(), "recv_topk_weights must match recv_topk_idx");
  check_cuda_tensor(recv_expert_counts, "recv_expert_counts", at::kInt, 1, device);

  p.x = x.data_ptr();
  p.topk_idx = topk_idx.data_ptr<int64_t>();
  p.topk_weights = topk_weights.data_ptr<float>();
  p.token_slot = token_slot.data_ptr<int>();
  p.num_tokens = num_tokens;
  p.hidden = hidden;
  p.dtype = dtype;
  p.topk = static_cast<int>(topk);
  p.num_local_experts = static_cast<int>(recv_expert_counts.size(0));
  p.x_region_offset = x_region_offset;
  p.x_row_stride = x_row_stride;
  p.meta_region_offset = meta_region_offset;
  p.flag_region_offset = flag_region_offset;
  p.send_warps = static_cast<int>(send_warps);
  p.send_chunk = static_cast<int>(send_chunk);
  p.num_out_rows = num_recv;
  p.recv_x = recv_x.data_ptr();
  p.recv_scales = quantise ? recv_scales->data_ptr<float>() : nullptr;
  p.recv_topk_idx = recv_topk_idx.data_ptr<int64_t>();
  p.recv_topk_weights = recv_topk_weights.data_ptr<float>();
  p.recv_expert_counts = recv_expert_counts.data_ptr<int>();
  check_launch(in::launch_dispatch(p, c10::cuda::getCurrentCUDAStream(device.index())), "intranode_dispatch");
}

void intranode_combine(const at::Tensor& y, const at::Tensor& token_slot, const at::Tensor& count_matrix,
                       const at::Tensor& peer_bases, const at::Tensor& out, int64_t rank, int64_t num_blocks,
                       int64_t max_tokens, int64_t timeout_ns, int64_t status_ptr, int64_t region_offset,
                       int64_t row_stride, int64_t flag_region_offset, int64_t send_warps, int64_t send_chunk,
                       int64_t copy_unroll, int64_t stamps_ptr) {
  TORCH_CHECK(y.is_cuda(), "y must be a CUDA tensor");
  const at::Device device = y.device();
  const c10::cuda::CUDAGuard guard(device);
  check_cuda_tensor(y, "y", y.scalar_type(), 2, device);
  in::CombineParams p;
  p.dtype = dtype_code(y.scalar_type());
  p.c = common_params(peer_bases, device, rank, num_blocks, max_tokens, timeout_ns, status_ptr);
  const int64_t world = p.c.num_ranks, hidden = y.size(1);
  p.c.count_matrix = count_matrix_ptr(count_matrix, world, device);
  set_copy_options(p.c, copy_unroll, stamps_ptr);
  check_cuda_tensor(out, "out", y.scalar_type(), 2, device);
  TORCH_CHECK(out.size(1) == hidden, "out must have hidden ", hidden);
  const int64_t num_tokens = out.size(0);
  check_cuda_tensor(token_slot, "token_slot", at::kInt, 2, device);
  TORCH_CHECK(token_slot.size(0) == num_tokens && token_slot.size(1) == world, "token_slot must be [", num_tokens,
              ", ", world, "], got ", token_slot.sizes());
  p.y = y.data_ptr();
  p.token_slot = token_slot.data_ptr<int>();
  p.num_tokens = num_tokens;
  p.hidden = hidden;
  check_send_split(send_warps, send_chunk);
  p.region_offset = region_offset;
  p.row_stride = row_stride;
  p.flag_region_offset = flag_region_offset;
  p.send_warps = static_cast<int>(send_warps);
  p.send_chunk = static_cast<int>(send_chunk);
  p.out = out.data_ptr();
  check_launch(in::launch_combine(p, c10::cuda::getCurrentCUDAStream(device.index())), "intranode_combine");
}

at::Tensor intranode_read_peer_u64(const at::Tensor& peer_bases, int64_t offset) {
  TORCH_CHECK(peer_bases.is_cuda(), "peer_bases must be a CUDA tensor");
  const at::Device device = peer_bases.device();
  const c10::cuda::CUDAGuard guard(device);
  check_cuda_tensor(peer_bases, "peer_bases", at::kLong, 1, device);
  auto out = at::empty({peer_bases.size(0)}, peer_bases.options());
  const int status = in::launch_read_peer_u64(peer_bases.data_ptr<int64_t>(), static_cast<int>(peer_bases.size(0)),
                                              offset, reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()),
                                              c10::cuda::getCurrentCUDAStream(device.index()));
  check_launch(status, "intranode_read_peer_u64");
  return out;
}

// A CPU int32 tensor in pinned, device-mapped host memory (kernels write failures into it while
// the host reads it without synchronising), and the address kernels must use for it.
std::tuple<at::Tensor, int64_t> intranode_alloc_status(int64_t num_words) {
  TORCH_CHECK(num_words >= 1, "num_words must be >= 1");
  void* host = nullptr;
  const cudaError_t err = cudaHostAlloc(&host, num_words * sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable);
  TORCH_CHECK(err == cudaSuccess, "cudaHostAlloc of the status words failed: ", cudaGetErrorString(err));
  std::memset(host, 0, num_words * sizeof(int));
  void* dev = nullptr;
  const cudaError_t err2 = cudaHostGetDevicePointer(&dev, host, 0);
  if (err2 != cudaSuccess) {
    cudaFreeHost(host);
    TORCH_CHECK(false, "cudaHostGetDevicePointer failed: ", cudaGetErrorString(err2));
  }
  auto t = at::from_blob(host, {num_words}, [](void* ptr) { cudaFreeHost(ptr); }, at::TensorOptions().dtype(at::kInt));
  return {t, reinterpret_cast<int64_t>(dev)};
}

std::vector<int64_t> intranode_layout() {
  return {in::kSignalBytes,       in::kCanaryOffset,       in::kMaxRanks,         in::kStatusWords,
          in::kWarps,             in::kDefaultSendWarps,   in::kMaxSendChunk,     in::kDefaultSendChunk,
          in::kDefaultFp8SendWarps, in::kDefaultCopyUnroll, in::kStampWords, in::kDefaultCombineSendChunk};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(overlap, m) {
  m.def(
      "intranode_notify(Tensor send_counts, Tensor peer_bases, Tensor(a!) count_matrix, int rank, int num_blocks, "
      "int max_tokens, int timeout_ns, int status_ptr) -> ()");
  m.def(
      "intranode_dispatch(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor token_slot, Tensor count_matrix, "
      "Tensor peer_bases, Tensor(a!) recv_x, Tensor(b!) recv_topk_idx, Tensor(c!) recv_topk_weights, "
      "Tensor(d!) recv_expert_counts, int rank, int num_blocks, int max_tokens, int timeout_ns, int status_ptr, "
      "int x_region_offset, int x_row_stride, int meta_region_offset, int flag_region_offset, int send_warps, "
      "int send_chunk, Tensor(e!)? recv_scales=None, int copy_unroll=16, int stamps_ptr=0) -> ()");
  m.def(
      "intranode_combine(Tensor y, Tensor token_slot, Tensor count_matrix, Tensor peer_bases, Tensor(a!) out, "
      "int rank, int num_blocks, int max_tokens, int timeout_ns, int status_ptr, int region_offset, int row_stride, "
      "int flag_region_offset, int send_warps, int send_chunk, int copy_unroll=16, int stamps_ptr=0) -> ()");
  m.def("intranode_read_peer_u64(Tensor peer_bases, int offset) -> Tensor");
  // No tensor arguments: these register as catch-all kernels.
  m.def("intranode_alloc_status(int num_words) -> (Tensor, int)", &intranode_alloc_status);
  m.def("intranode_layout() -> int[]", &intranode_layout);
}

TORCH_LIBRARY_IMPL(overlap, CUDA, m) {
  m.impl("intranode_notify", &intranode_notify);
  m.impl("intranode_dispatch", &intranode_dispatch);
  m.impl("intranode_combine", &intranode_combine);
  m.impl("intranode_read_peer_u64", &intranode_read_peer_u64);
}
