// palora::philox_uniform: csrc/cuda/philox.h compiled for the host, as a CPU op. The proof that the
// header (which the CUDA kernels include) draws the same numbers as palora_kernels._rng and
// Triton's tl.rand (tests/test_dropout.py).
// Build time (docs/cuda.md, Build): the core Tensor and the one operator header used, not <ATen/ATen.h>
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(palora, m) { m.def("philox_uniform(int seed, Tensor offsets) -> Tensor"); }

TORCH_LIBRARY_IMPL(palora, CPU, m) { m.impl("philox_uniform", &philox_uniform_cpu); }

}  // namespace palora
