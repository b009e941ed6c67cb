// Counter-based uniform random numbers for LoRA dropout (docs/dropout.md), bitwise equal to
// Triton's tl.rand(seed, offset) (triton/language/random.py, 3.8) and to palora_kernels._rng:
// Philox-4x32 with 10 rounds, key (seed lo, seed hi), counter (offset lo, offset hi, 0, 0), the
// first output word mapped to [0, 1) as Triton does. A mask element is kept iff
// philox_uniform(seed, offset + i) >= p, i its row-major index: a kernel regenerates any element
// of the mask from (seed, offset) alone, so the backward needs nothing saved.
// Host and device: no torch header, no CUDA header (nvcc gets __host__ __device__).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PALORA_PHILOX_HD __host__ __device__ __forceinline__
#else
#define PALORA_PHILOX_HD inline
#endif

namespace palora {

PALORA_PHILOX_HD uint32_t philox_mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The first 32-bit word of Philox-4x32-10 for (seed, offset): Triton's tl.randint.
PALORA_PHILOX_HD uint32_t philox_u32(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint32_t a = c0, b = c2;
    c0 = philox_mulhi32(0xCD9E8D57u, b) ^ c1 ^ k0;
    c2 = philox_mulhi32(0xD2511F53u, a) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * b;
    c3 = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Uniform float in [0, 1): the word read as int32, negatives folded (x < 0 -> ~x), times the
// largest scale with INT32_MAX * scale < 1 in fp32. float(int) rounds to nearest on both sides.
PALORA_PHILOX_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  const uint32_t u = philox_u32(seed, offset);
  const int32_t i = static_cast<int32_t>(u >= 0x80000000u ? ~u : u);
  return static_cast<float>(i) * 4.6566127342e-10f;
}

PALORA_PHILOX_HD bool philox_keep(uint64_t seed, uint64_t offset, float p) { return philox_uniform(seed, offset) >= p; }

}  // namespace palora
