// CPU kernel of nnopt::adafactor_step_ (torch.optim.Adafactor's math: csrc/include/nnopt/adafactor_math.h;
// conventions: csrc/ops.cpp; oracle: nnopt/reference/fused_optim.py).
//
// One call runs three parallel passes over work items of all tensors (whole rows of one matrix of a factored
// parameter, or a chunk of a vector one), with per-tensor reductions between them on the host:
//   1. statistics: each item's rows' sums of g² (its rows' row_var updated in place: an item owns whole rows),
//      its column partial sums of g² and its sum of p²;
//   then per tensor: column sums (partials added in item order) into col_var, the mean of row_var per matrix,
//      alpha from ||p||;
//   2. norms: each item's sum of u² (vector parameters update their variance here);
//   then per tensor: the update's coefficient -alpha / max(1, RMS(u)/d);
//   3. update: p = (p * (1 - lr*wd)) + coef * u, L1, mask.
// Partial sums are fixed per item, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "nnopt/adafactor_math.h"
#include "nnopt/adafactor_checks.h"

namespace nnopt {
namespace {

using at::Tensor;
using at::TensorList;
using namespace nnopt::optim;

constexpr int64_t kItem = 32768;  // elements per work item (at least one whole row)

template <typename P>
using compute_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

// Rows [r0, r0 + n) of one matrix (factored), or elements [r0, r0 + n) (vector); `cols` indexes the column buffer.
struct Item {
  int64_t tensor, r0, n, cols;
};

template <typename P, bool Master, bool Masked>
struct AfKernel {
  using C = compute_t<P>;
  using S = std::conditional_t<Master, float, P>;

  static C ld(const P* x, int64_t i) { return C(x[i]); }
  static C ld_s(const S* x, int64_t i) { return C(x[i]); }

  static C load_p(const AfTensor& t, int64_t i) {
    if constexpr (Master) return C(t.master[i]);
    return C(static_cast<const P*>(t.param)[i]);
  }

  static C load_g(const AfTensor& t, int64_t i, const AdafactorScalars<C>& h) {
    C g = prologue_grad(C(static_cast<const P*>(t.grad)[i]), h.grad_scale, h.neg);
    if constexpr (Masked) g = t.mask[i] ? g : C(0);
    return g;
  }

  static C keep_p(const AfTensor& t, int64_t i, C p) {
    if constexpr (Masked) return t.mask[i] ? p : C(0);
    return p;
  }

  // Pass 1. out[0] = sum p²; colp: C partial column sums of g² (factored).
  static void stats(const AfTensor& t, const Item& it, const AdafactorScalars<C>& h, double* out, double* colp) {
    double pn = 0;
    if (!t.factored) {
      for (int64_t i = it.r0; i < it.r0 + it.n; ++i) {
        const C p = keep_p(t, i, load_p(t, i));
        pn += double(p * p);
      }
      out[0] = pn;
      return;
    }
    S* row = static_cast<S*>(t.row);
    const int64_t Cn = t.C;
    std::fill(colp, colp + Cn, 0.0);
    for (int64_t r = it.r0; r < it.r0 + it.n; ++r) {
      const int64_t base = r * Cn;
      double rs = 0;
      for (int64_t c = 0; c < Cn; ++c) {
        const C g = load_g(t, base + c, h);
        const C p = keep_p(t, base + c, load_p(t, base + c));
        const C g2 = g * g;
        rs += double(g2);
        colp[c] += double(g2);
        pn += double(p * p);
      }
      row[r] = S(lerp(ld_s(row, r), adafactor_mean_sq<C>(rs, Cn), h.w));
    }
    out[0] = pn;
  }

  // Pass 2: sum u² over the item; vector parameters update their variance.
  static double norms(const AfTensor& t, const Item& it, const AdafactorScalars<C>& h, const C* rmean) {
    double un = 0;
    if (!t.factored) {
      S* v = static_cast<S*>(t.row);
      for (int64_t i = it.r0; i < it.r0 + it.n; ++i) {
        const C g = load_g(t, i, h);
        C var = lerp(ld_s(v, i), g * g, h.w);
        if constexpr (Masked) var = t.mask[i] ? var : C(0);
        v[i] = S(var);
        const C u = adafactor_update(var, g, h);
        un += double(u * u);
      }
      return un;
    }
    const S* row = static_cast<const S*>(t.row);
    const S* col = static_cast<const S*>(t.col);
    const int64_t Cn = t.C;
    for (int64_t r = it.r0; r < it.r0 + it.n; ++r) {
      const int64_t b = r / t.R;
      const C rv = ld_s(row, r), rm = rmean[b];
      const S* cb = col + b * Cn;
      for (int64_t c = 0; c < Cn; ++c) {
        const C u = adafactor_update((rv * ld_s(cb, c)) / rm, load_g(t, r * Cn + c, h), h);
        un += double(u * u);
      }
    }
    return un;
  }

  static void store(const AfTensor& t, int64_t i, C p) {
    if constexpr (Masked) p = t.mask[i] ? p : C(0);
    if constexpr (Master) t.master[i] = float(p);
    static_cast<P*>(t.param)[i] = P(p);
  }

  // Pass 3: the update.
  static void apply(const AfTensor& t, const Item& it, const AdafactorScalars<C>& h, const C* rmean, C coef) {
    if (!t.factored) {
      const S* v = static_cast<const S*>(t.row);
      for (int64_t i = it.r0; i < it.r0 + it.n; ++i) {
        const C u = adafactor_update(ld_s(v, i), load_g(t, i, h), h);
        store(t, i, adafactor_apply(load_p(t, i), u, coef, h));
      }
      return;
    }
    const S* row = static_cast<const S*>(t.row);
    const S* col = static_cast<const S*>(t.col);
    const int64_t Cn = t.C;
    for (int64_t r = it.r0; r < it.r0 + it.n; ++r) {
      const int64_t b = r / t.R;
      const C rv = ld_s(row, r), rm = rmean[b];
      const S* cb = col + b * Cn;
      for (int64_t c = 0; c < Cn; ++c) {
        const int64_t i = r * Cn + c;
        const C u = adafactor_update((rv * ld_s(cb, c)) / rm, load_g(t, i, h), h);
        store(t, i, adafactor_apply(load_p(t, i), u, coef, h));
      }
    }
  }

  // Between passes 1 and 2, per tensor: col_var from the column partials of its items, the row means, alpha.
  static void finish_stats(const AfTensor& t, const Item* items, int64_t n_items, const double* partial,
                           const double* colbuf, const AdafactorScalars<C>& h, C* rmean, double& alpha) {
    double pn = 0;
    for (int64_t k = 0; k < n_items; ++k) pn += partial[k];
    alpha = adafactor_alpha<C>(pn, t.numel, h);
    if (!t.factored) return;
    const int64_t B = t.numel / (t.R * t.C);
    S* row = static_cast<S*>(t.row);
    S* col = static_cast<S*>(t.col);
    std::vector<double> cs(t.C);
    int64_t k = 0;
    for (int64_t b = 0; b < B; ++b) {
      std::fill(cs.begin(), cs.end(), 0.0);
      for (; k < n_items && items[k].r0 < (b + 1) * t.R; ++k) {
        const double* cp = colbuf + items[k].cols;
        for (int64_t c = 0; c < t.C; ++c) cs[c] += cp[c];
      }
      for (int64_t c = 0; c < t.C; ++c) {
        col[b * t.C + c] = S(lerp(ld_s(col, b * t.C + c), adafactor_mean_sq<C>(cs[c], t.R), h.w));
      }
      double rsum = 0;
      for (int64_t r = 0; r < t.R; ++r) rsum += double(ld_s(row, b * t.R + r));
      const C mean = C(rsum) / C(t.R);
      rmean[b] = mean < h.eps1 ? h.eps1 : mean;
    }
  }
};

struct AfFns {
  void (*stats)(const AfTensor&, const Item&, const void*, double*, double*);
  double (*norms)(const AfTensor&, const Item&, const void*, const void*);
  void (*apply)(const AfTensor&, const Item&, const void*, const void*, double);
  void (*finish)(const AfTensor&, const Item*, int64_t, const double*, const double*, const void*, void*, double&);
};

template <typename P, bool Master, bool Masked>
AfFns af_fns() {
  using K = AfKernel<P, Master, Masked>;
  using C = typename K::C;
  using H = AdafactorScalars<C>;
  return {[](const AfTensor& t, const Item& it, const void* h, double* out, double* colp) {
            K::stats(t, it, *static_cast<const H*>(h), out, colp);
          },
          [](const AfTensor& t, const Item& it, const void* h, const void* rm) {
            return K::norms(t, it, *static_cast<const H*>(h), static_cast<const C*>(rm));
          },
          [](const AfTensor& t, const Item& it, const void* h, const void* rm, double coef) {
            K::apply(t, it, *static_cast<const H*>(h), static_cast<const C*>(rm), C(coef));
          },
          [](const AfTensor& t, const Item* items, int64_t n, const double* partial, const double* colbuf,
             const void* h, void* rm, double& alpha) {
            K::finish_stats(t, items, n, partial, colbuf, *static_cast<const H*>(h), static_cast<C*>(rm), alpha);
          }};
}

template <typename P>
AfFns af_select(bool master, bool masked) {
  if (master) return masked ? af_fns<P, true, true>() : af_fns<P, true, false>();
  return masked ? af_fns<P, false, true>() : af_fns<P, false, false>();
}

AfFns af_select_dtype(at::ScalarType dt, bool master, bool masked) {
  switch (dt) {
    case at::kDouble: return af_select<double>(false, masked);
    case at::kBFloat16: return af_select<c10::BFloat16>(master, masked);
    case at::kHalf: return af_select<c10::Half>(master, masked);
    default: return af_select<float>(false, masked);
  }
}

// Runs fn(k) for every item on all threads (threads pull items from a shared counter).
template <typename Fn>
void parallel_items(int64_t n_items, int64_t total, const Fn& fn) {
  const int64_t n_threads = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), n_items);
  if (n_threads <= 1 || total <= kItem) {
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

void adafactor_step_cpu(TensorList params, TensorList grads, TensorList row_vars, TensorList col_vars,
                        TensorList masters, TensorList masks, double lr, double beta2_decay, double eps1, double eps2,
                        double d, double weight_decay, bool maximize, double l1, double step_count,
                        const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                        const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step) {
  const char* op = "adafactor_step_";
  std::vector<AfTensor> ts = check_adafactor(op, at::kCPU, params, grads, row_vars, col_vars, masters, masks);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  check_scalar_tensor(op, "lr_tensor", lr_tensor, device);
  check_scalar_tensor(op, "grad_scale", grad_scale, device);
  check_scalar_tensor(op, "found_inf", found_inf, device);
  check_scalar_tensor(op, "step", step, device);
  const bool has_master = !masters.empty(), masked = !masks.empty();
  if (found_inf.has_value() && found_inf->item<double>() != 0) return;
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();
  AdafactorArgs a{lr, beta2_decay, eps1, eps2, d, weight_decay, l1,
                  grad_scale.has_value() ? grad_scale->item<double>() : 1.0,
                  step.has_value() ? step->item<double>() : step_count, maximize};
  const AdafactorScalars<float> hf = make_adafactor<float>(lr, a);
  const AdafactorScalars<double> hd = make_adafactor<double>(lr, a);

  const int64_t T = int64_t(ts.size());
  std::vector<Item> items;
  std::vector<int64_t> first(T + 1, 0), rm_off(T + 1, 0);
  std::vector<AfFns> fns(T);
  int64_t total = 0, cols = 0;
  for (int64_t i = 0; i < T; ++i) {
    const AfTensor& t = ts[i];
    first[i] = int64_t(items.size());
    fns[i] = af_select_dtype(params[i].scalar_type(), has_master, masked);
    total += t.numel;
    if (t.numel == 0) {
      rm_off[i + 1] = rm_off[i];
      continue;
    }
    if (t.factored) {
      const int64_t B = t.numel / (t.R * t.C), per = std::max<int64_t>(1, kItem / t.C);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t r = 0; r < t.R; r += per) {
          items.push_back({i, b * t.R + r, std::min(per, t.R - r), cols});
          cols += t.C;
        }
      }
      rm_off[i + 1] = rm_off[i] + B;
    } else {
      for (int64_t e = 0; e < t.numel; e += kItem) items.push_back({i, e, std::min(kItem, t.numel - e), 0});
      rm_off[i + 1] = rm_off[i];
    }
  }
  first[T] = int64_t(items.size());
  auto h_of = [&](int64_t i) -> const void* {
    return params[i].scalar_type() == at::kDouble ? static_cast<const void*>(&hd) : static_cast<const void*>(&hf);
  };
  const int64_t n_items = int64_t(items.size());
  std::vector<double> partial(n_items, 0.0), colbuf(cols, 0.0);
  // Row means in the compute type, B per factored tensor: one 8-byte slot per mean holds a double or a float
  // (a float tensor's B means use the first 4*B bytes of its slots).
  std::vector<double> rmean(rm_off[T] + 1, 0.0);
  auto rm_of = [&](int64_t i) { return static_cast<void*>(&rmean[rm_off[i]]); };
  std::vector<double> alpha(T, 0.0), coef(T, 0.0);

  parallel_items(n_items, total, [&](int64_t k) {
    const Item& it = items[k];
    fns[it.tensor].stats(ts[it.tensor], it, h_of(it.tensor), &partial[k], colbuf.data() + it.cols);
  });
  at::parallel_for(0, T, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (ts[i].numel == 0) continue;
      fns[i].finish(ts[i], &items[first[i]], first[i + 1] - first[i], &partial[first[i]], colbuf.data(), h_of(i),
                    rm_of(i), alpha[i]);
    }
  });
  parallel_items(n_items, total, [&](int64_t k) {
    const Item& it = items[k];
    partial[k] = fns[it.tensor].norms(ts[it.tensor], it, h_of(it.tensor), rm_of(it.tensor));
  });
  for (int64_t i = 0; i < T; ++i) {
    double un = 0;
    for (int64_t k = first[i]; k < first[i + 1]; ++k) un += partial[k];
    coef[i] = params[i].scalar_type() == at::kDouble ? double(adafactor_coef<double>(alpha[i], un, ts[i].numel, hd))
                                                     : double(adafactor_coef<float>(alpha[i], un, ts[i].numel, hf));
  }
  parallel_items(n_items, total, [&](int64_t k) {
    const Item& it = items[k];
    fns[it.tensor].apply(ts[it.tensor], it, h_of(it.tensor), rm_of(it.tensor), coef[it.tensor]);
  });
}

void adafactor_step_empty(TensorList params, TensorList, TensorList, TensorList, TensorList, TensorList, double,
                          double, double, double, double, double, bool, double, double, const std::optional<Tensor>&,
                          const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&) {
  TORCH_CHECK(params.empty(), "nnopt::adafactor_step_: no kernel for tensors on ", params[0].device());
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CPU, m) { m.impl("adafactor_step_", &nnopt::adafactor_step_cpu); }

TORCH_LIBRARY_IMPL(nnopt, CompositeExplicitAutograd, m) { m.impl("adafactor_step_", &nnopt::adafactor_step_empty); }
