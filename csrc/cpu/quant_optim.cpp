// CPU kernel of the optimizer steps with low-precision states (nnopt::quant_step_): 32/16/8/4-bit states.
//
// Formats, quantizer and oracle: nnopt/reference/quant_optim.py; per-element update: optim_math.h (the one shared
// with the fp32-state kernels). A work item is a run of whole quantization blocks of one tensor. Each block is
// dequantized into float arrays on the stack (L1-resident), updated by the fused step's element update,
// reduced to its new absmax and requantized: one pass over memory, no float32 copy of a state anywhere.
//
// Where the time goes (one Sapphire Rapids-class core): the codes are bounded by port 5 (permutes and compares into
// masks share it) and take the largest share (perf: codes ~40% of the kernel, the update ~30%, half of it waiting
// on p and g, dequantization ~13%). Adam's update no longer waits on the divider: its final quotient uses a refined
// reciprocal estimate (adam_loop_fast), 0.23 instead of 0.58 ns per element. Each step below trims port-5 work:
// - 8-bit dequantize: the map's four byte planes read by vpermi2b, 64 codes at a time (AVX512-VBMI); otherwise
//   8 x vpermt2ps blended by a tree of index-bit tests. 4-bit: one vpermps.
// - 8-bit quantize: a bucket of |x|'s float bits gives the candidate code and the one midpoint inside it, packed
//   in one 32-bit word (one gather from a 13-26 KB L1 table; the gather is still most of the quantizer's time),
//   then one integer compare on x's low bits. 4-bit, and maps no bucket size separates: a branch-free binary
//   search over the midpoints with permuted level tables. Either way code = #{mids < x}, the reference's
//   searchsorted, so codes are identical.
// - No per-element fix-ups: NaN codes only in blocks whose absmax flags an inf or NaN; the unsigned "never code
//   0 for x > 0" rule folded into the tables (first midpoint taken as min(mid, 0)).
// - The update loop is specialised for the plain step (no grad scale: the division by 1 folds away) and touches
//   only the slots the optimizer uses; the next block's bytes are prefetched while this one computes.
// Without AVX-512 the same search runs in scalar code.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
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
  static constexpr bool uses(int k, bool a, bool) { return k == 0 && a; }
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
  static constexpr bool uses(int k, bool a, bool) { return k < 2 || a; }
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
  static constexpr bool uses(int k, bool, bool) { return k == 0; }
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
  static constexpr bool uses(int k, bool a, bool b) { return k == 0 || (k == 1 && a) || (k == 2 && b); }
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

// Plain: grad scale 1, l1 0, no maximize (the common step): the local scalars then hold literal 1, 0 and 1, so the
// compiler folds the per-element division by the grad scale away (as fused_optim.cpp's math_loop does); that
// division is a quarter of the divider's work in an Adam step, which is what bounds it. Unused slots are neither
// read nor written. 512-bit vectors (the build's default prefers 256): the block is in L1.
template <typename Op, typename F, bool Plain>
__attribute__((target("prefer-vector-width=512"))) void math_loop(
    int64_t n, float* __restrict p, const float* __restrict g, float* __restrict s0, float* __restrict s1,
    float* __restrict s2, const uint8_t* __restrict mask, const typename Op::Scalars& hs) {
  constexpr bool u0 = Op::uses(0, F::a, F::b), u1 = Op::uses(1, F::a, F::b), u2 = Op::uses(2, F::a, F::b);
  typename Op::Scalars h = hs;
  if constexpr (Plain) {
    if constexpr (requires { h.grad_scale; }) h.grad_scale = 1.0f;
    if constexpr (requires { h.l1_thr; }) h.l1_thr = 0.0f;
    if constexpr (requires { h.neg; }) h.neg = 1.0f;
  }
  const F f{};
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = F::masked ? mask[i] != 0 : true;
    float pi = p[i], a = 0.0f, b = 0.0f, c = 0.0f;
    if constexpr (u0) a = s0[i];
    if constexpr (u1) b = s1[i];
    if constexpr (u2) c = s2[i];
    Op::update(pi, g[i], a, b, c, keep, h, f);
    p[i] = pi;
    if constexpr (u0) s0[i] = a;
    if constexpr (u1) s1[i] = b;
    if constexpr (u2) s2[i] = c;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NNOPT_ADAM_FAST 1
// Adam's element loop for quantized (8/4/16-bit) states: adam_update's operations in the same order (the new
// exp_avg and exp_avg_sq are bit for bit the exact ones, so their codes are the reference's), except the final
// quotient: sqrt(v) * (1 / bias_correction2_sqrt) + eps, then times a reciprocal estimate refined by one Newton
// step, instead of two correctly rounded divisions. The update then differs from the exact one by a few ulp (its
// relative error is below 1e-6; the states' quantization error is ~1e-2), and the divider, which bounded the
// exact loop (0.58 against 0.23 ns per element on one Sapphire Rapids-class core), does only the sqrt. Lanes whose
// denominator is zero, subnormal, inf or NaN take the exact division (never, in practice).
template <typename F, bool Plain>
__attribute__((target("prefer-vector-width=512"))) void adam_loop_fast(
    int64_t n, float* __restrict p, const float* __restrict g, float* __restrict s0, float* __restrict s1,
    float* __restrict s2, const uint8_t* __restrict mask, const AdamScalars<float>& h) {
  const bool small = h.w1 < 0.5f && h.w1 > -0.5f;  // lerp's two forms (see optim_math.h)
  const __m512 w = _mm512_set1_ps(small ? h.w1 : h.w1 - 1.0f), decay = _mm512_set1_ps(h.decay),
               wd = _mm512_set1_ps(h.weight_decay), beta2 = _mm512_set1_ps(h.beta2),
               omb2 = _mm512_set1_ps(h.one_minus_beta2), inv_bc2 = _mm512_set1_ps(1.0f / h.bc2_sqrt),
               eps = _mm512_set1_ps(h.eps), neg_step = _mm512_set1_ps(h.neg_step), one = _mm512_set1_ps(1.0f),
               scale = _mm512_set1_ps(h.grad_scale), neg = _mm512_set1_ps(h.neg),
               thr = _mm512_set1_ps(h.l1_thr), nthr = _mm512_set1_ps(-h.l1_thr),
               lo_ok = _mm512_set1_ps(std::numeric_limits<float>::min()),
               hi_ok = _mm512_set1_ps(std::numeric_limits<float>::max());
  auto body = [&](int64_t i, __mmask16 lanes) {
    __m512 pi = _mm512_maskz_loadu_ps(lanes, p + i), gi = _mm512_maskz_loadu_ps(lanes, g + i);
    __m512 m = _mm512_maskz_loadu_ps(lanes, s0 + i), v = _mm512_maskz_loadu_ps(lanes, s1 + i), vmax;
    if constexpr (F::a) vmax = _mm512_maskz_loadu_ps(lanes, s2 + i);
    __mmask16 keep = lanes;
    if constexpr (F::masked) {
      keep = _mm_test_epi8_mask(_mm_maskz_loadu_epi8(lanes, mask + i), _mm_set1_epi8(-1));
    }
    if constexpr (!Plain) gi = _mm512_mul_ps(_mm512_div_ps(gi, scale), neg);
    if constexpr (F::masked) gi = _mm512_maskz_mov_ps(keep, gi);
    if constexpr (F::wd == 2) pi = _mm512_mul_ps(pi, decay);
    if constexpr (F::wd == 1) gi = _mm512_fmadd_ps(wd, pi, gi);
    m = _mm512_fmadd_ps(w, _mm512_sub_ps(gi, m), small ? m : gi);
    v = _mm512_fmadd_ps(_mm512_mul_ps(omb2, gi), gi, _mm512_mul_ps(v, beta2));
    __m512 vd = v;
    if constexpr (F::a) {  // torch.maximum(vmax, v): vmax where vmax > v or vmax is NaN
      const __mmask16 take = _mm512_cmp_ps_mask(vmax, v, _CMP_GT_OQ) | _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
      vd = _mm512_mask_mov_ps(v, take, vmax);
      vmax = vd;
    }
    const __m512 d = _mm512_fmadd_ps(_mm512_sqrt_ps(vd), inv_bc2, eps);
    const __m512 num = _mm512_mul_ps(neg_step, m);
    const __m512 r0 = _mm512_rcp14_ps(d);
    __m512 q = _mm512_mul_ps(num, _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(d, r0, one), r0));
    const __mmask16 odd = _mm512_cmp_ps_mask(d, lo_ok, _CMP_NGE_UQ) | _mm512_cmp_ps_mask(d, hi_ok, _CMP_NLE_UQ);
    if (odd) [[unlikely]] q = _mm512_mask_div_ps(q, odd, num, d);
    pi = _mm512_add_ps(pi, q);
    if constexpr (F::l1 && !Plain) pi = _mm512_sub_ps(pi, _mm512_min_ps(thr, _mm512_max_ps(nthr, pi)));
    if constexpr (F::masked) {
      pi = _mm512_maskz_mov_ps(keep, pi), m = _mm512_maskz_mov_ps(keep, m), v = _mm512_maskz_mov_ps(keep, v);
      if constexpr (F::a) vmax = _mm512_maskz_mov_ps(keep, vmax);
    }
    _mm512_mask_storeu_ps(p + i, lanes, pi);
    _mm512_mask_storeu_ps(s0 + i, lanes, m);
    _mm512_mask_storeu_ps(s1 + i, lanes, v);
    if constexpr (F::a) _mm512_mask_storeu_ps(s2 + i, lanes, vmax);
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) body(i, 0xffff);
  if (i < n) body(i, __mmask16((1u << (n - i)) - 1));
}
#endif

// The element loop for one flag combination; fast: Adam with quantized states (adam_loop_fast).
template <typename Op, bool P, bool M, int W, bool A, bool B>
MathFn<Op> leaf(bool fast) {
  using F = StaticFlags<M, W, A, B>;
#if defined(NNOPT_ADAM_FAST)
  if constexpr (std::is_same_v<Op, AdamOp>) {
    if (fast) return &adam_loop_fast<F, P>;
  }
#endif
  (void)fast;
  return &math_loop<Op, F, P>;
}

template <typename Op, bool P, bool M, int W, bool A>
MathFn<Op> select_b(bool b, bool fast) {
  if constexpr (Op::kUsesB) {
    if (b) return leaf<Op, P, M, W, A, true>(fast);
  }
  return leaf<Op, P, M, W, A, false>(fast);
}

template <typename Op, bool P, bool M, int W>
MathFn<Op> select_a(bool a, bool b, bool fast) {
  if constexpr (Op::kUsesA) {
    if (a) return select_b<Op, P, M, W, true>(b, fast);
  }
  return select_b<Op, P, M, W, false>(b, fast);
}

template <typename Op, bool P, bool M>
MathFn<Op> select_wd(int wd, bool a, bool b, bool fast) {
  if constexpr (Op::kMaxWd >= 2) {
    if (wd == 2) return select_a<Op, P, M, 2>(a, b, fast);
  }
  if (wd == 1) return select_a<Op, P, M, 1>(a, b, fast);
  return select_a<Op, P, M, 0>(a, b, fast);
}

template <typename Op, bool P>
MathFn<Op> select_plain(bool masked, int wd, bool a, bool b, bool fast) {
  return masked ? select_wd<Op, P, true>(wd, a, b, fast) : select_wd<Op, P, false>(wd, a, b, fast);
}

// plain: grad scale 1, l1 0 and no maximize (see math_loop). fast: the state width is quantized (8, 4 or 16 bits).
template <typename Op>
MathFn<Op> select_math(bool plain, bool masked, int wd, bool a, bool b, bool fast) {
  return plain ? select_plain<Op, true>(masked, wd, a, b, fast) : select_plain<Op, false>(masked, wd, a, b, fast);
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
  // Per row, byte j of every map value (planes[row][j][code]): the 8-bit dequantizer's vpermi2b tables.
  alignas(64) uint8_t planes[2][4][256];
  // Per row, the 8-bit quantizer's bucket tables (null: binary search).
  std::shared_ptr<const struct Buckets> buckets[2];
};

// The 8-bit quantizer without a search: |x|'s float bits, exponent and top m mantissa bits, name a bucket (one
// per sign; |x| < 2^-24 share the first, |x| >= 2 and inf/NaN the last); m is the least for which no bucket holds
// more than one midpoint, so code = code[b] + (mid[b] < x), code[b] = #{mids < the bucket's lowest |x|}: the same
// count as the search, ties included. One gather: word[b] = code[b] | thr[b] << 8, where thr compares the bucket's
// midpoint in x's low 23 - m bits (every x of a middle bucket shares the rest with the midpoint): key(x) =
// 2^23 | low bits (complemented for negative x, which turns "mid < x" into "|mid| > |x|"), and mid < x iff
// thr < key(x); thr = 2^24 - 1 where the bucket holds no midpoint. In the first bucket key(x) = |x|'s bits while
// they fit in the low bits (2^23 | low bits above), so a midpoint there must fit too (the unsigned map's 0 does).
struct Buckets {
  int m = 0;
  int32_t nb = 0;               // buckets per sign
  std::vector<uint32_t> word;   // [2 * nb], negative x from nb on
};
constexpr int32_t kBucketE0 = 127 - 24;
constexpr uint32_t kNoMid = (1u << 24) - 1;

// nullptr when no m <= 8 separates the midpoints (the tables then stay a binary search).
std::shared_ptr<const Buckets> build_buckets(const float* mids, int nmid) {
  auto count = [&](float x) { return int32_t(std::lower_bound(mids, mids + nmid, x) - mids); };
  for (int m = 4; m <= 8; ++m) {
    auto b = std::make_shared<Buckets>();
    b->m = m;
    b->nb = 2 + ((128 - kBucketE0) << m);
    b->word.assign(2 * b->nb, 0);
    const uint32_t low = (1u << (23 - m)) - 1;
    bool ok = true;
    for (int32_t k = 0; k < b->nb && ok; ++k) {
      uint32_t lo, hi;  // |x| bit range of bucket k
      if (k == 0) {
        lo = 0, hi = (uint32_t(kBucketE0) << 23) - 1;
      } else if (k == b->nb - 1) {
        lo = 128u << 23, hi = 0x7f800000u;
      } else {
        lo = uint32_t(k - 1 + (kBucketE0 << m)) << (23 - m), hi = lo + low;
      }
      for (int sg = 0; sg < 2; ++sg) {
        const float xlo = sg ? -float_of(hi) : float_of(lo), xhi = sg ? -float_of(lo) : float_of(hi);
        const int32_t clo = count(xlo), chi = count(xhi);
        uint32_t thr = kNoMid;
        if (chi - clo > 1) {
          ok = false;
        } else if (chi > clo) {
          const uint32_t mb = bits_of(mids[clo]) & 0x7fffffffu;  // |mid|, in [lo, hi] (its sign is x's)
          if (k == 0) {
            ok = sg == 0 && mb <= low;  // key(x) = |x|'s bits there
            thr = mb;
          } else if (k == b->nb - 1) {
            ok = false;
          } else {
            thr = (1u << 23) | (sg ? low - (mb - lo) : mb - lo);
          }
        }
        b->word[sg * b->nb + k] = uint32_t(clo) | thr << 8;
      }
    }
    if (ok) return b;
  }
  return nullptr;
}

// Tables are built once per map (a few hundred microseconds) and reused while the maps stay the same.
std::shared_ptr<const Buckets> cached_buckets(const float* mids, int nmid) {
  static std::mutex mu;
  static std::vector<std::pair<std::vector<float>, std::shared_ptr<const Buckets>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& [key, b] : cache) {
    if (int(key.size()) == nmid && std::memcmp(key.data(), mids, nmid * sizeof(float)) == 0) return b;
  }
  auto b = build_buckets(mids, nmid);
  if (cache.size() >= 8) cache.erase(cache.begin());
  cache.emplace_back(std::vector<float>(mids, mids + nmid), b);
  return b;
}

// The unsigned row's first midpoint is taken as min(mid, 0): then #{mids < x} >= 1 for every x > 0, which is the
// reference's rule that a positive value never takes the code of 0, with no per-element fix-up (x <= 0 keeps 0).
void build_levels(Format& fm, const float* mids_in, int row) {
  const int nq = 1 << fm.bits;
  float mids_row[256];
  std::memcpy(mids_row, mids_in, nq * sizeof(float));
  if (row == 1) mids_row[0] = std::min(mids_row[0], 0.0f);
  fm.buckets[row] = fm.bits == 8 ? cached_buckets(mids_row, nq - 1) : nullptr;
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
// table[idx] for a table of up to 256 floats (entries beyond its length are never indexed). Above 32 entries the
// two halves are looked up and one blended by the next index bit: a vptestmd per level of the tree (shared by the
// whole level once inlined) instead of a compare per 32-entry slice, since masks and permutes share port 5.
template <int N>
inline __m512 lookup(const float* table, __m512i idx) {
  if constexpr (N == 1) {
    return _mm512_set1_ps(table[0]);
  } else if constexpr (N <= 16) {
    return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(table));
  } else if constexpr (N == 32) {
    return _mm512_permutex2var_ps(_mm512_loadu_ps(table), idx, _mm512_loadu_ps(table + 16));
  } else {
    const __m512 lo = lookup<N / 2>(table, idx), hi = lookup<N / 2>(table + N / 2, idx);
    return _mm512_mask_mov_ps(lo, _mm512_test_epi32_mask(idx, _mm512_set1_epi32(N / 2)), hi);
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
  return pos;
}

// 8-bit codes by the bucket tables (see Buckets). Constants are hoisted by the caller (the byte stores of the
// codes would otherwise make the compiler reload the table's fields every iteration).
struct BucketConsts {
  const uint32_t* word;
  __m512i shift, off, top, nb, low;
  explicit BucketConsts(const Buckets* bk)  // null: unused (the binary search runs)
      : word(bk ? bk->word.data() : nullptr), shift(_mm512_set1_epi32(bk ? 23 - bk->m : 0)),
        off(_mm512_set1_epi32(bk ? (kBucketE0 << bk->m) - 1 : 0)), top(_mm512_set1_epi32(bk ? bk->nb - 1 : 0)),
        nb(_mm512_set1_epi32(bk ? bk->nb : 0)), low(_mm512_set1_epi32(bk ? (1 << (23 - bk->m)) - 1 : 0)) {}
};

inline __m512i bucket16(const BucketConsts& bc, __m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  const __m512i raw = _mm512_srlv_epi32(a, bc.shift);
  __m512i k = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(raw, bc.off), _mm512_setzero_si512()), bc.top);
  const __mmask16 neg = _mm512_movepi32_mask(u);
  k = _mm512_mask_add_epi32(k, neg, k, bc.nb);
  const __m512i w = _mm512_i32gather_epi32(k, bc.word, 4);
  // key: low bits, complemented for negative x (ternary-logic 0x28: (u ^ sign) & low, sign = u >> 31
  // arithmetic), | 2^23 once |x| leaves them.
  const __m512i key = _mm512_or_si512(
      _mm512_ternarylogic_epi32(u, _mm512_srai_epi32(u, 31), bc.low, 0x28),
      _mm512_slli_epi32(_mm512_min_epu32(raw, _mm512_set1_epi32(1)), 23));
  return _mm512_mask_add_epi32(w, _mm512_cmplt_epu32_mask(_mm512_srli_epi32(w, 8), key), w, _mm512_set1_epi32(1));
}

// Codes of src[0:n) * r, 16 at a time; returns how many were done. special: the block holds an inf or a NaN, so
// x may be NaN (inf * 0 too), whose code is the last one (the reference's searchsorted puts NaN past every mid).
template <int Bits>
int64_t codes16(const Format& fm, int row, const float* __restrict src, float r, bool special, int64_t n,
                uint8_t* __restrict codes) {
  const __m512 vr = _mm512_set1_ps(r);
  const bool fast = Bits == 8 && fm.buckets[row];
  const BucketConsts bc(fast ? fm.buckets[row].get() : nullptr);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + i), vr);
    __m512i c = fast ? bucket16(bc, x) : search16<Bits>(fm, row, x);
    if (special) {
      c = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32((1 << Bits) - 1));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
  }
  return i;
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

#if defined(__AVX512VBMI__)
// 8-bit codes -> q[code] * a, 64 at a time; returns how many were done. Each byte of the float is looked up in its
// own 256-entry byte plane (two vpermi2b and a blend on the code's top bit), then the four byte vectors are
// interleaved by in-lane unpacks. The codes are first permuted (a 4 x 4 transpose of 4-byte groups) so that the
// unpacks' lane order comes out sequential. 17 port-5 uops per 64 values, against 44 for float permutes.
inline int64_t dequant64(const uint8_t (*planes)[256], const uint8_t* __restrict c, float a, int64_t n,
                         float* __restrict dst) {
  alignas(64) static const uint8_t kOrder[64] = {
      0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39,
      52, 53, 54, 55, 8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31,
      44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i order = _mm512_load_si512(kOrder);
  __m512i t[4][4];
  for (int j = 0; j < 4; ++j) {
    for (int k = 0; k < 4; ++k) t[j][k] = _mm512_load_si512(planes[j] + 64 * k);
  }
  const __m512 va = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i idx = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(c + i));
    const __mmask64 top = _mm512_movepi8_mask(idx);
    __m512i b[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i lo = _mm512_permutex2var_epi8(t[j][0], idx, t[j][1]);
      const __m512i hi = _mm512_permutex2var_epi8(t[j][2], idx, t[j][3]);
      b[j] = _mm512_mask_mov_epi8(lo, top, hi);
    }
    const __m512i w_lo = _mm512_unpacklo_epi8(b[0], b[1]), w_hi = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i u_lo = _mm512_unpacklo_epi8(b[2], b[3]), u_hi = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512i v[4] = {_mm512_unpacklo_epi16(w_lo, u_lo), _mm512_unpackhi_epi16(w_lo, u_lo),
                          _mm512_unpacklo_epi16(w_hi, u_hi), _mm512_unpackhi_epi16(w_hi, u_hi)};
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(dst + i + 16 * k, _mm512_mul_ps(_mm512_castsi512_ps(v[k]), va));
  }
  return i;
}
#endif

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
#if defined(__AVX512VBMI__)
    i = dequant64(fm.planes[sgn ? 0 : 1], c, a, n, dst);
#endif
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
  const bool special = amax >= 0x7f800000u;
  i = fm.bits == 8 ? codes16<8>(fm, row, src, r, special, n, codes) : codes16<4>(fm, row, src, r, special, n, codes);
#endif
  for (; i < n; ++i) codes[i] = uint8_t(search_scalar(fm, row, src[i] * r));
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

inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// The next block's bytes, requested while this block computes: the step is compute-bound per block, so without
// this each block would wait on its loads before any compute starts (the hardware prefetcher does not run far
// enough ahead of a loop that spends most of its time on permutes).
inline void prefetch_block(const QTensor& t, int64_t e0, int64_t m, const Format& fm, size_t psize) {
  if (t.master) {
    prefetch_lines(t.master + e0, m * 4);
  } else {
    prefetch_lines(static_cast<const char*>(t.param) + e0 * psize, m * int64_t(psize));
  }
  prefetch_lines(static_cast<const char*>(t.grad) + e0 * psize, m * int64_t(psize));
  if (t.mask) prefetch_lines(t.mask + e0, m);
  for (int k = 0; k < 3; ++k) {
    if (!t.s[k]) continue;
    if (fm.bits == 8) {
      prefetch_lines(static_cast<const uint8_t*>(t.s[k]) + e0, m);
    } else if (fm.bits == 4) {
      prefetch_lines(static_cast<const uint8_t*>(t.s[k]) + e0 / 2, (m + 1) / 2);
    } else {
      prefetch_lines(static_cast<const char*>(t.s[k]) + e0 * (fm.bits / 8), m * (fm.bits / 8));
    }
  }
}

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
    if (e0 + m < b + n) prefetch_block(t, e0 + m, std::min<int64_t>(fm.block, b + n - e0 - m), fm, sizeof(P));
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

bool plain(double scale, double l1, bool maximize) { return scale == 1.0 && l1 == 0.0 && !maximize; }

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
      for (int64_t c = 0; c < nq; ++c) {
        for (int j = 0; j < 4; ++j) fm.planes[r][j][c] = uint8_t(bits_of(fm.qmap[r][c]) >> (8 * j));
      }
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
    ctx.fn = select_math<AdamOp>(plain(scale, h[5], f[2]), masked, h[4] != 0 ? (f[0] ? 2 : 1) : 0, ams, false,
                                     bits < 32);
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
    ctx.fn = select_math<SgdOp>(plain(scale, h[4], f[1]), masked, h[3] != 0 ? 1 : 0, mom, false,
                                     bits < 32);
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
    ctx.fn = select_math<AdagradOp>(plain(scale, h[3], f[0]), masked, h[1] != 0 ? 1 : 0, false, false,
                                     bits < 32);
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
    ctx.fn = select_math<RmspropOp>(plain(scale, h[5], f[1]), masked, h[3] != 0 ? 1 : 0, mom, centered,
                                     bits < 32);
    run_all(ctx, ts);
  } else {
    TORCH_CHECK(false, "nnopt::", kOp, ": unknown op '", op, "' (sgd_step, adam_step, adagrad_step, rmsprop_step)");
  }
}

}  // namespace
}  // namespace nnopt

TORCH_LIBRARY_IMPL(nnopt, CPU, m) { m.impl("quant_step_", &nnopt::quant_step_cpu); }
