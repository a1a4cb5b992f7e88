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

#include "attend.h"
#include "ort_abi.h"

enum { IN_Q, IN_K, IN_V, IN_PAST_K, IN_PAST_V, IN_SEQLENS, IN_TOTAL, IN_BIAS, IN_COS, IN_SIN, IN_POS, INPUTS };
enum { CHUNK = 256, MAX_DH = 1024 };  /* CHUNK: keys a unit of work reads (long contexts split across threads) */

typedef Heads Kernel;

typedef struct {  /* one call */
  int64_t batch, kv_heads, dh, cap, n, npad, chunks;
  const float *qr;  /* the queries, rotated and scaled: [B, Hkv, npad, Dh], rows n .. npad zero */
  const float *cache_k, *cache_v;  /* present key and value, the token's written */
  const int64_t *seen;  /* [B]: positions visible, pos0 + 1 */
  float *scratch;  /* per unit: npad * CHUNK probabilities, then npad * (2 + Dh): max, sum and output */
} Call;

/* unit u: batch entry b, kv head kh, chunk c of keys: attend() over the chunk's visible keys */
static AVX512 void unit(void *data, size_t u) {
  const Call *c = data;
  const int64_t dh = c->dh, npad = c->npad, ch = (int64_t)u % c->chunks, kh = (int64_t)u / c->chunks % c->kv_heads;
  const int64_t b = (int64_t)u / (c->chunks * c->kv_heads), head = b * c->kv_heads + kh;
  float *p = c->scratch + (int64_t)u * npad * (CHUNK + 2 + dh), *top = p + npad * CHUNK, *sum = top + npad;
  const int64_t t0 = ch * CHUNK, t1 = t0 + CHUNK < c->seen[b] ? t0 + CHUNK : c->seen[b];
  const float *keys = c->cache_k + (head * c->cap + t0) * dh, *values = c->cache_v + (head * c->cap + t0) * dh;
  if (t1 > t0) attend(c->qr + head * npad * dh, c->n, npad, keys, values, t1 - t0, dh, p, top, sum, sum + npad);
  else  /* nothing visible in this chunk */
    for (int64_t i = 0; i < npad; i++) top[i] = -INFINITY, sum[i] = 0.f;
}

/* out [R, B, 1, H*Dh]: each query's chunks merged by their maxima */
static AVX512 void merge(const Call *c, int64_t heads, float *out) {
  const int64_t dh = c->dh, npad = c->npad, rep = heads / c->kv_heads, per_unit = npad * (CHUNK + 2 + dh);
  for (int64_t head = 0; head < c->batch * c->kv_heads; head++)
    for (int64_t i = 0; i < c->n; i++) {
      const float *parts = c->scratch + head * c->chunks * per_unit + npad * CHUNK;  /* chunk ch's: + ch * per_unit */
      float best = -INFINITY, sum = 0.f;
      for (int64_t ch = 0; ch < c->chunks; ch++) best = fmaxf(best, parts[ch * per_unit + i]);
      const int64_t b = head / c->kv_heads, kh = head % c->kv_heads;
      float *o = out + ((i / rep * c->batch + b) * heads + kh * rep + i % rep) * dh;
      for (int64_t e = 0; e < dh; e += 16) _mm512_mask_storeu_ps(o + e, tail(dh - e), _mm512_setzero_ps());
      for (int64_t ch = 0; ch < c->chunks; ch++) {
        const float *part = parts + ch * per_unit;
        if (part[npad + i] == 0.f) continue;  /* no key visible in it */
        const float w = expf(part[i] - best);
        sum += w * part[npad + i];
        const __m512 wv = _mm512_set1_ps(w);
        for (int64_t e = 0; e < dh; e += 16) {
          const __mmask16 m = tail(dh - e);
          const __m512 y = _mm512_maskz_loadu_ps(m, part + 2 * npad + i * dh + e);
          _mm512_mask_storeu_ps(o + e, m, _mm512_fmadd_ps(wv, y, _mm512_maskz_loadu_ps(m, o + e)));
        }
      }
      const __m512 inv = _mm512_set1_ps(1.f / sum);
      for (int64_t e = 0; e < dh; e += 16)
        _mm512_mask_storeu_ps(o + e, tail(dh - e), _mm512_mul_ps(inv, _mm512_maskz_loadu_ps(tail(dh - e), o + e)));
    }
}

#define BAD(msg) return error(ORT_INVALID_ARGUMENT, "StepAttention: " msg)

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Kernel *kn = kernel;
  const int64_t heads = kn->heads, hkv = kn->kv_heads, rep = heads / hkv;
  const OrtValue *in[INPUTS] = {0};
  int64_t dims[INPUTS][8];
  size_t nd[INPUTS] = {0};
  TRY(read_inputs(ctx, INPUTS, in, dims, nd));
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
  if (nd[IN_PAST_K] != 4 || nd[IN_PAST_V] != 4 || !same(dims[IN_PAST_K], dims[IN_PAST_V], 4) ||
      dims[IN_PAST_K][0] != B ||
      dims[IN_PAST_K][1] != hkv || dims[IN_PAST_K][3] != dh)
    BAD("past_key and past_value must be [B, kv_num_heads, capacity, head size]");
  const int64_t cap = dims[IN_PAST_K][2];
  if (nd[IN_SEQLENS] != 1 || dims[IN_SEQLENS][0] != B) BAD("seqlens_k must be [B]");
  if (nd[IN_TOTAL] > 1 || (nd[IN_TOTAL] == 1 && dims[IN_TOTAL][0] != 1)) BAD("total_sequence_length must be a scalar");
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
  OrtStatus *st = float_output(ctx, 0, out_dims, 4, &out);
  if (!st) st = float_output(ctx, 1, dims[IN_PAST_K], 4, &cache_k);
  if (!st) st = float_output(ctx, 2, dims[IN_PAST_K], 4, &cache_v);
  if (!st && !B) { free(seen); return NULL; }  /* an empty batch */
  const int64_t npad = pad_queries(n), chunks = (longest + CHUNK - 1) / CHUNK;
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
  if (!st) merge(&c, heads, out);
  free(qr);
  free(seen);
  return st;
}

static OrtStatus *create(const OrtCustomOp *op, const Slot *ort, const OrtKernelInfo *info, void **out) {
  (void)op; (void)ort;
  Kernel k;
  TRY(read_heads(info, "StepAttention", &k));
  return keep(&k, sizeof k, "StepAttention", out);
}

static const char *name(const OrtCustomOp *op) { (void)op; return "StepAttention"; }
static int input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == IN_SEQLENS || i == IN_TOTAL ? TYPE_INT32 : i == IN_POS ? TYPE_INT64 : TYPE_FLOAT;
}
static size_t input_count(const OrtCustomOp *op) { (void)op; return INPUTS; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 3; }
static int input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i >= IN_BIAS ? OPTIONAL : REQUIRED; }

TIMED(OP_STEP, compute)

OrtCustomOp pltkit_step_attention_op = {
  CPU_OP_FIELDS, .GetName = name, .GetInputType = input_type, .GetInputTypeCount = input_count,
  .GetOutputTypeCount = output_count, .KernelDestroy = free, .GetInputCharacteristic = input_kind,
  .CreateKernelV2 = create, .KernelComputeV2 = compute_timed,
};
