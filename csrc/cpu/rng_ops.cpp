// palora::philox_uniform: csrc/cuda/philox.h compiled for the host, as a CPU op. The proof that the
// header (which the CUDA kernels include) draws the same numbers as palora_kernels._rng and
// Triton's tl.rand (tests/test_dropout.py). philox_keep / philox_dropout: the CPU fast path of _rng's
// keep_mask / dropout_input (~0.2 s for a 3136 x 96 mask in int64 torch ops), tested bitwise against them.
// Build time (docs/cuda.md, Build): the core Tensor and the operator headers used, not <ATen/ATen.h>
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../cuda/philox.h"

namespace palora {

namespace {

at::Tensor philox_uniform_cpu(int64_t seed, const at::Tensor& offsets) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets: expected int64, got ", offsets.scalar_type());
  TORCH_CHECK(seed >= 0, "seed: expected >= 0, got ", seed);
  auto off = offsets.contiguous();
  auto out = at::empty(off.sizes(), off.options().dtype(at::kFloat));
  const int64_t* o = off.data_ptr<int64_t>();
  float* u = out.data_ptr<float>();
  at::parallel_for(0, off.numel(), 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) u[i] = philox_uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(o[i]));
  });
  return out;
}

void check_seed_offset(int64_t seed, int64_t offset, int64_t numel) {
  TORCH_CHECK(seed >= 0, "seed: expected >= 0, got ", seed);
  TORCH_CHECK(offset >= 0 && numel >= 0 && offset <= INT64_MAX - numel, "offset: expected >= 0 with offset + numel "
              "in int64, got offset ", offset, " and numel ", numel);
}

// The compiler vectorizes this loop (Philox's 32x32->64 multiplies as pmuludq); x86-64's baseline (SSE2) does
// two per instruction, so an AVX2 clone, picked when the library loads, does four.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define PALORA_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define PALORA_AVX2_CLONE
#endif

// k[j] = uniform(seed, first + j) >= p for j < n.
PALORA_AVX2_CLONE void keep_run(uint64_t seed, uint64_t first, int64_t n, float p, bool* k) {
  for (int64_t j = 0; j < n; ++j) k[j] = philox_keep(seed, first + static_cast<uint64_t>(j), p);
}

// Bool (numel,): element i kept iff uniform(seed, offset + i) >= p, p rounded to fp32 as torch compares a fp32
// tensor with a Python float. Counters made here: no int64 offsets tensor (8 bytes per element) to read.
at::Tensor philox_keep_cpu(int64_t seed, int64_t offset, int64_t numel, double p) {
  check_seed_offset(seed, offset, numel);
  auto out = at::empty({numel}, at::TensorOptions().dtype(at::kBool));
  bool* k = out.data_ptr<bool>();
  const float pf = static_cast<float>(p);
  at::parallel_for(0, numel, 4096, [&](int64_t b, int64_t e) {
    keep_run(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + b), e - b, pf, k + b);
  });
  return out;
}

// x * keep / (1 - p) in one pass, the bits of palora_kernels._rng.dropout_input's x * mask.to(x.dtype) / (1 - p):
// the product is exact (x or a signed zero, NaN for inf/NaN x), the division runs as torch's, in fp32 for
// half/bf16 (fp64 for double) by (1 - p) rounded to that type, then rounded once to x's dtype.
template <typename scalar_t, typename acc_t>
void dropout_rows(const scalar_t* x, scalar_t* y, int64_t numel, double p, uint64_t seed, uint64_t offset) {
  const float pf = static_cast<float>(p);
  const acc_t div = static_cast<acc_t>(1.0 - p);
  at::parallel_for(0, numel, 4096, [&](int64_t b, int64_t e) {
    bool keep[1024];                 // the mask of 1024 elements at a time, then the product
    for (int64_t i0 = b; i0 < e; i0 += 1024) {
      const int64_t n = std::min<int64_t>(1024, e - i0);
      keep_run(seed, offset + static_cast<uint64_t>(i0), n, pf, keep);
      for (int64_t j = 0; j < n; ++j) {
        const acc_t m = keep[j] ? acc_t(1) : acc_t(0);
        y[i0 + j] = static_cast<scalar_t>(static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(x[i0 + j]) * m)) / div);
      }
    }
  });
}

at::Tensor philox_dropout_cpu(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected a dropout probability in [0, 1), got ", p);
  check_seed_offset(seed, offset, x.numel());
  auto xc = x.contiguous();          // the mask is over x's logical row-major elements, whatever its strides
  auto y = at::empty(xc.sizes(), xc.options());
  const auto n = xc.numel();
  const auto s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  switch (xc.scalar_type()) {
    case at::kFloat: dropout_rows<float, float>(xc.data_ptr<float>(), y.data_ptr<float>(), n, p, s, o); break;
    case at::kDouble: dropout_rows<double, double>(xc.data_ptr<double>(), y.data_ptr<double>(), n, p, s, o); break;
    case at::kHalf: dropout_rows<at::Half, float>(xc.data_ptr<at::Half>(), y.data_ptr<at::Half>(), n, p, s, o); break;
    case at::kBFloat16:
      dropout_rows<at::BFloat16, float>(xc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), n, p, s, o);
      break;
    default: TORCH_CHECK(false, "x: expected float32, float64, float16 or bfloat16, got ", xc.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(palora, m) {
  m.def("philox_uniform(int seed, Tensor offsets) -> Tensor");
  // no tensor argument to dispatch on: a catch-all kernel (its result is on the CPU)
  m.def("philox_keep(int seed, int offset, int numel, float p) -> Tensor", &philox_keep_cpu);
  m.def("philox_dropout(Tensor x, float p, int seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(palora, CPU, m) {
  m.impl("philox_uniform", &philox_uniform_cpu);
  m.impl("philox_dropout", &philox_dropout_cpu);
}

}  // namespace palora
