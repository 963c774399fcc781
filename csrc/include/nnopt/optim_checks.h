// Input validation of the fused optimizer steps, shared by the CPU and CUDA implementations (host code only).
// Every message names the op and the argument: "nnopt::adam_step_: exp_avgs[3] has dtype ...".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

namespace nnopt {
namespace optim {

// One optional-or-required state list of an op (exp_avgs, momentum_buffers, ...).
struct StateList {
  const char* name;
  at::TensorList list;
  bool used;  // the flags need it: must hold one tensor per param; else ignored (empty or full length)
};

// Raw pointers of parameter i and its companions. Unused optional entries are null.
struct TensorPtrs {
  void* param;
  const void* grad;
  float* master;
  const uint8_t* mask;
  void* s[3];  // the op's state lists, in the order given; null when the flags do not use the list
  int64_t numel;
  at::ScalarType dtype;
};

inline void check_length(const char* op, const char* name, at::TensorList list, size_t n, bool required) {
  if (required) {
    TORCH_CHECK(list.size() == n, "nnopt::", op, ": ", name, " must hold one tensor per param (", n, "), got ",
                list.size());
  } else {
    TORCH_CHECK(list.empty() || list.size() == n, "nnopt::", op, ": ", name,
                " must be empty or hold one tensor per param (", n, "), got ", list.size());
  }
}

inline void check_tensor(const char* op, const char* list, size_t i, const at::Tensor& t, at::Device device,
                         at::ScalarType dtype, const char* dtype_rule, int64_t numel) {
  TORCH_CHECK(t.defined(), "nnopt::", op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, "nnopt::", op, ": ", list, "[", i, "] is on ", t.device(), ", expected ",
              device, " (all tensors on the device of params[0])");
  TORCH_CHECK(t.scalar_type() == dtype, "nnopt::", op, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
              ", expected ", dtype, " (", dtype_rule, ")");
  TORCH_CHECK(t.numel() == numel, "nnopt::", op, ": ", list, "[", i, "] has ", t.numel(), " elements, expected ",
              numel, " (as params[", i, "])");
  TORCH_CHECK(t.is_contiguous(), "nnopt::", op, ": ", list, "[", i, "] must be contiguous");
}

// A one-element tensor argument (lr_tensor, grad_scale, found_inf) on the params' device.
inline void check_scalar_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                at::Device device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->defined(), "nnopt::", op, ": ", name, " is undefined");
  TORCH_CHECK(t->numel() == 1, "nnopt::", op, ": ", name, " must have exactly one element, got ", t->numel());
  TORCH_CHECK(t->device() == device, "nnopt::", op, ": ", name, " is on ", t->device(), ", expected ", device,
              " (the device of params[0])");
}

// Checks every list against the conventions of csrc/ops.cpp and returns the per-parameter pointers.
// device_type is the backend that was dispatched to (CPU or CUDA).
inline std::vector<TensorPtrs> check_inputs(const char* op, at::DeviceType device_type, at::TensorList params,
                                            at::TensorList grads, at::TensorList masters, at::TensorList masks,
                                            std::initializer_list<StateList> states) {
  const size_t n = params.size();
  check_length(op, "grads", grads, n, true);
  check_length(op, "masters", masters, n, false);
  check_length(op, "masks", masks, n, false);
  TORCH_CHECK(states.size() <= 3, "nnopt::", op, ": internal error: more than 3 state lists");
  for (const StateList& s : states) check_length(op, s.name, s.list, n, s.used);
  std::vector<TensorPtrs> out(n);
  if (n == 0) return out;
  TORCH_CHECK(params[0].defined(), "nnopt::", op, ": params[0] is undefined");
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, "nnopt::", op, ": params[0] is on ", device, ", expected a ",
              at::DeviceTypeName(device_type), " tensor");
  const bool has_master = !masters.empty();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), "nnopt::", op, ": params[", i, "] is undefined");
    const at::ScalarType dt = p.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, "nnopt::", op,
                ": params[", i, "] has dtype ", dt, ", expected float32, float64, bfloat16 or float16");
    const int64_t numel = p.numel();
    check_tensor(op, "params", i, p, device, dt, "a floating dtype", numel);
    check_tensor(op, "grads", i, grads[i], device, dt, "the dtype of params[i]", numel);
    TensorPtrs& t = out[i];
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.numel = numel;
    t.dtype = dt;
    t.master = nullptr;
    if (has_master) {
      check_tensor(op, "masters", i, masters[i], device, at::kFloat, "masters are float32", numel);
      t.master = static_cast<float*>(masters[i].data_ptr());
    }
    t.mask = nullptr;
    if (!masks.empty()) {
      check_tensor(op, "masks", i, masks[i], device, at::kBool, "masks are bool", numel);
      t.mask = static_cast<const uint8_t*>(masks[i].data_ptr());
    }
    const at::ScalarType sdt = has_master ? at::kFloat : dt;
    const char* srule = has_master ? "states are float32 when masters are given" : "states share the params' dtype";
    int k = 0;
    for (const StateList& s : states) {
      t.s[k] = nullptr;
      if (s.used) {
        check_tensor(op, s.name, i, s.list[i], device, sdt, srule, numel);
        t.s[k] = s.list[i].data_ptr();
      }
      ++k;
    }
    for (; k < 3; ++k) t.s[k] = nullptr;
  }
  return out;
}

}  // namespace optim
}  // namespace nnopt
