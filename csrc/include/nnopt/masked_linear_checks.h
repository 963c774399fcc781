// Input checks of the masked linear ops (csrc/cpu/masked_linear.cpp, csrc/cpu/masked_gemv.cpp), host code only.
// Every message names the op and the argument: "nnopt::masked_linear: mask must have shape [...]".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace nnopt {
namespace masked_linear_checks {

using at::Tensor;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }


inline bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_tensor(const char* op, const char* name, const Tensor& t, int64_t dim) {
  TORCH_CHECK(t.defined(), "nnopt::", op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "nnopt::", op, ": ", name, " is on ", t.device(),
              ", expected cpu (all tensors on one device)");
  TORCH_CHECK(t.dim() == dim, "nnopt::", op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "nnopt::", op, ": ", name, " must be contiguous");
}

inline void check_dtype(const char* op, const char* name, const Tensor& t, at::ScalarType expected, const char* rule) {
  TORCH_CHECK(t.scalar_type() == expected, "nnopt::", op, ": ", name, " must be ", rule, ", got ", t.scalar_type());
}

inline void check_floating(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(is_floating(t.scalar_type()), "nnopt::", op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_blocks(const char* op, int64_t block_n, int64_t block_k) {
  TORCH_CHECK(block_n > 0 && block_k > 0, "nnopt::", op, ": block_n and block_k must be positive, got ", block_n,
              " and ", block_k);
}

// A compressed index (ptr [nblocks + 1], idx [nnzb], values of idx strictly ascending within each run and below
// bound): what the kernels rely on to stay in bounds and write each tile once.
inline void check_compressed(const char* op, const char* ptr_name, const Tensor& ptr, const char* idx_name,
                      const Tensor& idx, int64_t nblocks, int64_t bound, const char* what) {
  check_tensor(op, ptr_name, ptr, 1);
  check_tensor(op, idx_name, idx, 1);
  check_dtype(op, ptr_name, ptr, at::kInt, "int32");
  check_dtype(op, idx_name, idx, at::kInt, "int32");
  TORCH_CHECK(ptr.numel() == nblocks + 1, "nnopt::", op, ": ", ptr_name, " must have ", nblocks + 1,
              " entries (one more than the number of ", what, " of the layout), got ", ptr.numel());
  const int32_t* p = ptr.data_ptr<int32_t>();
  const int32_t* q = idx.data_ptr<int32_t>();
  const int64_t nnzb = idx.numel();
  TORCH_CHECK(p[0] == 0 && p[nblocks] == nnzb, "nnopt::", op, ": ", ptr_name, " must run from 0 to ", nnzb,
              " (the length of ", idx_name, "), got ", p[0], " to ", p[nblocks]);
  for (int64_t b = 0; b < nblocks; ++b) {
    TORCH_CHECK(p[b] <= p[b + 1], "nnopt::", op, ": ", ptr_name, " must be non-decreasing (entry ", b + 1, ")");
    for (int64_t e = p[b]; e < p[b + 1]; ++e) {
      TORCH_CHECK(q[e] >= 0 && q[e] < bound, "nnopt::", op, ": ", idx_name, "[", e, "] = ", q[e],
                  " is out of range [0, ", bound, ")");
      TORCH_CHECK(e == p[b] || q[e] > q[e - 1], "nnopt::", op, ": ", idx_name,
                  " must be strictly ascending within each of the ", what, " (entry ", e, ")");
    }
  }
}

inline void check_full(const char* op, const Tensor& full, int64_t nnzb) {
  check_tensor(op, "full", full, 1);
  check_dtype(op, "full", full, at::kBool, "bool");
  TORCH_CHECK(full.numel() == nnzb, "nnopt::", op, ": full must have one entry per listed tile (", nnzb, "), got ",
              full.numel());
}

inline void check_mask(const char* op, const Tensor& mask, int64_t N, int64_t K, const char* like) {
  check_tensor(op, "mask", mask, 2);
  check_dtype(op, "mask", mask, at::kBool, "bool");
  TORCH_CHECK(mask.size(0) == N && mask.size(1) == K, "nnopt::", op, ": mask must have shape [", N, ", ", K,
              "] (", like, "), got ", mask.sizes());
}

// The compute-type copy of an activation (x or dy): itself for float32/float64, else converted to float32.
inline Tensor compute_copy(const Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
}

inline Tensor to_dtype(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

}  // namespace masked_linear_checks
}  // namespace nnopt
