// CUDA kernels of the fused optimizer steps (nnopt::sgd_step_, adam_step_, adagrad_step_, rmsprop_step_, nadam_step_,
// radam_step_, adamax_step_, lion_step_).
//
// Math: csrc/include/nnopt/optim_math.h (shared with the CPU); conventions: csrc/ops.cpp; oracle:
// nnopt/reference/fused_optim.py. Every op is one launch of the shared multi-tensor launcher
// (multi_tensor_apply.cuh) per parameter dtype in the lists (one launch in the usual single-dtype case).
// lr_tensor, grad_scale and found_inf are read inside the kernel: the host never synchronises. The flags are
// runtime values, uniform across the launch; the kernels are specialised only on the param dtype and on
// whether fp32 masters are given.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "nnopt/optim_checks.h"
#include "nnopt/optim_math.h"

namespace nnopt {
namespace {

using at::Tensor;
using at::TensorList;
using cuda::kILP;
using namespace nnopt::optim;

template <typename P>
using compute_t = std::conditional_t<std::is_same<P, double>::value, double, float>;

// ---------------------------------------------------------------------------------------------------------
// The optimizers: argument struct, derived scalars, per-element update (all from optim_math.h).
// State slots: SGD buf | Adam m, v, vmax | Adagrad sum | RMSprop v, buf, grad_avg.

struct SgdOp {
  using Args = SgdArgs;
  template <typename T>
  __device__ static SgdScalars<T> make(double lr, const Args& a) { return make_sgd<T>(lr, a); }
  template <typename T>
  __device__ static void update(T& p, T g, T& s0, T&, T&, bool keep, const SgdScalars<T>& h, const RuntimeFlags& f) {
    sgd_update(p, g, s0, keep, h, f);
  }
};

struct AdamOp {
  using Args = AdamArgs;
  template <typename T>
  __device__ static AdamScalars<T> make(double lr, const Args& a) { return make_adam<T>(lr, a); }
  template <typename T>
  __device__ static void update(T& p, T g, T& s0, T& s1, T& s2, bool keep, const AdamScalars<T>& h,
                                const RuntimeFlags& f) {
    adam_update(p, g, s0, s1, s2, keep, h, f);
  }
};

struct AdagradOp {
  using Args = AdagradArgs;
  template <typename T>
  __device__ static AdagradScalars<T> make(double lr, const Args& a) { return make_adagrad<T>(lr, a); }
  template <typename T>
  __device__ static void update(T& p, T g, T& s0, T&, T&, bool keep, const AdagradScalars<T>& h,
                                const RuntimeFlags& f) {
    adagrad_update(p, g, s0, keep, h, f);
  }
};

struct RmspropOp {
  using Args = RmspropArgs;
  template <typename T>
  __device__ static RmspropScalars<T> make(double lr, const Args& a) { return make_rmsprop<T>(lr, a); }
  template <typename T>
  __device__ static void update(T& p, T g, T& s0, T& s1, T& s2, bool keep, const RmspropScalars<T>& h,
                                const RuntimeFlags& f) {
    rmsprop_update(p, g, s0, s1, s2, keep, h, f);
  }
};

// NAdam, RAdam, Adamax (two states) and Lion (one).
#define NNOPT_CUDA_OP(NAME, ARGS, SCALARS, MAKE, CALL)                                                         \
  struct NAME {                                                                                               \
    using Args = ARGS;                                                                                        \
    template <typename T>                                                                                     \
    __device__ static SCALARS<T> make(double lr, const Args& a) { return MAKE<T>(lr, a); }                   \
    template <typename T>                                                                                     \
    __device__ static void update(T& p, T g, T& s0, T& s1, T&, bool keep, const SCALARS<T>& h,               \
                                  const RuntimeFlags& f) {                                                    \
      CALL;                                                                                                   \
    }                                                                                                         \
  };

NNOPT_CUDA_OP(NadamOp, NadamArgs, NadamScalars, make_nadam, nadam_update(p, g, s0, s1, keep, h, f))
NNOPT_CUDA_OP(RadamOp, RadamArgs, RadamScalars, make_radam, radam_update(p, g, s0, s1, keep, h, f))
NNOPT_CUDA_OP(AdamaxOp, AdamaxArgs, AdamaxScalars, make_adamax, adamax_update(p, g, s0, s1, keep, h, f))
NNOPT_CUDA_OP(LionOp, LionArgs, LionScalars, make_lion, (void)s1; lion_update(p, g, s0, keep, h, f))
#undef NNOPT_CUDA_OP

// A one-element device tensor read in the kernel: float32 or float64 (others are converted first).
struct DeviceScalar {
  const void* ptr = nullptr;
  bool is_double = false;
  __device__ double get(double fallback) const {
    if (ptr == nullptr) return fallback;
    return is_double ? *static_cast<const double*>(ptr) : double(*static_cast<const float*>(ptr));
  }
};

// ---------------------------------------------------------------------------------------------------------
// Loads/stores of kILP elements in the compute type: one vector access when `full` (aligned, in range).

template <typename C, typename T>
__device__ __forceinline__ void load_c(const T* p, int64_t i0, int64_t n, bool full, C (&out)[kILP]) {
  if (full) {
    T tmp[kILP];
    cuda::load_vec(p + i0, tmp);
#pragma unroll
    for (int j = 0; j < kILP; ++j) out[j] = static_cast<C>(tmp[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) out[j] = i0 + j < n ? static_cast<C>(p[i0 + j]) : C(0);
  }
}

template <typename C, typename T>
__device__ __forceinline__ void store_c(T* p, int64_t i0, int64_t n, bool full, const C (&in)[kILP]) {
  if (full) {
    T tmp[kILP];
#pragma unroll
    for (int j = 0; j < kILP; ++j) tmp[j] = static_cast<T>(in[j]);
    cuda::store_vec(p + i0, tmp);
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      if (i0 + j < n) p[i0 + j] = static_cast<T>(in[j]);
    }
  }
}

// One optimizer over one chunk. P: param/grad dtype; Master: fp32 masters given (states fp32).
template <typename Op, typename P, bool Master>
struct OptimFunctor {
  typename Op::Args args;
  DeviceScalar lr;
  DeviceScalar grad_scale;
  DeviceScalar step;  // device-resident step count: the count-derived scalars are computed here
  RuntimeFlags flags;
  DeviceScalar aux;  // NAdam's device-resident mu_product

  __device__ void operator()(const TensorPtrs& t, int64_t start, int64_t n) const {
    using C = compute_t<P>;
    using S = std::conditional_t<Master, float, P>;
    typename Op::Args a = args;
    a.grad_scale = grad_scale.get(1.0);
    if (aux.ptr != nullptr) set_aux(a, aux.get(0.0));
    if (step.ptr != nullptr) set_step(a, step.get(0.0));
    const auto h = Op::template make<C>(lr.get(args.lr), a);

    P* param = static_cast<P*>(t.param) + start;
    const P* grad = static_cast<const P*>(t.grad) + start;
    float* master = Master ? t.master + start : nullptr;
    const uint8_t* mask = t.mask ? t.mask + start : nullptr;
    S* s0 = t.s[0] ? static_cast<S*>(t.s[0]) + start : nullptr;
    S* s1 = t.s[1] ? static_cast<S*>(t.s[1]) + start : nullptr;
    S* s2 = t.s[2] ? static_cast<S*>(t.s[2]) + start : nullptr;
    const bool aligned = cuda::vec_aligned<P>(param) && cuda::vec_aligned<P>(grad) &&
                         (!Master || cuda::vec_aligned<float>(master)) && (!mask || cuda::vec_aligned<uint8_t>(mask)) &&
                         (!s0 || cuda::vec_aligned<S>(s0)) && (!s1 || cuda::vec_aligned<S>(s1)) &&
                         (!s2 || cuda::vec_aligned<S>(s2));

    for (int64_t i0 = int64_t(threadIdx.x) * kILP; i0 < n; i0 += int64_t(blockDim.x) * kILP) {
      const bool full = aligned && i0 + kILP <= n;
      C rp[kILP], rg[kILP], r0[kILP], r1[kILP], r2[kILP];
      bool keep[kILP];
      if (Master) {
        load_c(master, i0, n, full, rp);
      } else {
        load_c(param, i0, n, full, rp);
      }
      load_c(grad, i0, n, full, rg);
      if (s0) load_c(s0, i0, n, full, r0);
      if (s1) load_c(s1, i0, n, full, r1);
      if (s2) load_c(s2, i0, n, full, r2);
      if (mask) {
        uint8_t mk[kILP];
        load_c(mask, i0, n, full, mk);
#pragma unroll
        for (int j = 0; j < kILP; ++j) keep[j] = mk[j] != 0;
      } else {
#pragma unroll
        for (int j = 0; j < kILP; ++j) keep[j] = true;
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) Op::update(rp[j], rg[j], r0[j], r1[j], r2[j], keep[j], h, flags);
      if (Master) store_c(master, i0, n, full, rp);
      store_c(param, i0, n, full, rp);
      if (s0) store_c(s0, i0, n, full, r0);
      if (s1) store_c(s1, i0, n, full, r1);
      if (s2) store_c(s2, i0, n, full, r2);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Host side.

// The one-element tensors as the kernels read them. Converted copies (other dtypes) are held here until the
// launch is queued; the caching allocator keeps their memory for the stream.
struct Scalars {
  Tensor lr_keep, scale_keep, inf_keep, step_keep, aux_keep;
  DeviceScalar lr, grad_scale, step, aux;
  const float* found_inf = nullptr;
};

DeviceScalar device_scalar(const std::optional<Tensor>& t, Tensor& keep) {
  DeviceScalar s;
  if (!t.has_value()) return s;
  keep = (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble) ? *t : t->to(at::kFloat);
  s.ptr = keep.data_ptr();
  s.is_double = keep.scalar_type() == at::kDouble;
  return s;
}

Scalars prepare_scalars(const char* op, TensorList params, const std::optional<Tensor>& lr_tensor,
                        const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                        const std::optional<Tensor>& step = std::nullopt) {
  const at::Device device = params[0].device();
  check_scalar_tensor(op, "step", step, device);
  check_scalar_tensor(op, "lr_tensor", lr_tensor, device);
  check_scalar_tensor(op, "grad_scale", grad_scale, device);
  check_scalar_tensor(op, "found_inf", found_inf, device);
  Scalars s;
  s.lr = device_scalar(lr_tensor, s.lr_keep);
  s.grad_scale = device_scalar(grad_scale, s.scale_keep);
  s.step = device_scalar(step, s.step_keep);
  if (found_inf.has_value()) {
    s.inf_keep = found_inf->scalar_type() == at::kFloat ? *found_inf : found_inf->to(at::kFloat);
    s.found_inf = static_cast<const float*>(s.inf_keep.data_ptr());
  }
  return s;
}

template <typename Op, typename P, bool Master>
void launch_typed(const std::vector<TensorPtrs>& metas, at::Device device, const typename Op::Args& args,
                  const RuntimeFlags& flags, const Scalars& sc) {
  OptimFunctor<Op, P, Master> f{args, sc.lr, sc.grad_scale, sc.step, flags, sc.aux};
  cuda::multi_tensor_apply(metas, device, sc.found_inf, f);
}

template <typename Op, bool Master>
void launch_dtype(at::ScalarType dt, const std::vector<TensorPtrs>& metas, at::Device device,
                  const typename Op::Args& args, const RuntimeFlags& flags, const Scalars& sc) {
  switch (dt) {
    case at::kFloat: return launch_typed<Op, float, Master>(metas, device, args, flags, sc);
    case at::kDouble: return launch_typed<Op, double, Master>(metas, device, args, flags, sc);
    case at::kBFloat16: return launch_typed<Op, c10::BFloat16, Master>(metas, device, args, flags, sc);
    case at::kHalf: return launch_typed<Op, c10::Half, Master>(metas, device, args, flags, sc);
    default: TORCH_CHECK(false, "nnopt: unsupported param dtype ", dt);
  }
}

// One launch per param dtype present (one in the usual case).
template <typename Op>
void launch(const std::vector<TensorPtrs>& tensors, bool has_master, at::Device device,
            const typename Op::Args& args, const RuntimeFlags& flags, const Scalars& sc) {
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
  for (at::ScalarType dt : dtypes) {
    std::vector<TensorPtrs> metas;
    for (const TensorPtrs& t : tensors) {
      if (t.dtype == dt && t.numel > 0) metas.push_back(t);
    }
    if (metas.empty()) continue;
    if (has_master) {
      launch_dtype<Op, true>(dt, metas, device, args, flags, sc);
    } else {
      launch_dtype<Op, false>(dt, metas, device, args, flags, sc);
    }
  }
}

void sgd_step_cuda(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList masters,
                   TensorList masks, double lr, double momentum, double dampening, bool nesterov,
                   double weight_decay, bool maximize, double l1, bool first_step,
                   const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                   const std::optional<Tensor>& found_inf) {
  const char* op = "sgd_step_";
  const bool use_momentum = momentum != 0;
  auto tensors = check_inputs(op, at::kCUDA, params, grads, masters, masks,
                              {{"momentum_buffers", momentum_buffers, use_momentum}});
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const Scalars sc = prepare_scalars(op, params, lr_tensor, grad_scale, found_inf);
  const SgdArgs a{lr, momentum, dampening, weight_decay, l1, 1.0, nesterov, maximize, first_step};
  const RuntimeFlags f{!masks.empty(), weight_decay != 0 ? 1 : 0, use_momentum, false};
  launch<SgdOp>(tensors, !masters.empty(), params[0].device(), a, f, sc);
}

void adam_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                    TensorList max_exp_avg_sqs, TensorList masters, TensorList masks, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    double l1, double bias_correction1, double bias_correction2_sqrt,
                    const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step) {
  const char* op = "adam_step_";
  auto tensors = check_inputs(
      op, at::kCUDA, params, grads, masters, masks,
      {{"exp_avgs", exp_avgs, true},
       {"exp_avg_sqs", exp_avg_sqs, true},
       {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}});
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const Scalars sc = prepare_scalars(op, params, lr_tensor, grad_scale, found_inf, step);
  const AdamArgs a{lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, bias_correction2_sqrt, 1.0, maximize};
  const RuntimeFlags f{!masks.empty(), weight_decay != 0 ? (decoupled ? 2 : 1) : 0, amsgrad, false};
  launch<AdamOp>(tensors, !masters.empty(), params[0].device(), a, f, sc);
}

void adagrad_step_cuda(TensorList params, TensorList grads, TensorList state_sums, TensorList masters,
                       TensorList masks, double lr, double weight_decay, double eps, bool maximize, double l1,
                       double lr_decay_denom, const std::optional<Tensor>& lr_tensor,
                       const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                       double lr_decay, const std::optional<Tensor>& step) {
  const char* op = "adagrad_step_";
  auto tensors = check_inputs(op, at::kCUDA, params, grads, masters, masks, {{"state_sums", state_sums, true}});
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const Scalars sc = prepare_scalars(op, params, lr_tensor, grad_scale, found_inf, step);
  const AdagradArgs a{lr, weight_decay, eps, l1, lr_decay_denom, 1.0, maximize, lr_decay};
  const RuntimeFlags f{!masks.empty(), weight_decay != 0 ? 1 : 0, false, false};
  launch<AdagradOp>(tensors, !masters.empty(), params[0].device(), a, f, sc);
}

void rmsprop_step_cuda(TensorList params, TensorList grads, TensorList square_avgs, TensorList momentum_buffers,
                       TensorList grad_avgs, TensorList masters, TensorList masks, double lr, double alpha,
                       double eps, double weight_decay, double momentum, bool centered, bool maximize, double l1,
                       const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                       const std::optional<Tensor>& found_inf) {
  const char* op = "rmsprop_step_";
  const bool use_momentum = momentum > 0;
  auto tensors = check_inputs(op, at::kCUDA, params, grads, masters, masks,
                              {{"square_avgs", square_avgs, true},
                               {"momentum_buffers", momentum_buffers, use_momentum},
                               {"grad_avgs", grad_avgs, centered}});
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const Scalars sc = prepare_scalars(op, params, lr_tensor, grad_scale, found_inf);
  const RmspropArgs a{lr, alpha, eps, weight_decay, momentum, l1, 1.0, maximize};
  const RuntimeFlags f{!masks.empty(), weight_decay != 0 ? 1 : 0, use_momentum, centered};
  launch<RmspropOp>(tensors, !masters.empty(), params[0].device(), a, f, sc);
}

void nadam_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                     TensorList masters, TensorList masks, double lr, double beta1, double beta2, double eps,
                     double weight_decay, bool decoupled, bool maximize, double l1, double momentum_decay,
                     double bias_correction2, double mu, double mu_next, double mu_product,
                     const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                     const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step,
                     const std::optional<Tensor>& mu_product_tensor) {
  const char* op = "nadam_step_";
  auto tensors = check_inputs(op, at::kCUDA, params, grads, masters, masks,
                              {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true}});
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  Scalars sc = prepare_scalars(op, params, lr_tensor, grad_scale, found_inf, step);
  check_scalar_tensor(op, "mu_product_tensor", mu_product_tensor, params[0].device());
  sc.aux = device_scalar(mu_product_tensor, sc.aux_keep);
  const NadamArgs a{lr, beta1, beta2, eps, weight_decay, l1, momentum_decay, bias_correction2, mu, mu_next,
                    mu_product, 1.0, maximize};
  const RuntimeFlags f{!masks.empty(), weight_decay != 0 ? (decoupled ? 2 : 1) : 0, false, false};
  launch<NadamOp>(tensors, !masters.empty(), params[0].device(), a, f, sc);
}

void radam_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                     TensorList masters, TensorList masks, double lr, double beta1, double beta2, double eps,
                     double weight_decay, bool decoupled, bool maximize, double l1, double bias_correction1,
                     double bias_correction2_sqrt, double rect, const std::optional<Tensor>& lr_tensor,
                     const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                     const std::optional<Tensor>& step) {
  const char* op = "radam_step_";
  auto tensors = check_inputs(op, at::kCUDA, params, grads, masters, masks,
                              {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true}});
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const Scalars sc = prepare_scalars(op, params, lr_tensor, grad_scale, found_inf, step);
  const RadamArgs a{lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, bias_correction2_sqrt, rect, 1.0,
                    maximize};
  const RuntimeFlags f{!masks.empty(), weight_decay != 0 ? (decoupled ? 2 : 1) : 0, false, false};
  launch<RadamOp>(tensors, !masters.empty(), params[0].device(), a, f, sc);
}

void adamax_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_infs,
                      TensorList masters, TensorList masks, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bool maximize, double l1, double bias_correction1,
                      const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                      const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step) {
  const char* op = "adamax_step_";
  auto tensors = check_inputs(op, at::kCUDA, params, grads, masters, masks,
                              {{"exp_avgs", exp_avgs, true}, {"exp_infs", exp_infs, true}});
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const Scalars sc = prepare_scalars(op, params, lr_tensor, grad_scale, found_inf, step);
  const AdamaxArgs a{lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, 1.0, maximize};
  const RuntimeFlags f{!masks.empty(), weight_decay != 0 ? 1 : 0, false, false};
  launch<AdamaxOp>(tensors, !masters.empty(), params[0].device(), a, f, sc);
}

void lion_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList masters, TensorList masks,
                    double lr, double beta1, double beta2, double weight_decay, bool maximize, double l1,
                    const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& found_inf) {
  const char* op = "lion_step_";
  auto tensors = check_inputs(op, at::kCUDA, params, grads, masters, masks, {{"exp_avgs", exp_avgs, true}});
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const Scalars sc = prepare_scalars(op, params, lr_tensor, grad_scale, found_inf);
  const LionArgs a{lr, beta1, beta2, weight_decay, l1, 1.0, maximize};
  const RuntimeFlags f{!masks.empty(), weight_decay != 0 ? 1 : 0, false, false};
  launch<LionOp>(tensors, !masters.empty(), params[0].device(), a, f, sc);
}

// ---------------------------------------------------------------------------------------------------------
// LAMB (apex FusedLAMB; math in optim_math.h). Pass 1: one launch per dtype over all chunks; each block updates
// the moments of its chunk and writes its partial (sum p^2, sum u^2) to partial[offset + blockIdx.x] (a block
// reduction: deterministic). The per-tensor norms are sums over each tensor's consecutive chunks (a float64
// cumulative sum, then differences), the trust ratios follow on the device, spread to one ratio per chunk.
// Pass 2: one launch per dtype; each block applies its chunk's ratio. No host synchronisation.

template <typename C>
__device__ double block_sum(C x, double* shared) {
  double v = double(x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < int(blockDim.x / 32); ++w) total += shared[w];
  }
  return total;
}

template <typename P, bool Master>
struct LambPass1Functor {
  LambArgs args;
  DeviceScalar lr, grad_scale, step, grad_norm;
  double max_grad_norm;
  bool masked, adam_w;
  double* partial;
  int64_t offset;

  __device__ void operator()(const TensorPtrs& t, int64_t start, int64_t n) const {
    using C = compute_t<P>;
    using S = std::conditional_t<Master, float, P>;
    __shared__ double shared[cuda::kBlockThreads / 32];
    LambArgs a = args;
    a.grad_scale = grad_scale.get(1.0);
    if (step.ptr != nullptr) set_step(a, step.get(0.0));
    if (grad_norm.ptr != nullptr) a.clip = lamb_clip(grad_norm.get(0.0), a.grad_scale, max_grad_norm);
    const auto h = make_lamb<C>(lr.get(args.lr), a);
    const P* param = static_cast<const P*>(t.param) + start;
    const float* master = Master ? t.master + start : nullptr;
    const P* grad = static_cast<const P*>(t.grad) + start;
    S* ms = static_cast<S*>(t.s[0]) + start;
    S* vs = static_cast<S*>(t.s[1]) + start;
    const uint8_t* mask = masked ? t.mask + start : nullptr;
    C pn = 0, un = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const bool keep = mask ? mask[i] != 0 : true;
      C p = Master ? C(master[i]) : static_cast<C>(param[i]);
      C m = static_cast<C>(ms[i]), v = static_cast<C>(vs[i]);
      const C u = lamb_moments(p, static_cast<C>(grad[i]), m, v, keep, adam_w, h);
      ms[i] = static_cast<S>(m);
      vs[i] = static_cast<S>(v);
      p = keep ? p : C(0);
      pn += p * p;
      un += u * u;
    }
    const double sp = block_sum(pn, shared);
    const double su = block_sum(un, shared);
    if (threadIdx.x == 0) {
      partial[2 * (offset + blockIdx.x)] = sp;
      partial[2 * (offset + blockIdx.x) + 1] = su;
    }
  }
};

template <typename P, bool Master>
struct LambPass2Functor {
  LambArgs args;
  DeviceScalar lr, grad_scale, step;
  bool masked, adam_w;
  const double* chunk_ratio;
  int64_t offset;

  __device__ void operator()(const TensorPtrs& t, int64_t start, int64_t n) const {
    using C = compute_t<P>;
    using S = std::conditional_t<Master, float, P>;
    LambArgs a = args;
    a.grad_scale = grad_scale.get(1.0);
    if (step.ptr != nullptr) set_step(a, step.get(0.0));
    const auto h = make_lamb<C>(lr.get(args.lr), a);
    const C neg_ratio = C(-chunk_ratio[offset + blockIdx.x]);
    P* param = static_cast<P*>(t.param) + start;
    float* master = Master ? t.master + start : nullptr;
    const S* ms = static_cast<const S*>(t.s[0]) + start;
    const S* vs = static_cast<const S*>(t.s[1]) + start;
    const uint8_t* mask = masked ? t.mask + start : nullptr;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const bool keep = mask ? mask[i] != 0 : true;
      C p = Master ? C(master[i]) : static_cast<C>(param[i]);
      const C u = lamb_direction(p, static_cast<C>(ms[i]), static_cast<C>(vs[i]), keep, adam_w, h);
      p = fma_(neg_ratio, u, p);
      p = l1_prox(p, h.l1_thr);
      if (mask) p = keep ? p : C(0);
      if (Master) master[i] = float(p);
      param[i] = static_cast<P>(p);
    }
  }
};

// A host vector of int64 copied to the device from pinned memory, asynchronously (no host synchronisation).
Tensor to_device_async(const std::vector<int64_t>& v, at::Device device) {
  Tensor host = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
  return host.to(device, /*non_blocking=*/true);
}

template <template <typename, bool> class F, typename Make>
void lamb_launch_dtype(at::ScalarType dt, bool master, const std::vector<TensorPtrs>& metas, at::Device device,
                       const float* found_inf, const Make& make) {
  auto go = [&](auto tag, auto m) {
    using P = decltype(tag);
    constexpr bool M = decltype(m)::value;
    F<P, M> f = make(tag, m);
    cuda::multi_tensor_apply(metas, device, found_inf, f);
  };
  using T = std::true_type;
  using Fl = std::false_type;
  switch (dt) {
    case at::kFloat: return master ? go(float{}, T{}) : go(float{}, Fl{});
    case at::kDouble: return master ? go(double{}, T{}) : go(double{}, Fl{});
    case at::kBFloat16: return master ? go(c10::BFloat16{}, T{}) : go(c10::BFloat16{}, Fl{});
    case at::kHalf: return master ? go(c10::Half{}, T{}) : go(c10::Half{}, Fl{});
    default: TORCH_CHECK(false, "nnopt: unsupported param dtype ", dt);
  }
}

void lamb_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                    TensorList masters, TensorList masks, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool adam_w_mode, bool grad_averaging, bool use_nvlamb, bool bias_correction,
                    double max_grad_norm, bool maximize, double l1, double bias_correction1, double bias_correction2,
                    const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step,
                    const std::optional<Tensor>& grad_norm) {
  const char* op = "lamb_step_";
  auto tensors = check_inputs(op, at::kCUDA, params, grads, masters, masks,
                              {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true}});
  if (params.empty()) return;
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  Scalars sc = prepare_scalars(op, params, lr_tensor, grad_scale, found_inf, step);
  check_scalar_tensor(op, "grad_norm", grad_norm, device);
  Tensor norm_keep;
  const DeviceScalar gnorm = device_scalar(grad_norm, norm_keep);
  const LambArgs a{lr, beta1, beta2, eps, weight_decay, l1, bias_correction1, bias_correction2, 1.0, 1.0,
                   maximize, grad_averaging, bias_correction};
  const bool has_master = !masters.empty(), masked = !masks.empty();
  // Tensors grouped by dtype (one launch each), chunks numbered across the groups in launch order.
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
  std::vector<std::vector<TensorPtrs>> groups;
  std::vector<at::ScalarType> group_dtype;
  std::vector<int64_t> offsets, counts, chunk_tensor;
  int64_t n_chunks = 0, n_tensors = 0;
  for (at::ScalarType dt : dtypes) {
    std::vector<TensorPtrs> metas;
    for (const TensorPtrs& t : tensors) {
      if (t.dtype == dt && t.numel > 0) metas.push_back(t);
    }
    if (metas.empty()) continue;
    offsets.push_back(n_chunks);
    for (const TensorPtrs& t : metas) {
      const int64_t c = (t.numel + cuda::kChunkSize - 1) / cuda::kChunkSize;
      counts.push_back(c);
      for (int64_t k = 0; k < c; ++k) chunk_tensor.push_back(n_tensors);
      n_chunks += c;
      ++n_tensors;
    }
    groups.push_back(std::move(metas));
    group_dtype.push_back(dt);
  }
  if (n_chunks == 0) return;
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  Tensor partial = at::zeros({n_chunks, 2}, f64);
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    lamb_launch_dtype<LambPass1Functor>(group_dtype[gi], has_master, groups[gi], device, sc.found_inf,
                                        [&](auto tag, auto m) {
                                          return LambPass1Functor<decltype(tag), decltype(m)::value>{
                                              a, sc.lr, sc.grad_scale, sc.step, gnorm, max_grad_norm, masked,
                                              adam_w_mode, partial.data_ptr<double>(), offsets[gi]};
                                        });
  }
  // Per-tensor sums over consecutive chunks: cumulative sums at each tensor's last chunk, differenced.
  std::vector<int64_t> last(counts.size());
  int64_t acc = 0;
  for (size_t i = 0; i < counts.size(); ++i) last[i] = (acc += counts[i]) - 1;
  Tensor last_t = to_device_async(last, device);
  Tensor totals = at::cumsum(partial, 0).index_select(0, last_t);
  Tensor sums = at::cat({totals.slice(0, 0, 1), totals.slice(0, 1) - totals.slice(0, 0, -1)}, 0);
  Tensor norms = at::sqrt(sums);
  Tensor pn = norms.select(1, 0), un = norms.select(1, 1);
  Tensor lr_t = lr_tensor.has_value() ? lr_tensor->to(f64).reshape({}) : at::scalar_tensor(lr, f64);
  const bool trust = use_nvlamb || weight_decay != 0;
  Tensor ratio = trust ? at::where(at::logical_and(pn != 0, un != 0), lr_t * (pn / un), lr_t) : lr_t.expand_as(pn);
  Tensor chunk_t = to_device_async(chunk_tensor, device);
  Tensor chunk_ratio = ratio.index_select(0, chunk_t).contiguous();
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    lamb_launch_dtype<LambPass2Functor>(group_dtype[gi], has_master, groups[gi], device, sc.found_inf,
                                        [&](auto tag, auto m) {
                                          return LambPass2Functor<decltype(tag), decltype(m)::value>{
                                              a, sc.lr, sc.grad_scale, sc.step, masked, adam_w_mode,
                                              chunk_ratio.data_ptr<double>(), offsets[gi]};
                                        });
  }
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CUDA, m) {
  m.impl("sgd_step_", &nnopt::sgd_step_cuda);
  m.impl("adam_step_", &nnopt::adam_step_cuda);
  m.impl("adagrad_step_", &nnopt::adagrad_step_cuda);
  m.impl("rmsprop_step_", &nnopt::rmsprop_step_cuda);
  m.impl("nadam_step_", &nnopt::nadam_step_cuda);
  m.impl("radam_step_", &nnopt::radam_step_cuda);
  m.impl("adamax_step_", &nnopt::adamax_step_cuda);
  m.impl("lion_step_", &nnopt::lion_step_cuda);
  m.impl("lamb_step_", &nnopt::lamb_step_cuda);
}
