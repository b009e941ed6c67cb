// CPU kernels of the linear layer's skinny products, the ops the cpp backend's lora_mm and lora_tmm use:
//
//   lowrank_shrink(x (N, K), m (R, K)) -> (N, R) = x m^T   H = x A_cat^T (forward), dG = dY B_cat (backward)
//   lowrank_tmm(g (N, R), v (N, K))    -> (R, K) = g^T v   dA_cat = dH^T x, dB_cat^T = (H S)^T dY
//
// R is small (T * r, 12 in the benchmark) and N * K large: MKL's sgemm ran these at 40-50 % of its speed on
// the layer's square GEMMs (4096 x 1024 x 12: 2.8-3.8 ms on 2 threads, 5.5-7 ms on one, against a 0.7 ms
// read of x), so the per-sample layer's six skinny passes cost ~8 % of its fwd+bwd. The fp32 kernels
// below keep the whole R-wide result tile in AVX2 registers and read x once (docs/design.md, CPU kernels).
// Other dtypes, non-unit column strides and CPUs without AVX2/FMA take at::mm, as the torch backend does.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
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
template <int JB>
PALORA_AVX2_FMA inline void tmm_tile(const float* g, int64_t ldg, const float* p, int64_t nr, float* acc, int64_t K) {
  __m256 a[JB][2];
#pragma GCC unroll 16
  for (int i = 0; i < JB; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
  for (int64_t n = 0; n < nr; ++n) {
    const __m256 v0 = _mm256_loadu_ps(p + n * 16), v1 = _mm256_loadu_ps(p + n * 16 + 8);
#pragma GCC unroll 16
    for (int i = 0; i < JB; ++i) {
      const __m256 b = _mm256_broadcast_ss(g + n * ldg + i);
      a[i][0] = _mm256_fmadd_ps(b, v0, a[i][0]);
      a[i][1] = _mm256_fmadd_ps(b, v1, a[i][1]);
    }
  }
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

PALORA_AVX2_FMA void tmm_f32(const float* g, int64_t ldg, const float* v, int64_t ldv, int64_t K, int64_t R,
                             float* acc, int64_t n0, int64_t n1) {
  const int64_t K16 = K & ~int64_t(15), KT = K16 / 16;
  std::vector<float> pack(static_cast<size_t>(kTmmBlock * K16));
  for (int64_t nb = n0; nb < n1; nb += kTmmBlock) {
    const int64_t ne = std::min(n1, nb + kTmmBlock), nr = ne - nb;
    for (int64_t n = 0; n < nr; ++n) {
      const float* vr = v + (nb + n) * ldv;
      for (int64_t kt = 0; kt < KT; ++kt) {
        float* p = pack.data() + (kt * nr + n) * 16;
        _mm256_storeu_ps(p, _mm256_loadu_ps(vr + kt * 16));
        _mm256_storeu_ps(p + 8, _mm256_loadu_ps(vr + kt * 16 + 8));
      }
    }
    const float* gb = g + nb * ldg;
    for (int64_t kt = 0; kt < KT; ++kt) {
      const float* p = pack.data() + kt * nr * 16;
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

at::Tensor lowrank_tmm_cpu(const at::Tensor& g, const at::Tensor& v) {
  check_operands("lowrank_tmm", "v", v, 0, "g", g, 0);
  const int64_t N = v.size(0), K = v.size(1), R = g.size(1);
  if (!fast_path(g, v) || N == 0 || R == 0 || K == 0) return at::mm(g.t(), v);
#if PALORA_LOWRANK_AVX2
  // one (R, K) fp32 partial per thread over a contiguous row range, summed in thread order: deterministic for
  // a given thread count, as MKL is
  const int nt = at::get_num_threads();
  auto part = at::zeros({nt, R, K}, v.options());
  const float* gp = g.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  const int64_t ldg = g.stride(0), ldv = v.stride(0);
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    tmm_f32(gp, ldg, vp, ldv, K, R, pp + at::get_thread_num() * R * K, n0, n1);
  });
  if (nt == 1) return part.select(0, 0);
  // a fresh (R, K) result: a view of `part` would keep all nt partials alive as the parameter's .grad
  auto out = part.select(0, 0).add(part.select(0, 1));
  for (int t = 2; t < nt; ++t) out.add_(part.select(0, t));
  return out;
#else
  TORCH_CHECK(false, "unreachable");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(palora, m) {
  m.def("lowrank_shrink(Tensor x, Tensor m, int row_align) -> Tensor");
  m.def("lowrank_tmm(Tensor g, Tensor v) -> Tensor");
}

TORCH_LIBRARY_IMPL(palora, CPU, m) {
  m.impl("lowrank_shrink", &lowrank_shrink_cpu);
  m.impl("lowrank_tmm", &lowrank_tmm_cpu);
}

}  // namespace palora
