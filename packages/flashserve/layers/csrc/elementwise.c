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

#include "vector_ops.h"

/* out[r, :] = weight * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)); n a multiple of LANES. */
int rms_norm_f32(const float *x, int64_t ldx, int64_t rows, int64_t n, const float *weight,
                 float eps, float *out, int64_t ldo, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
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

/* out[r, :] = silu(gate_up[r, :n]) * gate_up[r, n:2n]; n a multiple of LANES. */
int silu_mul_f32(const float *gate_up, int64_t ldg, int64_t rows, int64_t n, float *out,
                 int64_t ldo, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * ldg;
        float *o = out + r * ldo;
        for (int64_t j = 0; j < n; j += LANES)
            store_f32(o + j, silu_times(load_f32(g + j), load_f32(g + n + j)));
    }
    return 0;
}

/* Rotate-half rope in place: x [rows, heads, head_dim] (row stride ldx, head stride
 * ldh), the first `rotary` dims of each head, at positions[r]; table row p holds
 * cos|cos over the rotated dims, then -sin|sin. Each element is x * cos + partner * sin
 * (two products, one sum: torch's arithmetic for the same table, bit for bit). Returns 1,
 * with x untouched, when a position has no row in the table. */
int rotate_half_f32(float *x, int64_t ldx, int64_t ldh, int64_t rows, int64_t heads,
                    int64_t rotary, const float *table, int64_t table_rows,
                    const int64_t *positions, int threads) {
    const int64_t half = rotary / 2;
    for (int64_t r = 0; r < rows; r++) /* checked before anything is written */
        if (positions[r] < 0 || positions[r] >= table_rows) return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *cos = table + positions[r] * 2 * rotary, *sin = cos + rotary;
        for (int64_t h = 0; h < heads; h++) {
            float *first = x + r * ldx + h * ldh, *second = first + half;
            for (int64_t j = 0; j < half; j++) {
                float a = first[j], b = second[j];
                first[j] = a * cos[j] + b * sin[j];
                second[j] = b * cos[half + j] + a * sin[half + j];
            }
        }
    }
    return 0;
}
