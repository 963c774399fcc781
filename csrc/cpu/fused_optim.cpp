// CPU kernels of the fused optimizer steps (nnopt::sgd_step_, adam_step_, adagrad_step_, rmsprop_step_, nadam_step_,
// radam_step_, adamax_step_, lion_step_).
//
// Math: csrc/include/nnopt/optim_math.h (shared with CUDA); conventions: csrc/ops.cpp; oracle:
// nnopt/reference/fused_optim.py.
//
// One call = validation, the one-element tensors (found_inf, grad_scale, lr_tensor) read once, then ONE
// at::parallel_for whose threads pull (tensor, chunk) work items of at most kChunk elements from a shared
// atomic counter: small tensors cost one item each, big ones are split, and a thread slowed by the noisy
// machine simply takes fewer items. Each item runs a branch-free `#pragma omp simd` loop specialised on the
// flags (masked, weight decay mode, amsgrad/momentum, centered) and the compute type (float, double).
// float32 (and float64) tensors without masters are updated in place directly; other dtypes go through
// blocks of kBlock elements converted to the compute type on the stack (L1-resident), then converted back.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "nnopt/optim_checks.h"
#include "nnopt/optim_math.h"

namespace nnopt {
namespace {

using at::Tensor;
using at::TensorList;
using namespace nnopt::optim;

// The shortest work item a big tensor is split into (run_all lengthens items while ~4 per thread remain).
constexpr int64_t kChunk = 32768;
// Conversion block for non-float32 dtypes: 6 arrays x 512 x 8 bytes stays in L1.
constexpr int64_t kBlock = 512;

template <typename P>
using compute_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

// ---------------------------------------------------------------------------------------------------------
// dtype conversion of blocks. bfloat16 by bit manipulation (round to nearest even, NaN kept quiet: the same
// rule as c10::BFloat16) so the loops vectorise; float16 with F16C when available.

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
  return f != f ? uint16_t(0x7fc0) : uint16_t(rounded);
}

template <typename C, typename Src>
inline void load_block(const Src* __restrict src, C* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<Src, c10::BFloat16>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = C(bf16_bits_to_float(s[i]));
  } else if constexpr (std::is_same_v<Src, c10::Half>) {
    int64_t i = 0;
#if defined(__F16C__)
    if constexpr (std::is_same_v<C, float>) {
      for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
      }
    }
#endif
    for (; i < n; ++i) dst[i] = C(static_cast<float>(src[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = C(src[i]);
  }
}

template <typename C, typename Dst>
inline void store_block(const C* __restrict src, Dst* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<Dst, c10::BFloat16>) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(float(src[i]));
  } else if constexpr (std::is_same_v<Dst, c10::Half>) {
    int64_t i = 0;
#if defined(__F16C__)
    if constexpr (std::is_same_v<C, float>) {
      for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
      }
    }
#endif
    for (; i < n; ++i) dst[i] = Dst(float(src[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = Dst(src[i]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Optimizer traits: which states a flag combination uses, and the shared per-element update.
// Flags: a = amsgrad (Adam) / momentum (SGD, RMSprop); b = centered (RMSprop).

struct SgdOp {
  template <typename T>
  using Scalars = SgdScalars<T>;
  static constexpr int kMaxWd = 1;
  static constexpr bool kUsesA = true, kUsesB = false;
  template <typename F>
  static constexpr bool uses(int k) {
    return k == 0 && F::a;
  }
  template <typename T, typename F>
  static inline void update(T& p, T g, T& s0, T& s1, T& s2, bool keep, const Scalars<T>& h, const F& f) {
    sgd_update(p, g, s0, keep, h, f);
  }
};

struct AdamOp {
  template <typename T>
  using Scalars = AdamScalars<T>;
  static constexpr int kMaxWd = 2;
  static constexpr bool kUsesA = true, kUsesB = false;
  template <typename F>
  static constexpr bool uses(int k) {
    return k < 2 || F::a;
  }
  template <typename T, typename F>
  static inline void update(T& p, T g, T& s0, T& s1, T& s2, bool keep, const Scalars<T>& h, const F& f) {
    adam_update(p, g, s0, s1, s2, keep, h, f);
  }
};

struct AdagradOp {
  template <typename T>
  using Scalars = AdagradScalars<T>;
  static constexpr int kMaxWd = 1;
  static constexpr bool kUsesA = false, kUsesB = false;
  template <typename F>
  static constexpr bool uses(int k) {
    return k == 0;
  }
  template <typename T, typename F>
  static inline void update(T& p, T g, T& s0, T& s1, T& s2, bool keep, const Scalars<T>& h, const F& f) {
    adagrad_update(p, g, s0, keep, h, f);
  }
};

struct RmspropOp {
  template <typename T>
  using Scalars = RmspropScalars<T>;
  static constexpr int kMaxWd = 1;
  static constexpr bool kUsesA = true, kUsesB = true;
  template <typename F>
  static constexpr bool uses(int k) {
    return k == 0 || (k == 1 && F::a) || (k == 2 && F::b);
  }
  template <typename T, typename F>
  static inline void update(T& p, T g, T& s0, T& s1, T& s2, bool keep, const Scalars<T>& h, const F& f) {
    rmsprop_update(p, g, s0, s1, s2, keep, h, f);
  }
};


// Two-state optimizers (NAdam, RAdam, Adamax: m and v/u) and Lion (m only); no a/b flags.
#define NNOPT_TWO_STATE_OP(NAME, SCALARS, MAXWD, FN)                                                      \
  struct NAME {                                                                                           \
    template <typename T>                                                                                 \
    using Scalars = SCALARS<T>;                                                                           \
    static constexpr int kMaxWd = MAXWD;                                                                  \
    static constexpr bool kUsesA = false, kUsesB = false;                                                 \
    template <typename F>                                                                                 \
    static constexpr bool uses(int k) {                                                                   \
      return k < 2;                                                                                       \
    }                                                                                                     \
    template <typename T, typename F>                                                                     \
    static inline void update(T& p, T g, T& s0, T& s1, T&, bool keep, const Scalars<T>& h, const F& f) { \
      FN(p, g, s0, s1, keep, h, f);                                                                       \
    }                                                                                                     \
  };

NNOPT_TWO_STATE_OP(NadamOp, NadamScalars, 2, nadam_update)
NNOPT_TWO_STATE_OP(RadamOp, RadamScalars, 2, radam_update)
NNOPT_TWO_STATE_OP(AdamaxOp, AdamaxScalars, 1, adamax_update)
#undef NNOPT_TWO_STATE_OP

struct LionOp {
  template <typename T>
  using Scalars = LionScalars<T>;
  static constexpr int kMaxWd = 1;
  static constexpr bool kUsesA = false, kUsesB = false;
  template <typename F>
  static constexpr bool uses(int k) {
    return k == 0;
  }
  template <typename T, typename F>
  static inline void update(T& p, T g, T& s0, T&, T&, bool keep, const Scalars<T>& h, const F& f) {
    lion_update(p, g, s0, keep, h, f);
  }
};

// ---------------------------------------------------------------------------------------------------------
// The inner loop over n elements in the compute type, updated in place. Unused state pointers are null and
// never touched (the flags decide at compile time).

template <typename Op, typename T>
using MathFn = void (*)(int64_t, T*, const T*, T*, T*, T*, const uint8_t*, const typename Op::template Scalars<T>&);

// Plain: no grad scale, no l1, no maximize (the common step). The local copy of the scalars then holds literal
// 1, 0 and 1 there, so the compiler folds the per-element division by the grad scale (x / 1 == x exactly) and the
// sign flip away: on one core of a Xeon (AVX-512) that division alone cost 10-20% of a large-tensor step. The l1
// step is compiled out too (StaticFlags::l1): with thr = 0 it is the identity the compiler cannot prove, and cost
// Adagrad's large-tensor step ~10% (0.89x -> 1.0x torch fused here).
// 512-bit vectors (GCC prefers 256 on this target) halve the instruction count of these memory-bound loops.
template <typename Op, typename T, typename F, bool Plain>
__attribute__((target("prefer-vector-width=512"))) void math_loop(
    int64_t n, T* __restrict p, const T* __restrict g, T* __restrict s0, T* __restrict s1, T* __restrict s2,
    const uint8_t* __restrict mask, const typename Op::template Scalars<T>& hs) {
  constexpr bool u0 = Op::template uses<F>(0), u1 = Op::template uses<F>(1), u2 = Op::template uses<F>(2);
  typename Op::template Scalars<T> h = hs;
  if constexpr (Plain) {
    if constexpr (requires { h.grad_scale; }) h.grad_scale = T(1);
    if constexpr (requires { h.l1_thr; }) h.l1_thr = T(0);
    if constexpr (requires { h.neg; }) h.neg = T(1);
  }
  const F f{};
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T a = T(0), b = T(0), c = T(0);
    if constexpr (u0) a = s0[i];
    if constexpr (u1) b = s1[i];
    if constexpr (u2) c = s2[i];
    bool keep = true;
    if constexpr (F::masked) keep = mask[i] != 0;
    T pi = p[i];
    Op::update(pi, g[i], a, b, c, keep, h, f);
    p[i] = pi;
    if constexpr (u0) s0[i] = a;
    if constexpr (u1) s1[i] = b;
    if constexpr (u2) s2[i] = c;
  }
}

template <typename Op, typename T, bool Plain, bool M, int W, bool A>
MathFn<Op, T> select_b(bool b) {
  if constexpr (Op::kUsesB) {
    if (b) return &math_loop<Op, T, StaticFlags<M, W, A, true, !Plain>, Plain>;
  }
  return &math_loop<Op, T, StaticFlags<M, W, A, false, !Plain>, Plain>;
}

template <typename Op, typename T, bool Plain, bool M, int W>
MathFn<Op, T> select_a(bool a, bool b) {
  if constexpr (Op::kUsesA) {
    if (a) return select_b<Op, T, Plain, M, W, true>(b);
  }
  return select_b<Op, T, Plain, M, W, false>(b);
}

template <typename Op, typename T, bool Plain, bool M>
MathFn<Op, T> select_wd(int wd, bool a, bool b) {
  if constexpr (Op::kMaxWd >= 2) {
    if (wd == 2) return select_a<Op, T, Plain, M, 2>(a, b);
  }
  if (wd == 1) return select_a<Op, T, Plain, M, 1>(a, b);
  return select_a<Op, T, Plain, M, 0>(a, b);
}

template <typename Op, typename T, bool Plain>
MathFn<Op, T> select_plain(bool masked, int wd, bool a, bool b) {
  return masked ? select_wd<Op, T, Plain, true>(wd, a, b) : select_wd<Op, T, Plain, false>(wd, a, b);
}

// ``plain``: grad scale 1, l1 0 and no maximize (see math_loop).
template <typename Op, typename T>
MathFn<Op, T> select_math(bool masked, int wd, bool a, bool b, bool plain = false) {
  return plain ? select_plain<Op, T, true>(masked, wd, a, b) : select_plain<Op, T, false>(masked, wd, a, b);
}

// ---------------------------------------------------------------------------------------------------------
// Per-call context and per-tensor pointers.

template <typename Op>
struct Context {
  typename Op::template Scalars<float> hf;
  typename Op::template Scalars<double> hd;
  MathFn<Op, float> ff;
  MathFn<Op, double> fd;
  template <typename T>
  const typename Op::template Scalars<T>& h() const {
    if constexpr (std::is_same_v<T, float>) return hf; else return hd;
  }
  template <typename T>
  MathFn<Op, T> fn() const {
    if constexpr (std::is_same_v<T, float>) return ff; else return fd;
  }
};

template <typename Op>
using ChunkFn = void (*)(const Context<Op>&, const TensorPtrs&, int64_t, int64_t);

// Elements [b, b+n) of one tensor. P: param/grad dtype; Master: fp32 master copy given (states fp32).
template <typename Op, typename P, bool Master>
void run_chunk(const Context<Op>& ctx, const TensorPtrs& t, int64_t b, int64_t n) {
  using C = compute_t<P>;
  using S = std::conditional_t<Master, float, P>;
  const auto fn = ctx.template fn<C>();
  const auto& h = ctx.template h<C>();
  P* param = static_cast<P*>(t.param) + b;
  const P* grad = static_cast<const P*>(t.grad) + b;
  S* st[3];
  for (int k = 0; k < 3; ++k) st[k] = t.s[k] ? static_cast<S*>(t.s[k]) + b : nullptr;
  const uint8_t* mask = t.mask ? t.mask + b : nullptr;

  if constexpr (!Master && std::is_same_v<P, C>) {
    fn(n, param, grad, st[0], st[1], st[2], mask, h);
  } else {
    float* master = Master ? t.master + b : nullptr;
    // p comes from the master when there is one; an array already in the compute type is used in place.
    constexpr bool p_direct = Master ? std::is_same_v<float, C> : std::is_same_v<P, C>;
    constexpr bool g_direct = std::is_same_v<P, C>;
    constexpr bool s_direct = std::is_same_v<S, C>;
    alignas(64) C pt[kBlock], gt[kBlock], stt[3][kBlock];
    for (int64_t off = 0; off < n; off += kBlock) {
      const int64_t m = std::min(kBlock, n - off);
      C* pp;
      if constexpr (p_direct) {
        pp = reinterpret_cast<C*>(Master ? static_cast<void*>(master + off) : static_cast<void*>(param + off));
      } else {
        if constexpr (Master) load_block(master + off, pt, m); else load_block(param + off, pt, m);
        pp = pt;
      }
      const C* gp;
      if constexpr (g_direct) {
        gp = reinterpret_cast<const C*>(grad + off);
      } else {
        load_block(grad + off, gt, m);
        gp = gt;
      }
      C* sp[3] = {nullptr, nullptr, nullptr};
      for (int k = 0; k < 3; ++k) {
        if (!st[k]) continue;
        if constexpr (s_direct) {
          sp[k] = reinterpret_cast<C*>(st[k] + off);
        } else {
          load_block(st[k] + off, stt[k], m);
          sp[k] = stt[k];
        }
      }
      fn(m, pp, gp, sp[0], sp[1], sp[2], mask ? mask + off : nullptr, h);
      if constexpr (!p_direct) {
        if constexpr (Master) store_block(pp, master + off, m);
      }
      if constexpr (Master || !p_direct) store_block(pp, param + off, m);
      if constexpr (!s_direct) {
        for (int k = 0; k < 3; ++k) {
          if (st[k]) store_block(sp[k], st[k] + off, m);
        }
      }
    }
  }
}

template <typename Op, bool Master>
ChunkFn<Op> select_chunk(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return &run_chunk<Op, float, Master>;
    case at::kDouble: return &run_chunk<Op, double, Master>;
    case at::kBFloat16: return &run_chunk<Op, c10::BFloat16, Master>;
    case at::kHalf: return &run_chunk<Op, c10::Half, Master>;
    default: return nullptr;
  }
}

// All work items of all tensors in one parallel region; threads pull items dynamically.
template <typename Op>
void run_all(const Context<Op>& ctx, const std::vector<TensorPtrs>& tensors, bool has_master) {
  std::vector<ChunkFn<Op>> fns(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    fns[i] = has_master ? select_chunk<Op, true>(tensors[i].dtype) : select_chunk<Op, false>(tensors[i].dtype);
  }
  struct Item {
    int64_t tensor, begin, n;
  };
  int64_t total = 0;
  for (const TensorPtrs& t : tensors) total += t.numel;
  // Items as long as balance allows (~4 per thread): long sequential streams keep the hardware prefetchers
  // ahead, which is what a memory-bound step needs; measured 10-20% faster than fixed 32K items on big tensors.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max(kChunk, (total + 4 * threads - 1) / (4 * threads));
  std::vector<Item> items;
  items.reserve(tensors.size() + 4 * threads);
  for (int64_t i = 0; i < int64_t(tensors.size()); ++i) {
    const int64_t numel = tensors[i].numel;
    for (int64_t b = 0; b < numel; b += chunk) items.push_back({i, b, std::min(chunk, numel - b)});
  }
  const int64_t n_items = int64_t(items.size());
  if (n_items == 0) return;
  auto work = [&](const Item& it) { fns[it.tensor](ctx, tensors[it.tensor], it.begin, it.n); };
  const int64_t n_threads = std::min<int64_t>(threads, n_items);
  if (n_threads <= 1 || total <= kChunk) {
    for (const Item& it : items) work(it);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n_items;
         k = next.fetch_add(1, std::memory_order_relaxed)) {
      work(items[k]);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// The one-element tensors, read once on the host (they are CPU tensors here).

// Returns false when found_inf is nonzero (the step is skipped).
bool read_scalars(const char* op, at::TensorList params, const std::optional<Tensor>& lr_tensor,
                  const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf, double& lr,
                  double& scale) {
  const at::Device device = params.empty() ? at::Device(at::kCPU) : params[0].device();
  check_scalar_tensor(op, "lr_tensor", lr_tensor, device);
  check_scalar_tensor(op, "grad_scale", grad_scale, device);
  check_scalar_tensor(op, "found_inf", found_inf, device);
  if (found_inf.has_value() && found_inf->item<double>() != 0) return false;
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();
  scale = grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
  return true;
}

// A step count given as a tensor replaces the count-derived float arguments (see csrc/ops.cpp).
template <typename Args>
void read_step(const char* op, at::TensorList params, const std::optional<Tensor>& step, Args& a) {
  if (!step.has_value() || params.empty()) return;
  check_scalar_tensor(op, "step", step, params[0].device());
  set_step(a, step->item<double>());
}

// ---------------------------------------------------------------------------------------------------------
// The ops.

void sgd_step_cpu(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList masters,
                  TensorList masks, double lr, double momentum, double dampening, bool nesterov,
                  double weight_decay, bool maximize, double l1, bool first_step,
                  const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                  const std::optional<Tensor>& found_inf) {
  const char* op = "sgd_step_";
  const bool use_momentum = momentum != 0;
  auto tensors = check_inputs(op, at::kCPU, params, grads, masters, masks,
                              {{"momentum_buffers", momentum_buffers, use_momentum}});
  double scale;
  if (!read_scalars(op, params, lr_tensor, grad_scale, found_inf, lr, scale)) return;
  const SgdArgs a{lr, momentum, dampening, weight_decay, l1, scale, nesterov, maximize, first_step};
  Context<SgdOp> ctx;
  ctx.hf = make_sgd<float>(lr, a);
  ctx.hd = make_sgd<double>(lr, a);
  const int wd = weight_decay != 0 ? 1 : 0;
  const bool plain = scale == 1.0 && l1 == 0.0 && !maximize;
  ctx.ff = select_math<SgdOp, float>(!masks.empty(), wd, use_momentum, false, plain);
  ctx.fd = select_math<SgdOp, double>(!masks.empty(), wd, use_momentum, false, plain);
  run_all(ctx, tensors, !masters.empty());
}

void adam_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                   TensorList max_exp_avg_sqs, TensorList masters, TensorList masks, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   double l1, double bias_correction1, double bias_correction2_sqrt,
                   const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                   const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step) {
  const char* op = "adam_step_";
  auto tensors = check_inputs(
      op, at::kCPU, params, grads, masters, masks,
      {{"exp_avgs", exp_avgs, true},
       {"exp_avg_sqs", exp_avg_sqs, true},
       {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}});
  double scale;
  if (!read_scalars(op, params, lr_tensor, grad_scale, found_inf, lr, scale)) return;
  AdamArgs a{lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, bias_correction2_sqrt, scale, maximize};
  read_step(op, params, step, a);
  Context<AdamOp> ctx;
  ctx.hf = make_adam<float>(lr, a);
  ctx.hd = make_adam<double>(lr, a);
  const int wd = weight_decay != 0 ? (decoupled ? 2 : 1) : 0;
  const bool plain = scale == 1.0 && l1 == 0.0 && !maximize;
  ctx.ff = select_math<AdamOp, float>(!masks.empty(), wd, amsgrad, false, plain);
  ctx.fd = select_math<AdamOp, double>(!masks.empty(), wd, amsgrad, false, plain);
  run_all(ctx, tensors, !masters.empty());
}

void adagrad_step_cpu(TensorList params, TensorList grads, TensorList state_sums, TensorList masters,
                      TensorList masks, double lr, double weight_decay, double eps, bool maximize, double l1,
                      double lr_decay_denom, const std::optional<Tensor>& lr_tensor,
                      const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                      double lr_decay, const std::optional<Tensor>& step) {
  const char* op = "adagrad_step_";
  auto tensors = check_inputs(op, at::kCPU, params, grads, masters, masks, {{"state_sums", state_sums, true}});
  double scale;
  if (!read_scalars(op, params, lr_tensor, grad_scale, found_inf, lr, scale)) return;
  AdagradArgs a{lr, weight_decay, eps, l1, lr_decay_denom, scale, maximize, lr_decay};
  read_step(op, params, step, a);
  Context<AdagradOp> ctx;
  ctx.hf = make_adagrad<float>(lr, a);
  ctx.hd = make_adagrad<double>(lr, a);
  const int wd = weight_decay != 0 ? 1 : 0;
  const bool plain = scale == 1.0 && l1 == 0.0 && !maximize;
  ctx.ff = select_math<AdagradOp, float>(!masks.empty(), wd, false, false, plain);
  ctx.fd = select_math<AdagradOp, double>(!masks.empty(), wd, false, false, plain);
  run_all(ctx, tensors, !masters.empty());
}

void rmsprop_step_cpu(TensorList params, TensorList grads, TensorList square_avgs, TensorList momentum_buffers,
                      TensorList grad_avgs, TensorList masters, TensorList masks, double lr, double alpha,
                      double eps, double weight_decay, double momentum, bool centered, bool maximize, double l1,
                      const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                      const std::optional<Tensor>& found_inf) {
  const char* op = "rmsprop_step_";
  const bool use_momentum = momentum > 0;
  auto tensors = check_inputs(op, at::kCPU, params, grads, masters, masks,
                                    {{"square_avgs", square_avgs, true},
                                     {"momentum_buffers", momentum_buffers, use_momentum},
                                     {"grad_avgs", grad_avgs, centered}});
  double scale;
  if (!read_scalars(op, params, lr_tensor, grad_scale, found_inf, lr, scale)) return;
  const RmspropArgs a{lr, alpha, eps, weight_decay, momentum, l1, scale, maximize};
  Context<RmspropOp> ctx;
  ctx.hf = make_rmsprop<float>(lr, a);
  ctx.hd = make_rmsprop<double>(lr, a);
  const int wd = weight_decay != 0 ? 1 : 0;
  const bool plain = scale == 1.0 && l1 == 0.0 && !maximize;
  ctx.ff = select_math<RmspropOp, float>(!masks.empty(), wd, use_momentum, centered, plain);
  ctx.fd = select_math<RmspropOp, double>(!masks.empty(), wd, use_momentum, centered, plain);
  run_all(ctx, tensors, !masters.empty());
}

template <typename T>
NadamScalars<T> make_scalars(const NadamArgs& a) { return make_nadam<T>(a.lr, a); }
template <typename T>
RadamScalars<T> make_scalars(const RadamArgs& a) { return make_radam<T>(a.lr, a); }
template <typename T>
AdamaxScalars<T> make_scalars(const AdamaxArgs& a) { return make_adamax<T>(a.lr, a); }
template <typename T>
LionScalars<T> make_scalars(const LionArgs& a) { return make_lion<T>(a.lr, a); }

// The optimizers of optim_math.h's second part: one template for the validation, scalars and launch.
template <typename Op, typename Args>
void run_op(const char* op, TensorList params, std::vector<TensorPtrs>& tensors, TensorList masters,
            TensorList masks, Args a, int wd, const std::optional<Tensor>& lr_tensor,
            const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
            const std::optional<Tensor>& step, const std::optional<Tensor>& aux = std::nullopt) {
  double scale;
  if (!read_scalars(op, params, lr_tensor, grad_scale, found_inf, a.lr, scale)) return;
  a.grad_scale = scale;
  if (aux.has_value() && !params.empty()) {
    check_scalar_tensor(op, "mu_product_tensor", aux, params[0].device());
    set_aux(a, aux->item<double>());
  }
  read_step(op, params, step, a);
  Context<Op> ctx;
  ctx.hf = make_scalars<float>(a);
  ctx.hd = make_scalars<double>(a);
  ctx.ff = select_math<Op, float>(!masks.empty(), wd, false, false);
  ctx.fd = select_math<Op, double>(!masks.empty(), wd, false, false);
  run_all(ctx, tensors, !masters.empty());
}

void nadam_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                    TensorList masters, TensorList masks, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, bool maximize, double l1, double momentum_decay,
                    double bias_correction2, double mu, double mu_next, double mu_product,
                    const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step,
                    const std::optional<Tensor>& mu_product_tensor) {
  const char* op = "nadam_step_";
  auto tensors = check_inputs(op, at::kCPU, params, grads, masters, masks,
                              {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true}});
  const NadamArgs a{lr, beta1, beta2, eps, weight_decay, l1, momentum_decay, bias_correction2, mu, mu_next,
                    mu_product, 1.0, maximize};
  run_op<NadamOp>(op, params, tensors, masters, masks, a, weight_decay != 0 ? (decoupled ? 2 : 1) : 0, lr_tensor,
                  grad_scale, found_inf, step, mu_product_tensor);
}

void radam_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                    TensorList masters, TensorList masks, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, bool maximize, double l1, double bias_correction1,
                    double bias_correction2_sqrt, double rect, const std::optional<Tensor>& lr_tensor,
                    const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                    const std::optional<Tensor>& step) {
  const char* op = "radam_step_";
  auto tensors = check_inputs(op, at::kCPU, params, grads, masters, masks,
                              {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true}});
  const RadamArgs a{lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, bias_correction2_sqrt, rect, 1.0,
                    maximize};
  run_op<RadamOp>(op, params, tensors, masters, masks, a, weight_decay != 0 ? (decoupled ? 2 : 1) : 0, lr_tensor,
                  grad_scale, found_inf, step);
}

void adamax_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_infs,
                     TensorList masters, TensorList masks, double lr, double beta1, double beta2, double eps,
                     double weight_decay, bool maximize, double l1, double bias_correction1,
                     const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                     const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step) {
  const char* op = "adamax_step_";
  auto tensors = check_inputs(op, at::kCPU, params, grads, masters, masks,
                              {{"exp_avgs", exp_avgs, true}, {"exp_infs", exp_infs, true}});
  const AdamaxArgs a{lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, 1.0, maximize};
  run_op<AdamaxOp>(op, params, tensors, masters, masks, a, weight_decay != 0 ? 1 : 0, lr_tensor, grad_scale,
                   found_inf, step);
}

void lion_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList masters, TensorList masks,
                   double lr, double beta1, double beta2, double weight_decay, bool maximize, double l1,
                   const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                   const std::optional<Tensor>& found_inf) {
  const char* op = "lion_step_";
  auto tensors = check_inputs(op, at::kCPU, params, grads, masters, masks, {{"exp_avgs", exp_avgs, true}});
  const LionArgs a{lr, beta1, beta2, weight_decay, l1, 1.0, maximize};
  run_op<LionOp>(op, params, tensors, masters, masks, a, weight_decay != 0 ? 1 : 0, lr_tensor, grad_scale,
                 found_inf, std::nullopt);
}


// ---------------------------------------------------------------------------------------------------------
// LAMB: pass 1 (moments and per-tensor norms) over every (tensor, chunk) item, the norms summed per tensor in
// item order (fixed kChunk items: the result does not depend on the thread count), then pass 2 (the update).

template <typename P>
inline float to_f(P x) {
  return static_cast<float>(x);
}

// Elements [b, b+n) of one tensor. Returns (sum p^2, sum u^2) over unmasked entries.
template <typename P, bool Master, bool Masked, bool AdamW>
void lamb_pass1(const TensorPtrs& t, int64_t b, int64_t n, const LambScalars<compute_t<P>>& h, double* out) {
  using C = compute_t<P>;
  using S = std::conditional_t<Master, float, P>;
  const P* param = static_cast<const P*>(t.param) + b;
  const float* master = Master ? t.master + b : nullptr;
  const P* grad = static_cast<const P*>(t.grad) + b;
  S* ms = static_cast<S*>(t.s[0]) + b;
  S* vs = static_cast<S*>(t.s[1]) + b;
  const uint8_t* mask = Masked ? t.mask + b : nullptr;
  C pn = 0, un = 0;
#pragma omp simd reduction(+ : pn, un)
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = Masked ? mask[i] != 0 : true;
    C p = Master ? C(master[i]) : C(to_f(param[i]));
    if constexpr (std::is_same_v<P, double>) p = param[i];
    C m = C(to_f(ms[i])), v = C(to_f(vs[i]));
    if constexpr (std::is_same_v<S, double>) {
      m = ms[i];
      v = vs[i];
    }
    C g = std::is_same_v<P, double> ? C(grad[i]) : C(to_f(grad[i]));
    const C u = lamb_moments(p, g, m, v, keep, AdamW, h);
    ms[i] = S(m);
    vs[i] = S(v);
    p = keep ? p : C(0);
    pn += p * p;
    un += u * u;
  }
  out[0] = double(pn);
  out[1] = double(un);
}

template <typename P, bool Master, bool Masked, bool AdamW>
void lamb_pass2(const TensorPtrs& t, int64_t b, int64_t n, const LambScalars<compute_t<P>>& h, compute_t<P> ratio) {
  using C = compute_t<P>;
  using S = std::conditional_t<Master, float, P>;
  P* param = static_cast<P*>(t.param) + b;
  float* master = Master ? t.master + b : nullptr;
  const S* ms = static_cast<const S*>(t.s[0]) + b;
  const S* vs = static_cast<const S*>(t.s[1]) + b;
  const uint8_t* mask = Masked ? t.mask + b : nullptr;
  const C neg_ratio = -ratio;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = Masked ? mask[i] != 0 : true;
    C p = Master ? C(master[i]) : C(to_f(param[i]));
    if constexpr (std::is_same_v<P, double>) p = param[i];
    C m = C(to_f(ms[i])), v = C(to_f(vs[i]));
    if constexpr (std::is_same_v<S, double>) {
      m = ms[i];
      v = vs[i];
    }
    const C u = lamb_direction(p, m, v, keep, AdamW, h);
    p = fma_(neg_ratio, u, p);
    p = l1_prox(p, h.l1_thr);
    if (Masked) p = keep ? p : C(0);
    if constexpr (Master) master[i] = float(p);
    param[i] = P(p);
  }
}

struct LambFns {
  void (*pass1)(const TensorPtrs&, int64_t, int64_t, const void*, double*);
  void (*pass2)(const TensorPtrs&, int64_t, int64_t, const void*, double);
};

template <typename P, bool Master, bool Masked, bool AdamW>
LambFns lamb_fns() {
  using C = compute_t<P>;
  return {[](const TensorPtrs& t, int64_t b, int64_t n, const void* h, double* out) {
            lamb_pass1<P, Master, Masked, AdamW>(t, b, n, *static_cast<const LambScalars<C>*>(h), out);
          },
          [](const TensorPtrs& t, int64_t b, int64_t n, const void* h, double ratio) {
            lamb_pass2<P, Master, Masked, AdamW>(t, b, n, *static_cast<const LambScalars<C>*>(h), C(ratio));
          }};
}

template <typename P, bool Master>
LambFns lamb_select(bool masked, bool adam_w) {
  if (masked) return adam_w ? lamb_fns<P, Master, true, true>() : lamb_fns<P, Master, true, false>();
  return adam_w ? lamb_fns<P, Master, false, true>() : lamb_fns<P, Master, false, false>();
}

template <bool Master>
LambFns lamb_select_dtype(at::ScalarType dt, bool masked, bool adam_w) {
  switch (dt) {
    case at::kDouble: return lamb_select<double, Master>(masked, adam_w);
    case at::kBFloat16: return lamb_select<c10::BFloat16, Master>(masked, adam_w);
    case at::kHalf: return lamb_select<c10::Half, Master>(masked, adam_w);
    default: return lamb_select<float, Master>(masked, adam_w);
  }
}

// Runs fn(item) over items on all threads (dynamic: threads pull items from a shared counter).
template <typename Item, typename Fn>
void parallel_items(const std::vector<Item>& items, int64_t total, const Fn& fn) {
  const int64_t n_items = int64_t(items.size());
  const int64_t n_threads = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), n_items);
  if (n_threads <= 1 || total <= kChunk) {
    for (int64_t k = 0; k < n_items; ++k) fn(k);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n_items;
         k = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(k);
    }
  });
}

void lamb_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                   TensorList masters, TensorList masks, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool adam_w_mode, bool grad_averaging, bool use_nvlamb, bool bias_correction,
                   double max_grad_norm, bool maximize, double l1, double bias_correction1, double bias_correction2,
                   const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                   const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step,
                   const std::optional<Tensor>& grad_norm) {
  const char* op = "lamb_step_";
  auto tensors = check_inputs(op, at::kCPU, params, grads, masters, masks,
                              {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true}});
  double scale;
  if (!read_scalars(op, params, lr_tensor, grad_scale, found_inf, lr, scale)) return;
  LambArgs a{lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, bias_correction2, scale, 1.0,
             maximize, grad_averaging, bias_correction};
  read_step(op, params, step, a);
  if (grad_norm.has_value() && !params.empty()) {
    check_scalar_tensor(op, "grad_norm", grad_norm, params[0].device());
    a.clip = lamb_clip(grad_norm->item<double>(), scale, max_grad_norm);
  }
  const LambScalars<float> hf = make_lamb<float>(lr, a);
  const LambScalars<double> hd = make_lamb<double>(lr, a);
  const bool has_master = !masters.empty(), masked = !masks.empty();
  struct Item {
    int64_t tensor, begin, n;
  };
  std::vector<Item> items;
  std::vector<int64_t> first(tensors.size() + 1, 0);
  std::vector<LambFns> fns(tensors.size());
  int64_t total = 0;
  for (int64_t i = 0; i < int64_t(tensors.size()); ++i) {
    first[i] = int64_t(items.size());
    const int64_t numel = tensors[i].numel;
    for (int64_t b = 0; b < numel; b += kChunk) items.push_back({i, b, std::min(kChunk, numel - b)});
    fns[i] = has_master ? lamb_select_dtype<true>(tensors[i].dtype, masked, adam_w_mode)
                        : lamb_select_dtype<false>(tensors[i].dtype, masked, adam_w_mode);
    total += numel;
  }
  first[tensors.size()] = int64_t(items.size());
  auto h_of = [&](int64_t i) -> const void* {
    return tensors[i].dtype == at::kDouble ? static_cast<const void*>(&hd) : static_cast<const void*>(&hf);
  };
  std::vector<double> partial(2 * items.size(), 0.0);
  parallel_items(items, total, [&](int64_t k) {
    const Item& it = items[k];
    fns[it.tensor].pass1(tensors[it.tensor], it.begin, it.n, h_of(it.tensor), &partial[2 * k]);
  });
  const bool trust = use_nvlamb || weight_decay != 0;
  std::vector<double> ratio(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    double pn = 0, un = 0;
    for (int64_t k = first[i]; k < first[i + 1]; ++k) {
      pn += partial[2 * k];
      un += partial[2 * k + 1];
    }
    ratio[i] = lamb_ratio(lr, std::sqrt(pn), std::sqrt(un), trust);
  }
  parallel_items(items, total, [&](int64_t k) {
    const Item& it = items[k];
    fns[it.tensor].pass2(tensors[it.tensor], it.begin, it.n, h_of(it.tensor), ratio[it.tensor]);
  });
}

// Per-tensor L2 norms (float32 [T]; float64 sums of squares in item order), for LAMB's global gradient norm.
Tensor l2_norms_cpu(TensorList tensors) {
  const int64_t n = int64_t(tensors.size());
  Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return out;
  struct Item {
    int64_t tensor, begin, n;
  };
  std::vector<Item> items;
  std::vector<int64_t> first(n + 1, 0);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "nnopt::l2_norms: tensors[", i, "] is on ", t.device(), ", expected cpu");
    TORCH_CHECK(t.is_contiguous(), "nnopt::l2_norms: tensors[", i, "] must be contiguous");
    const at::ScalarType dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                "nnopt::l2_norms: tensors[", i, "] has dtype ", dt, ", expected a floating dtype");
    first[i] = int64_t(items.size());
    for (int64_t b = 0; b < t.numel(); b += kChunk) items.push_back({i, b, std::min(kChunk, t.numel() - b)});
    total += t.numel();
  }
  first[n] = int64_t(items.size());
  std::vector<double> partial(items.size(), 0.0);
  parallel_items(items, total, [&](int64_t k) {
    const Item& it = items[k];
    const Tensor& t = tensors[it.tensor];
    double acc = 0;
    auto sum = [&](auto* x) {
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < it.n; ++i) {
        const float v = static_cast<float>(x[it.begin + i]);
        s += v * v;
      }
      acc = s;
    };
    switch (t.scalar_type()) {
      case at::kDouble: {
        const double* x = t.data_ptr<double>();
        double s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < it.n; ++i) s += x[it.begin + i] * x[it.begin + i];
        acc = s;
        break;
      }
      case at::kBFloat16: sum(t.data_ptr<c10::BFloat16>()); break;
      case at::kHalf: sum(t.data_ptr<c10::Half>()); break;
      default: sum(t.data_ptr<float>()); break;
    }
    partial[k] = acc;
  });
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t k = first[i]; k < first[i + 1]; ++k) s += partial[k];
    o[i] = float(std::sqrt(s));
  }
  return out;
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CPU, m) {
  m.impl("sgd_step_", &nnopt::sgd_step_cpu);
  m.impl("adam_step_", &nnopt::adam_step_cpu);
  m.impl("adagrad_step_", &nnopt::adagrad_step_cpu);
  m.impl("rmsprop_step_", &nnopt::rmsprop_step_cpu);
  m.impl("nadam_step_", &nnopt::nadam_step_cpu);
  m.impl("radam_step_", &nnopt::radam_step_cpu);
  m.impl("adamax_step_", &nnopt::adamax_step_cpu);
  m.impl("lion_step_", &nnopt::lion_step_cpu);
  m.impl("lamb_step_", &nnopt::lamb_step_cpu);
  m.impl("l2_norms", &nnopt::l2_norms_cpu);
}

// With empty lists the dispatcher has no tensor to pick a backend from; these kernels make that call the no-op it
// is in the reference. Backend kernels (CPU above, CUDA) take precedence whenever a tensor is passed.
namespace nnopt {
namespace {

void check_no_backend(const char* op, TensorList params) {
  TORCH_CHECK(params.empty(), "nnopt::", op, ": no kernel for tensors on ", params[0].device());
}

void sgd_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, double, double, double, bool,
                    double, bool, double, bool, const std::optional<Tensor>&, const std::optional<Tensor>&,
                    const std::optional<Tensor>&) {
  check_no_backend("sgd_step_", params);
}

void adam_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                     double, double, double, double, double, bool, bool, bool, double, double, double,
                     const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                     const std::optional<Tensor>&) {
  check_no_backend("adam_step_", params);
}

void adagrad_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, double, double, double,
                        bool, double, double, const std::optional<Tensor>&, const std::optional<Tensor>&,
                        const std::optional<Tensor>&, double, const std::optional<Tensor>&) {
  check_no_backend("adagrad_step_", params);
}

void rmsprop_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                        double, double, double, double, double, bool, bool, double, const std::optional<Tensor>&,
                        const std::optional<Tensor>&, const std::optional<Tensor>&) {
  check_no_backend("rmsprop_step_", params);
}

void nadam_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, TensorList, double, double,
                      double, double, double, bool, bool, double, double, double, double, double, double,
                      const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                      const std::optional<Tensor>&, const std::optional<Tensor>&) {
  check_no_backend("nadam_step_", params);
}

void radam_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, TensorList, double, double,
                      double, double, double, bool, bool, double, double, double, double,
                      const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                      const std::optional<Tensor>&) {
  check_no_backend("radam_step_", params);
}

void adamax_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, TensorList, double, double,
                       double, double, double, bool, double, double, const std::optional<Tensor>&,
                       const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&) {
  check_no_backend("adamax_step_", params);
}

void lamb_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, TensorList, double, double,
                     double, double, double, bool, bool, bool, bool, double, bool, double, double, double,
                     const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                     const std::optional<Tensor>&, const std::optional<Tensor>&) {
  check_no_backend("lamb_step_", params);
}

void lion_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, double, double, double, double,
                     bool, double, const std::optional<Tensor>&, const std::optional<Tensor>&,
                     const std::optional<Tensor>&) {
  check_no_backend("lion_step_", params);
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CompositeExplicitAutograd, m) {
  m.impl("sgd_step_", &nnopt::sgd_step_empty);
  m.impl("adam_step_", &nnopt::adam_step_empty);
  m.impl("adagrad_step_", &nnopt::adagrad_step_empty);
  m.impl("rmsprop_step_", &nnopt::rmsprop_step_empty);
  m.impl("nadam_step_", &nnopt::nadam_step_empty);
  m.impl("radam_step_", &nnopt::radam_step_empty);
  m.impl("adamax_step_", &nnopt::adamax_step_empty);
  m.impl("lion_step_", &nnopt::lion_step_empty);
  m.impl("lamb_step_", &nnopt::lamb_step_empty);
}
