// CPU kernels of the palora:: ops the torch backend uses in its backward.
//
// pref_grad: dp[p, t] = scale * sum_{n in sample p} sum_j H[n, t*r+j] * dG[n, t*r+j]
// One pass over H and dG, no (N, R) product temporary, parallel over samples (per-sample
// preference) or over row blocks with a per-thread partial (per-batch preference).
// Build time (docs/cuda.md, Build): the core Tensor and the one operator header used, not <ATen/ATen.h>
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

namespace palora {

namespace {

template <typename scalar_t, typename acc_t>
void pref_grad_kernel(const scalar_t* h, int64_t ldh, const scalar_t* dg, int64_t ldg, int64_t N, int64_t T,
                      int64_t rank, int64_t P, int64_t rows_per_sample, double scale, acc_t* out) {
  // out: (P, T), zero-initialised by the caller
  auto rows = [&](int64_t begin, int64_t end, acc_t* acc /* (T,) */) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* hr = h + n * ldh;
      const scalar_t* gr = dg + n * ldg;
      for (int64_t t = 0; t < T; ++t) {
        acc_t s = 0;
        for (int64_t j = 0; j < rank; ++j) s += acc_t(hr[t * rank + j]) * acc_t(gr[t * rank + j]);
        acc[t] += s;
      }
    }
  };
  if (P > 1) {
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        int64_t lo = p * rows_per_sample, hi = std::min(N, lo + rows_per_sample);
        rows(lo, hi, out + p * T);
        for (int64_t t = 0; t < T; ++t) out[p * T + t] *= acc_t(scale);
      }
    });
    return;
  }
  int nthreads = at::get_num_threads();
  std::vector<acc_t> partial(static_cast<size_t>(nthreads) * T, acc_t(0));
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    rows(n0, n1, partial.data() + at::get_thread_num() * T);
  });
  for (int i = 0; i < nthreads; ++i)
    for (int64_t t = 0; t < T; ++t) out[t] += partial[i * T + t];
  for (int64_t t = 0; t < T; ++t) out[t] *= acc_t(scale);
}

at::Tensor pref_grad_cpu(const at::Tensor& h, const at::Tensor& dg, const at::Tensor& pref,
                         int64_t rows_per_sample, int64_t rank, double scale) {
  TORCH_CHECK(h.dim() == 2 && dg.sizes() == h.sizes(),
              "pref_grad: h and dg must be (N, R) of one shape, got ", h.sizes(), " and ", dg.sizes());
  TORCH_CHECK(pref.dim() == 2, "pref_grad: pref must be (P, T), got ", pref.sizes());
  const int64_t N = h.size(0), R = h.size(1), P = pref.size(0), T = pref.size(1);
  TORCH_CHECK(T * rank == R, "pref_grad: R = ", R, " must equal T * rank = ", T, " * ", rank);
  TORCH_CHECK(P == 1 || P * rows_per_sample == N, "pref_grad: P * rows_per_sample = ", P, " * ",
              rows_per_sample, " must equal N = ", N, " for a per-sample preference");
  // rows may be padded (H's row stride is a multiple of 16): read them in place when unit-stride
  auto rowwise = [](const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); };
  auto hc = rowwise(h);
  auto gc = rowwise(dg.to(h.scalar_type()));
  const bool f64 = h.scalar_type() == at::kDouble;
  auto out = at::zeros({P, T}, h.options().dtype(f64 ? at::kDouble : at::kFloat));
  // empty batch: nothing to sum (and with P == 0 the per-batch branch would write out[0..T))
  if (N == 0 || P == 0) return out.to(pref.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "pref_grad", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    pref_grad_kernel<scalar_t, acc_t>(hc.data_ptr<scalar_t>(), hc.stride(0), gc.data_ptr<scalar_t>(), gc.stride(0),
                                      N, T, rank, P, rows_per_sample, scale, out.data_ptr<acc_t>());
  });
  return out.to(pref.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(palora, m) {
  m.def("pref_grad(Tensor h, Tensor dg, Tensor pref, int rows_per_sample, int rank, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(palora, CPU, m) { m.impl("pref_grad", &pref_grad_cpu); }

}  // namespace palora
