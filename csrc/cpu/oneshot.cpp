// CPU kernel of SparseGPT's column-block update (nnopt::sparsegpt_block_), the hot loop of one-shot pruning.
//
// Semantics (oracle and `torch` backend: nnopt/reference/oneshot.py, sparsegpt_block_; driver:
// nnopt/prune/sparsegpt.py): for one block of `count` columns, w [rows, count] holds the weights as updated so
// far, u [count, count] the block's rows of the upper Cholesky factor of H^-1, pruned [rows, count] (bool) the
// entries to prune. Column by column, i = 0..count-1, in every row:
//     (N:M, m > 0, at i % m == 0: the m - n lowest of w_j^2 / u_jj^2 over the group's columns, already pruned
//      entries counting as -1, are marked pruned; ties: the lower column first)
//     q = pruned_i ? 0 : w_i;   e_i = (w_i - q) / u_ii;   w_j -= e_i * u_ij for j > i;   w_i = q
// On return w holds the pruned block, err [rows, count] the errors e, pruned the final mask.
//
// Rows are independent, so one at::parallel_for splits them; each row's `count` weights stay in L1 and u in L2
// for the whole block, where the torch loop streams the [rows, count] block through memory once per column.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include "nnopt/fresh_memory.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#define NNOPT_AMX 1
#endif

namespace nnopt {
namespace {

using at::Tensor;

template <typename T>
void block_rows(T* w, const T* u, bool* pruned, T* err, int64_t rows, int64_t count, int64_t n, int64_t m) {
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    std::vector<T> tmp(std::max<int64_t>(m, 1));
    std::vector<char> picked(std::max<int64_t>(m, 1));
    for (int64_t r = r0; r < r1; ++r) {
      T* wr = w + r * count;
      bool* pr = pruned + r * count;
      T* er = err + r * count;
      for (int64_t i = 0; i < count; ++i) {
        if (m > 0 && i % m == 0) {
          const int64_t g = std::min(m, count - i);
          for (int64_t j = 0; j < g; ++j) {
            const T d = u[(i + j) * count + i + j];
            tmp[j] = pr[i + j] ? T(-1) : (wr[i + j] * wr[i + j]) / (d * d);
            picked[j] = 0;
          }
          for (int64_t k = 0; k < std::min(m - n, g); ++k) {
            int64_t best = -1;
            for (int64_t j = 0; j < g; ++j) {
              if (!picked[j] && (best < 0 || tmp[j] < tmp[best])) best = j;
            }
            picked[best] = 1;
            pr[i + best] = true;
          }
        }
        const T wi = wr[i];
        const T q = pr[i] ? T(0) : wi;
        const T e = (wi - q) / u[i * count + i];
        er[i] = e;
        wr[i] = q;
        if (e != T(0)) {
          const T* ui = u + i * count;
#pragma omp simd
          for (int64_t j = i + 1; j < count; ++j) wr[j] -= e * ui[j];
        }
      }
    }
  });
}

void sparsegpt_block_cpu(Tensor& w, const Tensor& u, Tensor& pruned, Tensor& err, int64_t n, int64_t m) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble),
              "sparsegpt_block_: w must be a contiguous 2-D float32/float64 CPU tensor, got ", w.sizes(), " ",
              w.scalar_type());
  const int64_t rows = w.size(0), count = w.size(1);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == count && u.size(1) == count && u.is_contiguous() &&
                  u.scalar_type() == w.scalar_type() && u.device().is_cpu(),
              "sparsegpt_block_: u must be a contiguous [", count, ", ", count, "] CPU tensor of w's dtype, got ",
              u.sizes(), " ", u.scalar_type());
  TORCH_CHECK(pruned.sizes() == w.sizes() && pruned.is_contiguous() && pruned.scalar_type() == at::kBool &&
                  pruned.device().is_cpu(),
              "sparsegpt_block_: pruned must be a contiguous bool CPU tensor of w's shape, got ", pruned.sizes(),
              " ", pruned.scalar_type());
  TORCH_CHECK(err.sizes() == w.sizes() && err.is_contiguous() && err.scalar_type() == w.scalar_type() &&
                  err.device().is_cpu(),
              "sparsegpt_block_: err must be a contiguous CPU tensor of w's shape and dtype, got ", err.sizes(),
              " ", err.scalar_type());
  TORCH_CHECK(m >= 0 && n >= 0 && n <= m, "sparsegpt_block_: need 0 <= n <= m (m = 0: no N:M), got n=", n,
              " m=", m);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sparsegpt_block_", [&] {
    block_rows<scalar_t>(w.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), pruned.data_ptr<bool>(),
                         err.data_ptr<scalar_t>(), rows, count, n, m);
  });
}

// ---- the calibration Hessian on bf16 matrix units -----------------------------------------------------------
//
// hessian_accumulate_(h, x, terms): h [K, K] float32 += the upper triangle (i <= j; the rest untouched) of
//     terms 1: hiᵀhi                                           hi = bf16(x), lo = bf16(x - hi)
//     terms 3: hiᵀhi + hiᵀlo + loᵀhi + diag(loᵀlo)              (~16 mantissa bits of x: float32-class accuracy)
// for x [T, K] float32. Every product of two bf16 values is exact in float32, so the error is only x's split
// (the omitted off-diagonal loᵀlo, ~2^-16 relative, zero-mean) and float32 accumulation; the diagonal loᵀlo is a
// bias (Σ lo² > 0) and costs O(TK), so it is kept.
//
// With AMX (Sapphire Rapids and later, after the kernel grants the tile state), the products run as
// TDPBF16PS tiles that accumulate in float32 (into h itself, chunk after chunk): oneDNN's bf16 GEMM would round
// each batch's product to bf16 (no float32 output on CPU in torch), which made the old hessian_dtype=bfloat16 path
// lossy. The batch runs in token chunks; per chunk, operands (one pass over x, pack_split): A tiles of hiᵀ/loᵀ (a
// tile row = one feature over 32 tokens) and B tiles of hi/lo in the VNNI layout (a tile row = 16 features × a
// token pair), 1 KiB each, the two tiles of a 32-wide block and 32-token step adjacent, on huge pages;
// T and K zero-padded to 32s. Tasks and blocking: amx_blocks. Without AMX (or NNOPT_AMX=0) the
// same products run as float32 GEMMs (exact products, float32 accumulation; slower than plain float32, so the
// Python side picks terms 3 by default only where amx_bf16_usable() is true).

#ifdef NNOPT_AMX
bool amx_probe() {
  const char* env = std::getenv("NNOPT_AMX");  // NNOPT_AMX=0: the portable path (tests, comparisons)
  if (env && std::strcmp(env, "0") == 0) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  if (!tile || !bf16) return false;
  // Linux hands out the AMX tile state (XTILEDATA, feature 18) per process on request (ARCH_REQ_XCOMP_PERM).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// dst = srcᵀ for a 16×16 matrix of 32-bit words (both 64-byte aligned, rows of 16 words): 4 rounds of shuffles.
__attribute__((target("avx512f"))) inline void transpose16x16(const uint32_t* src, uint32_t* dst) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(src + 16 * i);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4g + c] holds, in each 128-bit lane L, column 4L + c of rows 4g..4g+3.
  for (int c = 0; c < 4; ++c) {
    for (int g = 0; g < 4; g += 2) {
      t[4 * g + c] = _mm512_shuffle_i32x4(r[4 * g + c], r[4 * (g + 1) + c], 0x88);      // lanes 0, 2
      t[4 * g + c + 4] = _mm512_shuffle_i32x4(r[4 * g + c], r[4 * (g + 1) + c], 0xDD);  // lanes 1, 3
    }
  }
  // t[c], t[4+c] (rows 0-7) and t[8+c], t[12+c] (rows 8-15) hold lanes (0, 2) and (1, 3) of their two row
  // groups; one more lane shuffle gives output row 4L + c = column 4L + c of src.
  for (int c = 0; c < 4; ++c) {
    for (int h = 0; h < 2; ++h) {
      const __m512i lo = t[4 * h + c], hi = t[8 + 4 * h + c];
      _mm512_store_si512(dst + 16 * (c + 4 * h), _mm512_shuffle_i32x4(lo, hi, 0x88));
      _mm512_store_si512(dst + 16 * (c + 8 + 4 * h), _mm512_shuffle_i32x4(lo, hi, 0xDD));
    }
  }
}

// dst (1 KiB, 64-byte aligned) = src, with non-temporal stores.
__attribute__((target("avx512f"))) inline void stream_tile(const uint32_t* src, uint16_t* dst) {
  for (int q = 0; q < 16; ++q)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst) + q, _mm512_load_si512(src + 16 * q));
}

// One pass over x: hi = bf16(x) and lo = bf16(x - hi) (round to nearest even, as torch's .to(bfloat16)) straight
// into the tile layouts, with Σ_t lo² per feature (the diagonal loᵀlo). Tile (f, s) covers features 16f.. and
// tokens 32s..; out-of-range tokens/features are zeros. The B tile row p interleaves tokens 2p and 2p+1; read as
// 32-bit words the A tile is the B tile transposed (word (r, p) = tokens 2p, 2p+1 of feature r).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void pack_split(const float* x, int64_t ld, int64_t t,
                                                                      int64_t k, int64_t tc, int64_t kb16,
                                                                      uint16_t* ha, uint16_t* hb, uint16_t* la,
                                                                      uint16_t* lb, float* lo_sq) {
  alignas(64) uint16_t idx_v[32];
  for (int q = 0; q < 16; ++q) {
    idx_v[2 * q] = uint16_t(q);
    idx_v[2 * q + 1] = uint16_t(16 + q);
  }
  const __m512i idx = _mm512_load_si512(idx_v);
  // Feature strips of 16 blocks (1 KiB of each row of x), 32 tokens at a time across the strip: the reads of x
  // stay sequential within a page.
  constexpr int64_t STRIP = 16;
  at::parallel_for(0, (kb16 + STRIP - 1) / STRIP, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t strip = s0; strip < s1; ++strip) {
    const int64_t fa = strip * STRIP, fb = std::min(fa + STRIP, kb16);
    __m512 sqs[STRIP];
    for (auto& v : sqs) v = _mm512_setzero_ps();
    for (int64_t st = 0; st < tc; ++st) {
      for (int64_t f = fa; f < fb; ++f) {
        const int64_t c0 = 16 * f, cols = std::min<int64_t>(16, k - c0);
        const __mmask16 cm = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(cols, 0)) - 1);
        __m512& sq = sqs[f - fa];
        const int64_t off = ((f / 2) * tc + st) * 1024 + (f % 2) * 512;
        // Built in L1, then streamed out (non-temporal: 4 tiles of 1 KiB per block and step are written once and
        // read back only by amx_blocks, long after they have left the caches).
        alignas(64) uint32_t bh[256], bl_buf[256], tr[256];
        uint32_t* bl = lb ? bl_buf : nullptr;
        for (int64_t p = 0; p < 16; ++p) {
          const int64_t r0 = 32 * st + 2 * p, r1 = r0 + 1;
          const __m512 x0 = r0 < t && cols > 0 ? _mm512_maskz_loadu_ps(cm, x + r0 * ld + c0) : _mm512_setzero_ps();
          const __m512 x1 = r1 < t && cols > 0 ? _mm512_maskz_loadu_ps(cm, x + r1 * ld + c0) : _mm512_setzero_ps();
          const __m256bh h0 = _mm512_cvtneps_pbh(x0), h1 = _mm512_cvtneps_pbh(x1);
          const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)h0), (__m256i)h1, 1);
          _mm512_store_si512(bh + 16 * p, _mm512_permutexvar_epi16(idx, hh));
          if (bl) {
            const __m256bh l0 = _mm512_cvtneps_pbh(_mm512_sub_ps(x0, _mm512_cvtpbh_ps(h0)));
            const __m256bh l1 = _mm512_cvtneps_pbh(_mm512_sub_ps(x1, _mm512_cvtpbh_ps(h1)));
            const __m512i ll = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)l0), (__m256i)l1, 1);
            _mm512_store_si512(bl + 16 * p, _mm512_permutexvar_epi16(idx, ll));
            const __m512 g0 = _mm512_cvtpbh_ps(l0), g1 = _mm512_cvtpbh_ps(l1);
            sq = _mm512_add_ps(sq, _mm512_add_ps(_mm512_mul_ps(g0, g0), _mm512_mul_ps(g1, g1)));
          }
        }
        stream_tile(bh, hb + off);
        transpose16x16(bh, tr);
        stream_tile(tr, ha + off);
        if (bl) {
          stream_tile(bl, lb + off);
          transpose16x16(bl, tr);
          stream_tile(tr, la + off);
        }
      }
    }
    for (int64_t f = fa; f < fb && lo_sq; ++f) {
      const int64_t c0 = 16 * f, cols = std::min<int64_t>(16, k - c0);
      if (cols > 0) _mm512_mask_storeu_ps(lo_sq + c0, __mmask16((1u << std::min<int64_t>(cols, 16)) - 1), sqs[f - fa]);
    }
    }
    _mm_sfence();  // this thread's streamed tiles are globally visible before amx_blocks reads them
  });
}

// Accumulator tiles 0-3 (a 2×2 block of 16×16 float32) += A tiles 4, 5 × B tiles 6, 7.
__attribute__((target("amx-tile,amx-bf16"), always_inline)) inline void dp_2x2() {
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// Task (i-group, j): up to 4 blocks (i, j) of 32×32, i in the group, i <= j. Each block keeps its 2×2 float32
// accumulator tiles for the whole packed chunk, loaded from and stored back to h directly where the block lies
// strictly above the diagonal (a diagonal or edge block goes through an L1 buffer, and only its upper triangle is
// added). Consecutive tasks of a thread share the group's A strips (in L2: the caller sizes the chunk for that), and
// the j strip is reused by the group's blocks. Split: per step hiᵀlo, hiᵀhi, loᵀhi in that order, so each of the 8
// operand tiles is loaded once for 12 tile products (three passes, one per pair, load 12: measured 25% slower).
__attribute__((target("amx-tile,amx-bf16"))) void amx_blocks(float* h, int64_t k, const at::BFloat16* ha,
                                                            const at::BFloat16* hb, const at::BFloat16* la,
                                                            const at::BFloat16* lb, int64_t tc,
                                                            const std::vector<std::array<int32_t, 3>>& tasks) {
  const bool split = la != nullptr;
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b0, int64_t b1) {
      TileConfig cfg;
      for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
      }
      _tile_loadconfig(&cfg);
      alignas(64) float buf[32][32];
      for (int64_t task = b0; task < b1; ++task) {
        const int64_t ig = tasks[task][0], ni = tasks[task][1], j0 = 32 * int64_t(tasks[task][2]);
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t i0 = 32 * (ig + ii);
          const bool direct = j0 + 32 <= k && i0 + 32 <= j0;
          float* acc = direct ? h + i0 * k + j0 : &buf[0][0];
          const int64_t ld = direct ? k : 32;  // floats
          if (direct) {
            _tile_loadd(0, acc, ld * 4);
            _tile_loadd(1, acc + 16, ld * 4);
            _tile_loadd(2, acc + 16 * ld, ld * 4);
            _tile_loadd(3, acc + 16 * ld + 16, ld * 4);
          } else {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          }
          const at::BFloat16 *a = ha + (i0 / 32) * tc * 1024, *b = hb + (j0 / 32) * tc * 1024;
          const at::BFloat16 *al = split ? la + (i0 / 32) * tc * 1024 : nullptr;
          const at::BFloat16 *bl = split ? lb + (j0 / 32) * tc * 1024 : nullptr;
          for (int64_t s = 0; s < tc * 1024; s += 1024) {
            _tile_loadd(4, a + s, 64);
            _tile_loadd(5, a + s + 512, 64);
            if (split) {
              _tile_loadd(6, bl + s, 64);
              _tile_loadd(7, bl + s + 512, 64);
              dp_2x2();
            }
            _tile_loadd(6, b + s, 64);
            _tile_loadd(7, b + s + 512, 64);
            dp_2x2();
            if (split) {
              _tile_loadd(4, al + s, 64);
              _tile_loadd(5, al + s + 512, 64);
              dp_2x2();
            }
          }
          _tile_stored(0, acc, ld * 4);
          _tile_stored(1, acc + 16, ld * 4);
          _tile_stored(2, acc + 16 * ld, ld * 4);
          _tile_stored(3, acc + 16 * ld + 16, ld * 4);
          if (!direct) {
            const int64_t i_end = std::min<int64_t>(i0 + 32, k), j_end = std::min<int64_t>(j0 + 32, k);
            for (int64_t i = i0; i < i_end; ++i) {
              float* hr = h + i * k;
              for (int64_t j = std::max(j0, i); j < j_end; ++j) hr[j] += buf[i - i0][j - j0];
            }
          }
        }
      }
      _tile_release();
    });
}
#endif

bool amx_bf16_usable() {
#ifdef NNOPT_AMX
  static const bool ok = amx_probe();
  return ok;
#else
  return false;
#endif
}

void hessian_accumulate_cpu(Tensor& h, const Tensor& x, int64_t terms) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "hessian_accumulate_: x must be a 2-D float32 CPU tensor [tokens, K], got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t t = x.size(0), k = x.size(1);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == k && h.size(1) == k && h.is_contiguous() &&
                  h.scalar_type() == at::kFloat && h.device().is_cpu(),
              "hessian_accumulate_: h must be a contiguous float32 CPU tensor [", k, ", ", k, "], got ", h.sizes(),
              " ", h.scalar_type());
  TORCH_CHECK(terms == 1 || terms == 3, "hessian_accumulate_: terms must be 1 (hiᵀhi) or 3 (split), got ", terms);
  if (t == 0 || k == 0) return;
#ifdef NNOPT_AMX
  if (amx_bf16_usable()) {
    const bool split = terms == 3;
    // Tokens in chunks of `steps` 32-token steps, each packed then multiplied: the group's A strips of a chunk
    // (4 blocks × steps × 2 KiB per operand) stay in L2 at 512 KiB, and the packed operands take K × 8 KiB.
    const int64_t steps = split ? 32 : 64;
    const int64_t kp = (k + 31) / 32 * 32, kb16 = kp / 16, strip = kb16 * steps * 512;  // bf16 per operand
    const int64_t need = (split ? 4 : 2) * strip;
    // On huge pages: 4 KiB page faults on fresh operand memory cost ~30% of a 2048×4096 batch here.
    const auto opts = x.options().dtype(at::kBFloat16);
    std::optional<Tensor> fresh = fresh_mapping(need, opts);
    const Tensor ws = fresh ? *fresh : at::empty({need}, opts);
    uint16_t* base = reinterpret_cast<uint16_t*>(ws.data_ptr());
    uint16_t *ha = base, *hb = base + strip, *la = split ? base + 2 * strip : nullptr;
    uint16_t* lb = split ? base + 3 * strip : nullptr;
    const Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
    const Tensor lo_sq = split ? at::empty({k}, x.options()) : Tensor();
    // Tasks (first block row of a group of 4, blocks in the group with i <= j, j), group-major: consecutive tasks
    // of a thread share the group's A strips.
    std::vector<std::array<int32_t, 3>> tasks;
    const int64_t nb = kp / 32;
    for (int64_t g = 0; g < nb; g += 4)
      for (int64_t j = g; j < nb; ++j)
        tasks.push_back({int32_t(g), int32_t(std::min<int64_t>({4, nb - g, j - g + 1})), int32_t(j)});
    auto bf = [](const uint16_t* v) { return reinterpret_cast<const at::BFloat16*>(v); };
    for (int64_t r0 = 0; r0 < t; r0 += 32 * steps) {
      const int64_t rows = std::min(32 * steps, t - r0), tc = (rows + 31) / 32;
      pack_split(xc.const_data_ptr<float>() + r0 * xc.stride(0), xc.stride(0), rows, k, tc, kb16, ha, hb, la, lb,
                 split ? lo_sq.data_ptr<float>() : nullptr);
      amx_blocks(h.data_ptr<float>(), k, bf(ha), bf(hb), bf(la), bf(lb), tc, tasks);
      if (split) h.diagonal().add_(lo_sq);
    }
    return;
  }
#endif
  const Tensor hi = x.to(at::kBFloat16);
  const Tensor lo = terms == 3 ? x.sub(hi.to(at::kFloat)).to(at::kBFloat16) : Tensor();
  const Tensor hf = hi.to(at::kFloat);
  Tensor prod = at::mm(hf.t(), hf);
  if (terms == 3) {
    const Tensor lf = lo.to(at::kFloat);
    const Tensor cross = at::mm(hf.t(), lf);
    prod.add_(cross).add_(cross.t());
  }
  h.add_(prod.triu());
  if (terms == 3) h.diagonal().add_(lo.to(at::kFloat).square().sum(0));
}

}  // namespace

TORCH_LIBRARY_IMPL(nnopt, CPU, m) {
  m.impl("sparsegpt_block_", &sparsegpt_block_cpu);
  m.impl("hessian_accumulate_", &hessian_accumulate_cpu);
}

TORCH_LIBRARY_IMPL(nnopt, CompositeExplicitAutograd, m) {
  m.impl("amx_bf16_usable", [] { return amx_bf16_usable(); });
}

}  // namespace nnopt
