// CPU kernel of the radix-select histogram (nnopt::select_histogram_), the one primitive of the select family.
//
// Semantics (oracle: nnopt/reference/select.py; driver: nnopt/prune/_select.py): adds to hist (int64, 2^bits
// bins) the count of eligible entries (mask true, or all when the mask is None) of every score tensor per value
// of the field (key >> shift) & (2^bits - 1) of their order key, among entries whose key bits above the field
// equal prefix; with magnitude, the keys are those of |score|. Order key (key_bits = 16, 32, 64): the float's
// bits (bf16/fp16 as themselves when key_bits is 16; converted exactly to float/double for 32/64) with -0.0 as +0.0, ~u for negatives, u | sign otherwise, NaN
// as all ones, so unsigned key order is value order.
//
// One at::parallel_for over work items of at most kChunk elements of any tensor. Each thread keeps its own
// histogram of 2^bits + 1 counters (the last one is a sink for entries that do not count, so the scatter loop
// has no branch) and merges it into the result once, under a mutex: integer sums, so the result does not depend
// on the thread schedule. Per block of kBlock entries a branch-free `omp simd` loop computes the bin indices,
// then a scalar loop scatters them. Extra memory: (2^bits + 1) * 8 bytes per thread.
#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

namespace nnopt {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 1 << 16;
constexpr int64_t kBlock = 256;

// The order key of a bit pattern u of a float format whose largest non-NaN magnitude pattern is `inf`.
template <typename U>
inline U order_key(U u, U inf, bool magnitude) {
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  u = magnitude ? U(u & ~sign) : u;
  u = u == sign ? U(0) : u;  // -0.0 -> +0.0
  const bool nan = (u & ~sign) > inf;
  const U key = (u & sign) ? U(~u) : U(u | sign);
  return nan ? U(~U(0)) : key;
}

// The key type of a key width, and the key of element i of a tensor of type S for that width.
template <int KeyBits>
using key_t = std::conditional_t<KeyBits == 16, uint16_t, std::conditional_t<KeyBits == 32, uint32_t, uint64_t>>;

template <int KeyBits, typename S>
inline key_t<KeyBits> key_of(const S* p, int64_t i, bool mag) {
  if constexpr (KeyBits == 16) {
    uint16_t u;
    std::memcpy(&u, p + i, 2);
    return order_key<uint16_t>(u, std::is_same_v<S, c10::BFloat16> ? uint16_t(0x7f80) : uint16_t(0x7c00), mag);
  } else if constexpr (KeyBits == 32) {
    float f;
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      uint16_t h;
      std::memcpy(&h, p + i, 2);
      const uint32_t w = uint32_t(h) << 16;
      std::memcpy(&f, &w, 4);
    } else {
      f = static_cast<float>(p[i]);
    }
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return order_key<uint32_t>(u, 0x7f800000u, mag);
  } else {
    const double d = static_cast<double>(p[i]);
    uint64_t u;
    std::memcpy(&u, &d, 8);
    return order_key<uint64_t>(u, 0x7ff0000000000000ull, mag);
  }
}

struct Item {
  int64_t tensor, begin, end;
};

struct Params {
  int shift, bits;
  bool check_prefix, magnitude;
  uint64_t prefix;
};

// Counts one item's entries into h (2^bits + 1 counters, the last a sink).
template <int KeyBits, typename S>
void count_item(const S* __restrict s, const bool* __restrict m, int64_t begin, int64_t end, const Params& q,
                int64_t* __restrict h) {
  // keys widened to at least 32 bits: 2^16 bins overflow a 16-bit key type
  using K = std::conditional_t<KeyBits == 64, uint64_t, uint32_t>;
  const K nbins = K(1) << q.bits;
  const K fmask = nbins - 1;
  const int hshift = q.shift + q.bits;
  const K prefix = K(q.prefix);
  uint32_t bin[kBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t n = std::min(kBlock, end - b0);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const K key = K(key_of<KeyBits>(s, b0 + j, q.magnitude));
      // hshift < KeyBits whenever check_prefix is set; the shift is guarded so it is never out of range
      const bool in = !q.check_prefix || K(key >> (q.check_prefix ? hshift : 0)) == prefix;
      const bool elig = m == nullptr || m[b0 + j];
      bin[j] = (in && elig) ? uint32_t((key >> q.shift) & fmask) : uint32_t(nbins);
    }
    for (int64_t j = 0; j < n; ++j) ++h[bin[j]];
  }
}

template <int KeyBits>
void count_tensor_item(const Tensor& s, const std::optional<Tensor>& m, const Item& it, const Params& q,
                       int64_t* h) {
  const bool* mp = m.has_value() ? m->data_ptr<bool>() : nullptr;
  switch (s.scalar_type()) {
    case at::kFloat:
      if constexpr (KeyBits != 16) count_item<KeyBits>(s.data_ptr<float>(), mp, it.begin, it.end, q, h);
      break;
    case at::kDouble:
      if constexpr (KeyBits == 64) count_item<KeyBits>(s.data_ptr<double>(), mp, it.begin, it.end, q, h);
      break;
    case at::kBFloat16:
      count_item<KeyBits>(s.data_ptr<c10::BFloat16>(), mp, it.begin, it.end, q, h);
      break;
    case at::kHalf:
      count_item<KeyBits>(s.data_ptr<c10::Half>(), mp, it.begin, it.end, q, h);
      break;
    default:
      break;
  }
}

void select_histogram_cpu(const Tensor& hist, at::TensorList scores, const c10::List<std::optional<Tensor>>& masks,
                          int64_t key_bits, int64_t shift, int64_t bits, int64_t prefix, bool magnitude) {
  TORCH_CHECK(key_bits == 16 || key_bits == 32 || key_bits == 64,
              "select_histogram_: key_bits must be 16, 32 or 64, got ", key_bits);
  TORCH_CHECK(bits >= 1 && bits <= 16 && shift >= 0 && shift + bits <= key_bits,
              "select_histogram_: need 1 <= bits <= 16 and 0 <= shift <= key_bits - bits, got bits=", bits,
              " shift=", shift);
  TORCH_CHECK(hist.device().is_cpu() && hist.scalar_type() == at::kLong && hist.is_contiguous() &&
                  hist.numel() == (int64_t(1) << bits),
              "select_histogram_: hist must be a contiguous int64 CPU tensor of 2^bits elements");
  TORCH_CHECK(masks.size() == scores.size(), "select_histogram_: masks has ", masks.size(), " entries, scores ",
              scores.size());
  std::vector<Tensor> ss(scores.begin(), scores.end());
  std::vector<std::optional<Tensor>> ms;
  ms.reserve(masks.size());
  for (size_t i = 0; i < ss.size(); ++i) {
    const Tensor& s = ss[i];
    const auto st = s.scalar_type();
    TORCH_CHECK(s.device().is_cpu() && s.is_contiguous(), "select_histogram_: scores[", i,
                "] must be a contiguous CPU tensor");
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                "select_histogram_: scores[", i, "] has unsupported dtype ", st);
    TORCH_CHECK(key_bits != 16 || st == at::kBFloat16 || st == at::kHalf, "select_histogram_: key_bits=16 needs ",
                "bfloat16 or float16 scores, scores[", i, "] is ", st);
    TORCH_CHECK(key_bits == 64 || st != at::kDouble, "select_histogram_: float64 scores need key_bits=64");
    std::optional<Tensor> m = masks.get(i);
    if (m.has_value()) {
      TORCH_CHECK(m->scalar_type() == at::kBool && m->device().is_cpu() && m->is_contiguous() &&
                      m->numel() == s.numel(),
                  "select_histogram_: masks[", i, "] must be a contiguous bool CPU tensor like scores[", i, "]");
    }
    ms.push_back(std::move(m));
  }
  const bool check_prefix = shift + bits < key_bits;
  const Params q{int(shift), int(bits), check_prefix, magnitude, uint64_t(prefix)};
  TORCH_CHECK(!check_prefix || (prefix >= 0 && (key_bits - shift - bits >= 63 ||
                                                prefix < (int64_t(1) << (key_bits - shift - bits)))),
              "select_histogram_: prefix ", prefix, " does not fit the ", key_bits - shift - bits,
              " bits above the field");

  std::vector<Item> items;
  for (size_t t = 0; t < ss.size(); ++t) {
    const int64_t n = ss[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({int64_t(t), b, std::min(n, b + kChunk)});
  }
  if (items.empty()) return;

  const int64_t nbins = int64_t(1) << bits;
  int64_t* out = hist.data_ptr<int64_t>();
  std::mutex merge;
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> h(nbins + 1, 0);
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[i];
      switch (key_bits) {
        case 16:
          count_tensor_item<16>(ss[it.tensor], ms[it.tensor], it, q, h.data());
          break;
        case 32:
          count_tensor_item<32>(ss[it.tensor], ms[it.tensor], it, q, h.data());
          break;
        default:
          count_tensor_item<64>(ss[it.tensor], ms[it.tensor], it, q, h.data());
          break;
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t b = 0; b < nbins; ++b) out[b] += h[b];
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nnopt, CPU, m) {
  m.impl("select_histogram_", &select_histogram_cpu);
}

}  // namespace nnopt
