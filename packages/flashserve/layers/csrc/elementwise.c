/* Row-wise elementwise steps of a decoder layer in one pass each (CPU, fp32):
 * torch runs RMSNorm as five passes over the activations and SwiGLU's
 * activation as two, each through memory once a prefill's rows outgrow the
 * caches.
 *
 * Every row is computed alone in a fixed order (lanes in column order, then
 * one fixed tree over the lanes), so its bits do not depend on the other rows
 * or the thread count. Built at first use by layers/native.py.
 */
#include <math.h>
#include <stdint.h>

#include "thread_pool.h"
#include "vector_ops.h"

struct rms_norm_job {
    const float *x, *weight;
    int64_t ldx, n, ldo;
    float eps;
    float *out;
};

static void rms_norm_rows(void *job, int64_t begin, int64_t end) {
    const struct rms_norm_job *j = job;
    const float *x = j->x, *weight = j->weight;
    const int64_t ldx = j->ldx, n = j->n, ldo = j->ldo;
    const float eps = j->eps;
    float *out = j->out;
    for (int64_t r = begin; r < end; r++) {
        const float *xr = x + r * ldx;
        float *o = out + r * ldo;
        vf acc = {0};
        for (int64_t j = 0; j < n; j += LANES) {
            vf v = load_f32(xr + j);
            acc += v * v;
        }
        const vf zero = {0};
        float mean = lane_sums4(acc, zero, zero, zero)[0] / (float)n;
        vf scale = broadcast(1.0f / sqrtf(mean + eps));
        for (int64_t j = 0; j < n; j += LANES)
            store_f32(o + j, load_f32(weight + j) * (load_f32(xr + j) * scale));
    }
}

/* out[r, :] = weight * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)); n a multiple of LANES. */
int rms_norm_f32(const float *x, int64_t ldx, int64_t rows, int64_t n, const float *weight,
                 float eps, float *out, int64_t ldo, int threads) {
    struct rms_norm_job job = {x, weight, ldx, n, ldo, eps, out};
    flashserve_run_ranges(rms_norm_rows, &job, rows, (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}

/* silu(g) * u = g u / (1 + e^-g), written with t = e^-|g| <= 1 so that no exp overflows:
 * g u / (1 + t) for g >= 0, g u t / (1 + t) below. */
static inline vf silu_times(vf g, vf u) {
    vi negative = g < (vf){0};
    vf t = exp_nonpositive(lane_select(negative, g, -g));
    vf gu = g * u;
    return lane_select(negative, gu * t, gu) / (broadcast(1.0f) + t);
}

struct silu_mul_job {
    const float *gate_up;
    int64_t ldg, n, ldo;
    float *out;
};

static void silu_mul_rows(void *job, int64_t begin, int64_t end) {
    const struct silu_mul_job *j = job;
    for (int64_t r = begin; r < end; r++) {
        const float *g = j->gate_up + r * j->ldg;
        float *o = j->out + r * j->ldo;
        for (int64_t c = 0; c < j->n; c += LANES)
            store_f32(o + c, silu_times(load_f32(g + c), load_f32(g + j->n + c)));
    }
}

/* out[r, :] = silu(gate_up[r, :n]) * gate_up[r, n:2n]; n a multiple of LANES. */
int silu_mul_f32(const float *gate_up, int64_t ldg, int64_t rows, int64_t n, float *out,
                 int64_t ldo, int threads) {
    struct silu_mul_job job = {gate_up, ldg, n, ldo, out};
    flashserve_run_ranges(silu_mul_rows, &job, rows, (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}

struct rope_job {
    float *x;
    int64_t ldx, ldh, heads, rotary;
    const float *table;
    const int64_t *positions;
};

static void rope_rows(void *job, int64_t begin, int64_t end) {
    const struct rope_job *j = job;
    const int64_t half = j->rotary / 2;
    for (int64_t r = begin; r < end; r++) {
        const float *cos = j->table + j->positions[r] * 2 * j->rotary, *sin = cos + j->rotary;
        for (int64_t h = 0; h < j->heads; h++) {
            float *first = j->x + r * j->ldx + h * j->ldh, *second = first + half;
            for (int64_t c = 0; c < half; c++) {
                float a = first[c], b = second[c];
                first[c] = a * cos[c] + b * sin[c];
                second[c] = b * cos[half + c] + a * sin[half + c];
            }
        }
    }
}

/* Rotate-half rope in place: x [rows, heads, head_dim] (row stride ldx, head stride
 * ldh), the first `rotary` dims of each head, at positions[r]; table row p holds
 * cos|cos over the rotated dims, then -sin|sin. Each element is x * cos + partner * sin
 * (two products, one sum: torch's arithmetic for the same table, bit for bit). Returns 1,
 * with x untouched, when a position has no row in the table. */
int rotate_half_f32(float *x, int64_t ldx, int64_t ldh, int64_t rows, int64_t heads,
                    int64_t rotary, const float *table, int64_t table_rows,
                    const int64_t *positions, int threads) {
    for (int64_t r = 0; r < rows; r++) /* checked before anything is written */
        if (positions[r] < 0 || positions[r] >= table_rows) return 1;
    struct rope_job job = {x, ldx, ldh, heads, rotary, table, positions};
    flashserve_run_ranges(rope_rows, &job, rows, (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}
