// CUDA kernels of nnopt::muon_momentum_ and nnopt::muon_update_ (math: csrc/include/nnopt/muon_math.h; conventions:
// csrc/ops.cpp; oracle: nnopt/reference/fused_optim.py). Each op is one launch of the shared multi-tensor launcher
// (multi_tensor_apply.cuh) over every tensor; grad_scale, lr_tensor and found_inf are read on the device (the
// launcher skips the whole launch on a nonzero found_inf), so the host never synchronises. One dtype per list.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "nnopt/muon_checks.h"
#include "nnopt/muon_math.h"
#include "nnopt/optim_checks.h"

namespace nnopt {
namespace {

using at::Tensor;
using at::TensorList;
using namespace nnopt::optim;

template <typename P>
using compute_t = std::conditional_t<std::is_same<P, double>::value, double, float>;

struct MomentumMeta {
  const void* grad;
  void* buf;
  void* update;
  const uint8_t* mask;
  int64_t numel;
};

struct UpdateMeta {
  void* param;
  const void* update;
  float* master;
  const uint8_t* mask;
  double ratio;
  int64_t numel;
};

// One-element float or double device tensor; `fallback` when absent.
struct DevScalar {
  const void* ptr = nullptr;
  bool is_double = false;
  __device__ double get(double fallback) const {
    if (ptr == nullptr) return fallback;
    return is_double ? *static_cast<const double*>(ptr) : double(*static_cast<const float*>(ptr));
  }
};

DevScalar dev_scalar(const std::optional<Tensor>& t, Tensor& keep) {
  DevScalar s;
  if (!t.has_value()) return s;
  keep = (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble) ? *t : t->to(at::kFloat);
  s.ptr = keep.data_ptr();
  s.is_double = keep.scalar_type() == at::kDouble;
  return s;
}

const float* found_inf_ptr(const std::optional<Tensor>& found_inf, Tensor& keep) {
  if (!found_inf.has_value()) return nullptr;
  keep = found_inf->scalar_type() == at::kFloat ? *found_inf : found_inf->to(at::kFloat);
  return static_cast<const float*>(keep.data_ptr());
}

template <typename G, typename B, typename U>
struct MomentumFunctor {
  DevScalar grad_scale;
  double momentum;
  bool nesterov;
  __device__ void operator()(const MomentumMeta& t, int64_t start, int64_t n) const {
    using C = compute_t<G>;
    const C scale = C(grad_scale.get(1.0)), w = C(1 - momentum), mom = C(momentum);
    const G* g = static_cast<const G*>(t.grad) + start;
    B* buf = static_cast<B*>(t.buf) + start;
    U* u = static_cast<U*>(t.update) + start;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      C b = C(buf[i]);
      const C out = muon_momentum_elem(C(g[i]), b, t.mask == nullptr || t.mask[start + i] != 0, scale, w, mom,
                                       nesterov);
      buf[i] = B(b);
      u[i] = U(out);
    }
  }
};

template <typename P, typename U>
struct UpdateFunctor {
  DevScalar lr_t;
  double lr, weight_decay, l1;
  __device__ void operator()(const UpdateMeta& t, int64_t start, int64_t n) const {
    using C = compute_t<P>;
    const double lr_v = lr_t.get(lr);
    const C decay = C(1 - lr_v * weight_decay), alpha = C(-(lr_v * t.ratio)), thr = l1 > 0 ? C(lr_v * l1) : C(0);
    P* p = static_cast<P*>(t.param) + start;
    const U* u = static_cast<const U*>(t.update) + start;
    float* w = t.master == nullptr ? nullptr : t.master + start;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const C x = muon_update_elem(w != nullptr ? C(w[i]) : C(p[i]), C(u[i]),
                                   t.mask == nullptr || t.mask[start + i] != 0, decay, alpha, thr);
      if (w != nullptr) w[i] = float(x);
      p[i] = P(x);
    }
  }
};

template <typename Fn>
void by_dtype(at::ScalarType dt, const Fn& fn) {
  switch (dt) {
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kFloat: fn(float{}); break;
    default: TORCH_CHECK(false, "nnopt: unsupported dtype ", dt);
  }
}

void muon_momentum_cuda(TensorList grads, TensorList bufs, TensorList updates, TensorList masks, double momentum,
                        bool nesterov, const std::optional<Tensor>& grad_scale,
                        const std::optional<Tensor>& found_inf) {
  if (!check_muon_momentum("muon_momentum_", grads, bufs, updates, masks, grad_scale, found_inf)) return;
  const size_t n = grads.size();
  const at::Device device = grads[0].device();
  std::vector<MomentumMeta> metas(n);
  for (size_t i = 0; i < n; ++i) {
    metas[i] = {grads[i].data_ptr(), bufs[i].data_ptr(), updates[i].data_ptr(),
                masks.empty() ? nullptr : static_cast<const uint8_t*>(masks[i].data_ptr()), grads[i].numel()};
  }
  c10::cuda::CUDAGuard guard(device);
  Tensor scale_keep, inf_keep;
  const DevScalar scale = dev_scalar(grad_scale, scale_keep);
  const float* inf = found_inf_ptr(found_inf, inf_keep);
  by_dtype(grads[0].scalar_type(), [&](auto g) {
    by_dtype(bufs[0].scalar_type(), [&](auto b) {
      by_dtype(updates[0].scalar_type(), [&](auto u) {
        MomentumFunctor<decltype(g), decltype(b), decltype(u)> f{scale, momentum, nesterov};
        cuda::multi_tensor_apply(metas, device, inf, f);
      });
    });
  });
}

void muon_update_cuda(TensorList params, TensorList updates, TensorList masters, TensorList masks, double lr,
                      double weight_decay, at::ArrayRef<double> lr_ratios, double l1,
                      const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& found_inf) {
  if (!check_muon_update("muon_update_", params, updates, masters, masks, lr_ratios, lr_tensor, found_inf)) return;
  const size_t n = params.size();
  const at::Device device = params[0].device();
  const at::ScalarType dt = params[0].scalar_type();
  std::vector<UpdateMeta> metas(n);
  for (size_t i = 0; i < n; ++i) {
    metas[i] = {params[i].data_ptr(), updates[i].data_ptr(),
                masters.empty() ? nullptr : static_cast<float*>(masters[i].data_ptr()),
                masks.empty() ? nullptr : static_cast<const uint8_t*>(masks[i].data_ptr()), lr_ratios[i],
                params[i].numel()};
  }
  c10::cuda::CUDAGuard guard(device);
  Tensor lr_keep, inf_keep;
  const DevScalar lr_t = dev_scalar(lr_tensor, lr_keep);
  const float* inf = found_inf_ptr(found_inf, inf_keep);
  by_dtype(dt, [&](auto p) {
    by_dtype(updates[0].scalar_type(), [&](auto u) {
      UpdateFunctor<decltype(p), decltype(u)> f{lr_t, lr, weight_decay, l1};
      cuda::multi_tensor_apply(metas, device, inf, f);
    });
  });
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CUDA, m) {
  m.impl("muon_momentum_", &nnopt::muon_momentum_cuda);
  m.impl("muon_update_", &nnopt::muon_update_cuda);
}
