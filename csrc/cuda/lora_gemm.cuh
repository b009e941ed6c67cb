// The one tiled GEMM behind both ops (a kernel of this file is either the fused kernel or the
// skinny shrink kernel, by its tile config):
//
//   z[row(m), c] = sum_k A(m, k) B(k, c)                               phase 1, k < K
//                        + sum_j (H(m, j) * S(m, j)) Up(j, c)          phase 2 ("expand"), j < R
//                        + bias[c]
//
// A is x (N, K) with strides (linear) or the im2col view of x (N, C, H, W) (conv, never
// materialised); H is read back from the buffer the shrink launch wrote before.
// Phase 2 is just R more steps of the K loop, so the expand costs no (N, out) temporary and
// no second pass over the output. Runtime shapes everywhere; masks on every load and store.
// fp32 accumulation. fp16/bf16 tiles use WMMA m16n16k16 on sm_80+; fp32 uses SIMT FMAs
// (TF32 tensor cores would miss the 1e-5 fp32 tolerance).
#pragma once
#include "cuda/common.cuh"

namespace palora {

struct GemmParams {
  // phase 1 A operand (rows, K): dense x, or im2col of x (N, C, H, W)
  const void* a;
  int64_t a_sm, a_sk;                                    // dense strides
  int64_t C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Wo;   // im2col geometry
  int64_t sxn, sxc, sxh, sxw;                            // im2col strides of x
  int64_t rows, K, cols;
  // B operand (K, cols) and bias (cols,)
  const void* b;
  int64_t b_sk, b_sc;
  const void* bias;
  int64_t bias_s;
  // phase 2: H (rows, R), element (m, j) at (m / z_hw) * h_sn + (m % z_hw) * h_sp + j * h_sc;
  // up (R, cols); S(m, j) = scale * pref[m / rows_per_sample (0 when P == 1), j / rank]
  const void* h;
  int64_t R, h_sn, h_sp, h_sc;
  const void* up;
  int64_t up_sr, up_sc;
  const float* pref;
  int64_t P, rank, rows_per_sample, pref_sp, pref_st;
  float scale;
  // output z: element (m, c) at (m / z_hw) * z_sn + (m % z_hw) * z_sp + c * z_sc
  void* z;
  int64_t z_hw, z_sn, z_sp, z_sc;
};

// Fused kernel: a square tile for the (rows, out) output, 4 warps of 32x32.
struct FusedCfg {
  static constexpr int BM = 64, BN = 64, BK = 32, TM = 8, TN = 4, WARPS_M = 2, WARPS_N = 2, THREADS = 128;
  static constexpr const char* name = "fused";
};
// Skinny shrink kernel: a tall tile for H (rows, R), R = T*r is small (<= 32 in one column tile).
struct ShrinkCfg {
  static constexpr int BM = 128, BN = 32, BK = 32, TM = 8, TN = 4, WARPS_M = 4, WARPS_N = 1, THREADS = 128;
  static constexpr const char* name = "shrink";
};

template <class Cfg, class T>
struct Tile {
  static constexpr int LDA = Cfg::BK + 8;  // +8 elements: WMMA needs ldm % 16 bytes and 32-byte rows
  static constexpr int LDB = Cfg::BN + 8;
  static constexpr int LDC = Cfg::BN + 4;  // fp32 epilogue tile
  static constexpr int AB_BYTES = (Cfg::BM * LDA + Cfg::BK * LDB) * int(sizeof(T));
  static constexpr int C_BYTES = Cfg::BM * LDC * 4;
  static constexpr int SMEM = AB_BYTES > C_BYTES ? AB_BYTES : C_BYTES;  // C aliases A/B after the loop
  static_assert((Cfg::BM / Cfg::TM) * (Cfg::BN / Cfg::TN) == Cfg::THREADS, "SIMT micro-tiles cover the tile");
  static_assert(Cfg::WARPS_M * Cfg::WARPS_N * 32 == Cfg::THREADS, "warps cover the block");
  static_assert(Cfg::BM % (16 * Cfg::WARPS_M) == 0 && Cfg::BN % (16 * Cfg::WARPS_N) == 0, "WMMA tiles");
  static_assert(SMEM <= 48 * 1024, "static shared memory limit");
};

template <class T, class Cfg, bool IM2COL>
__global__ void __launch_bounds__(Cfg::THREADS) lora_gemm_kernel(GemmParams p) {
  using Lay = Tile<Cfg, T>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK;
  constexpr int LDA = Lay::LDA, LDB = Lay::LDB, LDC = Lay::LDC;
  PALORA_SHARED(smem, Lay::SMEM);
  T* As = reinterpret_cast<T*>(smem);                   // (BM, LDA)
  T* Bs = As + BM * LDA;                                 // (BK, LDB)
  float* Cs = reinterpret_cast<float*>(smem);            // (BM, LDC), after the K loop
  const int tid = threadIdx.x;

  // grouped ordering (GROUP_M = 8 row tiles share their B column tiles in L2)
  const int64_t num_m = cdiv(p.rows, BM), num_n = cdiv(p.cols, BN);
  const int64_t pid = static_cast<int64_t>(blockIdx.x);
  const int64_t group = 8 * num_n, first_m = (pid / group) * 8;
  const int64_t gsize = (num_m - first_m) < 8 ? (num_m - first_m) : 8;
  const int64_t m0 = (first_m + (pid % group) % gsize) * BM;
  const int64_t n0 = ((pid % group) / gsize) * BN;

  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T* up = static_cast<const T*>(p.up);
  const T* hr = static_cast<const T*>(p.h);
  const int64_t HoWo = p.z_hw;
  // coalescing: the thread index runs along whichever dimension is contiguous in memory
  const bool a_kfast = IM2COL ? false : p.a_sk == 1;
  const bool h_kfast = p.h_sc == 1;
  const bool b_nfast = p.b_sc == 1;
  const bool u_nfast = p.up_sc == 1;

  constexpr bool kWmma = PALORA_WMMA_ARCH && Num<T>::is16;
  constexpr int FM = BM / (16 * Cfg::WARPS_M), FN = BN / (16 * Cfg::WARPS_N);
  constexpr int TM = Cfg::TM, TN = Cfg::TN;
  // SIMT accumulators (fp32) -- unused by the WMMA path, which the compiler then drops
  float acc[kWmma ? 1 : TM][kWmma ? 1 : TN];
  for (int i = 0; i < (kWmma ? 1 : TM); ++i)
    for (int j = 0; j < (kWmma ? 1 : TN); ++j) acc[i][j] = 0.f;
#if PALORA_WMMA_ARCH
  using namespace nvcuda;
  using TW = typename std::conditional<Num<T>::is16, T, __half>::type;  // a valid type for the float case
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf[kWmma ? FM : 1][kWmma ? FN : 1];
  if constexpr (kWmma)
    for (int i = 0; i < FM; ++i)
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(cf[i][j], 0.f);
#endif
  const int warp = tid / 32, wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int ty = tid / (BN / TN), tx = tid % (BN / TN);

  const int64_t k_tiles = cdiv(p.K, BK), r_tiles = cdiv(p.R, BK);
  for (int64_t t = 0; t < k_tiles + r_tiles; ++t) {
    const bool expand = t >= k_tiles;
    const int64_t k0 = (expand ? t - k_tiles : t) * BK;
    const int64_t klim = expand ? p.R : p.K;
    // ---- A tile (BM, BK) -> As
    const bool kfast = expand ? h_kfast : a_kfast;
    for (int idx = tid; idx < BM * BK; idx += Cfg::THREADS) {
      const int mm = kfast ? idx / BK : idx % BM;
      const int kk = kfast ? idx % BK : idx / BM;
      const int64_t m = m0 + mm, k = k0 + kk;
      T v = Num<T>::from_f(0.f);
      if (m < p.rows && k < klim) {
        if (expand) {
          const int64_t row = (m / HoWo) * p.h_sn + (m % HoWo) * p.h_sp;
          const int64_t prow = p.P == 1 ? 0 : m / p.rows_per_sample;
          const float s = p.scale * p.pref[prow * p.pref_sp + (k / p.rank) * p.pref_st];
          v = Num<T>::from_f(Num<T>::to_f(hr[row + k * p.h_sc]) * s);
        } else if (IM2COL) {
          const int64_t n = m / HoWo, q = m % HoWo, ho = q / p.Wo, wo = q % p.Wo;
          const int64_t khw = p.kh * p.kw, c = k / khw, r = k % khw, i = r / p.kw, j = r % p.kw;
          const int64_t hi = ho * p.sh - p.ph + i * p.dh, wi = wo * p.sw - p.pw + j * p.dw;
          if (hi >= 0 && hi < p.H && wi >= 0 && wi < p.W) v = a[n * p.sxn + c * p.sxc + hi * p.sxh + wi * p.sxw];
        } else {
          v = a[m * p.a_sm + k * p.a_sk];
        }
      }
      As[mm * LDA + kk] = v;
    }
    // ---- B tile (BK, BN) -> Bs: weight rows, or up rows in the expand phase
    const bool nfast = expand ? u_nfast : b_nfast;
    for (int idx = tid; idx < BK * BN; idx += Cfg::THREADS) {
      const int kk = nfast ? idx / BN : idx % BK;
      const int nn = nfast ? idx % BN : idx / BK;
      const int64_t k = k0 + kk, n = n0 + nn;
      T v = Num<T>::from_f(0.f);
      if (k < klim && n < p.cols) v = expand ? up[k * p.up_sr + n * p.up_sc] : b[k * p.b_sk + n * p.b_sc];
      Bs[kk * LDB + nn] = v;
    }
    PALORA_TILE_BARRIER();
    // ---- multiply the tiles
    if constexpr (kWmma) {
#if PALORA_WMMA_ARCH
      const TW* Aw = reinterpret_cast<const TW*>(As);
      const TW* Bw = reinterpret_cast<const TW*>(Bs);
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, TW, wmma::row_major> af[FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TW, wmma::row_major> bf[FN];
        for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(af[i], Aw + (wm * FM * 16 + i * 16) * LDA + kk, LDA);
        for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(bf[j], Bw + kk * LDB + wn * FN * 16 + j * 16, LDB);
        for (int i = 0; i < FM; ++i)
          for (int j = 0; j < FN; ++j) wmma::mma_sync(cf[i][j], af[i], bf[j], cf[i][j]);
      }
#endif
    } else {
      for (int kk = 0; kk < BK; ++kk) {
        float av[TM], bv[TN];
        for (int i = 0; i < TM; ++i) av[i] = Num<T>::to_f(As[(ty * TM + i) * LDA + kk]);
        for (int j = 0; j < TN; ++j) bv[j] = Num<T>::to_f(Bs[kk * LDB + tx * TN + j]);
        for (int i = 0; i < TM; ++i)
          for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    PALORA_TILE_BARRIER();  // the next tile overwrites As/Bs; the epilogue overwrites them with Cs
  }

  // ---- epilogue: accumulators -> Cs (fp32) -> + bias -> z, coalesced along z's contiguous dim
  if constexpr (kWmma) {
#if PALORA_WMMA_ARCH
    for (int i = 0; i < FM; ++i)
      for (int j = 0; j < FN; ++j)
        wmma::store_matrix_sync(Cs + (wm * FM * 16 + i * 16) * LDC + wn * FN * 16 + j * 16, cf[i][j], LDC,
                                wmma::mem_row_major);
#endif
  } else {
    for (int i = 0; i < TM; ++i)
      for (int j = 0; j < TN; ++j) Cs[(ty * TM + i) * LDC + tx * TN + j] = acc[i][j];
  }
  __syncthreads();
  T* z = static_cast<T*>(p.z);
  const T* bias = static_cast<const T*>(p.bias);
  const bool cfast = p.z_sc == 1;
  for (int idx = tid; idx < BM * BN; idx += Cfg::THREADS) {
    const int mm = cfast ? idx / BN : idx % BM;
    const int nn = cfast ? idx % BN : idx / BM;
    const int64_t m = m0 + mm, n = n0 + nn;
    if (m >= p.rows || n >= p.cols) continue;
    float v = Cs[mm * LDC + nn];
    if (bias) v += Num<T>::to_f(bias[n * p.bias_s]);
    z[(m / HoWo) * p.z_sn + (m % HoWo) * p.z_sp + n * p.z_sc] = Num<T>::from_f(v);
  }
}

template <class T, class Cfg, bool IM2COL>
const char* launch_gemm(const GemmParams& p, void* stream) {
  if (p.rows == 0 || p.cols == 0) return nullptr;
  const int64_t blocks = cdiv(p.rows, Cfg::BM) * cdiv(p.cols, Cfg::BN);
  if (blocks > 0x7fffffff) return "lora_gemm: more than 2^31 - 1 tiles";
  PALORA_LAUNCH(dim3(static_cast<unsigned>(blocks)), dim3(Cfg::THREADS), 0, stream,
                lora_gemm_kernel<T, Cfg, IM2COL>)(p);
  return PALORA_LAST_ERROR();
}

}  // namespace palora
