// Plain C++ interface of the CUDA kernels: argument structs and entry points.
// No torch and no CUDA header: the torch bindings (bindings.cpp), the nvcc translation unit
// (kernels.cu) and the host emulator's C API (csrc/emu/emu_capi.cpp, loaded with ctypes)
// all fill the same structs. Field order matters to the ctypes mirror in
// palora_kernels/ops/cuda_sim.py: pointers, then int64 fields, then the double.
#pragma once
#include <cstdint>

namespace palora {

enum DType : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// z (N, M + R) = [x @ wm + bias + ((x @ down) * S) @ up | x @ down],
// S[n, t*rank + j] = scale * pref[n / rows_per_sample (0 when P == 1), t], rank = R / T.
struct LoraMMArgs {
  const void* x;      // (N, K)
  const void* wm;     // (K, M)
  const void* bias;   // (M,) or nullptr
  const void* down;   // (K, R)
  const void* up;     // (R, M)
  const float* pref;  // (P, T), fp32
  void* z;            // (N, M + R)
  int64_t dtype;      // DType of x, wm, bias, down, up, z
  int64_t N, K, M, R, P, T, rows_per_sample;
  int64_t stride_xn, stride_xk, stride_wk, stride_wm, stride_bias;
  int64_t stride_dk, stride_dr, stride_ur, stride_um, stride_pp, stride_pt, stride_zn, stride_zc;
  double scale;
};

// z (N, C_out + R, Ho, Wo) = [conv(x, W) + bias + B_cat diag(S_n) H_n | H_n], H = conv(x, A_cat),
// wcat = [W; A_cat] contiguous (C_out + R, C_in, kh, kw), z contiguous, P == 1 or P == N.
struct LoraConvArgs {
  const void* x;      // (N, C_in, H, W), any strides
  const void* wcat;   // (C_out + R, C_in, kh, kw), contiguous
  const void* bias;   // (C_out,) or nullptr
  const void* up;     // (C_out, R)
  const float* pref;  // (P, T), fp32
  void* z;            // (N, C_out + R, Ho, Wo), contiguous
  int64_t dtype;
  int64_t N, C_in, H, W, C_out, R, kh, kw, P, T;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, Ho, Wo;
  int64_t stride_xn, stride_xc, stride_xh, stride_xw;
  int64_t stride_bias, stride_uc, stride_ur, stride_pp, stride_pt;
  double scale;
};

// Both return nullptr on success, else a message naming the bad argument or the CUDA error.
const char* lora_mm_launch(const LoraMMArgs& args, void* stream);
const char* lora_conv2d_launch(const LoraConvArgs& args, void* stream);

}  // namespace palora
