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
// fp32 accumulation. fp16/bf16 tiles use WMMA m16n16k16 on sm_80+ (fragments loaded from shared
// memory: LDSM); fp32 uses SIMT FMAs (TF32 tensor cores would miss the 1e-5 fp32 tolerance).
//
// Memory pipeline: two shared-memory stages. Tile t+1 is fetched while tile t is multiplied:
//   * dense operands whose contiguous dimension runs along the tile's smem rows, with 16-byte
//     aligned base and row stride (checked at launch, GemmParams::a_vec / b_vec), are fetched
//     with 16-byte cp.async (LDGSTS.128), masked edges zero-filled by the copy's src-size;
//   * every other operand (strided views, the im2col gather, H*S of the expand phase) is loaded
//     element by element into registers and stored to the stage (the scalar path).
// B (weight rows, or up rows in the expand phase) is kept in shared memory in the orientation of
// its contiguous global dimension (template BKMAJ: (BN, BK) k-contiguous, else (BK, BN)), so the
// fast path covers both W^T (forward) and W (dX).
// Index math: tile-local indices are 32-bit; every division by a runtime value (the im2col
// decomposition, rows -> image, k -> task) is a FastDiv multiply-shift. rows, K, R and cols are
// below 2^31 (checked at launch); memory offsets are 64-bit products.
#pragma once
#include "cuda/common.cuh"

namespace palora {

// How the A operand is read (template G of the kernel):
//   kDense   A(m, k) = a[m * a_sm + k * a_sk]
//   kIm2col  A(m, k) = x[n, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw], m = (n, ho, wo), k = (c, i, j):
//            the forward conv (and, 1x1, dG = B_cat^T dY per pixel)
//   kDgrad   the transposed gather of the conv's data gradient: m = (n, hi, wi) a pixel of dX,
//            k = (o, i, j), A(m, k) = dZ[n, o, ho, wo] where hi = ho*sh - ph + i*dh (and the same
//            for w) has an integer solution inside dZ, else 0; dZ = dY (phase 1, o < C_out) or
//            dG * S (phase 2, o < R). B(k, c) = Wcat[o, c, i, j]: W (phase 1) or A_cat (phase 2).
enum Gather : int { kDense = 0, kIm2col = 1, kDgrad = 2 };

struct GemmParams {
  // phase 1 A operand (rows, K): dense x, or im2col of x (N, C, H, W)
  const void* a;
  int64_t a_sm, a_sk;                                    // dense strides
  int H, W, kh, kw, sh, sw, ph, pw, dh, dw;              // geometry of the gathered tensor (x; dZ for kDgrad)
  FastDiv div_khw, div_kw, div_Wo;                       // k -> (c, i, j), pixel q -> (row, col) of z's grid
  FastDiv div_sh, div_sw;                                // kDgrad: ho = (hi + ph - i*dh) / sh, exact
  int64_t sxn, sxc, sxh, sxw;                            // im2col strides of x
  int rows, K, cols;
  // B operand (K, cols) and bias (cols,)
  const void* b;
  int64_t b_sk, b_sc;
  const void* bias;
  int64_t bias_s;
  // phase 2: H (rows, R), element (m, j) at (m / z_hw) * h_sn + (m % z_hw) * h_sp + j * h_sc;
  // up (R, cols); S(m, j) = scale * pref[m / rows_per_sample (0 when P == 1), j / rank]
  const void* h;
  int R;
  int64_t h_sn, h_sp, h_sc;
  const void* up;
  int64_t up_sr, up_sc;
  const float* pref;
  int P;
  FastDiv div_rank, div_rps;
  int64_t pref_sp, pref_st;
  float scale;
  // output z: element (m, c) at (m / z_hw) * z_sn + (m % z_hw) * z_sp + c * z_sc
  void* z;
  FastDiv div_hw;
  int64_t z_sn, z_sp, z_sc;
  // set by launch_gemm: 16-byte cp.async for A (phase 1), B (phase 1), up (phase 2)
  bool a_vec, b_vec, up_vec;
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

template <class Cfg, class T, bool BKMAJ>
struct Tile {
  static constexpr int VEC = 16 / int(sizeof(T));     // elements per 16-byte copy
  // row padding: 16 bytes keep cp.async/ldmatrix rows aligned; 16-bit tiles pad 8 elements (WMMA:
  // ldm % 8 elements, 256-bit aligned fragment pointers), fp32 tiles 4 (static smem <= 48 KiB)
  static constexpr int PAD = Num<T>::is16 ? 8 : 4;
  static constexpr int LDA = Cfg::BK + PAD;           // As (BM, LDA)
  static constexpr int LDB = BKMAJ ? Cfg::BK + PAD : Cfg::BN + PAD;  // Bs (BN, LDB) or (BK, LDB)
  static constexpr int B_ELEMS = (BKMAJ ? Cfg::BN : Cfg::BK) * LDB;
  static constexpr int LDC = Cfg::BN + 4;             // fp32 epilogue tile
  static constexpr int STAGE = Cfg::BM * LDA + B_ELEMS;  // elements of one stage (A then B)
  static constexpr int AB_BYTES = 2 * STAGE * int(sizeof(T));
  static constexpr int C_BYTES = Cfg::BM * LDC * 4;
  static constexpr int SMEM = AB_BYTES > C_BYTES ? AB_BYTES : C_BYTES;  // C aliases the stages after the loop
  static_assert((Cfg::BM / Cfg::TM) * (Cfg::BN / Cfg::TN) == Cfg::THREADS, "SIMT micro-tiles cover the tile");
  static_assert(Cfg::WARPS_M * Cfg::WARPS_N * 32 == Cfg::THREADS, "warps cover the block");
  static_assert(Cfg::BM % (16 * Cfg::WARPS_M) == 0 && Cfg::BN % (16 * Cfg::WARPS_N) == 0, "WMMA tiles");
  static_assert(Cfg::BK % VEC == 0 && Cfg::BN % VEC == 0, "16-byte chunks tile the rows");
  static_assert((Cfg::BM * LDA * int(sizeof(T))) % 32 == 0 && (STAGE * int(sizeof(T))) % 32 == 0, "stage alignment");
  static_assert(Cfg::THREADS % Cfg::BM == 0, "each thread gathers one row of the im2col tile");
  static_assert(SMEM <= 48 * 1024, "static shared memory limit");
};

// One K step of the pipeline: fetch tile t (phase 1 if t < k_tiles, else expand) into stage (As, Bs).
template <class T, class Cfg, int G, bool BKMAJ>
__device__ __forceinline__ void load_tile(const GemmParams& p, int t, int k_tiles, int m0, int n0, T* As, T* Bs,
                                          int g_n, int g_ho, int g_wo, bool g_ok) {
  using Lay = Tile<Cfg, T, BKMAJ>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, V = Lay::VEC, LDA = Lay::LDA, LDB = Lay::LDB;
  const int tid = threadIdx.x;
  const bool expand = t >= k_tiles;
  const int k0 = (expand ? t - k_tiles : t) * BK;
  const int klim = expand ? p.R : p.K;
  // ---- A tile (BM, BK) -> As
  if (G == kDgrad) {
    // transposed gather: this thread owns dX pixel row mm = tid % BM (g_n, g_ho = hi, g_wo = wi)
    const T* src = static_cast<const T*>(expand ? p.h : p.a);
    const int mm = tid % BM;
    const int prow = p.P == 1 ? 0 : g_n;
#pragma unroll 4
    for (int kk = tid / BM; kk < BK; kk += Cfg::THREADS / BM) {
      const int k = k0 + kk;
      T v = Num<T>::from_f(0.f);
      if (g_ok && k < klim) {
        int o, r, i, j;
        p.div_khw.divmod(k, o, r);
        p.div_kw.divmod(r, i, j);
        const int th = g_ho + p.ph - i * p.dh, tw = g_wo + p.pw - j * p.dw;
        if (th >= 0 && tw >= 0) {
          int ho, rh, wo, rw;
          p.div_sh.divmod(th, ho, rh);
          p.div_sw.divmod(tw, wo, rw);
          if (rh == 0 && rw == 0 && ho < p.H && wo < p.W) {
            if (expand) {
              const float s = p.scale * p.pref[prow * p.pref_sp + p.div_rank.div(o) * p.pref_st];
              v = Num<T>::from_f(Num<T>::to_f(src[g_n * p.h_sn + o * p.h_sc + (ho * p.W + wo) * p.h_sp]) * s);
            } else {
              v = src[g_n * p.sxn + o * p.sxc + ho * p.sxh + wo * p.sxw];
            }
          }
        }
      }
      As[mm * LDA + kk] = v;
    }
  } else if (!expand && G == kDense && p.a_vec) {
    const T* a = static_cast<const T*>(p.a);
    for (int idx = tid; idx < BM * (BK / V); idx += Cfg::THREADS) {
      const int mm = idx / (BK / V), kk = (idx % (BK / V)) * V;
      const int m = m0 + mm, k = k0 + kk;
      const bool ok = m < p.rows && k < klim;
      const int n = ok ? (klim - k < V ? klim - k : V) * int(sizeof(T)) : 0;
      cp_async16(As + mm * LDA + kk, ok ? a + m * p.a_sm + k : a, n);
    }
  } else if (!expand && G == kIm2col) {
    // each thread owns row mm = tid % BM (decomposed once per kernel: g_n, g_ho, g_wo) and walks k
    const T* x = static_cast<const T*>(p.a);
    const int mm = tid % BM;
    const int64_t xrow = int64_t(g_n) * p.sxn;
    const int hi0 = g_ho * p.sh - p.ph, wi0 = g_wo * p.sw - p.pw;
#pragma unroll 4  // bounds the gathers in flight: fully unrolled, fp32 fused spilled on sm_90
    for (int kk = tid / BM; kk < BK; kk += Cfg::THREADS / BM) {
      const int k = k0 + kk;
      T v = Num<T>::from_f(0.f);
      if (g_ok && k < klim) {
        int c, r, i, j;
        p.div_khw.divmod(k, c, r);
        p.div_kw.divmod(r, i, j);
        const int hi = hi0 + i * p.dh, wi = wi0 + j * p.dw;
        if (hi >= 0 && hi < p.H && wi >= 0 && wi < p.W) v = x[xrow + c * p.sxc + hi * p.sxh + wi * p.sxw];
      }
      As[mm * LDA + kk] = v;
    }
  } else {
    // scalar path: the thread index runs along whichever dimension is contiguous in memory
    const T* a = static_cast<const T*>(expand ? p.h : p.a);
    const bool kfast = expand ? p.h_sc == 1 : p.a_sk == 1;
    for (int idx = tid; idx < BM * BK; idx += Cfg::THREADS) {
      const int mm = kfast ? idx / BK : idx % BM;
      const int kk = kfast ? idx % BK : idx / BM;
      const int m = m0 + mm, k = k0 + kk;
      T v = Num<T>::from_f(0.f);
      if (m < p.rows && k < klim) {
        if (expand) {
          int img, q;
          p.div_hw.divmod(m, img, q);
          const int prow = p.P == 1 ? 0 : p.div_rps.div(m);
          const float s = p.scale * p.pref[prow * p.pref_sp + p.div_rank.div(k) * p.pref_st];
          v = Num<T>::from_f(Num<T>::to_f(a[img * p.h_sn + q * p.h_sp + k * p.h_sc]) * s);
        } else {
          v = a[m * p.a_sm + k * p.a_sk];
        }
      }
      As[mm * LDA + kk] = v;
    }
  }
  // ---- B tile (BK, BN) -> Bs: weight rows, or up rows in the expand phase
  const T* b = static_cast<const T*>(expand ? p.up : p.b);
  const int64_t bsk = expand ? p.up_sr : p.b_sk, bsc = expand ? p.up_sc : p.b_sc;
  if (G == kDgrad) {
    // B(k = (o, i, j), c) = Wcat[o, c, i, j]: o's row at o * bsk, channel c at c * bsc, tap r = k % khw
    for (int idx = tid; idx < BK * BN; idx += Cfg::THREADS) {
      const int kk = idx % BK, nn = idx / BK;
      const int k = k0 + kk, n = n0 + nn;
      T v = Num<T>::from_f(0.f);
      if (k < klim && n < p.cols) {
        int o, r;
        p.div_khw.divmod(k, o, r);
        v = b[o * bsk + n * bsc + r];
      }
      Bs[BKMAJ ? nn * LDB + kk : kk * LDB + nn] = v;
    }
  } else if (expand ? p.up_vec : p.b_vec) {
    if (BKMAJ) {  // k contiguous: Bs (BN, LDB)
      for (int idx = tid; idx < BN * (BK / V); idx += Cfg::THREADS) {
        const int nn = idx / (BK / V), kk = (idx % (BK / V)) * V;
        const int n = n0 + nn, k = k0 + kk;
        const bool ok = n < p.cols && k < klim;
        const int nb = ok ? (klim - k < V ? klim - k : V) * int(sizeof(T)) : 0;
        cp_async16(Bs + nn * LDB + kk, ok ? b + n * bsc + k : b, nb);
      }
    } else {      // n contiguous: Bs (BK, LDB)
      for (int idx = tid; idx < BK * (BN / V); idx += Cfg::THREADS) {
        const int kk = idx / (BN / V), nn = (idx % (BN / V)) * V;
        const int n = n0 + nn, k = k0 + kk;
        const bool ok = n < p.cols && k < klim;
        const int nb = ok ? (p.cols - n < V ? p.cols - n : V) * int(sizeof(T)) : 0;
        cp_async16(Bs + kk * LDB + nn, ok ? b + k * bsk + n : b, nb);
      }
    }
  } else {
    const bool nfast = bsc == 1;
    for (int idx = tid; idx < BK * BN; idx += Cfg::THREADS) {
      const int kk = nfast ? idx / BN : idx % BK;
      const int nn = nfast ? idx % BN : idx / BK;
      const int k = k0 + kk, n = n0 + nn;
      T v = Num<T>::from_f(0.f);
      if (k < klim && n < p.cols) v = b[k * bsk + n * bsc];
      Bs[BKMAJ ? nn * LDB + kk : kk * LDB + nn] = v;
    }
  }
}

#if PALORA_WMMA_ARCH
// wmma::load_matrix_sync from shared memory. nvcc lowers the fp16 load to LDSM, but its bf16
// builtin takes a generic address and becomes eight generic LD.E; the same wmma.load with the
// .shared state space and a shared-window address gives LDSM for bf16 too. (The emulator models
// fragments itself: its load_matrix_sync is used there.)
template <class Use, class TW, class L>
__device__ __forceinline__ void load_frag(nvcuda::wmma::fragment<Use, 16, 16, 16, TW, L>& f, const TW* ptr, unsigned ldm) {
#if !defined(PALORA_EMU)
  if constexpr (std::is_same<TW, __nv_bfloat16>::value) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(ptr));
    unsigned* r = reinterpret_cast<unsigned*>(&f);  // 8 bf16 = 4 .b32 registers (PTX ISA, wmma .bf16)
    static_assert(sizeof(f) == 16, "bf16 m16n16k16 fragment: 4 registers");
    constexpr bool kA = std::is_same<Use, nvcuda::wmma::matrix_a>::value;
    constexpr bool kRow = std::is_same<L, nvcuda::wmma::row_major>::value;
    if constexpr (kA && kRow)
      asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s), "r"(ldm));
    else if constexpr (!kA && kRow)
      asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s), "r"(ldm));
    else if constexpr (!kA && !kRow)
      asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s), "r"(ldm));
    else  // A col_major: the conv's weight gradient keeps its A tile channel-contiguous
      asm volatile("wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s), "r"(ldm));
    return;
  }
#endif
  nvcuda::wmma::load_matrix_sync(f, ptr, ldm);
}
#endif

// Grouped tile order (GROUP_M = 8 row tiles share their B column tiles in L2): block pid of a
// num_m x num_n grid -> (row tile, column tile). 32-bit, once per block.
__device__ __forceinline__ void grouped_tile(unsigned num_m, unsigned num_n, unsigned pid, unsigned& mt, unsigned& nt) {
  const unsigned group = 8u * num_n, first_m = (pid / group) * 8u;
  const unsigned gsize = (num_m - first_m) < 8u ? (num_m - first_m) : 8u;
  mt = first_m + (pid % group) % gsize;
  nt = (pid % group) / gsize;
}

// The K loop of one (BM, BN) tile at (m0, n0): phase 1 then the expand, two cp.async stages, and the
// fp32 accumulators stored to Cs = smem as (BM, Lay::LDC) floats, followed by a barrier. smem holds
// Tile<Cfg, T, BKMAJ>::SMEM bytes. Shared by lora_gemm_kernel and the MTLoRA kernel (mtlora_mm.cuh),
// which differ only in their epilogues.
template <class T, class Cfg, int G, bool BKMAJ>
__device__ __forceinline__ void gemm_mainloop(const GemmParams& p, unsigned char* smem, int m0, int n0, int g_n,
                                              int g_ho, int g_wo, bool g_ok) {
  using Lay = Tile<Cfg, T, BKMAJ>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK;
  constexpr int LDA = Lay::LDA, LDB = Lay::LDB, LDC = Lay::LDC, STAGE = Lay::STAGE;
  T* stage0 = reinterpret_cast<T*>(smem);                // stage s: As = stage0 + s*STAGE, Bs = As + BM*LDA
  float* Cs = reinterpret_cast<float*>(smem);            // (BM, LDC), after the K loop
  const int tid = threadIdx.x;

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
  using BLayout = typename std::conditional<BKMAJ, wmma::col_major, wmma::row_major>::type;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf[kWmma ? FM : 1][kWmma ? FN : 1];
  if constexpr (kWmma)
    for (int i = 0; i < FM; ++i)
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(cf[i][j], 0.f);
#endif
  const int warp = tid / 32, wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int ty = tid / (BN / TN), tx = tid % (BN / TN);

  const int k_tiles = (p.K + BK - 1) / BK, tiles = k_tiles + (p.R + BK - 1) / BK;
  if (tiles > 0) load_tile<T, Cfg, G, BKMAJ>(p, 0, k_tiles, m0, n0, stage0, stage0 + BM * LDA, g_n, g_ho, g_wo, g_ok);
  cp_async_commit();
  for (int t = 0; t < tiles; ++t) {
    // prefetch tile t+1 into the other stage (last read in iteration t-1, before its trailing barrier)
    if (t + 1 < tiles) {
      T* An = stage0 + ((t + 1) & 1) * STAGE;
      load_tile<T, Cfg, G, BKMAJ>(p, t + 1, k_tiles, m0, n0, An, An + BM * LDA, g_n, g_ho, g_wo, g_ok);
    }
    cp_async_commit();
    cp_async_wait<1>();  // every group but the newest (tile t+1) has landed: tile t is in its stage
    PALORA_TILE_BARRIER();
    const T* As = stage0 + (t & 1) * STAGE;
    const T* Bs = As + BM * LDA;
    // ---- multiply the tiles
    if constexpr (kWmma) {
#if PALORA_WMMA_ARCH
      const TW* Aw = reinterpret_cast<const TW*>(As);
      const TW* Bw = reinterpret_cast<const TW*>(Bs);
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, TW, wmma::row_major> af[FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TW, BLayout> bf[FN];
        for (int i = 0; i < FM; ++i) load_frag(af[i], Aw + (wm * FM * 16 + i * 16) * LDA + kk, LDA);
        for (int j = 0; j < FN; ++j) {
          const int col = wn * FN * 16 + j * 16;
          load_frag(bf[j], BKMAJ ? Bw + col * LDB + kk : Bw + kk * LDB + col, LDB);
        }
        for (int i = 0; i < FM; ++i)
          for (int j = 0; j < FN; ++j) wmma::mma_sync(cf[i][j], af[i], bf[j], cf[i][j]);
      }
#endif
    } else {
      for (int kk = 0; kk < BK; ++kk) {
        float av[TM], bv[TN];
        for (int i = 0; i < TM; ++i) av[i] = Num<T>::to_f(As[(ty * TM + i) * LDA + kk]);
        for (int j = 0; j < TN; ++j)
          bv[j] = Num<T>::to_f(BKMAJ ? Bs[(tx * TN + j) * LDB + kk] : Bs[kk * LDB + tx * TN + j]);
        for (int i = 0; i < TM; ++i)
          for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    PALORA_TILE_BARRIER();  // the next prefetch overwrites this stage; the epilogue overwrites both with Cs
  }
  cp_async_wait<0>();  // only empty groups can be pending here; nothing may land on Cs

  // ---- accumulators -> Cs (fp32); the caller's epilogue reads them after the barrier
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
}

// The plain epilogue: Cs (fp32) + bias -> z, coalesced along z's contiguous dim.
template <class T, class Cfg>
__device__ __forceinline__ void store_tile(const GemmParams& p, const float* Cs, int ldc, int m0, int n0) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN;
  const int tid = threadIdx.x;
  T* z = static_cast<T*>(p.z);
  const T* bias = static_cast<const T*>(p.bias);
  const bool cfast = p.z_sc == 1;
  for (int idx = tid; idx < BM * BN; idx += Cfg::THREADS) {
    const int mm = cfast ? idx / BN : idx % BM;
    const int nn = cfast ? idx % BN : idx / BM;
    const int m = m0 + mm, n = n0 + nn;
    if (m >= p.rows || n >= p.cols) continue;
    float v = Cs[mm * ldc + nn];
    if (bias) v += Num<T>::to_f(bias[n * p.bias_s]);
    int img, q;
    p.div_hw.divmod(m, img, q);
    z[img * p.z_sn + q * p.z_sp + n * p.z_sc] = Num<T>::from_f(v);
  }
}

template <class T, class Cfg, int G, bool BKMAJ>
__global__ void __launch_bounds__(Cfg::THREADS, 1) lora_gemm_kernel(GemmParams p) {
  using Lay = Tile<Cfg, T, BKMAJ>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN;
  PALORA_SHARED(smem, Lay::SMEM);
  const int tid = threadIdx.x;
  unsigned mt, nt;
  grouped_tile(static_cast<unsigned>((p.rows + BM - 1) / BM), static_cast<unsigned>((p.cols + BN - 1) / BN),
               blockIdx.x, mt, nt);
  const int m0 = static_cast<int>(mt * BM), n0 = static_cast<int>(nt * BN);

  // im2col / dgrad: this thread's gather row (a pixel of z), decomposed once
  int g_n = 0, g_ho = 0, g_wo = 0;
  bool g_ok = false;
  if (G != kDense) {
    const int m = m0 + tid % BM;
    g_ok = m < p.rows;
    int q = 0;
    if (g_ok) {
      p.div_hw.divmod(m, g_n, q);
      p.div_Wo.divmod(q, g_ho, g_wo);
    }
  }
  gemm_mainloop<T, Cfg, G, BKMAJ>(p, smem, m0, n0, g_n, g_ho, g_wo, g_ok);
  store_tile<T, Cfg>(p, reinterpret_cast<const float*>(smem), Lay::LDC, m0, n0);
}

// 16-byte copies of a (rows, cols-contiguous) operand: contiguous, 16-byte aligned base and row stride
template <class T>
inline bool vec_ok(const void* ptr, int64_t s_row, int64_t s_col) {
  return ptr && s_col == 1 && (reinterpret_cast<uintptr_t>(ptr) % 16 == 0) && ((s_row * int64_t(sizeof(T))) % 16 == 0);
}

// which operands take the 16-byte cp.async path (GemmParams::a_vec, b_vec, up_vec)
template <class T, int G, bool BKMAJ>
inline void set_vec_paths(GemmParams& p) {
  p.a_vec = G == kDense && vec_ok<T>(p.a, p.a_sm, p.a_sk);
  // the B stage keeps BKMAJ's orientation; a copy runs along it only when memory does too
  p.b_vec = G != kDgrad && (BKMAJ ? vec_ok<T>(p.b, p.b_sc, p.b_sk) : vec_ok<T>(p.b, p.b_sk, p.b_sc));
  p.up_vec = G != kDgrad && p.R > 0 && (BKMAJ ? vec_ok<T>(p.up, p.up_sc, p.up_sr) : vec_ok<T>(p.up, p.up_sr, p.up_sc));
}

template <class T, class Cfg, int G, bool BKMAJ>
const char* launch_gemm_as(GemmParams p, void* stream) {
  set_vec_paths<T, G, BKMAJ>(p);
  const int64_t blocks = cdiv(p.rows, Cfg::BM) * cdiv(p.cols, Cfg::BN);
  if (blocks > 0x7fffffff) return "lora_gemm: more than 2^31 - 1 tiles";
  PALORA_LAUNCH(dim3(static_cast<unsigned>(blocks)), dim3(Cfg::THREADS), 0, stream,
                lora_gemm_kernel<T, Cfg, G, BKMAJ>)(p);
  return PALORA_LAST_ERROR();
}

// B's smem orientation follows its contiguous dimension (k-contiguous: W^T, A_cat^T, conv weights)
template <class T, class Cfg, int G>
const char* launch_gemm(const GemmParams& p, void* stream) {
  if (p.rows == 0 || p.cols == 0) return nullptr;
  if constexpr (G != kDense) {
    return launch_gemm_as<T, Cfg, G, true>(p, stream);  // conv weights: (C_out, K) row-major; dgrad: scalar B
  } else {
    if (p.b_sk == 1) return launch_gemm_as<T, Cfg, G, true>(p, stream);
    return launch_gemm_as<T, Cfg, G, false>(p, stream);
  }
}

}  // namespace palora
