// Large CPU scratch and output buffers without 4 KiB page faults, shared by the masked-linear products and the
// calibration Hessian (host code only).
//
// A fresh buffer of many MiB is mapped page by page as it is first written: one page fault per 4 KiB, which costs
// more than writing it (measured here: 30 ms of faults for a 64 MiB dW; 20 ms per 2048×4096 batch for the Hessian's
// packed operands). Transparent huge pages cut the faults 512-fold.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <optional>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace nnopt {

// Asks for huge pages on the 2 MiB-aligned interior of a large buffer (what torch's allocator does for every
// large allocation under THP_MEM_ALLOC_ENABLE=1). A hint: without THP, a no-op.
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  if (bytes < int64_t(8 * huge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// `numel` elements of `options`' dtype, 1-D, as fresh anonymous memory: the kernel hands it out zeroed, on 2 MiB-
// aligned advised huge pages, and takes it back (munmap) when the tensor is freed. nullopt where mapping is not
// available or fails (the caller falls back to an ordinary tensor).
inline std::optional<at::Tensor> fresh_mapping(int64_t numel, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MAP_ANONYMOUS)
  const int64_t bytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  constexpr size_t huge = size_t(2) << 20;
  const size_t span = (size_t(bytes) + huge - 1) / huge * huge, len = span + huge;
  void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return std::nullopt;
  void* p = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw) + huge - 1) & ~uintptr_t(huge - 1));
#if defined(MADV_HUGEPAGE)
  madvise(p, span, MADV_HUGEPAGE);
#endif
  return at::from_blob(p, {numel}, [raw, len](void*) { munmap(raw, len); }, options);
#else
  (void)numel, (void)options;
  return std::nullopt;
#endif
}

}  // namespace nnopt
