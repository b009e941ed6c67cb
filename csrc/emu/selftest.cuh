// Tiny kernels that check the emulator itself (compiled into the emulator library only).
#pragma once
#include "cuda/common.cuh"

namespace emu_selftest {

// 0: tree reduction of 0..127 in shared memory: 7 barriers, right only if each one holds
__global__ void reduce_kernel(float* out) {
  PALORA_SHARED(raw, 128 * sizeof(float));
  float* s = reinterpret_cast<float*>(raw);
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  __syncthreads();
  for (int w = 64; w > 0; w /= 2) {
    if (t < w) s[t] += s[t + w];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// 1: thread 0 leaves before a barrier the others wait at (undefined on hardware)
__global__ void divergent_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[0] = 1.f;
}

// 2: a WMMA load from a pointer that is not 256-bit aligned
__global__ void misaligned_wmma_kernel(float* out) {
  PALORA_SHARED(raw, 64 * 16 * 2);
  __half* tile = reinterpret_cast<__half*>(raw) + 8;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile, 16);
  out[0] = 1.f;
}

inline const char* run(int which, float* out) {
  switch (which) {
    case 0: PALORA_LAUNCH(dim3(2), dim3(128), 0, nullptr, reduce_kernel)(out); break;
    case 1: PALORA_LAUNCH(dim3(1), dim3(64), 0, nullptr, divergent_kernel)(out); break;
    default: PALORA_LAUNCH(dim3(1), dim3(32), 0, nullptr, misaligned_wmma_kernel)(out); break;
  }
  return PALORA_LAST_ERROR();
}

}  // namespace emu_selftest
