/* Matrix products of many rows by a weight matrix (CPU, fp32): y = x . W^T (+ bias), a
 * prefill's projections.
 *
 * The classic blocked GEMM: a block of KC columns of MC input rows and one of NC weight
 * rows are copied ("packed") into the order the inner kernel reads them, and the inner
 * kernel multiplies a panel of 6 input rows by one of 16 weight rows: 12 accumulators
 * of 8 lanes in registers; for each k, two weight vectors and six broadcast inputs,
 * twelve fused multiply-adds. The packed input block stays in L2 while the weight
 * panels pass through L1 (bench/packed_gemm.py compares it with torch's GEMM).
 *
 * Each output element is one chain of multiply-adds in k order (a block past the first
 * continues from the partial sum stored in y), so a row's result depends only on its own
 * input row and the weights: the same bits in any batch and with any thread count.
 * Work items are runs of whole panels of output features. Built at first use by
 * layers/native.py.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "linear_job.h"
#include "thread_pool.h"
#include "vector_ops.h"

#define MR 6     /* input rows per panel */
#define NR 16    /* weight rows (output features) per panel: two vectors */
#define KC 512   /* columns per block: a weight panel (NR x KC) fills L1 */
#define MC 48    /* input rows per packed block (MR x 8) */
#define NC 768   /* weight rows per packed block (NR x 48) */

/* x block [mc, kc] (row stride ldx) -> panels of MR rows, [ceil(mc / MR)][kc][MR],
 * zero rows past mc. */
static void pack_inputs(const float *x, int64_t ldx, int64_t mc, int64_t kc, float *out) {
    for (int64_t i0 = 0; i0 < mc; i0 += MR, out += kc * MR) {
        int64_t rows = mc - i0 < MR ? mc - i0 : MR;
        for (int64_t p = 0; p < kc; p++) {
            for (int64_t i = 0; i < rows; i++) out[p * MR + i] = x[(i0 + i) * ldx + p];
            for (int64_t i = rows; i < MR; i++) out[p * MR + i] = 0.0f;
        }
    }
}

/* w block [nc, kc] (row stride ldw) -> panels of NR weight rows, [ceil(nc / NR)][kc][NR],
 * zero rows past nc. */
static void pack_weights(const float *w, int64_t ldw, int64_t nc, int64_t kc, float *out) {
    for (int64_t j0 = 0; j0 < nc; j0 += NR, out += kc * NR) {
        int64_t cols = nc - j0 < NR ? nc - j0 : NR;
        for (int64_t j = 0; j < cols; j++) {
            const float *src = w + (j0 + j) * ldw;
            for (int64_t p = 0; p < kc; p++) out[p * NR + j] = src[p];
        }
        for (int64_t j = cols; j < NR; j++)
            for (int64_t p = 0; p < kc; p++) out[p * NR + j] = 0.0f;
    }
}

/* y tile [rows <= MR, cols <= NR] (row stride ldy) = (first ? 0 : y) + panel . panel. */
static void panel_product(const float *xp, const float *wp, int64_t kc, float *y, int64_t ldy,
                          int rows, int cols, int first) {
    vf acc[MR][2];
    float tile[MR][NR];
    int whole = rows == MR && cols == NR;
    for (int i = 0; i < MR; i++) {
        if (first || i >= rows) {
            acc[i][0] = acc[i][1] = (vf){0};
        } else if (whole) {
            acc[i][0] = load_f32(y + i * ldy);
            acc[i][1] = load_f32(y + i * ldy + 8);
        } else {
            memset(tile[i], 0, sizeof(tile[i]));
            memcpy(tile[i], y + i * ldy, cols * sizeof(float));
            acc[i][0] = load_f32(tile[i]);
            acc[i][1] = load_f32(tile[i] + 8);
        }
    }
    for (int64_t p = 0; p < kc; p++, xp += MR, wp += NR) {
        vf w0 = load_f32(wp), w1 = load_f32(wp + 8);
        for (int i = 0; i < MR; i++) {
            vf xi = broadcast(xp[i]);
            acc[i][0] = multiply_add(xi, w0, acc[i][0]);
            acc[i][1] = multiply_add(xi, w1, acc[i][1]);
        }
    }
    for (int i = 0; i < rows; i++) {
        if (whole) {
            store_f32(y + i * ldy, acc[i][0]);
            store_f32(y + i * ldy + 8, acc[i][1]);
        } else {
            store_f32(tile[i], acc[i][0]);
            store_f32(tile[i] + 8, acc[i][1]);
            memcpy(y + i * ldy, tile[i], cols * sizeof(float));
        }
    }
}

/* y[:, n0:n1] = x . w[n0:n1]^T with this thread's packing buffers. */
static void product_range(const float *x, int64_t ldx, int64_t m, const float *w, int64_t k,
                          int64_t n0, int64_t n1, float *y, int64_t ldy, float *xpack,
                          float *wpack) {
    for (int64_t jc = n0; jc < n1; jc += NC) {
        int64_t nc = n1 - jc < NC ? n1 - jc : NC;
        for (int64_t pc = 0; pc < k; pc += KC) {
            int64_t kc = k - pc < KC ? k - pc : KC;
            pack_weights(w + jc * k + pc, k, nc, kc, wpack);
            for (int64_t ic = 0; ic < m; ic += MC) {
                int64_t mc = m - ic < MC ? m - ic : MC;
                pack_inputs(x + ic * ldx + pc, ldx, mc, kc, xpack);
                for (int64_t jr = 0; jr < nc; jr += NR) {
                    int cols = nc - jr < NR ? (int)(nc - jr) : NR;
                    for (int64_t ir = 0; ir < mc; ir += MR) {
                        int rows = mc - ir < MR ? (int)(mc - ir) : MR;
                        panel_product(xpack + ir * kc, wpack + jr * kc, kc,
                                      y + (ic + ir) * ldy + jc + jr, ldy, rows, cols, pc == 0);
                    }
                }
            }
        }
    }
}

/* Output features of panels [begin, end). */
static void product_panels(void *job, int64_t begin, int64_t end) {
    struct linear_job *j = job;
    /* Kept per thread between calls: a prefill makes dozens of these products. */
    static __thread float *xpack, *wpack;
    int64_t n0 = begin * NR, n1 = end * NR < j->features ? end * NR : j->features;
    if (!xpack) xpack = aligned_alloc(64, sizeof(float) * MC * KC);
    if (!wpack) wpack = aligned_alloc(64, sizeof(float) * NC * KC);
    if (!xpack || !wpack) {
        atomic_store(&j->failed, 1);
        return;
    }
    product_range(j->x, j->ldx, j->rows, j->w, j->k, n0, n1, j->y, j->ldy, xpack, wpack);
    if (j->bias)
        for (int64_t r = 0; r < j->rows; r++)
            for (int64_t f = n0; f < n1; f++) j->y[r * j->ldy + f] += j->bias[f];
}

/* Features per work item: each item packs its own input blocks, which a narrower one
 * would repeat too often for the products it feeds. */
#define MIN_FEATURES_PER_ITEM 384

/* y [m, n] (row stride ldy) = x [m, k] (row stride ldx) . w [n, k]^T (+ bias [n] if not
 * NULL). Returns 0, or 1 when the packing buffers could not be allocated. */
int packed_linear_f32(const float *x, int64_t ldx, int64_t m, const float *w, int64_t n,
                      int64_t k, const float *bias, float *y, int64_t ldy, int threads) {
    struct linear_job job = {x, w, bias, ldx, m, n, k, ldy, y, 0};
    int64_t items = n / MIN_FEATURES_PER_ITEM;
    items = items > threads ? items : threads;
    items = items < (int64_t)threads * CHUNKS_PER_THREAD ? items : (int64_t)threads * CHUNKS_PER_THREAD;
    flashserve_run_ranges(product_panels, &job, (n + NR - 1) / NR, items, threads);
    return job.failed;
}
