// The data gradient of palora::lora_conv2d on CUDA (see palora_cuda.h, LoraConvDgradArgs):
//   1. shrink kernel, 1x1 im2col of dY:   dG = B_cat^T dY per pixel         -> dg (N, R, Ho, Wo)
//   2. fused kernel, transposed gather:   dX = convT([dY | dG*S_n], [W; A_cat])  -> dx (N, C_in, H, W)
// Launch 2 is lora_gemm's kDgrad mode: rows = the N*H*W pixels of dX, K = C_out*kh*kw from dY,
// then R*kh*kw from dG scaled by S_n as it is gathered (its "expand" phase); no [dY | dH]
// concatenation and no dH tensor is written. dG is returned for dp = s sum H dG.
#pragma once
#include "cuda/lora_conv2d.cuh"

namespace palora {

inline const char* check_lora_conv2d_dgrad(const LoraConvDgradArgs& a) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (a.dtype < kFloat32 || a.dtype > kBFloat16) return arg_error("lora_conv2d_dgrad: dtype: expected 0, 1 or 2, got " + s(a.dtype));
  if (a.T < 1 || a.R < a.T || a.R % a.T != 0)
    return arg_error("lora_conv2d_dgrad: up: expected R = T * rank columns with T = " + s(a.T) + ", got R = " + s(a.R));
  if (a.P != 1 && a.P != a.N) return arg_error("lora_conv2d_dgrad: pref: expected 1 or N = " + s(a.N) + " rows, got " + s(a.P));
  if (a.stride_h < 1 || a.stride_w < 1 || a.dil_h < 1 || a.dil_w < 1 || a.pad_h < 0 || a.pad_w < 0)
    return arg_error("lora_conv2d_dgrad: stride/dilation: expected >= 1 and padding >= 0");
  if (a.Ho < 1 || a.Wo < 1 || a.H < 1 || a.W < 1) return arg_error("lora_conv2d_dgrad: dy: expected a non-empty output grid");
  const int64_t khw = a.kh * a.kw;
  for (auto [what, v] : {std::pair<const char*, int64_t>{"N * H * W (rows)", a.N * a.H * a.W}, {"N * Ho * Wo", a.N * a.Ho * a.Wo},
                         {"C_out * kh * kw (K)", a.C_out * khw}, {"R * kh * kw", a.R * khw}, {"C_in", a.C_in}})
    if (const char* e = check_int32("lora_conv2d_dgrad", what, v)) return e;
  if (a.H + a.pad_h > 0x3fffffff || a.W + a.pad_w > 0x3fffffff || a.kh * a.dil_h > 0x3fffffff || a.kw * a.dil_w > 0x3fffffff)
    return arg_error("lora_conv2d_dgrad: padding/dilation: the extents exceed 2^30");
  if (a.N > 0 && (!a.dy || !a.weight || !a.down || !a.up || !a.pref || !a.dx || !a.dg))
    return arg_error("lora_conv2d_dgrad: null pointer");
  return nullptr;
}

template <class T>
const char* lora_conv2d_dgrad_typed(const LoraConvDgradArgs& a, void* stream) {
  if (a.N == 0) return nullptr;
  const int64_t khw = a.kh * a.kw;
  // 1. dG = B_cat^T dY: a 1x1 im2col of dY (any strides) against B_cat (C_out, R)
  GemmParams g{};
  g.a = a.dy; g.H = static_cast<int>(a.Ho); g.W = static_cast<int>(a.Wo); g.kh = g.kw = 1;
  g.sh = g.sw = 1; g.ph = g.pw = 0; g.dh = g.dw = 1;
  g.div_khw = FastDiv(1); g.div_kw = FastDiv(1); g.div_Wo = FastDiv(a.Wo); g.div_hw = FastDiv(a.Ho * a.Wo);
  g.sxn = a.stride_dyn; g.sxc = a.stride_dyc; g.sxh = a.stride_dyh; g.sxw = a.stride_dyw;
  g.rows = static_cast<int>(a.N * a.Ho * a.Wo); g.K = static_cast<int>(a.C_out); g.cols = static_cast<int>(a.R);
  g.b = a.up; g.b_sk = a.stride_uc; g.b_sc = a.stride_ur;
  g.z = a.dg; g.z_sn = a.stride_gn; g.z_sp = a.stride_gp; g.z_sc = a.stride_gc;
  if (const char* e = launch_gemm<T, ShrinkCfg, kIm2col>(g, stream)) return e;
  // 2. dX: transposed gather of [dY | dG * S_n] against [W; A_cat]
  GemmParams f{};
  f.a = a.dy; f.sxn = a.stride_dyn; f.sxc = a.stride_dyc; f.sxh = a.stride_dyh; f.sxw = a.stride_dyw;
  f.H = static_cast<int>(a.Ho); f.W = static_cast<int>(a.Wo);
  f.kh = static_cast<int>(a.kh); f.kw = static_cast<int>(a.kw);
  f.sh = static_cast<int>(a.stride_h); f.sw = static_cast<int>(a.stride_w);
  f.ph = static_cast<int>(a.pad_h); f.pw = static_cast<int>(a.pad_w);
  f.dh = static_cast<int>(a.dil_h); f.dw = static_cast<int>(a.dil_w);
  f.div_khw = FastDiv(khw); f.div_kw = FastDiv(a.kw); f.div_sh = FastDiv(a.stride_h); f.div_sw = FastDiv(a.stride_w);
  f.div_hw = FastDiv(a.H * a.W); f.div_Wo = FastDiv(a.W);  // rows: pixels (hi, wi) of dX
  f.rows = static_cast<int>(a.N * a.H * a.W); f.K = static_cast<int>(a.C_out * khw); f.cols = static_cast<int>(a.C_in);
  f.b = a.weight; f.b_sk = a.C_in * khw; f.b_sc = khw;
  f.R = static_cast<int>(a.R * khw); f.h = a.dg; f.h_sn = a.stride_gn; f.h_sp = a.stride_gp; f.h_sc = a.stride_gc;
  f.up = a.down; f.up_sr = a.C_in * khw; f.up_sc = khw;
  f.pref = a.pref; f.P = static_cast<int>(a.P); f.div_rank = FastDiv(a.R / a.T); f.div_rps = FastDiv(1);
  f.pref_sp = a.stride_pp; f.pref_st = a.stride_pt; f.scale = static_cast<float>(a.scale);
  f.z = a.dx; f.z_sn = a.stride_xn; f.z_sp = a.stride_xp; f.z_sc = a.stride_xc;
  return launch_gemm<T, FusedCfg, kDgrad>(f, stream);
}

inline const char* lora_conv2d_dgrad_dispatch(const LoraConvDgradArgs& a, void* stream) {
  if (const char* e = check_lora_conv2d_dgrad(a)) return e;
  switch (a.dtype) {
    case kFloat16: return lora_conv2d_dgrad_typed<__half>(a, stream);
    case kBFloat16: return lora_conv2d_dgrad_typed<__nv_bfloat16>(a, stream);
    default: return lora_conv2d_dgrad_typed<float>(a, stream);
  }
}

}  // namespace palora
