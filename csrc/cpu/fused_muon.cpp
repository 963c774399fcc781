// CPU kernels of nnopt::muon_momentum_ and nnopt::muon_update_ (math: csrc/include/nnopt/muon_math.h; conventions:
// csrc/ops.cpp; oracle: nnopt/reference/fused_optim.py). Each call is one parallel pass over (tensor, chunk) items
// of all tensors; the one-element tensors are read once on the host (they are CPU tensors here).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "nnopt/muon_checks.h"
#include "nnopt/muon_math.h"
#include "nnopt/optim_checks.h"

namespace nnopt {
namespace {

using at::Tensor;
using at::TensorList;
using namespace nnopt::optim;

constexpr int64_t kChunk = 32768;

template <typename P>
using compute_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

struct Item {
  int64_t tensor, begin, n;
};

std::vector<Item> make_items(TensorList ts, int64_t& total) {
  std::vector<Item> items;
  total = 0;
  for (int64_t i = 0; i < int64_t(ts.size()); ++i) {
    const int64_t n = ts[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({i, b, std::min(kChunk, n - b)});
    total += n;
  }
  return items;
}

template <typename Fn>
void for_items(const std::vector<Item>& items, int64_t total, const Fn& fn) {
  at::parallel_for(0, int64_t(items.size()), total <= kChunk ? int64_t(items.size()) : 1,
                   [&](int64_t lo, int64_t hi) {
                     for (int64_t k = lo; k < hi; ++k) fn(items[k]);
                   });
}

// Calls fn(P{}) for a floating dtype.
template <typename Fn>
void by_dtype(at::ScalarType dt, const Fn& fn) {
  switch (dt) {
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: fn(float{}); break;
  }
}

bool skipped(const std::optional<Tensor>& found_inf) {  // found_inf already checked (muon_checks.h)
  return found_inf.has_value() && found_inf->item<double>() != 0;
}

void muon_momentum_cpu(TensorList grads, TensorList bufs, TensorList updates, TensorList masks, double momentum,
                       bool nesterov, const std::optional<Tensor>& grad_scale,
                       const std::optional<Tensor>& found_inf) {
  if (!check_muon_momentum("muon_momentum_", grads, bufs, updates, masks, grad_scale, found_inf)) return;
  if (skipped(found_inf)) return;
  const double scale = grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
  int64_t total;
  const std::vector<Item> items = make_items(grads, total);
  const bool masked = !masks.empty();
  by_dtype(grads[0].scalar_type(), [&](auto gtag) {
    using G = decltype(gtag);
    using C = compute_t<G>;
    by_dtype(bufs[0].scalar_type(), [&](auto btag) {
      using B = decltype(btag);
      by_dtype(updates[0].scalar_type(), [&](auto utag) {
        using U = decltype(utag);
        const C sc = C(scale), w = C(1 - momentum), mom = C(momentum);
        for_items(items, total, [&](const Item& it) {
          const G* g = grads[it.tensor].const_data_ptr<G>() + it.begin;
          B* buf = bufs[it.tensor].data_ptr<B>() + it.begin;
          U* u = updates[it.tensor].data_ptr<U>() + it.begin;
          const bool* k = masked ? masks[it.tensor].const_data_ptr<bool>() + it.begin : nullptr;
          for (int64_t i = 0; i < it.n; ++i) {
            C b = C(buf[i]);
            const C out = muon_momentum_elem(C(g[i]), b, masked ? k[i] : true, sc, w, mom, nesterov);
            buf[i] = B(b);
            u[i] = U(out);
          }
        });
      });
    });
  });
}

void muon_update_cpu(TensorList params, TensorList updates, TensorList masters, TensorList masks, double lr,
                     double weight_decay, at::ArrayRef<double> lr_ratios, double l1,
                     const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& found_inf) {
  if (!check_muon_update("muon_update_", params, updates, masters, masks, lr_ratios, lr_tensor, found_inf)) return;
  if (skipped(found_inf)) return;
  const at::ScalarType dt = params[0].scalar_type();
  const bool has_master = !masters.empty(), masked = !masks.empty();
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();
  int64_t total;
  const std::vector<Item> items = make_items(params, total);
  by_dtype(dt, [&](auto ptag) {
    using P = decltype(ptag);
    using C = compute_t<P>;
    by_dtype(updates[0].scalar_type(), [&](auto utag) {
      using U = decltype(utag);
      const C decay = C(1 - lr * weight_decay), l1_thr = l1 > 0 ? C(lr * l1) : C(0);
      for_items(items, total, [&](const Item& it) {
        P* p = params[it.tensor].data_ptr<P>() + it.begin;
        const U* u = updates[it.tensor].const_data_ptr<U>() + it.begin;
        float* w = has_master ? masters[it.tensor].data_ptr<float>() + it.begin : nullptr;
        const bool* k = masked ? masks[it.tensor].const_data_ptr<bool>() + it.begin : nullptr;
        const C alpha = C(-(lr * lr_ratios[it.tensor]));
        for (int64_t i = 0; i < it.n; ++i) {
          const C x = muon_update_elem(has_master ? C(w[i]) : C(p[i]), C(u[i]), masked ? k[i] : true, decay, alpha,
                                       l1_thr);
          if (has_master) w[i] = float(x);
          p[i] = P(x);
        }
      });
    });
  });
}

void muon_momentum_empty(TensorList grads, TensorList, TensorList, TensorList, double, bool,
                         const std::optional<Tensor>&, const std::optional<Tensor>&) {
  TORCH_CHECK(grads.empty(), "nnopt::muon_momentum_: no kernel for tensors on ", grads[0].device());
}

void muon_update_empty(TensorList params, TensorList, TensorList, TensorList, double, double, at::ArrayRef<double>,
                       double, const std::optional<Tensor>&, const std::optional<Tensor>&) {
  TORCH_CHECK(params.empty(), "nnopt::muon_update_: no kernel for tensors on ", params[0].device());
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CPU, m) {
  m.impl("muon_momentum_", &nnopt::muon_momentum_cpu);
  m.impl("muon_update_", &nnopt::muon_update_cpu);
}

TORCH_LIBRARY_IMPL(nnopt, CompositeExplicitAutograd, m) {
  m.impl("muon_momentum_", &nnopt::muon_momentum_empty);
  m.impl("muon_update_", &nnopt::muon_update_empty);
}
