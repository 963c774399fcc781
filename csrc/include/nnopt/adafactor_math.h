// Adafactor's per-element and per-tensor math (torch.optim.Adafactor's for-loop path, op for op), shared by the
// CPU (csrc/cpu/fused_adafactor.cpp) and CUDA (csrc/cuda/fused_adafactor.cu) kernels. Reference and conventions:
// nnopt/reference/fused_optim.py (adafactor_step) and csrc/ops.cpp.
//
// A parameter of 2+ dims is a stack of B matrices R x C (the last two dims); row_var holds B*R entries, col_var B*C.
// Torch's reductions are float norms (`||g_row||` rounded to T, then squared and divided), and its per-tensor
// scalars are Python floats formed from T-rounded norms: we round the same way (sums are accumulated wider).
#pragma once

#include <cmath>

#include "nnopt/optim_math.h"

namespace nnopt {
namespace optim {

struct AdafactorArgs {
  double lr, beta2_decay, eps1, eps2, d, weight_decay, l1, grad_scale, step;
  bool maximize;
};

template <typename T>
struct AdafactorScalars {
  T w, decay, eps1, eps1_sq, grad_scale, neg, l1_thr;
  double rho, eps2, d;
};

template <typename T>
NNOPT_HD inline AdafactorScalars<T> make_adafactor(double lr, const AdafactorArgs& a) {
  AdafactorScalars<T> s;
  s.w = T(pow(a.step, a.beta2_decay));
  const double inv_sqrt = 1 / pow(a.step, 0.5);
  s.rho = lr < inv_sqrt ? lr : inv_sqrt;
  s.decay = T(1 - lr * a.weight_decay);
  s.eps1 = T(a.eps1);
  s.eps1_sq = T(a.eps1 * a.eps1);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  s.eps2 = a.eps2;
  s.d = a.d;
  return s;
}

// The mean of g² over n entries from their sum of squares: torch.norm (rounded to T), squared, divided by n.
template <typename T>
NNOPT_HD inline T adafactor_mean_sq(double sum_sq, int64_t n) {
  const T norm = T(sqrt(sum_sq));
  return (norm * norm) / T(n);
}

// alpha = max(eps2, ||p||/sqrt(numel)) * rho, with ||p|| rounded to T as torch's param.norm().item().
template <typename T>
NNOPT_HD inline double adafactor_alpha(double p_sum_sq, int64_t numel, const AdafactorScalars<T>& h) {
  const double rms = double(T(sqrt(p_sum_sq))) / sqrt(double(numel));
  return (rms > h.eps2 ? rms : h.eps2) * h.rho;
}

// The coefficient of the update: -alpha / max(1, RMS(u)/d), rounded to T as torch's add_(alpha=...).
template <typename T>
NNOPT_HD inline T adafactor_coef(double alpha, double u_sum_sq, int64_t numel, const AdafactorScalars<T>& h) {
  const double ratio = double(T(sqrt(u_sum_sq))) / (sqrt(double(numel)) * h.d);
  return T(-alpha / (ratio > 1.0 ? ratio : 1.0));
}

// u = g / sqrt(max(var, eps1²)) as torch: clamp, rsqrt (1/sqrt), multiply. NaN propagates through the clamp.
template <typename T>
NNOPT_HD inline T adafactor_update(T var, T g, const AdafactorScalars<T>& h) {
  const T v = var < h.eps1_sq ? h.eps1_sq : var;
  return (T(1) / sqrt_(v)) * g;
}

// The new parameter: decayed, plus coef*u (torch's add_ with alpha: one fma), L1 proximal step.
template <typename T>
NNOPT_HD inline T adafactor_apply(T p, T u, T coef, const AdafactorScalars<T>& h) {
  return l1_prox(fma_(coef, u, p * h.decay), h.l1_thr);
}

}  // namespace optim
}  // namespace nnopt
