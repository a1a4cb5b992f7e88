/* pltkit.RowsMatMulNBits: ONNX Runtime's MatMulNBits of 8 and 4 bits (block 32, accuracy_level 4, one zero
 * point for all blocks), for the few rows of a decode step.
 *
 * PLT-2 decodes a token's two loops as two rows of one pass. ONNX Runtime's kernel pays about a sixth more
 * for the second row of a layer whose weights come from memory; this one reads each 64-byte line of weights
 * once for both rows (docs/benchmarks.md, "pltkit's own kernel").
 *
 * Numerics are MatMulNBits': each row is rounded to int8 per block of 32 (d = amax / 127, round half to
 * even), the products of codes summed in int32 per block, then scaled in float32:
 * y = sum_b dx_b dw_b sum_i qx (code - zero_point).
 *
 * Layout. MatMulNBits stores B as [N, K/32, 32 * bits / 8] bytes and the scales as [N, K/32]. At session start
 * the kernel copies them into groups of 16 columns (N rounded up, the columns past it zero): per group and
 * block, 8 bits take 8 lines of 64 bytes, each 4 consecutive k of the 16 columns; 4 bits take 4 lines, whose
 * low nibbles hold one such step and high nibbles the next. One AVX-512 VNNI dot product (vpdpbusd) then
 * takes a line against 4 bytes of a row broadcast, and the float work is done once per block of 32.
 * Groups go in chunks of up to 4, interleaved line by line (block, line, group) and their scales alike (block,
 * group), so that a chunk is one sequential stream whose lines share each broadcast of the rows.
 *
 * Fused forms (pltkit/runtime/kernels/fuse.py writes them, each in place of ONNX Runtime nodes between layers):
 * - inputs 3 skip and 4 norm [K], both optional, attribute epsilon: the rows are s = A + skip (output 1, where the
 *   node has it) and, with norm, x = s / sqrt(mean(s^2) + epsilon) * norm: a residual add and the RMSNorm after it.
 * - attribute swiglu 1: B's N = 2F columns are a gate and an up projection side by side, F a multiple of 16, and
 *   the output [.., F] is gate * sigmoid(gate) * up. A chunk holds matching groups of both halves, so the two
 *   sums meet in registers: in place of a Split, a QuickGelu and a Mul.
 */
#include <stdint.h>

#include "rows.h"  /* (with attend.h, ONNX Runtime's C API, ort_abi.h, and the C headers the kernels use) */

#define BLK 32

/* -- the kernel ------------------------------------------------------------------------------------------ */
typedef int32_t __attribute__((may_alias)) i32;  /* 4 bytes of a rounded row, read as one */
typedef struct {
  int64_t k, n, blocks, bits, zero, groups;  /* zero: the code of weight 0; groups: ceil(N / 16) */
  int swiglu;   /* the output is gate * sigmoid(gate) * up of B's two halves of columns */
  float eps;    /* RMSNorm's, where the call gives norm */
  int chunk;    /* groups a chunk (rows.h, chunk_groups) */
  uint8_t *w;   /* a chunk of c groups: 8 bits [blocks, 8, c, 16, 4]; 4 bits [blocks, 4, c, 16, 4], 2 k-steps a byte */
  float *s;     /* a chunk of c groups: [blocks, c, 16] */
} Kernel;

typedef struct {  /* one call's rows, rounded: up to 2 */
  const Kernel *kern;
  int rows;
  const int8_t *q;      /* [rows, K] */
  const float *d;       /* [rows, blocks] */
  const int32_t *off;   /* [rows, blocks]: -z * sum(q), the weights' zero point z taken back */
  float *y;             /* [rows, N], or [rows, N / 2] with swiglu */
  int64_t y_stride;
} Call;

/* row x rounded per block of 32: codes q, scales d, offsets off. AVX-512: the scalar form took 3 ns a value,
 * 35 us a layer's row at the large shape, run before the products on one thread (docs/benchmarks.md). */
static AVX512 void round_row(const float *x, int64_t k, int zero, int8_t *q, float *d, int32_t *off) {
  const __m512 top = _mm512_set1_ps(127.f), bottom = _mm512_set1_ps(-127.f);
  for (int64_t b = 0; b < k / BLK; b++) {
    const __m512 p[2] = {_mm512_loadu_ps(x + b * BLK), _mm512_loadu_ps(x + b * BLK + 16)};
    /* max(|p|, m) is m where p is NaN: NaN is ignored, as by fmaxf */
    __m512 m = _mm512_max_ps(_mm512_abs_ps(p[0]), _mm512_setzero_ps());
    m = _mm512_max_ps(_mm512_abs_ps(p[1]), m);
    const float amax = _mm512_reduce_max_ps(m), inv = amax > 0.f ? 127.f / amax : 0.f;
    __m512i sum = _mm512_setzero_si512();
    for (int h = 0; h < 2; h++) {  /* half to even, as ONNX Runtime's quantizer; NaN (inf times 0) to 0 */
      __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(p[h], _mm512_set1_ps(inv)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_min_ps(_mm512_max_ps(v, bottom), top));
      const __m512i c = _mm512_cvtps_epi32(v);
      sum = _mm512_add_epi32(sum, c);
      _mm_storeu_si128((__m128i *)(q + b * BLK + 16 * h), _mm512_cvtepi32_epi8(c));
    }
    d[b] = amax / 127.f;
    off[b] = -zero * _mm512_reduce_add_epi32(sum);
  }
}

/* A chunk's `count` groups of 16 columns; each 64-byte line of weights meets both rows while it is in a register,
 * and each broadcast of a row's 4 bytes meets the chunk's `count` lines. 8 bits: a block's 8 lines a group hold
 * its 32 k, 4 at a time, of 16 columns. 4 bits: 4 lines, each two steps of 4 k (the low and the high nibbles of
 * its bytes). A chunk is one sequential stream of weights: four groups in four streams had been slower than one
 * group (1.28x, int4, on a 2-core AMD EPYC of the Zen 5 family). Interleaved, four groups share each broadcast:
 * whole large int4 PLT-2 steps 0.84x of one group's time, plain 0.93-0.98x (docs/benchmarks.md). */
#ifndef PREFETCH
#define PREFETCH 2048  /* bytes ahead; 4096 and 8192 measured alike (benchmarks/rows_matmul_c.c) */
#endif
static inline AVX512 __attribute__((always_inline)) void groups_bits(const Call *c, int64_t g0, int count,
                                                                     const int bits) {
  const Kernel *kn = c->kern;
  const int64_t nb = kn->blocks, lines = bits == 8 ? 8 : 4;
  const i32 *x0 = (const i32 *)c->q, *x1 = (const i32 *)(c->q + kn->k);
  const int two = c->rows == 2;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 o0[CHUNK_GROUPS], o1[CHUNK_GROUPS];
  for (int h = 0; h < count; h++) o0[h] = o1[h] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512i a0[CHUNK_GROUPS], a1[CHUNK_GROUPS], e0[CHUNK_GROUPS], e1[CHUNK_GROUPS];
    for (int h = 0; h < count; h++) {
      a0[h] = _mm512_set1_epi32(c->off[b]);
      a1[h] = _mm512_set1_epi32(two ? c->off[nb + b] : 0);
      e0[h] = e1[h] = _mm512_setzero_si512();
    }
    for (int j = 0; j < lines; j++) {
      const int step = bits == 8 ? j : 2 * j;  /* the line's (first) 4 k */
      __m512i b0 = _mm512_set1_epi32(x0[b * 8 + step]), b1 = two ? _mm512_set1_epi32(x1[b * 8 + step]) : b0;
      __m512i c0 = b0, c1 = b1;
      if (bits == 4) {
        c0 = _mm512_set1_epi32(x0[b * 8 + step + 1]);
        c1 = two ? _mm512_set1_epi32(x1[b * 8 + step + 1]) : c0;
      }
      for (int h = 0; h < count; h++) {
        const uint8_t *line = kn->w + (g0 * nb * lines + (b * lines + j) * count + h) * 64;
        _mm_prefetch((const char *)(line + PREFETCH), _MM_HINT_T0);
        __m512i w = _mm512_loadu_si512(line);
        if (bits == 8) {  /* odd lines into sums of their own: two chains of dot products a row, not one */
          if (j % 2) {
            e0[h] = _mm512_dpbusd_epi32(e0[h], w, b0);
            if (two) e1[h] = _mm512_dpbusd_epi32(e1[h], w, b1);
          } else {
            a0[h] = _mm512_dpbusd_epi32(a0[h], w, b0);
            if (two) a1[h] = _mm512_dpbusd_epi32(a1[h], w, b1);
          }
        } else {
          /* the high nibbles stay in place, 16 times their code: summed apart, shifted back once a block */
          __m512i lo = _mm512_and_si512(w, nibble), hi = _mm512_andnot_si512(nibble, w);
          a0[h] = _mm512_dpbusd_epi32(a0[h], lo, b0), e0[h] = _mm512_dpbusd_epi32(e0[h], hi, c0);
          if (two) a1[h] = _mm512_dpbusd_epi32(a1[h], lo, b1), e1[h] = _mm512_dpbusd_epi32(e1[h], hi, c1);
        }
      }
    }
    for (int h = 0; h < count; h++) {
      if (bits == 4) e0[h] = _mm512_srai_epi32(e0[h], 4), e1[h] = _mm512_srai_epi32(e1[h], 4);
      a0[h] = _mm512_add_epi32(a0[h], e0[h]), a1[h] = _mm512_add_epi32(a1[h], e1[h]);
      __m512 s = _mm512_loadu_ps(kn->s + (g0 * nb + b * count + h) * 16);
      o0[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[h]), _mm512_mul_ps(s, _mm512_set1_ps(c->d[b])), o0[h]);
      if (two)
        o1[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[h]), _mm512_mul_ps(s, _mm512_set1_ps(c->d[nb + b])), o1[h]);
    }
  }
  put_sums(o0, o1, c->rows, count, g0, kn->swiglu, kn->n, c->y, c->y_stride);
}

static AVX512 void chunk(void *data, size_t i) {  /* the i-th chunk of groups of columns */
  const Call *c = data;
  const int64_t g0 = (int64_t)i * c->kern->chunk, left = c->kern->groups - g0;
  const int count = left < c->kern->chunk ? (int)left : c->kern->chunk, eight = c->kern->bits == 8;
  switch (count) {  /* each count a compiled form, its accumulators in registers */
#define COUNT(n) case n: eight ? groups_bits(c, g0, n, 8) : groups_bits(c, g0, n, 4); break;
    COUNT(1) COUNT(2) COUNT(3) COUNT(4)
#undef COUNT
  }
}

#define BAD(msg) return error(ORT_INVALID_ARGUMENT, "RowsMatMulNBits: " msg)

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Kernel *kn = kernel;
  RowsIO io = {0};
  TRY(rows_io(ctx, "RowsMatMulNBits", kn->k, kn->swiglu ? kn->n / 2 : kn->n, &io));
  if (!io.rows) return NULL;
  const int64_t rows = io.rows, n = io.n;
  /* two rounded rows: codes, scales and offsets, and a row of K floats (on the heap: K is not bounded here) */
  size_t codes = (size_t)(2 * kn->k + 63) / 64 * 64;
  size_t bytes = (codes + 2 * (size_t)kn->blocks * (sizeof(float) + sizeof(int32_t)) + (size_t)kn->k * sizeof(float) +
                  63) / 64 * 64;
  int8_t *q = aligned_alloc(64, bytes);  /* a size that is a multiple of the alignment, as C11 asks */
  if (!q) return error(ORT_FAIL, "RowsMatMulNBits: out of memory");
  float *d = (float *)(q + codes), *scratch = d + 2 * kn->blocks;
  int32_t *off = (int32_t *)(scratch + kn->k);
  OrtStatus *status = NULL;
  for (int64_t r = 0; r < rows && !status; r += 2) {
    Call c = {kn, rows - r >= 2 ? 2 : 1, q, d, off, io.y + r * n, n};
    for (int i = 0; i < c.rows; i++)
      round_row(input_row(kn->k, kn->eps, io.a, io.skip, io.norm, io.sum, r + i, scratch), kn->k, (int)kn->zero,
                q + i * kn->k, d + i * kn->blocks, off + i * kn->blocks);
    size_t chunks = (size_t)((kn->groups + kn->chunk - 1) / kn->chunk);
    status = CALL(PARALLEL_FOR, OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t,
                                                void *))(ctx, chunk, chunks, 0, &c);
  }
  free(q);
  return status;
}

/* input `index`, an initializer of `type` and `count` elements (the sizes K, N and bits say) */
static OrtStatus *constant(const OrtKernelInfo *info, size_t index, int type, int64_t count, const void **data) {
  int elem = 0;
  size_t ndim = 0;
  int64_t dims[8], total = 1;
  if (!(*data = initializer(info, index, &elem, dims, &ndim)))
    return error(ORT_INVALID_ARGUMENT, "RowsMatMulNBits: B and scales must be initializers");
  for (size_t i = 0; i < ndim; i++) total *= dims[i];
  if (elem != type || total != count)
    return error(ORT_INVALID_ARGUMENT, index == 1 ? "RowsMatMulNBits: B is not uint8 of N x K/32 x 32*bits/8"
                                                  : "RowsMatMulNBits: scales are not float of N x K/32");
  return NULL;
}

static void destroy(void *kernel) {
  Kernel *kn = kernel;
  if (kn) { free(kn->w); free(kn->s); free(kn); }
}

static OrtStatus *create(const OrtCustomOp *op, const Slot *ort, const OrtKernelInfo *info, void **out) {
  (void)op; (void)ort;
  int64_t k, n, bits, block, zero;
  const char *names[] = {"K", "N", "bits", "block_size", "zero_point"};
  int64_t *vals[] = {&k, &n, &bits, &block, &zero};
  for (int i = 0; i < 5; i++)
    TRY(CALL(ATTRIBUTE_INT64, OrtStatus *(*)(const OrtKernelInfo *, const char *, int64_t *))(info, names[i], vals[i]));
  if ((bits != 8 && bits != 4) || block != BLK || k < BLK || k % BLK || n < 1 || zero < 0 || zero >> bits)
    return error(ORT_INVALID_ARGUMENT, "RowsMatMulNBits: needs bits 8 or 4, block_size 32, K a positive multiple "
                                       "of 32, N positive, and a zero point within the bits");
  const int64_t swiglu = int_attribute(info, "swiglu", 0);
  const float eps = float_attribute(info, "epsilon", 0.f);
  if (swiglu && n % 32) BAD("swiglu needs N = 2 F, F a multiple of 16");
  const void *bv, *sv;
  TRY(constant(info, 1, TYPE_UINT8, n * k * bits / 8, &bv));
  TRY(constant(info, 2, TYPE_FLOAT, n * (k / BLK), &sv));
  const uint8_t *b = bv;
  const float *s = sv;
  Kernel *kn = calloc(1, sizeof *kn);
  if (!kn) return error(ORT_FAIL, "RowsMatMulNBits: out of memory");
  kn->k = k, kn->n = n, kn->blocks = k / BLK, kn->bits = bits, kn->zero = zero, kn->groups = (n + 15) / 16;
  kn->swiglu = swiglu != 0, kn->eps = eps;
  kn->w = aligned_alloc(64, (size_t)kn->groups * 16 * k * bits / 8);
  kn->s = aligned_alloc(64, (size_t)kn->groups * 16 * kn->blocks * sizeof(float));
  if (!kn->w || !kn->s) { destroy(kn); return error(ORT_FAIL, "RowsMatMulNBits: out of memory"); }
  const int64_t nb = kn->blocks, row = BLK * bits / 8, lines = bits == 8 ? 8 : 4;  /* row: a block of a column */
  kn->chunk = chunk_groups(kn->groups, kn->swiglu);
  const uint8_t pad[BLK] = {0};  /* columns past N: codes 0, scale 0 */
  for (int64_t g = 0; g < kn->groups; g++) {
    const Place at = place_of(g, kn->chunk, kn->groups, kn->swiglu);
    const int64_t g0 = at.first, h = at.place, count = at.count, from = at.from;
    for (int64_t blk = 0; blk < nb; blk++) {
      const uint8_t *col[16];
      for (int c = 0; c < 16; c++) {
        int64_t j = from * 16 + c;
        col[c] = j < n ? b + (j * nb + blk) * row : pad;
        kn->s[(g0 * nb + blk * count + h) * 16 + c] = j < n ? s[j * nb + blk] : 0.f;
      }
      uint8_t *dst = kn->w + (g0 * nb * lines + blk * lines * count + h) * 64;  /* line j at dst + j * count * 64 */
      for (int j = 0; j < lines; j++) {
        uint8_t *line = dst + j * count * 64;
        if (bits == 8) {  /* 4 bytes of each column: k 4j .. 4j + 3 */
          for (int c = 0; c < 16; c++) memcpy(line + 4 * c, col[c] + j * 4, 4);
          continue;
        }
        for (int p = 0; p < 64; p++) {  /* byte p: code of (column p/4, k 8j + p%4) low, of k 8j + 4 + p%4 high */
          int k0 = 8 * j + p % 4, k1 = k0 + 4;
          const uint8_t *cb = col[p / 4];
          line[p] = (uint8_t)(((cb[k0 / 2] >> (4 * (k0 % 2))) & 15) | ((cb[k1 / 2] >> (4 * (k1 % 2))) & 15) << 4);
        }
      }
    }
  }
  *out = kn;
  return NULL;
}

static const char *name(const OrtCustomOp *op) { (void)op; return "RowsMatMulNBits"; }
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == IN_B ? TYPE_UINT8 : TYPE_FLOAT; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return INPUTS; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 2; }
static int optional_from(size_t first, size_t i) { return i < first ? REQUIRED : OPTIONAL; }
static int input_kind(const OrtCustomOp *op, size_t i) { (void)op; return optional_from(IN_SKIP, i); }
static int output_kind(const OrtCustomOp *op, size_t i) { (void)op; return optional_from(1, i); }

TIMED(OP_ROWS, compute)

OrtCustomOp pltkit_rows_op = {
  CPU_OP_FIELDS, .GetName = name, .GetInputType = input_type, .GetInputTypeCount = input_count,
  .GetOutputTypeCount = output_count, .KernelDestroy = destroy, .GetInputCharacteristic = input_kind,
  .GetOutputCharacteristic = output_kind, .CreateKernelV2 = create, .KernelComputeV2 = compute_timed,
};

