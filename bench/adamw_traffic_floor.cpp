// The memory floor of an AdamW step on this machine, for GPT-2 small's 124.4M fp32 parameters: a loop with the
// step's exact traffic (read p, g, m, v; write p, m, v: 28 bytes per parameter) and no arithmetic worth the name,
// split over the threads as a fused step is. No optimizer kernel can beat it; issue 13's real-set bar (AdamW
// >= 1.1x torch fused on GPT-2 small) is checked against it in bench/RESULTS.md.
//
//   g++ -O3 -march=native -fopenmp bench/adamw_traffic_floor.cpp -o /tmp/floor && OMP_NUM_THREADS=2 /tmp/floor
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  const long n = argc > 1 ? std::atol(argv[1]) : 124400000;
  float* a[4];
  for (auto& p : a) p = static_cast<float*>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64));
  float *p = a[0], *g = a[1], *m = a[2], *v = a[3];
#pragma omp parallel for schedule(static)  // first touch by the thread that streams it
  for (long i = 0; i < n; ++i) p[i] = 1.0f, g[i] = 1e-3f, m[i] = 0.0f, v[i] = 0.0f;
  std::vector<double> ts;
  for (int r = 0; r < 9; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; ++i) {
      const float gi = g[i];
      m[i] += gi, v[i] += gi, p[i] += gi;
    }
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  const double t = ts[ts.size() / 2];
  std::printf("%ld parameters, %d threads: %.2f ms per pass (median of 9), %.1f GB/s at 28 B/parameter\n", n,
              omp_get_max_threads(), 1e3 * t, 28.0 * n / t / 1e9);
}
