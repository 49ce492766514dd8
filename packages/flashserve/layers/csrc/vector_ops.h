/* 8-lane fp32 vectors (GCC/clang vector extensions) and the few operations the
 * CPU kernels share. Kernels including this are built with -ffp-contract=off:
 * a multiply-add is fused only through multiply_add, so every inlined copy of
 * a loop rounds the same way and a row's bits never depend on its neighbours. */
#ifndef FLASHSERVE_VECTOR_OPS_H
#define FLASHSERVE_VECTOR_OPS_H

#include <stdint.h>
#include <string.h>
#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LANES 8

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(LANES * sizeof(uint16_t))));

static inline vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline void store_f32(float *p, vf v) { memcpy(p, &v, sizeof(v)); }

/* Lane by lane: a where mask is set (all ones), else b. */
static inline vi lane_select_bits(vi mask, vi a, vi b) { return (mask & a) | (~mask & b); }

static inline vf lane_select(vi mask, vf a, vf b) { return (vf)lane_select_bits(mask, (vi)a, (vi)b); }

/* bf16 is the top half of an fp32: widening is a shift. */
static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof(h));
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* v rounded to the nearest bf16 (ties to even), still as fp32; a NaN stays a NaN (rounding
 * could carry its payload into an infinity). Each bf16 op in torch rounds its result so. */
static inline vf round_bf16(vf v) {
    const vu bits = (vu)v;
    const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    const vi nan = (vi)((bits & 0x7fffffffu) > 0x7f800000u);
    return (vf)lane_select_bits(nan, (vi){0} + 0x7fc00000, (vi)rounded);
}

static inline void store_bf16(uint16_t *p, vf v) {
    vh h = __builtin_convertvector((vu)round_bf16(v) >> 16, vh);
    memcpy(p, &h, sizeof(h));
}

static inline vf broadcast(float f) { return (vf){f, f, f, f, f, f, f, f}; }

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

/* Lane k of the result is the lane sum of v[k], each by the same tree:
 * ((l0 + l2) + (l1 + l3)) + ((l4 + l6) + (l5 + l7)). Summing eight vectors at once
 * spreads one shuffle tree over eight sums. */
static inline vf lane_sums8(const vf v[8]) {
    vf pairs[4], quads[2];
    for (int k = 0; k < 4; k++) /* [a0+a2, b0+b2, a1+a3, b1+b3, a4+a6, ...] */
        pairs[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 8, 1, 9, 4, 12, 5, 13) +
                   __builtin_shufflevector(v[2 * k], v[2 * k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    for (int k = 0; k < 2; k++) { /* [a, b, c, d (lanes 0-3); a, b, c, d (lanes 4-7)] */
        const vf x = pairs[2 * k], y = pairs[2 * k + 1];
        quads[k] = __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
                   __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    }
    return __builtin_shufflevector(quads[0], quads[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(quads[0], quads[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* e^x for x <= 0, within ~2 ulp of expf; below -87 (e^x under FLT_MIN) it is 0.
 * Cephes' range reduction and polynomial: x = n ln2 + r, |r| <= ln2 / 2, e^x = 2^n e^r. */
static inline vf exp_nonpositive(vf x) {
    const vf low = broadcast(-87.0f);
    vi underflow = x < low;
    x = lane_select(underflow, low, x);
    vf n = x * broadcast(1.44269504088896341f) + broadcast(0.5f);
    vi n_int = __builtin_convertvector(n, vi);
    n_int -= (vi)(__builtin_convertvector(n_int, vf) > n) & 1; /* floor */
    n = __builtin_convertvector(n_int, vf);
    vf r = x - n * broadcast(0.693359375f) - n * broadcast(-2.12194440e-4f);
    vf p = broadcast(1.9875691500e-4f);
    p = multiply_add(p, r, broadcast(1.3981999507e-3f));
    p = multiply_add(p, r, broadcast(8.3334519073e-3f));
    p = multiply_add(p, r, broadcast(4.1665795894e-2f));
    p = multiply_add(p, r, broadcast(1.6666665459e-1f));
    p = multiply_add(p, r, broadcast(5.0000001201e-1f));
    p = multiply_add(p, r * r, r + broadcast(1.0f));
    vf scale = (vf)((n_int + 127) << 23);
    return lane_select(underflow, (vf){0}, p * scale);
}

#if defined(__AVX512F__)
/* 16-float vectors where the CPU has them (kernels keep an 8-lane path for the rest). */
#define WIDE_LANES 16

/* e^x for x <= 0: exp_nonpositive (the same range reduction and polynomial) in 16
 * lanes; AVX-512 rounds down and scales by 2^n in one instruction each. */
static inline __m512 exp_nonpositive16(__m512 x) {
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 high = _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f));
    const __m512 low = _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f));
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, high), low);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(~underflow, _mm512_scalef_ps(p, n));
}
#endif

#endif
