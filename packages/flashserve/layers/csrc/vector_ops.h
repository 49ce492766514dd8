/* 8-lane fp32 vectors (GCC/clang vector extensions) and the few operations the
 * CPU kernels share. Kernels including this are built with -ffp-contract=off:
 * a multiply-add is fused only through multiply_add, so every inlined copy of
 * a loop rounds the same way and a row's bits never depend on its neighbours. */
#ifndef FLASHSERVE_VECTOR_OPS_H
#define FLASHSERVE_VECTOR_OPS_H

#include <stdint.h>
#include <string.h>
#if defined(__FMA__)
#include <immintrin.h>
#endif

#define LANES 8

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));

static inline vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* a * b + c, fused where the CPU has FMA. */
static inline vf multiply_add(vf a, vf b, vf c) {
#if defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* The lane sums of a, b, c, d as lanes 0, 1, 2, 3: each is
 * ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), the same tree for all four. */
static inline vf lane_sums4(vf a, vf b, vf c, vf d) {
    vf ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
            __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
    vf cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
            __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
    /* [a04+a26, a15+a37, c04+c26, c15+c37, b.., b.., d.., d..] */
    vf quads = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
    /* [a, c, b, d, ...] */
    vf sums = __builtin_shufflevector(quads, quads, 0, 2, 4, 6, 0, 2, 4, 6) +
              __builtin_shufflevector(quads, quads, 1, 3, 5, 7, 1, 3, 5, 7);
    return __builtin_shufflevector(sums, sums, 0, 2, 1, 3, 4, 5, 6, 7);
}

#endif
