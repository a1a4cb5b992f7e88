/* What a second row costs pltkit.StepAttention's inner loops alone, outside ONNX Runtime: attend() (attend.h) over
 * chunks of 256 keys of a global cache, nq query heads a kv head (1 row) against 2 * nq (2 rows), interleaved.
 *
 *   cc -O3 -std=gnu11 -pthread benchmarks/attend_c.c -o attend_c -lm
 *   ./attend_c DH NQ [LAYERS] [l2]     # e.g. 128 4 16 (the large shape at 4k tokens), 64 3 16 (medium)
 *
 * By default the caches of LAYERS layers (4 kv heads, 4096 positions; 16 layers at Dh 128 are 268 MB) are read
 * from memory, each layer's chunks split between 2 threads as ONNX Runtime's ParallelFor splits them. With `l2`,
 * one thread over one chunk that stays in the L2: the arithmetic alone, in cycles of the time-stamp counter a key.
 * Prints the medians of 15 rounds (ms, GB/s of keys and values) and of the rounds' 2-row / 1-row ratios.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <time.h>

#include "../pltkit/runtime/kernels/attend.h"

const Slot *pltkit_api;  /* (the library's global, which its ONNX Runtime glue would define) */

enum { KV = 4, CTX = 4096, CH = 256, ROUNDS = 15 };
static int64_t dh, nq, layers;
static float **keys, **values, *queries;
static pthread_barrier_t barrier;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void chunks(int64_t first, int64_t end, int64_t layer, int64_t n) {  /* chunks [first, end) of a layer */
  float *scratch = aligned_alloc(64, sizeof(float) * (size_t)(16 * CH + 16 * (2 + dh)));
  for (int64_t u = first; u < end; u++)
    attend(queries, n, pad_queries(n), keys[layer] + u * CH * dh, values[layer] + u * CH * dh, CH, dh, scratch,
           scratch + 16 * CH, scratch + 16 * CH + 16, scratch + 16 * CH + 32);
  free(scratch);
}

static int64_t rows_now;  /* the second thread's task: 1 or 2 rows, 0 to stop */
static void *second(void *arg) {
  (void)arg;
  for (;;) {
    pthread_barrier_wait(&barrier);
    if (!rows_now) return NULL;
    const int64_t units = KV * CTX / CH;
    for (int64_t l = 0; l < layers; l++) chunks(units / 2, units, l, rows_now * nq);
    pthread_barrier_wait(&barrier);
  }
}

static double median(double *x) {
  for (int i = 1; i < ROUNDS; i++)  /* (insertion sort: 15 values) */
    for (int j = i; j > 0 && x[j - 1] > x[j]; j--) { const double t = x[j]; x[j] = x[j - 1], x[j - 1] = t; }
  return x[ROUNDS / 2];
}

int main(int argc, char **argv) {
  if (argc < 3) return fprintf(stderr, "usage: attend_c DH NQ [LAYERS] [l2]\n"), 2;
  dh = atoi(argv[1]), nq = atoi(argv[2]), layers = argc > 3 ? atoi(argv[3]) : 16;
  const int l2 = argc > 4 && !strcmp(argv[4], "l2");
  if (dh < 16 || dh > 256 || dh % 16 || nq < 1 || 2 * nq > 64 || layers < 1) return fprintf(stderr, "bad sizes\n"), 2;
  const size_t per_layer = (size_t)(KV * CTX * dh);
  keys = malloc(sizeof(float *) * (size_t)layers), values = malloc(sizeof(float *) * (size_t)layers);
  for (int64_t l = 0; l < layers; l++) {
    keys[l] = aligned_alloc(64, per_layer * sizeof(float)), values[l] = aligned_alloc(64, per_layer * sizeof(float));
    for (size_t i = 0; i < per_layer; i++) keys[l][i] = (float)(i * 7919 % 13) * 0.01f, values[l][i] = (float)(i % 5);
  }
  queries = aligned_alloc(64, sizeof(float) * (size_t)(64 * dh));
  for (int64_t i = 0; i < 64 * dh; i++) queries[i] = (float)(i % 3) * 0.01f;
  double t[2][ROUNDS], ratio[ROUNDS];
  pthread_t thread;
  pthread_barrier_init(&barrier, NULL, 2);
  if (!l2) pthread_create(&thread, NULL, second, NULL);
  for (int r = 0; r < ROUNDS; r++)
    for (int k = 0; k < 2; k++) {
      const int64_t rows = (r + k) % 2 + 1, units = KV * CTX / CH;  /* 1 row first in even rounds */
      double start;
      if (l2) {
        start = now();
        for (int i = 0; i < 2000; i++) chunks(0, 1, 0, rows * nq);
      } else {
        rows_now = rows;
        pthread_barrier_wait(&barrier);
        start = now();
        for (int64_t l = 0; l < layers; l++) chunks(0, units / 2, l, rows * nq);
        pthread_barrier_wait(&barrier);
      }
      t[rows - 1][r] = now() - start;
    }
  if (!l2) rows_now = 0, pthread_barrier_wait(&barrier), pthread_join(thread, NULL);
  for (int r = 0; r < ROUNDS; r++) ratio[r] = t[1][r] / t[0][r];
  const double one = median(t[0]), two = median(t[1]), pairs = median(ratio);
  if (l2) {
    const uint64_t c0 = __builtin_ia32_rdtsc();
    const double s0 = now();
    while (now() - s0 < 0.05) continue;
    const double hz = (double)(__builtin_ia32_rdtsc() - c0) / (now() - s0), keys_run = 2000.0 * CH;
    printf("dh %ld, in the L2: %ld queries %.1f cycles a key, %ld queries %.1f; 2 rows / 1 row %.3f\n", (long)dh,
           (long)nq, one * hz / keys_run, (long)(2 * nq), two * hz / keys_run, pairs);
  } else {
    const double gb = 2.0 * (double)per_layer * (double)layers * sizeof(float) / 1e9;
    printf("dh %ld, %ld layers (%.0f MB) from memory: %ld queries %.2f ms (%.1f GB/s), %ld queries %.2f ms; "
           "2 rows / 1 row %.3f\n", (long)dh, (long)layers, gb * 1e3, (long)nq, one * 1e3, gb / one, (long)(2 * nq),
           two * 1e3, pairs);
  }
  return 0;
}
