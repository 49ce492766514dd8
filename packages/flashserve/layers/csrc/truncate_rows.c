/* The sampler's truncation of a few rows of probabilities, in place: min-p, top-k
 * and the nucleus (top-p), as engine/truncation.py's _truncate_probs decides them.
 *
 * A probability's bit pattern is an integer key in the same order (non-negative
 * floats, below 2.0: keys below 2**30). Per row, a radix select finds a cut-off key
 * and how many tokens equal to it stay (the first in vocabulary order): a histogram
 * of every key's top 12 bits picks the bin where the running count (top-k) or
 * running mass (nucleus) reaches its target, then two histograms of 9 bits over the
 * keys gathered from that bin narrow it to one key. Masses are float64 sums in a
 * fixed order (each bin's keys in vocabulary order, bins best first), so a row's
 * result depends only on the row. Built at first use by layers/native.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "thread_pool.h"

#define FIRST_BITS 12
#define LATER_BITS 9
#define MOST_BINS (1 << FIRST_BITS)

struct crossing {
    int32_t value;   /* the key where the running total first reaches the target */
    double above;    /* total weight of the keys above it */
    double at_value; /* total weight of the keys equal to it */
    double mass_above; /* probability mass of the keys above it (whatever the weights) */
};

static inline float key_as_float(int32_t key) {
    float f;
    memcpy(&f, &key, sizeof f);
    return f;
}

/* Histogram keys[0..n) by (key >> shift) & mask: mass a bin, and tokens a bin where
 * `with_counts` (top-k's select; the nucleus needs only the masses). */
static void fill(const int32_t *keys, int64_t n, int shift, int bits, int with_counts,
                 double *counts, double *masses) {
    const int32_t mask = (1 << bits) - 1;
    memset(counts, 0, sizeof(double) << bits);
    memset(masses, 0, sizeof(double) << bits);
    if (with_counts) {
        for (int64_t i = 0; i < n; i++) {
            int digit = (keys[i] >> shift) & mask;
            counts[digit] += 1.0;
            masses[digit] += (double)key_as_float(keys[i]);
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            masses[(keys[i] >> shift) & mask] += (double)key_as_float(keys[i]);
    }
}

/* The keys whose bits from `shift` up equal `prefix`, in vocabulary order, into
 * `gathered`; returns how many. They are few (one bin of 4096): compare 8 at a time. */
static int64_t gather(const int32_t *keys, int64_t n, int shift, int32_t prefix,
                      int32_t *gathered) {
    int64_t found = 0, i = 0;
#if defined(__AVX2__)
    const __m256i wanted = _mm256_set1_epi32(prefix);
    for (; i + 8 <= n; i += 8) {
        __m256i eight = _mm256_loadu_si256((const __m256i *)(keys + i));
        __m256i same = _mm256_cmpeq_epi32(_mm256_srli_epi32(eight, shift), wanted);
        unsigned lanes = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(same));
        while (lanes) {
            gathered[found++] = keys[i + __builtin_ctz(lanes)];
            lanes &= lanes - 1;
        }
    }
#endif
    for (; i < n; i++)
        if ((keys[i] >> shift) == prefix) gathered[found++] = keys[i];
    return found;
}

/* Find the bin, best first, where the running weight (the bins' counts or masses,
 * after *above) first reaches `target`; where it never does (rounding), the last bin
 * with weight. Returns its digit (-1: no weight at all) and adds to *above and
 * *mass_above the totals of the bins before it. */
static int walk(const double *counts, const double *masses, int bits, int by_count,
                double target, double *above, double *mass_above) {
    const double *weights = by_count ? counts : masses;
    double running = *above, mass = *mass_above;
    int last = -1;
    for (int digit = (1 << bits) - 1; digit >= 0; digit--) {
        if (weights[digit] <= 0.0) continue;
        last = digit;
        if (running + weights[digit] >= target) {
            *above = running;
            *mass_above = mass;
            return digit;
        }
        running += weights[digit];
        mass += masses[digit];
    }
    if (last < 0) return -1;
    *above = running - weights[last];
    *mass_above = mass - masses[last];
    return last;
}

/* The row's cut-off where the running weight (1 a token, or its probability) of the
 * keys in descending order reaches `target`. `first_counts` / `first_masses`: the
 * row's histogram of its keys' top FIRST_BITS bits; `gathered`: scratch of `vocab`
 * keys. Returns 0 when no key has weight (a row with every probability zero). */
static int select_key(const int32_t *keys, int64_t vocab, const double *first_counts,
                      const double *first_masses, int by_count, double target,
                      int32_t *gathered, double *counts, double *masses, struct crossing *out) {
    double above = 0.0, mass_above = 0.0;
    int shift = 30 - FIRST_BITS;
    int digit =
        walk(first_counts, first_masses, FIRST_BITS, by_count, target, &above, &mass_above);
    if (digit < 0) return 0;
    int32_t prefix = digit;
    int64_t n = gather(keys, vocab, shift, prefix, gathered);
    while (shift > 0) {
        shift -= LATER_BITS;
        fill(gathered, n, shift, LATER_BITS, by_count, counts, masses);
        digit = walk(counts, masses, LATER_BITS, by_count, target, &above, &mass_above);
        prefix = (prefix << LATER_BITS) | digit;
        if (shift > 0) { /* keep only the keys in the chosen bin */
            int64_t kept = 0;
            for (int64_t i = 0; i < n; i++)
                if ((gathered[i] >> shift) == prefix) gathered[kept++] = gathered[i];
            n = kept;
        }
    }
    out->value = prefix;
    out->above = above;
    out->at_value = by_count ? counts[digit] : masses[digit];
    out->mass_above = mass_above;
    return 1;
}

struct truncate_job {
    float *probs;
    int64_t vocab, stride;
    const float *min_p;
    const int64_t *top_k;
    const double *top_p;
    int status;
};

static void truncate_row(const struct truncate_job *j, float *p, int64_t row, int32_t *gathered,
                         double *scratch) {
    double *first_counts = scratch, *first_masses = scratch + MOST_BINS;
    double *counts = scratch + 2 * MOST_BINS, *masses = counts + (1 << LATER_BITS);
    const int64_t vocab = j->vocab;
    int32_t *keys = (int32_t *)p;
    if (j->min_p[row] > 0.0f) { /* p >= min_p * p_max stays */
        float top = 0.0f;
        for (int64_t i = 0; i < vocab; i++) top = p[i] > top ? p[i] : top;
        const float floor_value = top * j->min_p[row];
        int32_t floor_key;
        memcpy(&floor_key, &floor_value, sizeof floor_key);
        for (int64_t i = 0; i < vocab; i++) keys[i] *= keys[i] >= floor_key;
    }
    const int64_t k = j->top_k[row];
    const double top_p = j->top_p[row];
    const int has_k = k > 0 && k < vocab;
    const int nucleus = top_p < 1.0;
    if (!has_k && !nucleus) return;
    /* The first level's histogram serves both selects, and the row's mass. */
    fill(keys, vocab, 30 - FIRST_BITS, FIRST_BITS, has_k, first_counts, first_masses);
    int32_t cut = 0;      /* keep every key > cut ... */
    double ties = vocab;  /* ... and this many = cut */
    double mass = 0.0;
    struct crossing found;
    if (has_k) {
        select_key(keys, vocab, first_counts, first_masses, 1, (double)k, gathered, counts,
                   masses, &found);
        cut = found.value;
        ties = (double)k - found.above;
        mass = found.mass_above + ties * (double)key_as_float(cut);
    } else {
        for (int digit = MOST_BINS - 1; digit >= 0; digit--) mass += first_masses[digit];
    }
    if (nucleus) {
        double target = top_p * mass;
        if (target < DBL_MIN) target = DBL_MIN;
        if (select_key(keys, vocab, first_counts, first_masses, 0, target, gathered, counts,
                       masses, &found)) {
            const double each = (double)key_as_float(found.value);
            double count = ceil((target - found.above) / each);
            if (count < 1.0) count = 1.0;
            /* Rounding aside the nucleus ends within top-k; never let it reach past it. */
            if (found.value > cut || (found.value == cut && count < ties)) {
                cut = found.value;
                ties = count;
            }
        } else {
            return; /* every probability is zero already */
        }
    }
    int64_t equal = 0;
    for (int64_t i = 0; i < vocab; i++) {
        int32_t key = keys[i];
        if (key < cut) {
            keys[i] = 0;
        } else if (key == cut && cut > 0) {
            equal++;
            if ((double)equal > ties) keys[i] = 0; /* only the first `ties` equal stay */
        }
    }
}

static void truncate_range(void *job, int64_t begin, int64_t end) {
    struct truncate_job *j = job;
    int32_t *gathered = malloc(sizeof(int32_t) * j->vocab);
    double *scratch = malloc(sizeof(double) * (2 * MOST_BINS + 2 * (1 << LATER_BITS)));
    if (!gathered || !scratch) {
        j->status = 1; /* read after the join; the rows are left for the caller to redo */
    } else {
        for (int64_t r = begin; r < end; r++)
            truncate_row(j, j->probs + r * j->stride, r, gathered, scratch);
    }
    free(gathered);
    free(scratch);
}

/* probs float32 [rows, vocab] (row stride `stride`), non-negative, NaN-free: zeroed in
 * place where min-p (min_p float32 [rows], 0: none), top-k (top_k int64 [rows], 0 or
 * >= vocab: none) and the nucleus (top_p float64 [rows], >= 1: none) drop a token.
 * Returns 0, or 1 where scratch memory ran out (rows then unspecified). */
int truncate_rows_f32(float *probs, int64_t rows, int64_t vocab, int64_t stride,
                      const float *min_p, const int64_t *top_k, const double *top_p,
                      int threads) {
    struct truncate_job job = {probs, vocab, stride, min_p, top_k, top_p, 0};
    flashserve_run_ranges(truncate_range, &job, rows, rows, threads);
    return job.status;
}
