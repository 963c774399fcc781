// CPU kernel of the fused distillation loss (nnopt::distill_loss_fwd): the loss and its gradient w.r.t. the
// student logits in one call, without any [B, V] intermediate besides the gradient.
//
// Math (oracle and definitions: nnopt/reference/distill_loss.py; same formulas as kernels/distill_loss.py): with
// a = s / T, b = t / T, row loss = alpha * scale * soft + (1 - alpha) * (lse(s) - s[y]), where
//   kl          soft = Σ p_t (b - a) - lse(b) + lse(a)       grad = alpha scale / T (p_s - p_t)
//   reverse_kl  soft = Σ p_s (a - b) - lse(a) + lse(b)       grad = alpha scale / T p_s (log p_s - log p_t - soft)
//   jsd         soft = beta Σ p_t (log p_t - log m) + (1 - beta) Σ p_s (log p_s - log m), log m = logaddexp(
//               log beta + log p_t, log(1 - beta) + log p_s); grad = alpha scale / T p_s (g - Σ p_s g),
//               g = (1 - beta)(log p_s - log m)
//   ce          grad += (1 - alpha) (softmax(s) - onehot(y))
// every gradient times the reduction's weight (1 / max(count, 1) for batchmean/mean, else 1). Rows whose target
// is ignore_index get loss 0 and a zero gradient row and leave the count.
//
// One at::parallel_for over rows. A row is swept three times (four for jsd) while it sits in L2 (32k classes:
// 128 KB per fp32 row and tensor): the maxima of s and t; the sums Σ exp(a - max a), Σ exp(b - max b),
// Σ exp(s - max s) and the kl / reverse_kl weighted sum (a max sweep first, rather than an online rescaling,
// which would cost an extra exp per element); then the gradient, written once. The sweeps are branch-free
// `omp simd` loops over an inline polynomial exp (Cephes, ~1 ulp; the compiler vectorises it, unlike a libm
// call), specialised on the kind and on whether the cross-entropy term is present. Partial sums are float over
// blocks of kBlock elements, accumulated in double. bfloat16/float16 rows are converted to float in
// thread-local buffers (V floats each for s, t and the gradient) and the gradient converted back; float32 rows
// are read and written in place. Targets are checked (range) and counted on the calling thread before the rows
// run; the loss is reduced in double, in row order (deterministic). The gradient buffer gets no MADV_HUGEPAGE
// hint (unlike masked_linear's dW): measured here, with THP defrag=madvise, a training step right after another
// step's large frees paid direct compaction, and the faults cost 4x more than with 4 KiB pages.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace nnopt {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 1024;
// The math helpers must be inlined into the `omp simd` loops: a call left in a loop body stops vectorisation,
// and GCC's heuristics decline to inline exp_f three times into one loop.
#if defined(__GNUC__)
#define NNOPT_DL_INLINE inline __attribute__((always_inline))
#else
#define NNOPT_DL_INLINE inline
#endif
enum Kind : int { kKL = 0, kReverseKL = 1, kJSD = 2 };

// bit casts that take no address (a memcpy through a local can keep an `omp simd` loop from vectorising)
NNOPT_DL_INLINE float bits_to_float(uint32_t u) {
  return std::bit_cast<float>(u);
}

NNOPT_DL_INLINE uint32_t float_to_bits(float f) {
  return std::bit_cast<uint32_t>(f);
}

// exp(x) for float, branch-free so that `omp simd` loops vectorise it: x = n ln2 + r with |r| <= ln2 / 2, a
// degree-6 polynomial for exp(r) (Cephes expf, ~1 ulp), 2^n built in the exponent bits. x < -87 gives 0 (the
// exact result is below 1.7e-38), -inf gives 0, NaN stays NaN.
NNOPT_DL_INLINE float exp_f(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = std::fma(n, -0.693359375f, xc);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const float two_n = bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  const float keep = x >= -87.0f ? 1.0f : 0.0f;  // a multiply, not a select: GCC if-converts it in every loop
  return p * two_n * keep;
}

// log(x) for normal positive float x (here 1 <= x <= 2), branch-free (Cephes logf, ~1 ulp).
NNOPT_DL_INLINE float log_f(float x) {
  const uint32_t u = float_to_bits(x);
  float e = float(int32_t(u >> 23) - 127);
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const float big = m > 1.41421356f ? 1.0f : 0.0f;
  m = m * (1.0f - 0.5f * big);  // exact: m or m / 2
  e = e + big;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = std::fma(y, f, -1.1514610310e-1f);
  y = std::fma(y, f, 1.1676998740e-1f);
  y = std::fma(y, f, -1.2420140846e-1f);
  y = std::fma(y, f, 1.4249322787e-1f);
  y = std::fma(y, f, -1.6668057665e-1f);
  y = std::fma(y, f, 2.0000714765e-1f);
  y = std::fma(y, f, -2.4999993993e-1f);
  y = std::fma(y, f, 3.3333331174e-1f);
  y = y * f * z;
  y = std::fma(e, -2.12194440e-4f, y);
  y = std::fma(z, -0.5f, y);
  return f + y + e * 0.693359375f;
}

// log(beta p_t + (1 - beta) p_s) from the log-probabilities, as a logaddexp: finite where both underflow.
NNOPT_DL_INLINE float log_mixture(float lp_s, float lp_t, float log_beta, float log_1m_beta) {
  const float x1 = lp_t + log_beta, x2 = lp_s + log_1m_beta;
  const float hi = std::max(x1, x2), lo = std::min(x1, x2);
  return hi + log_f(1.0f + exp_f(lo - hi));
}

struct Params {
  int64_t V;
  float inv_t, alpha, beta, scale, log_beta, log_1m_beta;
  float c_soft, c_ce;  // gradient coefficients: w alpha scale / T and w (1 - alpha)
};

// The gradient of one counted row (its own function, every scalar by value: GCC then vectorises the loop).
template <int K, bool CE>
void grad_row(const float* __restrict s, const float* __restrict t, float* __restrict g, int64_t V, float inv_t,
              float la, float lb, float lc, float cs, float cc, float soft, float g_mean, float beta, float log_beta,
              float log_1m_beta) {
  const float one_m_beta = 1.0f - beta;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float lp_s = s[j] * inv_t - la;
    const float p_s = exp_f(lp_s);
    float gj;
    if constexpr (K == kKL) {
      gj = cs * (p_s - exp_f(t[j] * inv_t - lb));
    } else if constexpr (K == kReverseKL) {
      gj = cs * p_s * (lp_s - (t[j] * inv_t - lb) - soft);
    } else {
      const float lm = log_mixture(lp_s, t[j] * inv_t - lb, log_beta, log_1m_beta);
      gj = cs * p_s * (one_m_beta * (lp_s - lm) - g_mean);
    }
    if constexpr (CE) gj += cc * exp_f(s[j] - lc);
    g[j] = gj;
  }
}

// The loss of one counted row; writes its gradient to g when g is not null. s, t, g: V floats.
template <int K, bool CE>
double run_row(const float* __restrict s, const float* __restrict t, int64_t y, const Params& p,
               float* __restrict g) {
  const int64_t V = p.V;
  const float inv_t = p.inv_t;
  float ms = -std::numeric_limits<float>::infinity(), mt = ms;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t j = 0; j < V; ++j) {
    ms = std::max(ms, s[j]);
    mt = std::max(mt, t[j]);
  }
  const float ma = ms * inv_t, mb = mt * inv_t;
  double za = 0, zb = 0, zc = 0, acc = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    float pa = 0, pb = 0, pc = 0, pw = 0;
#pragma omp simd reduction(+ : pa, pb, pc, pw)
    for (int64_t j = b0; j < b1; ++j) {
      const float a = s[j] * inv_t, b = t[j] * inv_t;
      const float ea = exp_f(a - ma), eb = exp_f(b - mb);
      pa += ea;
      pb += eb;
      if constexpr (K == kKL) pw += eb * (b - a);
      if constexpr (K == kReverseKL) pw += ea * (a - b);
      if constexpr (CE) pc += exp_f(s[j] - ms);
    }
    za += pa;
    zb += pb;
    zc += pc;
    acc += pw;
  }
  const double lse_a = double(ma) + std::log(za), lse_b = double(mb) + std::log(zb);
  const float la = float(lse_a), lb = float(lse_b);
  double soft = 0, g_mean = 0;
  if constexpr (K == kKL) soft = acc / zb - lse_b + lse_a;
  if constexpr (K == kReverseKL) soft = acc / za - lse_a + lse_b;
  if constexpr (K == kJSD) {
    const float lbeta = p.log_beta, l1mbeta = p.log_1m_beta;
    double kt = 0, ks = 0;
    for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
      const int64_t b1 = std::min(V, b0 + kBlock);
      float pt = 0, ps = 0;
#pragma omp simd reduction(+ : pt, ps)
      for (int64_t j = b0; j < b1; ++j) {
        const float lp_s = s[j] * inv_t - la, lp_t = t[j] * inv_t - lb;
        const float lm = log_mixture(lp_s, lp_t, lbeta, l1mbeta);
        pt += exp_f(lp_t) * (lp_t - lm);
        ps += exp_f(lp_s) * (lp_s - lm);
      }
      kt += pt;
      ks += ps;
    }
    soft = double(p.beta) * kt + (1.0 - double(p.beta)) * ks;
    g_mean = (1.0 - double(p.beta)) * ks;
  }
  double loss = double(p.alpha) * double(p.scale) * soft;
  const double lse_c = double(ms) + std::log(zc);
  if constexpr (CE) loss += (1.0 - double(p.alpha)) * (lse_c - double(s[y]));
  if (g != nullptr) {
    grad_row<K, CE>(s, t, g, V, inv_t, la, lb, float(lse_c), p.c_soft, p.c_ce, float(soft), float(g_mean), p.beta,
                    p.log_beta, p.log_1m_beta);
    if constexpr (CE) g[y] -= p.c_ce;
  }
  return loss;
}

using RowFn = double (*)(const float*, const float*, int64_t, const Params&, float*);

template <int K>
RowFn pick_ce(bool ce) {
  return ce ? &run_row<K, true> : &run_row<K, false>;
}

RowFn pick(int kind, bool ce) {
  switch (kind) {
    case kKL:
      return pick_ce<kKL>(ce);
    case kReverseKL:
      return pick_ce<kReverseKL>(ce);
    default:
      return pick_ce<kJSD>(ce);
  }
}

inline void to_float(const c10::BFloat16* src, float* __restrict dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(uint32_t(s[i]) << 16);
}

inline void to_float(const c10::Half* src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// float -> bfloat16 rounding to nearest even, NaN kept quiet (c10::BFloat16's rule, written so it vectorises)
inline void from_float(const float* __restrict src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = float_to_bits(src[i]);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
    d[i] = src[i] != src[i] ? uint16_t(0x7fc0) : uint16_t(rounded);
  }
}

inline void from_float(const float* __restrict src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

// Runs rows [begin, end): loss into rows_out[r], gradient into g (when given). Counted rows only compute.
template <typename S>
void run_rows(const S* s, const S* t, const int64_t* y, int64_t ignore_index, const Params& p, RowFn fn,
              double* rows_out, S* g, int64_t begin, int64_t end) {
  const int64_t V = p.V;
  std::vector<float> buf;
  if constexpr (!std::is_same_v<S, float>) buf.resize(size_t(3 * V));
  for (int64_t r = begin; r < end; ++r) {
    const int64_t yr = y != nullptr ? y[r] : 0;
    S* gr = g != nullptr ? g + r * V : nullptr;
    if (y != nullptr && yr == ignore_index) {
      rows_out[r] = 0.0;
      if (gr != nullptr) std::memset(static_cast<void*>(gr), 0, size_t(V) * sizeof(S));
      continue;
    }
    if constexpr (std::is_same_v<S, float>) {
      rows_out[r] = fn(s + r * V, t + r * V, yr, p, gr);
    } else {
      float *sf = buf.data(), *tf = sf + V, *gf = tf + V;
      to_float(s + r * V, sf, V);
      to_float(t + r * V, tf, V);
      rows_out[r] = fn(sf, tf, yr, p, gr != nullptr ? gf : nullptr);
      if (gr != nullptr) from_float(gf, gr, V);
    }
  }
}

std::tuple<Tensor, Tensor> distill_loss_fwd_cpu(const Tensor& student, const Tensor& teacher,
                                                const std::optional<Tensor>& target, double temperature,
                                                double alpha, c10::string_view kind_name, double beta, double scale,
                                                int64_t ignore_index, c10::string_view reduction, bool need_grad) {
  const std::string_view kn(kind_name.data(), kind_name.size());
  const std::string_view red(reduction.data(), reduction.size());
  int kind = kn == "kl" ? kKL : kn == "reverse_kl" ? kReverseKL : kn == "jsd" ? kJSD : -1;
  TORCH_CHECK_VALUE(kind >= 0, "distill_loss_fwd: unknown kind '", kn, "'; choose one of kl, reverse_kl, jsd");
  TORCH_CHECK_VALUE(red == "batchmean" || red == "mean" || red == "sum" || red == "none",
                    "distill_loss_fwd: unknown reduction '", red, "'; choose one of batchmean, mean, sum, none");
  TORCH_CHECK_VALUE(temperature > 0, "distill_loss_fwd: temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "distill_loss_fwd: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, "distill_loss_fwd: beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.sizes() == student.sizes(),
                    "distill_loss_fwd: student and teacher must be [B, V] of one shape, got ", student.sizes(),
                    " and ", teacher.sizes());
  const auto st = student.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                   "distill_loss_fwd: the CPU kernel takes float32, bfloat16 or float16 logits, got ", st);
  TORCH_CHECK_TYPE(teacher.scalar_type() == st, "distill_loss_fwd: teacher must match student's dtype ", st,
                   ", got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(student.device().is_cpu() && teacher.device().is_cpu() && student.is_contiguous() &&
                        teacher.is_contiguous(),
                    "distill_loss_fwd: student and teacher must be contiguous CPU tensors");
  const int64_t B = student.size(0), V = student.size(1);
  const bool has_target = target.has_value();
  TORCH_CHECK_VALUE(has_target || alpha >= 1, "distill_loss_fwd: target is required when alpha < 1 (the ",
                    "cross-entropy term)");
  const int64_t* y = nullptr;
  int64_t count = B;
  if (has_target) {
    const Tensor& tg = *target;
    TORCH_CHECK_VALUE(tg.scalar_type() == at::kLong && tg.dim() == 1 && tg.size(0) == B && tg.device().is_cpu() &&
                          tg.is_contiguous(),
                      "distill_loss_fwd: target must be a contiguous int64 CPU tensor of shape [", B, "]");
    y = tg.data_ptr<int64_t>();
    count = 0;
    for (int64_t r = 0; r < B; ++r) {
      if (y[r] == ignore_index) continue;
      TORCH_CHECK_VALUE(y[r] >= 0 && y[r] < V, "distill_loss_fwd: target[", r, "] = ", y[r],
                        " is out of range [0, ", V, ")");
      ++count;
    }
  }
  if (kind == kJSD && beta == 0.0) kind = kKL;  // the TRL / Liger convention for the endpoints
  if (kind == kJSD && beta == 1.0) kind = kReverseKL;
  const bool mean = red == "batchmean" || red == "mean";
  const double w = mean ? 1.0 / double(std::max<int64_t>(count, 1)) : 1.0;
  Params p;
  p.V = V;
  p.inv_t = float(1.0 / temperature);
  p.alpha = float(alpha);
  p.beta = float(beta);
  p.scale = float(scale);
  p.log_beta = beta > 0 ? float(std::log(beta)) : 0.0f;
  p.log_1m_beta = beta < 1 ? float(std::log1p(-beta)) : 0.0f;
  p.c_soft = float(w * alpha * scale / temperature);
  p.c_ce = float(w * (1.0 - alpha));
  const RowFn fn = pick(kind, has_target && alpha < 1);

  Tensor grad = need_grad ? at::empty({B, V}, student.options()) : at::empty({0}, student.options());
  std::vector<double> rows(size_t(B), 0.0);
  if (V > 0) {
    const int64_t grain = std::max<int64_t>(1, 32768 / V);
    auto run = [&](auto tag) {
      using S = decltype(tag);
      at::parallel_for(0, B, grain, [&](int64_t b, int64_t e) {
        run_rows<S>(student.const_data_ptr<S>(), teacher.const_data_ptr<S>(), y, ignore_index, p, fn, rows.data(),
                    need_grad ? grad.data_ptr<S>() : nullptr, b, e);
      });
    };
    if (st == at::kFloat) {
      run(float{});
    } else if (st == at::kBFloat16) {
      run(c10::BFloat16{});
    } else {
      run(c10::Half{});
    }
  }
  const auto f64 = student.options().dtype(at::kDouble);
  if (red == "none") {
    Tensor out = at::empty({B}, f64);
    std::copy(rows.begin(), rows.end(), out.data_ptr<double>());
    return {out.to(st), grad};
  }
  double total = 0;
  for (double v : rows) total += v;
  if (mean) total /= double(std::max<int64_t>(count, 1));
  Tensor out = at::empty({}, f64);
  *out.data_ptr<double>() = total;
  return {out.to(st), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(nnopt, CPU, m) {
  m.impl("distill_loss_fwd", &distill_loss_fwd_cpu);
}

}  // namespace nnopt
