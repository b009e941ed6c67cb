// palora::mtlora_mm and palora::mtlora_mm_dgrad on CUDA (docs/mtlora.md, docs/cuda.md): the MTLoRA
// layer's T1 = T + 1 outputs on one base product, and its data gradients. One kernel template,
// mtlora_gemm_kernel: lora_gemm.cuh's K loop (gemm_mainloop: cp.async stages, LDSM/WMMA or SIMT, the
// expand phase) with one of two epilogues:
//   * plain (store_tile, as lora_gemm_kernel): the shrinks H = x_a A^T, dG = dYsum_a B, and
//     dX = dBase W + (dG * s) A, dX_t = (dG * s_t) A (the expand phase, s a per-column scale row);
//   * the T1 outputs: the block's base tile x W_g^T + b_g stays in shared memory (fp32) and each
//     adapter's expand s[g, a] H[:, g, a] B[g, a]^T is accumulated in registers over chunks of 16 rank
//     columns staged in shared memory, then added to the base and stored as its output (matrixv2:
//     the shared expand is first added into the base tile, so every task output starts from it).
// Forward: 1 shrink launch (every adapter reads x) or G * (T+1) (task inputs: each task's columns from
// its own input), then 1 output launch whose column tiles never straddle two groups (q, k, v).
// Backward: G * (T+1) dG launches (one per group and adapter with rank > 0), 1 dX and T dX_t launches.
// LoRA dropout (p > 0): mtlora_dropout_kernel writes each group's dropped x for that group's shrink (one
// shrink per group), and in the backward adds drop_g((dG s)_g A_g) to dX = dBase W, mask regenerated.
#pragma once
#include <string>
#include <utility>

#include "cuda/lora_gemm.cuh"
#include "cuda/philox.h"

namespace palora {

// LoRA dropout of MTLoRA (docs/dropout.md): out (N, K) dense = (accumulate ? out : 0) + in * keep / (1 - p),
// keep = philox_uniform(seed, offset + n*K + k) >= p, the mask of palora_kernels._rng (x * mask / (1 - p)).
// Forward: the dropped x of one group for its shrink; backward: dX += drop_g(dH_g A_g). Grid: blockIdx.x
// tiles the K columns, blockIdx.y strides over the rows (no division).
constexpr int kDropThreads = 128;
template <class T>
__global__ void __launch_bounds__(kDropThreads) mtlora_dropout_kernel(const T* in, int64_t in_sn, int64_t in_sk, T* out,
                                                                      int N, int K, uint64_t seed, uint64_t offset,
                                                                      float p, int accumulate) {
  const int k = blockIdx.x * kDropThreads + threadIdx.x;
  if (k >= K) return;
  const float keep_scale = 1.f - p;
  for (int n = blockIdx.y; n < N; n += gridDim.y) {
    const bool keep = philox_keep(seed, offset + uint64_t(n) * uint64_t(K) + uint64_t(k), p);
    const float v = Num<T>::to_f(in[n * in_sn + k * in_sk]) * (keep ? 1.f : 0.f) / keep_scale;
    T* o = out + int64_t(n) * K + k;
    *o = Num<T>::from_f(accumulate ? Num<T>::to_f(*o) + v : v);
  }
}

template <class T>
const char* launch_mtlora_dropout(const void* in, int64_t in_sn, int64_t in_sk, void* out, int64_t N, int64_t K,
                                  int64_t seed, int64_t offset, double p, bool accumulate, void* stream) {
  if (N == 0 || K == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(cdiv(K, kDropThreads)), static_cast<unsigned>(N < 65535 ? N : 65535));
  PALORA_LAUNCH(grid, dim3(kDropThreads), 0, stream, mtlora_dropout_kernel<T>)(
      static_cast<const T*>(in), in_sn, in_sk, static_cast<T*>(out), static_cast<int>(N), static_cast<int>(K),
      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<float>(p), accumulate ? 1 : 0);
  return PALORA_LAST_ERROR();
}

// What the MTLoRA kernel does after the K loop. mode 0: the plain epilogue over G = 1 group of
// Mg = cols columns. mode 1: the T1 outputs.
struct MTEpilogue {
  int mode, G, Mg, ntg, R, T1, s2t;   // ntg: column tiles per group
  FastDiv div_ntg;
  int offs[kMTLoraMaxAdapters + 1];   // column of adapter a inside a group's R columns
  const void* h;                      // H (N, G*R), column stride 1
  int64_t h_sn;
  const void* b;                      // B (M, R)
  int64_t b_sm, b_sr;
  const float* scales;                // (G, T1) fp32, dense
  void* y;                            // Y (T1, N, M)
  int64_t y_so, y_sn, y_sm;
};

constexpr int kMTRankChunk = 16;      // rank columns per shared-memory chunk of the output epilogue

template <class T, bool BKMAJ>
struct MTLayout {
  using Lay = Tile<FusedCfg, T, BKMAJ>;
  static constexpr int LDE = kMTRankChunk + 1;   // +1: the two tiles' rows start in different banks
  static constexpr int EPI = Lay::C_BYTES + (FusedCfg::BM + FusedCfg::BN) * LDE * 4;
  static constexpr int SMEM = Lay::SMEM > EPI ? Lay::SMEM : EPI;
  static_assert(SMEM <= 48 * 1024, "static shared memory limit");
};

// The T1 outputs of a (BM, BN) tile of group g: Cs holds x W_g^T (fp32) for rows m0.., columns n0..
template <class T, bool BKMAJ>
__device__ __forceinline__ void mtlora_outputs(const GemmParams& p, const MTEpilogue& e, unsigned char* smem, int g,
                                               int m0, int n0) {
  using Cfg = FusedCfg;
  using ML = MTLayout<T, BKMAJ>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, TM = Cfg::TM, TN = Cfg::TN, RC = kMTRankChunk, LDE = ML::LDE;
  constexpr int LDC = ML::Lay::LDC;
  float* Cs = reinterpret_cast<float*>(smem);
  float* Hs = Cs + BM * LDC;          // (BM, LDE): s[g, a] * H chunk
  float* Bs = Hs + BM * LDE;          // (BN, LDE): B chunk
  const int tid = threadIdx.x, ty = tid / (BN / TN), tx = tid % (BN / TN);
  const int cend = (g + 1) * e.Mg;    // the group's last column + 1
  const T* bias = static_cast<const T*>(p.bias);
  const T* H = static_cast<const T*>(e.h);
  const T* Bm = static_cast<const T*>(e.b);
  // from here on each thread reads and writes only its own (TM, TN) micro-tile of Cs: no barrier needed
  if (bias)
    for (int j = 0; j < TN; ++j) {
      const int c = n0 + tx * TN + j;
      const float bv = c < cend ? Num<T>::to_f(bias[c * p.bias_s]) : 0.f;
      for (int i = 0; i < TM; ++i) Cs[(ty * TM + i) * LDC + tx * TN + j] += bv;
    }
  for (int a = 0; a < e.T1; ++a) {
    const int c0 = g * e.R + e.offs[a], r = e.offs[a + 1] - e.offs[a];
    const float s = e.scales[g * e.T1 + a];
    float d[TM][TN];
    for (int i = 0; i < TM; ++i)
      for (int j = 0; j < TN; ++j) d[i][j] = 0.f;
    for (int j0 = 0; j0 < r; j0 += RC) {   // r is uniform over the block: the barriers are too
      PALORA_TILE_BARRIER();               // the previous chunk has been read
      for (int idx = tid; idx < BM * RC; idx += Cfg::THREADS) {
        const int mm = idx / RC, jj = idx % RC, m = m0 + mm, j = j0 + jj;
        Hs[mm * LDE + jj] = m < p.rows && j < r ? Num<T>::to_f(H[int64_t(m) * e.h_sn + c0 + j]) * s : 0.f;
      }
      for (int idx = tid; idx < BN * RC; idx += Cfg::THREADS) {
        const int nn = idx / RC, jj = idx % RC, c = n0 + nn, j = j0 + jj;
        Bs[nn * LDE + jj] = c < cend && j < r ? Num<T>::to_f(Bm[int64_t(c) * e.b_sm + (e.offs[a] + j) * e.b_sr]) : 0.f;
      }
      PALORA_TILE_BARRIER();               // the chunk is staged (-DPALORA_BREAK_BARRIER drops both: tests)
      for (int jj = 0; jj < RC; ++jj) {
        float av[TM], bv[TN];
        for (int i = 0; i < TM; ++i) av[i] = Hs[(ty * TM + i) * LDE + jj];
        for (int j = 0; j < TN; ++j) bv[j] = Bs[(tx * TN + j) * LDE + jj];
        for (int i = 0; i < TM; ++i)
          for (int j = 0; j < TN; ++j) d[i][j] += av[i] * bv[j];
      }
    }
    const bool into_base = a == 0 && e.s2t;   // matrixv2: y_0 = base + shared, y_t = y_0 + task t
    T* y = static_cast<T*>(e.y) + a * e.y_so;
    for (int i = 0; i < TM; ++i) {
      const int m = m0 + ty * TM + i;
      for (int j = 0; j < TN; ++j) {
        const int c = n0 + tx * TN + j;
        float& base = Cs[(ty * TM + i) * LDC + tx * TN + j];
        if (into_base) base += d[i][j];
        if (m < p.rows && c < cend) y[int64_t(m) * e.y_sn + int64_t(c) * e.y_sm] = Num<T>::from_f(into_base ? base : base + d[i][j]);
      }
    }
  }
}

template <class T, bool BKMAJ>
__global__ void __launch_bounds__(FusedCfg::THREADS, 1) mtlora_gemm_kernel(GemmParams p, MTEpilogue e) {
  using Cfg = FusedCfg;
  using ML = MTLayout<T, BKMAJ>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN;
  PALORA_SHARED(smem, ML::SMEM);
  unsigned mt, nt;
  grouped_tile(static_cast<unsigned>((p.rows + BM - 1) / BM), static_cast<unsigned>(e.G * e.ntg), blockIdx.x, mt, nt);
  const int g = e.div_ntg.div(static_cast<int>(nt));                 // column tiles never straddle two groups
  const int m0 = static_cast<int>(mt) * BM, n0 = g * e.Mg + (static_cast<int>(nt) - g * e.ntg) * BN;
  gemm_mainloop<T, Cfg, kDense, BKMAJ>(p, smem, m0, n0, 0, 0, 0, false);
  if constexpr (BKMAJ) {   // only the forward (W, A k-contiguous) has the T1 outputs; dgrad is plain
    if (e.mode == 1) {
      mtlora_outputs<T, BKMAJ>(p, e, smem, g, m0, n0);
      return;
    }
  }
  store_tile<T, Cfg>(p, reinterpret_cast<const float*>(smem), ML::Lay::LDC, m0, n0);
}

// One launch; e.G, e.Mg, e.mode set by the caller (plain: G = 1, Mg = cols).
template <class T, bool BKMAJ>
const char* launch_mtlora_gemm(GemmParams p, MTEpilogue e, void* stream) {
  if (p.rows == 0 || p.cols == 0) return nullptr;
  set_vec_paths<T, kDense, BKMAJ>(p);
  p.div_hw = FastDiv(1);
  p.z_sp = 0;
  e.ntg = static_cast<int>(cdiv(e.Mg, FusedCfg::BN));
  e.div_ntg = FastDiv(e.ntg);
  const int64_t blocks = cdiv(p.rows, FusedCfg::BM) * e.G * e.ntg;
  if (blocks > 0x7fffffff) return "mtlora: more than 2^31 - 1 tiles";
  PALORA_LAUNCH(dim3(static_cast<unsigned>(blocks)), dim3(FusedCfg::THREADS), 0, stream,
                mtlora_gemm_kernel<T, BKMAJ>)(p, e);
  return PALORA_LAST_ERROR();
}

template <class T, bool BKMAJ>
const char* launch_mtlora_plain(const GemmParams& p, void* stream) {
  MTEpilogue e{};
  e.mode = 0; e.G = 1; e.Mg = p.cols;
  return launch_mtlora_gemm<T, BKMAJ>(p, e, stream);
}

inline const char* check_mtlora_dropout(const char* op, double p, int64_t seed, int64_t offset, bool work_needed,
                                        const void* work) {
  if (!(p >= 0.0 && p < 1.0)) return arg_error(std::string(op) + ": p: expected a probability in [0, 1), got " + std::to_string(p));
  if (seed < 0 || offset < 0) return arg_error(std::string(op) + ": seed, offset: expected >= 0");
  if (p > 0.0 && work_needed && !work) return arg_error(std::string(op) + ": work: expected a workspace for dropout (p > 0), got null");
  return nullptr;
}

// Checks shared by both ops; fills offs (T1 + 1) and R.
inline const char* check_mtlora_common(const char* op, int64_t dtype, int64_t N, int64_t K, int64_t M, int64_t G,
                                       int64_t T1, int64_t n_xs, const int64_t* ranks, int* offs, int64_t& R) {
  auto s = [](int64_t v) { return std::to_string(v); };
  const std::string o(op);
  if (dtype < kFloat32 || dtype > kBFloat16) return arg_error(o + ": dtype: expected 0 (fp32), 1 (fp16) or 2 (bf16), got " + s(dtype));
  if (N < 0 || K < 0 || M < 0) return arg_error(o + ": x/weight: negative size");
  if (G < 1 || M % G != 0) return arg_error(o + ": G: expected >= 1 dividing M = " + s(M) + ", got " + s(G));
  if (T1 < 1 || T1 > kMTLoraMaxAdapters)
    return arg_error(o + ": T1: expected 1 .. " + s(kMTLoraMaxAdapters) + " adapters, got " + s(T1));
  if (n_xs != 0 && n_xs != T1 - 1) return arg_error(o + ": n_xs: expected 0 or T = " + s(T1 - 1) + ", got " + s(n_xs));
  R = 0;
  offs[0] = 0;
  for (int64_t a = 0; a < T1; ++a) {
    if (ranks[a] < 0) return arg_error(o + ": ranks[" + s(a) + "]: expected >= 0, got " + s(ranks[a]));
    R += ranks[a];
    if (R > 0x7fffffff) return arg_error(o + ": ranks: sum too large");
    offs[a + 1] = static_cast<int>(R);
  }
  for (auto [what, v] : {std::pair<const char*, int64_t>{"N", N}, {"K", K}, {"M", M}, {"G * R", G * R}})
    if (const char* e = check_int32(op, what, v)) return e;
  return nullptr;
}

template <class T>
const char* mtlora_mm_typed(const MTLoraMMArgs& a, void* stream) {
  int offs[kMTLoraMaxAdapters + 1];
  int64_t R = 0;
  if (const char* err = check_mtlora_common("mtlora_mm", a.dtype, a.N, a.K, a.M, a.G, a.T1, a.n_xs, a.ranks, offs, R)) return err;
  if (a.N > 0 && (!a.x || !a.weight || !a.A || !a.B || !a.scales || !a.y || !a.h || (a.n_xs && !a.xs)))
    return "mtlora_mm: x, weight, A, B, scales, y, h (and xs with task inputs) must not be null";
  if (const char* err = check_mtlora_dropout("mtlora_mm", a.p, a.seed, a.offset, a.N > 0 && a.K > 0, a.work)) return err;
  const int Mg = static_cast<int>(a.M / a.G);
  GemmParams base{};
  base.rows = static_cast<int>(a.N);
  base.K = static_cast<int>(a.K);
  // 1. H = x_a A^T into H's columns [col0, col0 + ncols): the B operand is A's rows, k-contiguous
  auto shrink = [&](const void* x, int64_t sxn, int64_t sxk, int64_t col0, int64_t ncols) -> const char* {
    GemmParams s = base;
    s.a = x; s.a_sm = sxn; s.a_sk = sxk;
    s.b = static_cast<const T*>(a.A) + col0 * a.stride_ar; s.b_sk = a.stride_ak; s.b_sc = a.stride_ar;
    s.cols = static_cast<int>(ncols);
    s.z = static_cast<T*>(a.h) + col0; s.z_sn = a.stride_hn; s.z_sc = 1;
    return launch_mtlora_plain<T, true>(s, stream);
  };
  const bool drop = a.p > 0.0;
  if (a.n_xs == 0 && !drop) {   // every adapter reads x: one GEMM over all of A
    if (const char* err = shrink(a.x, a.stride_xn, a.stride_xk, 0, a.G * R)) return err;
  } else {
    for (int64_t g = 0; g < a.G; ++g) {
      // the adapters of group g that read x: all (no task inputs) or the shared one; dropout: its own mask
      const void* xg = a.x;
      int64_t sn = a.stride_xn, sk = a.stride_xk;
      if (drop) {
        xg = static_cast<T*>(a.work) + g * a.N * a.K;
        sn = a.K; sk = 1;
        if (const char* err = launch_mtlora_dropout<T>(a.x, a.stride_xn, a.stride_xk, const_cast<void*>(xg), a.N, a.K,
                                                       a.seed, a.offset + g * a.N * a.K, a.p, false, stream)) return err;
      }
      if (const char* err = shrink(xg, sn, sk, g * R, a.n_xs ? offs[1] : R)) return err;
      for (int64_t t = 1; t < a.T1 && a.n_xs; ++t)
        if (const char* err = shrink(a.xs[t - 1], a.stride_xsn, a.stride_xsk, g * R + offs[t], offs[t + 1] - offs[t])) return err;
    }
  }
  // 2. the T1 outputs: x W^T (the K loop), then base + bias + each adapter's expand (the epilogue)
  GemmParams f = base;
  f.a = a.x; f.a_sm = a.stride_xn; f.a_sk = a.stride_xk;
  f.b = a.weight; f.b_sk = a.stride_wk; f.b_sc = a.stride_wm; f.cols = static_cast<int>(a.M);
  f.bias = a.bias; f.bias_s = a.stride_bias;
  MTEpilogue e{};
  e.mode = 1; e.G = static_cast<int>(a.G); e.Mg = Mg; e.R = static_cast<int>(R); e.T1 = static_cast<int>(a.T1);
  e.s2t = a.s2t ? 1 : 0;
  for (int64_t i = 0; i <= a.T1; ++i) e.offs[i] = offs[i];
  e.h = a.h; e.h_sn = a.stride_hn; e.b = a.B; e.b_sm = a.stride_bm; e.b_sr = a.stride_br; e.scales = a.scales;
  e.y = a.y; e.y_so = a.stride_yo; e.y_sn = a.stride_yn; e.y_sm = a.stride_ym;
  return launch_mtlora_gemm<T, true>(f, e, stream);
}

template <class T>
const char* mtlora_mm_dgrad_typed(const MTLoraDgradArgs& a, void* stream) {
  int offs[kMTLoraMaxAdapters + 1];
  int64_t R = 0;
  if (const char* err = check_mtlora_common("mtlora_mm_dgrad", a.dtype, a.N, a.K, a.M, a.G, a.T1, a.n_xs, a.ranks, offs, R))
    return err;
  if (a.N > 0 && (!a.dys || !a.weight || !a.A || !a.B || !a.col_scales || !a.dg))
    return "mtlora_mm_dgrad: dys, weight, A, B, col_scales and dg must not be null";
  if (a.N > 0 && (a.s2t || a.need_x) && !a.dbase) return "mtlora_mm_dgrad: dbase: expected sum_o dY_o (dX or s2t needs it), got null";
  if (a.N > 0 && a.need_x && (!a.dx || (a.n_xs && !a.dxs))) return "mtlora_mm_dgrad: need_x: dx (and dxs) must not be null";
  if (const char* err = check_mtlora_dropout("mtlora_mm_dgrad", a.p, a.seed, a.offset, a.N > 0 && a.K > 0 && a.need_x, a.work))
    return err;
  const int64_t Mg = a.M / a.G, GR = a.G * R;
  GemmParams base{};
  base.rows = static_cast<int>(a.N);
  // 1. dG[:, g, a] = dYsum_a[:, g] B[g, a]: K runs over the group's Mg columns; B's rows are r-contiguous
  for (int64_t g = 0; g < a.G; ++g)
    for (int64_t t = 0; t < a.T1; ++t) {
      if (offs[t + 1] == offs[t]) continue;
      const void* dsum = t == 0 ? (a.s2t ? a.dbase : a.dys[0]) : a.dys[t];
      GemmParams s = base;
      s.a = static_cast<const T*>(dsum) + g * Mg * a.stride_dym; s.a_sm = a.stride_dyn; s.a_sk = a.stride_dym;
      s.K = static_cast<int>(Mg);
      s.b = static_cast<const T*>(a.B) + g * Mg * a.stride_bm + offs[t] * a.stride_br; s.b_sk = a.stride_bm; s.b_sc = a.stride_br;
      s.cols = offs[t + 1] - offs[t];
      s.z = static_cast<T*>(a.dg) + g * R + offs[t]; s.z_sn = a.stride_gn; s.z_sc = 1;
      if (const char* err = launch_mtlora_plain<T, false>(s, stream)) return err;
    }
  if (!a.need_x) return nullptr;
  // 2. dX = dBase W + (dG * col_scales[0]) A: lora_gemm's expand phase with a per-column scale row
  //    (P = 1, rank 1: S(m, j) = pref[j]), W and A n-contiguous
  GemmParams f = base;
  f.b = a.weight; f.b_sk = a.stride_wm; f.b_sc = a.stride_wk; f.cols = static_cast<int>(a.K);
  f.h_sn = a.stride_gn; f.h_sp = 0; f.h_sc = 1; f.up_sr = a.stride_ar; f.up_sc = a.stride_ak;
  f.P = 1; f.div_rank = FastDiv(1); f.div_rps = FastDiv(1); f.pref_sp = 0; f.pref_st = 1; f.scale = 1.f;
  f.z_sn = a.stride_dxn; f.z_sc = 1;
  GemmParams d = f;
  d.a = a.dbase; d.a_sm = a.stride_dyn; d.a_sk = a.stride_dym; d.K = static_cast<int>(a.M);
  d.R = a.p > 0.0 ? 0 : static_cast<int>(GR); d.h = a.dg; d.up = a.A; d.pref = a.col_scales; d.z = a.dx;
  if (const char* err = launch_mtlora_plain<T, false>(d, stream)) return err;
  // 2b. dropout: dX += drop_g((dG s)_g A_g) per group, the x-reading columns of group g through the
  //     workspace (expand phase alone, K = 0), then the mask regenerated as it is added
  for (int64_t g = 0; g < a.G && a.p > 0.0; ++g) {
    const int64_t c = a.n_xs ? offs[1] : R;
    if (c == 0) continue;
    GemmParams w = f;
    w.K = 0;
    w.R = static_cast<int>(c); w.h = static_cast<const T*>(a.dg) + g * R;
    w.up = static_cast<const T*>(a.A) + g * R * a.stride_ar; w.pref = a.col_scales + g * R;
    w.z = a.work; w.z_sn = a.K;
    if (const char* err = launch_mtlora_plain<T, false>(w, stream)) return err;
    if (const char* err = launch_mtlora_dropout<T>(a.work, a.K, 1, a.dx, a.N, a.K, a.seed, a.offset + g * a.N * a.K, a.p,
                                                   true, stream)) return err;
  }
  // 3. dX_t = (dG * col_scales[t]) A over the window of H columns from group 0's task t to group G-1's
  //    (the other columns inside it have scale 0); no phase 1 (K = 0)
  for (int64_t t = 1; t <= a.n_xs; ++t) {
    const int64_t lo = offs[t], hi = (a.G - 1) * R + offs[t + 1];
    GemmParams x = f;
    x.K = 0;
    x.R = static_cast<int>(hi - lo); x.h = static_cast<const T*>(a.dg) + lo;
    x.up = static_cast<const T*>(a.A) + lo * a.stride_ar; x.pref = a.col_scales + t * GR + lo;
    x.z = static_cast<T*>(a.dxs) + (t - 1) * a.stride_dxso; x.z_sn = a.stride_dxsn;
    if (const char* err = launch_mtlora_plain<T, false>(x, stream)) return err;
  }
  return nullptr;
}

inline const char* mtlora_mm_dispatch(const MTLoraMMArgs& a, void* stream) {
  switch (a.dtype) {
    case kFloat16: return mtlora_mm_typed<__half>(a, stream);
    case kBFloat16: return mtlora_mm_typed<__nv_bfloat16>(a, stream);
    default: return mtlora_mm_typed<float>(a, stream);
  }
}

inline const char* mtlora_mm_dgrad_dispatch(const MTLoraDgradArgs& a, void* stream) {
  switch (a.dtype) {
    case kFloat16: return mtlora_mm_dgrad_typed<__half>(a, stream);
    case kBFloat16: return mtlora_mm_dgrad_typed<__nv_bfloat16>(a, stream);
    default: return mtlora_mm_dgrad_typed<float>(a, stream);
  }
}

}  // namespace palora
