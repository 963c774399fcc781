// The kept entries of masked tensors, packed and unpacked on CPU (nnopt::kept_gather, nnopt::kept_scatter_): what
// compact optimizer states (nnopt/optim/_compact_state.py) need around each step. Oracle: torch.masked_select and
// Tensor.masked_scatter_ (row-major order of the mask's True entries).
//
// torch's route (nonzero, then index_select / index_copy_) materialises int64 positions with a single-threaded
// nonzero: ~3.6 ns per mask element here, 60 ms for a 4096² mask, against a step that moves the kept entries in a
// few ms. Here the mask is read twice in parallel chunks (a count per chunk, then the copy at the chunk's offset)
// and no positions exist: 16 mask bytes become one AVX-512 lane mask, and the values move by compress (gather)
// or expand (scatter) with masked stores, so a scatter writes only the kept entries. Without AVX-512: scalar loops.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NNOPT_KEPT_AVX512 1
#include <immintrin.h>
#else
#define NNOPT_KEPT_AVX512 0
#endif

namespace nnopt {
namespace {

using at::Tensor;

constexpr int64_t kChunk = int64_t(1) << 16;  // mask elements per work item, at least

// The mask cut into chunks (multiples of 16 elements but the last) and, per chunk, where its kept entries start.
struct Plan {
  std::vector<int64_t> begin;   // [chunks + 1]
  std::vector<int64_t> offset;  // [chunks + 1]: offset.back() = the number kept
};

Plan plan(const uint8_t* m, int64_t n) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunks = std::clamp<int64_t>(n / kChunk, 1, 8 * threads);
  Plan p;
  p.begin.resize(size_t(chunks + 1));
  p.offset.assign(size_t(chunks + 1), 0);
  for (int64_t c = 0; c <= chunks; ++c) p.begin[c] = std::min(n, (n / chunks / 16 * 16) * c);
  p.begin[chunks] = n;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint64_t k = 0;
#pragma omp simd reduction(+ : k)
      for (int64_t i = p.begin[c]; i < p.begin[c + 1]; ++i) k += m[i] != 0;
      p.offset[c + 1] = int64_t(k);
    }
  });
  for (int64_t c = 0; c < chunks; ++c) p.offset[c + 1] += p.offset[c];
  return p;
}

// The unsigned integer of S bytes: entries are moved as bit patterns, whatever their dtype.
template <int S>
using Word = std::conditional_t<S == 1, uint8_t,
                                std::conditional_t<S == 2, uint16_t, std::conditional_t<S == 4, uint32_t, uint64_t>>>;

template <typename F>
void by_size(int64_t size, const F& f) {
  switch (size) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    default:
      TORCH_CHECK(false, "nnopt: element size ", size, " is not supported");
  }
}

// Gather: dst[j++] = src[i] for the kept i of [b, e). Scatter: dst[i] = src[j++] for them; the other entries of
// dst are not written. 16 (8) mask bytes make one lane mask; compress, or expand with a masked store.
template <int S, bool Gather>
void move_run(const uint8_t* m, const void* src_v, void* dst_v, int64_t b, int64_t e, int64_t j) {
  using T = Word<S>;
  const T* src = static_cast<const T*>(src_v);
  T* dst = static_cast<T*>(dst_v);
  int64_t i = b;
#if NNOPT_KEPT_AVX512
  if constexpr (S == 4 || S == 8) {
    constexpr int L = 64 / S;
    using Mask = std::conditional_t<S == 4, __mmask16, __mmask8>;
    for (; i + L <= e; i += L) {
      const __m128i bytes = S == 4 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(m + i))
                                   : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(m + i));
      const Mask k = Mask(_mm_test_epi8_mask(bytes, _mm_set1_epi8(-1)));
      const int c = __builtin_popcount(unsigned(k));
      if constexpr (Gather) {
        const __m512i x = _mm512_loadu_si512(src + i);
        if constexpr (S == 4) {
          _mm512_mask_storeu_epi32(dst + j, Mask((1u << c) - 1), _mm512_maskz_compress_epi32(k, x));
        } else {
          _mm512_mask_storeu_epi64(dst + j, Mask((1u << c) - 1), _mm512_maskz_compress_epi64(k, x));
        }
      } else if constexpr (S == 4) {
        _mm512_mask_storeu_epi32(dst + i, k, _mm512_maskz_expandloadu_epi32(k, src + j));
      } else {
        _mm512_mask_storeu_epi64(dst + i, k, _mm512_maskz_expandloadu_epi64(k, src + j));
      }
      j += c;
    }
  }
#endif
  for (; i < e; ++i) {
    if (!m[i]) continue;
    if constexpr (Gather) {
      dst[j++] = src[i];
    } else {
      dst[i] = src[j++];
    }
  }
}

// move_run over every chunk of the plan, in parallel, for elements of `size` bytes.
template <bool Gather>
void move_all(const uint8_t* m, const Plan& p, int64_t size, const void* src, void* dst) {
  const int64_t chunks = int64_t(p.begin.size()) - 1;
  by_size(size, [&](auto sc) {
    constexpr int S = decltype(sc)::value;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) move_run<S, Gather>(m, src, dst, p.begin[c], p.begin[c + 1], p.offset[c]);
    });
  });
}

void check_mask(const char* op, const Tensor& mask) {
  TORCH_CHECK(mask.device().is_cpu(), "nnopt::", op, ": mask is on ", mask.device(), ", expected a CPU tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "nnopt::", op, ": mask has dtype ", mask.scalar_type(),
              ", expected bool");
  TORCH_CHECK(mask.is_contiguous(), "nnopt::", op, ": mask must be contiguous");
}

void check_values(const char* op, const char* name, size_t i, const Tensor& t, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu(), "nnopt::", op, ": ", name, "[", i, "] is on ", t.device(),
              ", expected a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "nnopt::", op, ": ", name, "[", i, "] must be contiguous");
  TORCH_CHECK(t.numel() == numel, "nnopt::", op, ": ", name, "[", i, "] has ", t.numel(), " elements, expected ",
              numel);
}

std::vector<Tensor> kept_gather_cpu(const Tensor& mask, at::TensorList srcs) {
  const char* op = "kept_gather";
  check_mask(op, mask);
  const int64_t n = mask.numel();
  for (size_t s = 0; s < srcs.size(); ++s) check_values(op, "srcs", s, srcs[s], n);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const Plan p = plan(m, n);
  std::vector<Tensor> out;
  for (const Tensor& src : srcs) {
    Tensor dst = at::empty({p.offset.back()}, src.options());
    move_all<true>(m, p, src.element_size(), src.const_data_ptr(), dst.data_ptr());
    out.push_back(std::move(dst));
  }
  return out;
}

void kept_scatter_cpu(const Tensor& dst, const Tensor& mask, const Tensor& packed) {
  const char* op = "kept_scatter_";
  check_mask(op, mask);
  const int64_t n = mask.numel();
  check_values(op, "dst", 0, dst, n);
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous() && packed.dim() == 1, "nnopt::", op,
              ": packed must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(packed.scalar_type() == dst.scalar_type(), "nnopt::", op, ": packed has dtype ",
              packed.scalar_type(), ", dst ", dst.scalar_type());
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const Plan p = plan(m, n);
  TORCH_CHECK(packed.numel() == p.offset.back(), "nnopt::", op, ": packed has ", packed.numel(),
              " elements, the mask keeps ", p.offset.back());
  move_all<false>(m, p, dst.element_size(), packed.const_data_ptr(), dst.data_ptr());
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CPU, m) {
  m.impl("kept_gather", &nnopt::kept_gather_cpu);
  m.impl("kept_scatter_", &nnopt::kept_scatter_cpu);
}
