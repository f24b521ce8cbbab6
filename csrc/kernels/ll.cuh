// Low-latency (decode) dispatch/combine over symmetric memory: a short pack kernel, then
// transfers that hold no SM (copy engines, issued by the host as peer memcpys), and a receive
// hook kernel that waits for arrival and unpacks. Also an SM-store variant and a staging mode
// for NCCL. Python side: overlap/ep/low_latency.py.
//
// Symmetric buffer layout (bytes from each rank's base). The first kIntranodeHeader bytes keep
// the intranode layout (sticky error word at 1024, canary at 2048), so SymmetricBuffer's mapping
// check and dev::record_failure work unchanged:
//   flags[kind][slot][src]  u64  src's use count of the slot, once its rows landed: written by src's
//                                kernel (kDirect), or copied from src's send_seq by src's copy
//                                engine after the rows (kStaged)
//   acks [kind][slot][dst]  u64  count of dst's hook blocks that consumed this rank's rows in the
//                                slot: hook_blocks(kind) per use, one red.add per block
//   send_seq[kind][slot]    u64  local: how often this rank sent on the slot
//   done[kind][slot]        u32  local: arrival counter of the pack kernel's blocks
//   receive slots: slot (kind, s) holds num_ranks regions of region_stride bytes, one per source.
// A region is [16-byte header: int32 row count][rows]; row i is at 16 + i * row_stride.
// A dispatch row is [topk x int16 local expert or -1, padded to 16][topk x fp32 weight, padded
// to 16][payload] (the hook scans every row's experts, so they come apart from the weights),
// payload = bf16 values, or e4m3 values followed by hidden/128 fp32 scales. A combine row is
// the bf16 partial sum (weights applied on the expert side) of one (token, rank).
//
// Protocol of one operation on slot s of kind k (all ranks issue the same operations in the same
// order, so their use counts of every slot agree, and launch the same hook grid, B blocks):
//   pack:  n = send_seq + 1; wait (bounded) until acks[k][s][d] >= (n - 1) * B for every d (all
//          of d's hook blocks consumed the previous use); write rows (to peers directly, or to
//          local staging). Staged modes: the block that arrives last (done counter, taken right
//          after the wait, so every block has read send_seq) writes send_seq = n; the kernel
//          boundary orders it and the rows before the copies and the hook. kDirect: the block
//          that finishes last fences and raises flags[k][s][me] = n at every peer.
//   send:  kStaged (copy engines): per peer, a memcpy staging -> peer region, then an 8-byte copy
//          of this rank's send_seq[k][s] to the peer's flags[k][s][me], in the same stream (stream
//          order lands it after the rows). It reads n: the pack wrote it before the kernel
//          boundary, and the slot's next pack waits for acks that need this flag. A copy reads
//          its source at every CUDA-graph replay, so the counting flag stays right there too (a
//          memory-write node would replay the value it captured: a constant flag the hook then
//          had to reset, its last block clearing it and fencing before the last ack, ~2 us of
//          hook per operation on 2 H200; removed after f478863).
//   hook:  E = send_seq (the host orders the hook after its pack, and the next pack of the slot
//          waits for this hook's acks, so E is this operation's count); wait until every other
//          source's flags[k][s][src] >= E (own rows are ordered by the kernel boundary); unpack;
//          every block then adds 1 to acks[k][s][me] at every source. No block waits for the
//          others, and nothing is reset.
#pragma once

#include "intranode.cuh"

namespace overlap {
namespace ll {

constexpr int kMaxRanks = 8;        // one NVLink host
constexpr int kMaxSlots = 8;        // per operation kind
constexpr int kMaxTokens = 4096;    // per rank and call (the pack keeps a mask per token in smem)
constexpr int kMaxTopk = 16;
constexpr int kFp8Block = 128;      // channels per fp32 scale; hidden must be a multiple of it
constexpr int kChunk = 1024;        // channels one warp moves per task
constexpr int kRegionHeader = 16;

constexpr int64_t kFlagsOffset = 8192;
constexpr int64_t kAcksOffset = kFlagsOffset + 2 * kMaxSlots * 32 * 8;
constexpr int64_t kSendSeqOffset = kAcksOffset + 2 * kMaxSlots * 32 * 8;
constexpr int64_t kDoneOffset = kSendSeqOffset + 2 * kMaxSlots * 8;
constexpr int64_t kSignalBytes = 20480;  // zeroed prefix; receive slots start here
static_assert(kDoneOffset + 2 * kMaxSlots * 4 <= kSignalBytes, "low-latency signals overflow");

enum Kind : int { kDispatch = 0, kCombine = 1 };
// Status "kind" values (intranode uses 1..3).
enum StatusKind : int { kDispatchSend = 5, kDispatchRecv = 6, kCombineSend = 7, kCombineRecv = 8 };
// mode: where the pack kernel writes rows.
enum Mode : int {
  kDirect = 0,      // SM stores straight into peers' receive regions, flags by the kernel
  kStaged = 1,      // local staging per peer (copy engines send it and raise the flag); own rows go
                    // straight home
  kStagedAll = 2,   // local staging for every rank including this one (NCCL all_to_all sends it)
};

__host__ __device__ constexpr int64_t flag_offset(int kind, int slot, int src) {
  return kFlagsOffset + ((static_cast<int64_t>(kind) * kMaxSlots + slot) * 32 + src) * 8;
}
__host__ __device__ constexpr int64_t ack_offset(int kind, int slot, int dst) {
  return kAcksOffset + ((static_cast<int64_t>(kind) * kMaxSlots + slot) * 32 + dst) * 8;
}
__host__ __device__ constexpr int64_t send_seq_offset(int kind, int slot) {
  return kSendSeqOffset + (static_cast<int64_t>(kind) * kMaxSlots + slot) * 8;
}
__host__ __device__ constexpr int64_t done_offset(int kind, int slot) {
  return kDoneOffset + (static_cast<int64_t>(kind) * kMaxSlots + slot) * 4;
}

struct Common {
  int rank = 0;
  int num_ranks = 1;
  int kind = kDispatch;
  int slot = 0;
  int mode = kStaged;
  int64_t my_base = 0;                  // this rank's buffer
  const int64_t* peer_bases = nullptr;  // device [num_ranks]
  int64_t slot_offset = 0;              // this (kind, slot)'s receive area, same on every rank
  int64_t region_stride = 0;            // bytes per source region (multiple of 16)
  int64_t row_stride = 0;               // bytes per row (multiple of 16)
  int64_t max_tokens = 0;               // rows per region
  int64_t staging = 0;                  // local [num_ranks][region_stride] (staged modes)
  int64_t hidden = 0;                   // multiple of kFp8Block
  int topk = 1;
  int num_local_experts = 1;
  int hook_parts = 1;                   // dispatch hook blocks per local expert (equal on every rank)
  uint64_t timeout_ns = 0;
  int* status_host = nullptr;           // host-mapped status words (intranode layout)
  // Diagnostics (OVERLAP_LL_STAMPS=1): [2][kMaxStampBlocks][kStampWords] globaltimer stamps, one
  // row per block, pack kernels in the first half and hooks in the second; null = off.
  uint64_t* stamps = nullptr;
};

constexpr int kStampWords = 8;
constexpr int kMaxStampBlocks = 4096;
// Stamp phases: block start, prologue done (slot free / data arrived), set-up done (routing or
// header scan), rows written, epilogue (before the last-block count), block end.
enum StampPhase : int { kStampStart = 0, kStampPrologue, kStampSetup, kStampRows, kStampEpilogue, kStampEnd };

struct DispatchSendParams {
  Common c;
  const void* x = nullptr;              // [num_tokens, hidden] bf16
  const int64_t* topk_idx = nullptr;    // [num_tokens, topk]
  const float* topk_weights = nullptr;  // [num_tokens, topk]
  int num_tokens = 0;
  int fp8 = 0;
  int header_bytes = 0;                 // dispatch_header_bytes(topk)
  int* token_slot = nullptr;            // out [num_tokens, num_ranks]: row in each rank's region or -1
};

struct DispatchRecvParams {
  Common c;
  int wait_flags = 1;
  int copy_unroll = 8;                  // 16-byte loads in flight per copy thread: 8 or 16
  int fp8 = 0;
  int header_bytes = 0;
  void* recv_x = nullptr;               // [L, num_ranks * max_tokens, hidden] bf16 or e4m3
  float* recv_scales = nullptr;         // [L, num_ranks * max_tokens, hidden / 128] (fp8)
  int* counts = nullptr;                // [L]
  int* row_pos = nullptr;               // [num_ranks * max_tokens, topk]: row in expert's block or -1
  int* row_expert = nullptr;            // [num_ranks * max_tokens, topk]: local expert or -1
  float* row_weight = nullptr;          // [num_ranks * max_tokens, topk]
  int* src_counts = nullptr;            // [num_ranks]: rows received from each source
};

struct CombineSendParams {
  Common c;
  const void* y = nullptr;              // [L, num_ranks * max_tokens, hidden] bf16
  const int* row_pos = nullptr;
  const int* row_expert = nullptr;
  const float* row_weight = nullptr;
  const int* src_counts = nullptr;
};

struct CombineRecvParams {
  Common c;
  int wait_flags = 1;
  int num_tokens = 0;
  const int* token_slot = nullptr;      // [num_tokens, num_ranks] of the dispatch
  void* out = nullptr;                  // [num_tokens, hidden] bf16
};

// Each returns kOk, kBadArgument or kLaunchFailed (error text: intranode::last_launch_error()).
int launch_dispatch_send(const DispatchSendParams& p, cudaStream_t stream);
int launch_dispatch_recv(const DispatchRecvParams& p, cudaStream_t stream);
int launch_combine_send(const CombineSendParams& p, cudaStream_t stream);
int launch_combine_recv(const CombineRecvParams& p, cudaStream_t stream);

constexpr int kMaxHookParts = 16;
constexpr int kMaxLocalExperts = 32767;   // a row header names its local expert in an int16

// Bytes of a dispatch row's header: the experts part, then the whole header (see the layout above).
__host__ __device__ constexpr int header_expert_bytes(int topk) { return (topk * 2 + 15) / 16 * 16; }
__host__ __device__ constexpr int dispatch_header_bytes(int topk) {
  return header_expert_bytes(topk) + (topk * 4 + 15) / 16 * 16;
}

// Blocks of a grid with one warp per task, 4 warps a block, at most 1024 blocks.
__host__ __device__ constexpr int grid_for_warps(int64_t warps) {
  return static_cast<int>(warps < 4 ? 1 : (warps + 3) / 4 > 1024 ? 1024 : (warps + 3) / 4);
}

// The receive hook's grid for c.kind; every rank launches the same one, since senders count one
// ack per block. Dispatch: hook_parts blocks per local expert. Combine: one warp per (row slot,
// 1024-channel chunk) of max_tokens rows (blocks beyond the batch only ack).
__host__ __device__ constexpr int hook_blocks(const Common& c) {
  return c.kind == kDispatch ? c.num_local_experts * c.hook_parts
                             : grid_for_warps(c.max_tokens * ((c.hidden + kChunk - 1) / kChunk));
}

inline bool common_ok(const Common& c) {
  return c.num_ranks >= 1 && c.num_ranks <= kMaxRanks && c.rank >= 0 && c.rank < c.num_ranks && c.kind >= 0 &&
         c.kind <= 1 && c.slot >= 0 && c.slot < kMaxSlots && c.mode >= 0 && c.mode <= 2 && c.my_base != 0 &&
         c.my_base % 16 == 0 && c.peer_bases != nullptr && c.slot_offset % 16 == 0 && c.region_stride % 16 == 0 &&
         c.row_stride % 16 == 0 && c.max_tokens >= 1 && c.max_tokens <= kMaxTokens && c.hidden >= kFp8Block &&
         c.hidden % kFp8Block == 0 && c.topk >= 1 && c.topk <= kMaxTopk && c.num_local_experts >= 1 &&
         c.hook_parts >= 1 && c.hook_parts <= kMaxHookParts &&
         c.status_host != nullptr && (c.mode == kDirect || (c.staging != 0 && c.staging % 16 == 0)) &&
         c.region_stride >= kRegionHeader + c.max_tokens * c.row_stride;
}

}  // namespace ll
}  // namespace overlap
