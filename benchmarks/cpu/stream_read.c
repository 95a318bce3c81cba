/* How fast this machine's cores can read a buffer of a model's size: the floor under a batch-1
 * decode step, which reads every weight once (SmolLM2-135M Q4_1 GGUF: ~96.5 MB per token, the
 * Q8_0 LM head included). Best of REPS passes over SIZE_MIB, OpenMP threads as OMP_NUM_THREADS.
 *
 *   gcc -O3 -march=native -fopenmp benchmarks/cpu/stream_read.c -o /tmp/stream_read
 *   for t in 1 2; do OMP_NUM_THREADS=$t /tmp/stream_read 96 30; done
 *
 * AVX-512 loads where the compiler targets them, AVX2 otherwise; four independent accumulators
 * per thread keep the adds off the critical path, so the loop is bound by the loads alone. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
typedef __m512i vec;
#define LOAD(p) _mm512_load_si512((const void*)(p))
#define ADD(a, b) _mm512_add_epi32(a, b)
#define ZERO() _mm512_setzero_si512()
#define WIDTH 64
#else
typedef __m256i vec;
#define LOAD(p) _mm256_load_si256((const __m256i*)(p))
#define ADD(a, b) _mm256_add_epi32(a, b)
#define ZERO() _mm256_setzero_si256()
#define WIDTH 32
#endif

int main(int argc, char** argv) {
  size_t bytes = (size_t)(argc > 1 ? atol(argv[1]) : 96) << 20;
  int reps = argc > 2 ? atoi(argv[2]) : 30;
  char* buf = aligned_alloc(64, bytes);
  memset(buf, 1, bytes);
  double best = 1e30;
  volatile int sink = 0;
  for (int r = 0; r < reps; r++) {
    double t = omp_get_wtime();
    int total = 0;
#pragma omp parallel reduction(+ : total)
    {
      vec a = ZERO(), b = ZERO(), c = ZERO(), d = ZERO();
#pragma omp for schedule(static)
      for (size_t i = 0; i < bytes; i += 4 * WIDTH) {
        a = ADD(a, LOAD(buf + i));
        b = ADD(b, LOAD(buf + i + WIDTH));
        c = ADD(c, LOAD(buf + i + 2 * WIDTH));
        d = ADD(d, LOAD(buf + i + 3 * WIDTH));
      }
      int lanes[WIDTH / 4];
      memcpy(lanes, (int[WIDTH / 4]){0}, sizeof lanes);
      vec s = ADD(ADD(a, b), ADD(c, d));
      memcpy(lanes, &s, sizeof lanes);
      for (int k = 0; k < WIDTH / 4; k++) total += lanes[k];
    }
    t = omp_get_wtime() - t;
    if (t < best) best = t;
    sink += total;
  }
  printf("%d thread(s), %zu MiB: best %.3f ms per pass, %.1f GB/s\n", omp_get_max_threads(), bytes >> 20,
         best * 1e3, bytes / best / 1e9);
  free(buf);
  return sink == 42;
}
