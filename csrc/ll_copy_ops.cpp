// The copy-engine transfers of the low-latency path (overlap/ep/low_latency.py): views of peer
// memory for stream copies (the rows, and the send counts that raise the arrival flags), and,
// under CUDA-graph capture, the copies added to the captured graph as a branch that nothing
// waits for.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <vector>

namespace {

cudaStream_t current_stream(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()); }

// A uint8 tensor over nbytes of device memory at ptr (a peer's mapped buffer or our own), so
// `view.copy_(local)` becomes a cudaMemcpyAsync that a copy engine performs. The memory is owned
// by the symmetric buffer, which must outlive the view.
at::Tensor ll_view(int64_t ptr, int64_t nbytes, const at::Tensor& like) {
  TORCH_CHECK(like.is_cuda(), "like must be a CUDA tensor");
  TORCH_CHECK(ptr != 0 && nbytes >= 1, "ll_view needs a non-null pointer and nbytes >= 1");
  // target_device: a peer's memory reports the peer as its device; the view must live on ours.
  return at::for_blob(reinterpret_cast<void*>(ptr), {nbytes})
      .options(at::TensorOptions().dtype(at::kByte).device(like.device()))
      .target_device(like.device())
      .deleter([](void*) {})
      .make_tensor();
}

// The current stream's capture state: {capture id, graph, dependency nodes...} (handles as
// integers), for ll_graph_add_copies; raises unless the stream is capturing.
struct CapturePoint {
  unsigned long long id = 0;
  cudaGraph_t graph = nullptr;
  std::vector<cudaGraphNode_t> deps;
};

CapturePoint capture_point_of(cudaStream_t stream, const char* who) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CapturePoint p;
  const cudaGraphNode_t* deps = nullptr;
  size_t num_deps = 0;
#if CUDART_VERSION >= 13000
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &p.id, &p.graph, &deps, nullptr, &num_deps));
#else
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo_v2(stream, &status, &p.id, &p.graph, &deps, &num_deps));
#endif
  TORCH_CHECK(status == cudaStreamCaptureStatusActive, who, " needs the current stream to be capturing a CUDA graph");
  p.deps.assign(deps, deps + num_deps);   // the array is the stream's, and changes with it
  return p;
}

std::vector<int64_t> ll_capture_point() {
  const CapturePoint p = capture_point_of(c10::cuda::getCurrentCUDAStream(), "ll_capture_point");
  std::vector<int64_t> out = {static_cast<int64_t>(p.id), reinterpret_cast<int64_t>(p.graph)};
  for (cudaGraphNode_t n : p.deps) out.push_back(reinterpret_cast<int64_t>(n));
  return out;
}

// Add one send's transfers to the CUDA graph being captured, as a branch off `point` (what
// ll_capture_point returned right after the pack kernel: the pack's node): for each i, a copy of
// bytes[i] from src[i] to dst[i], then the arrival flag, an 8-byte copy from flag_src[i] (the
// sender's send count) to flags[i].
// No stream's dependencies change: nothing later waits for the branch, and no stream has to join
// it before the capture ends (a graph may have several leaf nodes; a replay completes once they
// all did). The receiver's flags and the senders' acks order everything else. Joining a side
// stream instead put a copy-engine node among the dependencies of the caller's next kernel, and
// the graph executor then moved the rest of the caller's chain to another hardware queue: ~4 us
// between every hook and the kernel after it (2 H200). The caller adds the branch once the
// stream has captured more after the pack (at the hook): added right after the pack, the copy
// was the pack's first child and took the pack's queue, and the caller's next kernel moved to
// another one (2 H200, a graph that starts with the pack).
void ll_graph_add_copies(std::vector<int64_t> point, std::vector<int64_t> dst, std::vector<int64_t> src,
                         std::vector<int64_t> bytes, std::vector<int64_t> flags, std::vector<int64_t> flag_src,
                         const at::Tensor& like) {
  TORCH_CHECK(like.is_cuda(), "like must be a CUDA tensor");
  TORCH_CHECK(point.size() >= 2, "point must be what ll_capture_point returned");
  const size_t n = dst.size();
  TORCH_CHECK(src.size() == n && bytes.size() == n && flags.size() == n && flag_src.size() == n,
              "dst, src, bytes, flags and flag_src must have one entry per transfer, got ", dst.size(), ", ",
              src.size(), ", ", bytes.size(), ", ", flags.size(), " and ", flag_src.size());
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(dst[i] != 0 && src[i] != 0 && bytes[i] >= 1, "transfer ", i, " needs non-null pointers and bytes >= 1");
    TORCH_CHECK(flags[i] != 0 && flag_src[i] != 0 && flags[i] % 8 == 0 && flag_src[i] % 8 == 0, "transfer ", i,
                "'s flag and flag source must be non-null and 8-byte aligned");
  }
  const c10::cuda::CUDAGuard guard(like.device());
  const CapturePoint now = capture_point_of(current_stream(like.device()), "ll_graph_add_copies");
  TORCH_CHECK(static_cast<int64_t>(now.id) == point[0] && reinterpret_cast<int64_t>(now.graph) == point[1],
              "the transfers of a low-latency operation sent during a CUDA-graph capture must be added to that same "
              "capture: call its hook before the capture ends, on a stream of the same capture");
  std::vector<cudaGraphNode_t> deps;
  for (size_t i = 2; i < point.size(); ++i) deps.push_back(reinterpret_cast<cudaGraphNode_t>(point[i]));
  for (size_t i = 0; i < n; ++i) {
    cudaGraphNode_t copy = nullptr, flag = nullptr;
    C10_CUDA_CHECK(cudaGraphAddMemcpyNode1D(&copy, now.graph, deps.data(), deps.size(), reinterpret_cast<void*>(dst[i]),
                                            reinterpret_cast<const void*>(src[i]), static_cast<size_t>(bytes[i]),
                                            cudaMemcpyDeviceToDevice));
    C10_CUDA_CHECK(cudaGraphAddMemcpyNode1D(&flag, now.graph, &copy, 1, reinterpret_cast<void*>(flags[i]),
                                            reinterpret_cast<const void*>(flag_src[i]), 8, cudaMemcpyDeviceToDevice));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(overlap, m) {
  m.def("ll_view(int ptr, int nbytes, Tensor like) -> Tensor");
  m.def("ll_capture_point() -> int[]", &ll_capture_point);
  m.def(
      "ll_graph_add_copies(int[] point, int[] dst, int[] src, int[] bytes, int[] flags, int[] flag_src, Tensor like) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(overlap, CUDA, m) {
  m.impl("ll_view", &ll_view);
  m.impl("ll_graph_add_copies", &ll_graph_add_copies);
}
