/* What a second row costs pltkit.RowsMatMulNBits' inner loops alone, outside ONNX Runtime: the kernel's chunk()
 * over the large benchmark shape's layer stack (16 layers of 2048 x 3072, 2048 x 2048, 2048 x 11264 with SwiGLU,
 * 5632 x 2048; random codes), 2 threads each on a contiguous half of a layer's chunks (as ONNX Runtime's
 * ParallelFor shards them), 1 and 2 rows interleaved. Or, with `l2`, one thread over one 2048 x 512 layer that
 * stays in the L2: the arithmetic's own cost a 64-byte line of weights.
 *
 *   cc -O3 -std=c11 -pthread benchmarks/rows_matmul_c.c -o rows_matmul_c -lm && ./rows_matmul_c 4 [l2]
 *   (bits 4 or 8; -DPREFETCH=4096 builds the kernel with another prefetch distance)
 *
 * Prints the medians of 41 rounds and of the rounds' 2-row / 1-row ratios: ms, ns a 64-byte line of weights, and
 * GB/s of weights and scales read.
 */
#define _GNU_SOURCE
#include "../pltkit/runtime/kernels/rows_matmul.c"

#include <pthread.h>
#include <time.h>

const Slot *pltkit_api;  /* (the library's globals, which its ONNX Runtime glue would define) */
int pltkit_shape_reference;
uint64_t pltkit_op_cycles[OPS][2];

enum { LAYERS = 16, PER = 4, CALLS = LAYERS * PER, ROUNDS = 41 };
static const int64_t SHAPES[PER][3] = {{2048, 3072, 0}, {2048, 2048, 0}, {2048, 11264, 1}, {5632, 2048, 0}};
static Kernel kernels[CALLS];
static Call calls[CALLS];
static int ncalls;
static pthread_barrier_t barrier;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* a layer of random codes and scales 0.01; bytes: [0] its weights' and [1] all it reads, added up */
static Kernel layer(int64_t k, int64_t n, int bits, int swiglu, double bytes[2]) {
  Kernel kn = {.k = k, .n = n, .blocks = k / BLK, .bits = bits, .zero = bits == 4 ? 8 : 128, .groups = n / 16,
               .chunk = CHUNK_GROUPS, .swiglu = swiglu};
  const size_t wb = (size_t)(n * k * bits / 8), sb = (size_t)(n * kn.blocks) * sizeof(float);
  kn.w = aligned_alloc(64, wb), kn.s = aligned_alloc(64, sb);
  for (size_t i = 0; i < wb; i++) kn.w[i] = (uint8_t)(i * 2654435761u >> 13);
  for (size_t i = 0; i < sb / sizeof(float); i++) kn.s[i] = 0.01f;
  bytes[0] += (double)wb, bytes[1] += (double)(wb + sb);
  return kn;
}

static void *half(void *arg) {  /* thread `arg`'s half of every call's chunks, the calls in order */
  const int64_t t = (int64_t)arg;
  for (int l = 0; l < ncalls; l++) {
    const int64_t chunks = (kernels[l].groups + kernels[l].chunk - 1) / kernels[l].chunk;
    for (int64_t i = t * chunks / 2; i < (t + 1) * chunks / 2; i++) chunk(&calls[l], (size_t)i);
    if (ncalls > 1) pthread_barrier_wait(&barrier);
  }
  return NULL;
}

static int by_value(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  const int bits = argc > 1 ? atoi(argv[1]) : 4, l2 = argc > 2 && !strcmp(argv[2], "l2");
  if (bits != 4 && bits != 8) return fprintf(stderr, "bits: 4 or 8\n"), 2;
  int8_t *q = aligned_alloc(64, 2 * 5632);
  float d[2 * 176], *y = aligned_alloc(64, 2 * 11264 * sizeof(float));
  int32_t off[2 * 176];
  for (int i = 0; i < 2 * 5632; i++) q[i] = (int8_t)(i * 7);
  for (int i = 0; i < 2 * 176; i++) d[i] = 0.1f, off[i] = 3;
  double bytes[2] = {0, 0}, ms[2][ROUNDS], ratio[ROUNDS];
  ncalls = l2 ? 1 : CALLS;
  for (int l = 0; l < ncalls; l++)
    kernels[l] = l2 ? layer(2048, 512, bits, 0, bytes)
                    : layer(SHAPES[l % PER][0], SHAPES[l % PER][1], bits, (int)SHAPES[l % PER][2], bytes);
  pthread_barrier_init(&barrier, NULL, 2);
  const int repeat = l2 ? 200 : 1;  /* a layer in the L2: many passes a round */
  for (int r = 0; r < ROUNDS; r++)
    for (int rows = 1; rows <= 2; rows++) {
      for (int l = 0; l < ncalls; l++)
        calls[l] = (Call){&kernels[l], rows, q, d, off, y, kernels[l].swiglu ? kernels[l].n / 2 : kernels[l].n};
      const double start = now();
      for (int i = 0; i < repeat; i++) {
        pthread_t other;
        if (!l2) pthread_create(&other, NULL, half, (void *)1);
        if (l2) {
          for (int64_t c = 0; c < kernels[0].groups / kernels[0].chunk; c++) chunk(&calls[0], (size_t)c);
        } else {
          half((void *)0);
          pthread_join(other, NULL);
        }
      }
      ms[rows - 1][r] = (now() - start) * 1e3 / repeat;
    }
  for (int r = 0; r < ROUNDS; r++) ratio[r] = ms[1][r] / ms[0][r];
  qsort(ms[0], ROUNDS, sizeof(double), by_value), qsort(ms[1], ROUNDS, sizeof(double), by_value);
  qsort(ratio, ROUNDS, sizeof(double), by_value);
  const double lines = bytes[0] / 64;  /* of weights */
  printf("int%d, %s: 1 row %.3f ms (%.3f ns a line, %.1f GB/s), 2 rows %.3f ms (%.3f ns a line); 2 rows / 1 row "
         "%.3f (quartiles %.3f-%.3f)\n", bits, l2 ? "one layer in the L2, 1 thread" : "large layer stack, 2 threads",
         ms[0][ROUNDS / 2], ms[0][ROUNDS / 2] * 1e6 / lines, bytes[1] / ms[0][ROUNDS / 2] / 1e6, ms[1][ROUNDS / 2],
         ms[1][ROUNDS / 2] * 1e6 / lines, ratio[ROUNDS / 2], ratio[ROUNDS / 4], ratio[3 * ROUNDS / 4]);
  return 0;
}
