// CUDA kernel of nnopt::l2_norms (per-tensor L2 norms, float32 [T]; the CPU twin is in csrc/cpu/fused_optim.cpp):
// LAMB's global gradient norm. One launch of the shared multi-tensor launcher per dtype present writes one float64
// partial sum of squares per chunk (a block reduction); a second launch adds each tensor's chunk partials in chunk
// order and takes the square root. Deterministic (no atomics), no host synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "multi_tensor_apply.cuh"

namespace nnopt {
namespace {

using at::Tensor;
using at::TensorList;

struct NormMeta {
  const void* x;
  int64_t numel;
  int64_t first_chunk;  // index of this tensor's first chunk in the partials
};

template <typename T>
struct SumSquaresFunctor {
  double* partial;
  __device__ void operator()(const NormMeta& t, int64_t start, int64_t n) const {
    using C = std::conditional_t<std::is_same<T, double>::value, double, float>;
    __shared__ double shared[cuda::kBlockThreads / 32];
    const T* x = static_cast<const T*>(t.x) + start;
    C acc = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const C v = C(x[i]);
      acc += v * v;
    }
    double s = double(acc);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) shared[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0;
      for (int w = 0; w < int(blockDim.x / 32); ++w) total += shared[w];
      partial[t.first_chunk + start / cuda::kChunkSize] = total;
    }
  }
};

// out[i] = sqrt(sum of tensor i's chunk partials, in chunk order).
__global__ void finish_norms(const double* partial, const int64_t* first, int64_t n, float* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  double s = 0;
  for (int64_t k = first[i]; k < first[i + 1]; ++k) s += partial[k];
  out[i] = float(sqrt(s));
}

Tensor l2_norms_cuda(TensorList tensors) {
  const int64_t n = int64_t(tensors.size());
  TORCH_CHECK(n > 0, "nnopt::l2_norms: tensors is empty");
  const at::Device device = tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<int64_t> first(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == device, "nnopt::l2_norms: tensors[", i, "] is on ", t.device(), ", tensors[0] on ",
                device);
    TORCH_CHECK(t.is_contiguous(), "nnopt::l2_norms: tensors[", i, "] must be contiguous");
    const at::ScalarType dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                "nnopt::l2_norms: tensors[", i, "] has dtype ", dt, ", expected a floating dtype");
    first[i + 1] = first[i] + (t.numel() + cuda::kChunkSize - 1) / cuda::kChunkSize;
  }
  Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(device));
  Tensor partial = at::zeros({std::max<int64_t>(first[n], 1)}, at::TensorOptions().dtype(at::kDouble).device(device));
  double* part = partial.data_ptr<double>();
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
  for (at::ScalarType dt : dtypes) {
    std::vector<NormMeta> metas;
    for (int64_t i = 0; i < n; ++i) {
      if (tensors[i].scalar_type() == dt && tensors[i].numel() > 0) {
        metas.push_back({tensors[i].data_ptr(), tensors[i].numel(), first[i]});
      }
    }
    if (metas.empty()) continue;
    switch (dt) {
      case at::kDouble: cuda::multi_tensor_apply(metas, device, nullptr, SumSquaresFunctor<double>{part}); break;
      case at::kBFloat16:
        cuda::multi_tensor_apply(metas, device, nullptr, SumSquaresFunctor<c10::BFloat16>{part});
        break;
      case at::kHalf: cuda::multi_tensor_apply(metas, device, nullptr, SumSquaresFunctor<c10::Half>{part}); break;
      default: cuda::multi_tensor_apply(metas, device, nullptr, SumSquaresFunctor<float>{part}); break;
    }
  }
  Tensor host = at::empty({n + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), first.data(), size_t(n + 1) * sizeof(int64_t));
  Tensor first_d = host.to(device, /*non_blocking=*/true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  finish_norms<<<unsigned((n + 255) / 256), 256, 0, stream>>>(part, first_d.data_ptr<int64_t>(), n,
                                                                out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CUDA, m) { m.impl("l2_norms", &nnopt::l2_norms_cuda); }
