// CPU kernels of the block-sparse masked linear layer (nnopt::masked_linear, masked_linear_dx, masked_linear_dw).
//
// Math (oracle: nnopt/reference/masked_linear.py; conventions: csrc/ops.cpp; layout: nnopt/nn/layout.py), with
// Wm = where(mask, W, 0) — a select, so masked weights that are NaN or Inf are ignored:
//   y  [M, N] = x Wmᵀ + b       walks the block rows (CSR)
//   dx [M, K] = dy Wm           walks the block columns (CSC; full[t_perm[q]] is entry q's flag)
//   dW [N, K] = (dyᵀ x) ⊙ mask  listed tiles only; every other entry written as exact 0
// Only the listed block_n × block_k tiles are read; edge tiles are clipped to the matrix.
//
// y and dx share one panel product. A (x for y, dy for dx) is packed into m-tiles of R rows, depth-major ([K][R]
// per m-tile, each built by the first item that needs it), so the micro-kernel reads R adjacent values per step. A work item is (block row
// j, a range of m-tiles) for y and (block column, a range of m-tiles) for dx: it packs the item's listed tiles of
// Wm into a thread-local panel — for y transposed, [block_k][BP] per tile, for dx as stored, [block_n][BP] per
// tile, BP = the output width rounded up to whole vectors, zero padded, converted to the compute type — then runs
// the micro-kernel over its m-tiles. The micro-kernel keeps R rows × NV vectors of outputs (R × NV <= 24 zmm:
// 16×1, 12×2, 8×3, 6×4) in registers across every tile of the panel: per step of depth, NV vector loads of the
// panel, R broadcasts of A, R × NV FMAs; the result (plus bias) is stored once. Outputs wider than 4 vectors
// (block_n > 64 in float32) are cut into chunks of 4 vectors. While an item computes, it prefetches the tiles of W
// its thread's next item will pack (each row of a tile is in its own page: packing from memory stalls otherwise).
// dW: x is packed once into one slab [M][BP] per block column that holds a tile. An item is one block row (split
// into groups of rows when block rows are few): it packs its rows of dy as [M][rows], then per listed tile and
// group of R rows, R × NV accumulators reduce over all M (broadcast dy[m, row], vector loads of the x slab); the
// tile is written (selected by the mask unless full) and the gaps between tiles are zero-filled, so each entry of
// dW is written at most once. A large dW is a mapping (mapped_dw): fresh (zeroed by the OS: only its tiles are
// written; transparent huge pages cut its page faults) or recycled from an earlier dW (no faults; the gaps are
// scanned and cleared where not zero).
// Items are pulled from an atomic counter by the threads of one at::parallel_for (tiles per block row vary).
//
// Compute types: float32 for float32, bfloat16 and float16 (x/dy converted up front, weights converted while
// packing, results converted back), float64 for float64. AVX-512 (F, BW, VL) intrinsics when the build targets
// them (the FMAs are explicit: the build disables contraction); otherwise portable vectors of plain loops.
//
// Measured on 2 Zen 4 cores (x [256, 4096], W [4096, 4096], fp32, 32×32 tiles): ~85 GFLOP/s per core on the listed
// tiles at 90% block sparsity, ~95-105 dense — MKL's dense sgemm runs at ~90 here.

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "nnopt/fresh_memory.h"
#include "nnopt/masked_linear_checks.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NNOPT_ML_AVX512 1
#include <immintrin.h>
#else
#define NNOPT_ML_AVX512 0
#endif

namespace nnopt {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------------------
// One 64-byte vector of the compute type C: W lanes; load_n / store_n touch only the first n lanes.

template <typename C>
struct Vec;

#if NNOPT_ML_AVX512
template <>
struct Vec<float> {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p); }
  static T set1(float a) { return _mm512_set1_ps(a); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static void store_n(float* p, T v, int n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v); }
};

template <>
struct Vec<double> {
  using T = __m512d;
  static constexpr int W = 8;
  static T zero() { return _mm512_setzero_pd(); }
  static T load(const double* p) { return _mm512_loadu_pd(p); }
  static T load_n(const double* p, int n) { return _mm512_maskz_loadu_pd(__mmask8((1u << n) - 1), p); }
  static T set1(double a) { return _mm512_set1_pd(a); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_pd(a, b, c); }
  static T add(T a, T b) { return _mm512_add_pd(a, b); }
  static void store(double* p, T v) { _mm512_storeu_pd(p, v); }
  static void store_n(double* p, T v, int n) { _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1), v); }
};
#else
template <typename C>
struct Vec {
  static constexpr int W = 64 / sizeof(C);
  struct T {
    C v[W];
  };
  static T zero() { return set1(C(0)); }
  static T load(const C* p) { return load_n(p, W); }
  static T load_n(const C* p, int n) {
    T r;
#pragma omp simd
    for (int i = 0; i < W; ++i) r.v[i] = i < n ? p[i] : C(0);
    return r;
  }
  static T set1(C a) {
    T r;
#pragma omp simd
    for (int i = 0; i < W; ++i) r.v[i] = a;
    return r;
  }
  static T fma(T a, T b, T c) {
#pragma omp simd
    for (int i = 0; i < W; ++i) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
      c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);  // one rounding, like the AVX-512 path
#else
      c.v[i] += a.v[i] * b.v[i];
#endif
    }
    return c;
  }
  static T add(T a, T b) {
#pragma omp simd
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static void store(C* p, T v) { store_n(p, v, W); }
  static void store_n(C* p, T v, int n) {
    for (int i = 0; i < n; ++i) p[i] = v.v[i];
  }
};
#endif

// Register block: R <= rows_for(NV) rows × NV vectors of accumulators (24 accumulators at most).
constexpr int kMaxNV = 4;
constexpr int rows_for(int nv) { return nv == 1 ? 16 : nv == 2 ? 12 : nv == 3 ? 8 : 6; }

template <typename C>
constexpr int64_t chunk_cols() {
  return int64_t(kMaxNV) * Vec<C>::W;
}

using masked_linear_checks::ceil_div;

// ---------------------------------------------------------------------------------------------------------
// Panel product (y and dx). A (x or dy) is packed once per call into m-tiles of R rows, depth-major: Ap[t] is
// [K][R], so one step of depth reads R adjacent values. (Read in place, the R rows sit K apart; with K a multiple
// of 1024 floats they all map to one set of the 8-way L1 and evict each other: 45 instead of 95 GFLOP/s.)
// One segment per tile of the panel: its depth pairs Ap's columns from `a` on with the panel rows from `p` on.

struct Seg {
  int64_t a, p, depth;
};

// Y[r, 0:ncols] = bias[0:ncols] + Σ_seg Σ_d Ap[(seg.a + d)·R + r] · P[seg.p + d·ldp, 0:ncols] for r < rows <= R.
// P, Y and bias point at the block's first column; ncols <= NV·W, P is zero padded up to NV·W.
template <typename C, int R, int NV>
void panel_kernel(const C* __restrict Ap, const Seg* segs, int64_t nseg, const C* __restrict P, int64_t ldp,
                  C* __restrict Y, int64_t ldy, int rows, int64_t ncols, const C* __restrict bias) {
  using V = Vec<C>;
  constexpr int W = V::W;
  typename V::T acc[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  }
  for (int64_t s = 0; s < nseg; ++s) {
    const C* __restrict a = Ap + segs[s].a * R;
    const C* __restrict p = P + segs[s].p;
    const int64_t depth = segs[s].depth;
    // The next tile's run of A (depth × R values, contiguous) starts elsewhere, often out of L2: the hardware
    // prefetcher only notices it after the first miss, so fetch it while this tile computes, one line per step of
    // depth (issued as one burst before the tile, the prefetches stalled on full fill buffers: ~20% of the
    // kernel's time at batch 256). Lines beyond `depth` (only with float64) go after the tile.
    const char* an = s + 1 < nseg ? reinterpret_cast<const char*>(Ap + segs[s + 1].a * R) : nullptr;
    const int64_t lines = an ? ceil_div(segs[s + 1].depth * R * int64_t(sizeof(C)), int64_t(64)) : 0;
    for (int64_t d = 0; d < depth; ++d, p += ldp, a += R) {
      if (d < lines) __builtin_prefetch(an + 64 * d);
      typename V::T b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = V::load(p + v * W);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) {
        const typename V::T ar = V::set1(a[r]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(ar, b[v], acc[r][v]);
      }
    }
    for (int64_t q = depth; q < lines; ++q) __builtin_prefetch(an + 64 * q);
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t c0 = int64_t(v) * W;
    const int n = int(std::min<int64_t>(W, ncols - c0));
    if (n <= 0) break;
    const typename V::T bv = bias != nullptr ? V::load_n(bias + c0, n) : V::zero();
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;
      const typename V::T out = bias != nullptr ? V::add(acc[r][v], bv) : acc[r][v];
      if (n == W) {
        V::store(Y + r * ldy + c0, out);
      } else {
        V::store_n(Y + r * ldy + c0, out, n);
      }
    }
  }
}

template <typename C>
using PanelFn = void (*)(const C*, const Seg*, int64_t, const C*, int64_t, C*, int64_t, int, int64_t, const C*);

template <typename C, int NV, int... I>
constexpr std::array<PanelFn<C>, sizeof...(I)> panel_table(std::integer_sequence<int, I...>) {
  return {{&panel_kernel<C, I + 1, NV>...}};
}

// The kernel for nv vectors (1..kMaxNV) and R (1..rows_for(nv)) rows.
template <typename C>
PanelFn<C> panel_fn(int nv, int R) {
  static constexpr auto t1 = panel_table<C, 1>(std::make_integer_sequence<int, rows_for(1)>{});
  static constexpr auto t2 = panel_table<C, 2>(std::make_integer_sequence<int, rows_for(2)>{});
  static constexpr auto t3 = panel_table<C, 3>(std::make_integer_sequence<int, rows_for(3)>{});
  static constexpr auto t4 = panel_table<C, 4>(std::make_integer_sequence<int, rows_for(4)>{});
  switch (nv) {
    case 1:
      return t1[R - 1];
    case 2:
      return t2[R - 1];
    case 3:
      return t3[R - 1];
    default:
      return t4[R - 1];
  }
}

// The m-tile height for M rows and outputs `width` wide: the register block of a full chunk, lowered so the
// last m-tile wastes little (M = 13 with 12-row blocks: two tiles of 7, not 12 + 1 padded to 12).
template <typename C>
int64_t tile_rows(int64_t M, int64_t width) {
  const int64_t rmax = rows_for(int(std::clamp<int64_t>(ceil_div(width, Vec<C>::W), 1, kMaxNV)));
  return M <= 0 ? rmax : ceil_div(M, ceil_div(M, rmax));
}

// Y[t·R : t·R + R, 0:ncols] (clipped to M rows) for m-tiles t of [t_begin, t_end), chunk by chunk of columns;
// before(t) runs before m-tile t is read, after() after each kernel call.
template <typename C, typename Before, typename After>
void run_panel(const C* Ap, int64_t R, int64_t depth_total, int64_t M, int64_t t_begin, int64_t t_end,
               const Seg* segs, int64_t nseg, const C* P, int64_t ldp, int64_t ncols, C* Y, int64_t ldy,
               const C* bias, const Before& before, const After& after) {
  constexpr int64_t W = Vec<C>::W;
  for (int64_t c0 = 0; c0 < ncols; c0 += chunk_cols<C>()) {
    const int64_t nc = std::min(chunk_cols<C>(), ncols - c0);
    const PanelFn<C> fn = panel_fn<C>(int(ceil_div(nc, W)), int(R));
    for (int64_t t = t_begin; t < t_end; ++t) {
      if (nseg > 0) before(t);  // an empty panel (bias only) reads no A
      fn(Ap + t * depth_total * R, segs, nseg, P + c0, ldp, Y + t * R * ldy + c0, ldy, int(std::min(R, M - t * R)),
         nc, bias != nullptr ? bias + c0 : nullptr);
      after();
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Packing one tile (rows × cols of W at w, row stride ldw; the mask at the same offsets) into the compute type,
// masked entries selected to 0 (a select: NaN weights under the mask never reach the product), zero padded.
// With AVX-512: masked loads (lanes past the tile and masked entries are never read, so they cannot fault or
// carry a NaN), converted in registers, and W × W in-register transposes for the transposed panels.

template <typename C, typename S>
inline C to_compute(S v) {
  return static_cast<C>(static_cast<std::conditional_t<std::is_same_v<C, double>, double, float>>(v));
}

#if NNOPT_ML_AVX512
// The lanes of the first n (1..16) entries, less those whose mask byte is 0 unless the tile is full.
inline __mmask16 row_lanes(int n, const bool* m, bool full) {
  const __mmask16 k = __mmask16((1u << n) - 1);
  if (full) return k;
  const __m128i b = _mm_maskz_loadu_epi8(k, m);
  return _mm_test_epi8_mask(b, b);
}

inline __m512 load_row(const float* w, __mmask16 k) { return _mm512_maskz_loadu_ps(k, w); }
inline __m512 load_row(const c10::BFloat16* w, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_row(const c10::Half* w, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, w)); }
inline __m512d load_row(const double* w, __mmask16 k) { return _mm512_maskz_loadu_pd(__mmask8(k), w); }

inline void transpose(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // t[2i], t[2i+1]: pairs of rows 2i, 2i+1, interleaved per 128-bit lane
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: column 4L + c of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {  // a 4 × 4 transpose of 128-bit lanes
    const __m512 p = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), q = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 s = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 v = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(p, s, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(p, s, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(q, v, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(q, v, 0xDD);
  }
}

inline void transpose(__m512d r[8]) {
  __m512d t[8];
  for (int i = 0; i < 4; ++i) {  // t[2i + c], lane L: column 2L + c of rows 2i, 2i+1
    t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
  }
  for (int c = 0; c < 2; ++c) {
    const __m512d p = _mm512_shuffle_f64x2(t[c], t[2 + c], 0x44), q = _mm512_shuffle_f64x2(t[c], t[2 + c], 0xEE);
    const __m512d s = _mm512_shuffle_f64x2(t[4 + c], t[6 + c], 0x44);
    const __m512d v = _mm512_shuffle_f64x2(t[4 + c], t[6 + c], 0xEE);
    r[c] = _mm512_shuffle_f64x2(p, s, 0x88);
    r[2 + c] = _mm512_shuffle_f64x2(p, s, 0xDD);
    r[4 + c] = _mm512_shuffle_f64x2(q, v, 0x88);
    r[6 + c] = _mm512_shuffle_f64x2(q, v, 0xDD);
  }
}
#endif

// dst[c·ldp + r] = Wm[r, c] for r < rows, c < cols; dst[c·ldp + r] = 0 for rows <= r < ldp (ldp: whole vectors).
template <typename C, typename S>
void pack_transposed(const S* __restrict w, const bool* __restrict mask, int64_t ldw, int64_t rows, int64_t cols,
                     bool full, C* __restrict dst, int64_t ldp) {
#if NNOPT_ML_AVX512
  using V = Vec<C>;
  constexpr int W = V::W;
  for (int64_t r0 = 0; r0 < ldp; r0 += W) {
    for (int64_t c0 = 0; c0 < cols; c0 += W) {
      const int n = int(std::min<int64_t>(W, cols - c0));
      typename V::T v[W];
      for (int i = 0; i < W; ++i) {
        const int64_t off = (r0 + i) * ldw + c0;
        v[i] = r0 + i < rows ? load_row(w + off, row_lanes(n, mask + off, full)) : V::zero();
      }
      transpose(v);
      for (int c = 0; c < n; ++c) V::store(dst + (c0 + c) * ldp + r0, v[c]);
    }
  }
#else
  for (int64_t r = 0; r < rows; ++r) {
    const S* wr = w + r * ldw;
    const bool* mr = mask + r * ldw;
    for (int64_t c = 0; c < cols; ++c) dst[c * ldp + r] = full || mr[c] ? to_compute<C>(wr[c]) : C(0);
  }
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ldp + rows, dst + (c + 1) * ldp, C(0));
#endif
}

// dst[r·ldp + c] = Wm[r, c] for r < rows, c < cols; dst[r·ldp + c] = 0 for cols <= c < ldp (ldp: whole vectors).
template <typename C, typename S>
void pack_natural(const S* __restrict w, const bool* __restrict mask, int64_t ldw, int64_t rows, int64_t cols,
                  bool full, C* __restrict dst, int64_t ldp) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* __restrict wr = w + r * ldw;
    const bool* __restrict mr = mask + r * ldw;
    C* __restrict dr = dst + r * ldp;
#if NNOPT_ML_AVX512
    using V = Vec<C>;
    for (int64_t c0 = 0; c0 < ldp; c0 += V::W) {
      const int n = int(std::clamp<int64_t>(cols - c0, 0, V::W));
      V::store(dr + c0, n > 0 ? load_row(wr + c0, row_lanes(n, mr + c0, full)) : V::zero());
    }
#else
    for (int64_t c = 0; c < cols; ++c) dr[c] = full || mr[c] ? to_compute<C>(wr[c]) : C(0);
    std::fill(dr + cols, dr + ldp, C(0));
#endif
  }
}

// dst[0:n] = src[0:n] for the short runs (a tile's width) of packing and write-back, where a call to memcpy
// costs more than the copy.
template <typename C>
inline void copy_run(C* __restrict dst, const C* __restrict src, int64_t n) {
#if NNOPT_ML_AVX512
  using V = Vec<C>;
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(dst + i, V::load(src + i));
  if (i < n) V::store_n(dst + i, V::load_n(src + i, int(n - i)), int(n - i));
#else
  std::memcpy(dst, src, size_t(n) * sizeof(C));
#endif
}

// Ap[k·R + r] = A[(m0 + r)·K + k] for r < R, k < K, rows at or past M read as 0: one m-tile of A depth-major.
template <typename C>
void pack_rows(const C* __restrict A, int64_t M, int64_t K, int64_t m0, int64_t R, C* __restrict Ap) {
#if NNOPT_ML_AVX512
  using V = Vec<C>;
  constexpr int W = V::W;
  for (int64_t k0 = 0; k0 < K; k0 += W) {
    const int n = int(std::min<int64_t>(W, K - k0));
    for (int64_t rb = 0; rb < R; rb += W) {
      typename V::T v[W];
      for (int i = 0; i < W; ++i) {
        const int64_t m = m0 + rb + i;
        v[i] = rb + i < R && m < M ? V::load_n(A + m * K + k0, n) : V::zero();
      }
      transpose(v);
      const int lanes = int(std::min<int64_t>(W, R - rb));
      for (int c = 0; c < n; ++c) V::store_n(Ap + (k0 + c) * R + rb, v[c], lanes);
    }
  }
#else
  for (int64_t r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    for (int64_t k = 0; k < K; ++k) Ap[k * R + r] = m < M ? A[m * K + k] : C(0);
  }
#endif
}

// ---------------------------------------------------------------------------------------------------------
// dW micro-kernel: out[r, 0:NV·W] = Σ_m d[m·ldd + r] · xs[m·ldx + 0:NV·W] for r < R (out: row stride chunk_cols).
// d is the item's packed slab of dy columns, xs the packed slab of x columns (zero padded to whole vectors).

template <typename C, int R, int NV>
void dw_kernel(const C* __restrict d, int64_t ldd, const C* __restrict xs, int64_t ldx, int64_t M,
               C* __restrict out) {
  using V = Vec<C>;
  constexpr int W = V::W;
  typename V::T acc[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  }
  for (int64_t m = 0; m < M; ++m, d += ldd, xs += ldx) {
    typename V::T b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = V::load(xs + v * W);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const typename V::T ar = V::set1(d[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(ar, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::store(out + r * chunk_cols<C>() + v * W, acc[r][v]);
  }
}

template <typename C>
using DwFn = void (*)(const C*, int64_t, const C*, int64_t, int64_t, C*);

template <typename C, int NV, int... I>
constexpr std::array<DwFn<C>, sizeof...(I)> dw_table(std::integer_sequence<int, I...>) {
  return {{&dw_kernel<C, I + 1, NV>...}};
}

template <typename C>
DwFn<C> dw_fn(int nv, int rows) {
  static constexpr auto t1 = dw_table<C, 1>(std::make_integer_sequence<int, rows_for(1)>{});
  static constexpr auto t2 = dw_table<C, 2>(std::make_integer_sequence<int, rows_for(2)>{});
  static constexpr auto t3 = dw_table<C, 3>(std::make_integer_sequence<int, rows_for(3)>{});
  static constexpr auto t4 = dw_table<C, 4>(std::make_integer_sequence<int, rows_for(4)>{});
  switch (nv) {
    case 1:
      return t1[rows - 1];
    case 2:
      return t2[rows - 1];
    case 3:
      return t3[rows - 1];
    default:
      return t4[rows - 1];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Work distribution: items 0..n-1 pulled from an atomic counter by at::parallel_for's threads, each with its
// own 64-byte aligned scratch buffer of `scratch` elements of C. A thread claims its next item before running the
// current one: fn(item, following item or -1, buffer), so an item can prefetch what the following one reads.

template <typename C, typename F>
void run_items(int64_t n, int64_t scratch, const F& fn) {
  if (n <= 0) return;
  auto with_buffer = [&](auto&& body) {
    const int64_t align = 64 / int64_t(sizeof(C));
    std::unique_ptr<C[]> storage(new C[scratch + align]);
    C* buf = storage.get();
    buf += (align - (reinterpret_cast<uintptr_t>(buf) / sizeof(C)) % align) % align;
    body(buf);
  };
  const int64_t threads = std::min<int64_t>(std::max(1, at::get_num_threads()), n);
  if (threads <= 1) {
    with_buffer([&](C* buf) {
      for (int64_t i = 0; i < n; ++i) fn(i, i + 1 < n ? i + 1 : int64_t(-1), buf);
    });
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    with_buffer([&](C* buf) {
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      while (i < n) {
        const int64_t following = next.fetch_add(1, std::memory_order_relaxed);
        fn(i, following < n ? following : int64_t(-1), buf);
        i = following;
      }
    });
  });
}

// Pieces of shared work (m-tiles of packed A, slabs of packed x) built once, by the first item that needs each,
// inside the op's one parallel region: a second region would add a barrier, and on a busy machine every region
// start or barrier can cost a scheduler tick (4 ms) waiting for a descheduled thread. A piece being built by
// another thread is waited for (it takes microseconds).
class OnceEach {
 public:
  explicit OnceEach(int64_t n) : state_(new std::atomic<uint8_t>[size_t(std::max<int64_t>(n, 1))]) {
    for (int64_t i = 0; i < n; ++i) state_[i].store(kTodo, std::memory_order_relaxed);
  }
  template <typename F>
  void ensure(int64_t i, const F& build) {
    if (state_[i].load(std::memory_order_acquire) == kDone) return;
    uint8_t todo = kTodo;
    if (state_[i].compare_exchange_strong(todo, kBuilding, std::memory_order_acq_rel)) {
      build(i);
      state_[i].store(kDone, std::memory_order_release);
      return;
    }
    while (state_[i].load(std::memory_order_acquire) != kDone) std::this_thread::yield();
  }

 private:
  static constexpr uint8_t kTodo = 0, kBuilding = 1, kDone = 2;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;
};

// Prefetches the tiles of W (and of the mask, unless full) that the thread's following item will pack, a few
// rows per m-tile of the current item: each row of a tile lies in its own page, K apart, so packing from memory
// is a burst of cache and TLB misses; spread over the current item's arithmetic they cost nothing.
template <typename S>
class TilePrefetcher {
 public:
  TilePrefetcher(const S* w, const bool* mask, int64_t ldw) : w_(w), mask_(mask), ldw_(ldw) {}
  void add(int64_t offset, int64_t rows, int64_t cols, bool full) {
    tiles_.push_back({offset, rows, cols, full});
    rows_ += rows;
  }
  // Rows per step when the prefetches are spread over `steps` steps.
  int64_t rows_per_step(int64_t steps) const { return ceil_div(rows_, std::max<int64_t>(1, steps)); }
  void step(int64_t rows) {
    for (; rows > 0 && tile_ < tiles_.size(); --rows) {
      const Tile& t = tiles_[tile_];
      const S* w = w_ + t.offset + row_ * ldw_;
      for (int64_t c = 0; c < t.cols; c += 64 / int64_t(sizeof(S))) __builtin_prefetch(w + c);
      __builtin_prefetch(w + t.cols - 1);
      if (!t.full) __builtin_prefetch(mask_ + t.offset + row_ * ldw_);
      if (++row_ == t.rows) {
        row_ = 0;
        ++tile_;
      }
    }
  }

 private:
  struct Tile {
    int64_t offset, rows, cols;
    bool full;
  };
  const S* w_;
  const bool* mask_;
  int64_t ldw_, rows_ = 0, row_ = 0;
  size_t tile_ = 0;
  std::vector<Tile> tiles_;
};

// m-tiles per item when `blocks` block rows (columns) share mt m-tiles: enough items for the threads to balance,
// while each item still reuses its packed panel over several m-tiles.
inline int64_t tiles_per_item(int64_t mt, int64_t blocks) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t parts = std::clamp<int64_t>(ceil_div(4 * threads, std::max<int64_t>(blocks, 1)), 1,
                                            std::max<int64_t>(1, mt / 4));
  return std::max<int64_t>(1, ceil_div(mt, parts));
}

// What dW's entries between its tiles hold before the product runs, so what it must do there.
enum class Gaps {
  kFill,  // an ordinary tensor: write zeros
  kZero,  // fresh anonymous memory, handed out zeroed by the OS: nothing
  kScan,  // a recycled mapping (nnopt/fresh_memory.h) holding an earlier tensor's values: read, and clear the lines
          // that are not all zero (almost none: the earlier dW's tiles, and anything its owner wrote there)
};

// dW [N, K] as a large mapping (nnopt/fresh_memory.h), fresh or recycled: a fresh one comes zeroed, so the product
// writes only the kept tiles (at 99% sparsity a zero pass over memory the OS had just zeroed was half of dW's
// time); a recycled one costs neither page faults nor the OS's zeroing (~7 ms for 64 MiB here) but must be scanned
// (~3 ms: read-only where it is zero). Only for outputs of at least `kFreshBytes` (glibc maps those fresh per
// allocation too); nullopt elsewhere, or when mapping fails, and the caller zero-fills an ordinary tensor.
constexpr int64_t kFreshBytes = int64_t(16) << 20;

std::optional<Tensor> mapped_dw(int64_t rows, int64_t cols, const at::TensorOptions& options, Gaps& gaps) {
  gaps = Gaps::kFill;
  const int64_t bytes = rows * cols * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (bytes < kFreshBytes) return std::nullopt;
  bool recycled = false;
  std::optional<Tensor> t = fresh_or_recycled(rows * cols, options, recycled);
  if (!t) return t;
  gaps = recycled ? Gaps::kScan : Gaps::kZero;
  *t = t->view({rows, cols});
  return t;
}

// Whether any of the `bytes` bytes at p is not zero.
inline bool any_nonzero(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  int64_t i = 0;
#if NNOPT_ML_AVX512
  __m512i acc = _mm512_setzero_si512();
  for (; i + 64 <= bytes; i += 64) acc = _mm512_or_si512(acc, _mm512_loadu_si512(c + i));
  if (_mm512_test_epi32_mask(acc, acc)) return true;
#endif
  uint64_t any = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t u;
    std::memcpy(&u, c + i, 8);
    any |= u;
  }
  for (; i < bytes; ++i) any |= uint64_t(uint8_t(c[i]));
  return any != 0;
}

// Zeroes p[0:n) where it is not already all +0.0 (bit patterns: -0.0 and NaN are cleared too), so memory that is zero
// is only read: 1 KiB is OR-reduced at a time (one test and branch per 16 lines), and only a span that is not all
// zero is looked at line by line.
template <typename C>
void clear_nonzero(C* p, int64_t n) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(C)), kSpan = 16 * kLine;
  for (int64_t i = 0; i < n; i += kSpan) {
    const int64_t m = std::min(kSpan, n - i);
    if (!any_nonzero(p + i, m * int64_t(sizeof(C)))) continue;
    for (int64_t j = i; j < i + m; j += kLine) {
      const int64_t l = std::min(kLine, i + m - j);
      if (any_nonzero(p + j, l * int64_t(sizeof(C)))) std::fill(p + j, p + j + l, C(0));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The three products on raw pointers. S: weight storage type; C: compute type (x, dy, outputs are C).

struct Layout {
  int64_t N, K, bn, bk, NB, KB;
  const int32_t* ptr;  // row_ptr (CSR) or col_ptr (CSC)
  const int32_t* idx;  // col_idx or row_idx
  const int32_t* perm;  // t_perm (CSC only)
  const bool* full;     // CSR order
};

template <typename C, typename S>
void forward_impl(const C* x, const S* w, const bool* mask, const C* bias, const Layout& L, int64_t M, C* y) {
  constexpr int64_t W = Vec<C>::W;
  const int64_t bp = ceil_div(L.bn, W) * W;
  const int64_t R = tile_rows<C>(M, L.bn), mt = ceil_div(M, R);
  const std::unique_ptr<C[]> xp(new C[size_t(std::max<int64_t>(1, mt * L.K * R))]);
  advise_huge_pages(xp.get(), mt * L.K * R * int64_t(sizeof(C)));
  OnceEach packed(mt);
  auto pack_tile = [&](int64_t t) { pack_rows(x, M, L.K, t * R, R, xp.get() + t * L.K * R); };
  int64_t max_tiles = 0;
  for (int64_t j = 0; j < L.NB; ++j) max_tiles = std::max<int64_t>(max_tiles, L.ptr[j + 1] - L.ptr[j]);
  const int64_t per_item = tiles_per_item(mt, L.NB), parts = ceil_div(mt, per_item);
  run_items<C>(L.NB * parts, max_tiles * L.bk * bp + 1, [&](int64_t item, int64_t following, C* panel) {
    const int64_t j = item / parts, t_begin = (item % parts) * per_item, t_end = std::min(mt, t_begin + per_item);
    const int64_t j0 = j * L.bn, nh = std::min(L.bn, L.N - j0);
    const int64_t p0 = L.ptr[j], nt = L.ptr[j + 1] - p0;
    std::vector<Seg> segs(static_cast<size_t>(nt));
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t k0 = int64_t(L.idx[p0 + i]) * L.bk, kw = std::min(L.bk, L.K - k0);
      segs[i] = {k0, i * L.bk * bp, kw};
      pack_transposed(w + j0 * L.K + k0, mask + j0 * L.K + k0, L.K, nh, kw, L.full[p0 + i], panel + segs[i].p, bp);
    }
    TilePrefetcher<S> pf(w, mask, L.K);
    const int64_t jn = following < 0 ? j : following / parts;
    for (int64_t p = L.ptr[jn]; jn != j && p < L.ptr[jn + 1]; ++p) {
      const int64_t k0 = int64_t(L.idx[p]) * L.bk;
      pf.add(jn * L.bn * L.K + k0, std::min(L.bn, L.N - jn * L.bn), std::min(L.bk, L.K - k0), L.full[p]);
    }
    const int64_t step = pf.rows_per_step((t_end - t_begin) * ceil_div(nh, chunk_cols<C>()));
    run_panel<C>(
        xp.get(), R, L.K, M, t_begin, t_end, segs.data(), nt, panel, bp, nh, y + j0, L.N,
        bias != nullptr ? bias + j0 : nullptr,
        [&](int64_t t) { packed.ensure(t, pack_tile); }, [&] { pf.step(step); });
  });
}

template <typename C, typename S>
void dx_impl(const C* dy, const S* w, const bool* mask, const Layout& L, int64_t M, C* dx) {
  constexpr int64_t W = Vec<C>::W;
  const int64_t bp = ceil_div(L.bk, W) * W;
  const int64_t R = tile_rows<C>(M, L.bk), mt = ceil_div(M, R);
  const std::unique_ptr<C[]> dyp(new C[size_t(std::max<int64_t>(1, mt * L.N * R))]);
  advise_huge_pages(dyp.get(), mt * L.N * R * int64_t(sizeof(C)));
  OnceEach packed(mt);
  auto pack_tile = [&](int64_t t) { pack_rows(dy, M, L.N, t * R, R, dyp.get() + t * L.N * R); };
  int64_t max_tiles = 0;
  for (int64_t kb = 0; kb < L.KB; ++kb) max_tiles = std::max<int64_t>(max_tiles, L.ptr[kb + 1] - L.ptr[kb]);
  const int64_t per_item = tiles_per_item(mt, L.KB), parts = ceil_div(mt, per_item);
  run_items<C>(L.KB * parts, max_tiles * L.bn * bp + 1, [&](int64_t item, int64_t following, C* panel) {
    const int64_t kb = item / parts, t_begin = (item % parts) * per_item, t_end = std::min(mt, t_begin + per_item);
    const int64_t k0 = kb * L.bk, kw = std::min(L.bk, L.K - k0);
    const int64_t q0 = L.ptr[kb], nt = L.ptr[kb + 1] - q0;
    std::vector<Seg> segs(static_cast<size_t>(nt));
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t j0 = int64_t(L.idx[q0 + i]) * L.bn, nh = std::min(L.bn, L.N - j0);
      segs[i] = {j0, i * L.bn * bp, nh};
      pack_natural(w + j0 * L.K + k0, mask + j0 * L.K + k0, L.K, nh, kw, L.full[L.perm[q0 + i]],
                   panel + segs[i].p, bp);
    }
    TilePrefetcher<S> pf(w, mask, L.K);
    const int64_t kn = following < 0 ? kb : following / parts;
    for (int64_t q = L.ptr[kn]; kn != kb && q < L.ptr[kn + 1]; ++q) {
      const int64_t j0 = int64_t(L.idx[q]) * L.bn;
      pf.add(j0 * L.K + kn * L.bk, std::min(L.bn, L.N - j0), std::min(L.bk, L.K - kn * L.bk), L.full[L.perm[q]]);
    }
    const int64_t step = pf.rows_per_step((t_end - t_begin) * ceil_div(kw, chunk_cols<C>()));
    run_panel<C>(
        dyp.get(), R, L.N, M, t_begin, t_end, segs.data(), nt, panel, bp, kw, dx + k0, L.K, nullptr,
        [&](int64_t t) { packed.ensure(t, pack_tile); }, [&] { pf.step(step); });
  });
}

template <typename C>
void dw_impl(const C* dy, const C* x, const bool* mask, const Layout& L, int64_t M, C* dw, Gaps gaps) {
  constexpr int64_t W = Vec<C>::W;
  const int64_t chunk = chunk_cols<C>();
  const int64_t nnzb = L.ptr[L.NB];
  // x packed once per call (each slab by the first item that needs it), one slab [M][bkp] per block column that
  // holds a tile: each tile then streams its slab contiguously (the rows of x are K apart), and the slab is shared
  // by every tile of its block column.
  const int64_t bkp = ceil_div(L.bk, W) * W;
  std::vector<int64_t> slot(size_t(L.KB), -1);
  std::vector<int64_t> used;
  for (int64_t p = 0; p < nnzb; ++p) slot[L.idx[p]] = 0;
  for (int64_t kb = 0; kb < L.KB; ++kb) {
    if (slot[kb] == 0) {
      slot[kb] = int64_t(used.size());
      used.push_back(kb);
    }
  }
  const int64_t slab = M * bkp;
  std::unique_ptr<C[]> xp(new C[size_t(std::max<int64_t>(1, int64_t(used.size()) * slab))]);
  advise_huge_pages(xp.get(), int64_t(used.size()) * slab * int64_t(sizeof(C)));
  OnceEach packed(int64_t(used.size()));
  auto pack_slab = [&](int64_t i) {
    const int64_t k0 = used[i] * L.bk, kw = std::min(L.bk, L.K - k0);
    C* dst = xp.get() + i * slab;
    for (int64_t m = 0; m < M; ++m) {
      copy_run(dst + m * bkp, x + m * L.K + k0, kw);
      std::fill(dst + m * bkp + kw, dst + (m + 1) * bkp, C(0));
    }
  };

  // Rows per group: the register block of a full-width chunk (narrower edge chunks allow at least as many).
  const int64_t group = rows_for(int(ceil_div(std::min(bkp, chunk), W)));
  const int64_t groups = ceil_div(L.bn, group);
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t parts = std::clamp<int64_t>(ceil_div(4 * threads, std::max<int64_t>(L.NB, 1)), 1, groups);
  const int64_t per_part = ceil_div(groups, parts);
  run_items<C>(L.NB * parts, group * chunk + M * L.bn, [&](int64_t item, int64_t, C* buf) {
    C* out = buf;
    C* ds = buf + group * chunk;  // the item's rows of dy as [M][nr]
    const int64_t j = item / parts, g_begin = (item % parts) * per_part;
    const int64_t j0 = j * L.bn, nh = std::min(L.bn, L.N - j0);
    const int64_t r_begin = std::min(nh, g_begin * group), r_end = std::min(nh, (g_begin + per_part) * group);
    const int64_t nr = r_end - r_begin;
    if (nr <= 0) return;
    const int64_t p0 = L.ptr[j], p1 = L.ptr[j + 1];
    if (p1 > p0) {
      for (int64_t m = 0; m < M; ++m) copy_run(ds + m * nr, dy + m * L.N + j0 + r_begin, nr);
    }
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k0 = int64_t(L.idx[p]) * L.bk, kw = std::min(L.bk, L.K - k0);
      const bool full = L.full[p];
      packed.ensure(slot[L.idx[p]], pack_slab);
      const C* xs = xp.get() + slot[L.idx[p]] * slab;
      for (int64_t c0 = 0; c0 < kw; c0 += chunk) {
        const int64_t nc = std::min(chunk, kw - c0);
        const int nv = int(ceil_div(nc, W));
        for (int64_t r0 = r_begin; r0 < r_end; r0 += group) {
          const int rows = int(std::min(group, r_end - r0));
          dw_fn<C>(nv, rows)(ds + (r0 - r_begin), nr, xs + c0, bkp, M, out);
          for (int r = 0; r < rows; ++r) {
            const int64_t off = (j0 + r0 + r) * L.K + k0 + c0;
            const C* __restrict src = out + r * chunk;
            C* __restrict dst = dw + off;
            if (full) {
              copy_run(dst, src, nc);
            } else {
              const bool* __restrict mr = mask + off;
#pragma omp simd
              for (int64_t c = 0; c < nc; ++c) dst[c] = mr[c] ? src[c] : C(0);
            }
          }
        }
      }
    }
    // Zeros between the listed tiles (col_idx ascends within a block row), unless the memory came zeroed.
    auto zero = [gaps](C* a, C* b) {
      if (gaps == Gaps::kScan) {
        clear_nonzero(a, b - a);
      } else {
        std::fill(a, b, C(0));
      }
    };
    for (int64_t r = r_begin; r < r_end && gaps != Gaps::kZero; ++r) {
      C* row = dw + (j0 + r) * L.K;
      int64_t done = 0;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t k0 = int64_t(L.idx[p]) * L.bk;
        zero(row + done, row + k0);
        done = std::min(L.K, k0 + L.bk);
      }
      zero(row + done, row + L.K);
    }
  });
}

// Input checks: csrc/include/nnopt/masked_linear_checks.h.
using namespace masked_linear_checks;

template <typename F>
void dispatch_weight(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(float(), float());
      break;
    case at::kDouble:
      f(double(), double());
      break;
    case at::kBFloat16:
      f(float(), c10::BFloat16());
      break;
    default:
      f(float(), c10::Half());
      break;
  }
}

Tensor masked_linear_cpu(const Tensor& x, const Tensor& weight, const Tensor& mask, const std::optional<Tensor>& bias,
                         const Tensor& row_ptr, const Tensor& col_idx, const Tensor& full, int64_t block_n,
                         int64_t block_k) {
  const char* op = "masked_linear";
  check_tensor(op, "x", x, 2);
  check_tensor(op, "weight", weight, 2);
  check_floating(op, "x", x);
  check_dtype(op, "weight", weight, x.scalar_type(), "of x's dtype");
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(1) == K, "nnopt::", op, ": x has ", x.size(1), " features, weight expects ", K,
              " (x [M, K], weight [N, K])");
  check_mask(op, mask, N, K, "the shape of weight");
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, 1);
    check_dtype(op, "bias", *bias, x.scalar_type(), "of x's dtype");
    TORCH_CHECK(bias->numel() == N, "nnopt::", op, ": bias must have ", N, " entries (weight's rows), got ",
                bias->numel());
  }
  check_blocks(op, block_n, block_k);
  const int64_t NB = ceil_div(N, block_n), KB = ceil_div(K, block_k);
  check_compressed(op, "row_ptr", row_ptr, "col_idx", col_idx, NB, KB, "block rows");
  check_full(op, full, col_idx.numel());

  const Tensor xc = compute_copy(x);
  const Tensor bc = bias.has_value() ? compute_copy(*bias) : Tensor();
  Tensor y = at::empty({M, N}, xc.options());
  advise_huge_pages(y.data_ptr(), y.numel() * int64_t(y.element_size()));
  if (M == 0 || N == 0) return to_dtype(y, x.scalar_type());
  const Layout L{N, K, block_n, block_k, NB, KB, row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                 nullptr, full.data_ptr<bool>()};
  dispatch_weight(weight.scalar_type(), [&](auto c, auto s) {
    using C = decltype(c);
    using S = decltype(s);
    forward_impl<C, S>(xc.data_ptr<C>(), weight.data_ptr<S>(), mask.data_ptr<bool>(),
                       bc.defined() ? bc.data_ptr<C>() : nullptr, L, M, y.data_ptr<C>());
  });
  return to_dtype(y, x.scalar_type());
}

Tensor masked_linear_dx_cpu(const Tensor& dy, const Tensor& weight, const Tensor& mask, const Tensor& col_ptr,
                            const Tensor& row_idx, const Tensor& t_perm, const Tensor& full, int64_t block_n,
                            int64_t block_k) {
  const char* op = "masked_linear_dx";
  check_tensor(op, "dy", dy, 2);
  check_tensor(op, "weight", weight, 2);
  check_floating(op, "dy", dy);
  check_dtype(op, "weight", weight, dy.scalar_type(), "of dy's dtype");
  const int64_t M = dy.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(dy.size(1) == N, "nnopt::", op, ": dy has ", dy.size(1), " columns, weight has ", N,
              " rows (dy [M, N], weight [N, K])");
  check_mask(op, mask, N, K, "the shape of weight");
  check_blocks(op, block_n, block_k);
  const int64_t NB = ceil_div(N, block_n), KB = ceil_div(K, block_k);
  check_compressed(op, "col_ptr", col_ptr, "row_idx", row_idx, KB, NB, "block columns");
  const int64_t nnzb = row_idx.numel();
  check_tensor(op, "t_perm", t_perm, 1);
  check_dtype(op, "t_perm", t_perm, at::kInt, "int32");
  TORCH_CHECK(t_perm.numel() == nnzb, "nnopt::", op, ": t_perm must have one entry per listed tile (", nnzb,
              "), got ", t_perm.numel());
  const int32_t* perm = t_perm.data_ptr<int32_t>();
  for (int64_t q = 0; q < nnzb; ++q) {
    TORCH_CHECK(perm[q] >= 0 && perm[q] < nnzb, "nnopt::", op, ": t_perm[", q, "] = ", perm[q],
                " is out of range [0, ", nnzb, ")");
  }
  check_full(op, full, nnzb);

  const Tensor dyc = compute_copy(dy);
  Tensor dx = at::empty({M, K}, dyc.options());
  advise_huge_pages(dx.data_ptr(), dx.numel() * int64_t(dx.element_size()));
  if (M == 0 || K == 0) return to_dtype(dx, dy.scalar_type());
  const Layout L{N, K, block_n, block_k, NB, KB, col_ptr.data_ptr<int32_t>(), row_idx.data_ptr<int32_t>(), perm,
                 full.data_ptr<bool>()};
  dispatch_weight(weight.scalar_type(), [&](auto c, auto s) {
    using C = decltype(c);
    using S = decltype(s);
    dx_impl<C, S>(dyc.data_ptr<C>(), weight.data_ptr<S>(), mask.data_ptr<bool>(), L, M, dx.data_ptr<C>());
  });
  return to_dtype(dx, dy.scalar_type());
}

Tensor masked_linear_dw_cpu(const Tensor& dy, const Tensor& x, const Tensor& mask, const Tensor& row_ptr,
                            const Tensor& col_idx, const Tensor& full, int64_t block_n, int64_t block_k) {
  const char* op = "masked_linear_dw";
  check_tensor(op, "dy", dy, 2);
  check_tensor(op, "x", x, 2);
  check_floating(op, "dy", dy);
  check_dtype(op, "x", x, dy.scalar_type(), "of dy's dtype");
  TORCH_CHECK(x.size(0) == dy.size(0), "nnopt::", op, ": x has ", x.size(0), " rows, dy has ", dy.size(0),
              " (dy [M, N], x [M, K])");
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  check_mask(op, mask, N, K, "[dy's columns, x's columns]");
  check_blocks(op, block_n, block_k);
  const int64_t NB = ceil_div(N, block_n), KB = ceil_div(K, block_k);
  check_compressed(op, "row_ptr", row_ptr, "col_idx", col_idx, NB, KB, "block rows");
  check_full(op, full, col_idx.numel());

  const Tensor dyc = compute_copy(dy);
  const Tensor xc = compute_copy(x);
  Gaps gaps;
  std::optional<Tensor> mapped = mapped_dw(N, K, xc.options(), gaps);
  Tensor dw = mapped ? *mapped : at::empty({N, K}, xc.options());
  if (!mapped) advise_huge_pages(dw.data_ptr(), dw.numel() * int64_t(dw.element_size()));
  if (N == 0 || K == 0) return to_dtype(dw, dy.scalar_type());
  const Layout L{N, K, block_n, block_k, NB, KB, row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), nullptr,
                 full.data_ptr<bool>()};
  if (xc.scalar_type() == at::kDouble) {
    dw_impl<double>(dyc.data_ptr<double>(), xc.data_ptr<double>(), mask.data_ptr<bool>(), L, M,
                    dw.data_ptr<double>(), gaps);
  } else {
    dw_impl<float>(dyc.data_ptr<float>(), xc.data_ptr<float>(), mask.data_ptr<bool>(), L, M, dw.data_ptr<float>(),
                   gaps);
  }
  return to_dtype(dw, dy.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(nnopt, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_dx", &masked_linear_dx_cpu);
  m.impl("masked_linear_dw", &masked_linear_dw_cpu);
}

}  // namespace nnopt
