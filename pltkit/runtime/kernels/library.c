/* pltkit's ONNX Runtime kernels as one library: the domain "pltkit" with its ops (rows_matmul.c, rows_f32.c,
 * step_attention.c, ring_mix.c). */
#include <stdio.h>

#include "ort_abi.h"

const Slot *pltkit_api;
int pltkit_shape_reference;
extern OrtCustomOp pltkit_rows_op, pltkit_rows_f32_op, pltkit_step_attention_op, pltkit_ring_mix_op;

static int shape_reference_available;  /* ONNX Runtime 1.24 or later: set at the first registration */

/* Whether the kernels read tensor shapes in place (SHAPE_REFERENCE), where ONNX Runtime can; returns the setting
 * it replaces. On from the first registration; tests turn it off to run the path of older ONNX Runtimes. */
int pltkit_read_shapes_in_place(int on) {
  return __atomic_exchange_n(&pltkit_shape_reference, on && shape_reference_available, __ATOMIC_RELAXED);
}

uint64_t pltkit_op_cycles[OPS][2];

/* out [OPS][2]: each op's calls and time-stamp counter cycles so far (ort_abi.h's order); reset: then zero them */
void pltkit_cycles(uint64_t *out, int reset) {
  for (int i = 0; i < OPS; i++)
    for (int j = 0; j < 2; j++)
      out[2 * i + j] = reset ? __atomic_exchange_n(&pltkit_op_cycles[i][j], 0, __ATOMIC_RELAXED)
                             : __atomic_load_n(&pltkit_op_cycles[i][j], __ATOMIC_RELAXED);
}

/* the time-stamp counter, for a caller to find its rate */
uint64_t pltkit_tsc(void) { return __builtin_ia32_rdtsc(); }

/* 1 where this CPU runs the kernels (AVX-512 F, BW and VNNI), for the loader to ask before it opens a session */
int pltkit_kernels_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

/* ONNX Runtime calls this when a session registers the library (SessionOptions.register_custom_ops_library) */
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  pltkit_api = base->GetApi(API_VERSION);
  if (!pltkit_api) return NULL;  /* an ONNX Runtime older than 1.17: it reports the ops as unknown */
  if (!pltkit_kernels_supported()) return error(ORT_FAIL, "pltkit's kernels need AVX-512 VNNI");
  static OrtDomain *domain;  /* one for every session: a domain must outlive the sessions that use it */
  if (!domain) {  /* (the version string first: asking GetApi for version 24 prints an error where it is older) */
    int major = 0, minor = 0;
    shape_reference_available = sscanf(base->GetVersionString(), "%d.%d", &major, &minor) == 2 &&
                                (major > 1 || (major == 1 && minor >= 24)) && base->GetApi(24) != NULL;
    pltkit_read_shapes_in_place(1);
    OrtDomain *made;
    TRY(CALL(CREATE_DOMAIN, OrtStatus *(*)(const char *, OrtDomain **))("pltkit", &made));
    TRY(CALL(DOMAIN_ADD, OrtStatus *(*)(OrtDomain *, const OrtCustomOp *))(made, &pltkit_rows_op));
    TRY(CALL(DOMAIN_ADD, OrtStatus *(*)(OrtDomain *, const OrtCustomOp *))(made, &pltkit_rows_f32_op));
    TRY(CALL(DOMAIN_ADD, OrtStatus *(*)(OrtDomain *, const OrtCustomOp *))(made, &pltkit_step_attention_op));
    TRY(CALL(DOMAIN_ADD, OrtStatus *(*)(OrtDomain *, const OrtCustomOp *))(made, &pltkit_ring_mix_op));
    domain = made;
  }
  return CALL(ADD_DOMAIN, OrtStatus *(*)(OrtSessionOptions *, OrtDomain *))(options, domain);
}
