/* Row-wise elementwise steps of a decoder layer in one pass each (CPU, fp32 or bf16):
 * torch runs RMSNorm as five passes over the activations (six with the residual add
 * before it), SwiGLU's activation as two and rope as five, each through memory once
 * a prefill's rows outgrow the caches; and the KV cache write, one call for keys and
 * values where torch takes two (a decode step is many small ops).
 *
 * Every row is computed alone in a fixed order (lanes in column order, then
 * one fixed tree over the lanes), so its bits do not depend on the other rows
 * or the thread count. bf16 rows are computed in fp32 and rounded where torch's
 * bf16 ops round (after each op that returns a bf16 tensor). SwiGLU's activation,
 * the one bound by arithmetic (an exp and a division per element), runs 16 lanes at
 * a time where the CPU has AVX-512 (2.6x). Built at first use by layers/native.py.
 */
#include <math.h>
#include <stdint.h>

#include "thread_pool.h"
#include "vector_ops.h"

/* Element i of a row of fp32 or bf16 values; bf16 is a constant in each caller, so
 * the compiler specialises every kernel for both. */
static inline vf load_at(int bf16, const void *row, int64_t i) {
    return bf16 ? load_bf16((const uint16_t *)row + i) : load_f32((const float *)row + i);
}

static inline void store_at(int bf16, void *row, int64_t i, vf v) {
    if (bf16)
        store_bf16((uint16_t *)row + i, v);
    else
        store_f32((float *)row + i, v);
}

static inline float scalar_at(int bf16, const void *row, int64_t i) {
    if (!bf16) return ((const float *)row)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)row)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

static inline void scalar_store(int bf16, void *row, int64_t i, float f) {
    if (!bf16) {
        ((float *)row)[i] = f;
        return;
    }
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN stays NaN, as in round_bf16 */
        u = 0x7fc00000u;
    else
        u += 0x7fffu + ((u >> 16) & 1u);
    ((uint16_t *)row)[i] = (uint16_t)(u >> 16);
}

#if defined(__AVX512F__)
/* 16 floats at a time where the CPU has AVX-512 (the 8-lane forms stay for the rest). */
static inline __m512 load_bf16_wide(const uint16_t *p) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* round_bf16 in 16 lanes. */
static inline __m512 round_bf16_wide(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_and_si512(
        _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd),
        _mm512_set1_epi32((int)0xffff0000u));
    const __mmask16 nan = _mm512_cmp_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000), _MM_CMPINT_NLE);
    return _mm512_castsi512_ps(
        _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000)));
}

static inline void store_bf16_wide(uint16_t *p, __m512 v) {
    const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_bf16_wide(v)), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(bits));
}

static inline __m512 load_wide(int bf16, const void *row, int64_t i) {
    return bf16 ? load_bf16_wide((const uint16_t *)row + i)
                : _mm512_loadu_ps((const float *)row + i);
}

static inline void store_wide(int bf16, void *row, int64_t i, __m512 v) {
    if (bf16)
        store_bf16_wide((uint16_t *)row + i, v);
    else
        _mm512_storeu_ps((float *)row + i, v);
}
#endif

/* Strides below are in elements of the row's type. */
struct rms_norm_job {
    const void *x, *residual, *weight;
    int64_t ldx, ldr, n, ldo, lds;
    float eps;
    void *out, *sum;
};

/* Row r of the norm's input: x, or x + residual as torch adds them (rounded once to the
 * row's type), stored to `sum` first: the residual stream's next value. */
static inline const char *norm_input(int bf16, const struct rms_norm_job *j, int64_t r) {
    const int64_t size = bf16 ? 2 : 4, n = j->n;
    const char *xr = (const char *)j->x + r * j->ldx * size;
    if (!j->residual) return xr;
    const char *rr = (const char *)j->residual + r * j->ldr * size;
    char *sr = (char *)j->sum + r * j->lds * size;
    int64_t c = 0;
#if defined(__AVX512F__)
    for (; c + WIDE_LANES <= n; c += WIDE_LANES)
        store_wide(bf16, sr, c, _mm512_add_ps(load_wide(bf16, xr, c), load_wide(bf16, rr, c)));
#endif
    for (; c < n; c += LANES) store_at(bf16, sr, c, load_at(bf16, xr, c) + load_at(bf16, rr, c));
    return sr;
}

/* The sums of squares of rows a and b, each in one fixed order: lane k of an 8-lane
 * accumulator takes columns k, k + 8, k + 16, ... in turn, then the lanes by lane_sums4's
 * tree. Two rows at once: their addition chains overlap (one alone waits on each add). */
static inline void sums_of_squares(int bf16, const char *a, const char *b, int64_t n,
                                   float *sum_a, float *sum_b) {
    vf acc_a = {0}, acc_b = {0};
    int64_t c = 0;
#if defined(__AVX512F__)
    for (; c + WIDE_LANES <= n; c += WIDE_LANES) { /* columns c..c+7, then c+8..c+15 */
        const __m512 va = load_wide(bf16, a, c), vb = load_wide(bf16, b, c);
        const __m512 qa = _mm512_mul_ps(va, va), qb = _mm512_mul_ps(vb, vb);
        acc_a += (vf)_mm512_castps512_ps256(qa);
        acc_b += (vf)_mm512_castps512_ps256(qb);
        acc_a += (vf)_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(qa), 1));
        acc_b += (vf)_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(qb), 1));
    }
#endif
    for (; c < n; c += LANES) {
        const vf va = load_at(bf16, a, c), vb = load_at(bf16, b, c);
        acc_a += va * va;
        acc_b += vb * vb;
    }
    const vf sums = lane_sums4(acc_a, acc_b, (vf){0}, (vf){0});
    *sum_a = sums[0], *sum_b = sums[1];
}

/* fp32: weight * (x * scale). bf16 as torch's reference: (x * scale) rounded to bf16,
 * then times the bf16 weight, rounded again. */
static inline void normalize_row(int bf16, const char *xr, const void *weight, int64_t n,
                                 float sum_of_squares, float eps, char *o) {
    const float mean = sum_of_squares / (float)n, scale = 1.0f / sqrtf(mean + eps);
    int64_t c = 0;
#if defined(__AVX512F__)
    const __m512 wide_scale = _mm512_set1_ps(scale);
    for (; c + WIDE_LANES <= n; c += WIDE_LANES) {
        __m512 normed = _mm512_mul_ps(load_wide(bf16, xr, c), wide_scale);
        if (bf16) normed = round_bf16_wide(normed);
        store_wide(bf16, o, c, _mm512_mul_ps(load_wide(bf16, weight, c), normed));
    }
#endif
    const vf narrow_scale = broadcast(scale);
    for (; c < n; c += LANES) {
        vf normed = load_at(bf16, xr, c) * narrow_scale;
        if (bf16) normed = round_bf16(normed);
        store_at(bf16, o, c, load_at(bf16, weight, c) * normed);
    }
}

/* Rows two at a time (sums_of_squares); each row's arithmetic is its own either way. */
static inline void rms_norm_rows(int bf16, const struct rms_norm_job *j, int64_t begin,
                                 int64_t end) {
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t r = begin; r < end; r += 2) {
        const int pair = r + 1 < end;
        const char *a = norm_input(bf16, j, r);
        const char *b = pair ? norm_input(bf16, j, r + 1) : a;
        float sum_a, sum_b;
        sums_of_squares(bf16, a, b, j->n, &sum_a, &sum_b);
        normalize_row(bf16, a, j->weight, j->n, sum_a, j->eps,
                      (char *)j->out + r * j->ldo * size);
        if (pair)
            normalize_row(bf16, b, j->weight, j->n, sum_b, j->eps,
                          (char *)j->out + (r + 1) * j->ldo * size);
    }
}

static void rms_norm_rows_f32(void *job, int64_t begin, int64_t end) {
    rms_norm_rows(0, job, begin, end);
}

static void rms_norm_rows_bf16(void *job, int64_t begin, int64_t end) {
    rms_norm_rows(1, job, begin, end);
}

/* sum = x + residual (residual NULL: no sum, x itself); out[r, :] = weight * (s[r, :] /
 * sqrt(mean(s[r, :]^2) + eps)) of that row s; n a multiple of LANES. */
static int add_rms_norm(int bf16, const void *x, int64_t ldx, const void *residual,
                        int64_t ldr, int64_t rows, int64_t n, const void *weight, float eps,
                        void *sum, int64_t lds, void *out, int64_t ldo, int threads) {
    struct rms_norm_job job = {x, residual, weight, ldx, ldr, n, ldo, lds, eps, out, sum};
    flashserve_run_ranges(bf16 ? rms_norm_rows_bf16 : rms_norm_rows_f32, &job, rows,
                          (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}

int rms_norm_f32(const float *x, int64_t ldx, int64_t rows, int64_t n, const float *weight,
                 float eps, float *out, int64_t ldo, int threads) {
    return add_rms_norm(0, x, ldx, NULL, 0, rows, n, weight, eps, NULL, 0, out, ldo, threads);
}

int rms_norm_bf16(const uint16_t *x, int64_t ldx, int64_t rows, int64_t n,
                  const uint16_t *weight, float eps, uint16_t *out, int64_t ldo, int threads) {
    return add_rms_norm(1, x, ldx, NULL, 0, rows, n, weight, eps, NULL, 0, out, ldo, threads);
}

int add_rms_norm_f32(const float *x, int64_t ldx, const float *residual, int64_t ldr,
                     int64_t rows, int64_t n, const float *weight, float eps, float *sum,
                     int64_t lds, float *out, int64_t ldo, int threads) {
    return add_rms_norm(0, x, ldx, residual, ldr, rows, n, weight, eps, sum, lds, out, ldo,
                        threads);
}

int add_rms_norm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *residual, int64_t ldr,
                      int64_t rows, int64_t n, const uint16_t *weight, float eps,
                      uint16_t *sum, int64_t lds, uint16_t *out, int64_t ldo, int threads) {
    return add_rms_norm(1, x, ldx, residual, ldr, rows, n, weight, eps, sum, lds, out, ldo,
                        threads);
}

/* t = e^-|g| <= 1, so that no exp overflows: silu(g) = g / (1 + t) for g >= 0, g t / (1 + t)
 * below. */
static inline vf exp_minus_abs(vf g) {
    return exp_nonpositive(lane_select(g < (vf){0}, g, -g));
}

/* silu(g) * u = g u / (1 + e^-g), in one rounding chain for fp32. */
static inline vf silu_times(vf g, vf u) {
    vf t = exp_minus_abs(g), gu = g * u;
    return lane_select(g < (vf){0}, gu * t, gu) / (broadcast(1.0f) + t);
}

/* bf16 as torch's reference: silu(g) rounded to bf16, times u (rounded by the store). */
static inline vf silu_rounded_times(vf g, vf u) {
    vf t = exp_minus_abs(g);
    return round_bf16(lane_select(g < (vf){0}, g * t, g) / (broadcast(1.0f) + t)) * u;
}

#if defined(__AVX512F__)
/* silu_times and silu_rounded_times in 16 lanes (the 8-lane forms take a row's last 8). */
static inline __m512 silu16(__m512 g, __m512 *t_out) {
    const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 minus_abs = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_setzero_ps(), g), g);
    *t_out = exp_nonpositive16(minus_abs);
    return _mm512_mask_blend_ps(negative, g, _mm512_mul_ps(g, *t_out));
}

/* Columns [0, 16 * whole) of a silu_mul row; returns where the 8-lane loop goes on. */
static inline int64_t silu_mul_wide(int bf16, const char *g, char *o, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t c = 0;
    for (; c + WIDE_LANES <= n; c += WIDE_LANES) {
        __m512 t;
        if (bf16) {
            const __m512 gate = load_bf16_wide((const uint16_t *)g + c);
            const __m512 up = load_bf16_wide((const uint16_t *)g + n + c);
            const __m512 numerator = silu16(gate, &t);
            const __m512 silu = _mm512_div_ps(numerator, _mm512_add_ps(one, t));
            store_bf16_wide((uint16_t *)o + c, _mm512_mul_ps(round_bf16_wide(silu), up));
        } else {
            const __m512 gate = _mm512_loadu_ps((const float *)g + c);
            const __m512 up = _mm512_loadu_ps((const float *)g + n + c);
            /* g u / (1 + t), or g u t / (1 + t): silu_times' rounding chain */
            const __mmask16 negative = _mm512_cmp_ps_mask(gate, _mm512_setzero_ps(), _CMP_LT_OQ);
            silu16(gate, &t);
            const __m512 gu = _mm512_mul_ps(gate, up);
            const __m512 num = _mm512_mask_blend_ps(negative, gu, _mm512_mul_ps(gu, t));
            _mm512_storeu_ps((float *)o + c, _mm512_div_ps(num, _mm512_add_ps(one, t)));
        }
    }
    return c;
}
#endif

struct silu_mul_job {
    const void *gate_up;
    int64_t ldg, n, ldo;
    void *out;
};

static inline void silu_mul_rows(int bf16, const struct silu_mul_job *j, int64_t begin,
                                 int64_t end) {
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t r = begin; r < end; r++) {
        const char *g = (const char *)j->gate_up + r * j->ldg * size;
        char *o = (char *)j->out + r * j->ldo * size;
#if defined(__AVX512F__)
        for (int64_t c = silu_mul_wide(bf16, g, o, j->n); c < j->n; c += LANES) {
#else
        for (int64_t c = 0; c < j->n; c += LANES) {
#endif
            vf gate = load_at(bf16, g, c), up = load_at(bf16, g, j->n + c);
            store_at(bf16, o, c, bf16 ? silu_rounded_times(gate, up) : silu_times(gate, up));
        }
    }
}

static void silu_mul_rows_f32(void *job, int64_t begin, int64_t end) {
    silu_mul_rows(0, job, begin, end);
}

static void silu_mul_rows_bf16(void *job, int64_t begin, int64_t end) {
    silu_mul_rows(1, job, begin, end);
}

/* out[r, :] = silu(gate_up[r, :n]) * gate_up[r, n:2n]; n a multiple of LANES. */
static int silu_mul(int bf16, const void *gate_up, int64_t ldg, int64_t rows, int64_t n,
                    void *out, int64_t ldo, int threads) {
    struct silu_mul_job job = {gate_up, ldg, n, ldo, out};
    flashserve_run_ranges(bf16 ? silu_mul_rows_bf16 : silu_mul_rows_f32, &job, rows,
                          (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}

int silu_mul_f32(const float *gate_up, int64_t ldg, int64_t rows, int64_t n, float *out,
                 int64_t ldo, int threads) {
    return silu_mul(0, gate_up, ldg, rows, n, out, ldo, threads);
}

int silu_mul_bf16(const uint16_t *gate_up, int64_t ldg, int64_t rows, int64_t n,
                  uint16_t *out, int64_t ldo, int threads) {
    return silu_mul(1, gate_up, ldg, rows, n, out, ldo, threads);
}

/* One tensor rope rotates: x [rows, heads, head_dim], row stride ldx, head stride ldh. */
struct rope_operand {
    void *x;
    int64_t ldx, ldh, heads;
};

struct rope_job {
    struct rope_operand operands[2]; /* q and k */
    int64_t rotary;
    const float *table;
    const int64_t *positions;
};

/* In fp32 for both types (torch's reference widens bf16 first), one rounding at the end:
 * x * cos + partner * sin, two products and a sum, 8 columns at a time (scalar past the
 * last whole 8). */
static inline void rope_head(int bf16, char *first, int64_t half, const float *cos,
                             const float *sin) {
    const int64_t size = bf16 ? 2 : 4;
    char *second = first + half * size;
    int64_t c = 0;
    for (; c + LANES <= half; c += LANES) {
        const vf a = load_at(bf16, first, c), b = load_at(bf16, second, c);
        store_at(bf16, first, c, a * load_f32(cos + c) + b * load_f32(sin + c));
        store_at(bf16, second, c, b * load_f32(cos + half + c) + a * load_f32(sin + half + c));
    }
    for (; c < half; c++) {
        const float a = scalar_at(bf16, first, c), b = scalar_at(bf16, second, c);
        scalar_store(bf16, first, c, a * cos[c] + b * sin[c]);
        scalar_store(bf16, second, c, b * cos[half + c] + a * sin[half + c]);
    }
}

static inline void rope_rows(int bf16, const struct rope_job *j, int64_t begin, int64_t end) {
    const int64_t half = j->rotary / 2, size = bf16 ? 2 : 4;
    for (int64_t r = begin; r < end; r++) {
        const float *cos = j->table + j->positions[r] * 2 * j->rotary, *sin = cos + j->rotary;
        for (int k = 0; k < 2; k++) {
            const struct rope_operand *x = &j->operands[k];
            for (int64_t h = 0; h < x->heads; h++)
                rope_head(bf16, (char *)x->x + (r * x->ldx + h * x->ldh) * size, half, cos, sin);
        }
    }
}

static void rope_rows_f32(void *job, int64_t begin, int64_t end) { rope_rows(0, job, begin, end); }

static void rope_rows_bf16(void *job, int64_t begin, int64_t end) {
    rope_rows(1, job, begin, end);
}

/* Rotate-half rope in place: q [rows, q_heads, head_dim] (row stride ldq, head stride
 * ldqh) and k [rows, k_heads, head_dim] (ldk, ldkh), the first
 * `rotary` dims of each head, at positions[r]; table row p holds cos|cos over the rotated
 * dims, then -sin|sin. Each element is x * cos + partner * sin (two products, one sum:
 * torch's arithmetic for the same table, bit for bit). Returns 1, with nothing written,
 * when a position has no row in the table. */
static int rotate_half(int bf16, void *q, int64_t ldq, int64_t ldqh, int64_t q_heads, void *k,
                       int64_t ldk, int64_t ldkh, int64_t k_heads, int64_t rows, int64_t rotary,
                       const float *table, int64_t table_rows, const int64_t *positions,
                       int threads) {
    for (int64_t r = 0; r < rows; r++) /* checked before anything is written */
        if (positions[r] < 0 || positions[r] >= table_rows) return 1;
    struct rope_job job = {{{q, ldq, ldqh, q_heads}, {k, ldk, ldkh, k_heads}},
                           rotary, table, positions};
    flashserve_run_ranges(bf16 ? rope_rows_bf16 : rope_rows_f32, &job, rows,
                          (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}

int rotate_half_f32(float *q, int64_t ldq, int64_t ldqh, int64_t q_heads, float *k,
                    int64_t ldk, int64_t ldkh, int64_t k_heads, int64_t rows, int64_t rotary,
                    const float *table, int64_t table_rows, const int64_t *positions,
                    int threads) {
    return rotate_half(0, q, ldq, ldqh, q_heads, k, ldk, ldkh, k_heads, rows, rotary, table,
                       table_rows, positions, threads);
}

int rotate_half_bf16(uint16_t *q, int64_t ldq, int64_t ldqh, int64_t q_heads, uint16_t *k,
                     int64_t ldk, int64_t ldkh, int64_t k_heads, int64_t rows, int64_t rotary,
                     const float *table, int64_t table_rows, const int64_t *positions,
                     int threads) {
    return rotate_half(1, q, ldq, ldqh, q_heads, k, ldk, ldkh, k_heads, rows, rotary, table,
                       table_rows, positions, threads);
}

struct kv_store_job {
    const char *k, *v;
    int64_t k_row_bytes, v_row_bytes, token_bytes; /* row strides of k and v; a slot's size */
    const int64_t *slots;
    char *k_cache, *v_cache;
};

static void store_rows(void *job, int64_t begin, int64_t end) {
    const struct kv_store_job *j = job;
    for (int64_t r = begin; r < end; r++) {
        memcpy(j->k_cache + j->slots[r] * j->token_bytes, j->k + r * j->k_row_bytes,
               (size_t)j->token_bytes);
        memcpy(j->v_cache + j->slots[r] * j->token_bytes, j->v + r * j->v_row_bytes,
               (size_t)j->token_bytes);
    }
}

/* This step's keys and values into their cache slots: row r of k and v (token_bytes
 * each, the rows k_row_bytes and v_row_bytes apart) to slot slots[r] of k_cache and
 * v_cache (slots of token_bytes, num_slots of them). Returns 1, with nothing written,
 * when a slot is out of range. */
int store_kv(const void *k, int64_t k_row_bytes, const void *v, int64_t v_row_bytes,
             int64_t rows, int64_t token_bytes, const int64_t *slots, void *k_cache,
             void *v_cache, int64_t num_slots, int threads) {
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return 1;
    struct kv_store_job job = {k, v, k_row_bytes, v_row_bytes, token_bytes, slots, k_cache,
                               v_cache};
    flashserve_run_ranges(store_rows, &job, rows, (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}
