// The one chunked multi-tensor launcher shared by every fused optimizer step (csrc/cuda/fused_optim.cu).
//
// One kernel launch per call however many tensors: the host builds a table of per-tensor metadata (`Meta`:
// pointers and numel, defined by the caller) and a table of chunks (tensor index, 64-bit start), writes both into
// one pinned host buffer and copies it to the device asynchronously on the current stream (the caching host
// allocator keeps the pinned block alive until the copy has run; no host synchronisation). Each block handles one
// chunk of at most kChunkSize elements by calling `functor(meta, start, n)`, which strides over the chunk with
// blockDim.x * kILP elements per iteration.
//
// found_inf (one float on the device, or null): when nonzero every block returns before touching memory, so the
// step changes nothing and the host never reads the flag.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace nnopt {
namespace cuda {

constexpr int kBlockThreads = 512;
// Elements per thread per iteration: one 16-byte load of float32 (8 bytes of bf16/fp16, 32 of float64).
constexpr int kILP = 4;
// 64K elements per block: 32 iterations of a 512-thread block, ~2 MB of float32 Adam traffic per block.
constexpr int64_t kChunkSize = 65536;

struct ChunkEntry {
  int64_t start;
  int64_t tensor;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

// True when p can be read as AlignedVec<T, kILP> (chunk starts are multiples of kILP, so this holds for every
// iteration of a chunk once it holds for the chunk's first element).
template <typename T>
__device__ __forceinline__ bool vec_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kILP) == 0;
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[kILP]) {
  const AlignedVec<T, kILP> v = *reinterpret_cast<const AlignedVec<T, kILP>*>(p);
#pragma unroll
  for (int j = 0; j < kILP; ++j) out[j] = v.v[j];
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[kILP]) {
  AlignedVec<T, kILP> v;
#pragma unroll
  for (int j = 0; j < kILP; ++j) v.v[j] = in[j];
  *reinterpret_cast<AlignedVec<T, kILP>*>(p) = v;
}

template <typename Meta, typename Functor>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_apply_kernel(const Meta* __restrict__ metas, const ChunkEntry* __restrict__ chunks,
                              const float* __restrict__ found_inf, Functor functor) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const ChunkEntry c = chunks[blockIdx.x];
  const Meta& meta = metas[c.tensor];
  const int64_t remaining = meta.numel - c.start;
  functor(meta, c.start, remaining < kChunkSize ? remaining : kChunkSize);
}

// Launches functor over every chunk of every tensor described by metas (Meta must be trivially copyable and
// have an int64_t `numel`). All tensors live on `device`; the launch goes on its current stream.
template <typename Meta, typename Functor>
void multi_tensor_apply(const std::vector<Meta>& metas, at::Device device, const float* found_inf,
                        const Functor& functor) {
  static_assert(std::is_trivially_copyable<Meta>::value, "Meta is copied bytewise to the device");
  std::vector<ChunkEntry> chunks;
  for (size_t i = 0; i < metas.size(); ++i) {
    for (int64_t s = 0; s < metas[i].numel; s += kChunkSize) chunks.push_back({s, int64_t(i)});
  }
  if (chunks.empty()) return;
  TORCH_CHECK(chunks.size() <= size_t(INT32_MAX), "nnopt: too many chunks for one launch (", chunks.size(), ")");

  const size_t meta_bytes = (metas.size() * sizeof(Meta) + 15) / 16 * 16;
  const size_t chunk_bytes = chunks.size() * sizeof(ChunkEntry);
  at::Tensor host = at::empty({int64_t(meta_bytes + chunk_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  std::memcpy(h, metas.data(), metas.size() * sizeof(Meta));
  std::memcpy(h + meta_bytes, chunks.data(), chunk_bytes);

  c10::cuda::CUDAGuard guard(device);
  at::Tensor dev = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  const uint8_t* d = dev.data_ptr<uint8_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  multi_tensor_apply_kernel<Meta, Functor><<<unsigned(chunks.size()), kBlockThreads, 0, stream>>>(
      reinterpret_cast<const Meta*>(d), reinterpret_cast<const ChunkEntry*>(d + meta_bytes), found_inf, functor);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace nnopt
