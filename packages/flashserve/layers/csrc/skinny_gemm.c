/* Matrix products of a few rows by a weight matrix (CPU, fp32): y = x . W^T.
 *
 * `linear_f32`: one weight matrix (a decode step's projections and lm_head, a
 * speculative verification). `expert_mlp_f32`: routed experts' SwiGLU MLP,
 * each expert over its own short run of rows.
 *
 * For expert_mlp_f32 the rows arrive sorted by expert: expert e owns rows offsets[e] .. offsets[e+1].
 * For each expert with rows:  h = x . gate_up[e]^T  ([n, 2I]),
 *                             a = silu(h[:, :I]) * h[:, I:],
 *                             y = a . down[e]^T     ([n, H]).
 * With a handful of rows a BLAS GEMM spends its time packing the weights (and
 * torch's CPU linear runs one matrix-vector product per row below ~5 rows);
 * here each weight row is read
 * once from memory and multiplied by all of the expert's rows while it sits in
 * registers (blocks of 4 weight rows x 3 input rows), prefetching the next
 * block's rows meanwhile, so the cost is one pass over the active experts'
 * weights.
 *
 * Every output element is a dot product summed in a fixed lane order that
 * depends only on its own input row, so a token's result is the same bits alone
 * or in any batch, with any number of threads.
 *
 * Work is split across threads as blocks of output features (of each expert,
 * for the experts in two phases, gate|up then down, one barrier between them).
 * Built at first use by layers/native.py (cc -O3 -march=native -fopenmp).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 8
#define ROWS_PER_BLOCK 3
#define WEIGHTS_PER_BLOCK 4
/* Output features per work item: enough work to amortise scheduling. */
#define FEATURES_PER_ITEM 32

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));

static inline vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline float lane_sum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

/* y[i, j] = x[i, :] . w[j, :] for i < nx (<= 3), j < nw (<= 4); k a multiple of LANES.
 * Inlined with constant nx and nw, the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_block(
    const float *x, int64_t ldx, int nx, const float *w, int64_t ldw, int nw, int64_t k,
    float *y, int64_t ldy) {
    vf acc[ROWS_PER_BLOCK][WEIGHTS_PER_BLOCK];
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) acc[i][j] = (vf){0};
    for (int64_t p = 0; p < k; p += LANES) {
        vf wv[WEIGHTS_PER_BLOCK];
        for (int j = 0; j < nw; j++) wv[j] = load_f32(w + j * ldw + p);
        /* The next block's weight rows, a cache line each, while this block computes
         * (past an expert's last row it touches the next expert's, or nothing). */
        if ((p & 15) == 0)
            for (int j = 0; j < nw; j++) __builtin_prefetch(w + (nw + j) * ldw + p + 64);
        for (int i = 0; i < nx; i++) {
            vf xv = load_f32(x + i * ldx + p);
            for (int j = 0; j < nw; j++) acc[i][j] += xv * wv[j];
        }
    }
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) y[i * ldy + j] = lane_sum(acc[i][j]);
}

/* y[:rows, f0:f1] = x[:rows, :k] . w[f0:f1, :k]^T, row strides ldx (x), k (w), ldy (y).
 * f1 - f0 is a multiple of WEIGHTS_PER_BLOCK: feature counts are multiples of LANES. */
static void rows_times_weights(const float *x, int64_t ldx, int64_t rows, const float *w,
                               int64_t k, int64_t f0, int64_t f1, float *y, int64_t ldy) {
    for (int64_t f = f0; f < f1; f += WEIGHTS_PER_BLOCK) {
        const float *wf = w + f * k;
        int64_t r = 0;
        for (; r + ROWS_PER_BLOCK <= rows; r += ROWS_PER_BLOCK)
            dot_block(x + r * ldx, ldx, 3, wf, k, 4, k, y + r * ldy + f, ldy);
        if (rows - r == 2) dot_block(x + r * ldx, ldx, 2, wf, k, 4, k, y + r * ldy + f, ldy);
        if (rows - r == 1) dot_block(x + r * ldx, ldx, 1, wf, k, 4, k, y + r * ldy + f, ldy);
    }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* One phase: for every (expert with rows, block of `features` outputs) item,
 * out[rows of e, block] = in[rows of e, :k] . weights[e][block, :k]^T. */
static void expert_products(const float *in, int64_t ld_in, const int64_t *offsets,
                            int64_t experts, const float *weights, int64_t features, int64_t k,
                            float *out, int64_t ld_out) {
    int64_t per_expert = (features + FEATURES_PER_ITEM - 1) / FEATURES_PER_ITEM;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < experts * per_expert; item++) {
        int64_t e = item / per_expert;
        int64_t rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        int64_t f0 = (item % per_expert) * FEATURES_PER_ITEM;
        int64_t f1 = f0 + FEATURES_PER_ITEM < features ? f0 + FEATURES_PER_ITEM : features;
        rows_times_weights(in + offsets[e] * ld_in, ld_in, rows, weights + e * features * k, k,
                           f0, f1, out + offsets[e] * ld_out, ld_out);
    }
}

/* rows [n, hidden] sorted by expert; offsets [experts + 1]; gate_up [experts, 2I, hidden];
 * down [experts, hidden, I]; scratch [n, 2I]; out [n, hidden]. hidden and I multiples of
 * LANES. Returns 0. */
int expert_mlp_f32(const float *rows, const int64_t *offsets, int64_t experts,
                   const float *gate_up, const float *down, float *scratch, float *out,
                   int64_t hidden, int64_t inter, int threads) {
    int64_t n = offsets[experts];
#pragma omp parallel num_threads(threads)
    {
        expert_products(rows, hidden, offsets, experts, gate_up, 2 * inter, hidden, scratch,
                        2 * inter);
        /* The activation, in place into the gate half of each scratch row. */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            float *h = scratch + r * 2 * inter;
            for (int64_t j = 0; j < inter; j++) h[j] = silu(h[j]) * h[inter + j];
        }
        expert_products(scratch, 2 * inter, offsets, experts, down, hidden, inter, out, hidden);
    }
    return 0;
}

/* y [rows, features] (row stride ldy) = x [rows, k] (row stride ldx) . w [features, k]^T
 * (+ bias [features] if not NULL). k and features multiples of LANES. Returns 0. */
int linear_f32(const float *x, int64_t ldx, int64_t rows, const float *w, int64_t features,
               int64_t k, const float *bias, float *y, int64_t ldy, int threads) {
    int64_t items = (features + FEATURES_PER_ITEM - 1) / FEATURES_PER_ITEM;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < items; item++) {
        int64_t f0 = item * FEATURES_PER_ITEM;
        int64_t f1 = f0 + FEATURES_PER_ITEM < features ? f0 + FEATURES_PER_ITEM : features;
        rows_times_weights(x, ldx, rows, w, k, f0, f1, y, ldy);
        if (bias)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t f = f0; f < f1; f++) y[r * ldy + f] += bias[f];
    }
    return 0;
}
