// Device-side pieces shared by the intranode dispatch and combine kernels: memory-model
// primitives, bounded waits, the ready handshake, operation numbering and vectorised row copies.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "intranode.cuh"

namespace overlap {
namespace intranode {
namespace dev {

// ------------------------------------------------------------------------------------------ FP8
// The blockwise e4m3 contract every cast (intranode and low-latency dispatch, Triton, the numpy
// reference) matches bit for bit: scale = amax / kFp8Max (1 for an all-zero block), value =
// x * (1 / scale), each step rounded to nearest, saturating. One reciprocal per block.
__device__ __forceinline__ float fp8_scale(float amax) { return amax > 0.0f ? __fdiv_rn(amax, kFp8Max) : 1.0f; }
__device__ __forceinline__ __nv_fp8x2_storage_t fp8x2(float a, float b, float inv_scale) {
  return __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(a, inv_scale), __fmul_rn(b, inv_scale)), __NV_SATFINITE,
                                  __NV_E4M3);
}

// ------------------------------------------------------------------------------------------ PTX
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t ld_relaxed_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_relaxed_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void red_add_relaxed_sys(uint64_t* p, uint64_t v) {
  asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// With a later relaxed store of the same thread: the release pattern. One fence covers every
// store the warp issued before the preceding __syncwarp, so a chunk of rows pays for one.
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ int ld_volatile(const int* p) {
  return *reinterpret_cast<const volatile int*>(p);
}

// ------------------------------------------------------------------------------------------ vectors
template <int kBytes> struct VecOf;
template <> struct VecOf<16> { using type = int4; };
template <> struct VecOf<8> { using type = int2; };
template <> struct VecOf<4> { using type = int; };
template <> struct VecOf<2> { using type = short; };
template <> struct VecOf<1> { using type = char; };

// Read-only for the whole kernel (the caller's x / y): the non-coherent path is fine.
template <typename V> __device__ __forceinline__ V ld_readonly(const V* p) { return __ldg(p); }
// Written by peers during this kernel: skip L1 so an acquired flag really covers the data.
template <typename V> __device__ __forceinline__ V ld_coherent(const V* p) { return __ldcg(p); }

// ------------------------------------------------------------------------------------------ signals
__device__ __forceinline__ uint64_t* signal_word(int64_t base, int64_t offset, int index) {
  return reinterpret_cast<uint64_t*>(base + offset) + index;
}

// Records the first failure on this GPU: the local sticky word picks one winner, which then
// fills the host-mapped status (plain volatile stores; the host reads it after the kernel).
__device__ __forceinline__ void record_failure(const CommonParams& c, int64_t my_base, uint64_t seq, int code, int peer,
                                               int kind) {
  int* sticky = reinterpret_cast<int*>(my_base + kErrorOffset);
  if (atomicCAS(sticky, 0, code) == 0) {
    volatile int* s = c.status_host;
    s[kStatusPeer] = peer;
    s[kStatusSeq] = static_cast<int>(seq);
    s[kStatusKind] = kind;
    __threadfence_system();
    s[kStatusCode] = code;  // last: the host treats a nonzero code as "the rest is valid"
    __threadfence_system();
  }
}

// Called by every thread at kernel start: this operation's sequence number (one more than the
// last finished operation's; every block reads it before the last block can finish and bump it).
__device__ __forceinline__ uint64_t begin_operation(int64_t my_base, uint64_t* s_seq) {
  if (threadIdx.x == 0) *s_seq = *reinterpret_cast<const volatile uint64_t*>(my_base + kOpCountOffset) + 1;
  __syncthreads();
  return *s_seq;
}

// Called by every thread of every block that did not fail: the last block to get here records
// seq as finished and resets the work counter (every block is past its last claim). The next
// kernel on the stream starts after this one, so it reads seq. True in thread 0 of that block.
__device__ __forceinline__ bool end_operation(int64_t my_base, uint64_t seq) {
  __syncthreads();
  bool last = false;
  if (threadIdx.x == 0) {
    unsigned* finished = reinterpret_cast<unsigned*>(my_base + kFinishedOffset);
    __threadfence();
    if (atomicAdd(finished, 1u) == gridDim.x - 1) {
      *reinterpret_cast<volatile unsigned*>(finished) = 0;
      *reinterpret_cast<volatile unsigned*>(my_base + kWorkOffset) = 0;
      *reinterpret_cast<volatile unsigned*>(my_base + kRecvWorkOffset) = 0;
      *reinterpret_cast<volatile uint64_t*>(my_base + kOpCountOffset) = seq;
      __threadfence();
      last = true;
    }
  }
  return last;
}

// The next chunk of work for this warp (chunk index; the caller multiplies by the chunk size),
// claimed from one of the operation's local counters (kWorkOffset: sending, kRecvWorkOffset:
// receiving or reducing). Warp-collective, lane 0 claims.
__device__ __forceinline__ int64_t claim_chunk(int64_t my_base, int lane, int64_t counter = kWorkOffset) {
  unsigned chunk = 0;
  if (lane == 0) chunk = atomicAdd(reinterpret_cast<unsigned*>(my_base + counter), 1u);
  return static_cast<int64_t>(__shfl_sync(0xffffffffu, chunk, 0));
}

// Called by every thread at kernel start; true when an earlier operation failed on this GPU
// (then the kernel must do nothing: peers are not in step any more).
__device__ __forceinline__ bool block_sees_sticky_error(int64_t my_base, int* s_flag) {
  if (threadIdx.x == 0) *s_flag = ld_volatile(reinterpret_cast<const int*>(my_base + kErrorOffset));
  __syncthreads();
  return *s_flag != 0;
}

// Spins until *flag >= want, then acquires it; false once `timeout_ns` passed. Every lane of a
// warp may call it on the same flag: each then has its own acquire covering its later loads.
// The spin reads relaxed (an acquire load per spin would also invalidate L1 every time).
__device__ __forceinline__ bool wait_at_least(const uint64_t* flag, uint64_t want, uint64_t timeout_ns) {
  if (ld_relaxed_sys(flag) < want) {
    const uint64_t deadline = global_timer_ns() + timeout_ns;
    while (ld_relaxed_sys(flag) < want) {
      if (global_timer_ns() > deadline) return false;
    }
  }
  return ld_acquire_sys(flag) >= want;
}

// Phase 1. Block 0 tells every peer "this rank has started operation seq (so it is done with
// its regions for every earlier one)"; then each block waits until all peers said the same or
// more (a peer whose part of this operation needed nothing from this block may have moved on).
// Returns false (after recording the failure) on timeout or operation mismatch. Timeouts count
// from the start of each wait, so long transfers before it never eat into the bound.
__device__ inline bool ready_handshake(const CommonParams& c, const int64_t* s_peer, uint64_t seq, int kind,
                                       int* s_fail) {
  const uint64_t want = seq * 4 + static_cast<uint64_t>(kind);
  const int tid = threadIdx.x;
  if (blockIdx.x == 0 && tid < c.num_ranks) st_release_sys(signal_word(s_peer[tid], kReadyOffset, c.rank), want);
  if (tid == 0) *s_fail = 0;
  __syncthreads();
  if (tid < c.num_ranks) {
    const uint64_t* flag = signal_word(s_peer[c.rank], kReadyOffset, tid);
    const bool arrived = wait_at_least(flag, seq * 4, c.timeout_ns);
    const uint64_t v = ld_acquire_sys(flag);
    if (!arrived || (v >> 2) == seq && v != want) {
      record_failure(c, s_peer[c.rank], seq, arrived ? kOpMismatch : kReadyTimeout, tid, kind);
      atomicExch(s_fail, 1);
    }
  }
  __syncthreads();
  return *s_fail == 0;
}

// ------------------------------------------------------------------------------------------ rows
// One warp copies a row of n_vec vectors from src to every destination in dst_lanes: lane r
// holds the address for destination r in lane_addr (the row is read once, whatever the
// fan-out). kUnroll loads per lane are issued before the stores: a warp stalls for one memory
// latency per kUnroll * 32 vectors, so that is what sets its bytes in flight (8: 4 KiB, 16: 8 KiB).
// Loop bounds are warp-uniform because of the shuffles.
template <typename V, bool kSrcReadOnly, int kUnroll>
__device__ __forceinline__ void warp_copy_row(const V* src, int64_t lane_addr, unsigned dst_lanes, int64_t n_vec,
                                              int lane) {
  for (int64_t base = 0; base < n_vec; base += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < n_vec) v[u] = kSrcReadOnly ? ld_readonly(src + i) : ld_coherent(src + i);
    }
    for (unsigned m = dst_lanes; m != 0; m &= m - 1) {
      V* dst = reinterpret_cast<V*>(__shfl_sync(0xffffffffu, lane_addr, __ffs(m) - 1));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i < n_vec) dst[i] = v[u];
      }
    }
  }
}

// A receiver's copy of a row out of its own region (written by peers during the kernel, hence
// the coherent loads) to one destination.
template <typename V, int kUnroll>
__device__ __forceinline__ void warp_copy_received_row(const V* src, V* dst, int64_t n_vec, int lane) {
  for (int64_t base = 0; base < n_vec; base += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < n_vec) v[u] = ld_coherent(src + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < n_vec) dst[i] = v[u];
    }
  }
}

// ------------------------------------------------------------------------------------------ stamps
// This warp's phase stamps (intranode.cuh, StampWord); every member is a no-op when they are off.
struct WarpStamps {
  uint64_t* words;  // this warp's kStampWords, or nullptr
  uint64_t waited_ns = 0, rows = 0, first_row = 0;

  __device__ explicit WarpStamps(const CommonParams& c)
      : words(c.stamps == nullptr ? nullptr
                                  : c.stamps + (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) *
                                                   kStampWords) {}
  __device__ __forceinline__ uint64_t now() const { return words != nullptr ? global_timer_ns() : 0; }
  __device__ __forceinline__ void put(int word, uint64_t v) const {
    if (words != nullptr && (threadIdx.x & 31) == 0) words[word] = v;
  }
  __device__ __forceinline__ void mark(int word) const { put(word, now()); }
  // Time since `since` (a now()) spent waiting: for flags (receivers) or in a fence (senders).
  __device__ __forceinline__ void waited_since(uint64_t since) {
    if (words != nullptr) waited_ns += global_timer_ns() - since;
  }
  __device__ __forceinline__ void moved(uint64_t n) {
    if (words != nullptr) {
      rows += n;
      if (first_row == 0) first_row = global_timer_ns();
    }
  }
  __device__ __forceinline__ void role_done(int role) {
    put(kStampFirstRow, first_row);
    put(kStampWaitNs, waited_ns);
    put(kStampRows, rows);
    put(kStampRole, static_cast<uint64_t>(role));
    put(kStampHelpRows, 0);
    put(kStampHelpDone, 0);
    mark(kStampRoleDone);
    rows = 0;  // from here on: rows this warp handles for the other role
  }
  // A sender that joined the receivers is done there too.
  __device__ __forceinline__ void help_done() const {
    put(kStampHelpRows, rows);
    mark(kStampHelpDone);
  }
  // After the receive loop: a receiver's role ends; a sender's help (its role ended at its last send).
  __device__ __forceinline__ void receive_done(bool sender) {
    if (sender) {
      help_done();
    } else {
      role_done(1);
    }
  }
};

// Loads the peer bases and the per-source receive row ranges (exclusive prefix over the count
// matrix column of this rank) into shared memory, and the most rows any one peer sends here.
// Call from every thread, then __syncthreads.
__device__ __forceinline__ void load_peers_and_recv_starts(const CommonParams& c, int64_t* s_peer, int64_t* s_recv_start,
                                                           int64_t* s_most_from_a_peer) {
  const int tid = threadIdx.x;
  if (tid < c.num_ranks) s_peer[tid] = c.peer_bases[tid];
  if (tid == 0) {
    int64_t acc = 0, most = 0;
    for (int s = 0; s < c.num_ranks; ++s) {
      const int64_t n = c.count_matrix[s * c.num_ranks + c.rank];
      s_recv_start[s] = acc;
      acc += n;
      if (s != c.rank && n > most) most = n;
    }
    s_recv_start[c.num_ranks] = acc;
    *s_most_from_a_peer = most;
  }
}

// Rows from peers are visited source-interleaved (item w: source w % W, its row w / W) so that
// receivers follow all senders at once instead of waiting on one source's rows at a time.
// Returns the row index in [0, R) for item w, or -1 if it names no row from a peer.
__device__ __forceinline__ int64_t interleaved_row(int64_t w, int W, int me, const int64_t* s_recv_start) {
  const int s = static_cast<int>(w % W);
  const int64_t q = w / W;
  if (s == me || q >= s_recv_start[s + 1] - s_recv_start[s]) return -1;
  return s_recv_start[s] + q;
}

// The source rank of received row i (the last source whose rows start at or before i; empty
// sources share the next start). Warp-collective.
__device__ __forceinline__ int source_of_row(int64_t i, int W, const int64_t* s_recv_start, int lane) {
  const unsigned at_or_before = __ballot_sync(0xffffffffu, lane < W && s_recv_start[lane] <= i);
  return 31 - __clz(at_or_before);
}

// ------------------------------------------------------------------------------------------ element types
template <typename T> struct Elem;
template <> struct Elem<float> {
  static __device__ __forceinline__ float to_f32(float v) { return v; }
  static __device__ __forceinline__ float from_f32(float v) { return v; }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f32(float v) { return __float2half_rn(v); }
};

// A vector reinterpreted as its elements.
template <typename T, int kBytes>
union Packed {
  static constexpr int kElems = kBytes / static_cast<int>(sizeof(T));
  typename VecOf<kBytes>::type vec;
  T elem[kElems];
};

}  // namespace dev
}  // namespace intranode
}  // namespace overlap
