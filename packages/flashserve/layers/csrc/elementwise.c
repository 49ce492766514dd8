/* Row-wise elementwise steps of a decoder layer in one pass each (CPU, fp32 or bf16):
 * torch runs RMSNorm as five passes over the activations, SwiGLU's activation as
 * two and rope as five, each through memory once a prefill's rows outgrow the
 * caches.
 *
 * Every row is computed alone in a fixed order (lanes in column order, then
 * one fixed tree over the lanes), so its bits do not depend on the other rows
 * or the thread count. bf16 rows are computed in fp32 and rounded where torch's
 * bf16 ops round (after each op that returns a bf16 tensor). Built at first use
 * by layers/native.py.
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

/* Strides below are in elements of the row's type. */
struct rms_norm_job {
    const void *x, *weight;
    int64_t ldx, n, ldo;
    float eps;
    void *out;
};

/* fp32: weight * (x * scale). bf16 as torch's reference: (x * scale) rounded to bf16,
 * then times the bf16 weight, rounded again. */
static inline void rms_norm_rows(int bf16, const struct rms_norm_job *j, int64_t begin,
                                 int64_t end) {
    const int64_t size = bf16 ? 2 : 4, n = j->n;
    for (int64_t r = begin; r < end; r++) {
        const char *xr = (const char *)j->x + r * j->ldx * size;
        char *o = (char *)j->out + r * j->ldo * size;
        vf acc = {0};
        for (int64_t c = 0; c < n; c += LANES) {
            vf v = load_at(bf16, xr, c);
            acc += v * v;
        }
        const vf zero = {0};
        float mean = lane_sums4(acc, zero, zero, zero)[0] / (float)n;
        vf scale = broadcast(1.0f / sqrtf(mean + j->eps));
        for (int64_t c = 0; c < n; c += LANES) {
            vf normed = load_at(bf16, xr, c) * scale;
            if (bf16) normed = round_bf16(normed);
            store_at(bf16, o, c, load_at(bf16, j->weight, c) * normed);
        }
    }
}

static void rms_norm_rows_f32(void *job, int64_t begin, int64_t end) {
    rms_norm_rows(0, job, begin, end);
}

static void rms_norm_rows_bf16(void *job, int64_t begin, int64_t end) {
    rms_norm_rows(1, job, begin, end);
}

/* out[r, :] = weight * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)); n a multiple of LANES. */
static int rms_norm(int bf16, const void *x, int64_t ldx, int64_t rows, int64_t n,
                    const void *weight, float eps, void *out, int64_t ldo, int threads) {
    struct rms_norm_job job = {x, weight, ldx, n, ldo, eps, out};
    flashserve_run_ranges(bf16 ? rms_norm_rows_bf16 : rms_norm_rows_f32, &job, rows,
                          (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}

int rms_norm_f32(const float *x, int64_t ldx, int64_t rows, int64_t n, const float *weight,
                 float eps, float *out, int64_t ldo, int threads) {
    return rms_norm(0, x, ldx, rows, n, weight, eps, out, ldo, threads);
}

int rms_norm_bf16(const uint16_t *x, int64_t ldx, int64_t rows, int64_t n,
                  const uint16_t *weight, float eps, uint16_t *out, int64_t ldo, int threads) {
    return rms_norm(1, x, ldx, rows, n, weight, eps, out, ldo, threads);
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
        for (int64_t c = 0; c < j->n; c += LANES) {
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

struct rope_job {
    void *x;
    int64_t ldx, ldh, heads, rotary;
    const float *table;
    const int64_t *positions;
};

/* In fp32 for both types (torch's reference widens bf16 first), one rounding at the end. */
static inline void rope_rows(int bf16, const struct rope_job *j, int64_t begin, int64_t end) {
    const int64_t half = j->rotary / 2, size = bf16 ? 2 : 4;
    for (int64_t r = begin; r < end; r++) {
        const float *cos = j->table + j->positions[r] * 2 * j->rotary, *sin = cos + j->rotary;
        for (int64_t h = 0; h < j->heads; h++) {
            char *first = (char *)j->x + (r * j->ldx + h * j->ldh) * size;
            char *second = first + half * size;
            for (int64_t c = 0; c < half; c++) {
                float a = scalar_at(bf16, first, c), b = scalar_at(bf16, second, c);
                scalar_store(bf16, first, c, a * cos[c] + b * sin[c]);
                scalar_store(bf16, second, c, b * cos[half + c] + a * sin[half + c]);
            }
        }
    }
}

static void rope_rows_f32(void *job, int64_t begin, int64_t end) { rope_rows(0, job, begin, end); }

static void rope_rows_bf16(void *job, int64_t begin, int64_t end) {
    rope_rows(1, job, begin, end);
}

/* Rotate-half rope in place: x [rows, heads, head_dim] (row stride ldx, head stride
 * ldh), the first `rotary` dims of each head, at positions[r]; table row p holds
 * cos|cos over the rotated dims, then -sin|sin. Each element is x * cos + partner * sin
 * (two products, one sum: torch's arithmetic for the same table, bit for bit). Returns 1,
 * with x untouched, when a position has no row in the table. */
static int rotate_half(int bf16, void *x, int64_t ldx, int64_t ldh, int64_t rows, int64_t heads,
                       int64_t rotary, const float *table, int64_t table_rows,
                       const int64_t *positions, int threads) {
    for (int64_t r = 0; r < rows; r++) /* checked before anything is written */
        if (positions[r] < 0 || positions[r] >= table_rows) return 1;
    struct rope_job job = {x, ldx, ldh, heads, rotary, table, positions};
    flashserve_run_ranges(bf16 ? rope_rows_bf16 : rope_rows_f32, &job, rows,
                          (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}

int rotate_half_f32(float *x, int64_t ldx, int64_t ldh, int64_t rows, int64_t heads,
                    int64_t rotary, const float *table, int64_t table_rows,
                    const int64_t *positions, int threads) {
    return rotate_half(0, x, ldx, ldh, rows, heads, rotary, table, table_rows, positions,
                       threads);
}

int rotate_half_bf16(uint16_t *x, int64_t ldx, int64_t ldh, int64_t rows, int64_t heads,
                     int64_t rotary, const float *table, int64_t table_rows,
                     const int64_t *positions, int threads) {
    return rotate_half(1, x, ldx, ldh, rows, heads, rotary, table, table_rows, positions,
                       threads);
}
