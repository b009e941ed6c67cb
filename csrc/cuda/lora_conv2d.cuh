// palora::lora_conv2d on CUDA (factorized adapters), implicit GEMM over
// rows = N*Ho*Wo, K = C_in*kh*kw (the order of W.view(C_out, -1)), the im2col tile of x
// gathered on the fly (never materialised):
//   1. skinny shrink kernel:  H = im2col(x) A_cat^T            -> h
//   2. fused kernel:          im2col(x) W^T + (H*S_n) B_cat^T + b -> y
// y and h are dense NCHW or NHWC: row m = (n, q = ho*Wo + wo) sits at n*s_n + q*s_p and a channel
// is s_c elements further on; S_n uses pref[n] (P == N) or pref[0] (P == 1).
#pragma once
#include <utility>

#include "cuda/lora_gemm.cuh"

namespace palora {

inline const char* check_lora_conv2d(const LoraConvArgs& a) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (a.dtype < kFloat32 || a.dtype > kBFloat16) return arg_error("lora_conv2d: dtype: expected 0, 1 or 2, got " + s(a.dtype));
  if (a.T < 1) return arg_error("lora_conv2d: pref: expected T >= 1 columns, got " + s(a.T));
  if (a.R < a.T || a.R % a.T != 0) return arg_error("lora_conv2d: up: expected R = T * rank columns with T = " + s(a.T) + ", got R = " + s(a.R));
  if (a.P != 1 && a.P != a.N) return arg_error("lora_conv2d: pref: expected 1 or N = " + s(a.N) + " rows, got " + s(a.P));
  if (a.stride_h < 1 || a.stride_w < 1 || a.dil_h < 1 || a.dil_w < 1 || a.pad_h < 0 || a.pad_w < 0)
    return arg_error("lora_conv2d: stride/dilation: expected >= 1 and padding >= 0");
  if (a.Ho < 0 || a.Wo < 0) return arg_error("lora_conv2d: x: the output size is negative");
  if (a.N > 0 && a.Ho * a.Wo > 0 && (!a.x || !a.weight || !a.down || !a.up || !a.pref || !a.y || !a.h))
    return arg_error("lora_conv2d: null pointer");
  return nullptr;
}

template <class T>
const char* lora_conv2d_typed(const LoraConvArgs& a, void* stream) {
  const int64_t HoWo = a.Ho * a.Wo, K = a.C_in * a.kh * a.kw;
  if (HoWo == 0 || a.N == 0) return nullptr;
  for (auto [what, v] : {std::pair<const char*, int64_t>{"N * Ho * Wo (rows)", a.N * HoWo}, {"C_in * kh * kw (K)", K},
                         {"C_out", a.C_out}, {"R", a.R}, {"H", a.H}, {"W", a.W}})
    if (const char* e = check_int32("lora_conv2d", what, v)) return e;
  // the gather computes ho * stride - pad + i * dilation in 32 bits
  if (a.Ho * a.stride_h + a.kh * a.dil_h > 0x3fffffff || a.Wo * a.stride_w + a.kw * a.dil_w > 0x3fffffff)
    return arg_error("lora_conv2d: stride/dilation: the input extent they span exceeds 2^30");
  GemmParams p{};
  p.a = a.x; p.H = static_cast<int>(a.H); p.W = static_cast<int>(a.W); p.kh = static_cast<int>(a.kh); p.kw = static_cast<int>(a.kw);
  p.sh = static_cast<int>(a.stride_h); p.sw = static_cast<int>(a.stride_w); p.ph = static_cast<int>(a.pad_h);
  p.pw = static_cast<int>(a.pad_w); p.dh = static_cast<int>(a.dil_h); p.dw = static_cast<int>(a.dil_w);
  p.div_khw = FastDiv(a.kh * a.kw); p.div_kw = FastDiv(a.kw); p.div_Wo = FastDiv(a.Wo);
  p.sxn = a.stride_xn; p.sxc = a.stride_xc; p.sxh = a.stride_xh; p.sxw = a.stride_xw;
  p.rows = static_cast<int>(a.N * HoWo); p.K = static_cast<int>(K);
  p.b_sk = 1; p.b_sc = K;  // weight (down) row c is output channel c
  p.div_hw = FastDiv(HoWo);
  // 1. shrink: H = im2col(x) A_cat^T -> h
  GemmParams sh = p;
  sh.cols = static_cast<int>(a.R); sh.b = a.down;
  sh.z = a.h; sh.z_sn = a.stride_hn; sh.z_sp = a.stride_hp; sh.z_sc = a.stride_hc;
  if (const char* e = launch_gemm<T, ShrinkCfg, kIm2col>(sh, stream)) return e;
  // 2. fused: y = im2col(x) W^T + bias + (H * S_n) B_cat^T
  GemmParams f = p;
  f.cols = static_cast<int>(a.C_out); f.b = a.weight; f.bias = a.bias; f.bias_s = a.stride_bias;
  f.z = a.y; f.z_sn = a.stride_yn; f.z_sp = a.stride_yp; f.z_sc = a.stride_yc;
  f.R = static_cast<int>(a.R); f.h = a.h; f.h_sn = a.stride_hn; f.h_sp = a.stride_hp; f.h_sc = a.stride_hc;
  f.up = a.up; f.up_sr = a.stride_ur; f.up_sc = a.stride_uc;
  f.pref = a.pref; f.P = static_cast<int>(a.P); f.div_rank = FastDiv(a.R / a.T); f.div_rps = FastDiv(HoWo);
  f.pref_sp = a.stride_pp; f.pref_st = a.stride_pt; f.scale = static_cast<float>(a.scale);
  return launch_gemm<T, FusedCfg, kIm2col>(f, stream);
}

inline const char* lora_conv2d_dispatch(const LoraConvArgs& a, void* stream) {
  if (const char* e = check_lora_conv2d(a)) return e;
  switch (a.dtype) {
    case kFloat16: return lora_conv2d_typed<__half>(a, stream);
    case kBFloat16: return lora_conv2d_typed<__nv_bfloat16>(a, stream);
    default: return lora_conv2d_typed<float>(a, stream);
  }
}

}  // namespace palora
