/* Decode attention over the paged KV cache, read where it lies (CPU).
 *
 * One query token per row. Each (row, KV head) is one task: the G query heads
 * that share the KV head read the key and value rows of the sequence's blocks
 * straight from the cache ([blocks, block_size, kv_heads, head_dim]), with no
 * gathered copy; a block's rows, read for the first query head, are in cache
 * for the others. Scores are computed four keys at a time (four dot products
 * side by side, summed by one shuffle tree), then an exact softmax (max first,
 * a vectorised exp), then the weighted sum of the values with its accumulators
 * in registers, all in fp32, divided by the softmax total at the end.
 *
 * A task's arithmetic depends only on its own row (fixed lane order, the same
 * sums whichever four keys a key is computed with, no dependence on the batch,
 * the thread count or the memory alignment), so a request's output is the same
 * bits alone or in any batch.
 *
 * Built at first use by layers/cpu_decode_attention.py (cc -O3 -march=native
 * -fopenmp -ffp-contract=off); OpenMP shares the thread pool torch already
 * loaded (same soname).
 */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector_ops.h"

typedef uint32_t vu __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(LANES * sizeof(uint16_t))));

/* Value vectors summed at once for one query head: the accumulators stay in registers. */
#define VALUE_CHUNKS 8

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof(h));
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof(v));
    return v;
}

/* Vector arrays need their own alignment (32 bytes); malloc promises 16. */
static vf *vectors(size_t count) {
    void *p = NULL;
    return posix_memalign(&p, sizeof(vf), count * sizeof(vf)) ? NULL : (vf *)p;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(u >> 16);
}

static inline void store_bf16(uint16_t *p, vf v) {
    for (int i = 0; i < LANES; i++) p[i] = f32_to_bf16(v[i]);
}

#define AT(base, index) \
    (bf16 ? (const void *)((const uint16_t *)(base) + (index)) \
          : (const void *)((const float *)(base) + (index)))
#define LOAD(ptr) (bf16 ? load_bf16((const uint16_t *)(ptr)) : load_f32((const float *)(ptr)))

/* s[t] = q . k_t for the ctx keys of KV head h (q already scaled), four keys at a time. */
static inline __attribute__((always_inline)) void scores_of_head(
    int bf16, const vf *q, const void *k_cache, const int32_t *table, int64_t ctx, int64_t h,
    int64_t chunks, int64_t head_dim, int64_t block_size, int64_t token_stride, float *s) {
    const vf zero = {0};
    for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += block_size, b++) {
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int64_t base = (int64_t)table[b] * block_size * token_stride + h * head_dim;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            const int64_t at = base + j * token_stride;
            vf a0 = zero, a1 = zero, a2 = zero, a3 = zero;
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t lane = at + c * LANES;
                a0 = multiply_add(q[c], LOAD(AT(k_cache, lane)), a0);
                a1 = multiply_add(q[c], LOAD(AT(k_cache, lane + token_stride)), a1);
                a2 = multiply_add(q[c], LOAD(AT(k_cache, lane + 2 * token_stride)), a2);
                a3 = multiply_add(q[c], LOAD(AT(k_cache, lane + 3 * token_stride)), a3);
            }
            vf sums = lane_sums4(a0, a1, a2, a3);
            for (int m = 0; m < 4; m++) s[t0 + j + m] = sums[m];
        }
        for (; j < n; j++) {
            vf a0 = zero;
            for (int64_t c = 0; c < chunks; c++)
                a0 = multiply_add(q[c], LOAD(AT(k_cache, base + j * token_stride + c * LANES)), a0);
            s[t0 + j] = lane_sums4(a0, zero, zero, zero)[0];
        }
    }
}

/* s[:ctx] = e^(s - max); s[ctx : padded] (padding, -inf) = 0. Returns the sum over s. */
static inline float exponentiate(float *s, int64_t ctx, int64_t padded) {
    float best = -INFINITY;
    for (int64_t t = 0; t < ctx; t++) best = s[t] > best ? s[t] : best;
    for (int64_t t = ctx; t < padded; t++) s[t] = -INFINITY;
    vf total = {0};
    for (int64_t t = 0; t < padded; t += LANES) {
        vf e = exp_nonpositive(load_f32(s + t) - broadcast(best));
        store_f32(s + t, e);
        total += e;
    }
    const vf zero = {0};
    return lane_sums4(total, zero, zero, zero)[0];
}

/* out[c0 : c0 + NC] = (sum over t of p_t v_t) * inverse over the value chunks [c0, c0 + NC). */
static inline __attribute__((always_inline)) void weighted_values(
    int bf16, const float *p, const void *v_cache, const int32_t *table, int64_t ctx, int64_t h,
    int64_t c0, const int nc, int64_t head_dim, int64_t block_size, int64_t token_stride,
    float inverse, vf *out) {
    vf acc[VALUE_CHUNKS];
    for (int c = 0; c < nc; c++) acc[c] = (vf){0};
    for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += block_size, b++) {
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int64_t base =
            (int64_t)table[b] * block_size * token_stride + h * head_dim + c0 * LANES;
        for (int64_t j = 0; j < n; j++) {
            const vf weight = broadcast(p[t0 + j]);
            for (int c = 0; c < nc; c++)
                acc[c] = multiply_add(weight, LOAD(AT(v_cache, base + j * token_stride + c * LANES)),
                                      acc[c]);
        }
    }
    for (int c = 0; c < nc; c++) out[c] = acc[c] * broadcast(inverse);
}

/* One task: KV heads [h0, h1) of one row. bf16 is a compile-time constant in each caller,
 * so the compiler specialises the loads and stores. Query head q of the task is
 * (h - h0) * group + g; scores hold one row of `padded` floats per query head. */
static inline void attend(int bf16, const void *q, const void *k_cache, const void *v_cache,
                          const int32_t *table, int64_t ctx, void *out, int64_t h0, int64_t h1,
                          int64_t group, int64_t chunks, int64_t head_dim, int64_t block_size,
                          int64_t token_stride, float scale, float *scores, vf *qv, vf *row) {
    const int64_t padded = (ctx + LANES - 1) / LANES * LANES;
    for (int64_t h = h0; h < h1; h++)
        for (int64_t i = (h - h0) * group; i < (h - h0 + 1) * group; i++) {
            const int64_t head = h0 * group + i;
            vf *q_head = qv + i * chunks;
            for (int64_t c = 0; c < chunks; c++)
                q_head[c] = LOAD(AT(q, head * head_dim + c * LANES)) * broadcast(scale);
            float *s = scores + i * padded;
            scores_of_head(bf16, q_head, k_cache, table, ctx, h, chunks, head_dim, block_size,
                           token_stride, s);
            /* ctx 0: the output is 0 (nothing to attend to). */
            const float total = ctx ? exponentiate(s, ctx, padded) : 1.0f;
            const float inverse = 1.0f / total;
            for (int64_t c0 = 0; c0 < chunks; c0 += VALUE_CHUNKS) {
                const int64_t nc = chunks - c0 < VALUE_CHUNKS ? chunks - c0 : VALUE_CHUNKS;
                vf *o = row + c0;
                switch (nc) {
#define VALUES(NC)                                                                          \
    case NC:                                                                                \
        weighted_values(bf16, s, v_cache, table, ctx, h, c0, NC, head_dim, block_size,     \
                        token_stride, inverse, o);                                          \
        break;
                    VALUES(8) VALUES(7) VALUES(6) VALUES(5) VALUES(4) VALUES(3) VALUES(2)
                    VALUES(1)
#undef VALUES
                }
            }
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t at = head * head_dim + c * LANES;
                if (bf16)
                    store_bf16((uint16_t *)out + at, row[c]);
                else
                    store_f32((float *)out + at, row[c]);
            }
        }
}
#undef LOAD
#undef AT

/* q, out: [rows, q_heads, head_dim] with the given row strides (elements);
 * head_dim contiguous, heads head_dim apart. Caches contiguous. tables: int32
 * [rows, table_stride]. A task is a whole row when there are enough rows to
 * keep every thread busy, else one KV head of a row (a single sequence still
 * spreads over the threads). Which split runs changes no bits: each query
 * head's arithmetic is the same either way. Returns nonzero when scratch
 * memory ran out. */
static inline int paged_decode(int bf16, const void *q, int64_t q_row_stride,
                               const void *k_cache, const void *v_cache, const int32_t *tables,
                               int64_t table_stride, const int32_t *context_lens, void *out,
                               int64_t out_row_stride, int64_t rows, int64_t q_heads,
                               int64_t kv_heads, int64_t head_dim, int64_t block_size,
                               float scale, int64_t max_context, int threads) {
    const int64_t group = q_heads / kv_heads, chunks = head_dim / LANES;
    const int64_t size = bf16 ? 2 : 4;
    const int64_t span = rows >= 4 * (int64_t)threads ? kv_heads : 1; /* KV heads per task */
    const int64_t parts = kv_heads / span;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const int64_t padded = (max_context + LANES - 1) / LANES * LANES;
        float *scores = (float *)vectors((size_t)(padded * span * group / LANES));
        vf *qv = vectors((size_t)(span * group * chunks));
        vf *row = vectors((size_t)chunks);
        if (!scores || !qv || !row) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < rows * parts; task++) {
                const int64_t r = task / parts, h0 = (task % parts) * span;
                const int64_t ctx = context_lens[r] < max_context ? context_lens[r] : max_context;
                attend(bf16, (const char *)q + r * q_row_stride * size, k_cache, v_cache,
                       tables + r * table_stride, ctx, (char *)out + r * out_row_stride * size,
                       h0, h0 + span, group, chunks, head_dim, block_size, kv_heads * head_dim,
                       scale, scores, qv, row);
            }
        }
        free(scores);
        free(qv);
        free(row);
    }
    return failed;
}

#define ENTRY(NAME, BF16)                                                                        \
    int NAME(const void *q, int64_t q_row_stride, const void *k_cache, const void *v_cache,     \
             const int32_t *tables, int64_t table_stride, const int32_t *context_lens,          \
             void *out, int64_t out_row_stride, int64_t rows, int64_t q_heads,                  \
             int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,               \
             int64_t max_context, int threads) {                                                 \
        return paged_decode(BF16, q, q_row_stride, k_cache, v_cache, tables, table_stride,      \
                            context_lens, out, out_row_stride, rows, q_heads, kv_heads,         \
                            head_dim, block_size, scale, max_context, threads);                 \
    }

ENTRY(paged_decode_f32, 0)
ENTRY(paged_decode_bf16, 1)
