// CUDA kernels of nnopt::adafactor_step_ (torch.optim.Adafactor's math: csrc/include/nnopt/adafactor_math.h;
// conventions: csrc/ops.cpp; oracle: nnopt/reference/fused_optim.py; the Triton twin: kernels/fused_adafactor.py).
//
// Every tensor of a call is cut into tiles of at most kTileRows rows of one matrix (factored parameters, all
// columns) or kTileElems elements (vector parameters); a call is six launches over all tensors, with no host
// synchronisation (lr_tensor, grad_scale, found_inf and the `step` count are read on the device):
//   1. stats    (per tile)   row sums of g² -> row_var (a tile owns whole rows; a thread owns a column, so the
//                            column partials need no reduction), sum of p²;
//   2. columns  (per matrix) column sums over its tiles, in tile order -> col_var; max(mean(row_var), eps1);
//   3. alpha    (per tensor) max(eps2, ||p||/sqrt(numel)) * rho from its tiles' partials, in tile order;
//   4. norms    (per tile)   sum of u² (vector parameters update their variance);
//   5. coef     (per tensor) -alpha / max(1, RMS(u)/d);
//   6. update   (per tile)   p = p*(1 - lr*wd) + coef*u, L1, mask.
// All reductions are fixed-order (deterministic). One param dtype per call (nnopt's optimizers bucket by dtype).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "nnopt/adafactor_checks.h"
#include "nnopt/adafactor_math.h"

namespace nnopt {
namespace {

using at::Tensor;
using at::TensorList;
using namespace nnopt::optim;

constexpr int kThreads = 256;
constexpr int64_t kTileRows = 8;
constexpr int64_t kTileElems = 8192;

template <typename P>
using compute_t = std::conditional_t<std::is_same<P, double>::value, double, float>;

struct Tile {
  int64_t tensor, r0, r1, col_off, mat;  // rows [r0, r1) (vector parameters: elements), column partials, matrix
};

struct Mat {
  int64_t tensor, b, k0, k1;  // matrix b of a tensor, its tiles [k0, k1)
};

// One-element device tensors (float or double), read in the kernels; null when absent.
struct DevScalar {
  const void* ptr = nullptr;
  bool is_double = false;
  __device__ double get(double fallback) const {
    if (ptr == nullptr) return fallback;
    return is_double ? *static_cast<const double*>(ptr) : double(*static_cast<const float*>(ptr));
  }
};

struct Params {
  AdafactorArgs args;
  DevScalar lr, grad_scale, step, found_inf;
  const AfTensor* tensors;
  const Tile* tiles;
  const Mat* mats;
  const int64_t* bounds;  // tensor t's tiles are [bounds[t], bounds[t+1])
  double *colpart, *ppart, *upart, *rmean, *alpha, *coef;
  bool masked;
};

template <typename C>
__device__ AdafactorScalars<C> scalars(const Params& q) {
  AdafactorArgs a = q.args;
  a.step = q.step.get(a.step);
  a.grad_scale = q.grad_scale.get(1.0);
  return make_adafactor<C>(q.lr.get(a.lr), a);
}

__device__ bool skip(const Params& q) { return q.found_inf.get(0.0) != 0; }

// The block's sum of one double per thread (the result in thread 0).
__device__ double block_sum(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  }
  return total;
}

template <typename P, bool Master>
struct Elem {
  using C = compute_t<P>;
  using S = std::conditional_t<Master, float, P>;
  __device__ static C p(const AfTensor& t, int64_t i) {
    if (Master) return C(t.master[i]);
    return C(static_cast<const P*>(t.param)[i]);
  }
  __device__ static bool keep(const AfTensor& t, int64_t i, bool masked) { return !masked || t.mask[i] != 0; }
  __device__ static C g(const AfTensor& t, int64_t i, bool masked, const AdafactorScalars<C>& h) {
    const C v = prologue_grad(C(static_cast<const P*>(t.grad)[i]), h.grad_scale, h.neg);
    return keep(t, i, masked) ? v : C(0);
  }
  __device__ static C s(const void* ptr, int64_t i) { return C(static_cast<const S*>(ptr)[i]); }
  __device__ static void set_s(void* ptr, int64_t i, C v) { static_cast<S*>(ptr)[i] = S(v); }
};

template <typename P, bool Master>
__global__ void stats_kernel(Params q) {
  using E = Elem<P, Master>;
  using C = typename E::C;
  __shared__ double shared[kThreads / 32];
  const Tile tile = q.tiles[blockIdx.x];
  const AfTensor t = q.tensors[tile.tensor];
  const auto h = scalars<C>(q);
  const bool ok = !skip(q);
  double pn = 0;
  if (!t.factored) {
    for (int64_t i = tile.r0 + threadIdx.x; i < tile.r1; i += kThreads) {
      const C p = E::keep(t, i, q.masked) ? E::p(t, i) : C(0);
      pn += double(p * p);
    }
  } else {
    double* colp = q.colpart + tile.col_off;
    for (int64_t c = threadIdx.x; c < t.C; c += kThreads) colp[c] = 0;
    for (int64_t r = tile.r0; r < tile.r1; ++r) {
      double rs = 0;
      for (int64_t c = threadIdx.x; c < t.C; c += kThreads) {
        const int64_t i = r * t.C + c;
        const C g = E::g(t, i, q.masked, h);
        const C p = E::keep(t, i, q.masked) ? E::p(t, i) : C(0);
        const double g2 = double(g * g);
        rs += g2;
        colp[c] += g2;  // column c belongs to this thread for the whole tile
        pn += double(p * p);
      }
      rs = block_sum(rs, shared);
      if (threadIdx.x == 0 && ok) E::set_s(t.row, r, lerp(E::s(t.row, r), adafactor_mean_sq<C>(rs, t.C), h.w));
    }
  }
  pn = block_sum(pn, shared);
  if (threadIdx.x == 0) q.ppart[blockIdx.x] = pn;
}

template <typename P, bool Master>
__global__ void columns_kernel(Params q) {
  using E = Elem<P, Master>;
  using C = typename E::C;
  __shared__ double shared[kThreads / 32];
  const Mat mat = q.mats[blockIdx.x];
  const AfTensor t = q.tensors[mat.tensor];
  const auto h = scalars<C>(q);
  const bool ok = !skip(q);
  for (int64_t c = threadIdx.x; c < t.C; c += kThreads) {
    double cs = 0;
    for (int64_t k = mat.k0; k < mat.k1; ++k) cs += q.colpart[q.tiles[k].col_off + c];
    const int64_t i = mat.b * t.C + c;
    if (ok) E::set_s(t.col, i, lerp(E::s(t.col, i), adafactor_mean_sq<C>(cs, t.R), h.w));
  }
  double rsum = 0;
  for (int64_t r = threadIdx.x; r < t.R; r += kThreads) rsum += double(E::s(t.row, mat.b * t.R + r));
  rsum = block_sum(rsum, shared);
  if (threadIdx.x == 0) {
    const C mean = C(rsum) / C(t.R);
    q.rmean[blockIdx.x] = double(mean < h.eps1 ? h.eps1 : mean);
  }
}

template <typename P, bool Master>
__global__ void tensor_scalars_kernel(Params q, int64_t n_tensors, bool second) {
  using C = compute_t<P>;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n_tensors) return;
  const auto h = scalars<C>(q);
  const double* part = second ? q.upart : q.ppart;
  double s = 0;
  for (int64_t k = q.bounds[i]; k < q.bounds[i + 1]; ++k) s += part[k];
  const int64_t numel = q.tensors[i].numel;
  if (!second) {
    q.alpha[i] = adafactor_alpha<C>(s, numel, h);
  } else {
    q.coef[i] = double(adafactor_coef<C>(q.alpha[i], s, numel, h));
  }
}

// u for element i of a vector parameter, whose variance is updated first when Store (the norms launch).
template <typename P, bool Master, bool Store>
__device__ typename Elem<P, Master>::C vector_update(const AfTensor& t, int64_t i, bool masked, bool ok,
                                                     const AdafactorScalars<typename Elem<P, Master>::C>& h) {
  using E = Elem<P, Master>;
  using C = typename E::C;
  const C g = E::g(t, i, masked, h);
  C var = E::s(t.row, i);
  if (Store) {
    var = lerp(var, g * g, h.w);
    if (!E::keep(t, i, masked)) var = C(0);
    if (ok) E::set_s(t.row, i, var);
  }
  return adafactor_update(var, g, h);
}

template <typename P, bool Master, bool Apply>
__global__ void update_kernel(Params q) {
  using E = Elem<P, Master>;
  using C = typename E::C;
  __shared__ double shared[kThreads / 32];
  const Tile tile = q.tiles[blockIdx.x];
  const AfTensor t = q.tensors[tile.tensor];
  const auto h = scalars<C>(q);
  const bool ok = !skip(q);
  const C coef = Apply ? C(q.coef[tile.tensor]) : C(0);
  double un = 0;
  auto one = [&](int64_t i, C u) {
    if (Apply) {
      C p = adafactor_apply(E::p(t, i), u, coef, h);
      if (!E::keep(t, i, q.masked)) p = C(0);
      if (ok) {
        if (Master) t.master[i] = float(p);
        static_cast<P*>(t.param)[i] = P(p);
      }
    } else {
      un += double(u * u);
    }
  };
  if (!t.factored) {
    for (int64_t i = tile.r0 + threadIdx.x; i < tile.r1; i += kThreads) {
      one(i, vector_update<P, Master, !Apply>(t, i, q.masked, ok, h));
    }
  } else {
    const C rm = C(q.rmean[tile.mat]);
    const int64_t b = tile.r0 / t.R;
    for (int64_t r = tile.r0; r < tile.r1; ++r) {
      const C rv = E::s(t.row, r);
      for (int64_t c = threadIdx.x; c < t.C; c += kThreads) {
        const int64_t i = r * t.C + c;
        const C g = E::g(t, i, q.masked, h);
        const C u = adafactor_update((rv * E::s(t.col, b * t.C + c)) / rm, g, h);
        one(i, u);
      }
    }
  }
  if (!Apply) {
    un = block_sum(un, shared);
    if (threadIdx.x == 0) q.upart[blockIdx.x] = un;
  }
}

template <typename T>
Tensor to_device_async(const std::vector<T>& v, at::Device device) {
  const int64_t bytes = int64_t(v.size() * sizeof(T));
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), v.data(), size_t(bytes));
  return host.to(device, /*non_blocking=*/true);
}

DevScalar dev_scalar(const std::optional<Tensor>& t, Tensor& keep) {
  DevScalar s;
  if (!t.has_value()) return s;
  keep = (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble) ? *t : t->to(at::kFloat);
  s.ptr = keep.data_ptr();
  s.is_double = keep.scalar_type() == at::kDouble;
  return s;
}

template <typename P, bool Master>
void launch_all(Params q, int64_t n_tiles, int64_t n_mats, int64_t n_tensors, cudaStream_t stream) {
  const int tensor_blocks = int((n_tensors + kThreads - 1) / kThreads);
  stats_kernel<P, Master><<<n_tiles, kThreads, 0, stream>>>(q);
  if (n_mats > 0) columns_kernel<P, Master><<<n_mats, kThreads, 0, stream>>>(q);
  tensor_scalars_kernel<P, Master><<<tensor_blocks, kThreads, 0, stream>>>(q, n_tensors, false);
  update_kernel<P, Master, false><<<n_tiles, kThreads, 0, stream>>>(q);
  tensor_scalars_kernel<P, Master><<<tensor_blocks, kThreads, 0, stream>>>(q, n_tensors, true);
  update_kernel<P, Master, true><<<n_tiles, kThreads, 0, stream>>>(q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adafactor_step_cuda(TensorList params, TensorList grads, TensorList row_vars, TensorList col_vars,
                         TensorList masters, TensorList masks, double lr, double beta2_decay, double eps1,
                         double eps2, double d, double weight_decay, bool maximize, double l1, double step_count,
                         const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                         const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step) {
  const char* op = "adafactor_step_";
  std::vector<AfTensor> ts = check_adafactor(op, at::kCUDA, params, grads, row_vars, col_vars, masters, masks);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const at::ScalarType dt = params[0].scalar_type();
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == dt, "nnopt::", op, ": params[", i, "] has dtype ",
                params[i].scalar_type(), ", params[0] ", dt, " (one dtype per call on CUDA)");
  }
  for (auto [name, t] : {std::pair{"lr_tensor", &lr_tensor}, std::pair{"grad_scale", &grad_scale},
                         std::pair{"found_inf", &found_inf}, std::pair{"step", &step}}) {
    check_scalar_tensor(op, name, *t, device);
  }
  c10::cuda::CUDAGuard guard(device);
  std::vector<Tile> tiles;
  std::vector<Mat> mats;
  std::vector<int64_t> bounds;
  int64_t cols = 0;
  for (int64_t i = 0; i < int64_t(ts.size()); ++i) {
    const AfTensor& t = ts[i];
    bounds.push_back(int64_t(tiles.size()));
    if (t.numel == 0) continue;
    if (t.factored) {
      for (int64_t b = 0; b < t.numel / (t.R * t.C); ++b) {
        const int64_t k0 = int64_t(tiles.size());
        for (int64_t r = 0; r < t.R; r += kTileRows) {
          tiles.push_back({i, b * t.R + r, b * t.R + std::min(r + kTileRows, t.R), cols, int64_t(mats.size())});
          cols += t.C;
        }
        mats.push_back({i, b, k0, int64_t(tiles.size())});
      }
    } else {
      for (int64_t e = 0; e < t.numel; e += kTileElems) {
        tiles.push_back({i, e, std::min(e + kTileElems, t.numel), 0, 0});
      }
    }
  }
  bounds.push_back(int64_t(tiles.size()));
  if (tiles.empty()) return;
  const int64_t n_tiles = int64_t(tiles.size()), n_mats = int64_t(mats.size()), T = int64_t(ts.size());
  Tensor d_tensors = to_device_async(ts, device), d_tiles = to_device_async(tiles, device);
  Tensor d_mats = to_device_async(mats.empty() ? std::vector<Mat>{Mat{}} : mats, device);
  Tensor d_bounds = to_device_async(bounds, device);
  // One float64 workspace: column partials, per-tile sums of p² and u², row means, alpha and coef per tensor.
  Tensor work = at::empty({cols + 2 * n_tiles + std::max<int64_t>(n_mats, 1) + 2 * T},
                          at::TensorOptions().dtype(at::kDouble).device(device));
  Tensor lr_keep, scale_keep, step_keep, inf_keep;
  Params q;
  q.args = AdafactorArgs{lr, beta2_decay, eps1, eps2, d, weight_decay, l1, 1.0, step_count, maximize};
  q.lr = dev_scalar(lr_tensor, lr_keep);
  q.grad_scale = dev_scalar(grad_scale, scale_keep);
  q.step = dev_scalar(step, step_keep);
  q.found_inf = dev_scalar(found_inf, inf_keep);
  q.tensors = static_cast<const AfTensor*>(d_tensors.data_ptr());
  q.tiles = static_cast<const Tile*>(d_tiles.data_ptr());
  q.mats = static_cast<const Mat*>(d_mats.data_ptr());
  q.bounds = static_cast<const int64_t*>(d_bounds.data_ptr());
  double* w = work.data_ptr<double>();
  q.colpart = w;
  q.ppart = q.colpart + cols;
  q.upart = q.ppart + n_tiles;
  q.rmean = q.upart + n_tiles;
  q.alpha = q.rmean + std::max<int64_t>(n_mats, 1);
  q.coef = q.alpha + T;
  q.masked = !masks.empty();
  const bool master = !masters.empty();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  switch (dt) {
    case at::kDouble: launch_all<double, false>(q, n_tiles, n_mats, T, stream); break;
    case at::kBFloat16:
      master ? launch_all<c10::BFloat16, true>(q, n_tiles, n_mats, T, stream)
             : launch_all<c10::BFloat16, false>(q, n_tiles, n_mats, T, stream);
      break;
    case at::kHalf:
      master ? launch_all<c10::Half, true>(q, n_tiles, n_mats, T, stream)
             : launch_all<c10::Half, false>(q, n_tiles, n_mats, T, stream);
      break;
    default: launch_all<float, false>(q, n_tiles, n_mats, T, stream); break;
  }
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CUDA, m) { m.impl("adafactor_step_", &nnopt::adafactor_step_cuda); }
