/* Softmax attention of a few queries over a run of keys, for pltkit's attention kernels (step_attention.c,
 * ring_mix.c): AVX-512, the queries' partial sums in registers, the keys and values read in order and prefetched.
 */
#ifndef PLTKIT_ATTEND_H
#define PLTKIT_ATTEND_H
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

/* MAX_LANES: up to 256 queries; AHEAD: bytes of keys and values prefetched ahead of the ones read (2048, 4096,
 * 8192 and 32768 measured alike) */
enum { MAX_LANES = 16, AHEAD = 4096 };

/* the rows of queries attend() takes for n: 4, 8 or a multiple of 16 */
static inline int64_t pad_queries(int64_t n) { return n <= 4 ? 4 : n <= 8 ? 8 : (n + 15) / 16 * 16; }

/* The heads of an attention op, its attributes num_heads, kv_num_heads and scale: NULL, or why `op` cannot run
 * them (a positive multiple of the kv heads, at most 16 * MAX_LANES = 256 query heads a kv head) */
typedef struct { int64_t heads, kv_heads; float scale; } Heads;

static inline OrtStatus *read_heads(const OrtKernelInfo *info, const char *op, Heads *h) {
  typedef OrtStatus *(*GetInt)(const OrtKernelInfo *, const char *, int64_t *);
  TRY(CALL(ATTRIBUTE_INT64, GetInt)(info, "num_heads", &h->heads));
  TRY(CALL(ATTRIBUTE_INT64, GetInt)(info, "kv_num_heads", &h->kv_heads));
  TRY(CALL(ATTRIBUTE_FLOAT, OrtStatus *(*)(const OrtKernelInfo *, const char *, float *))(info, "scale", &h->scale));
  if (h->heads >= 1 && h->kv_heads >= 1 && h->heads % h->kv_heads == 0 &&
      pad_queries(h->heads / h->kv_heads) <= 16 * MAX_LANES)
    return NULL;
  char msg[160];
  snprintf(msg, sizeof msg, "%s: num_heads must be a positive multiple of kv_num_heads, at most 256 times it", op);
  return error(ORT_INVALID_ARGUMENT, msg);
}

/* *out = a copy of the `size` bytes at k on the heap, as a kernel's state (freed by KernelDestroy) */
static inline OrtStatus *keep(const void *k, size_t size, const char *op, void **out) {
  char msg[80];
  if ((*out = malloc(size))) return memcpy(*out, k, size), NULL;
  snprintf(msg, sizeof msg, "%s: out of memory", op);
  return error(ORT_FAIL, msg);
}

static inline AVX512 __m512 exp512(__m512 x) {  /* e^x for x <= 0, within 2e-7 relative */
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);  /* x - k ln 2, in two parts */
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  static const float taylor[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  for (int i = 0; i < 7; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(taylor[i]));
  return _mm512_scalef_ps(p, k);
}

static inline AVX512 __mmask16 tail(int64_t left) {
  return left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

/* the sums of a, b, c and d, as the four lanes of a 128-bit vector */
static inline AVX512 __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  /* a b a b per 128 bits */
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  /* a b c d per 128 */
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));
  return _mm512_castps512_ps128(x);
}

/* the scores of 4 queries (q: [4, Dh]) against K keys from `key` (rows of Dh): p[j][0..3] for key j, rows of
 * `stride`. A block of K keys by 4 queries keeps every partial sum in a register. Each step of 16 dimensions also
 * prefetches the next `per` bytes from `ahead`, so that lines keep coming in while the arithmetic runs. */
static inline __attribute__((always_inline)) AVX512 void block4(int K, const float *q, const float *key, int64_t dh,
                                                                int64_t stride, float *p, const char *ahead,
                                                                int64_t per) {
  __m512 acc[4][4];
  for (int j = 0; j < K; j++)
    for (int i = 0; i < 4; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t e = 0; e < dh; e += 16, ahead += per) {
    const __mmask16 m = tail(dh - e);
    for (int64_t b = 0; b < per; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    __m512 qe[4];
    for (int i = 0; i < 4; i++) qe[i] = _mm512_maskz_loadu_ps(m, q + i * dh + e);
    for (int j = 0; j < K; j++) {
      const __m512 k = _mm512_maskz_loadu_ps(m, key + j * dh + e);
      for (int i = 0; i < 4; i++) acc[j][i] = _mm512_fmadd_ps(qe[i], k, acc[j][i]);
    }
  }
  for (int j = 0; j < K; j++) _mm_storeu_ps(p + j * stride, sum4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]));
}

/* the lines of [from, from + bytes) on their way into the cache: the cache buffer is read once a step, from memory,
 * and the hardware's prefetcher alone left two cores at a third of the bandwidth the matrix products get */
static inline void prefetch(const float *from, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)from + b, _MM_HINT_T0);
}

/* the scores of npad queries (4 at a time) against keys [0, n), p[t][i] (rows of npad). Each block of 4 keys
 * meets every query while it is in the L1, so all the arithmetic runs while the next keys come from memory. With
 * one pass over the keys for each 4 queries, the second pass ran on cached keys with the memory idle: 2 rows took
 * 1.07x this time (docs/benchmarks.md). The keys' lines AHEAD bytes on are prefetched a few at a time through
 * the dot products (those of the first 4 blocks of queries). Prefetched all at once for each 4 keys, they had left
 * the memory idle while the arithmetic ran: StepAttention took 1.05x (1 row) and 1.11x (2 rows) this time. */
static inline AVX512 void scores(const float *q, int64_t npad, const float *keys, int64_t n, int64_t dh, float *p) {
  const int64_t blocks = npad / 4 < 4 ? npad / 4 : 4, per = 256 / blocks, share = per * ((dh + 15) / 16);
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const char *ahead = (const char *)(keys + t * dh) + AHEAD;
    for (int64_t i = 0; i < npad; i += 4)
      block4(4, q + i * dh, keys + t * dh, dh, npad, p + t * npad + i, ahead + i / 4 * share,
             i / 4 < blocks ? per : 0);
  }
  for (; t < n; t++)
    for (int64_t i = 0; i < npad; i += 4)
      block4(1, q + i * dh, keys + t * dh, dh, npad, p + t * npad + i, (const char *)keys, 0);
}

/* y [G, Dh] = the weights p of G queries (p[t][i], rows of `stride`) times values [0, n), W vectors of
 * 16 values at a time (G * W accumulators in registers) */
static inline __attribute__((always_inline)) AVX512 void weigh(int G, int W, const float *p, int64_t stride,
                                                               const float *values, int64_t n, int64_t dh,
                                                               float *y) {
  for (int64_t e = 0; e < dh; e += 16 * W) {
    __mmask16 m[2];
    __m512 acc[2][16];
    for (int w = 0; w < W; w++) {
      m[w] = tail(dh - e - 16 * w);
      for (int i = 0; i < G; i++) acc[w][i] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < n; t++) {
      const float *weights = p + t * stride, *v = values + t * dh + e;
      if (!e) prefetch(values + t * dh + AHEAD / 4, dh * 4);
      __m512 vw[2];
      for (int w = 0; w < W; w++) vw[w] = _mm512_maskz_loadu_ps(m[w], v + 16 * w);
      for (int i = 0; i < G; i++) {
        const __m512 x = _mm512_set1_ps(weights[i]);
        for (int w = 0; w < W; w++) acc[w][i] = _mm512_fmadd_ps(x, vw[w], acc[w][i]);
      }
    }
    for (int w = 0; w < W; w++)
      for (int i = 0; i < G; i++) _mm512_mask_storeu_ps(y + i * dh + e + 16 * w, m[w], acc[w][i]);
  }
}

/* the same for G queries (p[t][0 .. G-1], rows of `stride`) and head sizes of V * 16, whole rows of values at a
 * time: the G weights of a key broadcast, then each vector of 16 values loaded once for all G accumulators, so
 * G * V + G + 1 registers of AVX-512's 32 (G up to 6 for V 4, 3 for V 8, 1 for V 16). The first pass over the
 * values reads them from memory (prefetching a line with each vector), the others from the cache. */
static inline __attribute__((always_inline)) AVX512 void weigh_rows(int G, int V, const float *p, int64_t stride,
                                                                    const float *values, int64_t n, int first,
                                                                    float *y) {
  __m512 acc[24];
  for (int a = 0; a < G * V; a++) acc[a] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t++) {
    const float *v = values + t * V * 16, *weights = p + t * stride;
    __m512 x[6];
    for (int i = 0; i < G; i++) x[i] = _mm512_set1_ps(weights[i]);
    for (int w = 0; w < V; w++) {
      if (first) _mm_prefetch((const char *)(v + 16 * w) + AHEAD, _MM_HINT_T0);  /* a line at a time, as scores() */
      __m512 row = _mm512_loadu_ps(v + 16 * w);
      __asm__("" : "+v"(row));  /* one load for the G multiply-adds, not one each */
      for (int i = 0; i < G; i++) acc[i * V + w] = _mm512_fmadd_ps(x[i], row, acc[i * V + w]);
    }
  }
  for (int i = 0; i < G; i++)
    for (int w = 0; w < V; w++) _mm512_storeu_ps(y + i * V * 16 + 16 * w, acc[i * V + w]);
}

/* weigh_rows for g = 1 .. most(V) queries, V = Dh / 16 in 4, 8 and 16 (the compiler keeps each case's G * V
 * accumulators in registers) */
static inline int most_queries(int64_t v) { return v == 4 ? 6 : v == 8 ? 3 : 1; }
#define WEIGH_CASE(G, V) \
  case G: weigh_rows(G, V, p, stride, values, n, first, y); return;
static AVX512 void weigh_queries(int g, int64_t v, const float *p, int64_t stride, const float *values, int64_t n,
                                 int first, float *y) {
  if (v == 4) switch (g) { WEIGH_CASE(1, 4) WEIGH_CASE(2, 4) WEIGH_CASE(3, 4) WEIGH_CASE(4, 4) WEIGH_CASE(5, 4)
                           WEIGH_CASE(6, 4) }
  if (v == 8) switch (g) { WEIGH_CASE(1, 8) WEIGH_CASE(2, 8) WEIGH_CASE(3, 8) }
  if (v == 16 && g == 1) { weigh_rows(1, 16, p, stride, values, n, first, y); return; }
  for (int i = 0; i < g; i++)  /* (no other g and v are asked for: most_queries) */
    for (int64_t e = 0; e < v * 16; e++) {
      float acc = 0.f;
      for (int64_t t = 0; t < n; t++) acc += p[t * stride + i] * values[t * v * 16 + e];
      y[i * v * 16 + e] = acc;
    }
}
#undef WEIGH_CASE

/* npad queries q [npad, Dh] (scaled; rows past the nq real ones zero) over keys and values [0, n) (rows of Dh),
 * n >= 1: per query the max score top, the sum of e^(score - top) and y [npad, Dh] (rows nq.. may be left
 * unwritten), the sum of those weights times the values. p: n * npad floats of scratch, the scores key-major
 * (p[t][i]), so a vector of 16 holds 16 / npad keys (npad 4 or 8) or part of one key's queries (npad a multiple
 * of 16). */
static AVX512 void attend(const float *q, int64_t nq, int64_t npad, const float *keys, const float *values, int64_t n,
                          int64_t dh, float *p, float *top, float *sum, float *y) {
  scores(q, npad, keys, n, dh, p);
  const int64_t flat = n * npad, lanes = npad < 16 ? 1 : npad / 16;  /* vector v: queries of lanes[v % lanes] */
  __m512 acc[MAX_LANES];
  for (int64_t l = 0; l < lanes; l++) acc[l] = _mm512_set1_ps(-INFINITY);
  for (int64_t f = 0; f < flat; f += 16) {
    __m512 *a = &acc[f / 16 % lanes];
    *a = _mm512_max_ps(*a, _mm512_mask_loadu_ps(*a, tail(flat - f), p + f));
  }
  float lane[16];
  for (int64_t i = 0; i < npad; i++) top[i] = -INFINITY, sum[i] = 0.f;
  for (int64_t l = 0; l < lanes; l++) {
    _mm512_storeu_ps(lane, acc[l]);
    for (int j = 0; j < 16; j++) top[(16 * l + j) % npad] = fmaxf(top[(16 * l + j) % npad], lane[j]);
  }
  for (int64_t l = 0; l < lanes; l++) {  /* the shift of each lane, then the sums */
    for (int j = 0; j < 16; j++) lane[j] = top[(16 * l + j) % npad];
    acc[l] = _mm512_loadu_ps(lane);
  }
  __m512 total[MAX_LANES];
  for (int64_t l = 0; l < lanes; l++) total[l] = _mm512_setzero_ps();
  for (int64_t f = 0; f < flat; f += 16) {
    const __mmask16 m = tail(flat - f);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + f), acc[f / 16 % lanes]));
    total[f / 16 % lanes] = _mm512_add_ps(total[f / 16 % lanes], _mm512_maskz_mov_ps(m, e));
    _mm512_mask_storeu_ps(p + f, m, e);
  }
  for (int64_t l = 0; l < lanes; l++) {
    _mm512_storeu_ps(lane, total[l]);
    for (int j = 0; j < 16; j++) sum[(16 * l + j) % npad] += lane[j];
  }
  if (dh == 64 || dh == 128 || dh == 256) {  /* the real queries only, in as few passes as fit, evened out */
    const int64_t most = most_queries(dh / 16), passes = (nq + most - 1) / most, g = (nq + passes - 1) / passes;
    for (int64_t i0 = 0; i0 < nq; i0 += g)
      weigh_queries((int)(nq - i0 < g ? nq - i0 : g), dh / 16, p + i0, npad, values, n, !i0, y + i0 * dh);
    return;
  }
  for (int64_t i = 0; i < npad; i += 16) {
    const int64_t g = npad - i < 16 ? npad - i : 16;
    if (g == 4) weigh(4, 2, p + i, npad, values, n, dh, y + i * dh);
    else if (g == 8) weigh(8, 2, p + i, npad, values, n, dh, y + i * dh);
    else weigh(16, 1, p + i, npad, values, n, dh, y + i * dh);
  }
}

/* x rotated at one position (cos, sin: that position's row of the caches), or copied, times `scale`. Products
 * and sums as the scalar statement has them (no fused multiply-add): the same bits. */
static AVX512 void rotate(const float *x, const float *cs, const float *sn, int64_t dh, float scale, float *out) {
  const __m512 k = _mm512_set1_ps(scale);
  if (!cs) {
    for (int64_t i = 0; i < dh; i += 16)
      _mm512_mask_storeu_ps(out + i, tail(dh - i), _mm512_mul_ps(k, _mm512_maskz_loadu_ps(tail(dh - i), x + i)));
    return;
  }
  const int64_t half = dh / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = tail(half - i);
    const __m512 a = _mm512_maskz_loadu_ps(m, x + i), b = _mm512_maskz_loadu_ps(m, x + i + half);
    const __m512 c = _mm512_maskz_loadu_ps(m, cs + i), s = _mm512_maskz_loadu_ps(m, sn + i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(k, _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s))));
    _mm512_mask_storeu_ps(out + i + half, m, _mm512_mul_ps(k, _mm512_add_ps(_mm512_mul_ps(b, c), _mm512_mul_ps(a, s))));
  }
}

#endif
