// Plain C++ interface of the CUDA kernels: argument structs and entry points.
// No torch and no CUDA header: the torch bindings (bindings.cpp), the nvcc translation unit
// (kernels_*.cu) and the host emulator's C API (csrc/emu/emu_capi.cpp, loaded with ctypes)
// all fill the same structs. Field order matters to the ctypes mirror in
// palora_kernels/ops/cuda_sim.py: pointers, then int64 fields, then the double.
#pragma once
#include <cstdint>

namespace palora {

enum DType : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y (N, M) = x @ wm + bias + ((x @ down) * S) @ up,   H (N, R) = x @ down,
// S[n, t*rank + j] = scale * pref[n / rows_per_sample (0 when P == 1), t], rank = R / T.
struct LoraMMArgs {
  const void* x;      // (N, K)
  const void* wm;     // (K, M)
  const void* bias;   // (M,) or nullptr
  const void* down;   // (K, R)
  const void* up;     // (R, M)
  const float* pref;  // (P, T), fp32
  void* y;            // (N, M)
  void* h;            // (N, R): written by the shrink kernel, read back by the fused one
  int64_t dtype;      // DType of x, wm, bias, down, up, y, h
  int64_t N, K, M, R, P, T, rows_per_sample;
  int64_t stride_xn, stride_xk, stride_wk, stride_wm, stride_bias;
  int64_t stride_dk, stride_dr, stride_ur, stride_um, stride_pp, stride_pt;
  int64_t stride_yn, stride_yc, stride_hn, stride_hc;
  double scale;
};

// y (N, C_out, Ho, Wo) = conv(x, W) + bias + B_cat diag(S_n) H_n,  H (N, R, Ho, Wo) = conv(x, A_cat),
// P == 1 or P == N. y and H are dense, NCHW or NHWC: pixel (ho, wo) of image n, channel c sits at
// n * s_n + (ho * Wo + wo) * s_p + c * s_c.
struct LoraConvArgs {
  const void* x;      // (N, C_in, H, W), any strides
  const void* weight; // (C_out, C_in, kh, kw), contiguous
  const void* down;   // (R, C_in, kh, kw), contiguous: A_cat
  const void* bias;   // (C_out,) or nullptr
  const void* up;     // (C_out, R)
  const float* pref;  // (P, T), fp32
  void* y;            // (N, C_out, Ho, Wo)
  void* h;            // (N, R, Ho, Wo)
  int64_t dtype;
  int64_t N, C_in, H, W, C_out, R, kh, kw, P, T;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, Ho, Wo;
  int64_t stride_xn, stride_xc, stride_xh, stride_xw;
  int64_t stride_bias, stride_uc, stride_ur, stride_pp, stride_pt;
  int64_t stride_yn, stride_yp, stride_yc, stride_hn, stride_hp, stride_hc;
  double scale;
};

// The conv's data gradient, two launches (csrc/cuda/conv_dgrad.cuh):
//   dG (N, R, Ho, Wo) = B_cat^T dY per pixel                          (1x1 implicit GEMM)
//   dX (N, C_in, H, W) = convT(dY, W) + convT(dG * S_n, A_cat)         (transposed implicit GEMM
//                        over K = (C_out + R) kh kw, [dY | dG*S] against [W; A_cat])
// dY any strides; dX and dG dense NCHW or NHWC (pixel q of image n, channel c at n*s_n + q*s_p + c*s_c).
struct LoraConvDgradArgs {
  const void* dy;     // (N, C_out, Ho, Wo)
  const void* weight; // (C_out, C_in, kh, kw), contiguous
  const void* down;   // (R, C_in, kh, kw), contiguous: A_cat
  const void* up;     // (C_out, R): B_cat
  const float* pref;  // (P, T), fp32, P == 1 or N
  void* dx;           // (N, C_in, H, W)
  void* dg;           // (N, R, Ho, Wo)
  int64_t dtype, N, C_in, H, W, C_out, R, kh, kw, P, T;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, Ho, Wo;
  int64_t stride_dyn, stride_dyc, stride_dyh, stride_dyw;
  int64_t stride_uc, stride_ur, stride_pp, stride_pt;
  int64_t stride_xn, stride_xp, stride_xc, stride_gn, stride_gp, stride_gc;
  double scale;
};

// dp (P, T) fp32 = scale * sum over the rows of sample p of sum_j H[n, t*rank+j] dG[n, t*rank+j]
// (csrc/cuda/pref_grad.cuh). partial: a workspace of pref_grad_workspace(args) floats.
struct PrefGradArgs {
  const void* h;      // (N, R)
  const void* dg;     // (N, R)
  float* partial;     // workspace
  float* out;         // (P, T) fp32, dense
  int64_t dtype, N, R, T, rank, P, rows_per_sample;
  int64_t stride_hn, stride_hc, stride_gn, stride_gc;
  // the conv's 4-D H and dG (N_img, R, Ho, Wo): hw = Ho*Wo pixels per image, row n = (img, q) at
  // img * stride_hn + q * stride_hp (so N = N_img * hw rows). 2-D (N, R): hw = 1, stride_hp = 0.
  int64_t hw, stride_hp, stride_gp;
  double scale;
};
constexpr int64_t kPrefRows = 128;  // rows of one sample summed by one block
inline int64_t pref_grad_workspace(const PrefGradArgs& a) {
  const int64_t L = a.P == 1 ? a.N : a.rows_per_sample;
  return (L + kPrefRows - 1) / kPrefRows * a.P * a.T;
}

// The conv's weight gradients from one pass over im2col(x) (csrc/cuda/conv_wgrad.cuh):
//   Z (C_out + R, C_in*kh*kw) = [dY | dG * S_n]^T im2col(x),  summed over the N*Ho*Wo pixels in fp32;
//   Z = [dW; dA_cat], two contiguous outputs; dW is computed only when need_weight.
// The pixel sum is split into `splits` chunks whose fp32 partial tiles go to the workspace; a second
// kernel adds them in order (deterministic).
struct LoraConvWgradArgs {
  const void* x;      // (N, C_in, H, W), any strides
  const void* dy;     // (N, C_out, Ho, Wo), any strides
  const void* dg;     // (N, R, Ho, Wo), any strides: the unscaled gradient of H
  const float* pref;  // (P, T), fp32, P == 1 or N
  float* workspace;   // lora_conv2d_wgrad_workspace(args) floats
  void* dw;           // (C_out, C_in*kh*kw), contiguous; unused (may be null) without need_weight
  void* da;           // (R, C_in*kh*kw), contiguous
  int64_t dtype, N, C_in, H, W, C_out, R, kh, kw, P, T;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, Ho, Wo;
  int64_t stride_xn, stride_xc, stride_xh, stride_xw, stride_dyn, stride_dyc, stride_dyh, stride_dyw;
  int64_t stride_gn, stride_gc, stride_gh, stride_gw, stride_pp, stride_pt;
  int64_t need_weight;  // 0: a frozen base, no dW rows
  int64_t splits;       // chunks of the pixel sum; 0 lets lora_conv2d_wgrad_splits choose
  double scale;
};
// the wgrad GEMM tile: BM output channels x BN columns (c, i, j) x BK pixels per K step
constexpr int64_t kWgradBM = 64, kWgradBN = 64, kWgradBK = 32;
// The split of the pixel sum: enough blocks for ~2 waves on a 132-SM GPU (264), at least 8 K steps
// (256 pixels) per split so the partial tiles cost at most 1/8 of the tile's input traffic.
inline int64_t lora_conv2d_wgrad_splits(const LoraConvWgradArgs& a) {
  const int64_t rows = a.N * a.Ho * a.Wo, ksteps = (rows + kWgradBK - 1) / kWgradBK;
  const int64_t mt = (a.need_weight ? (a.C_out + kWgradBM - 1) / kWgradBM : 0) + (a.R + kWgradBM - 1) / kWgradBM;
  const int64_t tiles = mt * ((a.C_in * a.kh * a.kw + kWgradBN - 1) / kWgradBN);
  int64_t s = a.splits > 0 ? a.splits : (264 + tiles - 1) / (tiles > 0 ? tiles : 1);
  if (a.splits <= 0 && s > ksteps / 8) s = ksteps / 8;
  if (s > ksteps) s = ksteps;
  if (s < 1) s = 1;
  // equal chunks of whole K steps, none empty
  const int64_t per = (ksteps + s - 1) / s;
  return ksteps == 0 ? 1 : (ksteps + per - 1) / per;
}
inline int64_t lora_conv2d_wgrad_workspace(const LoraConvWgradArgs& a) {
  return lora_conv2d_wgrad_splits(a) * ((a.need_weight ? a.C_out : 0) + a.R) * a.C_in * a.kh * a.kw;
}

// All return nullptr on success, else a message naming the bad argument or the CUDA error.
const char* lora_mm_launch(const LoraMMArgs& args, void* stream);
const char* lora_conv2d_launch(const LoraConvArgs& args, void* stream);
const char* pref_grad_launch(const PrefGradArgs& args, void* stream);
const char* lora_conv2d_dgrad_launch(const LoraConvDgradArgs& args, void* stream);
const char* lora_conv2d_wgrad_launch(const LoraConvWgradArgs& args, void* stream);

}  // namespace palora

namespace palora {

// ---- MTLoRA (csrc/cuda/mtlora_mm.cuh, docs/mtlora.md): T1 = T + 1 outputs on one base product,
// G column groups (q, k, v) of Mg = M / G columns, adapters a = 0 (shared) .. T with ranks[a], R = sum(ranks):
//   H[:, g, a] = x_a A[g, a]^T                      (N, G*R), x_a = x, or xs[a-1] for a task input
//   Y[o][:, g] = x W_g^T + b_g + sum_{a feeds o} s[g, a] H[:, g, a] B[g, a]^T   (T1, N, M)
// a feeds o: a == o, and a == 0 for every o when s2t (MTLoRA's matrixv2). LoRA dropout (p > 0): the
// adapters that read x read x * mask_g / (1 - p), mask_g element (n, k) kept iff
// philox_uniform(seed, offset + g*N*K + n*K + k) >= p (csrc/cuda/philox.h, palora_kernels/_rng.py).
constexpr int64_t kMTLoraMaxAdapters = 32;
struct MTLoraMMArgs {
  const void* x;             // (N, K)
  const void* const* xs;     // n_xs task inputs (N, K), strides stride_xs*: a HOST array of device pointers
  const void* weight;        // (M, K) = [W_0; ..; W_{G-1}]
  const void* bias;          // (M,) or nullptr
  const void* A;             // (G*R, K), rows [g][a][j]
  const void* B;             // (M, R), columns [a][j]
  const float* scales;       // (G, T1) fp32, dense
  void* y;                   // (T1, N, M)
  void* h;                   // (N, G*R), column stride 1
  void* work;                // p > 0: (G, N, K) dense workspace for the dropped x of each group, else unused
  int64_t dtype, N, K, M, G, T1, n_xs, s2t;
  int64_t ranks[kMTLoraMaxAdapters];
  int64_t stride_xn, stride_xk, stride_xsn, stride_xsk, stride_wm, stride_wk, stride_bias;
  int64_t stride_ar, stride_ak, stride_bm, stride_br, stride_yo, stride_yn, stride_ym, stride_hn;
  int64_t seed, offset;      // dropout
  double p;
};

// The data gradients of MTLoRAMMArgs' op from the T1 output gradients dY_o (all with one set of strides):
//   dG[:, g, a] = dYsum_a[:, g] B[g, a]   (N, G*R), unscaled; dYsum_0 = dBase with s2t, else dY_0; dYsum_t = dY_t
//   dX = dBase W + sum_g drop_g((dG * col_scales[0])_g A_g)   (need_x; dBase = sum_o dY_o from the caller;
//        drop_g: the forward's mask of group g regenerated, / (1 - p); the identity when p == 0)
//   dXs[t-1] = (dG * col_scales[t]) A                (need_x and n_xs = T task inputs)
// col_scales (T1, G*R) fp32: row 0 holds s[g, a] on the columns of H read from x, row t on task t's
// columns, 0 elsewhere (the expand of lora_gemm applies it as a per-column scale).
struct MTLoraDgradArgs {
  const void* const* dys;    // T1 gradients (N, M): a HOST array of device pointers
  const void* dbase;         // (N, M), dys' strides, or nullptr when neither dX nor s2t's dG needs it
  const void* weight;        // (M, K)
  const void* A;             // (G*R, K)
  const void* B;             // (M, R)
  const float* col_scales;   // (T1, G*R) fp32, dense
  void* dx;                  // (N, K), or nullptr without need_x
  void* dxs;                 // (n_xs, N, K), or nullptr
  void* dg;                  // (N, G*R), column stride 1
  void* work;                // p > 0 and need_x: (N, K) dense workspace, else unused
  int64_t dtype, N, K, M, G, T1, n_xs, s2t, need_x;
  int64_t ranks[kMTLoraMaxAdapters];
  int64_t stride_dyn, stride_dym, stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br;
  int64_t stride_dxn, stride_dxso, stride_dxsn, stride_gn;
  int64_t seed, offset;      // dropout, as MTLoraMMArgs
  double p;
};

const char* mtlora_mm_launch(const MTLoraMMArgs& args, void* stream);
const char* mtlora_mm_dgrad_launch(const MTLoraDgradArgs& args, void* stream);

}  // namespace palora
