/* pltkit.RowsMatMul: ONNX's MatMul of float32 A [.., K] and B [K, N] for the few rows of a decode step, B read
 * at session start from the artifact's external data file instead of an initializer.
 *
 * PLT-2 decodes a token's two loops as two rows of one pass. ONNX Runtime's MatMul (MLAS, B packed at session
 * start) took 1.11-1.24x the time of one row for two on the large shape's layers; this kernel reads each 64-byte
 * line of B once for both rows (docs/benchmarks.md, "A float32 kernel").
 *
 * Inputs and outputs are RowsMatMulNBits' (rows.h) with inputs 1 and 2 left empty, and so are its fused forms
 * (skip, norm, epsilon, swiglu; pltkit/runtime/kernels/fuse.py). Attributes: K, N, location (the path of the file
 * that holds B as K x N little-endian float32 from byte `offset` on), offset.
 *
 * Layout. At session start B is copied into chunks of up to 4 groups of 16 columns (N rounded up, the columns past
 * it zero), each chunk [K, count, 16]: one sequential stream whose 64-byte lines, one a group and k, meet a
 * broadcast of each row's k-th value. B takes no initializer: ONNX Runtime holds no second copy of it, as MLAS's
 * packing does not either. The sums run over k in order, two chains a row; they differ from MLAS's by rounding.
 */
#define _POSIX_C_SOURCE 200809L  /* fseeko */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

#include "rows.h"

enum { AHEAD32 = 2048 };  /* bytes of B prefetched ahead */

typedef struct {
  int64_t k, n, groups;  /* groups: ceil(N / 16) */
  int chunk, swiglu;     /* groups a chunk (rows.h, chunk_groups) */
  float eps;
  float *w;  /* a chunk of c groups from group g0: [K, c, 16] at w + g0 * 16 * K */
} Kernel;

typedef struct {  /* one call's rows: up to 2 */
  const Kernel *kern;
  int rows;
  const float *x[2];  /* the rows, normalized where the node says */
  float *y;           /* [rows, N], or [rows, N / 2] with swiglu */
  int64_t y_stride;
} Call;

/* A chunk's `count` groups of 16 columns for `rows` rows, k two at a time into two chains of sums a row and group */
static inline AVX512 __attribute__((always_inline)) void groups_f32(const Call *c, int64_t g0, int count, int rows) {
  const Kernel *kn = c->kern;
  const int64_t k = kn->k;
  const float *w = kn->w + g0 * 16 * k, *x0 = c->x[0], *x1 = c->x[rows - 1];
  __m512 a0[CHUNK_GROUPS], a1[CHUNK_GROUPS], b0[CHUNK_GROUPS], b1[CHUNK_GROUPS];
  for (int h = 0; h < count; h++) a0[h] = a1[h] = b0[h] = b1[h] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 2) {
    const __m512 p0 = _mm512_set1_ps(x0[i]), q0 = _mm512_set1_ps(x0[i + 1]);
    const __m512 p1 = _mm512_set1_ps(x1[i]), q1 = _mm512_set1_ps(x1[i + 1]);
    for (int h = 0; h < count; h++) {
      const float *line = w + (i * count + h) * 16;
      _mm_prefetch((const char *)line + AHEAD32, _MM_HINT_T0);
      const __m512 v = _mm512_loadu_ps(line);
      a0[h] = _mm512_fmadd_ps(p0, v, a0[h]);
      if (rows == 2) a1[h] = _mm512_fmadd_ps(p1, v, a1[h]);
    }
    for (int h = 0; h < count; h++) {
      const float *line = w + ((i + 1) * count + h) * 16;
      _mm_prefetch((const char *)line + AHEAD32, _MM_HINT_T0);
      const __m512 v = _mm512_loadu_ps(line);
      b0[h] = _mm512_fmadd_ps(q0, v, b0[h]);
      if (rows == 2) b1[h] = _mm512_fmadd_ps(q1, v, b1[h]);
    }
  }
  for (int h = 0; h < count; h++) a0[h] = _mm512_add_ps(a0[h], b0[h]), a1[h] = _mm512_add_ps(a1[h], b1[h]);
  put_sums(a0, a1, rows, count, g0, kn->swiglu, kn->n, c->y, c->y_stride);
}

static AVX512 void chunk(void *data, size_t i) {  /* the i-th chunk of groups of columns */
  const Call *c = data;
  const int64_t g0 = (int64_t)i * c->kern->chunk, left = c->kern->groups - g0;
  const int count = left < c->kern->chunk ? (int)left : c->kern->chunk;
  switch (count * 2 + c->rows - 1) {  /* each count and row count a compiled form, its sums in registers */
#define FORM(n, r) case n * 2 + r - 1: groups_f32(c, g0, n, r); break;
    FORM(1, 1) FORM(1, 2) FORM(2, 1) FORM(2, 2) FORM(3, 1) FORM(3, 2) FORM(4, 1) FORM(4, 2)
#undef FORM
  }
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Kernel *kn = kernel;
  RowsIO io = {0};
  TRY(rows_io(ctx, "RowsMatMul", kn->k, kn->swiglu ? kn->n / 2 : kn->n, &io));
  if (!io.rows) return NULL;
  float *scratch = malloc(2 * (size_t)kn->k * sizeof(float));  /* two normalized rows */
  if (!scratch) return error(ORT_FAIL, "RowsMatMul: out of memory");
  OrtStatus *status = NULL;
  for (int64_t r = 0; r < io.rows && !status; r += 2) {
    Call c = {kn, io.rows - r >= 2 ? 2 : 1, {NULL, NULL}, io.y + r * io.n, io.n};
    for (int i = 0; i < c.rows; i++)
      c.x[i] = input_row(kn->k, kn->eps, io.a, io.skip, io.norm, io.sum, r + i, scratch + i * kn->k);
    size_t chunks = (size_t)((kn->groups + kn->chunk - 1) / kn->chunk);
    status = CALL(PARALLEL_FOR, OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t,
                                                void *))(ctx, chunk, chunks, 0, &c);
  }
  free(scratch);
  return status;
}

static void destroy(void *kernel) {
  Kernel *kn = kernel;
  if (kn) { free(kn->w); free(kn); }
}

/* B's rows from `file`, a few at a time, into the kernel's chunks (kn->w zeroed: the columns past N stay 0) */
static OrtStatus *pack(Kernel *kn, FILE *file, const char *location) {
  enum { ROWS_AT_ONCE = 64 };
  const int64_t k = kn->k, n = kn->n;
  float *rows = malloc((size_t)(ROWS_AT_ONCE * n) * sizeof(float));
  if (!rows) return error(ORT_FAIL, "RowsMatMul: out of memory");
  char msg[4200];
  for (int64_t k0 = 0; k0 < k; k0 += ROWS_AT_ONCE) {
    const int64_t m = k - k0 < ROWS_AT_ONCE ? k - k0 : ROWS_AT_ONCE;
    if (fread(rows, sizeof(float), (size_t)(m * n), file) != (size_t)(m * n)) {
      free(rows);
      snprintf(msg, sizeof msg, "RowsMatMul: %s ends before B's %lld x %lld floats", location, (long long)k,
               (long long)n);
      return error(ORT_INVALID_ARGUMENT, msg);
    }
    for (int64_t g = 0; g < kn->groups; g++) {
      const Place at = place_of(g, kn->chunk, kn->groups, kn->swiglu);
      const int64_t cols = n - at.from * 16 < 16 ? n - at.from * 16 : 16;
      for (int64_t j = 0; j < m; j++)
        memcpy(kn->w + at.first * 16 * k + ((k0 + j) * at.count + at.place) * 16, rows + j * n + at.from * 16,
               (size_t)cols * sizeof(float));
    }
  }
  free(rows);
  return NULL;
}

#define BAD(msg) return error(ORT_INVALID_ARGUMENT, "RowsMatMul: " msg)

static OrtStatus *create(const OrtCustomOp *op, const Slot *ort, const OrtKernelInfo *info, void **out) {
  (void)op; (void)ort;
  const int64_t k = int_attribute(info, "K", 0), n = int_attribute(info, "N", 0);
  const int64_t offset = int_attribute(info, "offset", -1), swiglu = int_attribute(info, "swiglu", 0);
  if (k < 2 || k % 16 || n < 1 || offset < 0) BAD("needs K a positive multiple of 16, N positive and an offset");
  if (swiglu && n % 32) BAD("swiglu needs N = 2 F, F a multiple of 16");
  char location[4096];
  size_t size = sizeof location;
  typedef OrtStatus *(*GetString)(const OrtKernelInfo *, const char *, char *, size_t *);
  if (!succeeded(CALL(ATTRIBUTE_STRING, GetString)(info, "location", location, &size)))
    BAD("needs the attribute location, a path of under 4096 bytes");
  Kernel *kn = calloc(1, sizeof *kn);
  if (!kn) return error(ORT_FAIL, "RowsMatMul: out of memory");
  kn->k = k, kn->n = n, kn->groups = (n + 15) / 16, kn->swiglu = swiglu != 0;
  kn->eps = float_attribute(info, "epsilon", 0.f);
  kn->chunk = chunk_groups(kn->groups, kn->swiglu);
  kn->w = calloc((size_t)(kn->groups * 16 * k), sizeof(float));
  if (!kn->w) { destroy(kn); return error(ORT_FAIL, "RowsMatMul: out of memory"); }
  FILE *file = fopen(location, "rb");
  OrtStatus *st = NULL;
  char msg[4200];
  if (!file || fseeko(file, (off_t)offset, SEEK_SET)) {
    snprintf(msg, sizeof msg, "RowsMatMul: cannot read B from %s: %s", location, strerror(errno));
    st = error(ORT_INVALID_ARGUMENT, msg);
  } else {
    st = pack(kn, file, location);
  }
  if (file) fclose(file);
  if (st) { destroy(kn); return st; }
  *out = kn;
  return NULL;
}

static const char *name(const OrtCustomOp *op) { (void)op; return "RowsMatMul"; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return INPUTS; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 2; }
static int input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i == IN_A ? REQUIRED : OPTIONAL; }
static int output_kind(const OrtCustomOp *op, size_t i) { (void)op; return i ? OPTIONAL : REQUIRED; }

TIMED(OP_ROWS, compute)

OrtCustomOp pltkit_rows_f32_op = {
  CPU_OP_FIELDS, .GetName = name, .GetInputType = op_float, .GetInputTypeCount = input_count,
  .GetOutputTypeCount = output_count, .KernelDestroy = destroy, .GetInputCharacteristic = input_kind,
  .GetOutputCharacteristic = output_kind, .CreateKernelV2 = create, .KernelComputeV2 = compute_timed,
};
