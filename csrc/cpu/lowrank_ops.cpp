// CPU kernels of the linear layer's skinny products, the ops the cpp backend's lora_mm, lora_mm_dgrad and
// lora_tmm use:
//
//   lowrank_shrink(x (N, K), m (R, K)) -> (N, R) = x m^T   H = x A_cat^T (forward), dG = dY B_cat (backward)
//   lowrank_tmm(g (N, R), v (N, K))    -> (R, K) = g^T v   dA_cat = dH^T x, dB_cat^T = (H S)^T dY
//   lowrank_dual(v, m, g)              -> (v m^T, g^T v)   dG and dB_cat^T (and db) from one read of dY
//   lowrank_expand(g (N, R), up (R, M), bias) -> g up + bias   the low-rank term of y (and dX), written once
//
// R is small (T * r, 12 in the benchmark) and N * K large: MKL's sgemm ran these at 40-50 % of its speed on
// the layer's square GEMMs (4096 x 1024 x 12: 2.8-3.8 ms on 2 threads, 5.5-7 ms on one, against a 0.7 ms
// read of x), so the per-sample layer's six skinny passes cost ~8 % of its fwd+bwd. The fp32 kernels
// below keep the whole R-wide result tile in AVX2 registers and read x once (docs/design.md, CPU kernels).
// Other dtypes, non-unit column strides and CPUs without AVX2/FMA take at::mm (at::addmm), as the torch
// backend does.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PALORA_LOWRANK_AVX2 1
#define PALORA_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define PALORA_LOWRANK_AVX2 0
#endif

namespace palora {

namespace {

#if PALORA_LOWRANK_AVX2
PALORA_AVX2_FMA inline float lowrank_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// out[n, i] = sum_k x[n, k] m[i, k] for ROWS rows and JB columns: ROWS * JB accumulators of 8 lanes (12 of
// the 16 ymm registers at 4 x 3), each m load used by ROWS rows, each x load by JB columns.
template <int ROWS, int JB>
PALORA_AVX2_FMA inline void shrink_tile(const float* x, int64_t ldx, const float* m, int64_t K, float* out,
                                        int64_t ldo) {
  __m256 a[ROWS][JB];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < JB; ++i) a[r][i] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 w[JB];
#pragma GCC unroll 16
    for (int i = 0; i < JB; ++i) w[i] = _mm256_loadu_ps(m + i * K + k);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const __m256 v = _mm256_loadu_ps(x + r * ldx + k);
#pragma GCC unroll 16
      for (int i = 0; i < JB; ++i) a[r][i] = _mm256_fmadd_ps(v, w[i], a[r][i]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < JB; ++i) {
      float s = lowrank_hsum(a[r][i]);
      for (int64_t k = K8; k < K; ++k) s += x[r * ldx + k] * m[i * K + k];
      out[r * ldo + i] = s;
    }
}

template <int ROWS>
PALORA_AVX2_FMA void shrink_rows(const float* x, int64_t ldx, const float* m, int64_t K, int64_t R, float* out,
                                 int64_t ldo) {
  int64_t j = 0;
  for (; j + 3 <= R; j += 3) shrink_tile<ROWS, 3>(x, ldx, m + j * K, K, out + j, ldo);
  if (R - j == 2) shrink_tile<ROWS, 2>(x, ldx, m + j * K, K, out + j, ldo);
  if (R - j == 1) shrink_tile<ROWS, 1>(x, ldx, m + j * K, K, out + j, ldo);
}

PALORA_AVX2_FMA void shrink_f32(const float* x, int64_t ldx, const float* m, int64_t K, int64_t R, float* out,
                                int64_t ldo, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) shrink_rows<4>(x + n * ldx, ldx, m, K, R, out + n * ldo, ldo);
  for (; n < n1; ++n) shrink_rows<1>(x + n * ldx, ldx, m, K, R, out + n * ldo, ldo);
}

// acc[i, k..k+16) += sum_n g[n, i] p[n, 0..16) over nr packed rows: JB x 16 accumulators (12 registers at 6).
// a[i] += s[i * ss] * (v0 | v1) for i < J: the 16-wide rank-1 update the reduction and the expand are made of
template <int J>
PALORA_AVX2_FMA inline void rank1_16(__m256 (*a)[2], const float* s, int64_t ss, __m256 v0, __m256 v1) {
#pragma GCC unroll 16
  for (int i = 0; i < J; ++i) {
    const __m256 b = _mm256_broadcast_ss(s + i * ss);
    a[i][0] = _mm256_fmadd_ps(b, v0, a[i][0]);
    a[i][1] = _mm256_fmadd_ps(b, v1, a[i][1]);
  }
}

template <int JB>
PALORA_AVX2_FMA inline void tmm_tile(const float* g, int64_t ldg, const float* p, int64_t nr, float* acc, int64_t K) {
  __m256 a[JB][2];
#pragma GCC unroll 16
  for (int i = 0; i < JB; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
  for (int64_t n = 0; n < nr; ++n)
    rank1_16<JB>(a, g + n * ldg, 1, _mm256_loadu_ps(p + n * 16), _mm256_loadu_ps(p + n * 16 + 8));
#pragma GCC unroll 16
  for (int i = 0; i < JB; ++i) {
    float* ar = acc + i * K;
    _mm256_storeu_ps(ar, _mm256_add_ps(_mm256_loadu_ps(ar), a[i][0]));
    _mm256_storeu_ps(ar + 8, _mm256_add_ps(_mm256_loadu_ps(ar + 8), a[i][1]));
  }
}

// acc (R, K) += g[n0:n1]^T v[n0:n1]. Blocks of 16 rows are first packed 16 columns at a time: a tile then
// streams 64 contiguous bytes per row, where reading v in place steps 4 KiB per row (K = 1024), which
// aliases in L1 and defeats the prefetcher (2.8 ms packed against 5-9 ms in place, 4096 x 1024 x 12).
constexpr int64_t kTmmBlock = 16;

// acc (R, K) += g[nb:ne]^T v[nb:ne] for one block of at most kTmmBlock rows; pack: kTmmBlock * K16 floats.
PALORA_AVX2_FMA void tmm_block(const float* g, int64_t ldg, const float* v, int64_t ldv, int64_t K, int64_t R,
                               float* acc, int64_t nb, int64_t ne, float* pack) {
  const int64_t K16 = K & ~int64_t(15), KT = K16 / 16, nr = ne - nb;
  for (int64_t n = 0; n < nr; ++n) {
    const float* vr = v + (nb + n) * ldv;
    for (int64_t kt = 0; kt < KT; ++kt) {
      float* p = pack + (kt * nr + n) * 16;
      _mm256_storeu_ps(p, _mm256_loadu_ps(vr + kt * 16));
      _mm256_storeu_ps(p + 8, _mm256_loadu_ps(vr + kt * 16 + 8));
    }
  }
  const float* gb = g + nb * ldg;
  for (int64_t kt = 0; kt < KT; ++kt) {
    const float* p = pack + kt * nr * 16;
    int64_t j = 0;
    for (; j + 6 <= R; j += 6) tmm_tile<6>(gb + j, ldg, p, nr, acc + j * K + kt * 16, K);
    for (; j < R; ++j) tmm_tile<1>(gb + j, ldg, p, nr, acc + j * K + kt * 16, K);
  }
  for (int64_t k = K16; k < K; ++k)      // the last K % 16 columns
    for (int64_t j = 0; j < R; ++j) {
      float s = 0;
      for (int64_t n = nb; n < ne; ++n) s += g[n * ldg + j] * v[n * ldv + k];
      acc[j * K + k] += s;
    }
}

PALORA_AVX2_FMA void tmm_f32(const float* g, int64_t ldg, const float* v, int64_t ldv, int64_t K, int64_t R,
                             float* acc, int64_t n0, int64_t n1) {
  std::vector<float> pack(static_cast<size_t>(kTmmBlock * (K & ~int64_t(15))));
  for (int64_t nb = n0; nb < n1; nb += kTmmBlock)
    tmm_block(g, ldg, v, ldv, K, R, acc, nb, std::min(n1, nb + kTmmBlock), pack.data());
}

// Both products of v over rows [n0, n1), block by block: out = v m^T for the block's rows (v read from memory),
// then acc += g^T v for the same rows while they are still in L2 (64 KiB at K = 1024): one read of v for two.
PALORA_AVX2_FMA void dual_f32(const float* v, int64_t ldv, const float* m, int64_t K, int64_t R1, float* out,
                              int64_t ldo, const float* g, int64_t ldg, int64_t R2, float* acc, int64_t n0,
                              int64_t n1) {
  std::vector<float> pack(static_cast<size_t>(kTmmBlock * (K & ~int64_t(15))));
  for (int64_t nb = n0; nb < n1; nb += kTmmBlock) {
    const int64_t ne = std::min(n1, nb + kTmmBlock);
    shrink_f32(v, ldv, m, K, R1, out, ldo, nb, ne);
    tmm_block(g, ldg, v, ldv, K, R2, acc, nb, ne, pack.data());
  }
}

// y[n, c] = bias[c] + sum_k g[n, k] up[k, c] for ROWS rows and 16 columns: 2 * ROWS accumulators, each up load
// used by ROWS rows. y is only written: a fresh output's one pass, where bias-then-expand reads it back.
template <int ROWS>
PALORA_AVX2_FMA inline void expand_tile(const float* g, int64_t ldg, const float* up, int64_t M, int64_t R,
                                        const float* bias, float* y, int64_t ldy) {
  __m256 a[ROWS][2];
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) a[r][0] = b0, a[r][1] = b1;
  for (int64_t k = 0; k < R; ++k)
    rank1_16<ROWS>(a, g + k, ldg, _mm256_loadu_ps(up + k * M), _mm256_loadu_ps(up + k * M + 8));
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    _mm256_storeu_ps(y + r * ldy, a[r][0]);
    _mm256_storeu_ps(y + r * ldy + 8, a[r][1]);
  }
}

template <int ROWS>
PALORA_AVX2_FMA void expand_rows(const float* g, int64_t ldg, const float* up, int64_t M, int64_t R, const float* bias,
                                 float* y, int64_t ldy) {
  const int64_t M16 = M & ~int64_t(15);
  for (int64_t c = 0; c < M16; c += 16) expand_tile<ROWS>(g, ldg, up + c, M, R, bias ? bias + c : nullptr, y + c, ldy);
  for (int r = 0; r < ROWS; ++r)
    for (int64_t c = M16; c < M; ++c) {
      float s = bias ? bias[c] : 0.f;
      for (int64_t k = 0; k < R; ++k) s += g[r * ldg + k] * up[k * M + c];
      y[r * ldy + c] = s;
    }
}

PALORA_AVX2_FMA void expand_f32(const float* g, int64_t ldg, const float* up, int64_t M, int64_t R, const float* bias,
                                float* y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) expand_rows<4>(g + n * ldg, ldg, up, M, R, bias, y + n * M, M);
  for (; n < n1; ++n) expand_rows<1>(g + n * ldg, ldg, up, M, R, bias, y + n * M, M);
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
bool cpu_has_avx2_fma() { return false; }
#endif

// the fp32 kernels read rows in place (unit column stride) and index in int64
bool fast_path(const at::Tensor& a, const at::Tensor& b) {
  return PALORA_LOWRANK_AVX2 && cpu_has_avx2_fma() && a.scalar_type() == at::kFloat &&
         b.scalar_type() == at::kFloat && a.stride(1) == 1 && b.stride(1) == 1;
}

// a and b: 2-D CPU tensors of one dtype that share the size of a's dim `da` as b's dim `db` (0 or 1)
void check_operands(const char* op, const char* an, const at::Tensor& a, int da, const char* bn,
                    const at::Tensor& b, int db) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{an, a}, {bn, b}}) {
    TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.dim(), "-D ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  }
  TORCH_CHECK(b.size(db) == a.size(da), op, ": ", bn, " must be ", db == 1 ? "(R, " : "(", a.size(da),
              db == 1 ? ")" : ", R)", " to match ", an, " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": ", bn, " must be ", a.scalar_type(), " like ", an,
              ", got ", b.scalar_type());
}

int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// (N, R) view of an (N, round_up(R, row_align)) buffer: H's row stride is padded like the other backends' (_ops)
at::Tensor lowrank_shrink_cpu(const at::Tensor& x, const at::Tensor& m, int64_t row_align) {
  check_operands("lowrank_shrink", "x", x, 1, "m", m, 1);
  TORCH_CHECK(row_align >= 1, "lowrank_shrink: row_align must be >= 1, got ", row_align);
  const int64_t N = x.size(0), K = x.size(1), R = m.size(0), ld = round_up(std::max<int64_t>(R, 1), row_align);
  auto mc = m.contiguous();                          // (R, K): small; B_cat^T arrives transposed
  if (!fast_path(x, mc) || N == 0 || R == 0 || K == 0) {
    auto mp = at::zeros({ld, K}, m.options());      // zero rows: the GEMM writes the padded buffer whole
    mp.narrow(0, 0, R).copy_(mc);
    return at::mm(x, mp.t()).narrow(1, 0, R);
  }
#if PALORA_LOWRANK_AVX2
  auto out = at::empty({N, ld}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* mp = mc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  // grain: 64 rows x K columns is >= 64 KiB of x per task at K >= 256
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { shrink_f32(xp, ldx, mp, K, R, op, ld, n0, n1); });
  if (ld > R) out.narrow(1, R, ld - R).zero_();     // the padding is never read; zeroed so no NaN garbage lurks
  return out.narrow(1, 0, R);
#else
  TORCH_CHECK(false, "unreachable");
#endif
}

// The per-thread (R, K) fp32 partials of a row-parallel g^T v, summed in thread order: deterministic for a given
// thread count, as MKL is. A fresh result: a view of `part` would keep all partials alive as a parameter's .grad.
at::Tensor sum_partials(const at::Tensor& part) {
  const int64_t nt = part.size(0);
  if (nt == 1) return part.select(0, 0);
  auto out = part.select(0, 0).add(part.select(0, 1));
  for (int64_t t = 2; t < nt; ++t) out.add_(part.select(0, t));
  return out;
}

at::Tensor lowrank_tmm_cpu(const at::Tensor& g, const at::Tensor& v) {
  check_operands("lowrank_tmm", "v", v, 0, "g", g, 0);
  const int64_t N = v.size(0), K = v.size(1), R = g.size(1);
  if (!fast_path(g, v) || N == 0 || R == 0 || K == 0) return at::mm(g.t(), v);
#if PALORA_LOWRANK_AVX2
  auto part = at::zeros({at::get_num_threads(), R, K}, v.options());
  const float* gp = g.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  const int64_t ldg = g.stride(0), ldv = v.stride(0);
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    tmm_f32(gp, ldg, vp, ldv, K, R, pp + at::get_thread_num() * R * K, n0, n1);
  });
  return sum_partials(part);
#else
  TORCH_CHECK(false, "unreachable");
#endif
}

// (v m^T, g^T v) in one read of v: the linear backward's dG = dY B_cat and dB_cat^T = (H S)^T dY (with a column
// of ones in g, the bias gradient sum_n dY too). Each result as lowrank_shrink and lowrank_tmm return it.
std::tuple<at::Tensor, at::Tensor> lowrank_dual_cpu(const at::Tensor& v, const at::Tensor& m, const at::Tensor& g,
                                                    int64_t row_align) {
  check_operands("lowrank_dual", "v", v, 1, "m", m, 1);
  check_operands("lowrank_dual", "v", v, 0, "g", g, 0);
  TORCH_CHECK(row_align >= 1, "lowrank_dual: row_align must be >= 1, got ", row_align);
  const int64_t N = v.size(0), K = v.size(1), R1 = m.size(0), R2 = g.size(1);
  auto mc = m.contiguous();
  if (!fast_path(v, mc) || !fast_path(g, v) || N == 0 || R1 == 0 || R2 == 0 || K == 0)
    return {lowrank_shrink_cpu(v, mc, row_align), lowrank_tmm_cpu(g, v)};
#if PALORA_LOWRANK_AVX2
  const int64_t ld = round_up(R1, row_align);
  auto out = at::empty({N, ld}, v.options());
  auto part = at::zeros({at::get_num_threads(), R2, K}, v.options());
  const float* vp = v.data_ptr<float>();
  const float* mp = mc.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  const int64_t ldv = v.stride(0), ldg = g.stride(0);
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    dual_f32(vp, ldv, mp, K, R1, op, ld, gp, ldg, R2, pp + at::get_thread_num() * R2 * K, n0, n1);
  });
  if (ld > R1) out.narrow(1, R1, ld - R1).zero_();
  return {out.narrow(1, 0, R1), sum_partials(part)};
#else
  TORCH_CHECK(false, "unreachable");
#endif
}

// y = g up (+ bias) (N, M), dense: the low-rank term of the forward (and dX) written in one pass, bias included,
// for the base GEMM to accumulate onto (beta = 1).
at::Tensor lowrank_expand_cpu(const at::Tensor& g, const at::Tensor& up, const c10::optional<at::Tensor>& bias) {
  check_operands("lowrank_expand", "g", g, 1, "up", up, 0);
  const int64_t N = g.size(0), R = g.size(1), M = up.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == M, "lowrank_expand: bias must be (", M, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == g.scalar_type(), "lowrank_expand: bias must be ", g.scalar_type(), ", got ",
                bias->scalar_type());
  }
  auto upc = up.contiguous();
  if (!fast_path(g, upc) || N == 0 || M == 0 || (has_bias && bias->scalar_type() != at::kFloat))
    return has_bias ? at::addmm(*bias, g, up) : at::mm(g, up);
#if PALORA_LOWRANK_AVX2
  auto y = at::empty({N, M}, g.options());
  auto bc = has_bias ? bias->contiguous() : at::Tensor();
  const float* gp = g.data_ptr<float>();
  const float* upp = upc.data_ptr<float>();
  const float* bp = has_bias ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldg = g.stride(0);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { expand_f32(gp, ldg, upp, M, R, bp, yp, n0, n1); });
  return y;
#else
  TORCH_CHECK(false, "unreachable");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(palora, m) {
  m.def("lowrank_shrink(Tensor x, Tensor m, int row_align) -> Tensor");
  m.def("lowrank_tmm(Tensor g, Tensor v) -> Tensor");
  m.def("lowrank_dual(Tensor v, Tensor m, Tensor g, int row_align) -> (Tensor, Tensor)");
  m.def("lowrank_expand(Tensor g, Tensor up, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(palora, CPU, m) {
  m.impl("lowrank_shrink", &lowrank_shrink_cpu);
  m.impl("lowrank_tmm", &lowrank_tmm_cpu);
  m.impl("lowrank_dual", &lowrank_dual_cpu);
  m.impl("lowrank_expand", &lowrank_expand_cpu);
}

}  // namespace palora
