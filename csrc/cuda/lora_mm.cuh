// palora::lora_mm on CUDA: y (N, M) = x wm + bias + ((x down) * S) up,  H (N, R) = x down.
// Two launches on one stream, no (N, M) temporary:
//   1. skinny shrink kernel:  H = x down             -> h   (tile 128 x 32: R is small)
//   2. fused kernel:          x wm + (H*S) up + bias -> y   (tile 64 x 64; the expand is
//      R extra steps of its K loop, reading H back)
// The same call serves the forward (W^T, A_cat^T, B_cat^T) and dX (W, B_cat, A_cat).
#pragma once
#include <string>
#include <utility>

#include "cuda/lora_gemm.cuh"

namespace palora {

inline const char* check_lora_mm(const LoraMMArgs& a) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (a.dtype < kFloat32 || a.dtype > kBFloat16) return arg_error("lora_mm: dtype: expected 0 (fp32), 1 (fp16) or 2 (bf16), got " + s(a.dtype));
  if (a.N < 0 || a.K < 0 || a.M < 0) return arg_error("lora_mm: x/wm: negative size");
  if (a.T < 1) return arg_error("lora_mm: pref: expected T >= 1 columns, got " + s(a.T));
  if (a.R < a.T || a.R % a.T != 0) return arg_error("lora_mm: down: expected R = T * rank columns with T = " + s(a.T) + ", got R = " + s(a.R));
  if (a.rows_per_sample < 1 && a.N > 0) return arg_error("lora_mm: rows_per_sample: expected >= 1, got " + s(a.rows_per_sample));
  if (a.P != 1 && a.P * a.rows_per_sample != a.N)
    return arg_error("lora_mm: pref: expected P == 1 or P * rows_per_sample == N = " + s(a.N) + ", got P = " + s(a.P) + ", rows_per_sample = " + s(a.rows_per_sample));
  if (a.N > 0 && (!a.x || !a.y || !a.h || !a.pref)) return arg_error("lora_mm: x, pref, y and h must not be null");
  if (a.N > 0 && ((a.K > 0 && (!a.wm || !a.down)) || !a.up)) return arg_error("lora_mm: wm, down and up must not be null");
  return nullptr;
}


template <class T>
const char* lora_mm_typed(const LoraMMArgs& a, void* stream) {
  for (auto [what, v] : {std::pair<const char*, int64_t>{"x.shape[0] (N)", a.N}, {"x.shape[1] (K)", a.K},
                         {"wm.shape[1] (M)", a.M}, {"down.shape[1] (R)", a.R}})
    if (const char* e = check_int32("lora_mm", what, v)) return e;
  GemmParams p{};
  p.a = a.x; p.a_sm = a.stride_xn; p.a_sk = a.stride_xk;
  p.rows = static_cast<int>(a.N); p.K = static_cast<int>(a.K);
  p.div_hw = FastDiv(1); p.z_sp = 0;
  // 1. shrink: H = x down -> h
  GemmParams sh = p;
  sh.cols = static_cast<int>(a.R); sh.b = a.down; sh.b_sk = a.stride_dk; sh.b_sc = a.stride_dr;
  sh.z = a.h; sh.z_sn = a.stride_hn; sh.z_sc = a.stride_hc;
  if (const char* e = launch_gemm<T, ShrinkCfg, kDense>(sh, stream)) return e;
  // 2. fused: y = x wm + bias + (H * S) up
  GemmParams f = p;
  f.z = a.y; f.z_sn = a.stride_yn; f.z_sc = a.stride_yc;
  f.cols = static_cast<int>(a.M); f.b = a.wm; f.b_sk = a.stride_wk; f.b_sc = a.stride_wm;
  f.bias = a.bias; f.bias_s = a.stride_bias;
  f.R = static_cast<int>(a.R); f.h = a.h; f.h_sn = a.stride_hn; f.h_sp = 0; f.h_sc = a.stride_hc;
  f.up = a.up; f.up_sr = a.stride_ur; f.up_sc = a.stride_um;
  f.pref = a.pref; f.P = static_cast<int>(a.P); f.div_rank = FastDiv(a.R / a.T);
  f.div_rps = FastDiv(a.rows_per_sample < 1 ? 1 : a.rows_per_sample);
  f.pref_sp = a.stride_pp; f.pref_st = a.stride_pt; f.scale = static_cast<float>(a.scale);
  return launch_gemm<T, FusedCfg, kDense>(f, stream);
}

inline const char* lora_mm_dispatch(const LoraMMArgs& a, void* stream) {
  if (const char* e = check_lora_mm(a)) return e;
  switch (a.dtype) {
    case kFloat16: return lora_mm_typed<__half>(a, stream);
    case kBFloat16: return lora_mm_typed<__nv_bfloat16>(a, stream);
    default: return lora_mm_typed<float>(a, stream);
  }
}

}  // namespace palora
