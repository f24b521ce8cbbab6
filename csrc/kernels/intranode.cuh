// Intranode (NVLink) expert-parallel dispatch and combine over symmetric memory.
//
// Every rank owns one symmetric buffer that all peers can write (torch symmetric memory maps it
// into every process). Its layout, in bytes from the buffer base:
//
//   [0, kSignalBytes)      signals: ready[r] (u64, written by rank r), done[r] (u64, unused: kept
//                          so both backends share one layout), a local sticky error word, the
//                          local operation counter, finished-block and sender-work counters,
//                          counts_flag[r], a canary, and the [W, W] int32 token-count matrix the
//                          counts exchange fills.
//   arrival flags          one u64 per dispatch row and one per combine row: the sequence number
//                          of the operation that last delivered that row.
//   dispatch region        rows of tokens this rank receives from peers, in final receive order
//                          (source rank, then source token), then one metadata row per token
//                          (k pairs {local expert id, fp32 weight}).
//   combine region         one row per (source-rank r, slot s) at row r * max_tokens + s: the
//                          partial result rank r computed for this rank's token in slot s.
//
// Protocol of every operation (notify = the counts exchange before a dispatch, dispatch,
// combine: one kernel launch each). Sequence numbers live on the GPU: a kernel takes
// seq = op_count + 1 from its own buffer and its last block to finish stores op_count = seq, so
// launches carry no per-call argument and a captured CUDA graph replays correctly.
//   1. ready: block 0 publishes `seq * 4 + kind` into every peer's ready[me]; every block waits
//      until ready[r] reaches at least seq * 4 for all r (a peer may already be one operation
//      ahead). A rank only starts kernel `seq` once its kernel `seq - 1` has finished reading
//      its regions, so no peer writes into a region before its owner is done with it.
//   2. The warps of every block split into senders and receivers (`send_warps` of kWarps send),
//      so receiving overlaps sending instead of following it.
//      Senders claim chunks of `send_chunk` tokens (dispatch) or received rows (combine) from a
//      local counter, so a warp that gets less link bandwidth simply takes fewer chunks (a
//      static split left the slowest warps ~1.7x behind the median on 4 GPUs). Per item,
//      16-byte stores straight into the peer's region; after every `send_chunk` rows,
//      __syncwarp, one system-scope fence and relaxed stores of seq to those rows' arrival flags
//      (a fence per row would stall each warp for an NVLink round trip per row). Rows for this
//      rank itself skip the region: dispatch writes them straight into the outputs and combine
//      reads them straight from y.
//      Receivers: wait (acquire) for a row's flag to reach seq, then copy it out (dispatch) or
//      sum a token's rows in fp32 in ascending rank order (combine). They too claim chunks
//      from a counter, and a sender warp that has nothing left to send joins them: the
//      receive side would otherwise finish well after the last row landed.
// Every wait is bounded by a %globaltimer deadline; a timeout writes {code, peer, seq, kind} to
// a host-mapped status word and the block stops; later kernels see the sticky error word and
// exit at once.
//
// Phase stamps (optional, CommonParams::stamps): lane 0 of every warp records %globaltimer at
// the phases below, so a run can say where a kernel's time goes (handshake, sending, waiting
// for rows, the tail) without hardware counters. Off (nullptr) costs one branch per row.
#pragma once

#include "common.cuh"

namespace overlap {
namespace intranode {

constexpr int kMaxRanks = 32;            // one warp checks all peers' flags
constexpr int kThreads = 512;            // 16 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kDefaultSendWarps = 6;     // of kWarps; the rest receive (best of a sweep on 2 H200)
constexpr int kMaxSendChunk = 32;        // rows a sender warp sends before one fence and their flags
constexpr int kDefaultSendChunk = 4;     // dispatch: flags every 4 tokens, receivers start sooner (4 H200:
                                         // kernel 553 vs 644 us at 20 SMs with 8)
constexpr int kDefaultCombineSendChunk = 8;  // combine: 4 was slower (747 vs 695 us, same run)
constexpr int kDefaultFp8SendWarps = 10;  // the quantising send is arithmetic-bound: more warps send
constexpr int kDefaultCopyUnroll = 16;   // 16-byte vectors per lane in flight in a receiver's copy (8 or 16)
constexpr int64_t kReadyOffset = 0;      // u64 ready[kMaxRanks]
constexpr int64_t kDoneOffset = 512;     // u64 done[kMaxRanks] (unused; reserved in the shared layout)
constexpr int64_t kErrorOffset = 1024;   // int32 sticky error word (local only)
constexpr int64_t kOpCountOffset = 1088; // u64 sequence number of the last finished operation (local only)
constexpr int64_t kFinishedOffset = 1152;  // u32 blocks of the running operation that finished (local only)
constexpr int64_t kWorkOffset = 1216;    // u32 sender chunks claimed so far in the running operation (local only)
constexpr int64_t kRecvWorkOffset = 1220;  // u32 receive (dispatch) / reduce (combine) chunks claimed (local only)
constexpr int64_t kCountsFlagOffset = 1536;  // u64 counts_flag[kMaxRanks]: rank r's counts row is here
constexpr int64_t kCanaryOffset = 2048;  // u64 written by the owner at setup, read by peers
constexpr int64_t kCountsOffset = 4096;  // int32 counts[kMaxRanks][kMaxRanks]: [source][destination]
constexpr int64_t kSignalBytes = 8192;   // regions start here (keeps them 4 KiB aligned)
// The signal words must not overlap (the Triton kernels share this layout).
static_assert(kReadyOffset + 8 * kMaxRanks <= kDoneOffset && kDoneOffset + 8 * kMaxRanks <= kErrorOffset, "signals");
static_assert(kErrorOffset + 4 <= kOpCountOffset && kOpCountOffset + 8 <= kFinishedOffset, "signals");
static_assert(kFinishedOffset + 4 <= kWorkOffset && kWorkOffset + 4 <= kRecvWorkOffset, "signals");
static_assert(kRecvWorkOffset + 4 <= kCountsFlagOffset && kCountsFlagOffset + 8 * kMaxRanks <= kCanaryOffset, "signals");
static_assert(kCanaryOffset + 8 <= kCountsOffset && kCountsOffset + 4 * kMaxRanks * kMaxRanks <= kSignalBytes, "signals");

// Operation kinds (the low two bits of a ready value).
enum OpKind : int { kDispatch = 1, kCombine = 2, kNotify = 3 };

// Status words written to host-mapped memory on failure (int32 each).
enum StatusWord : int { kStatusCode = 0, kStatusPeer = 1, kStatusSeq = 2, kStatusKind = 3, kStatusWords = 4 };

// Codes in kStatusCode (0 = ok). kReadyTimeout: a peer never started this operation;
// kDataTimeout: a peer started but did not finish sending; kOpMismatch: a peer runs a
// different operation kind under the same sequence number; kBudgetExceeded: a dispatch received
// more rows than its outputs hold (the caller's worst-case budget; the peer field then holds
// the rows that arrived).
enum ErrorCode : int { kNoError = 0, kReadyTimeout = 1, kDataTimeout = 2, kOpMismatch = 3, kBudgetExceeded = 4 };

// Phase stamps: kStampWords u64 per warp, at stamps[(block * kWarps + warp) * kStampWords + word].
enum StampWord : int {
  kStampStart = 0,      // kernel entry
  kStampReady = 1,      // ready handshake passed
  kStampFirstRow = 2,   // first row sent (senders) or first flag seen up (receivers); 0 if none
  kStampRoleDone = 3,   // the warp's last row sent and flagged, or received
  kStampWaitNs = 4,     // receivers: ns spent waiting for flags; senders: ns spent in fences
  kStampRows = 5,       // rows the warp moved
  kStampRole = 6,       // 0 sender, 1 receiver
  kStampEnd = 7,        // block end (after the block-wide barrier), every warp
  kStampHelpRows = 8,   // senders: rows received (dispatch) or tokens reduced (combine) after sending
  kStampHelpDone = 9,   // senders: when that help ended (0 for receivers)
  kStampWords = 10
};

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// constexpr: device code calls it too (nvcc runs with --expt-relaxed-constexpr).
constexpr int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Fields every operation (notify, dispatch, combine) shares.
struct CommonParams {
  int rank = 0;
  int num_ranks = 1;
  int num_blocks = 1;             // grid size: the SM budget; must be equal on every rank
  int64_t max_tokens = 0;         // rows per source rank in a region (EPBuffer.max_tokens_per_rank)
  uint64_t timeout_ns = 0;        // bound of every spin-wait
  const int64_t* peer_bases = nullptr;  // device [num_ranks]: each rank's buffer base, mapped here
  const int* count_matrix = nullptr;    // device [num_ranks, num_ranks]: tokens rank s sends to rank d
                                        // (unused by notify, which produces it)
  int* status_host = nullptr;     // host-mapped int32[kStatusWords], device-side pointer
  uint64_t* stamps = nullptr;     // device [num_blocks * kWarps * kStampWords] phase stamps, or nullptr: off
  int copy_unroll = kDefaultCopyUnroll;  // 8 or 16 vectors per lane in flight in a dispatch receiver's
                                         // bf16/fp16/fp32 row copy (every other copy keeps 8: registers)
};

// A dispatch moves each token row either as it is (recv_scales == nullptr), or quantised on
// the way: e4m3 values plus one fp32 scale per kFp8Block channels (scale = amax / 448, 1 for an
// all-zero block; value = x * (1 / scale), each step rounded to nearest, saturating). One IEEE
// division per block, not per element: the send is arithmetic-bound otherwise, and every
// backend (numpy, torch, Triton) rounds the same way. The region row then holds the hidden
// fp8 bytes followed by the hidden / kFp8Block scales.
constexpr int kFp8Block = 128;
constexpr float kFp8Max = 448.0f;   // largest finite e4m3 value: scale = amax / kFp8Max

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
  int64_t flag_region_offset = 0;      // u64 arrival flag per dispatch row
  int send_warps = kDefaultSendWarps;  // warps per block that send; the others receive
  int send_chunk = kDefaultSendChunk;  // tokens a sender warp sends before fencing and raising their flags
  int64_t num_out_rows = 0;            // rows the outputs hold (exact count, or the caller's budget)
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
  int64_t flag_region_offset = 0;      // u64 arrival flag per combine row
  int send_warps = kDefaultSendWarps;  // warps per block that send rows back; the others reduce
  int send_chunk = kDefaultSendChunk;  // rows a sender warp sends before fencing and raising their flags
  void* out = nullptr;                 // [num_tokens, hidden] in dtype
};

inline bool common_params_ok(const CommonParams& c) {
  return c.num_ranks >= 1 && c.num_ranks <= kMaxRanks && c.rank >= 0 && c.rank < c.num_ranks && c.num_blocks >= 1 &&
         c.max_tokens >= 0 && c.timeout_ns > 0 && c.peer_bases != nullptr && c.status_host != nullptr &&
         (c.copy_unroll == 8 || c.copy_unroll == 16);
}

inline bool send_warps_ok(int send_warps, int send_chunk) {
  return send_warps >= 1 && send_warps < kWarps && send_chunk >= 1 && send_chunk <= kMaxSendChunk;
}

// Both return kOk, kBadArgument (sizes/pointers the kernels do not support) or kLaunchFailed.
int launch_dispatch(const DispatchParams& p, cudaStream_t stream);
int launch_combine(const CombineParams& p, cudaStream_t stream);

// Counts exchange before a dispatch (one block): every rank publishes send_counts [num_ranks]
// (tokens it sends to each rank) into every peer's counts matrix, then raises counts_flag[me]
// there; out [num_ranks, num_ranks] receives the full matrix, row = source. c.num_blocks == 1.
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
