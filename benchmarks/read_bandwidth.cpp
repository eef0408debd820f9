// The machine's read bandwidth as a kernel can get it: each of T threads reads its share of a
// 1 GiB buffer as S sequential streams side by side (S = 1, 2, 4, 8), 64 bytes of each in turn;
// prints "S GB/s sink" per S (sink: a bit of the data read, so that the reads are not optimised
// away), the best of 5 passes after an untimed one. torch.sum reads one stream a
// thread, which hardware prefetchers serve more slowly than several on some CPUs (AMD EPYC Zen 1:
// 20 GB/s against 24 GB/s with 4 streams a thread, 2 threads): decode.py takes the larger as the
// bound. Built by decode.py (`c++ -O3 -mavx2 -fopenmp`); a benchmark tool, not part of qlin.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const size_t n = size_t{1} << 30;
  std::vector<uint8_t> buf(n, 1);
  omp_set_num_threads(threads);
  for (int streams : {1, 2, 4, 8}) {
    double best = 1e30;
    long long sink = 0;
    int team = threads;  // the threads OpenMP gave (OMP_THREAD_LIMIT, OMP_DYNAMIC may give fewer)
    for (int pass = 0; pass < 6; ++pass) {
      const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel reduction(+ : sink)
      {
#pragma omp single
        team = omp_get_num_threads();
        const size_t part = n / omp_get_num_threads(), run = part / streams / 64 * 64;
        const uint8_t* base = buf.data() + part * omp_get_thread_num();
        __m256i acc = _mm256_setzero_si256();
        for (size_t i = 0; i < run; i += 64)
          for (int s = 0; s < streams; ++s) {
            const uint8_t* p = base + s * run + i;
            acc = _mm256_xor_si256(acc, _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))));
          }
        sink += _mm256_extract_epi64(acc, 0);
      }
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (pass > 0) best = std::min(best, dt);
    }
    const size_t read = n / team / streams / 64 * 64 * streams * team;
    std::printf("%d %.3f %lld\n", streams, read / best / 1e9, sink & 1);
  }
  return 0;
}
