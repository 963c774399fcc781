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
// Written as p - clamp(p, -thr, thr): the same value (|p| > thr: p ∓ thr, one rounding, as |p| - thr; else 0), in
// three vector ops instead of nine (the sign/abs/select form cost Adagrad's CPU step ~10%, where the l1-free
// step runs it with thr = 0).
template <typename T>
NNOPT_HD inline T l1_prox(T p, T thr) {
  const T lo = p < -thr ? -thr : p;
  return p - (lo > thr ? thr : lo);
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

// l1: whether the l1 proximal step can be nonzero (false: compiled out, for steps known to have l1 = 0).
template <bool Masked, int Wd, bool A = false, bool B = false, bool L1 = true>
struct StaticFlags {
  static constexpr bool masked = Masked;
  static constexpr int wd = Wd;
  // amsgrad (Adam), momentum (SGD, RMSprop)
  static constexpr bool a = A;
  // centered (RMSprop)
  static constexpr bool b = B;
  static constexpr bool l1 = L1;
};

struct RuntimeFlags {
  bool masked;
  int wd;
  bool a;
  bool b;
  bool l1 = true;
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
  if (f.l1) p = l1_prox(p, h.l1_thr);
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
  if (f.l1) p = l1_prox(p, h.l1_thr);
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
  if (f.l1) p = l1_prox(p, h.l1_thr);
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
  if (f.l1) p = l1_prox(p, h.l1_thr);
  if (f.masked) {
    p = keep ? p : T(0);
    v = keep ? v : T(0);
    if (f.a) buf = keep ? buf : T(0);
    if (f.b) ga = keep ? ga : T(0);
  }
}


// =========================================================================================================
// NAdam, RAdam, Adamax (torch.optim's for-loop path) and Lion (Chen et al. 2023). Same conventions as above:
// hyperparameters combined in double as the reference does, rounded once; fma exactly where ATen's vectorised
// CPU kernels fuse one.

struct NadamArgs {
  double lr, beta1, beta2, eps, weight_decay, l1, momentum_decay, bias_correction2, mu, mu_next, mu_product,
      grad_scale;
  bool maximize;
};

template <typename T>
struct NadamScalars {
  T decay, weight_decay, w1, beta2, one_minus_beta2, bc2, eps, c_grad, c_avg, l1_thr, grad_scale, neg;
};

// mu_product is the product of the mu's up to and including this step (torch multiplies its float32 state by
// mu before the update; the caller passes that float32 value).
template <typename T>
NNOPT_HD inline NadamScalars<T> make_nadam(double lr, const NadamArgs& a) {
  NadamScalars<T> s;
  s.decay = T(1 - lr * a.weight_decay);
  s.weight_decay = T(a.weight_decay);
  s.w1 = T(1 - a.beta1);
  s.beta2 = T(a.beta2);
  s.one_minus_beta2 = T(1 - a.beta2);
  s.bc2 = T(a.bias_correction2);
  s.eps = T(a.eps);
  s.c_grad = T((-lr * (1.0 - a.mu)) / (1.0 - a.mu_product));
  s.c_avg = T((-lr * a.mu_next) / (1.0 - a.mu_product * a.mu_next));
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  return s;
}

struct RadamArgs {
  double lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, bias_correction2_sqrt, rect, grad_scale;
  bool maximize;
};

template <typename T>
struct RadamScalars {
  T decay, weight_decay, w1, beta2, one_minus_beta2, bc1, bc2_sqrt, eps, lr, rect, l1_thr, grad_scale, neg;
  bool rectify;
};

// rect > 0: the variance rectification term (rho_t > 5); rect <= 0: the unrectified (SGD with momentum) branch.
template <typename T>
NNOPT_HD inline RadamScalars<T> make_radam(double lr, const RadamArgs& a) {
  RadamScalars<T> s;
  s.decay = T(1 - lr * a.weight_decay);
  s.weight_decay = T(a.weight_decay);
  s.w1 = T(1 - a.beta1);
  s.beta2 = T(a.beta2);
  s.one_minus_beta2 = T(1 - a.beta2);
  s.bc1 = T(a.bias_correction1);
  s.bc2_sqrt = T(a.bias_correction2_sqrt);
  s.eps = T(a.eps);
  s.lr = T(lr);
  s.rect = T(a.rect);
  s.rectify = a.rect > 0;
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  return s;
}

struct AdamaxArgs {
  double lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, grad_scale;
  bool maximize;
};

template <typename T>
struct AdamaxScalars {
  T weight_decay, w1, beta2, eps, neg_clr, l1_thr, grad_scale, neg;
};

template <typename T>
NNOPT_HD inline AdamaxScalars<T> make_adamax(double lr, const AdamaxArgs& a) {
  AdamaxScalars<T> s;
  s.weight_decay = T(a.weight_decay);
  s.w1 = T(1 - a.beta1);
  s.beta2 = T(a.beta2);
  s.eps = T(a.eps);
  s.neg_clr = T(-(lr / a.bias_correction1));
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  return s;
}

struct LionArgs {
  double lr, beta1, beta2, weight_decay, l1, grad_scale;
  bool maximize;
};

template <typename T>
struct LionScalars {
  T decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, l1_thr, grad_scale, neg;
};

template <typename T>
NNOPT_HD inline LionScalars<T> make_lion(double lr, const LionArgs& a) {
  LionScalars<T> s;
  s.decay = T(1 - lr * a.weight_decay);
  s.beta1 = T(a.beta1);
  s.one_minus_beta1 = T(1 - a.beta1);
  s.beta2 = T(a.beta2);
  s.one_minus_beta2 = T(1 - a.beta2);
  s.neg_lr = T(-lr);
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  return s;
}

// Count-derived scalars from a step tensor (torch.optim's formulas in double). NAdam also needs its mu_product
// (set_aux: the float32 state after this step's multiplication); Lion uses no count.
NNOPT_HD inline double nadam_mu(double beta1, double momentum_decay, double step) {
  return beta1 * (1.0 - 0.5 * pow(0.96, step * momentum_decay));
}
NNOPT_HD inline void set_step(NadamArgs& a, double step) {
  a.bias_correction2 = 1 - pow(a.beta2, step);
  a.mu = nadam_mu(a.beta1, a.momentum_decay, step);
  a.mu_next = nadam_mu(a.beta1, a.momentum_decay, step + 1);
}
NNOPT_HD inline void set_step(RadamArgs& a, double step) {
  a.bias_correction1 = 1 - pow(a.beta1, step);
  const double bc2 = 1 - pow(a.beta2, step);
  a.bias_correction2_sqrt = pow(bc2, 0.5);
  const double rho_inf = 2 / (1 - a.beta2) - 1;
  const double rho_t = rho_inf - 2 * step * pow(a.beta2, step) / bc2;
  a.rect = rho_t > 5.0 ? pow((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t), 0.5)
                       : 0.0;
}
NNOPT_HD inline void set_step(AdamaxArgs& a, double step) { a.bias_correction1 = 1 - pow(a.beta1, step); }
NNOPT_HD inline void set_step(LionArgs&, double) {}
template <typename Args>
NNOPT_HD inline void set_aux(Args&, double) {}
NNOPT_HD inline void set_aux(NadamArgs& a, double mu_product) { a.mu_product = mu_product; }

// NAdam: m exp_avg, v exp_avg_sq. wd as Adam (1 L2, 2 decoupled).
template <typename T, typename F>
NNOPT_HD inline void nadam_update(T& p, T g, T& m, T& v, bool keep, const NadamScalars<T>& h, const F& f) {
  g = prologue_grad(g, h.grad_scale, h.neg);
  if (f.masked) g = keep ? g : T(0);
  if (f.wd == 2) p = p * h.decay;
  if (f.wd == 1) g = fma_(h.weight_decay, p, g);
  m = lerp(m, g, h.w1);
  v = fma_(h.one_minus_beta2 * g, g, v * h.beta2);
  const T denom = sqrt_(v / h.bc2) + h.eps;
  p = p + h.c_grad * g / denom;
  p = p + h.c_avg * m / denom;
  if (f.l1) p = l1_prox(p, h.l1_thr);
  if (f.masked) {
    p = keep ? p : T(0);
    m = keep ? m : T(0);
    v = keep ? v : T(0);
  }
}

// RAdam: m exp_avg, v exp_avg_sq. ((m/bc1)*lr * (1/(sqrt(v)+eps))*bc2_sqrt) * rect, as torch's expression
// (a Python scalar divided by a tensor is reciprocal-then-multiply).
template <typename T, typename F>
NNOPT_HD inline void radam_update(T& p, T g, T& m, T& v, bool keep, const RadamScalars<T>& h, const F& f) {
  g = prologue_grad(g, h.grad_scale, h.neg);
  if (f.masked) g = keep ? g : T(0);
  if (f.wd == 2) p = p * h.decay;
  if (f.wd == 1) g = fma_(h.weight_decay, p, g);
  m = lerp(m, g, h.w1);
  v = fma_(h.one_minus_beta2 * g, g, v * h.beta2);
  const T x = (m / h.bc1) * h.lr;
  const T adaptive = (T(1) / (sqrt_(v) + h.eps)) * h.bc2_sqrt;
  const T rectified = (x * adaptive) * h.rect;
  p = p - (h.rectify ? rectified : x);
  if (f.l1) p = l1_prox(p, h.l1_thr);
  if (f.masked) {
    p = keep ? p : T(0);
    m = keep ? m : T(0);
    v = keep ? v : T(0);
  }
}

// Adamax: m exp_avg, u exp_inf; weight decay is L2 only.
template <typename T, typename F>
NNOPT_HD inline void adamax_update(T& p, T g, T& m, T& u, bool keep, const AdamaxScalars<T>& h, const F& f) {
  g = prologue_grad(g, h.grad_scale, h.neg);
  if (f.masked) g = keep ? g : T(0);
  if (f.wd) g = fma_(h.weight_decay, p, g);
  m = lerp(m, g, h.w1);
  const T a = g < T(0) ? -g : g;
  u = maximum(u * h.beta2, a + h.eps);
  p = p + h.neg_clr * m / u;
  if (f.l1) p = l1_prox(p, h.l1_thr);
  if (f.masked) {
    p = keep ? p : T(0);
    m = keep ? m : T(0);
    u = keep ? u : T(0);
  }
}

// Lion: m exp_avg. p *= 1 - lr*wd (decoupled); p -= lr * sign(beta1*m + (1-beta1)*g); m = beta2*m + (1-beta2)*g.
template <typename T, typename F>
NNOPT_HD inline void lion_update(T& p, T g, T& m, bool keep, const LionScalars<T>& h, const F& f) {
  g = prologue_grad(g, h.grad_scale, h.neg);
  if (f.masked) g = keep ? g : T(0);
  if (f.wd) p = p * h.decay;
  const T c = fma_(h.one_minus_beta1, g, m * h.beta1);
  const T sgn = T(c > T(0)) - T(c < T(0));
  p = fma_(h.neg_lr, sgn, p);
  m = fma_(h.one_minus_beta2, g, m * h.beta2);
  if (f.l1) p = l1_prox(p, h.l1_thr);
  if (f.masked) {
    p = keep ? p : T(0);
    m = keep ? m : T(0);
  }
}

// =========================================================================================================
// LAMB (You et al. 2020) as apex's FusedLAMB, in two passes over all tensors. Pass 1 (lamb_moments): g is
// divided by the global clip factor (||g|| / max_grad_norm when that exceeds 1), the moments are updated and the
// direction u = (m/bc1) / (sqrt(v/bc2) + eps) (+ wd*p in adam_w_mode; L2 mode adds wd*p to g instead) is formed;
// each tensor's ||p|| and ||u|| are reduced. Pass 2 (lamb_direction, then p -= ratio*u) recomputes u from the
// stored moments and applies ratio = lr * ||p||/||u|| (lr when either norm is 0, or when wd == 0 and not nvlamb).
// Masked entries count as 0 in u and in both norms.

struct LambArgs {
  double lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, bias_correction2, grad_scale, clip;
  bool maximize, grad_averaging, bias_correction;
};

template <typename T>
struct LambScalars {
  T beta1, beta3, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay, clip, grad_scale, neg, l1_thr;
};

template <typename T>
NNOPT_HD inline LambScalars<T> make_lamb(double lr, const LambArgs& a) {
  LambScalars<T> s;
  s.beta1 = T(a.beta1);
  s.beta3 = T(a.grad_averaging ? 1 - a.beta1 : 1.0);
  s.beta2 = T(a.beta2);
  s.one_minus_beta2 = T(1 - a.beta2);
  s.bc1 = T(a.bias_correction1);
  s.bc2 = T(a.bias_correction2);
  s.eps = T(a.eps);
  s.weight_decay = T(a.weight_decay);
  s.clip = T(a.clip);
  s.grad_scale = T(a.grad_scale);
  s.neg = a.maximize ? T(-1) : T(1);
  s.l1_thr = a.l1 > 0 ? T(lr * a.l1) : T(0);
  return s;
}

NNOPT_HD inline void set_step(LambArgs& a, double step) {
  a.bias_correction1 = a.bias_correction ? 1 - pow(a.beta1, step) : 1.0;
  a.bias_correction2 = a.bias_correction ? 1 - pow(a.beta2, step) : 1.0;
}

// The clip divisor from the global gradient norm (of the scaled gradients: divided by grad_scale here).
NNOPT_HD inline double lamb_clip(double grad_norm, double grad_scale, double max_grad_norm) {
  const double norm = grad_norm / grad_scale;
  return (max_grad_norm > 0 && norm > max_grad_norm) ? norm / max_grad_norm : 1.0;
}

template <typename T>
NNOPT_HD inline T lamb_direction(T p, T m, T v, bool keep, bool adam_w, const LambScalars<T>& h) {
  T u = (m / h.bc1) / (sqrt_(v / h.bc2) + h.eps);
  if (adam_w) u = fma_(h.weight_decay, p, u);
  return keep ? u : T(0);
}

// Pass 1 for one element: updates m and v in place, returns u.
template <typename T>
NNOPT_HD inline T lamb_moments(T p, T g, T& m, T& v, bool keep, bool adam_w, const LambScalars<T>& h) {
  g = prologue_grad(g, h.grad_scale, h.neg) / h.clip;
  g = keep ? g : T(0);
  if (!adam_w) g = fma_(h.weight_decay, p, g);
  m = fma_(h.beta3, g, m * h.beta1);
  v = fma_(h.one_minus_beta2 * g, g, v * h.beta2);
  m = keep ? m : T(0);
  v = keep ? v : T(0);
  return lamb_direction(p, m, v, keep, adam_w, h);
}

// The trust ratio of one tensor from its norms, as apex: lr * ||p||/||u||, or lr.
NNOPT_HD inline double lamb_ratio(double lr, double p_norm, double u_norm, bool trust) {
  return (trust && p_norm != 0 && u_norm != 0) ? lr * (p_norm / u_norm) : lr;
}

}  // namespace optim
}  // namespace nnopt
