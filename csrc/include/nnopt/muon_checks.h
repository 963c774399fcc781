// Input validation of nnopt::muon_momentum_ and nnopt::muon_update_, shared by the CPU and CUDA kernels (host code
// only). Messages name the op and the argument, as optim_checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "nnopt/optim_checks.h"

namespace nnopt {
namespace optim {

// t[i] of a list: defined, floating, on `device`, `numel` elements, contiguous, and of list[0]'s dtype.
inline void check_muon_floating(const char* op, const char* name, at::TensorList list, size_t i, at::Device device,
                                int64_t numel) {
  const at::Tensor& t = list[i];
  TORCH_CHECK(t.defined(), "nnopt::", op, ": ", name, "[", i, "] is undefined");
  const at::ScalarType dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, "nnopt::", op, ": ",
              name, "[", i, "] has dtype ", dt, ", expected float32, float64, bfloat16 or float16");
  TORCH_CHECK(dt == list[0].scalar_type(), "nnopt::", op, ": ", name, "[", i, "] has dtype ", dt, ", ", name,
              "[0] ", list[0].scalar_type());
  TORCH_CHECK(t.device() == device, "nnopt::", op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.numel() == numel, "nnopt::", op, ": ", name, "[", i, "] has ", t.numel(), " elements, expected ",
              numel);
  TORCH_CHECK(t.is_contiguous(), "nnopt::", op, ": ", name, "[", i, "] must be contiguous");
}

// muon_momentum_'s lists and scalars; false when there is nothing to do.
inline bool check_muon_momentum(const char* op, at::TensorList grads, at::TensorList bufs, at::TensorList updates,
                                at::TensorList masks, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf) {
  const size_t n = grads.size();
  check_length(op, "momentum_buffers", bufs, n, true);
  check_length(op, "updates", updates, n, true);
  check_length(op, "masks", masks, n, false);
  if (n == 0) return false;
  const at::Device device = grads[0].device();
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = grads[i].numel();
    check_muon_floating(op, "grads", grads, i, device, numel);
    check_muon_floating(op, "momentum_buffers", bufs, i, device, numel);
    check_muon_floating(op, "updates", updates, i, device, numel);
    if (!masks.empty()) check_tensor(op, "masks", i, masks[i], device, at::kBool, "masks are bool", numel);
  }
  check_scalar_tensor(op, "grad_scale", grad_scale, device);
  check_scalar_tensor(op, "found_inf", found_inf, device);
  return true;
}

// muon_update_'s lists and scalars; false when there is nothing to do.
inline bool check_muon_update(const char* op, at::TensorList params, at::TensorList updates, at::TensorList masters,
                              at::TensorList masks, at::ArrayRef<double> lr_ratios,
                              const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  check_length(op, "updates", updates, n, true);
  check_length(op, "masters", masters, n, false);
  check_length(op, "masks", masks, n, false);
  TORCH_CHECK(lr_ratios.size() == n, "nnopt::", op, ": lr_ratios must hold one value per param (", n, "), got ",
              lr_ratios.size());
  if (n == 0) return false;
  const at::Device device = params[0].device();
  const at::ScalarType dt = params[0].scalar_type();
  TORCH_CHECK(masters.empty() || dt == at::kBFloat16 || dt == at::kHalf, "nnopt::", op,
              ": masters are float32 copies of bfloat16/float16 params, but params are ", dt);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_muon_floating(op, "params", params, i, device, numel);
    check_muon_floating(op, "updates", updates, i, device, numel);
    if (!masters.empty()) check_tensor(op, "masters", i, masters[i], device, at::kFloat, "masters are float32", numel);
    if (!masks.empty()) check_tensor(op, "masks", i, masks[i], device, at::kBool, "masks are bool", numel);
  }
  check_scalar_tensor(op, "lr_tensor", lr_tensor, device);
  check_scalar_tensor(op, "found_inf", found_inf, device);
  return true;
}

}  // namespace optim
}  // namespace nnopt
