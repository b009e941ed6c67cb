// What the kernels need from CUDA, spelled so that the same .cuh source compiles with nvcc
// (the real thing) and with g++ -DPALORA_EMU (csrc/emu/emu.h, the host emulator of tests).
// No torch header here or in any .cuh: the kernels_*.cu compile in seconds.
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/palora_cuda.h"

#ifdef PALORA_EMU
#include "emu/emu.h"
// kernel(args...) run by the emulator's launcher: blocks in turn, threads as fibers
#define PALORA_LAUNCH(grid, block, smem, stream, ...) \
  ::palora_emu::Launch<decltype(&__VA_ARGS__)>{grid, block, smem, &__VA_ARGS__}
// static shared memory of a block: one arena per block, poisoned with NaN bytes
#define PALORA_SHARED(name, bytes) unsigned char* name = ::palora_emu::block_shared(bytes)
#define PALORA_LAST_ERROR() ::palora_emu::take_error()
#define PALORA_WMMA_ARCH 1
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define PALORA_LAUNCH(grid, block, smem, stream, ...) \
  __VA_ARGS__<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>
#define PALORA_SHARED(name, bytes) __shared__ __align__(128) unsigned char name[bytes]
#define PALORA_LAST_ERROR() ::palora::cuda_error(cudaGetLastError())
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define PALORA_WMMA_ARCH 1  // fp16/bf16 WMMA m16n16k16 with fp32 accumulation (bf16 needs sm_80)
#else
#define PALORA_WMMA_ARCH 0
#endif
namespace palora {
inline const char* cuda_error(cudaError_t e) { return e == cudaSuccess ? nullptr : cudaGetErrorString(e); }
}  // namespace palora
#endif

// Tests compile a variant without the tile-loop barriers (-DPALORA_BREAK_BARRIER): the
// emulator must then produce a wrong result, which proves its barrier is not vacuous.
#ifdef PALORA_BREAK_BARRIER
#define PALORA_TILE_BARRIER() ((void)0)
#else
#define PALORA_TILE_BARRIER() __syncthreads()
#endif

namespace palora {

template <class T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  static constexpr bool is16 = false;
};
template <> struct Num<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static constexpr bool is16 = true;
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static constexpr bool is16 = true;
};

// Host-side argument errors: a message naming the argument, kept alive for the caller.
inline const char* arg_error(const std::string& msg) {
  static thread_local std::string buf;
  buf = msg;
  return buf.c_str();
}

// The kernels' index math is 32-bit: sizes below 2^31 (offsets stay 64-bit).
inline const char* check_int32(const char* op, const char* what, int64_t v) {
  if (v < 0x7fffffff) return nullptr;
  return arg_error(std::string(op) + ": " + what + ": expected < 2^31 - 1 (32-bit tile indices), got " + std::to_string(v));
}

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Division by a runtime divisor d >= 1 of a dividend 0 <= n < 2^31, by a multiply-high and a
// shift precomputed on the host (Granlund-Montgomery; the scheme of CUTLASS's FastDivmod): no
// division instruction, 32-bit or 64-bit, in the kernels' loops. The host side checks n < 2^31.
struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(int64_t divisor) : d(static_cast<uint32_t>(divisor)) {
    if (d != 1) {
      uint32_t l = 0;
      while ((uint64_t(1) << l) < d) ++l;  // ceil(log2(d))
      const uint32_t p = 31 + l;
      mul = static_cast<uint32_t>(((uint64_t(1) << p) + d - 1) / d);
      shift = p - 32;
    }
  }
  __host__ __device__ __forceinline__ int div(int n) const {
    if (d == 1) return n;
#if defined(__CUDA_ARCH__)
    return static_cast<int>(__umulhi(static_cast<uint32_t>(n), mul) >> shift);
#else
    return static_cast<int>(static_cast<uint32_t>((uint64_t(static_cast<uint32_t>(n)) * mul) >> 32) >> shift);
#endif
  }
  // q = n / d and r = n % d
  __host__ __device__ __forceinline__ void divmod(int n, int& q, int& r) const {
    q = div(n);
    r = n - q * static_cast<int>(d);
  }
};

// ---- asynchronous global -> shared copies (cp.async, sm_80+) ------------------------------
// cp_async16(dst, src, n): copy n <= 16 bytes from global src to shared dst and zero-fill the
// rest of the 16 (n == 0: only zeros, src is not read). dst and src 16-byte aligned. The copy
// lands only at a cp_async_wait<N>() that retires its group (cp_async_commit() closes a group);
// the emulator poisons dst until then, so a missing wait reads NaN. -DPALORA_BREAK_CPASYNC_WAIT
// builds a variant whose waits do nothing: the tests check that it gives wrong results.
#ifdef PALORA_EMU
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int n) { ::palora_emu::cp_async(dst, src, 16, n); }
__device__ __forceinline__ void cp_async_commit() { ::palora_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef PALORA_BREAK_CPASYNC_WAIT
  ::palora_emu::cp_async_wait(N);
#endif
}
#else
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
#else  // synchronous fallback for older archs
  const unsigned char* sp = static_cast<const unsigned char*>(src);
  unsigned char* dp = static_cast<unsigned char*>(dst);
  for (int i = 0; i < 16; ++i) dp[i] = i < n ? sp[i] : 0;
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(PALORA_BREAK_CPASYNC_WAIT)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
#endif

}  // namespace palora
