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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* q, out: [rows, q_heads, head_dim] with the given row strides (elements);
 * head_dim contiguous, heads head_dim apart. Caches contiguous. tables: int32
 * [rows, table_stride]. Scratch per thread: max_context * group + group * head_dim floats. */
#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                       \
    int NAME(const T *q, int64_t q_row_stride, const T *k_cache, const T *v_cache,                \
             const int32_t *tables, int64_t table_stride, const int32_t *context_lens,            \
             T *out, int64_t out_row_stride, int64_t rows, int64_t q_heads, int64_t kv_heads,     \
             int64_t head_dim, int64_t block_size, float scale, int64_t max_context,              \
             int threads) {                                                                        \
        const int64_t group = q_heads / kv_heads, chunks = head_dim / LANES;                      \
        const int64_t token_stride = kv_heads * head_dim, block_stride = block_size * token_stride; \
        int failed = 0;                                                                            \
        _Pragma("omp parallel num_threads(threads)") {                                            \
            float *scores = malloc(sizeof(float) * (size_t)(max_context * group));                \
            vf *qv = vectors((size_t)(group * chunks));                                           \
            vf *acc = vectors((size_t)(group * chunks));                                          \
            if (!scores || !qv || !acc) {                                                          \
                _Pragma("omp atomic write") failed = 1;                                            \
            } else {                                                                               \
                _Pragma("omp for schedule(static)") for (int64_t task = 0; task < rows * kv_heads; \
                                                         task++) {                                 \
                    const int64_t row = task / kv_heads, h = task % kv_heads;                     \
                    const int64_t ctx = context_lens[row] < max_context ? context_lens[row]        \
                                                                        : max_context;             \
                    const int32_t *table = tables + row * table_stride;                            \
                    for (int64_t g = 0; g < group; g++) {                                          \
                        const T *qh = q + row * q_row_stride + (h * group + g) * head_dim;         \
                        for (int64_t c = 0; c < chunks; c++)                                       \
                            qv[g * chunks + c] = LOAD(qh + c * LANES) * scale;                     \
                    }                                                                              \
                    for (int64_t t = 0; t < ctx; t++) {                                            \
                        const T *key = k_cache + table[t / block_size] * block_stride +            \
                                       (t % block_size) * token_stride + h * head_dim;             \
                        for (int64_t g = 0; g < group; g++) {                                      \
                            vf dot = {0};                                                          \
                            for (int64_t c = 0; c < chunks; c++)                                   \
                                dot += qv[g * chunks + c] * LOAD(key + c * LANES);                 \
                            scores[g * ctx + t] = lane_sum(dot);                                   \
                        }                                                                          \
                    }                                                                              \
                    for (int64_t g = 0; g < group; g++) {                                          \
                        float *s = scores + g * ctx, best = -INFINITY, total = 0.0f;              \
                        for (int64_t t = 0; t < ctx; t++) best = s[t] > best ? s[t] : best;       \
                        for (int64_t t = 0; t < ctx; t++) {                                        \
                            s[t] = expf(s[t] - best);                                              \
                            total += s[t];                                                         \
                        }                                                                          \
                        for (int64_t t = 0; t < ctx; t++) s[t] /= total; /* ctx 0: nothing */     \
                    }                                                                              \
                    memset(acc, 0, sizeof(vf) * (size_t)(group * chunks));                         \
                    for (int64_t t = 0; t < ctx; t++) {                                            \
                        const T *value = v_cache + table[t / block_size] * block_stride +          \
                                         (t % block_size) * token_stride + h * head_dim;           \
                        for (int64_t c = 0; c < chunks; c++) {                                     \
                            const vf v = LOAD(value + c * LANES);                                  \
                            for (int64_t g = 0; g < group; g++)                                    \
                                acc[g * chunks + c] += scores[g * ctx + t] * v;                    \
                        }                                                                          \
                    }                                                                              \
                    for (int64_t g = 0; g < group; g++) {                                          \
                        T *o = out + row * out_row_stride + (h * group + g) * head_dim;            \
                        for (int64_t c = 0; c < chunks; c++) STORE(o + c * LANES, acc[g * chunks + c]); \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            free(scores);                                                                          \
            free(qv);                                                                              \
            free(acc);                                                                             \
        }                                                                                          \
        return failed;                                                                             \
    }

static inline void store_f32(float *p, vf v) { memcpy(p, &v, sizeof(v)); }

static inline void store_bf16(uint16_t *p, vf v) {
    for (int i = 0; i < LANES; i++) p[i] = f32_to_bf16(v[i]);
}

DEFINE_KERNEL(paged_decode_f32, float, load_f32, store_f32)
DEFINE_KERNEL(paged_decode_bf16, uint16_t, load_bf16, store_bf16)
