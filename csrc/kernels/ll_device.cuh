// Device pieces the low-latency kernels share: the bounded waits and last-block epilogues of
// the protocol in ll.cuh, region addressing and 8-channel vector helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "intranode_device.cuh"
#include "ll.cuh"

namespace overlap {
namespace ll {
namespace dev {

namespace idev = ::overlap::intranode::dev;

constexpr int kSendThreads = 128;   // 4 warps: many small blocks spread the pack over SMs
constexpr int kUnpackThreads = 512;

__device__ __forceinline__ uint64_t* word(int64_t base, int64_t offset) {
  return reinterpret_cast<uint64_t*>(base + offset);
}

// The region this rank received from `src` for the current slot.
__device__ __forceinline__ const char* recv_region(const Common& c, int src) {
  return reinterpret_cast<const char*>(c.my_base + c.slot_offset + src * c.region_stride);
}

// Diagnostics: thread 0 stamps the global timer for this block and phase (see ll.cuh).
__device__ __forceinline__ void stamp(const Common& c, int hook, int phase) {
  if (c.stamps != nullptr && threadIdx.x == 0 && blockIdx.x < kMaxStampBlocks) {
    c.stamps[(static_cast<int64_t>(hook) * kMaxStampBlocks + blockIdx.x) * kStampWords + phase] = idev::global_timer_ns();
  }
}

__device__ __forceinline__ void fail(const Common& c, int code, int peer, int status_kind, uint64_t seq) {
  intranode::CommonParams ip;
  ip.status_host = c.status_host;
  idev::record_failure(ip, c.my_base, seq, code, peer, status_kind);
}

// Spins until ready() (which reads with acquire loads) holds; false once timeout_ns passed. A
// first check that succeeds costs one load and no timer read.
template <typename ReadyFn>
__device__ __forceinline__ bool spin_until(ReadyFn ready, uint64_t timeout_ns) {
  if (ready()) return true;
  const uint64_t deadline = idev::global_timer_ns() + timeout_ns;
  while (!ready()) {
    if (idev::global_timer_ns() > deadline) return false;
  }
  return true;
}

// What both prologues start with: the block's start stamp, the shared failure flag cleared, and
// (threads < num_ranks) the loads of the sticky error word (thread 0; 0 elsewhere) and of this
// slot's send count, issued back to back so they share one round trip.
__device__ __forceinline__ void prologue_start(const Common& c, int which, int* s_flag) {
  stamp(c, which, kStampStart);
  if (threadIdx.x == 0) *s_flag = 0;
  __syncthreads();
}
__device__ __forceinline__ int sticky_error(const Common& c) {
  return threadIdx.x == 0 ? idev::ld_volatile(reinterpret_cast<const int*>(c.my_base + intranode::kErrorOffset)) : 0;
}
__device__ __forceinline__ uint64_t send_count(const Common& c) {
  return idev::ld_relaxed_sys(word(c.my_base, send_seq_offset(c.kind, c.slot)));
}

// Pack prologue, one memory round trip when nothing has to wait: thread 0 reads the sticky error
// word; threads d < num_ranks read this slot's send count and d's ack count, and wait until all
// of d's hook blocks acked the previous use (d consumed it). Loads the caller issued before this
// call (inputs, which do not depend on the slot being free) overlap it. s_n = this use's count.
__device__ inline bool pack_begin(const Common& c, int status_kind, uint64_t* s_n, int* s_flag) {
  const int tid = threadIdx.x;
  prologue_start(c, 0, s_flag);
  if (tid < c.num_ranks) {
    const int err = sticky_error(c);
    const uint64_t seq = send_count(c);
    const uint64_t* ack = word(c.my_base, ack_offset(c.kind, c.slot, tid));
    const uint64_t first = idev::ld_acquire_sys(ack);   // in flight beside the two loads above
    const uint64_t want = seq * static_cast<uint64_t>(hook_blocks(c));
    if (tid == 0) *s_n = seq + 1;
    if (err != 0) {
      atomicExch(s_flag, 1);   // an earlier failure left the peers out of step: do nothing
    } else if (first < want && !spin_until([&] { return idev::ld_acquire_sys(ack) >= want; }, c.timeout_ns)) {
      fail(c, intranode::kReadyTimeout, tid, status_kind, seq + 1);
      atomicExch(s_flag, 1);
    }
  }
  __syncthreads();
  stamp(c, 0, kStampPrologue);
  return *s_flag == 0;
}

// Thread 0 counts this block in the pack kernel's arrival counter and returns the count before
// it (other threads: 0). The caller reads the result only at the end of the block, so the
// atomic's round trip overlaps the block's work; the block that gets gridDim.x - 1 arrived last
// and resets the counter for the next use.
__device__ __forceinline__ unsigned arrive(const Common& c) {
  if (threadIdx.x != 0) return 0u;
  return atomicAdd(reinterpret_cast<unsigned*>(c.my_base + done_offset(c.kind, c.slot)), 1u);
}
__device__ __forceinline__ bool arrived_last(unsigned arrival) {
  return threadIdx.x == 0 && arrival == gridDim.x - 1;
}
__device__ __forceinline__ void reset_arrivals(const Common& c) {
  *reinterpret_cast<volatile unsigned*>(c.my_base + done_offset(c.kind, c.slot)) = 0u;
}

// True in thread 0 of the last block to get here (kDirect packs only); that block also resets
// the counter for the next use. SM stores to peers need the fence before the flags: a flag
// raised after them must not overtake them.
__device__ inline bool last_block(const Common& c, int* s_flag) {
  __syncthreads();
  stamp(c, 0, kStampEpilogue);
  if (threadIdx.x == 0) {
    __threadfence_system();
    *s_flag = arrived_last(arrive(c));
    if (*s_flag) reset_arrivals(c);
  }
  __syncthreads();
  const bool last = threadIdx.x == 0 && *s_flag;
  if (!*s_flag) stamp(c, 0, kStampEnd);
  return last;
}

// After pack_begin: staged packs count this block as having read send_seq (see arrive()).
__device__ __forceinline__ unsigned pack_arrive(const Common& c) { return c.mode == kDirect ? 0u : arrive(c); }

// Pack epilogue. Staged modes: the block that arrived last (`arrival`, from pack_arrive() after
// the prologue: every block has read send_seq by then) publishes n as this rank's send count. No
// fence and no flag: the copies and the hook run after the kernel, whose boundary orders its
// writes (the rows to staging and home, send_seq) before them. kDirect: the block that finishes
// last fences and raises the peers' flags (the stores went straight to them).
__device__ inline void pack_end(const Common& c, uint64_t n, unsigned arrival, int* s_flag) {
  if (c.mode != kDirect) {
    stamp(c, 0, kStampEpilogue);
    if (arrived_last(arrival)) {
      reset_arrivals(c);
      idev::st_relaxed_sys(word(c.my_base, send_seq_offset(c.kind, c.slot)), n);
    }
    stamp(c, 0, kStampEnd);
    return;
  }
  if (!last_block(c, s_flag)) return;
  idev::st_relaxed_sys(word(c.my_base, send_seq_offset(c.kind, c.slot)), n);
  for (int d = 0; d < c.num_ranks; ++d) {
    if (d != c.rank) idev::st_relaxed_sys(word(c.peer_bases[d], flag_offset(c.kind, c.slot, c.rank)), n);
  }
  stamp(c, 0, kStampEnd);
}

// Hook prologue: E = this operation's use count; with wait_flags, threads r < num_ranks, r not
// this rank, wait until source r's rows arrived (this rank's own rows were written by its pack,
// which the kernel boundary orders before the hook). Thread 0 also reads the sticky error word
// in the same round. Returns false (nothing to do) after a failure.
__device__ inline bool hook_begin(const Common& c, bool wait_flags, int status_kind, uint64_t* s_e, int* s_flag) {
  const int tid = threadIdx.x;
  prologue_start(c, 1, s_flag);
  if (tid < c.num_ranks) {
    const int err = sticky_error(c);
    const uint64_t e = send_count(c);
    if (tid == 0) *s_e = e;
    const uint64_t* f = word(c.my_base, flag_offset(c.kind, c.slot, tid));
    if (err != 0) {
      atomicExch(s_flag, 1);
    } else if (wait_flags && tid != c.rank && !spin_until([&] { return idev::ld_acquire_sys(f) >= e; }, c.timeout_ns)) {
      fail(c, intranode::kDataTimeout, tid, status_kind, e);
      atomicExch(s_flag, 1);
    }
  }
  __syncthreads();
  stamp(c, 1, kStampPrologue);
  return *s_flag == 0;
}

// Hook epilogue, every block: once all its threads are done reading the slot, thread 0 adds one
// ack at every source, relaxed: the block's reads of the slot returned before the barrier (their
// values were stored), so no later write by a source can change them.
__device__ inline void hook_end(const Common& c) {
  __syncthreads();
  stamp(c, 1, kStampEpilogue);
  if (threadIdx.x == 0) {
    for (int r = 0; r < c.num_ranks; ++r) idev::red_add_relaxed_sys(word(c.peer_bases[r], ack_offset(c.kind, c.slot, c.rank)), 1);
  }
  stamp(c, 1, kStampEnd);
}

// The region of rows this rank sends to `dest` for the current slot, as the pack writes it.
__device__ __forceinline__ char* send_region(const Common& c, int dest) {
  const bool home = c.mode == kDirect || (c.mode == kStaged && dest == c.rank);
  if (home) return reinterpret_cast<char*>(c.peer_bases[dest] + c.slot_offset + c.rank * c.region_stride);
  return reinterpret_cast<char*>(c.staging + dest * c.region_stride);
}

// 8 bf16 <-> fp32
__device__ __forceinline__ void unpack8(const int4& v, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}
__device__ __forceinline__ int4 pack8(const float* f) {
  int4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

}  // namespace dev
}  // namespace ll
}  // namespace overlap
