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
constexpr int kCopyUnroll = 4;     // 16-byte loads in flight per thread in the unpack copies

__device__ __forceinline__ uint64_t* word(int64_t base, int64_t offset) {
  return reinterpret_cast<uint64_t*>(base + offset);
}

__device__ __forceinline__ void fail(const Common& c, int code, int peer, int status_kind, uint64_t seq) {
  intranode::CommonParams ip;
  ip.status_host = c.status_host;
  idev::record_failure(ip, c.my_base, seq, code, peer, status_kind);
}

// Every thread: true when an earlier failure on this GPU left the peers out of step.
__device__ __forceinline__ bool sticky(const Common& c, int* s_flag) {
  return idev::block_sees_sticky_error(c.my_base, s_flag);
}

// Threads r < num_ranks wait until the word at base(r) + offset(r) reaches `want`. Returns false
// for the whole block (after recording) when any wait timed out.
template <typename AddrFn>
__device__ inline bool wait_words(const Common& c, AddrFn addr, uint64_t want, int code, int status_kind,
                                  int* s_fail) {
  if (threadIdx.x == 0) *s_fail = 0;
  __syncthreads();
  if (threadIdx.x < c.num_ranks) {
    const uint64_t* w = addr(static_cast<int>(threadIdx.x));
    const uint64_t deadline = idev::global_timer_ns() + c.timeout_ns;
    while (idev::ld_acquire_sys(w) < want) {
      if (idev::global_timer_ns() > deadline) {
        fail(c, code, threadIdx.x, status_kind, want);
        atomicExch(s_fail, 1);
        break;
      }
    }
  }
  __syncthreads();
  return *s_fail == 0;
}

// Pack prologue: the use count n of this slot, after every destination acked use n - 1.
__device__ inline bool pack_begin(const Common& c, int status_kind, uint64_t* s_n, int* s_flag) {
  if (sticky(c, s_flag)) return false;
  if (threadIdx.x == 0) *s_n = *reinterpret_cast<volatile uint64_t*>(c.my_base + send_seq_offset(c.kind, c.slot)) + 1;
  __syncthreads();
  const uint64_t n = *s_n;
  return wait_words(
      c, [&](int d) { return word(c.my_base, ack_offset(c.kind, c.slot, d)); }, n - 1, intranode::kReadyTimeout,
      status_kind, s_flag);
}

// True in thread 0 of the last block to get here (all blocks' writes are then visible GPU-
// and system-wide); that block also resets the counter for the next use.
__device__ inline bool last_block(const Common& c, int which, int* s_flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    unsigned* ctr = reinterpret_cast<unsigned*>(c.my_base + done_offset(c.kind, c.slot, which));
    const unsigned prev = atomicAdd(ctr, 1u);
    *s_flag = prev == gridDim.x - 1;
    if (*s_flag) {
      *ctr = 0;
      __threadfence_system();
    }
  }
  __syncthreads();
  return threadIdx.x == 0 && *s_flag;
}

// Pack epilogue (last block): publish n as this rank's send count of the slot; SM-driven sends
// also raise the flags themselves (own rows in kStaged mode are local stores too).
__device__ inline void pack_end(const Common& c, uint64_t n, int* s_flag) {
  if (!last_block(c, 0, s_flag)) return;
  idev::st_release_sys(word(c.my_base, send_seq_offset(c.kind, c.slot)), n);
  for (int d = 0; d < c.num_ranks; ++d) {
    if (c.mode == kDirect || (c.mode == kStaged && d == c.rank)) {
      idev::st_release_sys(word(c.peer_bases[d], flag_offset(c.kind, c.slot, c.rank)), n);
    }
  }
}

// Hook prologue: E = this operation's use count; with wait_flags, wait until all sources sent it.
__device__ inline bool hook_begin(const Common& c, bool wait_flags, int status_kind, uint64_t* s_e, int* s_flag) {
  if (sticky(c, s_flag)) return false;
  if (threadIdx.x == 0) *s_e = *reinterpret_cast<volatile uint64_t*>(c.my_base + send_seq_offset(c.kind, c.slot));
  __syncthreads();
  if (!wait_flags) return true;
  const uint64_t e = *s_e;
  return wait_words(
      c, [&](int r) { return word(c.my_base, flag_offset(c.kind, c.slot, r)); }, e, intranode::kDataTimeout,
      status_kind, s_flag);
}

// Hook epilogue (last block): tell every source its rows in this slot were consumed.
__device__ inline void hook_end(const Common& c, uint64_t e, int* s_flag) {
  if (!last_block(c, 1, s_flag)) return;
  for (int r = 0; r < c.num_ranks; ++r) {
    idev::st_release_sys(word(c.peer_bases[r], ack_offset(c.kind, c.slot, c.rank)), e);
  }
}

// The region of rows this rank sends to `dest` for the current slot, as the pack writes it.
__device__ __forceinline__ char* send_region(const Common& c, int dest) {
  const bool home = c.mode == kDirect || (c.mode == kStaged && dest == c.rank);
  if (home) return reinterpret_cast<char*>(c.peer_bases[dest] + c.slot_offset + c.rank * c.region_stride);
  return reinterpret_cast<char*>(c.staging + dest * c.region_stride);
}

// The region this rank received from `src` for the current slot.
__device__ __forceinline__ const char* recv_region(const Common& c, int src) {
  return reinterpret_cast<const char*>(c.my_base + c.slot_offset + src * c.region_stride);
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
