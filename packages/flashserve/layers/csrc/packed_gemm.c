/* Matrix products of any number of rows by a weight matrix (CPU, fp32):
 * y = x . W^T (+ bias), every fp32 linear layer of the engine (a decode step's few rows and
 * a prefill's thousands).
 *
 * The classic blocked GEMM with the weights packed once: W arrives as panels of NR output
 * features, [ceil(n / NR)][k][NR] (layers/packed_gemm.py makes them at a weight's first
 * product and keeps them). A block of KC columns of MC input rows is copied ("packed")
 * into the order the inner kernel reads, and the inner kernel multiplies a panel of up to
 * 6 input rows by one of 16 weight rows: up to 12 accumulators of 8 lanes in registers;
 * for each k, two weight vectors and one broadcast input per row, two fused
 * multiply-adds per row. The packed input block stays in L2 while the weight panels pass
 * through L1 (bench/packed_gemm.py compares it with torch's GEMM).
 *
 * Each output element is one chain of multiply-adds in k order (a block past the first
 * continues from the partial sum stored in y), so a row's result depends only on its own
 * input row and the weights: the same bits in any batch, at any row count and with any
 * thread count. That is what keeps a seeded request's tokens independent of the load:
 * the same position is a decode row one time and a recomputed prompt row another.
 * Work items are runs of whole panels of output features. Built at first use by
 * layers/native.py.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "thread_pool.h"
#include "vector_ops.h"

/* One product as the thread pool's ranges see it (native.LINEAR_KERNEL_ARGS: the same
 * arguments from Python; w is the weight's panels). */
struct linear_job {
    const float *x, *w, *bias;
    int64_t ldx, rows, features, k, ldy;
    float *y;
    _Atomic int failed; /* a range could not allocate its input packing buffer */
};

#define MR 6     /* input rows per panel */
#define NR 16    /* weight rows (output features) per panel: two vectors */
#define KC 512   /* columns per block: a weight panel (NR x KC) fills L1 */
#define MC 48    /* input rows per packed block (MR x 8) */
#define NC 768   /* weight rows per block, kept in L2 across input blocks (NR x 48) */

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

/* A row's outputs are chains of multiply-adds, each waiting for the previous one: the
 * FMA units need about 8 chains in flight, which 1-3 rows of one panel do not have. They
 * take this many panels at once instead (8 or 12 accumulators; 16 for 4 rows where
 * AVX-512 gives 32 vector registers). */
#ifdef __AVX512F__
static const int PANELS_FOR_ROWS[5] = {1, 4, 3, 2, 2};
#else
static const int PANELS_FOR_ROWS[5] = {1, 4, 3, 2, 1};
#endif
#define MAX_PANELS 4

/* y tile [rows <= MR, panels * NR (or cols < NR when panels is 1)] (row stride ldy) =
 * (first ? 0 : y) + inputs . weight panels, the panels wstride floats apart. rows and
 * panels are constants in each inlined copy, so a decode of one row does one row's work. */
static inline __attribute__((always_inline)) void rows_product(
    const float *xp, const float *wp, int64_t wstride, int64_t kc, float *y, int64_t ldy,
    const int rows, const int panels, int cols, int first) {
    vf acc[MR][2 * MAX_PANELS];
    float tile[MR][NR];
    int whole = cols == NR;
    for (int i = 0; i < rows; i++) {
        for (int v = 0; v < 2 * panels; v++) {
            if (first) {
                acc[i][v] = (vf){0};
            } else if (whole) {
                acc[i][v] = load_f32(y + i * ldy + v * 8);
            } else {
                if (v == 0) {
                    memset(tile[i], 0, sizeof(tile[i]));
                    memcpy(tile[i], y + i * ldy, cols * sizeof(float));
                }
                acc[i][v] = load_f32(tile[i] + v * 8);
            }
        }
    }
    for (int64_t p = 0; p < kc; p++, xp += MR, wp += NR) {
        vf w[2 * MAX_PANELS];
        for (int q = 0; q < panels; q++) {
            w[2 * q] = load_f32(wp + q * wstride);
            w[2 * q + 1] = load_f32(wp + q * wstride + 8);
        }
        for (int i = 0; i < rows; i++) {
            vf xi = broadcast(xp[i]);
            for (int v = 0; v < 2 * panels; v++) acc[i][v] = multiply_add(xi, w[v], acc[i][v]);
        }
    }
    for (int i = 0; i < rows; i++) {
        if (whole) {
            for (int v = 0; v < 2 * panels; v++) store_f32(y + i * ldy + v * 8, acc[i][v]);
        } else {
            store_f32(tile[i], acc[i][0]);
            store_f32(tile[i] + 8, acc[i][1]);
            memcpy(y + i * ldy, tile[i], cols * sizeof(float));
        }
    }
}

static void panel_product(const float *xp, const float *wp, int64_t wstride, int64_t kc,
                          float *y, int64_t ldy, int rows, int panels, int cols, int first) {
    if (panels == 4) rows_product(xp, wp, wstride, kc, y, ldy, 1, 4, NR, first);
    else if (panels == 3) rows_product(xp, wp, wstride, kc, y, ldy, 2, 3, NR, first);
    else if (panels == 2 && rows == 3) rows_product(xp, wp, wstride, kc, y, ldy, 3, 2, NR, first);
    else if (panels == 2) rows_product(xp, wp, wstride, kc, y, ldy, 4, 2, NR, first);
    else switch (rows) {
    case 1: rows_product(xp, wp, wstride, kc, y, ldy, 1, 1, cols, first); break;
    case 2: rows_product(xp, wp, wstride, kc, y, ldy, 2, 1, cols, first); break;
    case 3: rows_product(xp, wp, wstride, kc, y, ldy, 3, 1, cols, first); break;
    case 4: rows_product(xp, wp, wstride, kc, y, ldy, 4, 1, cols, first); break;
    case 5: rows_product(xp, wp, wstride, kc, y, ldy, 5, 1, cols, first); break;
    default: rows_product(xp, wp, wstride, kc, y, ldy, MR, 1, cols, first); break;
    }
}

/* y[:, n0:n1] = x . w[n0:n1]^T with this thread's input packing buffer; n0 is a multiple
 * of NR, and panel f / NR of w starts at w + f * k. */
static void product_range(const float *x, int64_t ldx, int64_t m, const float *w, int64_t k,
                          int64_t n0, int64_t n1, float *y, int64_t ldy, float *xpack) {
    for (int64_t jc = n0; jc < n1; jc += NC) {
        int64_t nc = n1 - jc < NC ? n1 - jc : NC;
        for (int64_t pc = 0; pc < k; pc += KC) {
            int64_t kc = k - pc < KC ? k - pc : KC;
            for (int64_t ic = 0; ic < m; ic += MC) {
                int64_t mc = m - ic < MC ? m - ic : MC;
                pack_inputs(x + ic * ldx + pc, ldx, mc, kc, xpack);
                /* 1-3 rows: several panels at a time while whole ones are left */
                int many = mc < 5 ? PANELS_FOR_ROWS[mc] : 1;
                for (int64_t jr = 0; jr < nc;) {
                    int cols = nc - jr < NR ? (int)(nc - jr) : NR;
                    int panels = nc - jr >= many * NR ? many : 1;
                    const float *panel = w + (jc + jr) * k + pc * NR;
                    for (int64_t ir = 0; ir < mc; ir += MR) {
                        int rows = mc - ir < MR ? (int)(mc - ir) : MR;
                        panel_product(xpack + ir * kc, panel, k * NR, kc,
                                      y + (ic + ir) * ldy + jc + jr, ldy, rows, panels, cols,
                                      pc == 0);
                    }
                    jr += panels * NR;
                }
            }
        }
    }
}

/* Output features of panels [begin, end). */
static void product_panels(void *job, int64_t begin, int64_t end) {
    struct linear_job *j = job;
    /* Kept per thread between calls: a prefill makes dozens of these products. */
    static __thread float *xpack;
    int64_t n0 = begin * NR, n1 = end * NR < j->features ? end * NR : j->features;
    if (!xpack) xpack = aligned_alloc(64, sizeof(float) * MC * KC);
    if (!xpack) {
        atomic_store(&j->failed, 1);
        return;
    }
    product_range(j->x, j->ldx, j->rows, j->w, j->k, n0, n1, j->y, j->ldy, xpack);
    if (j->bias)
        for (int64_t r = 0; r < j->rows; r++)
            for (int64_t f = n0; f < n1; f++) j->y[r * j->ldy + f] += j->bias[f];
}

/* Features per work item: each item packs its own input blocks, which a narrower one
 * would repeat too often for the products it feeds. */
#define MIN_FEATURES_PER_ITEM 384

/* y [m, n] (row stride ldy) = x [m, k] (row stride ldx) . W^T (+ bias [n] if not NULL),
 * W [n, k] given as its panels w [ceil(n / NR)][k][NR] (features past n zero). Returns 0,
 * or 1 when the input packing buffer could not be allocated. */
int packed_linear_f32(const float *x, int64_t ldx, int64_t m, const float *w, int64_t n,
                      int64_t k, const float *bias, float *y, int64_t ldy, int threads) {
    struct linear_job job = {x, w, bias, ldx, m, n, k, ldy, y, 0};
    int64_t items = n / MIN_FEATURES_PER_ITEM;
    items = items > threads ? items : threads;
    items = items < (int64_t)threads * CHUNKS_PER_THREAD ? items : (int64_t)threads * CHUNKS_PER_THREAD;
    flashserve_run_ranges(product_panels, &job, (n + NR - 1) / NR, items, threads);
    return job.failed;
}
