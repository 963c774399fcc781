// CUDA kernel of the optimizer steps with low-precision states (nnopt::quant_step_): 32/16/8/4-bit states.
//
// Formats, quantizer and oracle: nnopt/reference/quant_optim.py; per-element update: optim_math.h (shared with the
// CPU and the fp32-state kernels); launcher: multi_tensor_apply.cuh (64K-element chunks, a multiple of every
// block size). Each warp owns whole quantization blocks of a chunk; a lane owns element pairs (2j, 2j+1), so a
// 4-bit byte is written by one lane. A block is visited twice: the first pass runs the update to find each state's
// new absmax (a warp max on the bit patterns, NaN winning as on the CPU), the second recomputes the same update from
// the same inputs (nothing is written before it; the block is L1/L2-resident) and stores the parameter, the codes
// and the scales. No float32 copy of a state exists anywhere. The maps and midpoints sit in shared memory; the
// nearest code is the branch-free binary search of the CPU kernel (code = #{mids < x}).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "nnopt/optim_checks.h"
#include "nnopt/optim_math.h"

namespace nnopt {
namespace {

using at::Tensor;
using at::TensorList;
using namespace nnopt::optim;

constexpr int kOpSgd = 0, kOpAdam = 1, kOpAdagrad = 2, kOpRmsprop = 3;

struct QMeta {
  void* param;
  const void* grad;
  float* master;
  const uint8_t* mask;
  void* s[3];
  void* sc[3];
  int64_t numel;
  uint32_t key;
};

struct DeviceScalar {
  const float* ptr = nullptr;
  __device__ double get(double fallback) const { return ptr == nullptr ? fallback : double(*ptr); }
};

__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

__device__ __forceinline__ float bf16_to_float(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }
__device__ __forceinline__ uint16_t float_to_bf16_rne(float f) {
  const uint32_t u = __float_as_uint(f);
  return f != f ? uint16_t(0x7fc0) : uint16_t((u + (((u >> 16) & 1u) + 0x7fffu)) >> 16);
}

template <typename P>
__device__ __forceinline__ float to_f(P v) {
  return static_cast<float>(v);
}
template <typename P>
__device__ __forceinline__ P from_f(float v) {
  return static_cast<P>(v);
}
template <>
__device__ __forceinline__ c10::BFloat16 from_f<c10::BFloat16>(float v) {
  return c10::BFloat16(float_to_bf16_rne(v), c10::BFloat16::from_bits());
}

// One state element as float.
__device__ __forceinline__ float load_state(int bits, const void* s, const void* sc, const float* q, int64_t e,
                                            int64_t blk) {
  if (bits == 32) return static_cast<const float*>(s)[e];
  if (bits == 16) return bf16_to_float(static_cast<const uint16_t*>(s)[e]);
  if (bits == 8) return q[static_cast<const uint8_t*>(s)[e]] * static_cast<const float*>(sc)[blk];
  const uint8_t byte = static_cast<const uint8_t*>(s)[e >> 1];
  return q[(byte >> ((e & 1) * 4)) & 15] * bf16_to_float(static_cast<const uint16_t*>(sc)[blk]);
}

__device__ __forceinline__ int search(const float* mids, int bits, bool sgn, float x) {
  int pos = 0;
  const int nq = 1 << bits;
  for (int step = nq >> 1; step > 0; step >>= 1) pos += mids[pos + step - 1] < x ? step : 0;
  if (x != x) pos = nq - 1;
  if (!sgn && x > 0.0f && pos == 0) pos = 1;
  return pos;
}

struct Hyper {
  double h[8];  // the op's float arguments after lr, in nnopt._ext's order
  double lr;
  bool f[3];
};

template <typename P>
struct QuantFunctor {
  Hyper hy;
  DeviceScalar lr, grad_scale, step;
  RuntimeFlags flags;
  int op, bits;
  int64_t block;
  bool used[3], sgn[3], sr;
  const float* qmap;  // [2, 2^bits]
  const float* mids;  // [2, 2^bits]

  // The derived scalars of this call (lr, grad_scale and the step count are read on the device), once per block.
  struct All {
    SgdScalars<float> sgd;
    AdamScalars<float> adam;
    AdagradScalars<float> adagrad;
    RmspropScalars<float> rmsprop;
  };

  __device__ All scalars() const {
    const double lrv = lr.get(hy.lr), scale = grad_scale.get(1.0);
    const double* h = hy.h;
    All s{};
    if (op == kOpSgd) {
      const SgdArgs a{lrv, h[0], h[1], h[2], h[3], scale, hy.f[0], hy.f[1], hy.f[2]};
      s.sgd = make_sgd<float>(lrv, a);
    } else if (op == kOpAdam) {
      AdamArgs a{lrv, h[0], h[1], h[2], h[3], h[4], h[5], h[6], scale, hy.f[2]};
      if (step.ptr != nullptr) set_step(a, step.get(0.0));
      s.adam = make_adam<float>(lrv, a);
    } else if (op == kOpAdagrad) {
      AdagradArgs a{lrv, h[0], h[1], h[2], h[3], scale, hy.f[0], h[4]};
      if (step.ptr != nullptr) set_step(a, step.get(0.0));
      s.adagrad = make_adagrad<float>(lrv, a);
    } else {
      const RmspropArgs a{lrv, h[0], h[1], h[2], h[3], h[4], scale, hy.f[1]};
      s.rmsprop = make_rmsprop<float>(lrv, a);
    }
    return s;
  }

  // The update of element e in place on (p, s0, s1, s2).
  __device__ void update(int64_t e, const QMeta& t, float& p, float& s0, float& s1, float& s2,
                         const All& sc) const {
    const float g = to_f(static_cast<const P*>(t.grad)[e]);
    const bool keep = t.mask == nullptr || t.mask[e] != 0;
    if (op == kOpSgd) {
      sgd_update(p, g, s0, keep, sc.sgd, flags);
    } else if (op == kOpAdam) {
      adam_update(p, g, s0, s1, s2, keep, sc.adam, flags);
    } else if (op == kOpAdagrad) {
      adagrad_update(p, g, s0, keep, sc.adagrad, flags);
    } else {
      rmsprop_update(p, g, s0, s1, s2, keep, sc.rmsprop, flags);
    }
  }

  __device__ void operator()(const QMeta& t, int64_t start, int64_t n) const {
    __shared__ float sq[2 * 256], sm[2 * 256];
    const int nq = bits <= 8 ? (1 << bits) : 0;
    for (int i = threadIdx.x; i < 2 * nq; i += blockDim.x) {
      sq[i] = qmap[i];
      sm[i] = mids[i];
    }
    __syncthreads();
    const All sc = scalars();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int64_t b0 = start + int64_t(warp) * block; b0 < start + n; b0 += int64_t(warps) * block) {
      const int64_t m = min(block, start + n - b0);
      const int64_t blk = b0 / block;
      uint32_t amax[3] = {0, 0, 0};
      for (int pass = 0; pass < 2; ++pass) {
        float r[3] = {1.0f, 1.0f, 1.0f};
        if (pass == 1) {
          for (int k = 0; k < 3; ++k) {
            for (int o = 16; o > 0; o >>= 1) amax[k] = max(amax[k], __shfl_xor_sync(0xffffffffu, amax[k], o));
            if (bits == 4) amax[k] = (amax[k] + 0xffffu) & 0xffff0000u;
            const float a = __uint_as_float(amax[k]);
            r[k] = 1.0f / (a > 0.0f ? a : 1.0f);
            if (lane == 0 && used[k] && bits == 8) static_cast<float*>(t.sc[k])[blk] = a;
            if (lane == 0 && used[k] && bits == 4) static_cast<uint16_t*>(t.sc[k])[blk] = uint16_t(amax[k] >> 16);
          }
        }
        for (int64_t j = lane; 2 * j < m; j += 32) {
          int codes[3][2] = {{0, 0}, {0, 0}, {0, 0}};
          for (int half = 0; half < 2; ++half) {
            const int64_t e = b0 + 2 * j + half;
            if (2 * j + half >= m) break;
            float p = t.master ? t.master[e] : to_f(static_cast<const P*>(t.param)[e]);
            float s[3] = {0.0f, 0.0f, 0.0f};
            for (int k = 0; k < 3; ++k) {
              if (used[k]) s[k] = load_state(bits, t.s[k], t.sc[k], sq + (sgn[k] ? 0 : nq), e, blk);
            }
            update(e, t, p, s[0], s[1], s[2], sc);
            if (pass == 0) {
              for (int k = 0; k < 3; ++k) amax[k] = max(amax[k], __float_as_uint(s[k]) & 0x7fffffffu);
              continue;
            }
            if (t.master) t.master[e] = p;
            if (sr && t.master == nullptr && std::is_same<P, c10::BFloat16>::value) {
              const uint32_t rnd = hash32(uint32_t(e) ^ t.key) & 0xffffu;
              const uint16_t out = p != p ? uint16_t(0x7fc0) : uint16_t((__float_as_uint(p) + rnd) >> 16);
              static_cast<uint16_t*>(t.param)[e] = out;
            } else {
              static_cast<P*>(t.param)[e] = from_f<P>(p);
            }
            for (int k = 0; k < 3; ++k) {
              if (!used[k]) continue;
              if (bits == 32) static_cast<float*>(t.s[k])[e] = s[k];
              if (bits == 16) static_cast<uint16_t*>(t.s[k])[e] = float_to_bf16_rne(s[k]);
              if (bits <= 8) codes[k][half] = search(sm + (sgn[k] ? 0 : nq), bits, sgn[k], s[k] * r[k]);
            }
          }
          if (pass == 0) continue;
          for (int k = 0; k < 3; ++k) {
            if (!used[k]) continue;
            const int64_t e = b0 + 2 * j;
            uint8_t* c = static_cast<uint8_t*>(t.s[k]);
            if (bits == 8) {
              c[e] = uint8_t(codes[k][0]);
              if (2 * j + 1 < m) c[e + 1] = uint8_t(codes[k][1]);
            } else if (bits == 4) {
              c[e >> 1] = uint8_t(codes[k][0] | (2 * j + 1 < m ? codes[k][1] << 4 : 0));
            }
          }
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Host side.

const char* kOp = "quant_step_";

DeviceScalar device_scalar(const std::optional<Tensor>& t, Tensor& keep, at::Device device, const char* name) {
  DeviceScalar s;
  if (!t.has_value()) return s;
  check_scalar_tensor(kOp, name, t, device);
  keep = t->scalar_type() == at::kFloat ? *t : t->to(at::kFloat);
  s.ptr = keep.data_ptr<float>();
  return s;
}

void quant_step_cuda(c10::string_view op_view, TensorList params, TensorList grads, TensorList states0,
                     TensorList states1, TensorList states2, TensorList scales0, TensorList scales1, TensorList scales2,
                     TensorList masters, TensorList masks, const Tensor& qmap, const Tensor& mids, int64_t bits,
                     int64_t block_size, at::ArrayRef<double> hyper, at::IntArrayRef flags, int64_t seed,
                     const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                     const std::optional<Tensor>& found_inf, const std::optional<Tensor>& step) {
  const std::string op(op_view);
  TORCH_CHECK(bits == 32 || bits == 16 || bits == 8 || bits == 4, "nnopt::", kOp, ": bits must be 32, 16, 8 or 4, got ",
              bits);
  TORCH_CHECK(block_size >= 32 && block_size <= 4096 && (block_size & (block_size - 1)) == 0, "nnopt::", kOp,
              ": block_size must be a power of two in [32, 4096], got ", block_size);
  const size_t n = params.size();
  if (n == 0) return;
  const int op_id = op == "sgd_step" ? kOpSgd : op == "adam_step" ? kOpAdam : op == "adagrad_step" ? kOpAdagrad
                    : op == "rmsprop_step" ? kOpRmsprop : -1;
  TORCH_CHECK(op_id >= 0, "nnopt::", kOp, ": unknown op '", op, "'");
  static const size_t nh[4] = {5, 8, 6, 6}, nf[4] = {3, 3, 1, 2};
  TORCH_CHECK(hyper.size() == nh[op_id] && flags.size() == nf[op_id], "nnopt::", kOp, ": op '", op, "' takes ",
              nh[op_id], " hyper and ", nf[op_id], " flags");
  Hyper hy{};
  hy.lr = hyper[0];
  for (size_t i = 1; i < hyper.size(); ++i) hy.h[i - 1] = hyper[i];
  for (size_t i = 0; i < flags.size(); ++i) hy.f[i] = flags[i] != 0;
  // Slot use and signedness, as the CPU kernel (csrc/cpu/quant_optim.cpp).
  bool used[3], sgn[3];
  int wd = 0;
  bool fa = false, fb = false;
  if (op_id == kOpSgd) {
    used[0] = hyper[1] != 0, used[1] = used[2] = false;
    sgn[0] = sgn[1] = sgn[2] = true;
    wd = hyper[3] != 0;
    fa = used[0];
  } else if (op_id == kOpAdam) {
    used[0] = used[1] = true, used[2] = hy.f[1];
    sgn[0] = true, sgn[1] = sgn[2] = false;
    wd = hyper[4] != 0 ? (hy.f[0] ? 2 : 1) : 0;
    fa = hy.f[1];
  } else if (op_id == kOpAdagrad) {
    used[0] = true, used[1] = used[2] = false;
    sgn[0] = sgn[1] = sgn[2] = false;
    wd = hyper[1] != 0;
  } else {
    used[0] = true, used[1] = hyper[4] > 0, used[2] = hy.f[0];
    sgn[0] = false, sgn[1] = sgn[2] = true;
    wd = hyper[3] != 0;
    fa = used[1], fb = used[2];
  }
  const at::Device device = params[0].device();
  const at::ScalarType dt = params[0].scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "nnopt::", kOp, ": params[0] has dtype ",
              dt, ", expected float32, bfloat16 or float16");
  check_length(kOp, "grads", grads, n, true);
  check_length(kOp, "masters", masters, n, false);
  check_length(kOp, "masks", masks, n, false);
  const TensorList sts[3] = {states0, states1, states2}, scs[3] = {scales0, scales1, scales2};
  static const char* snames[3] = {"states0", "states1", "states2"};
  static const char* cnames[3] = {"scales0", "scales1", "scales2"};
  const at::ScalarType sdt = bits == 32 ? at::kFloat : bits == 16 ? at::kBFloat16 : at::kByte;
  std::vector<QMeta> metas(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_tensor(kOp, "params", i, params[i], device, dt, "one dtype per call", numel);
    check_tensor(kOp, "grads", i, grads[i], device, dt, "the dtype of params[i]", numel);
    QMeta& t = metas[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].data_ptr();
    t.numel = numel;
    t.master = nullptr;
    t.mask = nullptr;
    t.key = uint32_t(uint64_t(seed) * 0x9E3779B1ull + uint64_t(i) * 0x85EBCA77ull);
    if (!masters.empty()) {
      check_tensor(kOp, "masters", i, masters[i], device, at::kFloat, "masters are float32", numel);
      t.master = masters[i].data_ptr<float>();
    }
    if (!masks.empty()) {
      check_tensor(kOp, "masks", i, masks[i], device, at::kBool, "masks are bool", numel);
      t.mask = static_cast<const uint8_t*>(masks[i].data_ptr());
    }
    for (int k = 0; k < 3; ++k) {
      t.s[k] = nullptr;
      t.sc[k] = nullptr;
      if (!used[k]) continue;
      check_length(kOp, snames[k], sts[k], n, true);
      check_tensor(kOp, snames[k], i, sts[k][i], device, sdt, "the state format of bits",
                   bits == 4 ? (numel + 1) / 2 : numel);
      t.s[k] = sts[k][i].data_ptr();
      if (bits <= 8) {
        check_length(kOp, cnames[k], scs[k], n, true);
        check_tensor(kOp, cnames[k], i, scs[k][i], device, bits == 8 ? at::kFloat : at::kBFloat16,
                     "one absmax per block", (numel + block_size - 1) / block_size);
        t.sc[k] = scs[k][i].data_ptr();
      }
    }
  }
  if (bits <= 8) {
    for (const Tensor* tt : {&qmap, &mids}) {
      TORCH_CHECK(tt->device() == device && tt->scalar_type() == at::kFloat && tt->is_contiguous() &&
                      tt->numel() == 2 * (int64_t(1) << bits),
                  "nnopt::", kOp, ": qmap and mids must be float32 [2, ", int64_t(1) << bits, "] on ", device);
    }
  }
  Tensor lr_keep, scale_keep, step_keep, inf_keep;
  const DeviceScalar lr_s = device_scalar(lr_tensor, lr_keep, device, "lr_tensor");
  const DeviceScalar scale_s = device_scalar(grad_scale, scale_keep, device, "grad_scale");
  const DeviceScalar step_s = device_scalar(step, step_keep, device, "step");
  const float* inf_ptr = nullptr;
  if (found_inf.has_value()) {
    check_scalar_tensor(kOp, "found_inf", found_inf, device);
    inf_keep = found_inf->scalar_type() == at::kFloat ? *found_inf : found_inf->to(at::kFloat);
    inf_ptr = inf_keep.data_ptr<float>();
  }
  const RuntimeFlags rf{!masks.empty(), wd, fa, fb};
  const float* qp = bits <= 8 ? qmap.data_ptr<float>() : nullptr;
  const float* mp = bits <= 8 ? mids.data_ptr<float>() : nullptr;
  auto run = [&](auto tag) {
    using P = decltype(tag);
    QuantFunctor<P> f{hy, lr_s, scale_s, step_s, rf, op_id, int(bits), block_size,
                      {used[0], used[1], used[2]}, {sgn[0], sgn[1], sgn[2]}, seed >= 0, qp, mp};
    cuda::multi_tensor_apply(metas, device, inf_ptr, f);
  };
  if (dt == at::kFloat) {
    run(float{});
  } else if (dt == at::kBFloat16) {
    run(c10::BFloat16{});
  } else {
    run(c10::Half{});
  }
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CUDA, m) { m.impl("quant_step_", &nnopt::quant_step_cuda); }
