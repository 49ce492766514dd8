/* Routed experts' SwiGLU MLP on the CPU (fp32), each expert over its own short run of
 * rows (a decode step gives each active expert a handful).
 *
 * The rows arrive sorted by expert: expert e owns rows offsets[e] .. offsets[e+1].
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
 * any batch this kernel takes, with any number of threads. (An expert's run longer
 * than layers/moe/cpu_expert_kernel.MAX_RUN goes to torch's GEMM, whose sums differ.)
 *
 * Work is split into items of output features (of each expert, for the experts in two
 * phases, gate|up then down), which the thread pool (thread_pool.h) hands out.
 * Built at first use by layers/native.py (cc -O3 -march=native -fopenmp).
 */
#include <math.h>
#include <stdint.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "thread_pool.h"
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

/* Long rows are split into blocks of at most this many columns (a multiple of LANES):
 * then a block's 4 input rows and 3 weight rows stay in L1 while it computes, which
 * longer rows do not (docs/DESIGN.md has the rates). Between blocks each accumulator is
 * kept in memory and resumed, so the sums are the unsplit ones, bit for bit. */
#define K_BLOCK 512
/* Output features per pass over the k blocks: bounds the kept accumulators to
 * rows x FEATURE_CHUNK x LANES floats a thread (a multiple of both block widths). */
#define FEATURE_CHUNK 96

/* Where a block's accumulators wait between k blocks (`sums` NULL: k is not split). */
typedef struct {
    float *sums; /* [rows][FEATURE_CHUNK][LANES] for the current feature chunk */
    int64_t f0;  /* the chunk's first feature */
    int first;   /* this k block starts the row: accumulators start at 0 */
    int last;    /* this k block ends it: lane sums go to y */
} carry_t;

/* y[i, j] = x[i, :len] . w[j, :len] for i < nx (<= 4), j < nw (<= 6, nx * nw <= 12); len a
 * multiple of LANES; row r0 and feature f of the whole product, for the carry.
 * Inlined with constant nx and nw, the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_block(
    const float *x, int64_t ldx, int nx, const float *w, int64_t ldw, int nw, int64_t len,
    float *y, int64_t ldy, const carry_t *carry, int64_t r0, int64_t f) {
    vf acc[ROWS_PER_BLOCK][WEIGHTS_PER_BLOCK_FEW_ROWS];
    float *kept = carry->sums
                      ? carry->sums + (r0 * FEATURE_CHUNK + (f - carry->f0)) * LANES
                      : 0;
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++)
            acc[i][j] = carry->first ? (vf){0}
                                     : load_f32(kept + (i * FEATURE_CHUNK + j) * LANES);
    for (int64_t p = 0; p < len; p += LANES) {
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
    if (!carry->last) {
        for (int i = 0; i < nx; i++)
            for (int j = 0; j < nw; j++) store_f32(kept + (i * FEATURE_CHUNK + j) * LANES, acc[i][j]);
        return;
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
    const float *x, int64_t ldx, int64_t rows, const float *wf, int64_t ldw, int nw, int64_t len,
    float *y, int64_t ldy, const carry_t *carry, int64_t f) {
    int64_t r = 0;
    for (; r + ROWS_PER_BLOCK <= rows; r += ROWS_PER_BLOCK)
        dot_block(x + r * ldx, ldx, 4, wf, ldw, nw, len, y + r * ldy, ldy, carry, r, f);
    switch (rows - r) {
    case 3: dot_block(x + r * ldx, ldx, 3, wf, ldw, nw, len, y + r * ldy, ldy, carry, r, f); break;
    case 2: dot_block(x + r * ldx, ldx, 2, wf, ldw, nw, len, y + r * ldy, ldy, carry, r, f); break;
    case 1: dot_block(x + r * ldx, ldx, 1, wf, ldw, nw, len, y + r * ldy, ldy, carry, r, f); break;
    }
}

/* y[:rows, f0:f1] = x[:rows, :len] . w[f0:f1, :len]^T (or the carry's part of it), row
 * strides ldx (x), ldw (w), ldy (y). */
static void rows_times_weights(const float *x, int64_t ldx, int64_t rows, const float *w,
                               int64_t ldw, int64_t len, int64_t f0, int64_t f1, float *y,
                               int64_t ldy, const carry_t *carry) {
    int64_t f = f0;
    if (rows <= 2) {
        for (; f + WEIGHTS_PER_BLOCK_FEW_ROWS <= f1; f += WEIGHTS_PER_BLOCK_FEW_ROWS) {
            if (rows == 1) dot_block(x, ldx, 1, w + f * ldw, ldw, 6, len, y + f, ldy, carry, 0, f);
            else dot_block(x, ldx, 2, w + f * ldw, ldw, 6, len, y + f, ldy, carry, 0, f);
        }
    }
    for (; f + WEIGHTS_PER_BLOCK <= f1; f += WEIGHTS_PER_BLOCK)
        rows_times_block(x, ldx, rows, w + f * ldw, ldw, 3, len, y + f, ldy, carry, f);
    if (f1 - f == 2) rows_times_block(x, ldx, rows, w + f * ldw, ldw, 2, len, y + f, ldy, carry, f);
    if (f1 - f == 1) rows_times_block(x, ldx, rows, w + f * ldw, ldw, 1, len, y + f, ldy, carry, f);
}

/* y[:rows, f0:f1] = x . w[f0:f1]^T over the whole k: in k blocks of at most K_BLOCK
 * columns, a FEATURE_CHUNK of features at a time, where k is longer than one block.
 * Returns 1 when the kept accumulators could not be allocated. */
static int rows_times_weights_blocked(const float *x, int64_t ldx, int64_t rows, const float *w,
                                      int64_t k, int64_t f0, int64_t f1, float *y, int64_t ldy) {
    const carry_t whole = {0, f0, 1, 1};
    if (k <= K_BLOCK) {
        rows_times_weights(x, ldx, rows, w, k, k, f0, f1, y, ldy, &whole);
        return 0;
    }
    /* Kept per pool thread between calls. */
    static __thread float *sums;
    static __thread int64_t capacity;
    int64_t needed = rows * FEATURE_CHUNK * LANES;
    if (needed > capacity) {
        free(sums);
        sums = aligned_alloc(64, sizeof(float) * needed);
        capacity = sums ? needed : 0;
        if (!sums) return 1;
    }
    for (int64_t c0 = f0; c0 < f1; c0 += FEATURE_CHUNK) {
        int64_t c1 = c0 + FEATURE_CHUNK < f1 ? c0 + FEATURE_CHUNK : f1;
        for (int64_t p = 0; p < k; p += K_BLOCK) {
            int64_t len = k - p < K_BLOCK ? k - p : K_BLOCK;
            const carry_t part = {sums, c0, p == 0, p + len == k};
            rows_times_weights(x + p, ldx, rows, w + p, k, len, c0, c1, y, ldy, &part);
        }
    }
    return 0;
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* One phase of expert_mlp_f32: for every (expert with rows, block of `features` outputs)
 * item, out[rows of e, block] = in[rows of e, :k] . weights[e][block, :k]^T. */
struct expert_phase {
    const float *in, *weights;
    int64_t ld_in, features, k, ld_out, per_expert;
    const int64_t *offsets;
    float *out;
    _Atomic int *failed;
};

static void expert_item(void *job, int64_t item) {
    const struct expert_phase *j = job;
    int64_t e = item / j->per_expert;
    int64_t rows = j->offsets[e + 1] - j->offsets[e];
    if (rows == 0) return;
    int64_t f0 = (item % j->per_expert) * FEATURES_PER_ITEM;
    int64_t f1 = f0 + FEATURES_PER_ITEM < j->features ? f0 + FEATURES_PER_ITEM : j->features;
    if (rows_times_weights_blocked(j->in + j->offsets[e] * j->ld_in, j->ld_in, rows,
                                   j->weights + e * j->features * j->k, j->k, f0, f1,
                                   j->out + j->offsets[e] * j->ld_out, j->ld_out))
        atomic_store(j->failed, 1);
}

static void expert_products(const float *in, int64_t ld_in, const int64_t *offsets,
                            int64_t experts, const float *weights, int64_t features, int64_t k,
                            float *out, int64_t ld_out, _Atomic int *failed, int threads) {
    int64_t per_expert = (features + FEATURES_PER_ITEM - 1) / FEATURES_PER_ITEM;
    struct expert_phase job = {in, weights, ld_in, features, k, ld_out, per_expert, offsets,
                               out, failed};
    flashserve_run_chunks(expert_item, &job, experts * per_expert, threads);
}

struct activation_job {
    float *scratch;
    int64_t inter;
};

/* The activation, in place into the gate half of each scratch row. */
static void activation_rows(void *job, int64_t begin, int64_t end) {
    const struct activation_job *j = job;
    for (int64_t r = begin; r < end; r++) {
        float *h = j->scratch + r * 2 * j->inter;
        for (int64_t c = 0; c < j->inter; c++) h[c] = silu(h[c]) * h[j->inter + c];
    }
}

/* rows [n, hidden] sorted by expert; offsets [experts + 1]; gate_up [experts, 2I, hidden];
 * down [experts, hidden, I]; scratch [n, 2I]; out [n, hidden]. hidden and I multiples of
 * LANES. Returns 0, or 1 when the accumulators kept between k blocks could not be
 * allocated. */
int expert_mlp_f32(const float *rows, const int64_t *offsets, int64_t experts,
                   const float *gate_up, const float *down, float *scratch, float *out,
                   int64_t hidden, int64_t inter, int threads) {
    int64_t n = offsets[experts];
    _Atomic int failed = 0;
    expert_products(rows, hidden, offsets, experts, gate_up, 2 * inter, hidden, scratch,
                    2 * inter, &failed, threads);
    struct activation_job activation = {scratch, inter};
    flashserve_run_ranges(activation_rows, &activation, n, (int64_t)threads * CHUNKS_PER_THREAD, threads);
    expert_products(scratch, 2 * inter, offsets, experts, down, hidden, inter, out, hidden,
                    &failed, threads);
    return failed;
}
