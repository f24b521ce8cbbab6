// Intranode (NVLink) expert-parallel dispatch and combine over symmetric memory.
//
// Every rank owns one symmetric buffer that all peers can write (torch symmetric memory maps it
// into every process). Its layout, in bytes from the buffer base:
//
//   [0, kSignalBytes)      signals: ready[r] (u64, written by rank r), done[r] (u64, atomically
//                          incremented by rank r's blocks), a local sticky error word, a canary,
//                          and the [W, W] int32 token-count matrix the notify step fills.
//   dispatch region        rows of tokens this rank receives, in final receive order
//                          (source rank, then source token), then one metadata row per token
//                          (k pairs {local expert id, fp32 weight}).
//   combine region         one row per (source-rank r, slot s) at row r * max_tokens + s: the
//                          partial result rank r computed for this rank's token in slot s.
//
// Protocol of every operation (notify = the counts exchange before a dispatch, dispatch,
// combine: one kernel launch each, numbered by a per-buffer sequence number `seq` that all ranks
// advance identically):
//   1. ready: block 0 publishes `seq * 4 + kind` into every peer's ready[me]; every block waits
//      until ready[r] reaches that value for all r. A rank only runs kernel `seq` once its kernel
//      `seq - 1` has finished reading its regions, so this is what makes buffer reuse safe.
//   2. send: 16-byte (or narrower, for odd row sizes) stores straight into peers' regions.
//   3. done: after __syncthreads, each block adds 1 to every peer's done[me] with release
//      semantics; a receiver waits (acquire) until done[r] reaches done_target, the number of
//      blocks all operations so far have launched (the host keeps that running sum).
//   4. receive: copy out (dispatch) or reduce in fp32 (combine) from the local region.
// Counters only grow, so back-to-back calls never need a reset. Every wait is bounded by a
// %globaltimer deadline; a timeout writes {code, peer, seq, kind} to a host-mapped status word
// and the kernel exits; later kernels see the sticky error word and exit at once.
#pragma once

#include "common.cuh"

namespace overlap {
namespace intranode {

constexpr int kMaxRanks = 32;            // one warp checks all peers' flags
constexpr int kThreads = 512;            // 16 warps per block
constexpr int64_t kReadyOffset = 0;      // u64 ready[kMaxRanks]
constexpr int64_t kDoneOffset = 512;     // u64 done[kMaxRanks]
constexpr int64_t kErrorOffset = 1024;   // int32 sticky error word (local only)
constexpr int64_t kCanaryOffset = 2048;  // u64 written by the owner at setup, read by peers
constexpr int64_t kCountsOffset = 4096;  // int32 counts[kMaxRanks][kMaxRanks]: [source][destination]
constexpr int64_t kSignalBytes = 8192;   // regions start here (keeps them 4 KiB aligned)

// Operation kinds (the low two bits of a ready value).
enum OpKind : int { kDispatch = 1, kCombine = 2, kNotify = 3 };

// Status words written to host-mapped memory on failure (int32 each).
enum StatusWord : int { kStatusCode = 0, kStatusPeer = 1, kStatusSeq = 2, kStatusKind = 3, kStatusWords = 4 };

// Codes in kStatusCode (0 = ok). kReadyTimeout: a peer never started this operation;
// kDataTimeout: a peer started but did not finish sending; kOpMismatch: a peer runs a
// different operation kind under the same sequence number.
enum ErrorCode : int { kNoError = 0, kReadyTimeout = 1, kDataTimeout = 2, kOpMismatch = 3 };

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// constexpr: device code calls it too (nvcc runs with --expt-relaxed-constexpr).
constexpr int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Fields every operation (notify, dispatch, combine) shares.
struct CommonParams {
  int rank = 0;
  int num_ranks = 1;
  int num_blocks = 1;             // grid size: the SM budget; must be equal on every rank
  int64_t max_tokens = 0;         // rows per source rank in a region (EPBuffer.max_tokens_per_rank)
  uint64_t seq = 0;               // this operation's sequence number (1-based)
  uint64_t done_target = 0;       // blocks launched by operations 1..seq (each signals every rank once)
  uint64_t timeout_ns = 0;        // bound of every spin-wait
  const int64_t* peer_bases = nullptr;  // device [num_ranks]: each rank's buffer base, mapped here
  const int* count_matrix = nullptr;    // device [num_ranks, num_ranks]: tokens rank s sends to rank d
                                        // (unused by notify, which produces it)
  int* status_host = nullptr;     // host-mapped int32[kStatusWords], device-side pointer
};

// A dispatch moves each token row either as it is (recv_scales == nullptr), or quantised on
// the way: e4m3 values plus one fp32 scale per kFp8Block channels (scale = amax / 448, 1 for an
// all-zero block; value = x / scale, round-to-nearest, saturating). The region row then holds
// the hidden fp8 bytes followed by the hidden / kFp8Block scales.
constexpr int kFp8Block = 128;

struct DispatchParams {
  CommonParams c;
  const void* x = nullptr;             // [num_tokens, hidden] of dtype
  const int64_t* topk_idx = nullptr;   // [num_tokens, topk] global expert ids, -1 = none
  const float* topk_weights = nullptr; // [num_tokens, topk]
  const int* token_slot = nullptr;     // [num_tokens, num_ranks] slot in each rank's send block or -1
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int dtype = kBFloat16;               // of x
  int topk = 1;
  int num_local_experts = 1;
  int64_t x_region_offset = 0;         // dispatch rows: byte offset from a base
  int64_t x_row_stride = 0;            // bytes between rows there (a multiple of 16)
  int64_t meta_region_offset = 0;      // metadata rows (topk * 8 bytes each)
  void* recv_x = nullptr;              // [num_recv, hidden] of dtype, or of e4m3 bytes when quantising
  float* recv_scales = nullptr;        // [num_recv, hidden / kFp8Block], or nullptr: no quantisation
  int64_t* recv_topk_idx = nullptr;    // [num_recv, topk] local ids, -1 elsewhere
  float* recv_topk_weights = nullptr;  // [num_recv, topk], 0 where the id is -1
  int* recv_expert_counts = nullptr;   // [num_local_experts], zeroed by the caller
};

struct CombineParams {
  CommonParams c;
  const void* y = nullptr;             // [num_recv, hidden] rows this rank computed
  const int* token_slot = nullptr;     // [num_tokens, num_ranks] of this rank's own dispatch
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int dtype = kBFloat16;
  int64_t region_offset = 0;           // combine rows: byte offset from a base
  int64_t row_stride = 0;              // bytes between rows (hidden * elem rounded up to 16)
  void* out = nullptr;                 // [num_tokens, hidden] in dtype
};

inline bool common_params_ok(const CommonParams& c) {
  return c.num_ranks >= 1 && c.num_ranks <= kMaxRanks && c.rank >= 0 && c.rank < c.num_ranks && c.num_blocks >= 1 &&
         c.max_tokens >= 0 && c.seq >= 1 && c.done_target >= static_cast<uint64_t>(c.num_blocks) &&
         c.peer_bases != nullptr && c.status_host != nullptr;
}

// Both return kOk, kBadArgument (sizes/pointers the kernels do not support) or kLaunchFailed.
int launch_dispatch(const DispatchParams& p, cudaStream_t stream);
int launch_combine(const CombineParams& p, cudaStream_t stream);

// Counts exchange before a dispatch (one block): every rank publishes send_counts [num_ranks]
// (tokens it sends to each rank) to every peer; out [num_ranks, num_ranks] receives the full
// matrix, row = source. Uses c.num_blocks == 1.
int launch_notify(const CommonParams& c, const int* send_counts, int* out, cudaStream_t stream);

// Reads the u64 at peer_bases[r] + offset for every r into out[r] (setup check of the mapping).
int launch_read_peer_u64(const int64_t* peer_bases, int num_ranks, int64_t offset, uint64_t* out,
                         cudaStream_t stream);

// After a launch: kOk, or kLaunchFailed with the CUDA error kept for last_launch_error().
int record_launch();
// The CUDA error string of the last failed launch on this thread ("" if none).
const char* last_launch_error();

// Widest vector (16, 8, 4, 2 or 1 bytes) that divides row_bytes and every address given.
inline int pick_vec_bytes(int64_t row_bytes, const void* a, const void* b) {
  const uint64_t bits = static_cast<uint64_t>(row_bytes) | reinterpret_cast<uint64_t>(a) | reinterpret_cast<uint64_t>(b);
  int vec = 16;
  while (vec > 1 && (bits % vec) != 0) vec >>= 1;
  return vec;
}

}  // namespace intranode
}  // namespace overlap
