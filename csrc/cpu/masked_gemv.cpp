// Decode-shaped masked linear on CPU (nnopt::masked_linear_pack, nnopt::masked_linear_packed): y = x Wmᵀ + b for
// a few rows of x (M = 1..16, any M works), Wm = where(mask, W, 0), reading each kept tile of W once per call.
//
// At decode shapes the layer is bound by the bytes of W it streams, so the weight is prepared once, not per call:
// masked_linear_pack copies the listed block_n × block_k tiles (CSR order) of Wm into one buffer of equal-sized
// panels, each in the order the micro-kernel reads it (caller caches it per mask and weight version):
//   float32, float64, float16   [bkp][bnp]        depth-major: one step of depth is bnp adjacent outputs
//   bfloat16                    [bkp/2][bnp][2]   pairs of depth interleaved: one 64-byte vector holds 16 outputs ×
//                                                 2 depths, the operand order of AVX512-BF16's dot product
// bnp = block_n rounded up to 16, bkp = block_k rounded up to 4; padding is zero. A tile's panel is contiguous and
// a block row's panels follow each other, so a call streams the buffer front to back.
//
// masked_linear_packed: x is copied (converted when needed) into xt [M][KB·bkp], each block column's bkp values
// zero padded, so the panels' padding multiplies zeros; when x already has that layout it is read in place. Work
// item: one block row; per 32-column chunk of it and per group of MR <= 8 rows, MR × NV (NV = 1 or 2 vectors of
// 16 floats) accumulators live in registers across every panel of the block row: per step of depth, NV vector
// loads of the panel, MR broadcasts of xt, MR × NV FMAs. With few rows the FMA chain is latency bound, so KU
// independent accumulator sets split the depth (KU × MR × NV <= 16). Accumulation is float32 (float64 for
// float64); bias added and the result rounded once to x's dtype.
//   float16 panels are widened with vcvtph2ps; bfloat16 pairs either feed vdpbf16ps (AVX512-BF16: two products
//   per lane per instruction, x read as bf16 pairs) or are widened by shifts for FMAs (CPUs without it, or
//   NNOPT_CPU_BF16_DOT=0). Which is chosen at run time from cpuid, so a build for another CPU stays correct.
// Without AVX-512 in the build, portable loops over the same layouts.

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <utility>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "nnopt/masked_linear_checks.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NNOPT_GEMV_AVX512 1
#include <immintrin.h>
#else
#define NNOPT_GEMV_AVX512 0
#endif

namespace nnopt {
namespace {

using at::Tensor;
using namespace masked_linear_checks;

constexpr int64_t kLanes = 16;  // outputs per panel vector (float32 lanes of a 64-byte vector)
constexpr int64_t kChunk = 32;  // outputs per work chunk: NV <= 2 vectors
constexpr int kMaxRows = 8;     // rows per register block: 8 × 2 accumulators, room for the split over depth

struct Geometry {
  int64_t N, K, bn, bk, NB, KB, bnp, bkp, panel;  // panel: elements of one tile's panel
};

Geometry geometry(int64_t N, int64_t K, int64_t bn, int64_t bk) {
  const int64_t bnp = ceil_div(bn, kLanes) * kLanes, bkp = ceil_div(bk, 4) * 4;
  return {N, K, bn, bk, ceil_div(N, bn), ceil_div(K, bk), bnp, bkp, bnp * bkp};
}

template <typename T>
constexpr bool is_pair = std::is_same_v<T, c10::BFloat16>;

// Index of Wm[n, k] of a tile (n < bnp, k < bkp) in its panel.
template <typename T>
inline int64_t panel_index(const Geometry& g, int64_t n, int64_t k) {
  if constexpr (is_pair<T>) {
    return (k / 2) * g.bnp * 2 + n * 2 + (k & 1);
  } else {
    return k * g.bnp + n;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Packing (once per mask and weight version): panels of Wm in the packed type P, from weights of type S.

template <typename P, typename S>
void pack_impl(const S* w, const bool* mask, const int32_t* row_ptr, const int32_t* col_idx, const bool* full,
               const Geometry& g, P* out) {
  const int64_t nnzb = row_ptr[g.NB];
  std::vector<int32_t> row_of(size_t(std::max<int64_t>(nnzb, 1)));
  for (int64_t j = 0; j < g.NB; ++j) {
    for (int64_t p = row_ptr[j]; p < row_ptr[j + 1]; ++p) row_of[p] = int32_t(j);
  }
  at::parallel_for(0, nnzb, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      P* dst = out + p * g.panel;
      std::fill(dst, dst + g.panel, P(0));
      const int64_t n0 = int64_t(row_of[p]) * g.bn, k0 = int64_t(col_idx[p]) * g.bk;
      const int64_t nh = std::min(g.bn, g.N - n0), kw = std::min(g.bk, g.K - k0);
      for (int64_t n = 0; n < nh; ++n) {
        const S* wr = w + (n0 + n) * g.K + k0;
        const bool* mr = mask + (n0 + n) * g.K + k0;
        for (int64_t k = 0; k < kw; ++k) {
          // A select, not a product: a NaN or inf weight under the mask never reaches the panel.
          if (full[p] || mr[k]) dst[panel_index<P>(g, n, k)] = static_cast<P>(static_cast<float>(wr[k]));
        }
      }
    }
  });
}

// float64 keeps its precision: the float detour above would round it.
template <>
void pack_impl<double, double>(const double* w, const bool* mask, const int32_t* row_ptr, const int32_t* col_idx,
                               const bool* full, const Geometry& g, double* out) {
  const int64_t nnzb = row_ptr[g.NB];
  for (int64_t j = 0; j < g.NB; ++j) {
    for (int64_t p = row_ptr[j]; p < row_ptr[j + 1]; ++p) {
      double* dst = out + p * g.panel;
      std::fill(dst, dst + g.panel, 0.0);
      const int64_t n0 = j * g.bn, k0 = int64_t(col_idx[p]) * g.bk;
      const int64_t nh = std::min(g.bn, g.N - n0), kw = std::min(g.bk, g.K - k0);
      for (int64_t n = 0; n < nh; ++n) {
        for (int64_t k = 0; k < kw; ++k) {
          const int64_t o = (n0 + n) * g.K + k0 + k;
          if (full[p] || mask[o]) dst[k * g.bnp + n] = w[o];
        }
      }
    }
  }
  (void)nnzb;
}

// ---------------------------------------------------------------------------------------------------------
// Micro-kernels. out[r·kChunk + c] = Σ_tiles Σ_k xt[r·ldx + col·bkp + k] · panel[k, c0 + c] for r < MR, c < 16·NV.

#if NNOPT_GEMV_AVX512
// Panel policies: the vectors of one step (`unit` depths) at w, the broadcasts of x, the FMAs.
struct F32Panel {
  using P = float;
  using X = float;
  static constexpr int unit = 1;
  template <int MR, int NV>
  static inline void step(__m512 (&acc)[MR][NV], const float* w, const float* x, int64_t ldx) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(w + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
};

struct F16Panel {
  using P = c10::Half;
  using X = float;
  static constexpr int unit = 1;
  template <int MR, int NV>
  static inline void step(__m512 (&acc)[MR][NV], const c10::Half* w, const float* x, int64_t ldx) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) {
      b[v] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + v * kLanes)));
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
};

// bfloat16 pairs widened to float32 by shifts (exact), two FMAs per pair: any AVX-512 CPU.
struct BF16WidenPanel {
  using P = c10::BFloat16;
  using X = float;
  static constexpr int unit = 2;
  template <int MR, int NV>
  static inline void step(__m512 (&acc)[MR][NV], const c10::BFloat16* w, const float* x, int64_t ldx) {
    __m512 lo[NV], hi[NV];
    const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
    for (int v = 0; v < NV; ++v) {
      const __m512i p = _mm512_loadu_si512(w + v * 2 * kLanes);
      lo[v] = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
      hi[v] = _mm512_castsi512_ps(_mm512_and_si512(p, high));
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 a0 = _mm512_set1_ps(x[r * ldx]), a1 = _mm512_set1_ps(x[r * ldx + 1]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a1, hi[v], _mm512_fmadd_ps(a0, lo[v], acc[r][v]));
    }
  }
};

// The panels a step of the loop will read kPanelAhead bytes later. They are one sequential stream, but the
// hardware prefetcher restarts at every 4 KiB page: measured at B=8 (fp32, 4096², 90%), 0.47 -> 0.36 ms a call.
constexpr int64_t kPanelAhead = 4096;
template <typename P>
inline void prefetch_panels(const P* w, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(w) + kPanelAhead;
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
}

// One block row, one chunk of its columns (c0: the chunk's first column inside the panel), MR rows of xt.
// KU accumulator sets take alternate steps of depth, so a short FMA chain does not wait on its own latency.
template <typename Pol, int MR, int NV, int KU>
void block_row(const typename Pol::X* xt, int64_t ldx, const typename Pol::P* panels, int64_t ntiles,
                           const int32_t* cols, const Geometry& g, int64_t c0, float* out) {
  __m512 acc[KU][MR][NV];
  for (int u = 0; u < KU; ++u) {
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) acc[u][r][v] = _mm512_setzero_ps();
    }
  }
  constexpr int unit = Pol::unit;
  const int64_t wstep = g.bnp * unit;  // panel elements per step of `unit` depths
  using X = typename Pol::X;
  const int64_t wbytes = wstep * KU * int64_t(sizeof(typename Pol::P));  // panel bytes per step of the loop
  // Lines of one row's bkp values of x; the next tile's MR rows are prefetched one line per step of depth.
  const int64_t lpr = ceil_div(g.bkp * int64_t(sizeof(X)), int64_t(64)), xl = 64 / int64_t(sizeof(X));
  for (int64_t t = 0; t < ntiles; ++t) {
    const typename Pol::P* w = panels + t * g.panel + c0 * unit;
    const X* x = xt + int64_t(cols[t]) * g.bkp;
    // The next panel is the next bytes of the buffer (the hardware prefetcher follows), but its x columns are
    // elsewhere, MR rows ldx apart: touch them while this tile computes.
    const X* xn = t + 1 < ntiles ? xt + int64_t(cols[t + 1]) * g.bkp : nullptr;
    const int64_t lines = xn ? MR * lpr : 0;
    int64_t line = 0, row = 0, col = 0;
    for (int64_t k = 0; k < g.bkp; k += unit * KU, w += wstep * KU, x += unit * KU) {
      if (line < lines) {
        __builtin_prefetch(xn + row * ldx + col);
        ++line;
        col += xl;
        if (col >= lpr * xl) {
          col = 0;
          ++row;
        }
      }
      prefetch_panels(w, wbytes);
      for (int u = 0; u < KU; ++u) Pol::template step<MR, NV>(acc[u], w + u * wstep, x + u * unit, ldx);
    }
    for (; line < lines; ++line) {
      __builtin_prefetch(xn + row * ldx + col);
      col += xl;
      if (col >= lpr * xl) {
        col = 0;
        ++row;
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      __m512 s = acc[0][r][v];
      for (int u = 1; u < KU; ++u) s = _mm512_add_ps(s, acc[u][r][v]);
      _mm512_storeu_ps(out + r * kChunk + v * kLanes, s);
    }
  }
}

// bfloat16 pairs into vdpbf16ps (two products per lane per instruction), x read as bf16 pairs: one 32-bit
// broadcast per row and pair of depths. Its own function, compiled for AVX512-BF16 and called only when cpuid
// reports it (the intrinsic cannot be inlined into code built for the baseline target).
#define NNOPT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
struct BF16DotPanel {
  using P = c10::BFloat16;
  using X = c10::BFloat16;
  static constexpr int unit = 2;
};

template <int MR, int NV, int KU>
NNOPT_BF16_TARGET void block_row_dot(const c10::BFloat16* xt, int64_t ldx, const c10::BFloat16* panels,
                                     int64_t ntiles, const int32_t* cols, const Geometry& g, int64_t c0, float* out) {
  __m512 acc[KU][MR][NV];
  for (int u = 0; u < KU; ++u) {
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) acc[u][r][v] = _mm512_setzero_ps();
    }
  }
  const int64_t wstep = g.bnp * 2;
  for (int64_t t = 0; t < ntiles; ++t) {
    const c10::BFloat16* w = panels + t * g.panel + c0 * 2;
    const c10::BFloat16* x = xt + int64_t(cols[t]) * g.bkp;
    if (t + 1 < ntiles) __builtin_prefetch(xt + int64_t(cols[t + 1]) * g.bkp);
    for (int64_t k = 0; k < g.bkp; k += 2 * KU, w += wstep * KU, x += 2 * KU) {
      prefetch_panels(w, wstep * KU * int64_t(sizeof(c10::BFloat16)));
      for (int u = 0; u < KU; ++u) {
        __m512bh b[NV];
        for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(w + u * wstep + v * 2 * kLanes);
        for (int r = 0; r < MR; ++r) {
          int32_t pair;
          std::memcpy(&pair, x + r * ldx + 2 * u, sizeof(pair));
          const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
          for (int v = 0; v < NV; ++v) acc[u][r][v] = _mm512_dpbf16_ps(acc[u][r][v], a, b[v]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      __m512 s = acc[0][r][v];
      for (int u = 1; u < KU; ++u) s = _mm512_add_ps(s, acc[u][r][v]);
      _mm512_storeu_ps(out + r * kChunk + v * kLanes, s);
    }
  }
}

// KU: independent accumulator sets for MR × NV accumulators (units of depth per panel: bkp / unit, a multiple
// of 4 / unit, so KU divides it).
constexpr int split_for(int mr, int nv, int unit) {
  const int acc = mr * nv;
  const int ku = acc <= 4 ? 4 : acc <= 8 ? 2 : 1;
  return unit == 2 ? std::min(ku, 2) : ku;
}

template <typename Pol>
using RowFn = void (*)(const typename Pol::X*, int64_t, const typename Pol::P*, int64_t, const int32_t*,
                       const Geometry&, int64_t, float*);

template <typename Pol, int NV, int... I>
constexpr std::array<RowFn<Pol>, sizeof...(I)> row_table(std::integer_sequence<int, I...>) {
  if constexpr (std::is_same_v<Pol, BF16DotPanel>) {
    return {{&block_row_dot<I + 1, NV, split_for(I + 1, NV, 2)>...}};
  } else {
    return {{&block_row<Pol, I + 1, NV, split_for(I + 1, NV, Pol::unit)>...}};
  }
}

template <typename Pol>
RowFn<Pol> row_fn(int nv, int mr) {
  static constexpr auto t1 = row_table<Pol, 1>(std::make_integer_sequence<int, kMaxRows>{});
  static constexpr auto t2 = row_table<Pol, 2>(std::make_integer_sequence<int, kMaxRows>{});
  return nv == 1 ? t1[mr - 1] : t2[mr - 1];
}
#endif

// Portable micro-kernel (and float64): the same walk in plain loops, accumulating in A.
template <typename P, typename X, typename A>
void block_row_portable(const X* xt, int64_t ldx, const P* panels, int64_t ntiles, const int32_t* cols,
                        const Geometry& g, int64_t c0, int rows, int64_t width, A* out) {
  for (int r = 0; r < rows; ++r) std::fill(out + r * kChunk, out + r * kChunk + width, A(0));
  for (int64_t t = 0; t < ntiles; ++t) {
    const P* w = panels + t * g.panel;
    const X* x = xt + int64_t(cols[t]) * g.bkp;
    for (int64_t k = 0; k < g.bkp; ++k) {
      for (int r = 0; r < rows; ++r) {
        const A a = static_cast<A>(x[r * ldx + k]);
        A* o = out + r * kChunk;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) o[c] += a * static_cast<A>(w[panel_index<P>(g, c0 + c, k)]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The call: x [M, K] (type T), panels of type P, y [M, N] (type T).

bool bf16_dot_available() {
#if NNOPT_GEMV_AVX512 && defined(__GNUC__)
  static const bool cpu = __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("NNOPT_CPU_BF16_DOT");
  return cpu && !(env != nullptr && env[0] == '0');
#else
  return false;
#endif
}

// xt [M][KB·bkp]: x's rows with each block column's bk values zero padded to bkp, converted to X.
template <typename X, typename T>
const X* tiled_x(const T* x, int64_t M, const Geometry& g, std::vector<X>& storage) {
  if constexpr (std::is_same_v<X, T>) {
    if (g.bkp == g.bk && g.K == g.KB * g.bk) return x;  // already that layout: read in place
  }
  const int64_t ld = g.KB * g.bkp;
  storage.assign(size_t(M * ld), X(0));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < g.KB; ++c) {
      const int64_t k0 = c * g.bk, kw = std::min(g.bk, g.K - k0);
      for (int64_t k = 0; k < kw; ++k) {
        storage[m * ld + c * g.bkp + k] = static_cast<X>(static_cast<float>(x[m * g.K + k0 + k]));
      }
    }
  }
  return storage.data();
}

// Runs body(j0, j1) over block rows [0, NB) in tasks of `grain` rows pulled from an atomic counter: a thread
// descheduled on a busy machine delays only its own task, not a fixed share of the rows. One thread when the
// call moves less than ~256 KiB per extra thread (waking threads costs more than it saves). Measured on a
// Llama-style model (hidden 1024, 90% blocks, 2 threads): its projections move 0.4-1.6 MiB each, and a 1 MiB
// threshold ran them all on one core, decode B=1 2.8x dense; 256 KiB: 3.1x, B=8 4.1x -> 4.8x.
template <typename F>
void for_block_rows(const Geometry& g, int64_t bytes, const F& body) {
  constexpr int64_t kMinBytesPerThread = int64_t(256) << 10;
  const int64_t threads = std::clamp<int64_t>(bytes / kMinBytesPerThread, 1, at::get_num_threads());
  if (threads <= 1 || g.NB <= 1) {
    body(0, g.NB);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, g.NB / (8 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t j0 = next.fetch_add(grain); j0 < g.NB; j0 = next.fetch_add(grain)) {
      body(j0, std::min(g.NB, j0 + grain));
    }
  });
}

template <typename T, typename A>
inline void store_chunk(const A* out, int rows, int64_t width, int64_t ldy, const T* bias, T* y) {
  for (int r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; ++c) {
      A v = out[r * kChunk + c];
      if (bias != nullptr) v += static_cast<A>(bias[c]);
      y[r * ldy + c] = static_cast<T>(v);
    }
  }
}

// Row groups of at most kMaxRows, balanced: M = 12 runs as 6 + 6, not 8 + 4.
inline int group_rows(int64_t M) { return int(ceil_div(M, ceil_div(M, kMaxRows))); }

template <typename T, typename P, typename X, typename A, typename Kernel>
void packed_impl(const T* x, const P* panels, const T* bias, const int32_t* row_ptr, const int32_t* col_idx,
                 const Geometry& g, int64_t M, T* y, const Kernel& kernel) {
  std::vector<X> storage;
  const X* xt = tiled_x<X, T>(x, M, g, storage);
  const int64_t ldx = xt == reinterpret_cast<const void*>(x) ? g.K : g.KB * g.bkp;
  const int gr = group_rows(M);
  const int64_t bytes = int64_t(row_ptr[g.NB]) * g.panel * int64_t(sizeof(P)) + M * (g.K + g.N) * int64_t(sizeof(T));
  for_block_rows(g, bytes, [&](int64_t j0, int64_t j1) {
    alignas(64) A out[kMaxRows * kChunk];
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n0 = j * g.bn, nh = std::min(g.bn, g.N - n0);
      const int64_t p0 = row_ptr[j], nt = row_ptr[j + 1] - p0;
      for (int64_t c0 = 0; c0 < nh; c0 += kChunk) {
        const int64_t width = std::min(kChunk, nh - c0);
        for (int64_t m0 = 0; m0 < M; m0 += gr) {
          const int rows = int(std::min<int64_t>(gr, M - m0));
          kernel(xt + m0 * ldx, ldx, panels + p0 * g.panel, nt, col_idx + p0, c0, rows, width, out);
          store_chunk<T, A>(out, rows, width, g.N, bias != nullptr ? bias + n0 + c0 : nullptr,
                            y + m0 * g.N + n0 + c0);
        }
      }
    }
  });
}

template <typename T, typename P, typename X, typename A>
void run_portable(const T* x, const P* panels, const T* bias, const int32_t* row_ptr, const int32_t* col_idx,
                  const Geometry& g, int64_t M, T* y) {
  packed_impl<T, P, X, A>(x, panels, bias, row_ptr, col_idx, g, M, y,
                          [&](const X* xt, int64_t ldx, const P* p, int64_t nt, const int32_t* cols, int64_t c0,
                              int rows, int64_t width, A* out) {
                            block_row_portable<P, X, A>(xt, ldx, p, nt, cols, g, c0, rows, width, out);
                          });
}

#if NNOPT_GEMV_AVX512
template <typename T, typename Pol>
void run_avx512(const T* x, const typename Pol::P* panels, const T* bias, const int32_t* row_ptr,
                const int32_t* col_idx, const Geometry& g, int64_t M, T* y) {
  using X = typename Pol::X;
  using P = typename Pol::P;
  packed_impl<T, P, X, float>(x, panels, bias, row_ptr, col_idx, g, M, y,
                              [&](const X* xt, int64_t ldx, const P* p, int64_t nt, const int32_t* cols, int64_t c0,
                                  int rows, int64_t width, float* out) {
                                row_fn<Pol>(int(ceil_div(width, kLanes)), rows)(xt, ldx, p, nt, cols, g, c0, out);
                              });
}
#endif

template <typename T>
void dispatch_packed(const T* x, const void* panels, const T* bias, const int32_t* row_ptr, const int32_t* col_idx,
                     const Geometry& g, int64_t M, T* y) {
  if constexpr (std::is_same_v<T, double>) {
    run_portable<double, double, double, double>(x, static_cast<const double*>(panels), bias, row_ptr, col_idx, g,
                                                  M, y);
  } else {
#if NNOPT_GEMV_AVX512
    if constexpr (std::is_same_v<T, float>) {
      run_avx512<float, F32Panel>(x, static_cast<const float*>(panels), bias, row_ptr, col_idx, g, M, y);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      run_avx512<c10::Half, F16Panel>(x, static_cast<const c10::Half*>(panels), bias, row_ptr, col_idx, g, M, y);
    } else if (bf16_dot_available()) {
      run_avx512<c10::BFloat16, BF16DotPanel>(x, static_cast<const c10::BFloat16*>(panels), bias, row_ptr,
                                              col_idx, g, M, y);
    } else {
      run_avx512<c10::BFloat16, BF16WidenPanel>(x, static_cast<const c10::BFloat16*>(panels), bias, row_ptr,
                                                col_idx, g, M, y);
    }
#else
    run_portable<T, T, float, float>(x, static_cast<const T*>(panels), bias, row_ptr, col_idx, g, M, y);
#endif
  }
}

// ---------------------------------------------------------------------------------------------------------
// Ops.

Tensor masked_linear_pack_cpu(const Tensor& weight, const Tensor& mask, const Tensor& row_ptr, const Tensor& col_idx,
                              const Tensor& full, int64_t block_n, int64_t block_k,
                              std::optional<at::ScalarType> dtype) {
  const char* op = "masked_linear_pack";
  check_tensor(op, "weight", weight, 2);
  check_floating(op, "weight", weight);
  const int64_t N = weight.size(0), K = weight.size(1);
  check_mask(op, mask, N, K, "the shape of weight");
  check_blocks(op, block_n, block_k);
  const Geometry g = geometry(N, K, block_n, block_k);
  check_compressed(op, "row_ptr", row_ptr, "col_idx", col_idx, g.NB, g.KB, "block rows");
  check_full(op, full, col_idx.numel());
  const at::ScalarType pt = dtype.value_or(weight.scalar_type());
  TORCH_CHECK(is_floating(pt), "nnopt::", op, ": dtype must be float32, float64, bfloat16 or float16, got ", pt);
  TORCH_CHECK((pt == at::kDouble) == (weight.scalar_type() == at::kDouble), "nnopt::", op,
              ": float64 weights pack only as float64 (and only they do), got weight ", weight.scalar_type(),
              " and dtype ", pt);
  const int64_t nnzb = col_idx.numel();
  Tensor packed = at::empty({nnzb * g.panel}, weight.options().dtype(pt));
  if (nnzb == 0) return packed;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const bool* fl = full.data_ptr<bool>();
  const bool* mk = mask.data_ptr<bool>();
  auto by_packed = [&](auto s) {
    using S = decltype(s);
    const S* w = static_cast<const S*>(weight.data_ptr());
    switch (pt) {
      case at::kFloat:
        pack_impl<float, S>(w, mk, rp, ci, fl, g, packed.data_ptr<float>());
        break;
      case at::kBFloat16:
        pack_impl<c10::BFloat16, S>(w, mk, rp, ci, fl, g, packed.data_ptr<c10::BFloat16>());
        break;
      default:
        pack_impl<c10::Half, S>(w, mk, rp, ci, fl, g, packed.data_ptr<c10::Half>());
        break;
    }
  };
  switch (weight.scalar_type()) {
    case at::kDouble:
      pack_impl<double, double>(weight.data_ptr<double>(), mk, rp, ci, fl, g, packed.data_ptr<double>());
      break;
    case at::kFloat:
      by_packed(float());
      break;
    case at::kBFloat16:
      by_packed(c10::BFloat16());
      break;
    default:
      by_packed(c10::Half());
      break;
  }
  return packed;
}

Tensor masked_linear_packed_cpu(const Tensor& x, const Tensor& packed, const std::optional<Tensor>& bias,
                                const Tensor& row_ptr, const Tensor& col_idx, int64_t out_features, int64_t block_n,
                                int64_t block_k) {
  const char* op = "masked_linear_packed";
  check_tensor(op, "x", x, 2);
  check_floating(op, "x", x);
  check_tensor(op, "packed", packed, 1);
  check_dtype(op, "packed", packed, x.scalar_type(), "of x's dtype (pack with dtype=x.dtype)");
  check_blocks(op, block_n, block_k);
  TORCH_CHECK(out_features >= 0, "nnopt::", op, ": out_features must be >= 0, got ", out_features);
  const int64_t M = x.size(0), N = out_features, K = x.size(1);
  const Geometry g = geometry(N, K, block_n, block_k);
  check_compressed(op, "row_ptr", row_ptr, "col_idx", col_idx, g.NB, g.KB, "block rows");
  TORCH_CHECK(packed.numel() == col_idx.numel() * g.panel, "nnopt::", op, ": packed has ", packed.numel(),
              " elements, the layout's ", col_idx.numel(), " tiles of ", block_n, "x", block_k, " need ",
              col_idx.numel() * g.panel, " (pack it with masked_linear_pack from this layout and x's features)");
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, 1);
    check_dtype(op, "bias", *bias, x.scalar_type(), "of x's dtype");
    TORCH_CHECK(bias->numel() == N, "nnopt::", op, ": bias must have ", N, " entries (out_features), got ",
                bias->numel());
  }
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  switch (x.scalar_type()) {
    case at::kFloat:
      dispatch_packed<float>(x.data_ptr<float>(), packed.data_ptr(),
                             bias.has_value() ? bias->data_ptr<float>() : nullptr, rp, ci, g, M, y.data_ptr<float>());
      break;
    case at::kDouble:
      dispatch_packed<double>(x.data_ptr<double>(), packed.data_ptr(),
                              bias.has_value() ? bias->data_ptr<double>() : nullptr, rp, ci, g, M,
                              y.data_ptr<double>());
      break;
    case at::kBFloat16:
      dispatch_packed<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), packed.data_ptr(),
                                     bias.has_value() ? bias->data_ptr<c10::BFloat16>() : nullptr, rp, ci, g, M,
                                     y.data_ptr<c10::BFloat16>());
      break;
    default:
      dispatch_packed<c10::Half>(x.data_ptr<c10::Half>(), packed.data_ptr(),
                                 bias.has_value() ? bias->data_ptr<c10::Half>() : nullptr, rp, ci, g, M,
                                 y.data_ptr<c10::Half>());
      break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(nnopt, CPU, m) {
  m.impl("masked_linear_pack", &masked_linear_pack_cpu);
  m.impl("masked_linear_packed", &masked_linear_packed_cpu);
}

}  // namespace nnopt
