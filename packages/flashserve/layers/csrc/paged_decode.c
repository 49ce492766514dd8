/* Decode attention over the paged KV cache, read where it lies (CPU).
 *
 * One query token per row. Each (row, KV heads) is one task: the G query heads
 * that share a KV head read each key and value row of the sequence's blocks
 * straight from the cache ([blocks, block_size, kv_heads, head_dim]), with no
 * gathered copy. Three passes, all in fp32:
 *  - scores: tokens are taken a tile at a time, and the dot products of the
 *    tile's keys with a query head (with AVX-512: two heads, 8 keys each, a key
 *    widened once for both) are summed across lanes together, in one shuffle
 *    tree (a tree per token would cost as much as the products);
 *  - an exact softmax, max first, with a vector exp;
 *  - the weighted sum of the values, divided by the softmax's total at the end.
 * With AVX-512 (and head_dim a multiple of 16) vectors are 16 floats; bf16 keys
 * and values are widened 32 at a time, even and odd elements apart (a shift and
 * a mask: two instructions per 32 elements), and the values are summed in
 * registers, 64 elements of two query heads at a time. AVX512_BF16's vdpbf16ps
 * for q.k measured no faster than the widening (Zen 4), so it is not used.
 * Elsewhere, 8-float vectors (GCC vector extensions).
 *
 * A task's arithmetic depends only on its own row (the tiles start at token 0,
 * the order of every sum is fixed, nothing depends on the batch, the thread
 * count, the other heads of the task or the memory alignment), so a request's
 * output is the same bits alone or in any batch.
 *
 * Built at first use by layers/cpu_decode_attention.py (cc -O3 -march=native
 * -fopenmp); OpenMP shares the thread pool torch already loaded (same soname).
 */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "thread_pool.h"
#include "vector_ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define WIDE_PATH 1
#else
#define WIDE_PATH 0
#endif

/* Scores' rows are padded to a multiple of this: both paths' tiles (8, 16 tokens) divide it. */
#define TILE_PAD 16

/* Tokens ahead whose key (value) rows are fetched into cache while a tile is scored
 * (summed): blocks lie anywhere in the cache, and a block's rows span pages, where the
 * hardware prefetcher stops. The prefetches are spread over the tile's arithmetic, one
 * beside each load of the row it stands for: issued all at once, they stall on the
 * fill buffers and the arithmetic waits with them. They fetch into L2, not L1 (T1):
 * more of them are in flight at once; T0 prefetches gained nothing here (Zen 4), T1
 * ones read the scattered blocks twice as fast. Past the last key the stream goes
 * on with the first values, past the last value with the next task's first keys. */
#define PREFETCH_AHEAD 16

/* Everything one task reads; the pointers to q and out are the row's. */
struct task {
    int bf16;
    const void *q, *k_cache, *v_cache;
    void *out;
    int64_t ctx, padded, h0, h1, group, head_dim;
    float scale;
    const int64_t *tokens; /* [padded]: token t's offset in the cache (elements), KV head 0 */
    /* [padded + PREFETCH_AHEAD]: the rows (KV head h0 at ...+ (h - h0) head_dim) to fetch
     * at token t - PREFETCH_AHEAD of the scores' and the values' passes. */
    const char *const *k_ahead, *const *v_ahead;
};

/* Per-thread scratch. */
struct scratch {
    float *scores;      /* [heads][padded context]: scores, then the softmax's numerators */
    int64_t *tokens;    /* [padded context] */
    const char **ahead; /* [2][padded context + PREFETCH_AHEAD] */
    float *query;       /* [heads][query_floats] q, as the dot products read it */
    float *acc;         /* [heads][accumulator_floats] the weighted sums of the values */
    float *totals;      /* [heads] the softmax's denominators */
};

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* The lines of [at, at + bytes) into L2. */
static inline void prefetch_row(const char *at, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(at + line, 0, 2);
}

/* ---- 8-float vectors: any x86-64 (and head_dim a multiple of 8 anywhere) ---- */

static inline vf load_row(int bf16, const void *base, int64_t index) {
    return bf16 ? load_bf16((const uint16_t *)base + index)
                : load_f32((const float *)base + index);
}

static inline float max_lane(vf v) {
    float m = v[0];
    for (int i = 1; i < LANES; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* q as fp32, [heads][head_dim]. */
static void narrow_query(const struct task *tk, float *query) {
    const int64_t heads = (tk->h1 - tk->h0) * tk->group, first = tk->h0 * tk->group;
    for (int64_t i = 0; i < heads * tk->head_dim; i++)
        query[i] = tk->bf16 ? bf16_to_f32(((const uint16_t *)tk->q)[first * tk->head_dim + i])
                            : ((const float *)tk->q)[first * tk->head_dim + i];
}

static void scores_narrow(const struct task *tk, const float *query, float *scores) {
    const int64_t chunks = tk->head_dim / LANES, d = tk->head_dim, size = tk->bf16 ? 2 : 4;
    for (int64_t t0 = 0; t0 < tk->ctx; t0 += LANES) {
        for (int64_t h = tk->h0; h < tk->h1; h++) {
            int64_t keys[LANES];
            for (int k = 0; k < LANES; k++) {
                keys[k] = tk->tokens[t0 + k] + h * d;
                prefetch_row(tk->k_ahead[t0 + PREFETCH_AHEAD + k] + (h - tk->h0) * d * size,
                             d * size);
            }
            for (int64_t i = (h - tk->h0) * tk->group; i < (h - tk->h0 + 1) * tk->group; i++) {
                vf dots[LANES] = {{0}};
                for (int64_t c = 0; c < chunks; c++) {
                    const vf qc = load_f32(query + i * d + c * LANES);
                    for (int k = 0; k < LANES; k++)
                        dots[k] = multiply_add(
                            qc, load_row(tk->bf16, tk->k_cache, keys[k] + c * LANES), dots[k]);
                }
                store_f32(scores + i * tk->padded + t0, lane_sums8(dots) * broadcast(tk->scale));
            }
        }
    }
}

/* Scores [0, ctx) of one head -> e^(score - max) over [0, padded) (0 past ctx); returns
 * their sum. */
static float softmax_numerators_narrow(float *s, int64_t ctx, int64_t padded) {
    for (int64_t t = ctx; t < padded; t++) s[t] = -INFINITY;
    vf best = broadcast(-INFINITY), total = {0};
    for (int64_t t = 0; t < padded; t += LANES) {
        const vf v = load_f32(s + t);
        best = lane_select(v > best, v, best);
    }
    const vf top = broadcast(max_lane(best));
    for (int64_t t = 0; t < padded; t += LANES) {
        const vf e = exp_nonpositive(load_f32(s + t) - top);
        total += e;
        store_f32(s + t, e);
    }
    float sum = 0.0f;
    for (int k = 0; k < LANES; k++) sum += total[k];
    return sum;
}

static void values_narrow(const struct task *tk, const float *scores, float *acc) {
    const int64_t chunks = tk->head_dim / LANES, d = tk->head_dim, size = tk->bf16 ? 2 : 4;
    const int64_t heads = (tk->h1 - tk->h0) * tk->group;
    memset(acc, 0, sizeof(float) * (size_t)(heads * d));
    for (int64_t t = 0; t < tk->ctx; t++) {
        prefetch_row(tk->v_ahead[t + PREFETCH_AHEAD], (tk->h1 - tk->h0) * d * size);
        for (int64_t h = tk->h0; h < tk->h1; h++) {
            const int64_t at = tk->tokens[t] + h * d;
            for (int64_t c = 0; c < chunks; c++) {
                const vf row = load_row(tk->bf16, tk->v_cache, at + c * LANES);
                for (int64_t i = (h - tk->h0) * tk->group; i < (h - tk->h0 + 1) * tk->group;
                     i++) {
                    float *a = acc + i * d + c * LANES;
                    store_f32(a, multiply_add(broadcast(scores[i * tk->padded + t]), row,
                                              load_f32(a)));
                }
            }
        }
    }
}

static void store_narrow(const struct task *tk, const float *acc, const float *totals) {
    const int64_t heads = (tk->h1 - tk->h0) * tk->group, first = tk->h0 * tk->group;
    for (int64_t i = 0; i < heads; i++)
        for (int64_t c = 0; c < tk->head_dim; c += LANES) {
            const vf v = load_f32(acc + i * tk->head_dim + c) / broadcast(totals[i]);
            const int64_t at = (first + i) * tk->head_dim + c;
            if (tk->bf16)
                store_bf16((uint16_t *)tk->out + at, v);
            else
                store_f32((float *)tk->out + at, v);
        }
}

#if WIDE_PATH
/* ---- 16-float vectors (AVX-512), head_dim a multiple of 16 ----
 * fp32 rows are read 16 elements at a time; bf16 rows 32 at a time (a "piece"), as two
 * fp32 vectors: the even elements (the low halves of its 32-bit words, shifted up) and
 * the odd ones (the high halves, masked). The value accumulators keep that order; the
 * output is interleaved back at the end. */

/* Lane k of the result is the lane sum of v[k], by the same tree for every k. */
static inline __m512 lane_sums16(const __m512 v[16]) {
    __m512 pairs[8], quads[4], octets[2];
    for (int k = 0; k < 8; k++) /* per 128 bits: [a0+a2, b0+b2, a1+a3, b1+b3] */
        pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                                 _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++) /* per 128 bits: [a, b, c, d] */
        quads[k] = _mm512_add_ps(
            _mm512_shuffle_ps(pairs[2 * k], pairs[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
            _mm512_shuffle_ps(pairs[2 * k], pairs[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 2; k++) /* 128-bit lanes: [a-d 0+1, a-d 2+3, e-h 0+1, e-h 2+3] */
        octets[k] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * k], quads[2 * k + 1], 0x88),
                                  _mm512_shuffle_f32x4(quads[2 * k], quads[2 * k + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(octets[0], octets[1], 0x88),
                         _mm512_shuffle_f32x4(octets[0], octets[1], 0xdd));
}

/* The first `elements` (0..32) of a bf16 piece; the rest zero, unread. */
static inline __mmask32 piece_mask(int64_t elements) {
    return elements >= 32 ? 0xffffffffu : elements <= 0 ? 0 : (1u << elements) - 1;
}

static inline __m512 even_bf16(__m512i x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}

static inline __m512 odd_bf16(__m512i x) {
    return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
}

/* Floats of q per head as the dot products read it: fp32 as is; bf16 as the even and odd
 * halves of its pieces (32 floats a piece, zero-padded). */
static inline int64_t query_floats_wide(int bf16, int64_t head_dim) {
    return bf16 ? (head_dim + 31) / 32 * 32 : head_dim;
}

static void wide_query(const struct task *tk, float *query) {
    const int64_t heads = (tk->h1 - tk->h0) * tk->group, first = tk->h0 * tk->group;
    const int64_t d = tk->head_dim, per_head = query_floats_wide(tk->bf16, d);
    for (int64_t i = 0; i < heads; i++) {
        float *qh = query + i * per_head;
        if (!tk->bf16) {
            memcpy(qh, (const float *)tk->q + (first + i) * d, sizeof(float) * (size_t)d);
            continue;
        }
        const uint16_t *src = (const uint16_t *)tk->q + (first + i) * d;
        for (int64_t p = 0; p * 32 < d; p++) {
            const __m512i x = _mm512_maskz_loadu_epi16(piece_mask(d - p * 32), src + p * 32);
            _mm512_storeu_ps(qh + p * 32, even_bf16(x));
            _mm512_storeu_ps(qh + p * 32 + 16, odd_bf16(x));
        }
    }
}

/* 16 dot products of query heads with keys (offsets keys[k]): with `pair` (a constant in
 * each caller) qa's and qb's with keys 0..7 (dots[k], dots[8 + k]), else qa's with keys
 * 0..15. A key row is loaded and widened once for both heads; each dot product sums in
 * the same order either way. ahead[k]: the row to prefetch beside key k's. */
static inline void key_dots_wide(const struct task *tk, int pair, const float *qa,
                                 const float *qb, const int64_t *keys,
                                 const char *const *ahead, __m512 dots[16]) {
    const int64_t d = tk->head_dim, steps = tk->bf16 ? (d + 31) / 32 : d / 16;
    const int count = pair ? 8 : 16;
    for (int k = 0; k < 16; k++) dots[k] = _mm512_setzero_ps();
    for (int64_t s = 0; s < steps; s++) { /* a piece (16 floats, 32 bf16) is a cache line */
        if (!tk->bf16) {
            const __m512 a = _mm512_loadu_ps(qa + s * 16);
            const __m512 b = pair ? _mm512_loadu_ps(qb + s * 16) : a;
            const float *keys_f = (const float *)tk->k_cache + s * 16;
            for (int k = 0; k < count; k++) {
                _mm_prefetch(ahead[k] + s * 64, _MM_HINT_T1);
                const __m512 x = _mm512_loadu_ps(keys_f + keys[k]);
                dots[k] = _mm512_fmadd_ps(a, x, dots[k]);
                if (pair) dots[8 + k] = _mm512_fmadd_ps(b, x, dots[8 + k]);
            }
            continue;
        }
        const __mmask32 mask = piece_mask(d - s * 32);
        const uint16_t *keys_h = (const uint16_t *)tk->k_cache + s * 32;
        const __m512 a_even = _mm512_loadu_ps(qa + s * 32);
        const __m512 a_odd = _mm512_loadu_ps(qa + s * 32 + 16);
        const __m512 b_even = pair ? _mm512_loadu_ps(qb + s * 32) : a_even;
        const __m512 b_odd = pair ? _mm512_loadu_ps(qb + s * 32 + 16) : a_odd;
        for (int k = 0; k < count; k++) {
            _mm_prefetch(ahead[k] + s * 64, _MM_HINT_T1);
            const __m512i x = _mm512_maskz_loadu_epi16(mask, keys_h + keys[k]);
            const __m512 even = even_bf16(x), odd = odd_bf16(x);
            dots[k] = _mm512_fmadd_ps(a_odd, odd, _mm512_fmadd_ps(a_even, even, dots[k]));
            if (pair)
                dots[8 + k] =
                    _mm512_fmadd_ps(b_odd, odd, _mm512_fmadd_ps(b_even, even, dots[8 + k]));
        }
    }
}

/* Query heads two at a time (8 keys, one widening for both), an odd one out alone (16
 * keys); the lane sums of 16 dot products at once either way. */
static void scores_wide(const struct task *tk, const float *query, float *scores) {
    const int64_t d = tk->head_dim, per_head = query_floats_wide(tk->bf16, d);
    const int64_t size = tk->bf16 ? 2 : 4;
    const __m512 scale = _mm512_set1_ps(tk->scale);
    for (int64_t t0 = 0; t0 < tk->ctx; t0 += 16) {
        for (int64_t h = tk->h0; h < tk->h1; h++) {
            int64_t keys[16];
            const char *ahead[16];
            for (int k = 0; k < 16; k++) {
                keys[k] = tk->tokens[t0 + k] + h * d;
                ahead[k] = tk->k_ahead[t0 + PREFETCH_AHEAD + k] + (h - tk->h0) * d * size;
            }
            const int64_t first = (h - tk->h0) * tk->group;
            int64_t g = 0;
            __m512 dots[16];
            for (; g + 1 < tk->group; g += 2) {
                float *row_a = scores + (first + g) * tk->padded + t0, *row_b = row_a + tk->padded;
                for (int half = 0; half < 16; half += 8) {
                    key_dots_wide(tk, 1, query + (first + g) * per_head,
                                  query + (first + g + 1) * per_head, keys + half, ahead + half,
                                  dots);
                    const __m512d sums = _mm512_castps_pd(_mm512_mul_ps(lane_sums16(dots), scale));
                    _mm256_storeu_pd((double *)(row_a + half), _mm512_castpd512_pd256(sums));
                    _mm256_storeu_pd((double *)(row_b + half), _mm512_extractf64x4_pd(sums, 1));
                }
            }
            if (g < tk->group) {
                key_dots_wide(tk, 0, query + (first + g) * per_head, NULL, keys, ahead, dots);
                _mm512_storeu_ps(scores + (first + g) * tk->padded + t0,
                                 _mm512_mul_ps(lane_sums16(dots), scale));
            }
        }
    }
}

static float softmax_numerators_wide(float *s, int64_t ctx, int64_t padded) {
    for (int64_t t = ctx; t < padded; t++) s[t] = -INFINITY;
    __m512 best = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(s + t));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
    for (int64_t t = 0; t < padded; t += 16) {
        const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s + t), top));
        total = _mm512_add_ps(total, e);
        _mm512_storeu_ps(s + t, e);
    }
    return _mm512_reduce_add_ps(total);
}

/* Floats of accumulator per head: head_dim rounded up to whole 64-float blocks. */
static inline int64_t accumulator_floats_wide(int64_t head_dim) {
    return (head_dim + 63) / 64 * 64;
}

/* Tokens [t0, t0 + count) of the weighted sum of one KV head's values, for query head i
 * (and i + 1 when both): elements [column, column + 64) (the masks keep within head_dim),
 * in registers. `both` is a constant in each caller: a row is widened once for two
 * heads. */
static inline void values_block_wide(const struct task *tk, int both, const float *scores,
                                     int64_t i, int64_t h, int64_t t0, int64_t count,
                                     int64_t column, int prefetch, float *acc) {
    const int64_t d = tk->head_dim, stride = accumulator_floats_wide(d);
    float *a0 = acc + i * stride + column, *a1 = a0 + stride;
    const float *p0 = scores + i * tk->padded + t0, *p1 = p0 + tk->padded;
    __m512 sum0[4], sum1[4];
    for (int j = 0; j < 4; j++) {
        sum0[j] = _mm512_load_ps(a0 + 16 * j);
        sum1[j] = both ? _mm512_load_ps(a1 + 16 * j) : _mm512_setzero_ps();
    }
    const __mmask32 first = piece_mask(d - column), second = piece_mask(d - column - 32);
    __mmask16 lanes[4];
    for (int j = 0; j < 4; j++) lanes[j] = column + 16 * j < d ? 0xffff : 0;
    const int64_t size = tk->bf16 ? 2 : 4, lines = (d - column < 64 ? d - column : 64) * size;
    for (int64_t k = 0; k < count; k++) {
        if (prefetch) {
            const char *next =
                tk->v_ahead[t0 + PREFETCH_AHEAD + k] + ((h - tk->h0) * d + column) * size;
            for (int64_t line = 0; line < lines; line += 64)
                _mm_prefetch(next + line, _MM_HINT_T1);
        }
        __m512 row[4];
        if (tk->bf16) {
            const uint16_t *at = (const uint16_t *)tk->v_cache + tk->tokens[t0 + k] + h * d +
                                 column;
            const __m512i x = _mm512_maskz_loadu_epi16(first, at);
            const __m512i y = _mm512_maskz_loadu_epi16(second, at + 32);
            row[0] = even_bf16(x), row[1] = odd_bf16(x), row[2] = even_bf16(y),
            row[3] = odd_bf16(y);
        } else {
            const float *at = (const float *)tk->v_cache + tk->tokens[t0 + k] + h * d + column;
            for (int j = 0; j < 4; j++) row[j] = _mm512_maskz_loadu_ps(lanes[j], at + 16 * j);
        }
        const __m512 w0 = _mm512_set1_ps(p0[k]);
        for (int j = 0; j < 4; j++) sum0[j] = _mm512_fmadd_ps(w0, row[j], sum0[j]);
        if (both) {
            const __m512 w1 = _mm512_set1_ps(p1[k]);
            for (int j = 0; j < 4; j++) sum1[j] = _mm512_fmadd_ps(w1, row[j], sum1[j]);
        }
    }
    for (int j = 0; j < 4; j++) {
        _mm512_store_ps(a0 + 16 * j, sum0[j]);
        if (both) _mm512_store_ps(a1 + 16 * j, sum1[j]);
    }
}

static void values_wide(const struct task *tk, const float *scores, float *acc) {
    const int64_t heads = (tk->h1 - tk->h0) * tk->group, d = tk->head_dim;
    memset(acc, 0, sizeof(float) * (size_t)(heads * accumulator_floats_wide(d)));
    for (int64_t t0 = 0; t0 < tk->ctx; t0 += 16) {
        const int64_t count = tk->ctx - t0 < 16 ? tk->ctx - t0 : 16;
        for (int64_t h = tk->h0; h < tk->h1; h++) {
            for (int64_t g = 0; g < tk->group; g += 2) {
                const int64_t i = (h - tk->h0) * tk->group + g;
                for (int64_t column = 0; column < d; column += 64) {
                    if (g + 1 < tk->group)
                        values_block_wide(tk, 1, scores, i, h, t0, count, column, g == 0, acc);
                    else
                        values_block_wide(tk, 0, scores, i, h, t0, count, column, g == 0, acc);
                }
            }
        }
    }
}

/* 16 floats -> bf16, rounded to nearest even as torch does (NaN stays NaN). */
static inline __m256i to_bf16_16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                              _mm512_set1_epi32(1)))),
        16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

static void store_wide(const struct task *tk, const float *acc, const float *totals) {
    const int64_t heads = (tk->h1 - tk->h0) * tk->group, first = tk->h0 * tk->group;
    const int64_t d = tk->head_dim, stride = accumulator_floats_wide(d);
    /* Lanes of (even, odd) that interleave to elements 0-15, 16-31 of a piece. */
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t i = 0; i < heads; i++) {
        const __m512 total = _mm512_set1_ps(totals[i]);
        const float *a = acc + i * stride;
        if (!tk->bf16) {
            float *out = (float *)tk->out + (first + i) * d;
            for (int64_t c = 0; c < d; c += 16)
                _mm512_storeu_ps(out + c, _mm512_div_ps(_mm512_load_ps(a + c), total));
            continue;
        }
        uint16_t *out = (uint16_t *)tk->out + (first + i) * d;
        for (int64_t c = 0; c < d; c += 32) { /* a piece: even elements, then odd */
            const __m512 even = _mm512_div_ps(_mm512_load_ps(a + c), total);
            const __m512 odd = _mm512_div_ps(_mm512_load_ps(a + c + 16), total);
            _mm256_storeu_si256((__m256i *)(out + c),
                                to_bf16_16(_mm512_permutex2var_ps(even, low, odd)));
            if (c + 16 < d)
                _mm256_storeu_si256((__m256i *)(out + c + 16),
                                    to_bf16_16(_mm512_permutex2var_ps(even, high, odd)));
        }
    }
}
#endif

/* One task: KV heads [h0, h1) of one row. Query head q of the task is (h - h0) * group + g. */
static inline void attend(const struct task *tk, struct scratch *sc) {
    const int64_t heads = (tk->h1 - tk->h0) * tk->group;
    if (tk->ctx <= 0) { /* nothing to attend to: zeros, as a sum over no tokens */
        const int64_t size = tk->bf16 ? 2 : 4;
        memset((char *)tk->out + tk->h0 * tk->group * tk->head_dim * size, 0,
               (size_t)(heads * tk->head_dim * size));
        return;
    }
    float *totals = sc->totals;
#if WIDE_PATH
    if (tk->head_dim % 16 == 0) {
        wide_query(tk, sc->query);
        scores_wide(tk, sc->query, sc->scores);
        for (int64_t i = 0; i < heads; i++)
            totals[i] = softmax_numerators_wide(sc->scores + i * tk->padded, tk->ctx, tk->padded);
        values_wide(tk, sc->scores, sc->acc);
        store_wide(tk, sc->acc, totals);
        return;
    }
#endif
    narrow_query(tk, sc->query);
    scores_narrow(tk, sc->query, sc->scores);
    for (int64_t i = 0; i < heads; i++)
        totals[i] = softmax_numerators_narrow(sc->scores + i * tk->padded, tk->ctx, tk->padded);
    values_narrow(tk, sc->scores, sc->acc);
    store_narrow(tk, sc->acc, totals);
}

/* q, out: [rows, q_heads, head_dim] with the given row strides (elements);
 * head_dim contiguous, heads head_dim apart. Caches contiguous. tables: int32
 * [rows, table_stride]. */
struct decode_job {
    int bf16;
    const void *q, *k_cache, *v_cache;
    const int32_t *tables, *context_lens;
    int64_t q_row_stride, table_stride, out_row_stride, kv_heads, head_dim, block_size;
    int64_t max_context, group, span, parts;
    float scale;
    void *out;
    _Atomic int failed;
};

static void *aligned(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) ? NULL : p;
}

static inline int64_t task_context(const struct decode_job *j, int64_t task) {
    const int64_t ctx = j->context_lens[task / j->parts];
    return ctx < j->max_context ? ctx : j->max_context;
}

/* The offsets (elements, KV head 0) of tokens [0, count) of the task's row; from its
 * context on, the last token's again. */
static void token_offsets(const struct decode_job *j, int64_t task, int64_t count,
                          int64_t *offsets) {
    const int64_t ctx = task_context(j, task), token_stride = j->kv_heads * j->head_dim;
    const int32_t *table = j->tables + task / j->parts * j->table_stride;
    for (int64_t t = 0, b = 0, in_block = 0; t < count; t++) {
        offsets[t] = t < ctx ? (int64_t)table[b] * j->block_size * token_stride +
                                   in_block * token_stride
                             : offsets[ctx - 1];
        if (++in_block == j->block_size) in_block = 0, b++;
    }
}

/* The task's prefetch streams (struct task's k_ahead, v_ahead), ctx > 0: keys [0, ctx),
 * then values; values [0, ctx), then the next task's keys (from its first KV head on,
 * shifted to this task's heads), or the last value again after the last task. */
static void fill_ahead(const struct decode_job *j, int bf16, int64_t task, int64_t end,
                       int64_t ctx, int64_t padded, const int64_t *tokens, const char **ahead) {
    const int64_t size = bf16 ? 2 : 4, length = padded + PREFETCH_AHEAD;
    const int64_t h0 = task % j->parts * j->span;
    const char *k = (const char *)j->k_cache + h0 * j->head_dim * size;
    const char *v = (const char *)j->v_cache + h0 * j->head_dim * size;
    const char **k_ahead = ahead, **v_ahead = ahead + length;
    for (int64_t t = 0; t < length; t++) {
        k_ahead[t] = t < ctx ? k + tokens[t] * size
                             : v + tokens[t - ctx < ctx ? t - ctx : ctx - 1] * size;
        v_ahead[t] = v + tokens[t < ctx ? t : ctx - 1] * size;
    }
    if (task + 1 < end && task_context(j, task + 1) > 0) {
        int64_t next[PREFETCH_AHEAD];
        token_offsets(j, task + 1, PREFETCH_AHEAD, next);
        const int64_t next_h0 = (task + 1) % j->parts * j->span;
        const char *next_k = (const char *)j->k_cache + next_h0 * j->head_dim * size;
        for (int64_t t = ctx; t < length && t - ctx < PREFETCH_AHEAD; t++)
            v_ahead[t] = next_k + next[t - ctx] * size;
    }
}

/* Tasks [begin, end): task t is KV heads span * (t % parts) .. + span of row t / parts. */
static inline void decode_tasks(const struct decode_job *j, int bf16, int64_t begin,
                                int64_t end) {
    const int64_t size = bf16 ? 2 : 4, heads = j->span * j->group;
    const int64_t padded_max = (j->max_context + TILE_PAD - 1) / TILE_PAD * TILE_PAD;
    /* Room for either path's layout of q and of the accumulators. */
    const int64_t per_head = 2 * j->head_dim + 64;
    struct scratch sc = {
        .scores = aligned(sizeof(float) * (size_t)(padded_max * heads)),
        .tokens = aligned(sizeof(int64_t) * (size_t)padded_max),
        .ahead = aligned(sizeof(char *) * (size_t)(2 * (padded_max + PREFETCH_AHEAD))),
        .query = aligned(sizeof(float) * (size_t)(per_head * heads)),
        .acc = aligned(sizeof(float) * (size_t)(per_head * heads)),
        .totals = aligned(sizeof(float) * (size_t)heads),
    };
    if (!sc.scores || !sc.tokens || !sc.ahead || !sc.query || !sc.acc || !sc.totals) {
        atomic_store(&((struct decode_job *)j)->failed, 1);
    } else {
        for (int64_t task = begin; task < end; task++) {
            const int64_t r = task / j->parts, h0 = (task % j->parts) * j->span;
            const int64_t ctx = task_context(j, task);
            const int64_t padded = (ctx + TILE_PAD - 1) / TILE_PAD * TILE_PAD;
            if (ctx > 0) {
                /* Past the context, tiles read the last token again; its scores are dropped. */
                token_offsets(j, task, padded, sc.tokens);
                fill_ahead(j, bf16, task, end, ctx, padded, sc.tokens, sc.ahead);
            }
            const struct task tk = {
                .bf16 = bf16, .q = (const char *)j->q + r * j->q_row_stride * size,
                .k_cache = j->k_cache, .v_cache = j->v_cache,
                .out = (char *)j->out + r * j->out_row_stride * size, .ctx = ctx,
                .padded = padded, .h0 = h0, .h1 = h0 + j->span, .group = j->group,
                .head_dim = j->head_dim, .scale = j->scale, .tokens = sc.tokens,
                .k_ahead = sc.ahead, .v_ahead = sc.ahead + padded + PREFETCH_AHEAD};
            attend(&tk, &sc);
        }
    }
    free(sc.scores);
    free(sc.tokens);
    free(sc.ahead);
    free(sc.query);
    free(sc.acc);
    free(sc.totals);
}

/* bf16 a constant in each: the compiler specialises the loads and stores. */
static void decode_tasks_f32(void *job, int64_t begin, int64_t end) {
    decode_tasks(job, 0, begin, end);
}

static void decode_tasks_bf16(void *job, int64_t begin, int64_t end) {
    decode_tasks(job, 1, begin, end);
}

/* A task is a whole row when there are enough rows to keep every thread busy, else one
 * KV head of a row (a single sequence still spreads over the threads). Which split runs
 * changes no bits: each query head's arithmetic is the same either way. Returns nonzero
 * when scratch memory ran out. */
static inline int paged_decode(int bf16, const void *q, int64_t q_row_stride,
                               const void *k_cache, const void *v_cache, const int32_t *tables,
                               int64_t table_stride, const int32_t *context_lens, void *out,
                               int64_t out_row_stride, int64_t rows, int64_t q_heads,
                               int64_t kv_heads, int64_t head_dim, int64_t block_size,
                               float scale, int64_t max_context, int threads) {
    const int64_t span = rows >= 4 * (int64_t)threads ? kv_heads : 1; /* KV heads per task */
    struct decode_job job = {
        .bf16 = bf16, .q = q, .k_cache = k_cache, .v_cache = v_cache, .tables = tables,
        .context_lens = context_lens, .q_row_stride = q_row_stride,
        .table_stride = table_stride, .out_row_stride = out_row_stride, .kv_heads = kv_heads,
        .head_dim = head_dim, .block_size = block_size, .max_context = max_context,
        .group = q_heads / kv_heads, .span = span, .parts = kv_heads / span, .scale = scale,
        .out = out, .failed = 0};
    flashserve_run_ranges(bf16 ? decode_tasks_bf16 : decode_tasks_f32, &job, rows * job.parts,
                          (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return job.failed;
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
