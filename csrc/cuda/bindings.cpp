// Torch bindings of the CUDA kernels: palora::lora_mm_cuda, palora::lora_conv2d_cuda,
// palora::lora_conv2d_dgrad_cuda, palora::lora_conv2d_wgrad_cuda and palora::pref_grad_cuda (the CUDA
// kernel of the op the CPU side calls palora::pref_grad; it also takes the conv's 4-D H).
//
// palora::lora_mm / palora::lora_conv2d are Python custom ops (palora_kernels/_ops.py) that
// dispatch on their `backend` string; a C++ TORCH_LIBRARY_IMPL(palora, CUDA) of those same
// names would fight the Python implementation for the CUDA dispatch key. So the CUDA kernels
// get their own op names, and palora_kernels/ops/cuda_kernels.py registers them as the
// "cuda" backend's kernels (docs/cuda.md).
// Build time (docs/cuda.md, Build): the core Tensor and the operator headers used, not <ATen/ATen.h>
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cusparse.h, absent from slim toolkits
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cuda/palora_cuda.h"

namespace palora {
namespace {

int64_t dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "x: expected dtype float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return -1;
}

void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, ": expected device ", x.device(), " (x's), got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, ": expected dtype ", x.scalar_type(),
              " (x's), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, ": expected ", dim, " dims, got shape ", t.sizes());
}

at::Tensor pref_fp32(const char* op, const at::Tensor& pref, const at::Tensor& x) {
  TORCH_CHECK(pref.device() == x.device(), op, ": pref: expected device ", x.device(), ", got ", pref.device());
  TORCH_CHECK(pref.dim() == 2 && pref.size(1) >= 1, op, ": pref: expected (P, T), got shape ", pref.sizes());
  TORCH_CHECK(pref.is_floating_point(), op, ": pref: expected a floating dtype, got ", pref.scalar_type());
  return pref.to(at::kFloat);
}

// H's row stride: a multiple of 16 elements (palora_kernels/backends/cuda: h_row_align)
int64_t padded_rows(int64_t R) { return (R + 15) / 16 * 16; }

at::MemoryFormat conv_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

std::tuple<at::Tensor, at::Tensor> lora_mm_cuda(const at::Tensor& x, const at::Tensor& wm, const std::optional<at::Tensor>& bias,
                        const at::Tensor& down, const at::Tensor& up, const at::Tensor& pref,
                        int64_t rows_per_sample, double scale) {
  const char* op = "lora_mm_cuda";
  TORCH_CHECK(x.is_cuda(), op, ": x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x: expected (N, K), got shape ", x.sizes());
  const int64_t dtype = dtype_code(x);
  check_operand(op, "wm", wm, x, 2);
  check_operand(op, "down", down, x, 2);
  check_operand(op, "up", up, x, 2);
  const int64_t N = x.size(0), K = x.size(1), M = wm.size(1), R = down.size(1);
  TORCH_CHECK(wm.size(0) == K, op, ": wm: expected (", K, ", M), got ", wm.sizes());
  TORCH_CHECK(down.size(0) == K, op, ": down: expected (", K, ", R), got ", down.sizes());
  TORCH_CHECK(up.size(0) == R && up.size(1) == M, op, ": up: expected (", R, ", ", M, "), got ", up.sizes());
  if (bias) {
    check_operand(op, "bias", *bias, x, 1);
    TORCH_CHECK(bias->size(0) == M, op, ": bias: expected (", M, ",), got ", bias->sizes());
  }
  const at::Tensor p = pref_fp32(op, pref, x);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({N, M}, x.options());
  at::Tensor h = at::empty_strided({N, R}, {padded_rows(R), 1}, x.options());
  LoraMMArgs a{};
  a.x = x.data_ptr(); a.wm = wm.data_ptr(); a.bias = bias ? bias->data_ptr() : nullptr;
  a.down = down.data_ptr(); a.up = up.data_ptr(); a.pref = p.data_ptr<float>();
  a.y = y.data_ptr(); a.h = h.data_ptr();
  a.dtype = dtype; a.N = N; a.K = K; a.M = M; a.R = R; a.P = p.size(0); a.T = p.size(1);
  a.rows_per_sample = rows_per_sample;
  a.stride_xn = x.stride(0); a.stride_xk = x.stride(1); a.stride_wk = wm.stride(0); a.stride_wm = wm.stride(1);
  a.stride_bias = bias ? bias->stride(0) : 0;
  a.stride_dk = down.stride(0); a.stride_dr = down.stride(1); a.stride_ur = up.stride(0); a.stride_um = up.stride(1);
  a.stride_pp = p.stride(0); a.stride_pt = p.stride(1);
  a.stride_yn = y.stride(0); a.stride_yc = y.stride(1); a.stride_hn = h.stride(0); a.stride_hc = h.stride(1);
  a.scale = scale;
  const char* err = lora_mm_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> lora_conv2d_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& down, const std::optional<at::Tensor>& bias,
    const at::Tensor& up, const at::Tensor& pref, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, double scale) {
  const char* op = "lora_conv2d_cuda";
  TORCH_CHECK(x.is_cuda(), op, ": x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x: expected (N, C_in, H, W), got shape ", x.sizes());
  const int64_t dtype = dtype_code(x);
  check_operand(op, "weight", weight, x, 4);
  check_operand(op, "down", down, x, 4);
  check_operand(op, "up", up, x, 2);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding, dilation: expected 2 values each, got ", stride, ", ", padding, ", ", dilation);
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t C_out = up.size(0), R = up.size(1), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(weight.size(0) == C_out && weight.size(1) == C_in, op, ": weight: expected (", C_out, ", ", C_in,
              ", kh, kw), got ", weight.sizes());
  TORCH_CHECK(down.size(0) == R && down.size(1) == C_in && down.size(2) == kh && down.size(3) == kw, op,
              ": down: expected (", R, ", ", C_in, ", ", kh, ", ", kw, "), got ", down.sizes());
  if (bias) {
    check_operand(op, "bias", *bias, x, 1);
    TORCH_CHECK(bias->size(0) == C_out, op, ": bias: expected (", C_out, ",), got ", bias->sizes());
  }
  const at::Tensor p = pref_fp32(op, pref, x);
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, op, ": x: input ", H, "x", W, " is too small for kernel ", kh, "x", kw);
  c10::cuda::CUDAGuard guard(x.device());
  // the kernel reads weight and down as (channels, C_in*kh*kw) row-major
  const at::Tensor w = weight.contiguous(), d = down.contiguous();
  const auto fmt = conv_format(x);
  at::Tensor y = at::empty({N, C_out, Ho, Wo}, x.options().memory_format(fmt));
  at::Tensor h = at::empty({N, R, Ho, Wo}, x.options().memory_format(fmt));
  LoraConvArgs a{};
  a.x = x.data_ptr(); a.weight = w.data_ptr(); a.down = d.data_ptr(); a.bias = bias ? bias->data_ptr() : nullptr;
  a.up = up.data_ptr(); a.pref = p.data_ptr<float>(); a.y = y.data_ptr(); a.h = h.data_ptr();
  a.dtype = dtype; a.N = N; a.C_in = C_in; a.H = H; a.W = W; a.C_out = C_out; a.R = R; a.kh = kh; a.kw = kw;
  a.P = p.size(0); a.T = p.size(1);
  a.stride_h = stride[0]; a.stride_w = stride[1]; a.pad_h = padding[0]; a.pad_w = padding[1];
  a.dil_h = dilation[0]; a.dil_w = dilation[1]; a.Ho = Ho; a.Wo = Wo;
  a.stride_xn = x.stride(0); a.stride_xc = x.stride(1); a.stride_xh = x.stride(2); a.stride_xw = x.stride(3);
  a.stride_bias = bias ? bias->stride(0) : 0; a.stride_uc = up.stride(0); a.stride_ur = up.stride(1);
  a.stride_pp = p.stride(0); a.stride_pt = p.stride(1); a.scale = scale;
  a.stride_yn = y.stride(0); a.stride_yp = y.stride(3); a.stride_yc = y.stride(1);
  a.stride_hn = h.stride(0); a.stride_hp = h.stride(3); a.stride_hc = h.stride(1);
  const char* err = lora_conv2d_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> lora_conv2d_dgrad_cuda(
    const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& down, const at::Tensor& up, const at::Tensor& pref,
    at::IntArrayRef x_hw, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, double scale) {
  const char* op = "lora_conv2d_dgrad_cuda";
  TORCH_CHECK(dy.is_cuda(), op, ": dy: expected a CUDA tensor, got device ", dy.device());
  TORCH_CHECK(dy.dim() == 4, op, ": dy: expected (N, C_out, Ho, Wo), got shape ", dy.sizes());
  const int64_t dtype = dtype_code(dy);
  check_operand(op, "weight", weight, dy, 4);
  check_operand(op, "down", down, dy, 4);
  check_operand(op, "up", up, dy, 2);
  TORCH_CHECK(x_hw.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": x_hw, stride, padding, dilation: expected 2 values each, got ", x_hw, ", ", stride, ", ", padding, ", ", dilation);
  const int64_t N = dy.size(0), C_out = dy.size(1), Ho = dy.size(2), Wo = dy.size(3);
  const int64_t C_in = weight.size(1), kh = weight.size(2), kw = weight.size(3), R = down.size(0);
  TORCH_CHECK(weight.size(0) == C_out, op, ": weight: expected (", C_out, ", C_in, kh, kw), got ", weight.sizes());
  TORCH_CHECK(down.size(1) == C_in && down.size(2) == kh && down.size(3) == kw, op, ": down: expected (R, ", C_in, ", ", kh,
              ", ", kw, "), got ", down.sizes());
  TORCH_CHECK(up.size(0) == C_out && up.size(1) == R, op, ": up: expected (", C_out, ", ", R, "), got ", up.sizes());
  const at::Tensor p = pref_fp32(op, pref, dy);
  c10::cuda::CUDAGuard guard(dy.device());
  const at::Tensor w = weight.contiguous(), d = down.contiguous();
  const auto fmt = conv_format(dy);
  at::Tensor dx = at::empty({N, C_in, x_hw[0], x_hw[1]}, dy.options().memory_format(fmt));
  at::Tensor dg = at::empty({N, R, Ho, Wo}, dy.options().memory_format(fmt));
  LoraConvDgradArgs a{};
  a.dy = dy.data_ptr(); a.weight = w.data_ptr(); a.down = d.data_ptr(); a.up = up.data_ptr(); a.pref = p.data_ptr<float>();
  a.dx = dx.data_ptr(); a.dg = dg.data_ptr();
  a.dtype = dtype; a.N = N; a.C_in = C_in; a.H = x_hw[0]; a.W = x_hw[1]; a.C_out = C_out; a.R = R; a.kh = kh; a.kw = kw;
  a.P = p.size(0); a.T = p.size(1);
  a.stride_h = stride[0]; a.stride_w = stride[1]; a.pad_h = padding[0]; a.pad_w = padding[1];
  a.dil_h = dilation[0]; a.dil_w = dilation[1]; a.Ho = Ho; a.Wo = Wo;
  a.stride_dyn = dy.stride(0); a.stride_dyc = dy.stride(1); a.stride_dyh = dy.stride(2); a.stride_dyw = dy.stride(3);
  a.stride_uc = up.stride(0); a.stride_ur = up.stride(1); a.stride_pp = p.stride(0); a.stride_pt = p.stride(1);
  a.stride_xn = dx.stride(0); a.stride_xp = dx.stride(3); a.stride_xc = dx.stride(1);
  a.stride_gn = dg.stride(0); a.stride_gp = dg.stride(3); a.stride_gc = dg.stride(1);
  a.scale = scale;
  const char* err = lora_conv2d_dgrad_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  return {dx, dg};
}

// h, dg: (N, R), or the conv's (N, R, Ho, Wo) whose N*Ho*Wo pixels are the rows (rows_per_sample = Ho*Wo
// for a per-image preference); the 4-D kernel walks pixel q at q * stride(3), so pixels must be dense
at::Tensor pref_grad_cuda(const at::Tensor& h_in, const at::Tensor& dg_in, const at::Tensor& pref, int64_t rows_per_sample,
                          int64_t rank, double scale) {
  const char* op = "pref_grad_cuda";
  TORCH_CHECK(h_in.is_cuda(), op, ": h: expected a CUDA tensor, got device ", h_in.device());
  TORCH_CHECK(h_in.dim() == 2 || h_in.dim() == 4, op, ": h: expected (N, R) or (N, R, Ho, Wo), got shape ", h_in.sizes());
  const int64_t dtype = dtype_code(h_in);
  check_operand(op, "dg", dg_in, h_in, h_in.dim());
  TORCH_CHECK(dg_in.sizes() == h_in.sizes(), op, ": dg: expected ", h_in.sizes(), " (h's shape), got ", dg_in.sizes());
  TORCH_CHECK(pref.device() == h_in.device(), op, ": pref: expected device ", h_in.device(), ", got ", pref.device());
  TORCH_CHECK(pref.dim() == 2 && pref.is_floating_point(), op, ": pref: expected a floating (P, T), got ",
              pref.scalar_type(), " ", pref.sizes());
  c10::cuda::CUDAGuard guard(h_in.device());
  auto pixels = [](const at::Tensor& t) {  // dense pixels (NCHW or NHWC), else a copy
    return t.dim() == 4 && t.size(2) > 1 && t.stride(2) != t.size(3) * t.stride(3) ? t.contiguous() : t;
  };
  const at::Tensor h = pixels(h_in), dg = pixels(dg_in);
  const bool conv = h.dim() == 4;
  at::Tensor out = at::empty({pref.size(0), pref.size(1)}, h.options().dtype(at::kFloat));
  PrefGradArgs a{};
  a.h = h.data_ptr(); a.dg = dg.data_ptr(); a.out = out.data_ptr<float>();
  a.hw = conv ? h.size(2) * h.size(3) : 1;
  a.dtype = dtype; a.N = h.size(0) * a.hw; a.R = h.size(1); a.T = pref.size(1); a.rank = rank; a.P = pref.size(0);
  a.rows_per_sample = rows_per_sample;
  a.stride_hn = h.stride(0); a.stride_hc = h.stride(1); a.stride_gn = dg.stride(0); a.stride_gc = dg.stride(1);
  a.stride_hp = conv ? h.stride(3) : 0; a.stride_gp = conv ? dg.stride(3) : 0;
  a.scale = scale;
  TORCH_CHECK(a.T >= 1 && rank >= 1 && a.R == a.T * rank, op, ": h: expected R = T * rank = ", a.T, " * ", rank,
              " columns, got ", a.R);
  at::Tensor partial = at::empty({std::max<int64_t>(pref_grad_workspace(a), 1)}, out.options());
  a.partial = partial.data_ptr<float>();
  const char* err = pref_grad_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  return out.to(pref.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> lora_conv2d_wgrad_cuda(
    const at::Tensor& x, const at::Tensor& dy, const at::Tensor& dg, const at::Tensor& pref, at::IntArrayRef kernel_hw,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, double scale, bool need_weight) {
  const char* op = "lora_conv2d_wgrad_cuda";
  TORCH_CHECK(x.is_cuda(), op, ": x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x: expected (N, C_in, H, W), got shape ", x.sizes());
  const int64_t dtype = dtype_code(x);
  check_operand(op, "dy", dy, x, 4);
  check_operand(op, "dg", dg, x, 4);
  TORCH_CHECK(kernel_hw.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_hw, stride, padding, dilation: expected 2 values each, got ", kernel_hw, ", ", stride, ", ",
              padding, ", ", dilation);
  const int64_t N = x.size(0), C_in = x.size(1), C_out = dy.size(1), R = dg.size(1), kh = kernel_hw[0], kw = kernel_hw[1];
  TORCH_CHECK(dy.size(0) == N && dg.size(0) == N && dg.size(2) == dy.size(2) && dg.size(3) == dy.size(3), op,
              ": dy, dg: expected (", N, ", C, Ho, Wo) on one grid, got ", dy.sizes(), " and ", dg.sizes());
  const at::Tensor p = pref_fp32(op, pref, x);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dw = at::empty({need_weight ? C_out : 0, C_in, kh, kw}, x.options());
  at::Tensor da = at::empty({R, C_in, kh, kw}, x.options());
  LoraConvWgradArgs a{};
  a.x = x.data_ptr(); a.dy = dy.data_ptr(); a.dg = dg.data_ptr(); a.pref = p.data_ptr<float>();
  a.dw = need_weight ? dw.data_ptr() : nullptr; a.da = da.data_ptr();
  a.dtype = dtype; a.N = N; a.C_in = C_in; a.H = x.size(2); a.W = x.size(3); a.C_out = C_out; a.R = R; a.kh = kh; a.kw = kw;
  a.P = p.size(0); a.T = p.size(1);
  a.stride_h = stride[0]; a.stride_w = stride[1]; a.pad_h = padding[0]; a.pad_w = padding[1];
  a.dil_h = dilation[0]; a.dil_w = dilation[1]; a.Ho = dy.size(2); a.Wo = dy.size(3);
  a.stride_xn = x.stride(0); a.stride_xc = x.stride(1); a.stride_xh = x.stride(2); a.stride_xw = x.stride(3);
  a.stride_dyn = dy.stride(0); a.stride_dyc = dy.stride(1); a.stride_dyh = dy.stride(2); a.stride_dyw = dy.stride(3);
  a.stride_gn = dg.stride(0); a.stride_gc = dg.stride(1); a.stride_gh = dg.stride(2); a.stride_gw = dg.stride(3);
  a.stride_pp = p.stride(0); a.stride_pt = p.stride(1);
  a.need_weight = need_weight; a.splits = 0; a.scale = scale;
  at::Tensor ws = at::empty({std::max<int64_t>(lora_conv2d_wgrad_workspace(a), 1)}, x.options().dtype(at::kFloat));
  a.workspace = ws.data_ptr<float>();
  const char* err = lora_conv2d_wgrad_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  return {dw, da};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(palora, m) {
  m.def("lora_mm_cuda(Tensor x, Tensor wm, Tensor? bias, Tensor down, Tensor up, Tensor pref, "
        "int rows_per_sample, float scale) -> (Tensor, Tensor)");
  m.def("lora_conv2d_cuda(Tensor x, Tensor weight, Tensor down, Tensor? bias, Tensor up, Tensor pref, "
        "int[] stride, int[] padding, int[] dilation, float scale) -> (Tensor, Tensor)");
  m.def("lora_conv2d_dgrad_cuda(Tensor dy, Tensor weight, Tensor down, Tensor up, Tensor pref, int[] x_hw, "
        "int[] stride, int[] padding, int[] dilation, float scale) -> (Tensor, Tensor)");
  m.def("pref_grad_cuda(Tensor h, Tensor dg, Tensor pref, int rows_per_sample, int rank, float scale) -> Tensor");
  m.def("lora_conv2d_wgrad_cuda(Tensor x, Tensor dy, Tensor dg, Tensor pref, int[] kernel_hw, int[] stride, "
        "int[] padding, int[] dilation, float scale, bool need_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(palora, CUDA, m) {
  m.impl("lora_mm_cuda", &lora_mm_cuda);
  m.impl("lora_conv2d_cuda", &lora_conv2d_cuda);
  m.impl("pref_grad_cuda", &pref_grad_cuda);
  m.impl("lora_conv2d_dgrad_cuda", &lora_conv2d_dgrad_cuda);
  m.impl("lora_conv2d_wgrad_cuda", &lora_conv2d_wgrad_cuda);
}

}  // namespace palora

// ---- MTLoRA: palora::mtlora_mm_cuda and palora::mtlora_mm_dgrad_cuda (csrc/cuda/mtlora_mm.cuh). The
// Python wrappers (palora_kernels/backends/cuda/mtlora.py) sum dBase = sum_o dY_o and build the
// per-column scale rows; these ops run the kernels, LoRA dropout (p, seed, offset) included.
namespace palora {
namespace {

int64_t mtlora_ranks(const char* op, at::IntArrayRef ranks, int64_t* out) {
  TORCH_CHECK(!ranks.empty() && static_cast<int64_t>(ranks.size()) <= kMTLoraMaxAdapters, op, ": ranks: expected 1 .. ",
              kMTLoraMaxAdapters, " adapters, got ", ranks.size());
  int64_t R = 0;
  for (size_t a = 0; a < ranks.size(); ++a) {
    TORCH_CHECK(ranks[a] >= 0, op, ": ranks[", a, "]: expected >= 0, got ", ranks[a]);
    out[a] = ranks[a];
    R += ranks[a];
  }
  return R;
}

std::tuple<at::Tensor, at::Tensor> mtlora_mm_cuda(const at::Tensor& x, at::TensorList xs, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                  const at::Tensor& B, at::IntArrayRef ranks, const at::Tensor& scales,
                                                  int64_t groups, bool s2t, double p, int64_t seed, int64_t offset) {
  const char* op = "mtlora_mm_cuda";
  TORCH_CHECK(x.is_cuda(), op, ": x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x: expected (N, K), got shape ", x.sizes());
  MTLoraMMArgs a{};
  a.dtype = dtype_code(x);
  check_operand(op, "weight", weight, x, 2);
  check_operand(op, "A", A, x, 2);
  check_operand(op, "B", B, x, 2);
  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0), T1 = static_cast<int64_t>(ranks.size());
  const int64_t R = mtlora_ranks(op, ranks, a.ranks);
  TORCH_CHECK(groups >= 1 && M % groups == 0, op, ": groups: expected >= 1 dividing weight.shape[0] = ", M, ", got ", groups);
  TORCH_CHECK(weight.size(1) == K, op, ": weight: expected (M, ", K, "), got ", weight.sizes());
  TORCH_CHECK(A.size(0) == groups * R && A.size(1) == K, op, ": A: expected (", groups * R, ", ", K, "), got ", A.sizes());
  TORCH_CHECK(B.size(0) == M && B.size(1) == R, op, ": B: expected (", M, ", ", R, "), got ", B.sizes());
  TORCH_CHECK(xs.empty() || static_cast<int64_t>(xs.size()) == T1 - 1, op, ": xs: expected 0 or ", T1 - 1,
              " task inputs, got ", xs.size());
  if (bias) {
    check_operand(op, "bias", *bias, x, 1);
    TORCH_CHECK(bias->size(0) == M, op, ": bias: expected (", M, ",), got ", bias->sizes());
  }
  TORCH_CHECK(scales.device() == x.device() && scales.dim() == 2 && scales.size(0) == groups && scales.size(1) == T1, op,
              ": scales: expected (", groups, ", ", T1, ") on ", x.device(), ", got ", scales.sizes(), " on ", scales.device());
  c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> xc;   // the kernels read every task input with one set of strides
  std::vector<const void*> xp;
  for (size_t i = 0; i < xs.size(); ++i) {
    check_operand(op, "xs[i]", xs[i], x, 2);
    TORCH_CHECK(xs[i].sizes() == x.sizes(), op, ": xs[", i, "]: expected ", x.sizes(), " (x's shape), got ", xs[i].sizes());
    xc.push_back(xs[i].contiguous());
    xp.push_back(xc.back().data_ptr());
  }
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({T1, N, M}, x.options());
  at::Tensor h = at::empty_strided({N, groups * R}, {padded_rows(groups * R), 1}, x.options());
  at::Tensor work = at::empty({p > 0.0 ? groups * N * K : 0}, x.options());   // each group's dropped x
  a.work = p > 0.0 ? work.data_ptr() : nullptr; a.p = p; a.seed = seed; a.offset = offset;
  a.x = x.data_ptr(); a.xs = xp.empty() ? nullptr : xp.data(); a.weight = weight.data_ptr();
  a.bias = bias ? bias->data_ptr() : nullptr; a.A = A.data_ptr(); a.B = B.data_ptr(); a.scales = s.data_ptr<float>();
  a.y = y.data_ptr(); a.h = h.data_ptr();
  a.N = N; a.K = K; a.M = M; a.G = groups; a.T1 = T1; a.n_xs = static_cast<int64_t>(xs.size()); a.s2t = s2t;
  a.stride_xn = x.stride(0); a.stride_xk = x.stride(1);
  a.stride_xsn = xc.empty() ? 0 : xc[0].stride(0); a.stride_xsk = xc.empty() ? 0 : xc[0].stride(1);
  a.stride_wm = weight.stride(0); a.stride_wk = weight.stride(1); a.stride_bias = bias ? bias->stride(0) : 0;
  a.stride_ar = A.stride(0); a.stride_ak = A.stride(1); a.stride_bm = B.stride(0); a.stride_br = B.stride(1);
  a.stride_yo = y.stride(0); a.stride_yn = y.stride(1); a.stride_ym = y.stride(2); a.stride_hn = h.stride(0);
  const char* err = mtlora_mm_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  return {y, h};
}

// (dX (N, K) or (0, K), dXs (n_xs, N, K) or (0, N, K), dG (N, G*R)); dbase = sum_o dY_o (needed by
// need_x and s2t), col_scales (T1, G*R) fp32 as MTLoraDgradArgs says
std::tuple<at::Tensor, at::Tensor, at::Tensor> mtlora_mm_dgrad_cuda(
    at::TensorList dys, const std::optional<at::Tensor>& dbase, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, at::IntArrayRef ranks, const at::Tensor& col_scales, int64_t groups, bool s2t, bool need_x,
    int64_t n_xs, double p, int64_t seed, int64_t offset) {
  const char* op = "mtlora_mm_dgrad_cuda";
  MTLoraDgradArgs a{};
  const int64_t T1 = static_cast<int64_t>(ranks.size());
  const int64_t R = mtlora_ranks(op, ranks, a.ranks);
  TORCH_CHECK(static_cast<int64_t>(dys.size()) == T1, op, ": dys: expected ", T1, " output gradients, got ", dys.size());
  const at::Tensor& d0 = dys[0];
  TORCH_CHECK(d0.is_cuda() && d0.dim() == 2, op, ": dys[0]: expected a CUDA (N, M) tensor, got ", d0.sizes(), " on ", d0.device());
  a.dtype = dtype_code(d0);
  check_operand(op, "weight", weight, d0, 2);
  check_operand(op, "A", A, d0, 2);
  check_operand(op, "B", B, d0, 2);
  const int64_t N = d0.size(0), M = d0.size(1), K = weight.size(1);
  TORCH_CHECK(groups >= 1 && M % groups == 0, op, ": groups: expected >= 1 dividing M = ", M, ", got ", groups);
  TORCH_CHECK(weight.size(0) == M, op, ": weight: expected (", M, ", K), got ", weight.sizes());
  TORCH_CHECK(A.size(0) == groups * R && A.size(1) == K, op, ": A: expected (", groups * R, ", ", K, "), got ", A.sizes());
  TORCH_CHECK(B.size(0) == M && B.size(1) == R, op, ": B: expected (", M, ", ", R, "), got ", B.sizes());
  TORCH_CHECK(n_xs == 0 || n_xs == T1 - 1, op, ": n_xs: expected 0 or ", T1 - 1, ", got ", n_xs);
  TORCH_CHECK(col_scales.device() == d0.device() && col_scales.dim() == 2 && col_scales.size(0) == T1 &&
              col_scales.size(1) == groups * R, op, ": col_scales: expected (", T1, ", ", groups * R, ") on ", d0.device(),
              ", got ", col_scales.sizes(), " on ", col_scales.device());
  TORCH_CHECK(!(need_x || s2t) || dbase.has_value(), op, ": dbase: expected sum_o dY_o (dX or s2t needs it), got None");
  c10::cuda::CUDAGuard guard(d0.device());
  std::vector<at::Tensor> dc;   // one set of strides for every gradient and dbase
  std::vector<const void*> dp;
  for (size_t i = 0; i < dys.size(); ++i) {
    check_operand(op, "dys[i]", dys[i], d0, 2);
    TORCH_CHECK(dys[i].sizes() == d0.sizes(), op, ": dys[", i, "]: expected ", d0.sizes(), ", got ", dys[i].sizes());
    dc.push_back(dys[i].contiguous());
    dp.push_back(dc.back().data_ptr());
  }
  at::Tensor db;
  if (dbase) {
    check_operand(op, "dbase", *dbase, d0, 2);
    TORCH_CHECK(dbase->sizes() == d0.sizes(), op, ": dbase: expected ", d0.sizes(), ", got ", dbase->sizes());
    db = dbase->contiguous();
  }
  const at::Tensor cs = col_scales.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty({need_x ? N : 0, K}, d0.options());
  at::Tensor dxs = at::empty({need_x ? n_xs : 0, N, K}, d0.options());
  at::Tensor dg = at::empty({N, groups * R}, d0.options());
  at::Tensor work = at::empty({p > 0.0 && need_x ? N * K : 0}, d0.options());   // drop_g(dH_g A_g) before its mask
  a.work = p > 0.0 && need_x ? work.data_ptr() : nullptr; a.p = p; a.seed = seed; a.offset = offset;
  a.dys = dp.data(); a.dbase = db.defined() ? db.data_ptr() : nullptr; a.weight = weight.data_ptr(); a.A = A.data_ptr();
  a.B = B.data_ptr(); a.col_scales = cs.data_ptr<float>(); a.dx = need_x ? dx.data_ptr() : nullptr;
  a.dxs = need_x && n_xs ? dxs.data_ptr() : nullptr; a.dg = dg.data_ptr();
  a.N = N; a.K = K; a.M = M; a.G = groups; a.T1 = T1; a.n_xs = n_xs; a.s2t = s2t; a.need_x = need_x;
  a.stride_dyn = dc[0].stride(0); a.stride_dym = dc[0].stride(1); a.stride_wm = weight.stride(0); a.stride_wk = weight.stride(1);
  a.stride_ar = A.stride(0); a.stride_ak = A.stride(1); a.stride_bm = B.stride(0); a.stride_br = B.stride(1);
  a.stride_dxn = K; a.stride_dxso = N * K; a.stride_dxsn = K; a.stride_gn = dg.stride(0);
  const char* err = mtlora_mm_dgrad_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  return {dx, dxs, dg};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(palora, m) {
  m.def("mtlora_mm_cuda(Tensor x, Tensor[] xs, Tensor weight, Tensor? bias, Tensor A, Tensor B, int[] ranks, "
        "Tensor scales, int groups, bool shared_to_tasks, float p, int seed, int offset) -> (Tensor, Tensor)");
  m.def("mtlora_mm_dgrad_cuda(Tensor[] dys, Tensor? dbase, Tensor weight, Tensor A, Tensor B, int[] ranks, "
        "Tensor col_scales, int groups, bool shared_to_tasks, bool need_x, int n_xs, float p, int seed, int offset) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(palora, CUDA, m) {
  m.impl("mtlora_mm_cuda", &mtlora_mm_cuda);
  m.impl("mtlora_mm_dgrad_cuda", &mtlora_mm_dgrad_cuda);
}

}  // namespace palora
