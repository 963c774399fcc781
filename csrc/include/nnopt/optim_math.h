// Per-element math of the fused optimizer steps, shared by the CPU (csrc/cpu/fused_optim.cpp) and CUDA
// (csrc/cuda/fused_optim.cu) kernels so both backends run one definition of each update.
//
// The order of operations follows nnopt/reference/fused_optim.py (torch.optim's for-loop path), op for op:
// every scalar hyperparameter is first combined in double exactly as the reference does in Python, then
// rounded once to the compute type T (float, or double for float64 params), as torch does with a Python
// scalar argument. Where torch's vectorised CPU kernels fuse a multiply-add (add/sub with alpha, addcmul,
// lerp) we call fma explicitly, and nowhere else (the build disables contraction). The CPU kernels then match
// the reference on CPU bit for bit except where torch's sqrt (MKL VML, not correctly rounded: ~20% of
// elements off by 1 ulp) differs from ours; SGD matches exactly. On CUDA, torch's kernels round differently
// (e.g. addcdiv as a + alpha*(b/c), division by a scalar as a multiply), so CUDA agrees to rounding.
//
// Flags are read through a `Flags` object: the CPU passes a type whose members are `static constexpr`, so
// every branch folds away and the inner loops are branch-free and vectorise; CUDA passes runtime values (the
// branches are uniform across a launch).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NNOPT_HD __host__ __device__
#else
#define NNOPT_HD
#endif

namespace nnopt {
namespace optim {

NNOPT_HD inline float fma_(float a, float b, float c) { return fmaf(a, b, c); }
NNOPT_HD inline double fma_(double a, double b, double c) { return fma(a, b, c); }

// torch.lerp: a + w*(b-a) when |w| < 0.5, else b - (b-a)*(1-w), each as one fma (torch's vectorised form).
template <typename T>
NNOPT_HD inline T lerp(T a, T b, T w) {
  const bool small = w < T(0.5) && w > T(-0.5);
  return fma_(small ? w : w - T(1), b - a, small ? a : b);
}

// torch.maximum: NaN in either argument gives NaN.
template <typename T>
NNOPT_HD inline T maximum(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// sign(p) * clamp_min(|p| - thr, 0). With thr == 0 it returns p (up to the sign of zero), so it runs
// unconditionally; the host sets thr = 0 when l1 <= 0.
template <typename T>
NNOPT_HD inline T l1_prox(T p, T thr) {
  const T sgn = T(p > T(0)) - T(p < T(0));
  const T a = (p < T(0) ? -p : p) - thr;
  return sgn * (a < T(0) ? T(0) : a);
}

// Gradient prologue: divide by grad_scale (1 when absent: exact), negate when maximizing (neg is +1 or -1:
// exact), zero when masked.
template <typename T>
NNOPT_HD inline T prologue_grad(T g, T scale, T neg) {
  return (g / scale) * neg;
}

NNOPT_HD inline float sqrt_(float x) { return sqrtf(x); }
NNOPT_HD inline double sqrt_(double x) { return sqrt(x); }

// ---------------------------------------------------------------------------------------------------------
// Arguments as the op receives them (double), and the derived scalars in the compute type. make_*() takes the
// learning rate separately because CUDA reads it from lr_tensor inside the kernel.

struct SgdArgs {
  double lr, momentum, dampening, weight_decay, l1, grad_scale;
  bool nesterov, maximize, first_step;
};

template <typename T>
struct SgdScalars {
  T neg_lr, momentum, one_minus_dampening, weight_decay, l1_thr, grad_scale, neg;
  bool nesterov, first_step;
};

template <typename T>
NNOPT_HD inline SgdScalars<T> make_sgd(double lr, const SgdArgs& a) {
  SgdScalars<T> s;
  s.neg_lr = T(-lr);
  s.momentum = T(a.momentum);
  s.one_minus_dampening = T(1 - a.dampening);
  s.weight_decay = T(a.weight_decay);
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  s.nesterov = a.nesterov;
  s.first_step = a.first_step;
  return s;
}

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, bias_correction2_sqrt, grad_scale;
  bool maximize;
};

template <typename T>
struct AdamScalars {
  T decay, weight_decay, w1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step, l1_thr, grad_scale, neg;
};

template <typename T>
NNOPT_HD inline AdamScalars<T> make_adam(double lr, const AdamArgs& a) {
  AdamScalars<T> s;
  s.decay = T(1 - lr * a.weight_decay);
  s.weight_decay = T(a.weight_decay);
  s.w1 = T(1 - a.beta1);
  s.beta2 = T(a.beta2);
  s.one_minus_beta2 = T(1 - a.beta2);
  s.bc2_sqrt = T(a.bias_correction2_sqrt);
  s.eps = T(a.eps);
  s.neg_step = T(-(lr / a.bias_correction1));
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  return s;
}

struct AdagradArgs {
  double lr, weight_decay, eps, l1, lr_decay_denom, grad_scale;
  bool maximize;
  double lr_decay;  // used only when the step count comes as a tensor (see set_step)
};

template <typename T>
struct AdagradScalars {
  T weight_decay, eps, neg_clr, l1_thr, grad_scale, neg;
};

template <typename T>
NNOPT_HD inline AdagradScalars<T> make_adagrad(double lr, const AdagradArgs& a) {
  AdagradScalars<T> s;
  s.weight_decay = T(a.weight_decay);
  s.eps = T(a.eps);
  s.neg_clr = T(-(lr / a.lr_decay_denom));
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  return s;
}

struct RmspropArgs {
  double lr, alpha, eps, weight_decay, momentum, l1, grad_scale;
  bool maximize;
};

template <typename T>
struct RmspropScalars {
  T alpha, one_minus_alpha, eps, weight_decay, momentum, neg_lr, l1_thr, grad_scale, neg;
};

template <typename T>
NNOPT_HD inline RmspropScalars<T> make_rmsprop(double lr, const RmspropArgs& a) {
  RmspropScalars<T> s;
  s.alpha = T(a.alpha);
  s.one_minus_alpha = T(1 - a.alpha);
  s.eps = T(a.eps);
  s.weight_decay = T(a.weight_decay);
  s.momentum = T(a.momentum);
  s.neg_lr = T(-lr);
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Step counts given as a tensor (device-resident counts: no host read per step). The scalars that depend on
// the count are derived from it exactly as the host derives them (torch.optim's formulas, in double); SGD
// and RMSprop use no count.

NNOPT_HD inline void set_step(SgdArgs&, double) {}
NNOPT_HD inline void set_step(RmspropArgs&, double) {}
NNOPT_HD inline void set_step(AdamArgs& a, double step) {
  a.bias_correction1 = 1 - pow(a.beta1, step);
  a.bias_correction2_sqrt = sqrt(1 - pow(a.beta2, step));
}
NNOPT_HD inline void set_step(AdagradArgs& a, double step) { a.lr_decay_denom = 1 + (step - 1) * a.lr_decay; }

// ---------------------------------------------------------------------------------------------------------
// Flags. The CPU instantiates StaticFlags (compile-time constants); CUDA fills RuntimeFlags.
// wd: 0 none, 1 L2 (g += wd*p), 2 decoupled (p *= 1 - lr*wd, Adam only).

template <bool Masked, int Wd, bool A = false, bool B = false>
struct StaticFlags {
  static constexpr bool masked = Masked;
  static constexpr int wd = Wd;
  // amsgrad (Adam), momentum (SGD, RMSprop)
  static constexpr bool a = A;
  // centered (RMSprop)
  static constexpr bool b = B;
};

struct RuntimeFlags {
  bool masked;
  int wd;
  bool a;
  bool b;
};

// ---------------------------------------------------------------------------------------------------------
// Updates of one element. p is the parameter (its master copy when there is one), g the raw gradient, then
// the optimizer states, keep = mask value (true when unmasked). All in the compute type T, updated in place;
// states the flags do not use are left untouched.

// SGD: buf = momentum buffer (flags.a: momentum != 0).
template <typename T, typename F>
NNOPT_HD inline void sgd_update(T& p, T g, T& buf_, bool keep, const SgdScalars<T>& h, const F& f) {
  g = prologue_grad(g, h.grad_scale, h.neg);
  if (f.masked) g = keep ? g : T(0);
  if (f.wd) g = fma_(h.weight_decay, p, g);
  if (f.a) {
    const T buf = h.first_step ? g : fma_(h.one_minus_dampening, g, buf_ * h.momentum);
    buf_ = buf;
    g = h.nesterov ? fma_(h.momentum, buf, g) : buf;
  }
  p = fma_(h.neg_lr, g, p);
  p = l1_prox(p, h.l1_thr);
  if (f.masked) {
    p = keep ? p : T(0);
    if (f.a) buf_ = keep ? buf_ : T(0);
  }
}

// Adam / AdamW: m exp_avg, v exp_avg_sq, vmax max_exp_avg_sq (flags.a: amsgrad).
template <typename T, typename F>
NNOPT_HD inline void adam_update(T& p, T g, T& m, T& v, T& vmax, bool keep, const AdamScalars<T>& h, const F& f) {
  g = prologue_grad(g, h.grad_scale, h.neg);
  if (f.masked) g = keep ? g : T(0);
  if (f.wd == 2) p = p * h.decay;
  if (f.wd == 1) g = fma_(h.weight_decay, p, g);
  m = lerp(m, g, h.w1);
  v = fma_(h.one_minus_beta2 * g, g, v * h.beta2);
  T vd = v;
  if (f.a) {
    vd = maximum(vmax, v);
    vmax = vd;
  }
  const T denom = sqrt_(vd) / h.bc2_sqrt + h.eps;
  p = p + h.neg_step * m / denom;
  p = l1_prox(p, h.l1_thr);
  if (f.masked) {
    p = keep ? p : T(0);
    m = keep ? m : T(0);
    v = keep ? v : T(0);
    if (f.a) vmax = keep ? vmax : T(0);
  }
}

// Adagrad: sum = state_sum.
template <typename T, typename F>
NNOPT_HD inline void adagrad_update(T& p, T g, T& sum, bool keep, const AdagradScalars<T>& h, const F& f) {
  g = prologue_grad(g, h.grad_scale, h.neg);
  if (f.masked) g = keep ? g : T(0);
  if (f.wd) g = fma_(h.weight_decay, p, g);
  sum = fma_(T(1) * g, g, sum);
  const T std_ = sqrt_(sum) + h.eps;
  p = p + h.neg_clr * g / std_;
  p = l1_prox(p, h.l1_thr);
  if (f.masked) {
    p = keep ? p : T(0);
    sum = keep ? sum : T(0);
  }
}

// RMSprop: v square_avg, buf momentum buffer (flags.a: momentum > 0), ga grad_avg (flags.b: centered).
template <typename T, typename F>
NNOPT_HD inline void rmsprop_update(T& p, T g, T& v, T& buf, T& ga, bool keep, const RmspropScalars<T>& h, const F& f) {
  g = prologue_grad(g, h.grad_scale, h.neg);
  if (f.masked) g = keep ? g : T(0);
  if (f.wd) g = fma_(h.weight_decay, p, g);
  v = fma_(h.one_minus_alpha * g, g, v * h.alpha);
  T avg;
  if (f.b) {
    ga = lerp(ga, g, h.one_minus_alpha);
    avg = sqrt_(fma_(T(-1) * ga, ga, v));
  } else {
    avg = sqrt_(v);
  }
  avg = avg + h.eps;
  if (f.a) {
    buf = buf * h.momentum + T(1) * g / avg;
    p = fma_(h.neg_lr, buf, p);
  } else {
    p = p + h.neg_lr * g / avg;
  }
  p = l1_prox(p, h.l1_thr);
  if (f.masked) {
    p = keep ? p : T(0);
    v = keep ? v : T(0);
    if (f.a) buf = keep ? buf : T(0);
    if (f.b) ga = keep ? ga : T(0);
  }
}

}  // namespace optim
}  // namespace nnopt
