/* What pltkit's two row-product kernels share (rows_matmul.c, rows_f32.c): the rows they take, with the residual
 * add and RMSNorm folded in, and the SwiGLU they give. */
#ifndef PLTKIT_ROWS_H
#define PLTKIT_ROWS_H
#include "attend.h"  /* (with ONNX Runtime's C API, ort_abi.h, and the C headers the kernels use) */

static inline AVX512 __m512 swiglu(__m512 g, __m512 u) {  /* g sigmoid(g) u; sigmoid from e^-|g| <= 1 */
  const __m512 one = _mm512_set1_ps(1.f), e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
  return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), u);
}

/* How both kernels lay B out: groups of 16 columns in chunks of up to CHUNK_GROUPS, fewer where a layer has under
 * 32 chunks' worth (threads share chunks), at least 2 with swiglu, whose chunks hold a run of gate's groups, then
 * the same run of up's, so that the two sums meet in registers. */
enum { CHUNK_GROUPS = 4 };

static inline int chunk_groups(int64_t groups, int swiglu) {
  int chunk = CHUNK_GROUPS;
  while (chunk > 1 + swiglu && groups < 32 * chunk) chunk /= 2;
  return chunk;
}

typedef struct { int64_t first, place, count, from; } Place;  /* of a packed group: see place_of */

/* packed group g: its chunk's first group and size, its place in the chunk, and the group of B's columns it holds */
static inline Place place_of(int64_t g, int64_t chunk, int64_t groups, int swiglu) {
  Place p = {g - g % chunk, g % chunk, 0, g};
  p.count = groups - p.first < chunk ? groups - p.first : chunk;
  if (swiglu) p.from = p.place < p.count / 2 ? p.first / 2 + p.place : groups / 2 + p.first / 2 + p.place - p.count / 2;
  return p;
}

/* a chunk's sums, count groups from g0, row 0's (o0) and row 1's (o1, where rows is 2), into y [rows, n] (rows
 * y_stride apart); gated (swiglu), gate * sigmoid(gate) * up of its two halves, into y [rows, n / 2] */
static inline AVX512 __attribute__((always_inline)) void put_sums(const __m512 *o0, const __m512 *o1, int rows,
                                                                  int count, int64_t g0, int gated, int64_t n,
                                                                  float *y, int64_t y_stride) {
  if (gated) {
    for (int h = 0; h < count / 2; h++) {
      float *at = y + (g0 / 2 + h) * 16;
      _mm512_storeu_ps(at, swiglu(o0[h], o0[h + count / 2]));
      if (rows == 2) _mm512_storeu_ps(at + y_stride, swiglu(o1[h], o1[h + count / 2]));
    }
    return;
  }
  for (int h = 0; h < count; h++) {
    const __mmask16 m = tail(n - (g0 + h) * 16);  /* the last group may hold fewer than 16 columns */
    _mm512_mask_storeu_ps(y + (g0 + h) * 16, m, o0[h]);
    if (rows == 2) _mm512_mask_storeu_ps(y + y_stride + (g0 + h) * 16, m, o1[h]);
  }
}

/* row i of a call's rows: A's, or s = A + skip (into sum where the node outputs it), normalized where norm is given;
 * scratch: K floats. The squares are summed in 16 lanes (value j in lane j % 16), then the lanes in order, without
 * fused multiply-adds: a numpy statement repeats it to the bit (tests/test_kernels_fused.py). */
static AVX512 const float *input_row(int64_t k, float eps, const float *a, const float *skip, const float *norm,
                                     float *sum, int64_t i, float *scratch) {
  a += i * k;
  if (!skip && !norm) return a;
  float *s = sum ? sum + i * k : scratch, lanes[16], squares = 0.f;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 16) {  /* K is a multiple of 16 */
    __m512 v = _mm512_loadu_ps(a + j);
    if (skip) v = _mm512_add_ps(v, _mm512_loadu_ps(skip + i * k + j));
    _mm512_storeu_ps(s + j, v);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
  }
  if (!norm) return s;
  _mm512_storeu_ps(lanes, acc);
  for (int j = 0; j < 16; j++) squares += lanes[j];
  const __m512 rms = _mm512_set1_ps(sqrtf(squares / (float)k + eps));
  for (int64_t j = 0; j < k; j += 16)
    _mm512_storeu_ps(scratch + j, _mm512_mul_ps(_mm512_div_ps(_mm512_loadu_ps(s + j), rms), _mm512_loadu_ps(norm + j)));
  return scratch;
}

/* A call of either kernel: inputs 0 A [.., K], 1 B and 2 scales (RowsMatMulNBits'; empty in RowsMatMul's), 3 skip
 * [.., K] and 4 norm [K] (both optional); outputs 0 y [.., n] and 1 A + skip (optional) */
enum { IN_A, IN_B, IN_SCALES, IN_SKIP, IN_NORM, INPUTS };
typedef struct {
  int64_t rows, n;  /* A's rows; the output's columns */
  const float *a, *skip, *norm;  /* skip and norm NULL where not given */
  float *y, *sum;  /* sum: A + skip, NULL where the node has no output 1 */
} RowsIO;

static inline OrtStatus *bad_call(const char *op, const char *msg) {
  char text[160];
  snprintf(text, sizeof text, "%s: %s", op, msg);
  return error(ORT_INVALID_ARGUMENT, text);
}

/* A call's inputs checked against K, and its outputs made: y [.., n], and A + skip where the node has output 1 */
static OrtStatus *rows_io(OrtKernelContext *ctx, const char *op, int64_t k, int64_t n, RowsIO *io) {
  const OrtValue *in[INPUTS] = {0};
  int64_t dims[INPUTS][8];
  size_t nd[INPUTS] = {0}, outputs = 0;
  TRY(read_inputs(ctx, INPUTS, in, dims, nd));
  TRY(CALL(CONTEXT_OUTPUT_COUNT, OrtStatus *(*)(const OrtKernelContext *, size_t *))(ctx, &outputs));
  const size_t ndim = nd[IN_A];
  if (!in[IN_A] || ndim < 1) return bad_call(op, "A must have 1 to 8 dimensions");
  if (dims[IN_A][ndim - 1] != k) return bad_call(op, "A's last dimension is not K");
  if (in[IN_SKIP] && (nd[IN_SKIP] != ndim || !same(dims[IN_SKIP], dims[IN_A], ndim)))
    return bad_call(op, "skip is not A's shape");
  if (in[IN_NORM] && (nd[IN_NORM] != 1 || dims[IN_NORM][0] != k)) return bad_call(op, "norm is not [K]");
  if (outputs > 1 && !in[IN_SKIP]) return bad_call(op, "output 1, A + skip, needs skip");
  int64_t out_dims[8];
  io->rows = 1, io->n = n, io->sum = NULL;
  for (size_t i = 0; i + 1 < ndim; i++) io->rows *= dims[IN_A][i], out_dims[i] = dims[IN_A][i];
  out_dims[ndim - 1] = n;
  io->a = tensor_data(in[IN_A]), io->skip = in[IN_SKIP] ? tensor_data(in[IN_SKIP]) : NULL;
  io->norm = in[IN_NORM] ? tensor_data(in[IN_NORM]) : NULL;
  TRY(float_output(ctx, 0, out_dims, ndim, &io->y));
  if (outputs > 1) TRY(float_output(ctx, 1, dims[IN_A], ndim, &io->sum));
  if (io->rows && (!io->y || !io->a || (in[IN_SKIP] && !io->skip) || (in[IN_NORM] && !io->norm))) {
    char text[80];
    snprintf(text, sizeof text, "%s: a tensor has no data", op);
    return error(ORT_FAIL, text);
  }
  return NULL;
}

#endif
