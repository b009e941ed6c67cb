// The weight gradients of palora::lora_conv2d on CUDA (see palora_cuda.h, LoraConvWgradArgs):
//   Z[o, k] = sum_m D[m, o] im2col(x)[m, k],   D = [dY | dG * S_n],   Z = [dW; dA_cat]
// one pass over im2col(x) for both. A GEMM whose reduction runs over the N*Ho*Wo pixels m:
// output rows o (channels), columns k = (c, i, j) (the order of W.view(C_out, -1)).
//   * Row tiles: cdiv(C_out, BM) tiles of dY channels (none when need_weight is false), then
//     cdiv(R, BM) tiles of dG channels. A tile never mixes the two, so the 16-byte path (dY rows) and
//     the scaling by S (dG rows) are decided once per block.
//   * Split-K: the pixels are cut into `splits` chunks of whole K steps; block (split, tile) writes
//     its fp32 partial tile to the workspace and conv_wgrad_finish_kernel adds the splits in order
//     and rounds once. No atomics: deterministic.
//   * A tile, BK pixels x BM channels, channel-contiguous in shared memory (WMMA matrix_a col_major):
//     dY with channel stride 1 and 16-byte aligned pixel strides (channels_last) by 16-byte cp.async;
//     otherwise each thread gathers its pixel's channels; dG is scaled by
//     S[n, t] = scale * pref[n (or 0), o / rank] in registers as it is loaded.
//   * B tile, BK pixels x BN columns: the im2col gather of x. Each thread owns one pixel row of the
//     tile (decomposed by FastDiv once per K step); a column's (c, i, j) offsets come from a table
//     built once per block, so the gather itself divides nothing.
#pragma once
#include <utility>

#include "cuda/lora_gemm.cuh"  // only templates: a translation unit instantiates what it launches

namespace palora {

struct WgradParams {
  const void* x;
  const void* dy;
  const void* dg;
  const float* pref;
  float* ws;       // (splits, Mz, K) fp32 partial tiles of Z
  void* zw;        // dW (C_out, K): Z's first C_out rows
  void* za;        // dA_cat (R, K): the rest
  int H, W, sh, sw, ph, pw, dh, dw;
  int rows, K, C_out, R, Mz;     // pixels (the reduction), columns, dY rows (0: no dW), dG rows, Z rows
  int w_tiles, n_tiles, chunk;   // row tiles of dW, column tiles, pixels per split (whole K steps)
  FastDiv div_hw, div_Wo, div_khw, div_kw, div_rank, div_tiles, div_ntiles;
  int64_t sxn, sxc, sxh, sxw, syn, syc, syh, syw, sgn, sgc, sgh, sgw, pref_sp, pref_st;
  int P, splits;
  float scale;
  bool dy_vec;     // dY rows by 16-byte cp.async
};

struct WgradCfg {
  static constexpr int BM = int(kWgradBM), BN = int(kWgradBN), BK = int(kWgradBK);
  static constexpr int TM = 8, TN = 4, WARPS_M = 2, WARPS_N = 2, THREADS = 128;
};

template <class T>
struct WgradTile {
  using Cfg = WgradCfg;
  static constexpr int VEC = 16 / int(sizeof(T));
  static constexpr int PAD = Num<T>::is16 ? 8 : 4;   // 16-byte rows for cp.async/ldmatrix, as in lora_gemm.cuh
  static constexpr int LDA = Cfg::BM + PAD;          // As (BK, LDA): pixel rows, channels contiguous
  static constexpr int LDB = Cfg::BN + PAD;          // Bs (BK, LDB): pixel rows, columns contiguous
  static constexpr int LDC = Cfg::BN + 4;            // fp32 epilogue tile (BM, LDC)
  static constexpr int STAGE = Cfg::BK * (LDA + LDB);
  static constexpr int AB_BYTES = 2 * STAGE * int(sizeof(T));
  static constexpr int C_BYTES = Cfg::BM * LDC * 4;
  static constexpr int MAIN = AB_BYTES > C_BYTES ? AB_BYTES : C_BYTES;
  static constexpr int SMEM = MAIN + Cfg::BN * 16;   // + the column table: int64 offset, int i*dh, int j*dw
  static_assert((Cfg::BM / Cfg::TM) * (Cfg::BN / Cfg::TN) == Cfg::THREADS, "SIMT micro-tiles cover the tile");
  static_assert(Cfg::THREADS % Cfg::BK == 0, "each thread owns one pixel row of the tiles");
  static_assert(Cfg::BM % VEC == 0 && (Cfg::BK * LDA * int(sizeof(T))) % 32 == 0 && (STAGE * int(sizeof(T))) % 32 == 0,
                "16-byte chunks, 256-bit aligned WMMA fragments");
  static_assert(MAIN % 16 == 0 && SMEM <= 48 * 1024, "static shared memory");
};

// K step t of this block's pixel chunk -> stage (As, Bs)
template <class T>
__device__ __forceinline__ void wgrad_load_tile(const WgradParams& p, int m_first, int m_end, bool grows, int o0, int olim,
                                                int n0, T* As, T* Bs, const int64_t* coff, const int* ioff, const int* joff) {
  using Lay = WgradTile<T>;
  using Cfg = WgradCfg;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, V = Lay::VEC, LDA = Lay::LDA, LDB = Lay::LDB;
  const int tid = threadIdx.x;
  // this thread's pixel row of both tiles: m = (n, ho, wo), once per K step
  const int kk = tid % BK, m = m_first + kk;
  const bool mok = m < m_end;
  int n = 0, ho = 0, wo = 0;
  if (mok) {
    int q;
    p.div_hw.divmod(m, n, q);
    p.div_Wo.divmod(q, ho, wo);
  }
  // ---- A tile (BK pixels, BM channels)
  if (!grows && p.dy_vec) {
    // 16-byte chunks along the channels; 8 (fp16) or 16 (fp32) threads read one pixel's row
    const T* dy = static_cast<const T*>(p.dy);
    for (int idx = tid; idx < BK * (BM / V); idx += Cfg::THREADS) {
      const int r = idx / (BM / V), cc = (idx % (BM / V)) * V;
      const int mr = m_first + r, o = o0 + cc;
      const bool ok = mr < m_end && o < olim;
      int nr = 0, hr = 0, wr = 0;
      if (ok) {
        int q;
        p.div_hw.divmod(mr, nr, q);
        p.div_Wo.divmod(q, hr, wr);
      }
      const int nb = ok ? (olim - o < V ? olim - o : V) * int(sizeof(T)) : 0;
      cp_async16(As + r * LDA + cc, ok ? dy + nr * p.syn + hr * p.syh + wr * p.syw + o : dy, nb);
    }
  } else {
    const T* src = static_cast<const T*>(grows ? p.dg : p.dy);
    const int64_t sc = grows ? p.sgc : p.syc;
    const int64_t base = grows ? n * p.sgn + ho * p.sgh + wo * p.sgw : n * p.syn + ho * p.syh + wo * p.syw;
    const float* prow = p.pref + (p.P == 1 ? 0 : n) * p.pref_sp;
#pragma unroll 4
    for (int mm = tid / BK; mm < BM; mm += Cfg::THREADS / BK) {
      const int o = o0 + mm;
      T v = Num<T>::from_f(0.f);
      if (mok && o < olim) {
        if (grows) v = Num<T>::from_f(Num<T>::to_f(src[base + o * sc]) * (p.scale * prow[p.div_rank.div(o) * p.pref_st]));
        else v = src[base + o * sc];
      }
      As[kk * LDA + mm] = v;
    }
  }
  // ---- B tile (BK pixels, BN columns): im2col(x)
  const T* x = static_cast<const T*>(p.x);
  const int hb = ho * p.sh - p.ph, wb = wo * p.sw - p.pw;
  const int64_t xbase = n * p.sxn + hb * p.sxh + wb * p.sxw;  // + the column's offset; may be negative alone
#pragma unroll 4
  for (int nn = tid / BK; nn < BN; nn += Cfg::THREADS / BK) {
    T v = Num<T>::from_f(0.f);
    if (mok && n0 + nn < p.K) {
      const int hi = hb + ioff[nn], wi = wb + joff[nn];
      if (hi >= 0 && hi < p.H && wi >= 0 && wi < p.W) v = x[xbase + coff[nn]];
    }
    Bs[kk * LDB + nn] = v;
  }
}

template <class T>
__global__ void __launch_bounds__(WgradCfg::THREADS, 1) conv_wgrad_kernel(WgradParams p) {
  using Lay = WgradTile<T>;
  using Cfg = WgradCfg;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, LDA = Lay::LDA, LDB = Lay::LDB, LDC = Lay::LDC;
  constexpr int STAGE = Lay::STAGE;
  PALORA_SHARED(smem, Lay::SMEM);
  T* stage0 = reinterpret_cast<T*>(smem);              // stage s: As = stage0 + s*STAGE, Bs = As + BK*LDA
  float* Cs = reinterpret_cast<float*>(smem);          // (BM, LDC), after the K loop
  int64_t* coff = reinterpret_cast<int64_t*>(smem + Lay::MAIN);
  int* ioff = reinterpret_cast<int*>(coff + BN);
  int* joff = ioff + BN;
  const int tid = threadIdx.x;

  // block -> (split, row tile, column tile), FastDiv: no division instruction
  int split, tile, mt, nt;
  p.div_tiles.divmod(static_cast<int>(blockIdx.x), split, tile);
  p.div_ntiles.divmod(tile, mt, nt);
  const bool grows = mt >= p.w_tiles;                  // a tile of dG channels (dA rows)
  const int o0 = (grows ? mt - p.w_tiles : mt) * BM, olim = grows ? p.R : p.C_out;
  const int n0 = nt * BN;
  const int m_begin = split * p.chunk;
  const int m_end = p.rows - m_begin < p.chunk ? p.rows : m_begin + p.chunk;

  // the column table: k = n0 + nn -> (c, i, j) -> x offset and tap offsets
  if (tid < BN) {
    const int k = n0 + tid;
    int c = 0, r = 0, i = 0, j = 0;
    if (k < p.K) {
      p.div_khw.divmod(k, c, r);
      p.div_kw.divmod(r, i, j);
    }
    coff[tid] = c * p.sxc + int64_t(i) * p.dh * p.sxh + int64_t(j) * p.dw * p.sxw;
    ioff[tid] = i * p.dh;
    joff[tid] = j * p.dw;
  }
  __syncthreads();

  constexpr bool kWmma = PALORA_WMMA_ARCH && Num<T>::is16;
  constexpr int FM = BM / (16 * Cfg::WARPS_M), FN = BN / (16 * Cfg::WARPS_N);
  constexpr int TM = Cfg::TM, TN = Cfg::TN;
  float acc[kWmma ? 1 : TM][kWmma ? 1 : TN];
  for (int i = 0; i < (kWmma ? 1 : TM); ++i)
    for (int j = 0; j < (kWmma ? 1 : TN); ++j) acc[i][j] = 0.f;
#if PALORA_WMMA_ARCH
  using namespace nvcuda;
  using TW = typename std::conditional<Num<T>::is16, T, __half>::type;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf[kWmma ? FM : 1][kWmma ? FN : 1];
  if constexpr (kWmma)
    for (int i = 0; i < FM; ++i)
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(cf[i][j], 0.f);
#endif
  const int warp = tid / 32, wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int ty = tid / (BN / TN), tx = tid % (BN / TN);

  const int tiles = m_end > m_begin ? (m_end - m_begin + BK - 1) / BK : 0;
  if (tiles > 0)
    wgrad_load_tile<T>(p, m_begin, m_end, grows, o0, olim, n0, stage0, stage0 + BK * LDA, coff, ioff, joff);
  cp_async_commit();
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) {  // prefetch K step t+1 into the other stage (last read in step t-1)
      T* An = stage0 + ((t + 1) & 1) * STAGE;
      wgrad_load_tile<T>(p, m_begin + (t + 1) * BK, m_end, grows, o0, olim, n0, An, An + BK * LDA, coff, ioff, joff);
    }
    cp_async_commit();
    cp_async_wait<1>();  // K step t has landed
    PALORA_TILE_BARRIER();
    const T* As = stage0 + (t & 1) * STAGE;
    const T* Bs = As + BK * LDA;
    if constexpr (kWmma) {
#if PALORA_WMMA_ARCH
      const TW* Aw = reinterpret_cast<const TW*>(As);
      const TW* Bw = reinterpret_cast<const TW*>(Bs);
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, TW, wmma::col_major> af[FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TW, wmma::row_major> bf[FN];
        for (int i = 0; i < FM; ++i) load_frag(af[i], Aw + kk * LDA + wm * FM * 16 + i * 16, LDA);
        for (int j = 0; j < FN; ++j) load_frag(bf[j], Bw + kk * LDB + wn * FN * 16 + j * 16, LDB);
        for (int i = 0; i < FM; ++i)
          for (int j = 0; j < FN; ++j) wmma::mma_sync(cf[i][j], af[i], bf[j], cf[i][j]);
      }
#endif
    } else {
      for (int kk = 0; kk < BK; ++kk) {
        float av[TM], bv[TN];
        for (int i = 0; i < TM; ++i) av[i] = Num<T>::to_f(As[kk * LDA + ty * TM + i]);
        for (int j = 0; j < TN; ++j) bv[j] = Num<T>::to_f(Bs[kk * LDB + tx * TN + j]);
        for (int i = 0; i < TM; ++i)
          for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    PALORA_TILE_BARRIER();  // the next prefetch overwrites this stage; the epilogue overwrites both with Cs
  }
  cp_async_wait<0>();

  // ---- epilogue: the fp32 partial tile -> Cs -> workspace[split], coalesced along the columns
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
  float* ws = p.ws + int64_t(split) * p.Mz * p.K;
  const int zrow0 = grows ? p.C_out + o0 : o0;        // dA rows follow dW's
  for (int idx = tid; idx < BM * BN; idx += Cfg::THREADS) {
    const int mm = idx / BN, nn = idx % BN;
    if (o0 + mm >= olim || n0 + nn >= p.K) continue;
    ws[int64_t(zrow0 + mm) * p.K + n0 + nn] = Cs[mm * LDC + nn];
  }
}

constexpr int kWgradFinishThreads = 128;

// Z[e] = sum over splits, in order, of ws[split, e]: one rounding to T, into dW (e < C_out*K) or dA
template <class T>
__global__ void __launch_bounds__(kWgradFinishThreads) conv_wgrad_finish_kernel(WgradParams p) {
  const int e = static_cast<int>(blockIdx.x) * kWgradFinishThreads + static_cast<int>(threadIdx.x);
  const int total = p.Mz * p.K, nw = p.C_out * p.K;
  if (e >= total) return;
  float s = 0.f;
  for (int i = 0; i < p.splits; ++i) s += p.ws[int64_t(i) * total + e];
  if (e < nw) static_cast<T*>(p.zw)[e] = Num<T>::from_f(s);
  else static_cast<T*>(p.za)[e - nw] = Num<T>::from_f(s);
}

inline const char* check_lora_conv2d_wgrad(const LoraConvWgradArgs& a) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (a.dtype < kFloat32 || a.dtype > kBFloat16) return arg_error("lora_conv2d_wgrad: dtype: expected 0, 1 or 2, got " + s(a.dtype));
  if (a.T < 1 || a.R < a.T || a.R % a.T != 0)
    return arg_error("lora_conv2d_wgrad: dg: expected R = T * rank channels with T = " + s(a.T) + ", got R = " + s(a.R));
  if (a.P != 1 && a.P != a.N) return arg_error("lora_conv2d_wgrad: pref: expected 1 or N = " + s(a.N) + " rows, got " + s(a.P));
  if (a.stride_h < 1 || a.stride_w < 1 || a.dil_h < 1 || a.dil_w < 1 || a.pad_h < 0 || a.pad_w < 0)
    return arg_error("lora_conv2d_wgrad: stride/dilation: expected >= 1 and padding >= 0");
  if (a.N < 0 || a.Ho < 1 || a.Wo < 1 || a.kh < 1 || a.kw < 1 || a.C_in < 1 || a.C_out < 1)
    return arg_error("lora_conv2d_wgrad: dy: expected a non-empty output grid and kernel");
  const int64_t K = a.C_in * a.kh * a.kw, Mz = (a.need_weight ? a.C_out : 0) + a.R;
  for (auto [what, v] : {std::pair<const char*, int64_t>{"N * Ho * Wo (pixels)", a.N * a.Ho * a.Wo},
                         {"C_in * kh * kw (K)", K}, {"(C_out + R) * K (z)", Mz * K}, {"H", a.H}, {"W", a.W}})
    if (const char* e = check_int32("lora_conv2d_wgrad", what, v)) return e;
  if (a.Ho * a.stride_h + a.kh * a.dil_h > 0x3fffffff || a.Wo * a.stride_w + a.kw * a.dil_w > 0x3fffffff)
    return arg_error("lora_conv2d_wgrad: stride/dilation: the input extent they span exceeds 2^30");
  if (a.splits < 0) return arg_error("lora_conv2d_wgrad: splits: expected >= 0, got " + s(a.splits));
  if (lora_conv2d_wgrad_splits(a) * Mz * K > (int64_t(1) << 40)) return arg_error("lora_conv2d_wgrad: workspace too large");
  if (!a.da || (a.need_weight && !a.dw) || !a.workspace || !a.pref || (a.N > 0 && (!a.x || !a.dy || !a.dg)))
    return arg_error("lora_conv2d_wgrad: null pointer");
  return nullptr;
}

template <class T>
const char* lora_conv2d_wgrad_typed(const LoraConvWgradArgs& a, void* stream) {
  using Cfg = WgradCfg;
  const int64_t K = a.C_in * a.kh * a.kw, rows = a.N * a.Ho * a.Wo;
  const int64_t C_out = a.need_weight ? a.C_out : 0, splits = lora_conv2d_wgrad_splits(a);
  const int64_t ksteps = cdiv(rows, Cfg::BK), per = ksteps > 0 ? cdiv(ksteps, splits) : 1;
  WgradParams p{};
  p.x = a.x; p.dy = a.dy; p.dg = a.dg; p.pref = a.pref; p.ws = a.workspace; p.zw = a.dw; p.za = a.da;
  p.H = static_cast<int>(a.H); p.W = static_cast<int>(a.W);
  p.sh = static_cast<int>(a.stride_h); p.sw = static_cast<int>(a.stride_w);
  p.ph = static_cast<int>(a.pad_h); p.pw = static_cast<int>(a.pad_w);
  p.dh = static_cast<int>(a.dil_h); p.dw = static_cast<int>(a.dil_w);
  p.rows = static_cast<int>(rows); p.K = static_cast<int>(K);
  p.C_out = static_cast<int>(C_out); p.R = static_cast<int>(a.R); p.Mz = static_cast<int>(C_out + a.R);
  p.w_tiles = static_cast<int>(cdiv(C_out, Cfg::BM));
  p.n_tiles = static_cast<int>(cdiv(K, Cfg::BN));
  const int64_t tiles = (p.w_tiles + cdiv(a.R, Cfg::BM)) * p.n_tiles;
  if (tiles * splits > 0x7fffffff) return "lora_conv2d_wgrad: more than 2^31 - 1 blocks";
  p.chunk = static_cast<int>(per * Cfg::BK);
  p.splits = static_cast<int>(splits);
  p.div_hw = FastDiv(a.Ho * a.Wo); p.div_Wo = FastDiv(a.Wo);
  p.div_khw = FastDiv(a.kh * a.kw); p.div_kw = FastDiv(a.kw); p.div_rank = FastDiv(a.R / a.T);
  p.div_tiles = FastDiv(tiles); p.div_ntiles = FastDiv(p.n_tiles);
  p.sxn = a.stride_xn; p.sxc = a.stride_xc; p.sxh = a.stride_xh; p.sxw = a.stride_xw;
  p.syn = a.stride_dyn; p.syc = a.stride_dyc; p.syh = a.stride_dyh; p.syw = a.stride_dyw;
  p.sgn = a.stride_gn; p.sgc = a.stride_gc; p.sgh = a.stride_gh; p.sgw = a.stride_gw;
  p.pref_sp = a.stride_pp; p.pref_st = a.stride_pt;
  p.P = static_cast<int>(a.P); p.scale = static_cast<float>(a.scale);
  // dY by 16-byte copies: channel stride 1, every pixel stride and the base 16-byte aligned
  p.dy_vec = C_out > 0 && vec_ok<T>(a.dy, a.stride_dyn, a.stride_dyc) && vec_ok<T>(a.dy, a.stride_dyh, 1) &&
             vec_ok<T>(a.dy, a.stride_dyw, 1);
  PALORA_LAUNCH(dim3(static_cast<unsigned>(tiles * splits)), dim3(Cfg::THREADS), 0, stream, conv_wgrad_kernel<T>)(p);
  if (const char* e = PALORA_LAST_ERROR()) return e;
  PALORA_LAUNCH(dim3(static_cast<unsigned>(cdiv(int64_t(p.Mz) * p.K, kWgradFinishThreads))), dim3(kWgradFinishThreads), 0,
                stream, conv_wgrad_finish_kernel<T>)(p);
  return PALORA_LAST_ERROR();
}

inline const char* lora_conv2d_wgrad_dispatch(const LoraConvWgradArgs& a, void* stream) {
  if (const char* e = check_lora_conv2d_wgrad(a)) return e;
  switch (a.dtype) {
    case kFloat16: return lora_conv2d_wgrad_typed<__half>(a, stream);
    case kBFloat16: return lora_conv2d_wgrad_typed<__nv_bfloat16>(a, stream);
    default: return lora_conv2d_wgrad_typed<float>(a, stream);
  }
}

}  // namespace palora
