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
 * here each weight row is read once from memory and multiplied by all the rows
 * while it sits in cache: blocks of 3 weight rows x 4 input rows, 12
 * accumulators in registers, each input vector loaded once into a register and
 * used three times (left to itself the compiler folds every input load into
 * its multiply-add, which makes the loop wait on loads), prefetching the next
 * block's weight rows meanwhile, so the cost is one pass over the weights.
 *
 * Every output element is a dot product summed in a fixed order that depends
 * only on its own input row and weight row (lanes in k order, then one fixed
 * tree over the 8 lanes), so a token's result is the same bits alone or in
 * any batch, with any number of threads.
 *
 * Work is split across threads as blocks of output features (of each expert,
 * for the experts in two phases, gate|up then down, one barrier between them).
 * Built at first use by layers/native.py (cc -O3 -march=native -fopenmp).
 */
#include <math.h>
#include <stdint.h>

#include "vector_ops.h"

#define ROWS_PER_BLOCK 4
#define WEIGHTS_PER_BLOCK 3
/* One or two rows are bound by reading the weights, not by arithmetic: more
 * weight rows at once keep more reads in flight. */
#define WEIGHTS_PER_BLOCK_FEW_ROWS 6
/* Output features per work item of the experts' products (many items of
 * uneven size, scheduled dynamically): enough work to amortise scheduling; a
 * multiple of both block widths. */
#define FEATURES_PER_ITEM 48

/* y[i, j] = x[i, :] . w[j, :] for i < nx (<= 4), j < nw (<= 6, nx * nw <= 12); k a multiple
 * of LANES.
 * Inlined with constant nx and nw, the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_block(
    const float *x, int64_t ldx, int nx, const float *w, int64_t ldw, int nw, int64_t k,
    float *y, int64_t ldy) {
    vf acc[ROWS_PER_BLOCK][WEIGHTS_PER_BLOCK_FEW_ROWS];
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) acc[i][j] = (vf){0};
    for (int64_t p = 0; p < k; p += LANES) {
        vf wv[WEIGHTS_PER_BLOCK_FEW_ROWS];
        for (int j = 0; j < nw; j++) wv[j] = load_f32(w + j * ldw + p);
        /* The next block's weight rows, a cache line each, while this block computes
         * (past an expert's last row it touches the next expert's, or nothing). */
        if ((p & 15) == 0)
            for (int j = 0; j < nw; j++) __builtin_prefetch(w + (nw + j) * ldw + p + 64);
        for (int i = 0; i < nx; i++) {
            vf xv = load_f32(x + i * ldx + p);
#if defined(__x86_64__)
            __asm__("" : "+x"(xv)); /* one load, in a register, for all nw products */
#endif
            for (int j = 0; j < nw; j++) acc[i][j] = multiply_add(xv, wv[j], acc[i][j]);
        }
    }
    const vf zero = {0};
    for (int j = 0; j < nw; j++) {
        vf sums = lane_sums4(acc[0][j], nx > 1 ? acc[1][j] : zero, nx > 2 ? acc[2][j] : zero,
                             nx > 3 ? acc[3][j] : zero);
        for (int i = 0; i < nx; i++) y[i * ldy + j] = sums[i];
    }
}

/* All rows against weight rows f .. f + nw (a constant when inlined). */
static inline __attribute__((always_inline)) void rows_times_block(
    const float *x, int64_t ldx, int64_t rows, const float *wf, int nw, int64_t k, float *y,
    int64_t ldy) {
    int64_t r = 0;
    for (; r + ROWS_PER_BLOCK <= rows; r += ROWS_PER_BLOCK)
        dot_block(x + r * ldx, ldx, 4, wf, k, nw, k, y + r * ldy, ldy);
    switch (rows - r) {
    case 3: dot_block(x + r * ldx, ldx, 3, wf, k, nw, k, y + r * ldy, ldy); break;
    case 2: dot_block(x + r * ldx, ldx, 2, wf, k, nw, k, y + r * ldy, ldy); break;
    case 1: dot_block(x + r * ldx, ldx, 1, wf, k, nw, k, y + r * ldy, ldy); break;
    }
}

/* y[:rows, f0:f1] = x[:rows, :k] . w[f0:f1, :k]^T, row strides ldx (x), k (w), ldy (y). */
static void rows_times_weights(const float *x, int64_t ldx, int64_t rows, const float *w,
                               int64_t k, int64_t f0, int64_t f1, float *y, int64_t ldy) {
    int64_t f = f0;
    if (rows <= 2) {
        for (; f + WEIGHTS_PER_BLOCK_FEW_ROWS <= f1; f += WEIGHTS_PER_BLOCK_FEW_ROWS) {
            if (rows == 1) dot_block(x, ldx, 1, w + f * k, k, 6, k, y + f, ldy);
            else dot_block(x, ldx, 2, w + f * k, k, 6, k, y + f, ldy);
        }
    }
    for (; f + WEIGHTS_PER_BLOCK <= f1; f += WEIGHTS_PER_BLOCK)
        rows_times_block(x, ldx, rows, w + f * k, 3, k, y + f, ldy);
    if (f1 - f == 2) rows_times_block(x, ldx, rows, w + f * k, 2, k, y + f, ldy);
    if (f1 - f == 1) rows_times_block(x, ldx, rows, w + f * k, 1, k, y + f, ldy);
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
    /* Each thread one contiguous run of whole blocks, as even as blocks allow (fixed-size
     * items would leave one thread an item more: a 512-feature layer is 11 items of 48). */
    const int64_t unit = WEIGHTS_PER_BLOCK_FEW_ROWS, units = (features + unit - 1) / unit;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int part = 0; part < threads; part++) {
        int64_t f0 = units * part / threads * unit, f1 = units * (part + 1) / threads * unit;
        f1 = f1 < features ? f1 : features;
        if (f0 >= f1) continue;
        rows_times_weights(x, ldx, rows, w, k, f0, f1, y, ldy);
        if (bias)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t f = f0; f < f1; f++) y[r * ldy + f] += bias[f];
    }
    return 0;
}
