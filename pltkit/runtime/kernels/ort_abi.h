/* The pieces of ONNX Runtime's C API that pltkit's kernels use, declared here: the onnxruntime wheel ships
 * no C headers. The API is a table of function pointers that only grows (the slots below are those of
 * onnxruntime_c_api.h; ParallelFor came with API version 17, ONNX Runtime 1.17, the oldest the kernels run on;
 * the shape reference, used where present, with 24), and the custom-op structure grows by version too.
 */
#ifndef PLTKIT_ORT_ABI_H
#define PLTKIT_ORT_ABI_H
#include <stddef.h>
#include <stdint.h>

typedef void OrtStatus, OrtSessionOptions, OrtKernelInfo, OrtKernelContext, OrtValue, OrtShapeInfo, OrtDomain;
typedef void *Slot;
typedef struct { const Slot *(*GetApi)(uint32_t version); const char *(*GetVersionString)(void); } OrtApiBase;
enum {
  API_VERSION = 17, OP_VERSION = 16, ORT_INVALID_ARGUMENT = 2, ORT_FAIL = 1,
  TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_INT32 = 6, TYPE_INT64 = 7,
  REQUIRED = 0, OPTIONAL = 1,  /* OrtCustomOpInputOutputCharacteristic */
};
enum {  /* slots of OrtApi */
  CREATE_STATUS = 0, CREATE_DOMAIN = 26, DOMAIN_ADD = 27, ADD_DOMAIN = 28, TENSOR_DATA = 51, ELEMENT_TYPE = 60,
  DIMS_COUNT = 61, DIMS = 62, TYPE_AND_SHAPE = 65, ATTRIBUTE_FLOAT = 85, ATTRIBUTE_INT64 = 86, ATTRIBUTE_STRING = 87,
  CONTEXT_INPUT_COUNT = 88, CONTEXT_OUTPUT_COUNT = 89, CONTEXT_INPUT = 90, CONTEXT_OUTPUT = 91, RELEASE_STATUS = 93,
  RELEASE_SHAPE = 99,
  CONSTANT_INPUT = 249,
  PARALLEL_FOR = 274,
  SHAPE_REFERENCE = 414,  /* GetTensorElementTypeAndShapeDataReference: API version 24, ONNX Runtime 1.24 */
};
extern const Slot *pltkit_api;  /* set when ONNX Runtime registers the library (library.c) */
extern int pltkit_shape_reference;  /* 1 where that ONNX Runtime has SHAPE_REFERENCE (library.c) */

/* Each op's calls and time-stamp counter cycles, summed over the process (pltkit_cycles, library.c), where
 * ONNX Runtime's profiler cannot say: it slows some kernels more than others. TIMED(op, f) is f counted. */
enum { OP_ROWS, OP_STEP, OP_RING_MIX, OPS };
extern uint64_t pltkit_op_cycles[OPS][2];
#define TIMED(op, f)                                                               \
  static OrtStatus *f##_timed(void *kernel, OrtKernelContext *ctx) {               \
    const uint64_t t = __builtin_ia32_rdtsc();                                     \
    OrtStatus *s = f(kernel, ctx);                                                 \
    __atomic_add_fetch(&pltkit_op_cycles[op][0], 1, __ATOMIC_RELAXED);             \
    __atomic_add_fetch(&pltkit_op_cycles[op][1], __builtin_ia32_rdtsc() - t, __ATOMIC_RELAXED); \
    return s;                                                                      \
  }
#define CALL(slot, type) ((type)pltkit_api[slot])
#define TRY(expr) do { OrtStatus *s_ = (expr); if (s_) return s_; } while (0)
static inline OrtStatus *error(int code, const char *msg) {
  return CALL(CREATE_STATUS, OrtStatus *(*)(int, const char *))(code, msg);
}

typedef struct OrtCustomOp {  /* the fields through version 20; version says which ONNX Runtime reads */
  uint32_t version;
  void *(*CreateKernel)(const struct OrtCustomOp *, const Slot *, const OrtKernelInfo *);
  const char *(*GetName)(const struct OrtCustomOp *);
  const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
  int (*GetInputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
  int (*GetOutputType)(const struct OrtCustomOp *, size_t);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
  void (*KernelCompute)(void *, OrtKernelContext *);
  void (*KernelDestroy)(void *);
  int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
  int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
  OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, const Slot *, const OrtKernelInfo *, void **);
  OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
  void *rest[7];  /* shape inference, opset range, in-place and alias maps: not used (versions 17 to 20) */
} OrtCustomOp;

/* A tensor's element type and dimensions (at most `cap` of them): read in place where ONNX Runtime can (a call's
 * 16 inputs took RingMix 2.6 us at the large shape the other way, which allocates a shape object for each) */
static inline OrtStatus *tensor_shape(const OrtValue *v, int *elem, int64_t *dims, size_t *ndim, size_t cap) {
  if (__atomic_load_n(&pltkit_shape_reference, __ATOMIC_RELAXED)) {
    const int64_t *at;
    TRY(CALL(SHAPE_REFERENCE, OrtStatus *(*)(const OrtValue *, int *, const int64_t **, size_t *))(v, elem, &at, ndim));
    if (*ndim > cap) return error(ORT_INVALID_ARGUMENT, "pltkit: a tensor of too many dimensions");
    for (size_t i = 0; i < *ndim; i++) dims[i] = at[i];
    return NULL;
  }
  void *shape;
  TRY(CALL(TYPE_AND_SHAPE, OrtStatus *(*)(const OrtValue *, void **))(v, &shape));
  OrtStatus *st = CALL(ELEMENT_TYPE, OrtStatus *(*)(const void *, int *))(shape, elem);
  if (!st) st = CALL(DIMS_COUNT, OrtStatus *(*)(const void *, size_t *))(shape, ndim);
  if (!st && *ndim > cap) st = error(ORT_INVALID_ARGUMENT, "pltkit: a tensor of too many dimensions");
  if (!st) st = CALL(DIMS, OrtStatus *(*)(const void *, int64_t *, size_t))(shape, dims, *ndim);
  CALL(RELEASE_SHAPE, void (*)(void *))(shape);
  return st;
}

static inline void *tensor_data(const OrtValue *v) {
  void *data = NULL;
  OrtStatus *st = CALL(TENSOR_DATA, OrtStatus *(*)(OrtValue *, void **))((OrtValue *)v, &data);
  return st ? NULL : data;
}

/* The first `count` inputs of a call: in[i] NULL where absent, else its dimensions (at most 8) and their count */
static inline OrtStatus *read_inputs(OrtKernelContext *ctx, size_t count, const OrtValue **in, int64_t (*dims)[8],
                                     size_t *nd) {
  size_t given = 0;
  TRY(CALL(CONTEXT_INPUT_COUNT, OrtStatus *(*)(const OrtKernelContext *, size_t *))(ctx, &given));
  for (size_t i = 0; i < count && i < given; i++) {
    int elem;
    TRY(CALL(CONTEXT_INPUT, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))(ctx, i, &in[i]));
    if (in[i]) TRY(tensor_shape(in[i], &elem, dims[i], &nd[i], 8));
  }
  return NULL;
}

/* Output i of a call, float, of these dimensions: its data (NULL only where it is empty) */
static inline OrtStatus *float_output(OrtKernelContext *ctx, size_t i, const int64_t *dims, size_t n, float **data) {
  OrtValue *v;
  TRY(CALL(CONTEXT_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))(
      ctx, i, dims, n, &v));
  int64_t size = 1;
  for (size_t d = 0; d < n; d++) size *= dims[d];
  *data = tensor_data(v);
  return *data || !size ? NULL : error(ORT_FAIL, "pltkit: an output has no data");
}

/* 1 where `st` is no error; else 0, the error released */
static inline int succeeded(OrtStatus *st) {
  if (st) CALL(RELEASE_STATUS, void (*)(OrtStatus *))(st);
  return !st;
}

/* A kernel's optional float or int attribute: `otherwise` where its node has none */
static inline float float_attribute(const OrtKernelInfo *info, const char *name, float otherwise) {
  float v;
  typedef OrtStatus *(*Get)(const OrtKernelInfo *, const char *, float *);
  return succeeded(CALL(ATTRIBUTE_FLOAT, Get)(info, name, &v)) ? v : otherwise;
}
static inline int64_t int_attribute(const OrtKernelInfo *info, const char *name, int64_t otherwise) {
  int64_t v;
  typedef OrtStatus *(*Get)(const OrtKernelInfo *, const char *, int64_t *);
  return succeeded(CALL(ATTRIBUTE_INT64, Get)(info, name, &v)) ? v : otherwise;
}

/* Input `index` of a kernel's node where it is an initializer: its data, element type and dimensions (at most 8)
 * and their count; NULL where it is not one (or has no data) */
static inline const void *initializer(const OrtKernelInfo *info, size_t index, int *elem, int64_t *dims, size_t *nd) {
  int is_constant = 0;
  const OrtValue *v = NULL;
  typedef OrtStatus *(*Get)(const OrtKernelInfo *, size_t, int *, const OrtValue **);
  if (!succeeded(CALL(CONSTANT_INPUT, Get)(info, index, &is_constant, &v)) || !is_constant || !v ||
      !succeeded(tensor_shape(v, elem, dims, nd, 8)))
    return NULL;
  return tensor_data(v);
}

static inline int same(const int64_t *a, const int64_t *b, size_t n) {  /* equal dimensions */
  for (size_t i = 0; i < n; i++)
    if (a[i] != b[i]) return 0;
  return 1;
}

/* What pltkit's ops share: the CPU provider, float outputs, all required, inputs in CPU memory, no variadics */
static inline const char *op_cpu(const struct OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static inline int op_float(const struct OrtCustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static inline int op_required(const struct OrtCustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static inline int op_cpu_memory(const struct OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static inline int op_one(const struct OrtCustomOp *op) { (void)op; return 1; }
#define CPU_OP_FIELDS                                                                                       \
  .version = OP_VERSION, .GetExecutionProviderType = op_cpu, .GetOutputType = op_float,                     \
  .GetOutputCharacteristic = op_required, .GetInputMemoryType = op_cpu_memory, .GetVariadicInputMinArity = op_one, \
  .GetVariadicInputHomogeneity = op_one, .GetVariadicOutputMinArity = op_one, .GetVariadicOutputHomogeneity = op_one

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni,fma")))  /* only where the CPU has it */
#endif
