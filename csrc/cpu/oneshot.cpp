// CPU kernel of SparseGPT's column-block update (nnopt::sparsegpt_block_), the hot loop of one-shot pruning.
//
// Semantics (oracle and `torch` backend: nnopt/reference/oneshot.py, sparsegpt_block_; driver:
// nnopt/prune/sparsegpt.py): for one block of `count` columns, w [rows, count] holds the weights as updated so
// far, u [count, count] the block's rows of the upper Cholesky factor of H^-1, pruned [rows, count] (bool) the
// entries to prune. Column by column, i = 0..count-1, in every row:
//     (N:M, m > 0, at i % m == 0: the m - n lowest of w_j^2 / u_jj^2 over the group's columns, already pruned
//      entries counting as -1, are marked pruned; ties: the lower column first)
//     q = pruned_i ? 0 : w_i;   e_i = (w_i - q) / u_ii;   w_j -= e_i * u_ij for j > i;   w_i = q
// On return w holds the pruned block, err [rows, count] the errors e, pruned the final mask.
//
// Rows are independent, so one at::parallel_for splits them; each row's `count` weights stay in L1 and u in L2
// for the whole block, where the torch loop streams the [rows, count] block through memory once per column.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace nnopt {
namespace {

using at::Tensor;

template <typename T>
void block_rows(T* w, const T* u, bool* pruned, T* err, int64_t rows, int64_t count, int64_t n, int64_t m) {
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    std::vector<T> tmp(std::max<int64_t>(m, 1));
    std::vector<char> picked(std::max<int64_t>(m, 1));
    for (int64_t r = r0; r < r1; ++r) {
      T* wr = w + r * count;
      bool* pr = pruned + r * count;
      T* er = err + r * count;
      for (int64_t i = 0; i < count; ++i) {
        if (m > 0 && i % m == 0) {
          const int64_t g = std::min(m, count - i);
          for (int64_t j = 0; j < g; ++j) {
            const T d = u[(i + j) * count + i + j];
            tmp[j] = pr[i + j] ? T(-1) : (wr[i + j] * wr[i + j]) / (d * d);
            picked[j] = 0;
          }
          for (int64_t k = 0; k < std::min(m - n, g); ++k) {
            int64_t best = -1;
            for (int64_t j = 0; j < g; ++j) {
              if (!picked[j] && (best < 0 || tmp[j] < tmp[best])) best = j;
            }
            picked[best] = 1;
            pr[i + best] = true;
          }
        }
        const T wi = wr[i];
        const T q = pr[i] ? T(0) : wi;
        const T e = (wi - q) / u[i * count + i];
        er[i] = e;
        wr[i] = q;
        if (e != T(0)) {
          const T* ui = u + i * count;
#pragma omp simd
          for (int64_t j = i + 1; j < count; ++j) wr[j] -= e * ui[j];
        }
      }
    }
  });
}

void sparsegpt_block_cpu(Tensor& w, const Tensor& u, Tensor& pruned, Tensor& err, int64_t n, int64_t m) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble),
              "sparsegpt_block_: w must be a contiguous 2-D float32/float64 CPU tensor, got ", w.sizes(), " ",
              w.scalar_type());
  const int64_t rows = w.size(0), count = w.size(1);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == count && u.size(1) == count && u.is_contiguous() &&
                  u.scalar_type() == w.scalar_type() && u.device().is_cpu(),
              "sparsegpt_block_: u must be a contiguous [", count, ", ", count, "] CPU tensor of w's dtype, got ",
              u.sizes(), " ", u.scalar_type());
  TORCH_CHECK(pruned.sizes() == w.sizes() && pruned.is_contiguous() && pruned.scalar_type() == at::kBool &&
                  pruned.device().is_cpu(),
              "sparsegpt_block_: pruned must be a contiguous bool CPU tensor of w's shape, got ", pruned.sizes(),
              " ", pruned.scalar_type());
  TORCH_CHECK(err.sizes() == w.sizes() && err.is_contiguous() && err.scalar_type() == w.scalar_type() &&
                  err.device().is_cpu(),
              "sparsegpt_block_: err must be a contiguous CPU tensor of w's shape and dtype, got ", err.sizes(),
              " ", err.scalar_type());
  TORCH_CHECK(m >= 0 && n >= 0 && n <= m, "sparsegpt_block_: need 0 <= n <= m (m = 0: no N:M), got n=", n,
              " m=", m);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sparsegpt_block_", [&] {
    block_rows<scalar_t>(w.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), pruned.data_ptr<bool>(),
                         err.data_ptr<scalar_t>(), rows, count, n, m);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nnopt, CPU, m) {
  m.impl("sparsegpt_block_", &sparsegpt_block_cpu);
}

}  // namespace nnopt
