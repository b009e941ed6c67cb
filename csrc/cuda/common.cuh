// What the kernels need from CUDA, spelled so that the same .cuh source compiles with nvcc
// (the real thing) and with g++ -DPALORA_EMU (csrc/emu/emu.h, the host emulator of tests).
// No torch header here or in any .cuh: kernels.cu compiles in seconds.
#pragma once
#include <cstdint>
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

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace palora
