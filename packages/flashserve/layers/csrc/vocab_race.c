/* The CPU sampler's pass over the vocabulary (engine/vocab_race.py), one row at a
 * time while the row sits in the cache: the softmax, its blocks' totals, the
 * two-round exponential race, and the mass at or above the drawn token.
 *
 * The arithmetic is torch's, operation for operation, so that a row's
 * probabilities, totals and token have the bits the torch passes give
 * (torch.softmax(...).nan_to_num_(nan=0.0), truncation.block_sums, sampler._race
 * and truncation.mass_at_least) where torch runs its 8-lane (AVX2) kernels:
 * - the softmax as ATen's last-dim softmax: the max, e = exp(x - max) by the
 *   exp torch calls (Sleef_expf8_u10, passed in as a pointer), the sum of e in
 *   8 lanes from the first vector on, the lanes by torch's tree, then e * (1 / sum);
 * - each block of 256 as ATen's inner sum: vectors into 4 accumulators in turn,
 *   leftovers into the first, the 4 added in order, the block's scalar tail
 *   first and then the 8 lanes in order;
 * - the race: totals / log U and p / log U, the first minimum of each round;
 * - the mass by nucleus_mass.h, as csrc/mass_at_least.c.
 * The logits may be bf16 and come with a temperature per row: each is then widened
 * and divided as torch's .float() and div_ would have done, in the pass that reads
 * it, instead of in two more passes over the batch (the largest logit is found on
 * the raw values and divided once: dividing by t > 0 keeps their order, rounding
 * included).
 * Nothing depends on the other rows or the thread count.
 * Built at first use by layers/native.py (-ffp-contract=off: no fused multiply-add).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nucleus_mass.h"
#include "thread_pool.h"

#define RACE_BLOCK 256

#if defined(__AVX2__)
#include <immintrin.h>
#include <stdatomic.h>

typedef __m256 (*exp8_fn)(__m256);
#if defined(__AVX512F__)
/* Sleef_expf16_u10: the same bits as Sleef_expf8_u10 for every float (checked over all
 * 2^32 of them), half the calls. */
typedef __m512 (*exp16_fn)(__m512);
#else
typedef void *exp16_fn;
#endif

/* NaN in either lane wins, as ATen's vec::maximum. */
static inline __m256 maximum(__m256 a, __m256 b) {
    return _mm256_or_ps(_mm256_max_ps(a, b), _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
}

/* The first `count` (< 8) floats at p, the other lanes zero (ATen's partial loadu). */
static inline __m256 load_partial(const float *p, int64_t count) {
    float lanes[8] = {0};
    memcpy(lanes, p, (size_t)count * sizeof(float));
    return _mm256_loadu_ps(lanes);
}

/* ATen's 8-lane reduction tree, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): the
 * one vector_ops.h's lane_sums4 adds by. */
static inline float lane_tree_sum(__m256 v) {
    const vf zero = {0};
    return lane_sums4((vf)v, zero, zero, zero)[0];
}

static inline float lane_tree_max(__m256 v) {
    __m256 w = maximum(v, _mm256_permute2f128_ps(v, v, 0x1));
    w = maximum(w, _mm256_shuffle_ps(w, w, 0x4E));
    w = maximum(w, _mm256_shuffle_ps(w, w, 0xB1));
    return _mm256_cvtss_f32(w);
}

/* Lanes below `count` from b, the rest from a (ATen's Vectorized::set). */
static inline __m256 first_lanes(__m256 a, __m256 b, int64_t count) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 take = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), lane));
    return _mm256_blendv_ps(a, b, take);
}

/* A row of logits as the softmax reads it: fp32 or bf16, divided by a temperature. */
struct logit_row {
    const void *x;
    int bf16;
    int divide; /* by t (t == 1 changes nothing) */
    __m256 t;
};

/* 8 logits from index d, widened (bf16) but not divided. */
static inline __m256 raw8(const struct logit_row *row, int64_t d) {
    if (!row->bf16) return _mm256_loadu_ps((const float *)row->x + d);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row->x + d));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The first `count` (< 8) logits from index d, the other lanes zero, widened. */
static inline __m256 raw_partial(const struct logit_row *row, int64_t d, int64_t count) {
    if (!row->bf16) return load_partial((const float *)row->x + d, count);
    uint16_t lanes[8] = {0};
    memcpy(lanes, (const uint16_t *)row->x + d, (size_t)count * sizeof(uint16_t));
    const __m128i h = _mm_loadu_si128((const __m128i *)lanes);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 scaled(const struct logit_row *row, __m256 v) {
    return row->divide ? _mm256_div_ps(v, row->t) : v;
}

#if defined(__AVX512F__)
/* 16 logits from index d, widened and divided (each lane as raw8 and scaled give it). */
static inline __m512 scaled16(const struct logit_row *row, int64_t d, __m512 t) {
    __m512 v;
    if (row->bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row->x + d));
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
        v = _mm512_loadu_ps((const float *)row->x + d);
    }
    return row->divide ? _mm512_div_ps(v, t) : v;
}
#endif

/* probs[0:n] = softmax(x[0:n]) with NaN as 0, as torch computes it; n >= 8. next: the
 * row this thread takes after x (or NULL), fetched into the cache during the exp loop,
 * which computes more than it reads, so that the next max pass need not wait for memory. */
static void softmax_row(const struct logit_row *row, int64_t n, float *probs, exp8_fn exp8,
                        exp16_fn exp16, const char *next) {
    const int64_t whole = n - n % 8, tail = n - whole;
    /* The largest value is the same in any order (NaN aside, which wins anyway; and
     * a zero's sign, which x - max never shows): four chains, not one. */
    __m256 peaks[4];
    for (int k = 0; k < 4; k++) peaks[k] = raw8(row, 0);
    int64_t d = 8;
    for (; d + 32 <= whole; d += 32) {
        for (int k = 0; k < 4; k++) peaks[k] = maximum(peaks[k], raw8(row, d + 8 * k));
    }
    for (; d < whole; d += 8) peaks[0] = maximum(peaks[0], raw8(row, d));
    __m256 peak = maximum(maximum(peaks[0], peaks[1]), maximum(peaks[2], peaks[3]));
    if (tail) peak = first_lanes(peak, maximum(peak, raw_partial(row, whole, tail)), tail);
    const __m256 shift = scaled(row, _mm256_set1_ps(lane_tree_max(peak)));
    const int64_t line_elements = row->bf16 ? 32 : 16;

    /* The running sum goes through memory at each call (a call clobbers every vector
     * register), but behind the exp's own latency that costs less than a second loop. */
    __m256 tail_e = _mm256_setzero_ps();
    __m256 sum = _mm256_setzero_ps();
    d = 0;
#if defined(__AVX512F__)
    /* 16 at a time; the sum still takes 8 lanes, the first 8 then the next: its order. */
    if (exp16) {
        const __m512 t = _mm512_broadcastss_ps(_mm256_castps256_ps128(row->t));
        const __m512 shift16 = _mm512_broadcastss_ps(_mm256_castps256_ps128(shift));
        for (; d + 16 <= whole; d += 16) {
            if (next && d % line_elements == 0)
                __builtin_prefetch(next + d * (row->bf16 ? 2 : 4), 0, 2);
            const __m512 e = exp16(_mm512_sub_ps(scaled16(row, d, t), shift16));
            _mm512_storeu_ps(probs + d, e);
            const __m256 low = _mm512_castps512_ps256(e);
            const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1));
            sum = _mm256_add_ps(d ? _mm256_add_ps(sum, low) : low, high);
        }
    }
#else
    (void)exp16;
#endif
    for (; d < whole; d += 8) {
        if (next && d % line_elements == 0)
            __builtin_prefetch(next + d * (row->bf16 ? 2 : 4), 0, 2);
        __m256 e = exp8(_mm256_sub_ps(scaled(row, raw8(row, d)), shift));
        _mm256_storeu_ps(probs + d, e);
        sum = d ? _mm256_add_ps(sum, e) : e;
    }
    if (tail) {
        float lanes[8];
        tail_e = exp8(_mm256_sub_ps(scaled(row, raw_partial(row, whole, tail)), shift));
        _mm256_storeu_ps(lanes, tail_e);
        memcpy(probs + whole, lanes, (size_t)tail * sizeof(float));
        sum = first_lanes(sum, _mm256_add_ps(sum, tail_e), tail);
    }
    const float inverse = 1.0f / lane_tree_sum(sum);
    const __m256 scale = _mm256_set1_ps(inverse);
    for (d = 0; d < whole; d += 8) {
        __m256 p = _mm256_mul_ps(_mm256_loadu_ps(probs + d), scale);
        _mm256_storeu_ps(probs + d, _mm256_and_ps(p, _mm256_cmp_ps(p, p, _CMP_ORD_Q)));
    }
    for (d = whole; d < n; d++) {
        float p = probs[d] * inverse;
        probs[d] = p == p ? p : 0.0f;
    }
}

/* The float32 sum of p[0:count] (count <= 256) in the order of ATen's inner sum. */
static float block_total(const float *p, int64_t count) {
    const int64_t vectors = count / 8, rounds = vectors / 4;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    for (int64_t i = 0; i < rounds; i++) {
        for (int k = 0; k < 4; k++) {
            acc[k] = _mm256_add_ps(acc[k], _mm256_loadu_ps(p + (4 * i + k) * 8));
        }
    }
    for (int64_t i = 4 * rounds; i < vectors; i++) {
        acc[0] = _mm256_add_ps(acc[0], _mm256_loadu_ps(p + i * 8));
    }
    __m256 all = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), acc[2]), acc[3]);
    float lanes[8];
    _mm256_storeu_ps(lanes, all);
    float total = 0.0f;
    for (int64_t j = vectors * 8; j < count; j++) total += p[j];
    for (int k = 0; k < 8; k++) total += lanes[k];
    return total;
}

/* One row: softmax into probs, block totals, the race's token, its mass check. */
static void race_row(const struct logit_row *x, int64_t n, const double *log_block_u,
                     const float *log_token_u, exp8_fn exp8, exp16_fn exp16, const char *next,
                     float *probs,
                     double *totals, int64_t *chosen, float *chosen_prob, double *through,
                     double *mass) {
    const int64_t blocks = (n + RACE_BLOCK - 1) / RACE_BLOCK;
    softmax_row(x, n, probs, exp8, exp16, next);
    double whole = 0.0;
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * RACE_BLOCK;
        int64_t count = n - start < RACE_BLOCK ? n - start : RACE_BLOCK;
        totals[b] = (double)block_total(probs + start, count);
        whole += totals[b];
    }
    /* The race: argmax p / E with E = -log U is the first argmin of p / log U. */
    int64_t first = 0;
    double best = totals[0] / log_block_u[0];
    for (int64_t b = 1; b < blocks; b++) {
        double key = totals[b] / log_block_u[b];
        if (key < best) best = key, first = b;
    }
    int64_t token = first * RACE_BLOCK;
    float best_token = 0.0f;
    for (int64_t j = 0; j < RACE_BLOCK; j++) {
        int64_t i = first * RACE_BLOCK + j;
        float key = (i < n ? probs[i] : 0.0f) / log_token_u[j];
        if (j == 0 || key < best_token) best_token = key, token = i;
    }
    *chosen = token;
    *chosen_prob = probs[token];
    *through = row_mass(probs, n, probs[token]);
    *mass = whole;
}

struct race_job {
    const void *logits;
    int bf16;
    const float *temperatures;
    int64_t vocab, stride, blocks;
    const double *log_block_u;
    const float *log_token_u;
    exp8_fn exp8;
    exp16_fn exp16;
    float *probs;
    double *totals;
    int64_t *chosen;
    float *chosen_prob;
    double *through, *mass;
    _Atomic int failed;
};

/* Rows [begin, end) on one thread: each row's next is known, to fetch it early. */
static void race_rows(void *ctx, int64_t begin, int64_t end) {
    struct race_job *j = ctx;
    float *scratch_probs = j->probs ? NULL : malloc((size_t)j->vocab * sizeof(float));
    double *scratch_totals = j->totals ? NULL : malloc((size_t)j->blocks * sizeof(double));
    if ((!j->probs && !scratch_probs) || (!j->totals && !scratch_totals)) {
        atomic_store(&j->failed, 1);
    } else {
        const int64_t row_bytes = j->stride * (j->bf16 ? 2 : 4);
        for (int64_t r = begin; r < end; r++) {
            const float t = j->temperatures ? j->temperatures[r] : 1.0f;
            const struct logit_row row = {(const char *)j->logits + r * row_bytes, j->bf16,
                                          t != 1.0f, _mm256_set1_ps(t)};
            race_row(&row, j->vocab, j->log_block_u + r * j->blocks,
                     j->log_token_u + r * RACE_BLOCK, j->exp8, j->exp16,
                     r + 1 < end ? (const char *)j->logits + (r + 1) * row_bytes : NULL,
                     j->probs ? j->probs + r * j->vocab : scratch_probs,
                     j->totals ? j->totals + r * j->blocks : scratch_totals, j->chosen + r,
                     j->chosen_prob + r, j->through + r, j->mass + r);
        }
    }
    free(scratch_probs);
    free(scratch_totals);
}
#endif

/* logits [rows, vocab] fp32 (or bf16: vocab_race_bf16), row stride `stride` (elements),
 * vocab >= 8; temperatures [rows] (> 0) or NULL: each row's logits divided by its own
 * first, as torch's div_ would (fp32 division, after widening bf16); log_block_u
 * [rows, blocks] and log_token_u [rows, 256], contiguous: the logs of the race's uniforms;
 * exp8: Sleef_expf8_u10, exp16: Sleef_expf16_u10 or NULL (taken where the build has
 * AVX-512).
 * Out: chosen, chosen_prob (its probability), through (mass of the tokens at least as
 * probable as it) and mass (the row's total) [rows]; probs [rows, vocab] and totals
 * [rows, blocks], contiguous, where not NULL (else scratch rows).
 * Returns 0; 1: no memory for the scratch rows; 2: built without AVX2 (no kernel). */
static int vocab_race(int bf16, const void *logits, int64_t rows, int64_t vocab, int64_t stride,
                      const float *temperatures, const double *log_block_u,
                      const float *log_token_u, const void *exp8, const void *exp16,
                      float *probs, double *totals, int64_t *chosen, float *chosen_prob,
                      double *through, double *mass, int threads) {
#if defined(__AVX2__)
    struct race_job job = {.logits = logits,
                           .bf16 = bf16,
                           .temperatures = temperatures,
                           .vocab = vocab,
                           .stride = stride,
                           .blocks = (vocab + RACE_BLOCK - 1) / RACE_BLOCK,
                           .log_block_u = log_block_u,
                           .log_token_u = log_token_u,
                           .exp8 = (exp8_fn)exp8,
                           .exp16 = (exp16_fn)exp16,
                           .probs = probs,
                           .totals = totals,
                           .chosen = chosen,
                           .chosen_prob = chosen_prob,
                           .through = through,
                           .mass = mass,
                           .failed = 0};
    flashserve_run_ranges(race_rows, &job, rows, (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return atomic_load(&job.failed);
#else
    (void)bf16, (void)temperatures;
    (void)logits, (void)rows, (void)vocab, (void)stride, (void)log_block_u;
    (void)log_token_u, (void)exp8, (void)exp16, (void)probs, (void)totals, (void)chosen;
    (void)chosen_prob;
    (void)through, (void)mass, (void)threads;
    return 2;
#endif
}

int vocab_race_f32(const float *logits, int64_t rows, int64_t vocab, int64_t stride,
                   const float *temperatures, const double *log_block_u,
                   const float *log_token_u, const void *exp8, const void *exp16, float *probs,
                   double *totals, int64_t *chosen, float *chosen_prob, double *through,
                   double *mass, int threads) {
    return vocab_race(0, logits, rows, vocab, stride, temperatures, log_block_u, log_token_u,
                      exp8, exp16, probs, totals, chosen, chosen_prob, through, mass, threads);
}

int vocab_race_bf16(const uint16_t *logits, int64_t rows, int64_t vocab, int64_t stride,
                    const float *temperatures, const double *log_block_u,
                    const float *log_token_u, const void *exp8, const void *exp16, float *probs,
                    double *totals, int64_t *chosen, float *chosen_prob, double *through,
                    double *mass, int threads) {
    return vocab_race(1, logits, rows, vocab, stride, temperatures, log_block_u, log_token_u,
                      exp8, exp16, probs, totals, chosen, chosen_prob, through, mass, threads);
}
