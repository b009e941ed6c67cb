// Host emulation of the CUDA execution model, for tests only (never in the wheel's fast path).
//
// The kernels in csrc/cuda/*.cuh compile unchanged with g++ -DPALORA_EMU against this header:
//   * a launch runs the grid's blocks one after another;
//   * the threads of a block are cooperative fibers (ucontext), each with its own stack, so
//     __syncthreads() is a real barrier: a fiber parks there until every thread of the block
//     has arrived; a thread that exits while others wait, or threads waiting at different
//     __syncthreads() calls, are reported as errors (hardware would hang or misbehave);
//   * shared memory (PALORA_SHARED) is one arena per block, shared by its threads and filled
//     with 0xFF bytes (NaN in fp32/fp16/bf16) before each block, so a read of a tile element
//     nobody wrote yet poisons the result instead of silently reusing the last block's data;
//   * threadIdx/blockIdx/blockDim/gridDim are per fiber (set on every switch);
//   * the order in which fibers run between barriers is a parameter (forward, reverse,
//     seeded shuffle): a race-free kernel gives bit-identical results under every order;
//   * cp.async (cp_async in common.cuh) is a per-thread queue: the destination is poisoned with
//     0xFF bytes (NaN) when the copy is issued and the bytes land only at the cp.async.wait_group
//     that retires the copy's group, so reading a tile before its wait gives NaN; 16-byte
//     alignment of both addresses is checked;
//   * nvcuda::wmma is emulated with per-thread full-tile fragments (fragments are opaque in
//     CUDA, so this is a faithful model); load/store check the documented ldm and 256-bit
//     pointer alignment rules.
// What it cannot show: timing, the real memory model (fences, caches, coalescing), bank
// conflicts, register pressure, intra-warp lockstep/divergence effects.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// ---- CUDA keywords ---------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

// per fiber: the scheduler writes them before every switch into a fiber
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- fp16 / bf16 storage types (bit-compatible with CUDA's and torch's) ---------------
struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  _Float16 f = static_cast<_Float16>(v);  // round to nearest even (libgcc __truncsfhf2)
  __half h;
  std::memcpy(&h, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = static_cast<uint32_t>(b.__x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.__x = 0x7fc0;  // quiet NaN
    return b;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  b.__x = static_cast<uint16_t>(u >> 16);
  return b;
}

namespace palora_emu {

enum FiberState { kRunnable, kAtBarrier, kDone, kFailed };
enum Schedule { kForward = 0, kReverse = 1, kShuffle = 2 };

constexpr size_t kStackBytes = 256 * 1024;  // WMMA fragments live on it: 4 accumulators = 4 KiB
constexpr size_t kPage = 4096;
constexpr size_t kSharedBytes = 228 * 1024;  // shared memory of an sm_80/sm_90 SM

struct Fiber {
  ucontext_t ctx;
  unsigned char* stack = nullptr;  // kPage guard (PROT_NONE) + kStackBytes
  FiberState state = kDone;
  int barrier_line = 0;
  uint3 tid{0, 0, 0};
  size_t shared_calls = 0;  // index of this fiber's next PALORA_SHARED declaration
  struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    int bytes, src_bytes;
    int64_t group;
  };
  std::vector<Copy> copies;  // issued cp.async copies not yet retired by a wait
  int64_t groups = 0;        // cp.async groups committed so far
};

struct Stats {
  int64_t launches = 0, blocks = 0, barriers = 0, switches = 0, async_copies = 0;
};

struct Runtime {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::string error;
  int schedule = kForward;
  uint64_t seed = 0;
  Stats stats;
  std::vector<unsigned char> arena;             // the block's shared memory (+256 for alignment)
  std::vector<std::pair<size_t, size_t>> allocs;  // (offset, bytes) per PALORA_SHARED, in order

  ~Runtime() {
    for (auto& f : fibers)
      if (f.stack) munmap(f.stack, kPage + kStackBytes);
  }
};

inline thread_local Runtime rt;

inline Fiber& self() { return rt.fibers[rt.current]; }

// Abort the launch from inside a fiber: record the message and never come back.
[[noreturn]] inline void fail(const std::string& msg) {
  if (rt.current < 0) {  // not inside a launch: nothing to unwind
    if (rt.error.empty()) rt.error = msg;
    std::fprintf(stderr, "palora_emu: %s\n", msg.c_str());
    std::abort();
  }
  if (rt.error.empty()) rt.error = msg;
  Fiber& f = self();
  f.state = kFailed;
  swapcontext(&f.ctx, &rt.sched);
  std::abort();  // unreachable: a failed fiber is never resumed
}

inline void syncthreads(int line) {
  Fiber& f = self();
  f.state = kAtBarrier;
  f.barrier_line = line;
  ++rt.stats.switches;
  swapcontext(&f.ctx, &rt.sched);
}

// Shared memory: the k-th PALORA_SHARED of every thread of a block returns the same storage.
inline unsigned char* block_shared(size_t bytes) {
  Fiber& f = self();
  size_t k = f.shared_calls++;
  if (k == rt.allocs.size()) {
    size_t off = rt.allocs.empty() ? 0 : rt.allocs.back().first + rt.allocs.back().second;
    off = (off + 255) & ~size_t(255);
    if (off + bytes > kSharedBytes) fail("shared memory: more than the 228 KiB an SM offers");
    rt.allocs.emplace_back(off, bytes);
  } else if (rt.allocs[k].second != bytes) {
    fail("shared memory: threads of one block declared different __shared__ sizes");
  }
  // like __align__(128) on the device: the arena base is 256-byte aligned (vector gives 16)
  uintptr_t base = (reinterpret_cast<uintptr_t>(rt.arena.data()) + 255) & ~uintptr_t(255);
  return reinterpret_cast<unsigned char*>(base) + rt.allocs[k].first;
}

// cp.async: dst poisoned now, filled (src_bytes from src, then zeros) at the retiring wait
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0))
    fail("cp.async: " + std::to_string(bytes) + "-byte copy with a misaligned source or destination");
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async: src-size " + std::to_string(src_bytes) + " out of range");
  const uintptr_t base = (reinterpret_cast<uintptr_t>(rt.arena.data()) + 255) & ~uintptr_t(255);
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst);
  if (d < base || d + bytes > base + kSharedBytes) fail("cp.async: the destination is not shared memory");
  Fiber& f = self();
  ++rt.stats.async_copies;
  std::memset(dst, 0xff, bytes);
  f.copies.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), bytes, src_bytes, f.groups});
}
inline void cp_async_commit() { ++self().groups; }
// cp.async.wait_group n: every group but the newest n committed ones has landed
inline void cp_async_wait(int n) {
  Fiber& f = self();
  std::vector<Fiber::Copy> keep;
  for (const auto& c : f.copies) {
    if (c.group < f.groups - n) {
      if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
    } else {
      keep.push_back(c);
    }
  }
  f.copies.swap(keep);
}

inline void trampoline() {
  (*rt.body)();
  Fiber& f = self();
  f.state = kDone;
  swapcontext(&f.ctx, &rt.sched);
  std::abort();  // unreachable
}

inline void ensure_fibers(size_t n) {
  while (rt.fibers.size() < n) {
    rt.fibers.emplace_back();
    void* mem = mmap(nullptr, kPage + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      rt.fibers.pop_back();
      throw std::runtime_error("palora_emu: mmap of a fiber stack failed");
    }
    mprotect(mem, kPage, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    rt.fibers.back().stack = static_cast<unsigned char*>(mem);
  }
}

inline std::vector<int> order(int n, int64_t round) {
  std::vector<int> o(n);
  for (int i = 0; i < n; ++i) o[i] = rt.schedule == kReverse ? n - 1 - i : i;
  if (rt.schedule == kShuffle) {
    std::mt19937_64 g(rt.seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(round));
    std::shuffle(o.begin(), o.end(), g);
  }
  return o;
}

// Runs one block; returns false (rt.error set) on a detected error.
inline bool run_block(int nthreads) {
  rt.allocs.clear();
  std::fill(rt.arena.begin(), rt.arena.end(), 0xff);  // NaN in fp32, fp16 and bf16
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = rt.fibers[i];
    f.tid = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    f.state = kRunnable;
    f.shared_calls = 0;
    f.copies.clear();
    f.groups = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack + kPage;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }
  for (int64_t round = 0;; ++round) {
    for (int i : order(nthreads, round + static_cast<int64_t>(rt.stats.blocks) * 7919)) {
      Fiber& f = rt.fibers[i];
      if (f.state != kRunnable) continue;
      rt.current = i;
      threadIdx = f.tid;
      ++rt.stats.switches;
      swapcontext(&rt.sched, &f.ctx);
      rt.current = -1;
      if (!rt.error.empty()) return false;
    }
    int waiting = 0, done = 0, line = -1, other = -1;
    for (int i = 0; i < nthreads; ++i) {
      const Fiber& f = rt.fibers[i];
      if (f.state == kDone) ++done;
      if (f.state != kAtBarrier) continue;
      ++waiting;
      if (line < 0) line = f.barrier_line;
      else if (f.barrier_line != line) other = f.barrier_line;
    }
    if (waiting == 0) return true;
    if (done > 0) {
      rt.error = "barrier divergence: " + std::to_string(done) + " thread(s) exited while " +
                 std::to_string(waiting) + " wait at __syncthreads() (line " + std::to_string(line) + ")";
      return false;
    }
    if (other >= 0) {
      rt.error = "barrier divergence: threads wait at different __syncthreads() calls (lines " +
                 std::to_string(line) + " and " + std::to_string(other) + ")";
      return false;
    }
    ++rt.stats.barriers;
    for (int i = 0; i < nthreads; ++i) rt.fibers[i].state = kRunnable;
  }
}

inline void run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024) {
    rt.error = "launch: " + std::to_string(nthreads) + " threads per block (CUDA allows 1..1024)";
    return;
  }
  if (dynamic_smem != 0) {
    rt.error = "launch: dynamic shared memory is not used by these kernels (got " + std::to_string(dynamic_smem) + ")";
    return;
  }
  ensure_fibers(static_cast<size_t>(nthreads));
  rt.arena.assign(kSharedBytes + 256, 0xff);
  rt.body = &body;
  ++rt.stats.launches;
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        if (!run_block(static_cast<int>(nthreads))) return;
        ++rt.stats.blocks;
      }
}

// PALORA_LAUNCH(grid, block, smem, stream, kernel)(args...) under g++
template <class Kernel>
struct Launch {
  dim3 grid, block;
  size_t smem;
  Kernel kernel;
  template <class... Args>
  void operator()(const Args&... args) const {
    std::function<void()> body = [&] { kernel(args...); };
    run_grid(grid, block, smem, body);
  }
};

// The launch error, cleared (the emulator's cudaGetLastError).
inline const char* take_error() {
  static thread_local std::string last;
  if (rt.error.empty()) return nullptr;
  last.swap(rt.error);
  rt.error.clear();
  return last.c_str();
}

}  // namespace palora_emu

#define __syncthreads() ::palora_emu::syncthreads(__LINE__)

// fibers switch only at barriers: a read-modify-write is atomic
inline float atomicAdd(float* p, float v) {
  float old = *p;
  *p = old + v;
  return old;
}

// ---- nvcuda::wmma: per-thread full-tile fragments -------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator models the m16n16k16 shape only");
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

template <class T>
inline void check_mem(const void* p, unsigned ldm, const char* what) {
  // CUDA C++ Programming Guide, WMMA: "mptr must be a 256-bit aligned pointer"; "ldm ... must
  // be a multiple of 8 for __half element type or multiple of 4 for float element type"
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    palora_emu::fail(std::string("wmma::") + what + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    palora_emu::fail(std::string("wmma::") + what + ": ldm = " + std::to_string(ldm) +
                     " elements is not a multiple of 16 bytes");
}

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const T& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
  check_mem<T>(p, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same<L, row_major>::value ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float, void>& f, unsigned ldm,
                              layout_t layout) {
  check_mem<float>(p, ldm, "store_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.x[r * N + c];
}

inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// d = a b + c with fp32 accumulation (d may alias c)
template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float, void>& c) {
  float af[M * K], bf[K * N], out[M * N];
  for (int i = 0; i < M * K; ++i) af[i] = to_float(a.x[i]);
  for (int i = 0; i < K * N; ++i) bf[i] = to_float(b.x[i]);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += af[i * K + k] * bf[k * N + j];
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
