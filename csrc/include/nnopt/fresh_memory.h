// Large CPU scratch and output buffers without 4 KiB page faults, shared by the masked-linear products and the
// calibration Hessian (host code only); freed ones are recycled (MappingPool).
//
// A fresh buffer of many MiB is mapped page by page as it is first written: one page fault per 4 KiB, which costs
// more than writing it (measured here: 30 ms of faults for a 64 MiB dW; 20 ms per 2048×4096 batch for the Hessian's
// packed operands). Transparent huge pages cut the faults 512-fold.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

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

#if defined(__linux__) && defined(MAP_ANONYMOUS)
// Mappings whose tensors have been freed, kept for the next request of the same length instead of unmapped: a fresh
// mapping costs a page fault and the OS's zeroing per page on first touch (a 64 MiB dW: ~7 ms here, against ~0.2 ms
// for its tiles at 99% sparsity), a recycled one neither. Up to NNOPT_MAPPING_POOL_MB MiB are kept (default 1024;
// 0 unmaps at once, as before the pool), oldest unmapped first. A recycled mapping holds whatever its last tensor
// held: callers that need zeros must clear it (see fresh_or_recycled).
class MappingPool {
 public:
  static MappingPool& get() {
    static MappingPool* pool = new MappingPool;  // never destroyed: deleters may run during exit
    return *pool;
  }
  // A kept mapping of exactly `len` bytes (its raw address), or nullptr; the most recently freed first (its memory
  // is the likeliest to be still cached).
  void* take(size_t len) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = free_.size(); i-- > 0;) {
      if (free_[i].second == len) {
        void* raw = free_[i].first;
        free_.erase(free_.begin() + int64_t(i));
        bytes_ -= len;
        return raw;
      }
    }
    return nullptr;
  }
  void give(void* raw, size_t len) {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.emplace_back(raw, len);
      bytes_ += len;
      while (bytes_ > max_bytes_ && !free_.empty()) {
        drop.push_back(free_.front());
        bytes_ -= free_.front().second;
        free_.erase(free_.begin());
      }
    }
    for (const auto& [p, n] : drop) munmap(p, n);
  }

 private:
  MappingPool() {
    const char* env = std::getenv("NNOPT_MAPPING_POOL_MB");
    if (env && *env) max_bytes_ = size_t(std::strtoull(env, nullptr, 10)) << 20;
  }
  size_t max_bytes_ = size_t(1) << 30;
  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t bytes_ = 0;
};
#endif

// `numel` elements of `options`' dtype, 1-D, on 2 MiB-aligned advised huge pages of an anonymous mapping, which goes
// back to MappingPool when the tensor is freed. `recycled` says whether it came from the pool (arbitrary contents)
// or was mapped fresh (the OS hands it out zeroed). nullopt where mapping is not available or fails (the caller
// falls back to an ordinary tensor).
inline std::optional<at::Tensor> fresh_or_recycled(int64_t numel, const at::TensorOptions& options, bool& recycled) {
  recycled = false;
#if defined(__linux__) && defined(MAP_ANONYMOUS)
  const int64_t bytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  constexpr size_t huge = size_t(2) << 20;
  const size_t span = (size_t(bytes) + huge - 1) / huge * huge, len = span + huge;
  void* raw = MappingPool::get().take(len);
  recycled = raw != nullptr;
  if (!raw) {
    raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return std::nullopt;
  }
  void* p = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw) + huge - 1) & ~uintptr_t(huge - 1));
#if defined(MADV_HUGEPAGE)
  if (!recycled) madvise(p, span, MADV_HUGEPAGE);
#endif
  return at::from_blob(p, {numel}, [raw, len](void*) { MappingPool::get().give(raw, len); }, options);
#else
  (void)numel, (void)options;
  return std::nullopt;
#endif
}

// As fresh_or_recycled, for callers that overwrite every element anyway (contents arbitrary).
inline std::optional<at::Tensor> fresh_mapping(int64_t numel, const at::TensorOptions& options) {
  bool recycled;
  return fresh_or_recycled(numel, options, recycled);
}

}  // namespace nnopt
