// The copy-engine transfers of the low-latency path (overlap/ep/low_latency.py): views of peer
// memory for stream copies (the rows, and the send counts that raise the arrival flags),
// constant flags written by the GPU's front end (ce_flags), and, under CUDA-graph capture, the
// copies added to the captured graph as a branch that nothing waits for.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

namespace {

cudaStream_t current_stream(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()); }

// A driver function looked up once through the runtime (so the extension needs no -lcuda); null
// where the driver lacks it.
template <typename Fn>
Fn driver_function(const char* name) {
  void* ptr = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const bool ok = cudaGetDriverEntryPointByVersion(name, &ptr, 12000, cudaEnableDefault, &found) == cudaSuccess &&
                  found == cudaDriverEntryPointSuccess;
  (void)cudaGetLastError();
  return ok ? reinterpret_cast<Fn>(ptr) : nullptr;
}

using WriteValue32Fn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using AddBatchMemOpNodeFn = CUresult (*)(CUgraphNode*, CUgraph, const CUgraphNode*, size_t,
                                         const CUDA_BATCH_MEM_OP_NODE_PARAMS*);
using CtxGetCurrentFn = CUresult (*)(CUcontext*);

struct Driver {
  WriteValue32Fn write_value32 = nullptr;
  AddBatchMemOpNodeFn add_batch_mem_op_node = nullptr;
  CtxGetCurrentFn ctx_get_current = nullptr;
};

const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    d.write_value32 = driver_function<WriteValue32Fn>("cuStreamWriteValue32");
    d.add_batch_mem_op_node = driver_function<AddBatchMemOpNodeFn>("cuGraphAddBatchMemOpNode");
    d.ctx_get_current = driver_function<CtxGetCurrentFn>("cuCtxGetCurrent");
  });
  return d;
}

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

// The 32-bit stream memory operations (v2) are available on every platform since CUDA 11.7;
// only a driver too old to export them lacks the entry points.
bool ll_can_write_flags() {
  const Driver& d = driver();
  return d.write_value32 != nullptr && d.add_batch_mem_op_node != nullptr && d.ctx_get_current != nullptr;
}

// Queue on the current stream a write of `value` to the 4-byte word at `ptr` (this GPU's or a
// peer's mapped memory), done by the GPU's front end: no kernel, no copy engine, no SM. The
// driver fences the stream's earlier writes before it.
void ll_write_flag(int64_t ptr, int64_t value, const at::Tensor& like) {
  TORCH_CHECK(like.is_cuda(), "like must be a CUDA tensor");
  TORCH_CHECK(ptr != 0 && ptr % 4 == 0, "ll_write_flag needs a non-null 4-byte-aligned address");
  TORCH_CHECK(value >= 0 && value <= 0xffffffffLL, "ll_write_flag writes a 32-bit unsigned value");
  const WriteValue32Fn fn = driver().write_value32;
  TORCH_CHECK(fn != nullptr, "this CUDA driver has no cuStreamWriteValue32; use ll_can_write_flags first");
  const c10::cuda::CUDAGuard guard(like.device());
  const CUresult r = fn(reinterpret_cast<CUstream>(current_stream(like.device())), static_cast<CUdeviceptr>(ptr),
                        static_cast<cuuint32_t>(value), CU_STREAM_WRITE_VALUE_DEFAULT);
  TORCH_CHECK(r == CUDA_SUCCESS, "cuStreamWriteValue32 failed with CUresult ", static_cast<int>(r));
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
// bytes[i] from src[i] to dst[i], then the arrival flag at flags[i]: an 8-byte copy from
// flag_src[i] (the sender's send count: counting flags), or, where flag_src[i] is 0, a
// memory-operation node writing the constant 1 to the 4-byte word (ce_flags).
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
  bool memop = false;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(dst[i] != 0 && src[i] != 0 && bytes[i] >= 1, "transfer ", i, " needs non-null pointers and bytes >= 1");
    const int64_t align = flag_src[i] != 0 ? 8 : 4;
    TORCH_CHECK(flags[i] != 0 && flags[i] % align == 0 && flag_src[i] % 8 == 0, "transfer ", i,
                "'s flag address must be non-null and ", align, "-byte aligned (and its flag source 8-byte aligned)");
    memop = memop || flag_src[i] == 0;
  }
  const Driver& drv = driver();
  TORCH_CHECK(!memop || ll_can_write_flags(), "this CUDA driver has no graph memory-operation nodes; raise the flags "
              "by copying the send counts (OVERLAP_LL_FLAG_WRITE=seq)");
  const c10::cuda::CUDAGuard guard(like.device());
  const CapturePoint now = capture_point_of(current_stream(like.device()), "ll_graph_add_copies");
  TORCH_CHECK(static_cast<int64_t>(now.id) == point[0] && reinterpret_cast<int64_t>(now.graph) == point[1],
              "the transfers of a low-latency operation sent during a CUDA-graph capture must be added to that same "
              "capture: call its hook before the capture ends, on a stream of the same capture");
  std::vector<cudaGraphNode_t> deps;
  for (size_t i = 2; i < point.size(); ++i) deps.push_back(reinterpret_cast<cudaGraphNode_t>(point[i]));
  CUcontext ctx = nullptr;
  if (memop) {
    const CUresult r = drv.ctx_get_current(&ctx);
    TORCH_CHECK(r == CUDA_SUCCESS && ctx != nullptr, "cuCtxGetCurrent failed with CUresult ", static_cast<int>(r));
  }
  for (size_t i = 0; i < n; ++i) {
    cudaGraphNode_t copy = nullptr;
    C10_CUDA_CHECK(cudaGraphAddMemcpyNode1D(&copy, now.graph, deps.data(), deps.size(), reinterpret_cast<void*>(dst[i]),
                                            reinterpret_cast<const void*>(src[i]), static_cast<size_t>(bytes[i]),
                                            cudaMemcpyDeviceToDevice));
    if (flag_src[i] != 0) {
      cudaGraphNode_t flag = nullptr;
      C10_CUDA_CHECK(cudaGraphAddMemcpyNode1D(&flag, now.graph, &copy, 1, reinterpret_cast<void*>(flags[i]),
                                              reinterpret_cast<const void*>(flag_src[i]), 8, cudaMemcpyDeviceToDevice));
      continue;
    }
    CUstreamBatchMemOpParams op{};
    op.writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_32;
    op.writeValue.address = static_cast<CUdeviceptr>(flags[i]);
    op.writeValue.value = 1u;
    op.writeValue.flags = CU_STREAM_WRITE_VALUE_DEFAULT;
    CUDA_BATCH_MEM_OP_NODE_PARAMS params{};
    params.ctx = ctx;
    params.count = 1;
    params.paramArray = &op;
    params.flags = 0;
    CUgraphNode node = nullptr;
    const CUgraphNode parent = reinterpret_cast<CUgraphNode>(copy);
    const CUresult r = drv.add_batch_mem_op_node(&node, reinterpret_cast<CUgraph>(now.graph), &parent, 1, &params);
    TORCH_CHECK(r == CUDA_SUCCESS, "cuGraphAddBatchMemOpNode failed with CUresult ", static_cast<int>(r));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(overlap, m) {
  m.def("ll_view(int ptr, int nbytes, Tensor like) -> Tensor");
  m.def("ll_write_flag(int ptr, int value, Tensor like) -> ()");
  m.def("ll_can_write_flags() -> bool", &ll_can_write_flags);
  m.def("ll_capture_point() -> int[]", &ll_capture_point);
  m.def(
      "ll_graph_add_copies(int[] point, int[] dst, int[] src, int[] bytes, int[] flags, int[] flag_src, Tensor like) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(overlap, CUDA, m) {
  m.impl("ll_view", &ll_view);
  m.impl("ll_write_flag", &ll_write_flag);
  m.impl("ll_graph_add_copies", &ll_graph_add_copies);
}
