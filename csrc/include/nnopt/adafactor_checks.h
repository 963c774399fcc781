// Input validation of nnopt::adafactor_step_ and each parameter's geometry, shared by the CPU and CUDA kernels
// (host code only). Messages name the op and the argument, as optim_checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "nnopt/optim_checks.h"

namespace nnopt {
namespace optim {

// One parameter: pointers, and its geometry (numel / (R*C) matrices of R x C when factored; else numel elements
// with its full variance in `row`).
struct AfTensor {
  void* param;
  const void* grad;
  float* master;
  const uint8_t* mask;
  void* row;  // row_var (numel / C entries), or the variance (numel) of a vector parameter
  void* col;  // col_var (numel / R entries); null for a vector parameter
  int64_t numel, R, C;
  bool factored;
};

inline std::vector<AfTensor> check_adafactor(const char* op, at::DeviceType device_type, at::TensorList params,
                                             at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
                                             at::TensorList masters, at::TensorList masks) {
  auto ptrs = check_inputs(op, device_type, params, grads, masters, masks, {});
  check_length(op, "row_vars", row_vars, params.size(), true);
  check_length(op, "col_vars", col_vars, params.size(), true);
  const bool has_master = !masters.empty();
  std::vector<AfTensor> ts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::ScalarType dt = p.scalar_type();
    TORCH_CHECK(!has_master || dt == at::kBFloat16 || dt == at::kHalf, "nnopt::", op, ": params[", i,
                "] has dtype ", dt, "; masters are float32 copies of bfloat16/float16 params");
    const at::ScalarType sdt = has_master ? at::kFloat : dt;
    const char* rule = has_master ? "states are float32 when masters are given" : "states share the params' dtype";
    AfTensor& t = ts[i];
    t.factored = p.dim() >= 2;
    t.numel = p.numel();
    t.C = t.factored ? p.size(-1) : 1;
    t.R = t.factored ? p.size(-2) : 1;
    int64_t n_row = 1, n_col = 1;  // row_var: the shape without its last dim; col_var: without dim -2
    for (int64_t d = 0; d < p.dim(); ++d) {
      if (d != p.dim() - 1) n_row *= p.size(d);
      if (d != p.dim() - 2) n_col *= p.size(d);
    }
    check_tensor(op, "row_vars", i, row_vars[i], p.device(), sdt, rule, t.factored ? n_row : t.numel);
    check_tensor(op, "col_vars", i, col_vars[i], p.device(), sdt, rule, t.factored ? n_col : 0);
    t.param = ptrs[i].param;
    t.grad = ptrs[i].grad;
    t.master = ptrs[i].master;
    t.mask = ptrs[i].mask;
    t.row = row_vars[i].data_ptr();
    t.col = t.factored ? col_vars[i].data_ptr() : nullptr;
  }
  return ts;
}

}  // namespace optim
}  // namespace nnopt
