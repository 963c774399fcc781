// CPU kernel of the optimizer steps with low-precision states (nnopt::quant_step_): 32/16/8/4-bit states.
//
// Formats, quantizer and oracle: nnopt/reference/quant_optim.py; per-element update: optim_math.h (the one shared
// with the fp32-state kernels). A work item is a run of whole quantization blocks of one tensor. Each block is
// dequantized into float arrays on the stack (L1-resident), updated by the fused step's element update,
// reduced to its new absmax and requantized: one pass over memory, no float32 copy of a state anywhere.
//
// No gathers: on this class of CPU a vector gather costs ~5 ns per element (microcode mitigations), more than
// the whole update. With AVX-512 the 8-bit map is read by in-register permutes (8 x vpermt2ps for 256 entries)
// and the nearest code is a branch-free binary search over the midpoints whose level tables are also read by
// permutes: code = #{mids < x}, the reference's searchsorted, so codes are identical. Without AVX-512 the same
// search runs in scalar code.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "nnopt/optim_checks.h"
#include "nnopt/optim_math.h"

namespace nnopt {
namespace {

using at::Tensor;
using at::TensorList;
using namespace nnopt::optim;

constexpr int64_t kMaxBlock = 4096;
constexpr int64_t kMinItem = 32768;  // elements per work item, at least (as in fused_optim.cpp)

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float bf16_to_float(uint16_t b) { return float_of(uint32_t(b) << 16); }
inline uint16_t float_to_bf16_rne(float f) {
  const uint32_t u = bits_of(f);
  return f != f ? uint16_t(0x7fc0) : uint16_t((u + (((u >> 16) & 1u) + 0x7fffu)) >> 16);
}
// lowbias32 (the reference's _hash32).
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// ---------------------------------------------------------------------------------------------------------
// Optimizer traits over optim_math.h (float compute only: float64 parameters keep fp32-state kernels).
// Slot k of a state: Adam exp_avg, exp_avg_sq, max_exp_avg_sq; SGD momentum_buffer; Adagrad sum; RMSprop
// square_avg, momentum_buffer, grad_avg. Flags: a = amsgrad / momentum; b = centered.

struct SgdOp {
  using Scalars = SgdScalars<float>;
  static constexpr int kMaxWd = 1;
  static constexpr bool kUsesA = true, kUsesB = false;
  static bool uses(int k, bool a, bool) { return k == 0 && a; }
  static bool is_signed(int) { return true; }
  template <typename F>
  static void update(float& p, float g, float& s0, float&, float&, bool keep, const Scalars& h, const F& f) {
    sgd_update(p, g, s0, keep, h, f);
  }
};

struct AdamOp {
  using Scalars = AdamScalars<float>;
  static constexpr int kMaxWd = 2;
  static constexpr bool kUsesA = true, kUsesB = false;
  static bool uses(int k, bool a, bool) { return k < 2 || a; }
  static bool is_signed(int k) { return k == 0; }
  template <typename F>
  static void update(float& p, float g, float& s0, float& s1, float& s2, bool keep, const Scalars& h, const F& f) {
    adam_update(p, g, s0, s1, s2, keep, h, f);
  }
};

struct AdagradOp {
  using Scalars = AdagradScalars<float>;
  static constexpr int kMaxWd = 1;
  static constexpr bool kUsesA = false, kUsesB = false;
  static bool uses(int k, bool, bool) { return k == 0; }
  static bool is_signed(int) { return false; }
  template <typename F>
  static void update(float& p, float g, float& s0, float&, float&, bool keep, const Scalars& h, const F& f) {
    adagrad_update(p, g, s0, keep, h, f);
  }
};

struct RmspropOp {
  using Scalars = RmspropScalars<float>;
  static constexpr int kMaxWd = 1;
  static constexpr bool kUsesA = true, kUsesB = true;
  static bool uses(int k, bool a, bool b) { return k == 0 || (k == 1 && a) || (k == 2 && b); }
  static bool is_signed(int k) { return k != 0; }
  template <typename F>
  static void update(float& p, float g, float& s0, float& s1, float& s2, bool keep, const Scalars& h, const F& f) {
    rmsprop_update(p, g, s0, s1, s2, keep, h, f);
  }
};

// The element loop over one block, specialised on the flags (branch-free, vectorised).
template <typename Op>
using MathFn = void (*)(int64_t, float*, const float*, float*, float*, float*, const uint8_t*,
                        const typename Op::Scalars&);

template <typename Op, typename F>
void math_loop(int64_t n, float* __restrict p, const float* __restrict g, float* __restrict s0,
               float* __restrict s1, float* __restrict s2, const uint8_t* __restrict mask,
               const typename Op::Scalars& hs) {
  const typename Op::Scalars h = hs;
  const F f{};
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = F::masked ? mask[i] != 0 : true;
    float pi = p[i], a = s0[i], b = s1[i], c = s2[i];
    Op::update(pi, g[i], a, b, c, keep, h, f);
    p[i] = pi;
    s0[i] = a;
    s1[i] = b;
    s2[i] = c;
  }
}

template <typename Op, bool M, int W, bool A>
MathFn<Op> select_b(bool b) {
  if constexpr (Op::kUsesB) {
    if (b) return &math_loop<Op, StaticFlags<M, W, A, true>>;
  }
  return &math_loop<Op, StaticFlags<M, W, A, false>>;
}

template <typename Op, bool M, int W>
MathFn<Op> select_a(bool a, bool b) {
  if constexpr (Op::kUsesA) {
    if (a) return select_b<Op, M, W, true>(b);
  }
  return select_b<Op, M, W, false>(b);
}

template <typename Op, bool M>
MathFn<Op> select_wd(int wd, bool a, bool b) {
  if constexpr (Op::kMaxWd >= 2) {
    if (wd == 2) return select_a<Op, M, 2>(a, b);
  }
  if (wd == 1) return select_a<Op, M, 1>(a, b);
  return select_a<Op, M, 0>(a, b);
}

template <typename Op>
MathFn<Op> select_math(bool masked, int wd, bool a, bool b) {
  return masked ? select_wd<Op, true>(wd, a, b) : select_wd<Op, false>(wd, a, b);
}

// ---------------------------------------------------------------------------------------------------------
// Loading and storing one block.

struct Format {
  int bits;
  int64_t block;
  const float* qmap[2];  // [signed, unsigned] rows, 2^bits values each
  // Per row, the binary search's level tables: level l (l = 0 .. bits-1, step 2^(bits-1-l)) holds the 2^l
  // midpoints mids[k * 2 * step + step - 1] (mids padded with +inf to 2^bits entries).
  float levels[2][256];
};

void build_levels(Format& fm, const float* mids_row, int row) {
  const int nq = 1 << fm.bits;
  int off = 0;
  for (int l = 0; l < fm.bits; ++l) {
    const int step = nq >> (l + 1);
    for (int k = 0; k < (1 << l); ++k) fm.levels[row][off + k] = mids_row[k * 2 * step + step - 1];
    off += 1 << l;
  }
}

// #{mids < x}: branch-free binary search, scalar (the AVX-512 path below computes the same).
inline int32_t search_scalar(const Format& fm, int row, float x) {
  if (x != x) return (1 << fm.bits) - 1;
  int32_t pos = 0;
  int off = 0;
  for (int l = 0; l < fm.bits; ++l) {
    const int32_t step = (1 << fm.bits) >> (l + 1);
    const int32_t k = pos / (2 * step);
    pos += fm.levels[row][off + k] < x ? step : 0;
    off += 1 << l;
  }
  return pos;
}

#if defined(__AVX512F__)
// table[idx] for a table of up to 256 floats (entries beyond its length are never indexed).
template <int N>
inline __m512 lookup(const float* table, __m512i idx) {
  if constexpr (N == 1) {
    return _mm512_set1_ps(table[0]);
  } else if constexpr (N <= 16) {
    return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(table));
  } else {
    __m512 r = _mm512_permutex2var_ps(_mm512_loadu_ps(table), idx, _mm512_loadu_ps(table + 16));
    const __m512i hi = _mm512_srli_epi32(idx, 5);
    for (int k = 1; k < N / 32; ++k) {
      const __m512 t =
          _mm512_permutex2var_ps(_mm512_loadu_ps(table + 32 * k), idx, _mm512_loadu_ps(table + 32 * k + 16));
      r = _mm512_mask_mov_ps(r, _mm512_cmpeq_epi32_mask(hi, _mm512_set1_epi32(k)), t);
    }
    return r;
  }
}

template <int Bits>
inline __m512i search16(const Format& fm, int row, __m512 x) {
  __m512i pos = _mm512_setzero_si512();
  const float* lv = fm.levels[row];
  auto level = [&](auto lc) {
    constexpr int l = decltype(lc)::value;
    constexpr int step = (1 << Bits) >> (l + 1);
    constexpr int n = 1 << l;
    constexpr int off = n - 1;
    const __m512i k = _mm512_srli_epi32(pos, __builtin_ctz(2 * step));
    const __m512 v = lookup<n>(lv + off, k);
    pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(v, x, _CMP_LT_OQ), pos, _mm512_set1_epi32(step));
  };
  level(std::integral_constant<int, 0>{});
  level(std::integral_constant<int, 1>{});
  level(std::integral_constant<int, 2>{});
  level(std::integral_constant<int, 3>{});
  if constexpr (Bits == 8) {
    level(std::integral_constant<int, 4>{});
    level(std::integral_constant<int, 5>{});
    level(std::integral_constant<int, 6>{});
    level(std::integral_constant<int, 7>{});
  }
  return _mm512_mask_mov_epi32(pos, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32((1 << Bits) - 1));
}
#endif

struct QTensor {
  void* param;
  const void* grad;
  float* master;
  const uint8_t* mask;
  void* s[3];
  void* sc[3];
  int64_t numel;
  at::ScalarType dtype;
  uint32_t key;  // stochastic rounding stream of this tensor
};

template <typename P>
inline void load_float(const P* __restrict src, float* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = float(src[i]);
  }
}

template <typename P>
inline void store_float(const float* __restrict src, P* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_rne(src[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = P(src[i]);
  }
}

// bf16 parameter rounded stochastically: element e of the tensor adds hash(e ^ key) & 0xffff below the cut.
inline void store_bf16_sr(const float* __restrict src, uint16_t* __restrict dst, int64_t e0, int64_t n,
                          uint32_t key) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t r = hash32(uint32_t(e0 + i) ^ key) & 0xffffu;
    const float f = src[i];
    dst[i] = f != f ? uint16_t(0x7fc0) : uint16_t((bits_of(f) + r) >> 16);
  }
}

// State slot -> float block.
inline void load_state(const Format& fm, bool sgn, const void* s, const void* sc, int64_t e0, int64_t n,
                       float* __restrict dst) {
  if (fm.bits == 32) {
    std::memcpy(dst, static_cast<const float*>(s) + e0, n * sizeof(float));
    return;
  }
  if (fm.bits == 16) {
    load_float(static_cast<const c10::BFloat16*>(s) + e0, dst, n);
    return;
  }
  const float* q = fm.qmap[sgn ? 0 : 1];
  int64_t i = 0;
  if (fm.bits == 8) {
    const uint8_t* c = static_cast<const uint8_t*>(s) + e0;
    const float a = static_cast<const float*>(sc)[e0 / fm.block];
#if defined(__AVX512F__)
    const __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i)));
      _mm512_storeu_ps(dst + i, _mm512_mul_ps(lookup<256>(q, idx), va));
    }
#endif
    for (; i < n; ++i) dst[i] = q[c[i]] * a;
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(s) + e0 / 2;
    const float a = bf16_to_float(static_cast<const uint16_t*>(sc)[e0 / fm.block]);
#if defined(__AVX512F__)
    const __m512 va = _mm512_set1_ps(a);
    const __m512 table = _mm512_loadu_ps(q);
    const __m128i low4 = _mm_set1_epi8(15);
    for (; i + 16 <= n; i += 16) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i / 2));
      const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
      _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), va));
    }
#endif
    for (; i < n; ++i) dst[i] = q[(c[i >> 1] >> ((i & 1) * 4)) & 15] * a;
  }
}

// float block -> state slot (requantized with the block's new absmax).
inline void store_state(const Format& fm, bool sgn, void* s, void* sc, int64_t e0, int64_t n,
                        const float* __restrict src) {
  if (fm.bits == 32) {
    std::memcpy(static_cast<float*>(s) + e0, src, n * sizeof(float));
    return;
  }
  if (fm.bits == 16) {
    store_float(src, static_cast<c10::BFloat16*>(s) + e0, n);
    return;
  }
  // max |x| on the bit patterns: for non-negative floats integer order is float order, and NaN (above inf) wins.
  uint32_t amax = 0;
#pragma omp simd reduction(max : amax)
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, bits_of(src[i]) & 0x7fffffffu);
  if (fm.bits == 4) amax = (amax + 0xffffu) & 0xffff0000u;  // bf16, rounded up
  const float a = float_of(amax);
  const float r = 1.0f / (a > 0.0f ? a : 1.0f);
  const int row = sgn ? 0 : 1;
  alignas(64) uint8_t codes[kMaxBlock];
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vr = _mm512_set1_ps(r);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + i), vr);
    __m512i c = fm.bits == 8 ? search16<8>(fm, row, x) : search16<4>(fm, row, x);
    if (!sgn) {  // a positive value never takes the code of 0
      const __mmask16 z = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ) &
                          _mm512_cmpeq_epi32_mask(c, _mm512_setzero_si512());
      c = _mm512_mask_mov_epi32(c, z, _mm512_set1_epi32(1));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
  }
#endif
  for (; i < n; ++i) {
    const float x = src[i] * r;
    int32_t c = search_scalar(fm, row, x);
    if (!sgn) c = (x > 0.0f && c == 0) ? 1 : c;
    codes[i] = uint8_t(c);
  }
  if (fm.bits == 8) {
    std::memcpy(static_cast<uint8_t*>(s) + e0, codes, n);
    static_cast<float*>(sc)[e0 / fm.block] = a;
  } else {
    uint8_t* d = static_cast<uint8_t*>(s) + e0 / 2;
    const int64_t pairs = n / 2;
#pragma omp simd
    for (int64_t j = 0; j < pairs; ++j) d[j] = uint8_t(codes[2 * j] | (codes[2 * j + 1] << 4));
    if (n & 1) d[pairs] = codes[n - 1];
    static_cast<uint16_t*>(sc)[e0 / fm.block] = uint16_t(amax >> 16);
  }
}

// ---------------------------------------------------------------------------------------------------------

template <typename Op>
struct Context {
  typename Op::Scalars h;
  MathFn<Op> fn;
  Format fm;
  bool a, b, sr;
};

// Blocks of elements [b, b+n) of one tensor (b a multiple of the block size). P: param/grad dtype.
template <typename Op, typename P>
void run_item(const Context<Op>& ctx, const QTensor& t, int64_t b, int64_t n) {
  const Format& fm = ctx.fm;
  // float32 parameters (without masters) and gradients are used in place; others go through stack blocks.
  constexpr bool f32 = std::is_same_v<P, float>;
  alignas(64) float pt[kMaxBlock], gt[kMaxBlock], st[3][kMaxBlock];
  bool used[3];
  for (int k = 0; k < 3; ++k) used[k] = t.s[k] != nullptr;
  for (int64_t e0 = b; e0 < b + n; e0 += fm.block) {
    const int64_t m = std::min<int64_t>(fm.block, b + n - e0);
    float* pp = pt;
    if (t.master) {
      pp = t.master + e0;
    } else if constexpr (f32) {
      pp = static_cast<float*>(t.param) + e0;
    } else {
      load_float(static_cast<const P*>(t.param) + e0, pt, m);
    }
    const float* gp = gt;
    if constexpr (f32) {
      gp = static_cast<const float*>(t.grad) + e0;
    } else {
      load_float(static_cast<const P*>(t.grad) + e0, gt, m);
    }
    for (int k = 0; k < 3; ++k) {
      if (used[k]) load_state(fm, Op::is_signed(k), t.s[k], t.sc[k], e0, m, st[k]);
    }
    ctx.fn(m, pp, gp, st[0], st[1], st[2], t.mask ? t.mask + e0 : nullptr, ctx.h);
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      if (ctx.sr && !t.master) {
        store_bf16_sr(pp, static_cast<uint16_t*>(t.param) + e0, e0, m, t.key);
      } else {
        store_float(pp, static_cast<P*>(t.param) + e0, m);
      }
    } else if (t.master || !f32) {
      store_float(pp, static_cast<P*>(t.param) + e0, m);
    }
    for (int k = 0; k < 3; ++k) {
      if (used[k]) store_state(fm, Op::is_signed(k), t.s[k], t.sc[k], e0, m, st[k]);
    }
  }
}

template <typename Op>
void run_all(const Context<Op>& ctx, const std::vector<QTensor>& tensors) {
  using Fn = void (*)(const Context<Op>&, const QTensor&, int64_t, int64_t);
  std::vector<Fn> fns(tensors.size());
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto dt = tensors[i].dtype;
    fns[i] = dt == at::kFloat ? &run_item<Op, float>
             : dt == at::kBFloat16 ? &run_item<Op, c10::BFloat16> : &run_item<Op, c10::Half>;
    total += tensors[i].numel;
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = ctx.fm.block;
  int64_t chunk = std::max(kMinItem, (total + 4 * threads - 1) / (4 * threads));
  chunk = (chunk + block - 1) / block * block;  // whole blocks
  struct Item {
    int64_t tensor, begin, n;
  };
  std::vector<Item> items;
  for (int64_t i = 0; i < int64_t(tensors.size()); ++i) {
    const int64_t numel = tensors[i].numel;
    for (int64_t b = 0; b < numel; b += chunk) items.push_back({i, b, std::min(chunk, numel - b)});
  }
  const int64_t n_items = int64_t(items.size());
  if (n_items == 0) return;
  auto work = [&](const Item& it) { fns[it.tensor](ctx, tensors[it.tensor], it.begin, it.n); };
  const int64_t n_threads = std::min<int64_t>(threads, n_items);
  if (n_threads <= 1 || total <= kMinItem) {
    for (const Item& it : items) work(it);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n_items;
         k = next.fetch_add(1, std::memory_order_relaxed)) {
      work(items[k]);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Validation.

const char* kOp = "quant_step_";

void check_list_tensor(const char* list, size_t i, const Tensor& t, at::Device device, at::ScalarType dtype,
                       const char* rule, int64_t numel) {
  check_tensor(kOp, list, i, t, device, dtype, rule, numel);
}

std::vector<QTensor> check_all(const std::string& op, TensorList params, TensorList grads,
                               const std::vector<TensorList>& states, const std::vector<TensorList>& scales,
                               const std::vector<bool>& used, TensorList masters, TensorList masks, int64_t bits,
                               int64_t block) {
  const size_t n = params.size();
  check_length(kOp, "grads", grads, n, true);
  check_length(kOp, "masters", masters, n, false);
  check_length(kOp, "masks", masks, n, false);
  static const char* snames[3] = {"states0", "states1", "states2"};
  static const char* cnames[3] = {"scales0", "scales1", "scales2"};
  const bool scaled = bits == 8 || bits == 4;
  for (int k = 0; k < 3; ++k) {
    check_length(kOp, snames[k], states[k], n, used[k]);
    check_length(kOp, cnames[k], scales[k], n, used[k] && scaled);
  }
  std::vector<QTensor> out(n);
  if (n == 0) return out;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cpu(), "nnopt::", kOp, ": params[0] is on ", device, ", expected a CPU tensor");
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const at::ScalarType dt = p.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "nnopt::", kOp, ": params[", i,
                "] has dtype ", dt, ", expected float32, bfloat16 or float16");
    const int64_t numel = p.numel();
    check_list_tensor("params", i, p, device, dt, "a floating dtype", numel);
    check_list_tensor("grads", i, grads[i], device, dt, "the dtype of params[i]", numel);
    QTensor& t = out[i];
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.numel = numel;
    t.dtype = dt;
    t.master = nullptr;
    t.mask = nullptr;
    if (!masters.empty()) {
      check_list_tensor("masters", i, masters[i], device, at::kFloat, "masters are float32", numel);
      t.master = static_cast<float*>(masters[i].data_ptr());
    }
    if (!masks.empty()) {
      check_list_tensor("masks", i, masks[i], device, at::kBool, "masks are bool", numel);
      t.mask = static_cast<const uint8_t*>(masks[i].data_ptr());
    }
    const int64_t nblocks = (numel + block - 1) / block;
    for (int k = 0; k < 3; ++k) {
      t.s[k] = nullptr;
      t.sc[k] = nullptr;
      if (!used[k]) continue;
      const Tensor& s = states[k][i];
      if (bits == 32) {
        check_list_tensor(snames[k], i, s, device, at::kFloat, "32-bit states are float32", numel);
      } else if (bits == 16) {
        check_list_tensor(snames[k], i, s, device, at::kBFloat16, "16-bit states are bfloat16", numel);
      } else {
        check_list_tensor(snames[k], i, s, device, at::kByte, "8/4-bit states are uint8 codes",
                          bits == 8 ? numel : (numel + 1) / 2);
        check_list_tensor(cnames[k], i, scales[k][i], device, bits == 8 ? at::kFloat : at::kBFloat16,
                          "one absmax per block: float32 (8 bits) or bfloat16 (4 bits)", nblocks);
        t.sc[k] = scales[k][i].data_ptr();
      }
      t.s[k] = s.data_ptr();
    }
  }
  return out;
}

bool read_scalars(TensorList params, const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                  const std::optional<Tensor>& found_inf, double& lr, double& scale) {
  const at::Device device = params.empty() ? at::Device(at::kCPU) : params[0].device();
  check_scalar_tensor(kOp, "lr_tensor", lr_tensor, device);
  check_scalar_tensor(kOp, "grad_scale", grad_scale, device);
  check_scalar_tensor(kOp, "found_inf", found_inf, device);
  if (found_inf.has_value() && found_inf->item<double>() != 0) return false;
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();
  scale = grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
  return true;
}

void need(const std::vector<double>& h, const std::vector<bool>& f, size_t nh, size_t nf, const std::string& op) {
  TORCH_CHECK(h.size() == nh && f.size() == nf, "nnopt::", kOp, ": op '", op, "' takes ", nh, " hyper and ", nf,
              " flags, got ", h.size(), " and ", f.size());
}

void quant_step_cpu(c10::string_view op_view, TensorList params, TensorList grads, TensorList states0,
                    TensorList states1, TensorList states2, TensorList scales0, TensorList scales1,
                    TensorList scales2, TensorList masters, TensorList masks, const Tensor& qmap, const Tensor& mids,
                    int64_t bits, int64_t block_size, at::ArrayRef<double> hyper_ref,
                    at::IntArrayRef flags_ref, int64_t seed, const std::optional<Tensor>& lr_tensor,
                    const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                    const std::optional<Tensor>& step) {
  const std::string op(op_view);
  const std::vector<double> h(hyper_ref.begin(), hyper_ref.end());
  std::vector<bool> f;
  for (int64_t v : flags_ref) f.push_back(v != 0);
  TORCH_CHECK(bits == 32 || bits == 16 || bits == 8 || bits == 4, "nnopt::", kOp, ": bits must be 32, 16, 8 or 4, got ",
              bits);
  TORCH_CHECK(block_size >= 32 && block_size <= kMaxBlock && (block_size & (block_size - 1)) == 0, "nnopt::", kOp,
              ": block_size must be a power of two in [32, ", kMaxBlock, "], got ", block_size);
  Format fm{};
  fm.bits = int(bits);
  fm.block = block_size;
  if (bits == 8 || bits == 4) {
    const int64_t nq = int64_t(1) << bits;
    for (const auto& [t, name] : {std::pair<const Tensor&, const char*>(qmap, "qmap"), {mids, "mids"}}) {
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == 2 * nq && t.is_cpu(), "nnopt::",
                  kOp, ": ", name, " must be a contiguous float32 CPU tensor [2, ", nq, "]");
    }
    for (int r = 0; r < 2; ++r) {
      fm.qmap[r] = qmap.data_ptr<float>() + r * nq;
      build_levels(fm, mids.data_ptr<float>() + r * nq, r);
    }
  }
  const std::vector<TensorList> sts{states0, states1, states2}, scs{scales0, scales1, scales2};
  const bool masked = !masks.empty();
  double scale = 1.0;
  auto keys = [&](std::vector<QTensor>& ts) {
    for (size_t i = 0; i < ts.size(); ++i) {
      ts[i].key = uint32_t(uint64_t(seed) * 0x9E3779B1ull + uint64_t(i) * 0x85EBCA77ull);
    }
  };
  if (op == "adam_step") {
    // hyper: lr beta1 beta2 eps weight_decay l1 bias_correction1 bias_correction2_sqrt; flags: decoupled amsgrad
    // maximize
    need(h, f, 8, 3, op);
    const bool ams = f[1];
    auto ts = check_all(op, params, grads, sts, scs, {true, true, ams}, masters, masks, bits, block_size);
    double lr = h[0];
    if (!read_scalars(params, lr_tensor, grad_scale, found_inf, lr, scale)) return;
    keys(ts);
    AdamArgs a{lr, h[1], h[2], h[3], h[4], h[5], h[6], h[7], scale, f[2]};
    if (step.has_value() && !params.empty()) {
      check_scalar_tensor(kOp, "step", step, params[0].device());
      set_step(a, step->item<double>());
    }
    Context<AdamOp> ctx{make_adam<float>(lr, a), nullptr, fm, ams, false, seed >= 0};
    ctx.fn = select_math<AdamOp>(masked, h[4] != 0 ? (f[0] ? 2 : 1) : 0, ams, false);
    run_all(ctx, ts);
  } else if (op == "sgd_step") {
    // hyper: lr momentum dampening weight_decay l1; flags: nesterov maximize first_step
    need(h, f, 5, 3, op);
    const bool mom = h[1] != 0;
    auto ts = check_all(op, params, grads, sts, scs, {mom, false, false}, masters, masks, bits, block_size);
    double lr = h[0];
    if (!read_scalars(params, lr_tensor, grad_scale, found_inf, lr, scale)) return;
    keys(ts);
    const SgdArgs a{lr, h[1], h[2], h[3], h[4], scale, f[0], f[1], f[2]};
    Context<SgdOp> ctx{make_sgd<float>(lr, a), nullptr, fm, mom, false, seed >= 0};
    ctx.fn = select_math<SgdOp>(masked, h[3] != 0 ? 1 : 0, mom, false);
    run_all(ctx, ts);
  } else if (op == "adagrad_step") {
    // hyper: lr weight_decay eps l1 lr_decay_denom lr_decay; flags: maximize
    need(h, f, 6, 1, op);
    auto ts = check_all(op, params, grads, sts, scs, {true, false, false}, masters, masks, bits, block_size);
    double lr = h[0];
    if (!read_scalars(params, lr_tensor, grad_scale, found_inf, lr, scale)) return;
    keys(ts);
    AdagradArgs a{lr, h[1], h[2], h[3], h[4], scale, f[0], h[5]};
    if (step.has_value() && !params.empty()) {
      check_scalar_tensor(kOp, "step", step, params[0].device());
      set_step(a, step->item<double>());
    }
    Context<AdagradOp> ctx{make_adagrad<float>(lr, a), nullptr, fm, false, false, seed >= 0};
    ctx.fn = select_math<AdagradOp>(masked, h[1] != 0 ? 1 : 0, false, false);
    run_all(ctx, ts);
  } else if (op == "rmsprop_step") {
    // hyper: lr alpha eps weight_decay momentum l1; flags: centered maximize
    need(h, f, 6, 2, op);
    const bool mom = h[4] > 0, centered = f[0];
    auto ts = check_all(op, params, grads, sts, scs, {true, mom, centered}, masters, masks, bits, block_size);
    double lr = h[0];
    if (!read_scalars(params, lr_tensor, grad_scale, found_inf, lr, scale)) return;
    keys(ts);
    const RmspropArgs a{lr, h[1], h[2], h[3], h[4], h[5], scale, f[1]};
    Context<RmspropOp> ctx{make_rmsprop<float>(lr, a), nullptr, fm, mom, centered, seed >= 0};
    ctx.fn = select_math<RmspropOp>(masked, h[3] != 0 ? 1 : 0, mom, centered);
    run_all(ctx, ts);
  } else {
    TORCH_CHECK(false, "nnopt::", kOp, ": unknown op '", op, "' (sgd_step, adam_step, adagrad_step, rmsprop_step)");
  }
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CPU, m) { m.impl("quant_step_", &nnopt::quant_step_cpu); }
