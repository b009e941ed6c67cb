// palora::pref_grad on CUDA: the preference gradient of the backward,
//   dp[p, t] = scale * sum_{n in sample p} sum_{j < rank} H[n, t*rank + j] * dG[n, t*rank + j]
// (sample p = rows [p*L, p*L + L) with L = rows_per_sample when P > 1; every row when P == 1).
// H and dG are (N, R) matrices, or the conv's (N_img, R, Ho, Wo) with its pixels as the rows
// (row n = image n / hw, pixel n % hw; any strides; L = hw for a per-image preference).
// One pass over H and dG, no (N, R) temporary, deterministic (no atomics):
//   1. partial: block (chunk, p, t) sums kPrefRows rows x rank of task t in fp32, a shared-memory
//      tree over its 128 threads, into partial[chunk, p*T + t];
//   2. finish: dp[p, t] = scale * sum over chunks in order.
#pragma once
#include "cuda/common.cuh"

namespace palora {

constexpr int kPrefThreads = 128;

struct PrefParams {
  const void* h;
  const void* dg;
  float* partial;
  float* out;
  int N, R, T, P, L, chunks;
  FastDiv div_rank, div_pt, div_hw;
  int64_t shn, shc, sgn, sgc, shp, sgp;
  float scale;
};

template <class T>
__global__ void __launch_bounds__(kPrefThreads) pref_grad_partial_kernel(PrefParams p) {
  PALORA_SHARED(raw, kPrefThreads * sizeof(float));
  float* red = reinterpret_cast<float*>(raw);
  const int tid = threadIdx.x;
  int chunk, pt;
  p.div_pt.divmod(static_cast<int>(blockIdx.x), chunk, pt);
  const int sample = pt / p.T, task = pt - sample * p.T;  // once per block
  const int rank = static_cast<int>(p.div_rank.d);
  const int first = chunk * kPrefRows;                     // row within the sample
  const int rows = (p.L - first) < kPrefRows ? (p.L - first) : kPrefRows;
  const int base = sample * p.L + first;
  const T* h = static_cast<const T*>(p.h);
  const T* g = static_cast<const T*>(p.dg);
  float acc = 0.f;
  for (int idx = tid; idx < rows * rank; idx += kPrefThreads) {
    int r, j;
    p.div_rank.divmod(idx, r, j);
    const int c = task * rank + j;
    int img, q;  // hw == 1 (2-D): img = the row, q = 0
    p.div_hw.divmod(base + r, img, q);
    acc += Num<T>::to_f(h[img * p.shn + q * p.shp + c * p.shc]) * Num<T>::to_f(g[img * p.sgn + q * p.sgp + c * p.sgc]);
  }
  red[tid] = acc;
  __syncthreads();
  for (int w = kPrefThreads / 2; w > 0; w /= 2) {
    if (tid < w) red[tid] += red[tid + w];
    __syncthreads();
  }
  if (tid == 0) p.partial[chunk * (p.P * p.T) + pt] = red[0];
}

__global__ void __launch_bounds__(kPrefThreads) pref_grad_finish_kernel(PrefParams p) {
  const int i = static_cast<int>(blockIdx.x) * kPrefThreads + static_cast<int>(threadIdx.x);
  if (i >= p.P * p.T) return;
  float s = 0.f;
  for (int c = 0; c < p.chunks; ++c) s += p.partial[c * (p.P * p.T) + i];
  p.out[i] = p.scale * s;
}

inline const char* check_pref_grad(const PrefGradArgs& a) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (a.dtype < kFloat32 || a.dtype > kBFloat16) return arg_error("pref_grad: dtype: expected 0, 1 or 2, got " + s(a.dtype));
  if (a.T < 1 || a.rank < 1 || a.R != a.T * a.rank)
    return arg_error("pref_grad: h: expected R = T * rank columns, got R = " + s(a.R) + ", T = " + s(a.T) + ", rank = " + s(a.rank));
  if (a.P < 1 || (a.P != 1 && a.P * a.rows_per_sample != a.N))
    return arg_error("pref_grad: pref: expected P == 1 or P * rows_per_sample == N = " + s(a.N) + ", got P = " + s(a.P) +
                     ", rows_per_sample = " + s(a.rows_per_sample));
  if (a.N < 0 || a.N >= 0x7fffffff || a.N * a.R >= 0x7fffffff)
    return arg_error("pref_grad: h: expected N * R < 2^31 - 1 (32-bit indices), got N = " + s(a.N) + ", R = " + s(a.R));
  if (a.hw < 1 || a.N % a.hw != 0)
    return arg_error("pref_grad: h: expected N = " + s(a.N) + " rows to be whole images of hw = " + s(a.hw) + " pixels");
  if (pref_grad_workspace(a) > 0x7fffffff) return arg_error("pref_grad: more than 2^31 - 1 blocks");
  if (!a.out || (a.N > 0 && (!a.h || !a.dg || !a.partial))) return arg_error("pref_grad: null pointer");
  return nullptr;
}

template <class T>
const char* pref_grad_typed(const PrefGradArgs& a, void* stream) {
  PrefParams p{};
  p.h = a.h; p.dg = a.dg; p.partial = a.partial; p.out = a.out;
  p.N = static_cast<int>(a.N); p.R = static_cast<int>(a.R); p.T = static_cast<int>(a.T); p.P = static_cast<int>(a.P);
  p.L = static_cast<int>(a.P == 1 ? a.N : a.rows_per_sample);
  p.chunks = static_cast<int>(cdiv(p.L, kPrefRows));
  p.div_rank = FastDiv(a.rank); p.div_pt = FastDiv(a.P * a.T); p.div_hw = FastDiv(a.hw);
  p.shn = a.stride_hn; p.shc = a.stride_hc; p.sgn = a.stride_gn; p.sgc = a.stride_gc;
  p.shp = a.stride_hp; p.sgp = a.stride_gp;
  p.scale = static_cast<float>(a.scale);
  if (p.chunks > 0) {
    PALORA_LAUNCH(dim3(static_cast<unsigned>(int64_t(p.chunks) * p.P * p.T)), dim3(kPrefThreads), 0, stream,
                  pref_grad_partial_kernel<T>)(p);
    if (const char* e = PALORA_LAST_ERROR()) return e;
  }
  PALORA_LAUNCH(dim3(static_cast<unsigned>(cdiv(int64_t(p.P) * p.T, kPrefThreads))), dim3(kPrefThreads), 0, stream,
                pref_grad_finish_kernel)(p);
  return PALORA_LAST_ERROR();
}

inline const char* pref_grad_dispatch(const PrefGradArgs& a, void* stream) {
  if (const char* e = check_pref_grad(a)) return e;
  switch (a.dtype) {
    case kFloat16: return pref_grad_typed<__half>(a, stream);
    case kBFloat16: return pref_grad_typed<__nv_bfloat16>(a, stream);
    default: return pref_grad_typed<float>(a, stream);
  }
}

}  // namespace palora
