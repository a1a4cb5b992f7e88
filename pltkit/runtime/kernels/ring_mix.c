/* pltkit.RingMix: the rows of loops >= 1 of a PLT decode step over their rings (the local branch of gated
 * sliding-window attention) and their mix with the global attention's output, in one call. The graph's own
 * function body (pltkit/export/gqa.py, GQA.ring_mix) computes the same with a GroupQueryAttention
 * call per row and some twenty small nodes per layer; this kernel does it without copying the rings twice.
 *
 * S = 1 token, R rows (loops), B batch, H heads, Hkv kv heads, Dh head size, rep = H / Hkv, W ring length:
 *   0 query [R, B, 1, H*Dh], 1 key and 2 value [R, B, 1, Hkv*Dh]: the rows' projections (q and k not rotated
 *     where inputs 9-11 are given)
 *   3 global [R, B, 1, H*Dh]: the global attention's output (pltkit.StepAttention's); or [B, R*rep, Hkv*Dh], the
 *     global GroupQueryAttention call's of artifacts exported before StepAttention (position r*rep + j is row
 *     r's head j of a kv group)
 *   4 ring_key, 5 ring_value [R-1, B, Hkv, W, Dh]: keys (rotated) and values of positions pos0-W .. pos0-1
 *   6 gate [R-1, B, H, 1]: g of each row, batch entry and head
 *   7 seqlens_k [B] int32, 8 total_sequence_length [] int32: the body's GroupQueryAttention lengths (W, W + 1);
 *     optional and unread: the kernel takes W from ring_key
 *   9 cos_cache, 10 sin_cache [P, Dh/2], 11 position_ids [B, 1] int64: optional, together; q and k of a row
 *     are rotated (rotate-half) at the position of its batch entry
 *   12 hidden [R, B, 1, D], 13 gate_norm [D], 14 gate_weight [D, H], 15 gate_bias [H]: optional, together, in
 *     place of gate (6): the hidden-state gate g = sigmoid(W RMSNorm(x) + b) of the layer input x of each row
 *     r >= 1, RMSNorm(x) = x / sqrt(mean(x^2) + epsilon) * gate_norm. gate_norm and gate_weight must be
 *     initializers: the kernel keeps them as one [H, D] matrix, gate_norm * W transposed, and each unit computes
 *     its own heads' gates from their rows (in parallel; a serial pass over W took a third of RingMix's time).
 * Outputs: 0 [R, B, 1, H*Dh]: row 0 is global's, row r >= 1 is local + g (global - local), where local is
 *   softmax attention over the last min(W, window) ring entries and the row's own key;
 *   1 present_ring_key, 2 present_ring_value [R-1, B, Hkv, min(W + 1, window), Dh]: the newest of those.
 * In place: where outputs 1 and 2 are inputs 4 and 5 (bound to the same buffers), full rings (W = window > 0) are
 *   circular, position t's entry at slot t % W: a unit writes the row's own key and value over the oldest entry's
 *   slot (position_ids % W; they are required) and moves nothing. Attention is the same over any order.
 * Attributes: num_heads, kv_num_heads, window (int), scale, epsilon (float; 0 where absent).
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attend.h"
#include "ort_abi.h"

enum { IN_Q, IN_K, IN_V, IN_GLOBAL, IN_RING_K, IN_RING_V, IN_GATE, IN_SEQLENS, IN_TOTAL, IN_COS, IN_SIN, IN_POS,
       IN_HIDDEN, IN_GATE_NORM, IN_GATE_W, IN_GATE_B, INPUTS };
#define MAX_DH 1024

typedef struct {
  int64_t heads, kv_heads, window, d;  /* d: the gate's D, where wt is given */
  float scale, eps;
  float *wt;  /* the hidden-state gate's weights [H, D]: gate_norm[i] * gate_weight[i, h], or NULL */
} Kernel;

typedef struct {  /* one call */
  const Kernel *kn;
  int64_t rows, batch, dh, w, vis, keep, npad, per_unit;  /* vis: ring entries visible; keep: present ring length */
  int grouped;  /* global in the GroupQueryAttention call's layout */
  int in_place;  /* the rings are circular and written where they are */
  const float *q, *k, *v, *global, *ring_k, *ring_v, *gate, *hidden, *bias, *cos, *sin;  /* gate or hidden, bias */
  const int64_t *pos;
  float *out, *out_k, *out_v, *scratch;  /* scratch: per unit, per_unit floats (unit()) */
} Call;

static inline AVX512 float dot(const float *a, const float *b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* unit u: one row r >= 1, batch entry b and kv head: its rep query heads over the ring (attend()) and the row's own
 * key, mixed with the global output; and its ring's update */
static AVX512 void unit(void *data, size_t u) {
  const Call *c = data;
  const Kernel *kn = c->kn;
  const int64_t hkv = kn->kv_heads, heads = kn->heads, rep = heads / hkv, dh = c->dh, B = c->batch, npad = c->npad;
  const int64_t kh = (int64_t)u % hkv, b = (int64_t)u / hkv % B, r = 1 + (int64_t)u / (hkv * B);
  const int64_t ring = ((r - 1) * B + b) * hkv + kh;  /* this unit's ring, of W entries */
  const float *rk = c->ring_k + ring * c->w * dh, *rv = c->ring_v + ring * c->w * dh;
  const int64_t at = c->cos ? c->pos[b] * (dh / 2) : 0;  /* the position's row of the rotary caches */
  const float *cs = c->cos ? c->cos + at : NULL, *sn = c->cos ? c->sin + at : NULL;
  float *q = c->scratch + (int64_t)u * c->per_unit, *p = q + npad * dh, *top = p + c->vis * npad, *sum = top + npad;
  float *y = sum + npad, *key = y + npad * dh;
  const float *v_new = c->v + ((r * B + b) * hkv + kh) * dh;
  rotate(c->k + ((r * B + b) * hkv + kh) * dh, cs, sn, dh, 1.f, key);
  memset(q, 0, (size_t)(npad * dh) * sizeof(float));
  for (int64_t j = 0; j < rep; j++)
    rotate(c->q + ((r * B + b) * heads + kh * rep + j) * dh, cs, sn, dh, kn->scale, q + j * dh);
  if (c->vis) attend(q, rep, npad, rk + (c->w - c->vis) * dh, rv + (c->w - c->vis) * dh, c->vis, dh, p, top, sum, y);
  const float *x = c->hidden ? c->hidden + (r * B + b) * kn->d : NULL;  /* the layer input, for the gate */
  const float rms = x ? 1.f / sqrtf(dot(x, x, kn->d) / (float)kn->d + kn->eps) : 0.f;  /* (its 1 / RMS) */
  for (int64_t j = 0; j < rep; j++) {  /* the ring's part and the row's own key, by their maxima */
    const int64_t h = kh * rep + j;
    const float own = dot(q + j * dh, key, dh), best = c->vis ? fmaxf(top[j], own) : own;
    const float w_ring = c->vis ? expf(top[j] - best) : 0.f, w_own = expf(own - best);
    const float g = x ? 1.f / (1.f + expf(-(dot(x, kn->wt + h * kn->d, kn->d) * rms + c->bias[h])))
                      : c->gate[((r - 1) * B + b) * heads + h];
    const float inv = 1.f / ((c->vis ? sum[j] : 0.f) * w_ring + w_own);
    const float *glob = c->grouped ? c->global + ((b * c->rows + r) * rep + j) * hkv * dh + kh * dh
                                   : c->global + ((r * B + b) * heads + h) * dh;
    const float *yj = y + j * dh;
    float *o = c->out + ((r * B + b) * heads + h) * dh;
    for (int64_t d = 0; d < dh; d++) {
      const float local = ((c->vis ? yj[d] * w_ring : 0.f) + w_own * v_new[d]) * inv;
      o[d] = local + g * (glob[d] - local);
    }
  }
  if (c->in_place) {  /* the row's own entry over the oldest, at slot position % W */
    const int64_t at = (ring * c->w + c->pos[b] % c->w) * dh;
    memcpy(c->out_k + at, key, (size_t)dh * sizeof(float));
    memcpy(c->out_v + at, v_new, (size_t)dh * sizeof(float));
  } else if (c->keep) {  /* the newest `keep` of the ring's W entries and the row's own */
    float *ok = c->out_k + ring * c->keep * dh, *ov = c->out_v + ring * c->keep * dh;
    size_t old = (size_t)(c->keep - 1) * dh * sizeof(float);
    memmove(ok, rk + (c->w + 1 - c->keep) * dh, old);  /* (other buffers; memmove, should they overlap) */
    memmove(ov, rv + (c->w + 1 - c->keep) * dh, old);
    memcpy(ok + (c->keep - 1) * dh, key, (size_t)dh * sizeof(float));
    memcpy(ov + (c->keep - 1) * dh, v_new, (size_t)dh * sizeof(float));
  }
}

#define BAD(msg) return error(ORT_INVALID_ARGUMENT, "RingMix: " msg)

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Kernel *kn = kernel;
  const int64_t heads = kn->heads, hkv = kn->kv_heads, rep = heads / hkv;
  const OrtValue *in[INPUTS] = {0};
  int64_t dims[INPUTS][8];
  size_t nd[INPUTS] = {0};
  TRY(read_inputs(ctx, INPUTS, in, dims, nd));
  for (int i = 0; i < IN_GATE; i++)
    if (!in[i]) BAD("inputs 0 to 5 are required");
  const int hidden = in[IN_HIDDEN] != NULL;  /* the gate from the layer input */
  for (int i = IN_GATE_NORM; i <= IN_GATE_B; i++)
    if ((in[i] != NULL) != hidden) BAD("hidden, gate_norm, gate_weight and gate_bias come together");
  if (hidden == (in[IN_GATE] != NULL)) BAD("give either gate or hidden, gate_norm, gate_weight and gate_bias");
  const int rotary = in[IN_COS] != NULL;
  if (rotary != (in[IN_SIN] != NULL) || rotary != (in[IN_POS] != NULL))
    BAD("cos_cache, sin_cache and position_ids come together");
  if (nd[IN_Q] != 4 || dims[IN_Q][0] < 2 || dims[IN_Q][2] != 1 || dims[IN_Q][3] % heads)
    BAD("query must be [R >= 2, B, 1, num_heads * head size]");
  const int64_t R = dims[IN_Q][0], B = dims[IN_Q][1], dh = dims[IN_Q][3] / heads;
  if (dh < 1 || dh > MAX_DH || (rotary && dh % 2)) BAD("the head size must be 1 to 1024, and even with rotary");
  const int64_t kv[4] = {R, B, 1, hkv * dh}, glob[4] = {R, B, 1, heads * dh}, grouped[3] = {B, R * rep, hkv * dh};
  if (nd[IN_K] != 4 || !same(dims[IN_K], kv, 4) || nd[IN_V] != 4 || !same(dims[IN_V], kv, 4))
    BAD("key and value must be [R, B, 1, kv_num_heads * head size]");
  if (!(nd[IN_GLOBAL] == 4 && same(dims[IN_GLOBAL], glob, 4)) &&
      !(nd[IN_GLOBAL] == 3 && same(dims[IN_GLOBAL], grouped, 3)))
    BAD("global must be [R, B, 1, num_heads * head size] (or [B, R * num_heads / kv_num_heads, kv_num_heads * head "
        "size])");
  if (nd[IN_RING_K] != 5 || nd[IN_RING_V] != 5 || !same(dims[IN_RING_K], dims[IN_RING_V], 5) ||
      dims[IN_RING_K][0] != R - 1 || dims[IN_RING_K][1] != B || dims[IN_RING_K][2] != hkv ||
      dims[IN_RING_K][4] != dh)
    BAD("ring_key and ring_value must be [R - 1, B, kv_num_heads, W, head size]");
  const int64_t gate[4] = {R - 1, B, heads, 1}, ids[2] = {B, 1};
  if (!hidden && (nd[IN_GATE] != 4 || !same(dims[IN_GATE], gate, 4))) BAD("gate must be [R - 1, B, num_heads, 1]");
  const int64_t d = hidden && nd[IN_GATE_NORM] == 1 ? dims[IN_GATE_NORM][0] : 0, x_dims[4] = {R, B, 1, d},
                w_dims[2] = {d, heads};
  if (hidden && (nd[IN_HIDDEN] != 4 || !same(dims[IN_HIDDEN], x_dims, 4) || nd[IN_GATE_NORM] != 1 ||
                 nd[IN_GATE_W] != 2 || !same(dims[IN_GATE_W], w_dims, 2) || nd[IN_GATE_B] != 1 ||
                 dims[IN_GATE_B][0] != heads))
    BAD("hidden, gate_norm, gate_weight and gate_bias must be [R, B, 1, D], [D], [D, num_heads] and [num_heads]");
  if (hidden && (!kn->wt || kn->d != d)) BAD("gate_norm and gate_weight must be initializers");
  Call c = {.kn = kn, .rows = R, .grouped = nd[IN_GLOBAL] == 3, .batch = B, .dh = dh, .w = dims[IN_RING_K][3]};
  c.vis = c.w < kn->window ? c.w : kn->window;
  c.keep = c.w + 1 < kn->window ? c.w + 1 : kn->window;
  if (rotary) {
    if (nd[IN_COS] != 2 || !same(dims[IN_COS], dims[IN_SIN], 2) || dims[IN_COS][1] != dh / 2)
      BAD("cos_cache and sin_cache must be [positions, head size / 2]");
    if (nd[IN_POS] != 2 || !same(dims[IN_POS], ids, 2)) BAD("position_ids must be [B, 1]");
    c.cos = tensor_data(in[IN_COS]), c.sin = tensor_data(in[IN_SIN]), c.pos = tensor_data(in[IN_POS]);
    for (int64_t b = 0; b < B; b++)
      if (c.pos[b] < 0 || c.pos[b] >= dims[IN_COS][0]) BAD("a position is outside cos_cache");
  }
  c.q = tensor_data(in[IN_Q]), c.k = tensor_data(in[IN_K]), c.v = tensor_data(in[IN_V]);
  c.global = tensor_data(in[IN_GLOBAL]);
  c.ring_k = tensor_data(in[IN_RING_K]), c.ring_v = tensor_data(in[IN_RING_V]);
  const int64_t out_dims[4] = {R, B, 1, heads * dh}, ring_dims[5] = {R - 1, B, hkv, c.keep, dh};
  TRY(float_output(ctx, 0, out_dims, 4, &c.out));
  TRY(float_output(ctx, 1, ring_dims, 5, &c.out_k));
  TRY(float_output(ctx, 2, ring_dims, 5, &c.out_v));
  c.in_place = c.w > 0 && c.out_k == c.ring_k;  /* (empty rings, window 0, may share an address: nothing to write) */
  if (c.w > 0 && c.in_place != (c.out_v == c.ring_v))
    BAD("ring_key and ring_value must be written in place both or neither");
  /* (and full: ONNX Runtime refuses a bound output of another shape than the ring's, keep) */
  if (c.in_place && !rotary) BAD("rings written in place need position_ids");
  for (int64_t b = 0; b < B; b++)  /* row 0: the global attention's */
    for (int64_t h = 0; h < heads; h++)
      memcpy(c.out + (b * heads + h) * dh,
             c.grouped ? c.global + (b * R * rep + h % rep) * hkv * dh + h / rep * dh : c.global + (b * heads + h) * dh,
             (size_t)dh * sizeof(float));
  const size_t units = (size_t)((R - 1) * B * hkv);
  if (!units) return NULL;
  c.npad = pad_queries(rep);
  c.per_unit = c.npad * (2 * dh + c.vis + 2) + dh;  /* queries, scores, max, sum, outputs, the row's key */
  c.scratch = malloc(units * (size_t)c.per_unit * sizeof(float));
  if (!c.scratch) return error(ORT_FAIL, "RingMix: out of memory");
  c.hidden = hidden ? tensor_data(in[IN_HIDDEN]) : NULL, c.bias = hidden ? tensor_data(in[IN_GATE_B]) : NULL;
  c.gate = hidden ? NULL : tensor_data(in[IN_GATE]);
  OrtStatus *st = CALL(PARALLEL_FOR, OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t,
                                                    size_t, void *))(ctx, unit, units, 0, &c);
  free(c.scratch);
  return st;
}

static OrtStatus *create(const OrtCustomOp *op, const Slot *ort, const OrtKernelInfo *info, void **out) {
  (void)op; (void)ort;
  Heads h;
  TRY(read_heads(info, "RingMix", &h));
  Kernel k = {.heads = h.heads, .kv_heads = h.kv_heads, .scale = h.scale};
  TRY(CALL(ATTRIBUTE_INT64, OrtStatus *(*)(const OrtKernelInfo *, const char *, int64_t *))(info, "window", &k.window));
  if (k.window < 0) BAD("window must be at least 0");
  k.eps = float_attribute(info, "epsilon", 0.f);  /* (artifacts before the gate have none) */
  int64_t nd[8], wd[8];
  size_t n1 = 0, n2 = 0;
  int e1 = 0, e2 = 0;
  const float *norm = initializer(info, IN_GATE_NORM, &e1, nd, &n1), *w = initializer(info, IN_GATE_W, &e2, wd, &n2);
  if (norm && w && e1 == TYPE_FLOAT && e2 == TYPE_FLOAT && n1 == 1 && n2 == 2 && wd[0] == nd[0] && wd[1] == k.heads &&
      nd[0] > 0) {  /* else: refused when run */
    k.d = nd[0];
    if (!(k.wt = malloc((size_t)(k.heads * k.d) * sizeof(float)))) return error(ORT_FAIL, "RingMix: out of memory");
    for (int64_t h = 0; h < k.heads; h++)
      for (int64_t i = 0; i < k.d; i++) k.wt[h * k.d + i] = norm[i] * w[i * k.heads + h];
  }
  OrtStatus *st = keep(&k, sizeof k, "RingMix", out);
  if (st) free(k.wt);
  return st;
}

static void destroy(void *kernel) {
  if (kernel) free(((Kernel *)kernel)->wt);
  free(kernel);
}

static const char *name(const OrtCustomOp *op) { (void)op; return "RingMix"; }
static int input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == IN_SEQLENS || i == IN_TOTAL ? TYPE_INT32 : i == IN_POS ? TYPE_INT64 : TYPE_FLOAT;
}
static size_t input_count(const OrtCustomOp *op) { (void)op; return INPUTS; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 3; }
static int input_kind(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i >= IN_GATE ? OPTIONAL : REQUIRED;
}

TIMED(OP_RING_MIX, compute)

OrtCustomOp pltkit_ring_mix_op = {
  CPU_OP_FIELDS, .GetName = name, .GetInputType = input_type, .GetInputTypeCount = input_count,
  .GetOutputTypeCount = output_count, .KernelDestroy = destroy, .GetInputCharacteristic = input_kind,
  .CreateKernelV2 = create, .KernelComputeV2 = compute_timed,
};
