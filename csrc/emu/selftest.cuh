// Tiny kernels that check the emulator itself (compiled into the emulator library only).
#pragma once
#include <cstdio>

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

// 3: a tile read after cp.async but before its wait: out[0] NaN (poisoned), out[1] 42 (after the wait)
__global__ void cpasync_kernel(float* out) {
  PALORA_SHARED(raw, 64);
  float* s = reinterpret_cast<float*>(raw);
  __align__(16) static const float src[4] = {42.f, 1.f, 2.f, 3.f};
  if (threadIdx.x == 0) {
    palora::cp_async16(s, src, 16);
    palora::cp_async_commit();
    out[0] = s[0];
    palora::cp_async_wait<0>();
    out[1] = s[0];
  }
}

// 4: FastDiv against / and % (a host check; returns a message on the first mismatch)
inline const char* check_fastdiv() {
  static thread_local char msg[160];
  const int ns[] = {0, 1, 2, 3, 7, 255, 256, 1000, 65535, 65536, 123456789, 0x3fffffff, 0x7ffffffe, 0x7fffffff - 1};
  for (int64_t d = 1; d < 5000; d += (d < 300 ? 1 : 97)) {
    const palora::FastDiv f(d);
    for (int64_t n0 : ns)
      for (int64_t n = n0; n < n0 + 600 && n < 0x7fffffff; ++n) {
        int q, r;
        f.divmod(static_cast<int>(n), q, r);
        if (q != n / d || r != n % d) {
          std::snprintf(msg, sizeof msg, "FastDiv(%lld): %lld -> (%d, %d), expected (%lld, %lld)", (long long)d,
                        (long long)n, q, r, (long long)(n / d), (long long)(n % d));
          return msg;
        }
      }
  }
  for (int64_t d : {int64_t(3000000), int64_t(0x7fffffff) - 5}) {
    const palora::FastDiv f(d);
    for (int64_t n = 0x7fffffff - 2000; n < 0x7fffffff; ++n)
      if (f.div(static_cast<int>(n)) != n / d) return "FastDiv: mismatch near 2^31";
  }
  return nullptr;
}

inline const char* run(int which, float* out) {
  switch (which) {
    case 3: PALORA_LAUNCH(dim3(1), dim3(32), 0, nullptr, cpasync_kernel)(out); break;
    case 4: return check_fastdiv();
    case 0: PALORA_LAUNCH(dim3(2), dim3(128), 0, nullptr, reduce_kernel)(out); break;
    case 1: PALORA_LAUNCH(dim3(1), dim3(64), 0, nullptr, divergent_kernel)(out); break;
    default: PALORA_LAUNCH(dim3(1), dim3(32), 0, nullptr, misaligned_wmma_kernel)(out); break;
  }
  return PALORA_LAST_ERROR();
}

}  // namespace emu_selftest
