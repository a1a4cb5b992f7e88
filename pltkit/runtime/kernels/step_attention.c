/* pltkit.StepAttention: the global attention of a decode step (one token, R rows: its loops), over the
 * loop-0 cache buffer, written in place. Row 0's key and value go into the cache at the token's position,
 * and every row's query heads attend causally over the cache up to it. The graph's own function body
 * (pltkit/export/gqa.py, GQA.step_function) computes the same with one GroupQueryAttention call
 * and some ten layout nodes around it; this kernel reads each kv head's keys once for all the rows' query
 * heads of its group, and writes one position of the cache.
 *
 * S = 1 token, R rows, B batch, H heads, Hkv kv heads, Dh head size, rep = H / Hkv, n = R * rep, C capacity:
 *   0 query [R, B, 1, H*Dh], 1 key and 2 value [R, B, 1, Hkv*Dh]: the rows' projections (row 0's key and
 *     value are the token's; q and k not rotated where inputs 8-10 are given)
 *   3 past_key, 4 past_value [B, Hkv, C, Dh]: the cache buffer, shared with outputs 1 and 2 (written in
 *     place where they are the same memory, copied first where not)
 *   5 seqlens_k [B] int32, 6 total_sequence_length [] int32: the body's GroupQueryAttention lengths. The body
 *     writes the key at the n positions pos0 .. pos0 + n - 1 (seqlens_k = pos0 + n - 1); the kernel writes
 *     it at pos0 alone, and reads no position after it.
 *   7 attention_bias: optional, the body's (it hides the body's n - 1 copies of the key); not read here
 *   8 cos_cache, 9 sin_cache [P, Dh/2], 10 position_ids [B, n] int64: optional, together; q and k are
 *     rotated (rotate-half) at the position of their batch entry (column 0)
 * Outputs: 0 [R, B, 1, H*Dh]: softmax(scale q K^T) V over positions 0 .. pos0 for each row and head;
 *   1 present_key, 2 present_value [B, Hkv, C, Dh]: the cache with the token's key and value at pos0.
 * Attributes: num_heads, kv_num_heads (int), scale (float).
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

enum { IN_Q, IN_K, IN_V, IN_PAST_K, IN_PAST_V, IN_SEQLENS, IN_TOTAL, IN_BIAS, IN_COS, IN_SIN, IN_POS, INPUTS };
/* CHUNK: keys a unit of work reads (long contexts split across threads); MAX_LANES: npad up to 256; AHEAD: bytes
 * of keys and values prefetched ahead of the ones read (2048, 4096, 8192 and 32768 measured alike) */
enum { CHUNK = 256, MAX_DH = 1024, MAX_LANES = 16, AHEAD = 4096 };

typedef struct { int64_t heads, kv_heads; float scale; } Kernel;

typedef struct {  /* one call */
  int64_t batch, kv_heads, dh, cap, n, npad, chunks;
  const float *qr;  /* the queries, rotated and scaled: [B, Hkv, npad, Dh], rows n .. npad zero */
  const float *cache_k, *cache_v;  /* present key and value, the token's written */
  const int64_t *seen;  /* [B]: positions visible, pos0 + 1 */
  float *scratch;  /* per unit: npad * CHUNK probabilities, then npad * (2 + Dh): max, sum and output */
} Call;

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
 * `stride`. A block of K keys by 4 queries keeps every partial sum in a register. */
static inline __attribute__((always_inline)) AVX512 void block4(int K, const float *q, const float *key, int64_t dh,
                                                                int64_t stride, float *p) {
  __m512 acc[4][4];
  for (int j = 0; j < K; j++)
    for (int i = 0; i < 4; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t e = 0; e < dh; e += 16) {
    const __mmask16 m = tail(dh - e);
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

static inline AVX512 void scores4(const float *q, const float *keys, int64_t t0, int64_t t1, int64_t dh,
                                  int64_t stride, float *p) {
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    prefetch(keys + t * dh + AHEAD / 4, 4 * dh * 4);
    block4(4, q, keys + t * dh, dh, stride, p + (t - t0) * stride);
  }
  for (; t < t1; t++) block4(1, q, keys + t * dh, dh, stride, p + (t - t0) * stride);
}

/* y [G, Dh] = the weights p of G queries (p[t - t0][i], rows of `stride`) times values [t0, t1), W vectors of
 * 16 values at a time (G * W accumulators in registers) */
static inline __attribute__((always_inline)) AVX512 void weigh(int G, int W, const float *p, int64_t stride,
                                                               const float *values, int64_t t0, int64_t t1,
                                                               int64_t dh, float *y) {
  for (int64_t e = 0; e < dh; e += 16 * W) {
    __mmask16 m[2];
    __m512 acc[2][16];
    for (int w = 0; w < W; w++) {
      m[w] = tail(dh - e - 16 * w);
      for (int i = 0; i < G; i++) acc[w][i] = _mm512_setzero_ps();
    }
    for (int64_t t = t0; t < t1; t++) {
      const float *weights = p + (t - t0) * stride, *v = values + t * dh + e;
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

/* the same for head sizes of V * 16 (V 4, 8 or 16), whole rows of values at a time, G = 16 / V queries a pass:
 * each pass reads the values in order (the first from memory, the others from the cache) */
static inline __attribute__((always_inline)) AVX512 void weigh_rows(int G, int V, int64_t npad, const float *p,
                                                                    const float *values, int64_t t0, int64_t t1,
                                                                    float *y) {
  for (int64_t i0 = 0; i0 < npad; i0 += G) {
    __m512 acc[16];
    for (int a = 0; a < G * V; a++) acc[a] = _mm512_setzero_ps();
    for (int64_t t = t0; t < t1; t++) {
      const float *v = values + t * V * 16, *weights = p + (t - t0) * npad + i0;
      if (!i0) prefetch(v + AHEAD / 4, V * 64);
      __m512 row[16];
      for (int w = 0; w < V; w++) row[w] = _mm512_loadu_ps(v + 16 * w);
      for (int i = 0; i < G; i++) {
        const __m512 x = _mm512_set1_ps(weights[i]);
        for (int w = 0; w < V; w++) acc[i * V + w] = _mm512_fmadd_ps(x, row[w], acc[i * V + w]);
      }
    }
    for (int i = 0; i < G; i++)
      for (int w = 0; w < V; w++) _mm512_storeu_ps(y + (i0 + i) * V * 16 + 16 * w, acc[i * V + w]);
  }
}

/* unit u: batch entry b, kv head kh, chunk c of keys: per query, the max score, the sum of e^(s - max) and
 * the sum of those weights times the values. The scores lie key-major, p[t][i] (npad queries a key), so a
 * vector of 16 holds 16 / npad keys (npad 4 or 8) or part of one key's queries (npad a multiple of 16). */
static AVX512 void unit(void *data, size_t u) {
  const Call *c = data;
  const int64_t dh = c->dh, npad = c->npad, ch = (int64_t)u % c->chunks, kh = (int64_t)u / c->chunks % c->kv_heads;
  const int64_t b = (int64_t)u / (c->chunks * c->kv_heads), head = b * c->kv_heads + kh;
  float *p = c->scratch + (int64_t)u * npad * (CHUNK + 2 + dh), *top = p + npad * CHUNK, *sum = top + npad;
  float *y = sum + npad;
  const int64_t t0 = ch * CHUNK, t1 = t0 + CHUNK < c->seen[b] ? t0 + CHUNK : c->seen[b];
  const float *q = c->qr + head * npad * dh;
  const float *keys = c->cache_k + head * c->cap * dh, *values = c->cache_v + head * c->cap * dh;
  if (t1 <= t0) {  /* nothing visible in this chunk */
    for (int64_t i = 0; i < npad; i++) top[i] = -INFINITY, sum[i] = 0.f;
    return;
  }
  for (int64_t i = 0; i < npad; i += 4) scores4(q + i * dh, keys, t0, t1, dh, npad, p + i);
  const int64_t flat = (t1 - t0) * npad, lanes = npad < 16 ? 1 : npad / 16;  /* vector v: queries of lanes[v % lanes] */
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
  if (dh == 64) { weigh_rows(4, 4, npad, p, values, t0, t1, y); return; }
  if (dh == 128) { weigh_rows(2, 8, npad, p, values, t0, t1, y); return; }
  if (dh == 256) { weigh_rows(1, 16, npad, p, values, t0, t1, y); return; }
  for (int64_t i = 0; i < npad; i += 16) {
    const int64_t g = npad - i < 16 ? npad - i : 16;
    if (g == 4) weigh(4, 2, p + i, npad, values, t0, t1, dh, y + i * dh);
    else if (g == 8) weigh(8, 2, p + i, npad, values, t0, t1, dh, y + i * dh);
    else weigh(16, 1, p + i, npad, values, t0, t1, dh, y + i * dh);
  }
}

/* x rotated at one position (cos, sin: that position's row of the caches), or copied, times `scale` */
static void rotate(const float *x, const float *cs, const float *sn, int64_t dh, float scale, float *out) {
  const int64_t half = dh / 2;
  for (int64_t i = 0; i < dh; i++) out[i] = scale * x[i];
  if (!cs) return;
  for (int64_t i = 0; i < half; i++) {
    out[i] = scale * (x[i] * cs[i] - x[i + half] * sn[i]);
    out[i + half] = scale * (x[i + half] * cs[i] + x[i] * sn[i]);
  }
}

static OrtStatus *input(OrtKernelContext *ctx, size_t i, const OrtValue **v) {
  return CALL(CONTEXT_INPUT, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))(ctx, i, v);
}

static OrtStatus *output(OrtKernelContext *ctx, size_t i, const int64_t *dims, size_t n, float **data) {
  OrtValue *v;
  TRY(CALL(CONTEXT_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))(
      ctx, i, dims, n, &v));
  *data = tensor_data(v);
  return *data ? NULL : error(ORT_FAIL, "StepAttention: an output has no data");
}

static int same(const int64_t *a, const int64_t *b, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (a[i] != b[i]) return 0;
  return 1;
}

#define BAD(msg) return error(ORT_INVALID_ARGUMENT, "StepAttention: " msg)

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Kernel *kn = kernel;
  const int64_t heads = kn->heads, hkv = kn->kv_heads, rep = heads / hkv;
  const OrtValue *in[INPUTS] = {0};
  int64_t dims[INPUTS][8];
  size_t nd[INPUTS] = {0}, count = 0;
  TRY(CALL(CONTEXT_INPUT_COUNT, OrtStatus *(*)(const OrtKernelContext *, size_t *))(ctx, &count));
  for (size_t i = 0; i < INPUTS && i < count; i++) {
    int elem;
    TRY(input(ctx, i, &in[i]));
    if (in[i]) TRY(tensor_shape(in[i], &elem, dims[i], &nd[i], 8));
  }
  for (int i = 0; i < IN_BIAS; i++)
    if (!in[i]) BAD("inputs 0 to 6 are required");
  const int rotary = in[IN_COS] != NULL;
  if (rotary != (in[IN_SIN] != NULL) || rotary != (in[IN_POS] != NULL))
    BAD("cos_cache, sin_cache and position_ids come together");
  if (nd[IN_Q] != 4 || dims[IN_Q][0] < 1 || dims[IN_Q][2] != 1 || dims[IN_Q][3] % heads)
    BAD("query must be [R, B, 1, num_heads * head size]");
  const int64_t R = dims[IN_Q][0], B = dims[IN_Q][1], dh = dims[IN_Q][3] / heads, n = R * rep;
  if (dh < 1 || dh > MAX_DH || (rotary && dh % 2)) BAD("the head size must be 1 to 1024, and even with rotary");
  const int64_t kv[4] = {R, B, 1, hkv * dh};
  if (nd[IN_K] != 4 || !same(dims[IN_K], kv, 4) || nd[IN_V] != 4 || !same(dims[IN_V], kv, 4))
    BAD("key and value must be [R, B, 1, kv_num_heads * head size]");
  if (nd[IN_PAST_K] != 4 || !same(dims[IN_PAST_K], dims[IN_PAST_V], 4) || dims[IN_PAST_K][0] != B ||
      dims[IN_PAST_K][1] != hkv || dims[IN_PAST_K][3] != dh)
    BAD("past_key and past_value must be [B, kv_num_heads, capacity, head size]");
  const int64_t cap = dims[IN_PAST_K][2];
  if (nd[IN_SEQLENS] != 1 || dims[IN_SEQLENS][0] != B) BAD("seqlens_k must be [B]");
  const int32_t *seqlens = tensor_data(in[IN_SEQLENS]), *total = tensor_data(in[IN_TOTAL]);
  int64_t *seen = malloc((size_t)(B ? B : 1) * sizeof *seen);
  if (!seen) return error(ORT_FAIL, "StepAttention: out of memory");
  int64_t longest = 0;
  for (int64_t b = 0; b < B; b++) {  /* the token's position is seqlens_k + 1 - n */
    seen[b] = (int64_t)seqlens[b] + 2 - n;
    longest = seen[b] > longest ? seen[b] : longest;
    if (seen[b] < 1 || seqlens[b] >= *total || *total > cap) {
      free(seen);
      BAD("seqlens_k must be at least n - 1 = R * num_heads / kv_num_heads - 1 and below total_sequence_length, "
          "which the cache's capacity must hold");
    }
  }
  const float *cos = NULL, *sin = NULL;
  const int64_t *pos = NULL;
  if (rotary) {
    const int64_t ids[2] = {B, n};
    OrtStatus *bad = NULL;
    if (nd[IN_COS] != 2 || !same(dims[IN_COS], dims[IN_SIN], 2) || dims[IN_COS][1] != dh / 2)
      bad = error(ORT_INVALID_ARGUMENT, "StepAttention: cos_cache and sin_cache must be [positions, head size / 2]");
    else if (nd[IN_POS] != 2 || !same(dims[IN_POS], ids, 2))
      bad = error(ORT_INVALID_ARGUMENT, "StepAttention: position_ids must be [B, R * num_heads / kv_num_heads]");
    cos = tensor_data(in[IN_COS]), sin = tensor_data(in[IN_SIN]), pos = tensor_data(in[IN_POS]);
    for (int64_t b = 0; !bad && b < B; b++)
      if (pos[b * n] < 0 || pos[b * n] >= dims[IN_COS][0])
        bad = error(ORT_INVALID_ARGUMENT, "StepAttention: a position is outside cos_cache");
    if (bad) { free(seen); return bad; }
  }
  const float *q = tensor_data(in[IN_Q]), *k = tensor_data(in[IN_K]), *v = tensor_data(in[IN_V]);
  const int64_t out_dims[4] = {R, B, 1, heads * dh};
  float *out, *cache_k, *cache_v;
  OrtStatus *st = output(ctx, 0, out_dims, 4, &out);
  if (!st) st = output(ctx, 1, dims[IN_PAST_K], 4, &cache_k);
  if (!st) st = output(ctx, 2, dims[IN_PAST_K], 4, &cache_v);
  const int64_t npad = n <= 4 ? 4 : n <= 8 ? 8 : (n + 15) / 16 * 16, chunks = (longest + CHUNK - 1) / CHUNK;
  if (npad > 16 * MAX_LANES) { free(seen); BAD("at most 256 query heads a kv head"); }
  const size_t units = (size_t)(B * hkv * chunks), per_unit = (size_t)(npad * (CHUNK + 2 + dh));
  const size_t queries = (size_t)(B * hkv * npad * dh);
  float *qr = st ? NULL : malloc((queries + units * per_unit) * sizeof(float));
  if (!st && !qr) st = error(ORT_FAIL, "StepAttention: out of memory");
  if (st) { free(seen); return st; }
  memset(qr, 0, queries * sizeof(float));  /* the padding rows: queries of zeros */
  const float *past_k = tensor_data(in[IN_PAST_K]), *past_v = tensor_data(in[IN_PAST_V]);
  const size_t cache_bytes = (size_t)(B * hkv * cap * dh) * sizeof(float);
  if (cache_k != past_k) memcpy(cache_k, past_k, cache_bytes);  /* not shared: present = past, then the token */
  if (cache_v != past_v) memcpy(cache_v, past_v, cache_bytes);
  for (int64_t b = 0; b < B; b++) {
    const float *cs = rotary ? cos + pos[b * n] * (dh / 2) : NULL, *sn = rotary ? sin + pos[b * n] * (dh / 2) : NULL;
    for (int64_t kh = 0; kh < hkv; kh++) {
      const int64_t head = b * hkv + kh, at = (head * cap + seen[b] - 1) * dh;
      rotate(k + head * dh, cs, sn, dh, 1.f, cache_k + at);  /* row 0's key and value: [0, b, kh] */
      memcpy(cache_v + at, v + head * dh, (size_t)dh * sizeof(float));
      for (int64_t i = 0; i < n; i++)  /* query i: row i / rep, head kh * rep + i % rep */
        rotate(q + ((i / rep * B + b) * heads + kh * rep + i % rep) * dh, cs, sn, dh, kn->scale,
               qr + (head * npad + i) * dh);
    }
  }
  Call c = {.batch = B, .kv_heads = hkv, .dh = dh, .cap = cap, .n = n, .npad = npad, .chunks = chunks, .qr = qr,
            .cache_k = cache_k, .cache_v = cache_v, .seen = seen, .scratch = qr + queries};
  st = CALL(PARALLEL_FOR, OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t,
                                         void *))(ctx, unit, units, 0, &c);
  for (int64_t head = 0; !st && head < B * hkv; head++)  /* the chunks' parts, by their maxima */
    for (int64_t i = 0; i < n; i++) {
      const int64_t b = head / hkv, kh = head % hkv;
      float best = -INFINITY, sum = 0.f;
      for (int64_t ch = 0; ch < chunks; ch++) {
        const float *part = c.scratch + (head * chunks + ch) * (int64_t)per_unit + npad * CHUNK;
        best = fmaxf(best, part[i]);
      }
      float *o = out + ((i / rep * B + b) * heads + kh * rep + i % rep) * dh;
      memset(o, 0, (size_t)dh * sizeof(float));
      for (int64_t ch = 0; ch < chunks; ch++) {
        const float *part = c.scratch + (head * chunks + ch) * (int64_t)per_unit + npad * CHUNK;
        if (part[npad + i] == 0.f) continue;
        const float w = expf(part[i] - best);
        sum += w * part[npad + i];
        for (int64_t d = 0; d < dh; d++) o[d] += w * part[2 * npad + i * dh + d];
      }
      for (int64_t d = 0; d < dh; d++) o[d] /= sum;
    }
  free(qr);
  free(seen);
  return st;
}

static OrtStatus *create(const OrtCustomOp *op, const Slot *ort, const OrtKernelInfo *info, void **out) {
  (void)op; (void)ort;
  Kernel k;
  typedef OrtStatus *(*GetInt)(const OrtKernelInfo *, const char *, int64_t *);
  typedef OrtStatus *(*GetFloat)(const OrtKernelInfo *, const char *, float *);
  TRY(CALL(ATTRIBUTE_INT64, GetInt)(info, "num_heads", &k.heads));
  TRY(CALL(ATTRIBUTE_INT64, GetInt)(info, "kv_num_heads", &k.kv_heads));
  TRY(CALL(ATTRIBUTE_FLOAT, GetFloat)(info, "scale", &k.scale));
  if (k.heads < 1 || k.kv_heads < 1 || k.heads % k.kv_heads)
    BAD("num_heads must be a positive multiple of kv_num_heads");
  Kernel *kn = malloc(sizeof *kn);
  if (!kn) return error(ORT_FAIL, "StepAttention: out of memory");
  *kn = k;
  *out = kn;
  return NULL;
}

static const char *name(const OrtCustomOp *op) { (void)op; return "StepAttention"; }
static int input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == IN_SEQLENS || i == IN_TOTAL ? TYPE_INT32 : i == IN_POS ? TYPE_INT64 : TYPE_FLOAT;
}
static size_t input_count(const OrtCustomOp *op) { (void)op; return INPUTS; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 3; }
static int input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i >= IN_BIAS ? OPTIONAL : REQUIRED; }

OrtCustomOp pltkit_step_attention_op = {
  CPU_OP_FIELDS, .GetName = name, .GetInputType = input_type, .GetInputTypeCount = input_count,
  .GetOutputTypeCount = output_count, .KernelDestroy = free, .GetInputCharacteristic = input_kind,
  .CreateKernelV2 = create, .KernelComputeV2 = compute,
};
