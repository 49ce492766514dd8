/* Decode attention over the paged KV cache, read where it lies (CPU).
 *
 * One query token per row. Each (row, KV head) is one task: the G query heads
 * that share the KV head read each key and value row of the sequence's blocks
 * once, straight from the cache ([blocks, block_size, kv_heads, head_dim]),
 * with no gathered copy. Scores go to a per-thread buffer, then an exact
 * softmax (max first), then the weighted sum of the values, all in fp32.
 *
 * A task's arithmetic depends only on its own row (fixed lane order, no
 * dependence on the batch, the thread count or the memory alignment), so a
 * request's output is the same bits alone or in any batch.
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

#define LANES 8
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t vu __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(LANES * sizeof(uint16_t))));

static inline vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof(h));
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof(v));
    return v;
}

static inline float lane_sum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

static inline void store_f32(float *p, vf v) { memcpy(p, &v, sizeof(v)); }

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

/* Tokens ahead whose key (value) rows are fetched into cache while this one is
 * scored (summed): a row is a few hundred bytes to a few KiB, so this reaches into the
 * next 4 KiB page, where the hardware prefetcher stops, and across block boundaries
 * (the next block is anywhere in the cache). */
#define PREFETCH_TOKENS 4

/* The cache lines of token t's rows for the task's heads, t < ctx. */
static inline void prefetch_token(const char *cache, const int32_t *table, int64_t t,
                                  int64_t block_size, int64_t block_stride, int64_t offset,
                                  int64_t bytes, int64_t size) {
    const char *at = cache + ((int64_t)table[t / block_size] * block_stride +
                              (t % block_size) * (block_stride / block_size) + offset) *
                                 size;
    for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(at + line);
}

/* One task: KV heads [h0, h1) of one row. bf16 is a compile-time constant in
 * each caller, so the compiler specialises the loads and stores. Blocks are
 * walked in order and, within a token, the task's heads side by side (they
 * are contiguous in the cache); each key or value row is converted to fp32
 * once, for all G query heads of its group. Query head q of the task is
 * (h - h0) * group + g; scores hold one context-long row per query head. */
static inline void attend(int bf16, const void *q, const void *k_cache, const void *v_cache,
                          const int32_t *table, int64_t ctx, void *out, int64_t h0, int64_t h1,
                          int64_t group, int64_t chunks, int64_t head_dim, int64_t block_size,
                          int64_t token_stride, float scale, float *scores, vf *qv, vf *row,
                          vf *acc) {
#define AT(base, index) \
    (bf16 ? (const void *)((const uint16_t *)(base) + (index)) \
          : (const void *)((const float *)(base) + (index)))
#define LOAD(ptr) (bf16 ? load_bf16((const uint16_t *)(ptr)) : load_f32((const float *)(ptr)))
    const int64_t block_stride = block_size * token_stride, heads = (h1 - h0) * group;
    const int64_t size = bf16 ? 2 : 4, row_bytes = (h1 - h0) * head_dim * size;
    for (int64_t i = 0; i < heads; i++)
        for (int64_t c = 0; c < chunks; c++)
            qv[i * chunks + c] = LOAD(AT(q, (h0 * group + i) * head_dim + c * LANES)) * scale;
    for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += block_size, b++) {
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        for (int64_t j = 0; j < n; j++) {
            const int64_t token = (int64_t)table[b] * block_stride + j * token_stride;
            if (t0 + j + PREFETCH_TOKENS < ctx)
                prefetch_token(k_cache, table, t0 + j + PREFETCH_TOKENS, block_size, block_stride,
                               h0 * head_dim, row_bytes, size);
            for (int64_t h = h0; h < h1; h++) {
                for (int64_t c = 0; c < chunks; c++)
                    row[c] = LOAD(AT(k_cache, token + h * head_dim + c * LANES));
                for (int64_t i = (h - h0) * group; i < (h - h0 + 1) * group; i++) {
                    vf dot = {0};
                    for (int64_t c = 0; c < chunks; c++) dot += qv[i * chunks + c] * row[c];
                    scores[i * ctx + t0 + j] = lane_sum(dot);
                }
            }
        }
    }
    for (int64_t i = 0; i < heads; i++) {
        float *s = scores + i * ctx, best = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < ctx; t++) best = s[t] > best ? s[t] : best;
        for (int64_t t = 0; t < ctx; t++) {
            s[t] = expf(s[t] - best);
            total += s[t];
        }
        for (int64_t t = 0; t < ctx; t++) s[t] /= total; /* ctx 0: nothing to divide */
    }
    memset(acc, 0, sizeof(vf) * (size_t)(heads * chunks));
    for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += block_size, b++) {
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        for (int64_t j = 0; j < n; j++) {
            const int64_t token = (int64_t)table[b] * block_stride + j * token_stride;
            if (t0 + j + PREFETCH_TOKENS < ctx)
                prefetch_token(v_cache, table, t0 + j + PREFETCH_TOKENS, block_size, block_stride,
                               h0 * head_dim, row_bytes, size);
            for (int64_t h = h0; h < h1; h++) {
                for (int64_t c = 0; c < chunks; c++)
                    row[c] = LOAD(AT(v_cache, token + h * head_dim + c * LANES));
                for (int64_t i = (h - h0) * group; i < (h - h0 + 1) * group; i++) {
                    const float p = scores[i * ctx + t0 + j];
                    for (int64_t c = 0; c < chunks; c++) acc[i * chunks + c] += p * row[c];
                }
            }
        }
    }
    for (int64_t i = 0; i < heads; i++)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t at = (h0 * group + i) * head_dim + c * LANES;
            if (bf16)
                store_bf16((uint16_t *)out + at, acc[i * chunks + c]);
            else
                store_f32((float *)out + at, acc[i * chunks + c]);
        }
#undef LOAD
#undef AT
}

/* q, out: [rows, q_heads, head_dim] with the given row strides (elements);
 * head_dim contiguous, heads head_dim apart. Caches contiguous. tables: int32
 * [rows, table_stride]. A task is a whole row when there are enough rows to
 * keep every thread busy, else one KV head of a row (a single sequence still
 * spreads over the threads). Which split runs changes no bits: each query
 * head's arithmetic is the same either way. Returns nonzero when scratch
 * memory ran out. */
struct decode_job {
    int bf16;
    const void *q, *k_cache, *v_cache;
    const int32_t *tables, *context_lens;
    int64_t q_row_stride, table_stride, out_row_stride, kv_heads, head_dim, block_size;
    int64_t max_context, group, chunks, span, parts;
    float scale;
    void *out;
    _Atomic int failed;
};

/* Tasks [begin, end): task t is KV heads span * (t % parts) .. + span of row t / parts. */
static inline void decode_tasks(const struct decode_job *j, int bf16, int64_t begin,
                                int64_t end) {
    const int64_t size = bf16 ? 2 : 4;
    float *scores = malloc(sizeof(float) * (size_t)(j->max_context * j->span * j->group));
    vf *qv = vectors((size_t)(j->span * j->group * j->chunks));
    vf *acc = vectors((size_t)(j->span * j->group * j->chunks));
    vf *row = vectors((size_t)j->chunks);
    if (!scores || !qv || !acc || !row) {
        atomic_store(&((struct decode_job *)j)->failed, 1);
    } else {
        for (int64_t task = begin; task < end; task++) {
            const int64_t r = task / j->parts, h0 = (task % j->parts) * j->span;
            const int64_t ctx = j->context_lens[r] < j->max_context ? j->context_lens[r]
                                                                    : j->max_context;
            attend(bf16, (const char *)j->q + r * j->q_row_stride * size, j->k_cache,
                   j->v_cache, j->tables + r * j->table_stride, ctx,
                   (char *)j->out + r * j->out_row_stride * size, h0, h0 + j->span, j->group,
                   j->chunks, j->head_dim, j->block_size, j->kv_heads * j->head_dim, j->scale,
                   scores, qv, row, acc);
        }
    }
    free(scores);
    free(qv);
    free(acc);
    free(row);
}

/* bf16 a constant in each: the compiler specialises the loads and stores. */
static void decode_tasks_f32(void *job, int64_t begin, int64_t end) {
    decode_tasks(job, 0, begin, end);
}

static void decode_tasks_bf16(void *job, int64_t begin, int64_t end) {
    decode_tasks(job, 1, begin, end);
}

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
    const int64_t span = rows >= 4 * (int64_t)threads ? kv_heads : 1; /* KV heads per task */
    struct decode_job job = {
        .bf16 = bf16, .q = q, .k_cache = k_cache, .v_cache = v_cache, .tables = tables,
        .context_lens = context_lens, .q_row_stride = q_row_stride,
        .table_stride = table_stride, .out_row_stride = out_row_stride, .kv_heads = kv_heads,
        .head_dim = head_dim, .block_size = block_size, .max_context = max_context,
        .group = q_heads / kv_heads, .chunks = head_dim / LANES, .span = span,
        .parts = kv_heads / span, .scale = scale, .out = out, .failed = 0};
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
