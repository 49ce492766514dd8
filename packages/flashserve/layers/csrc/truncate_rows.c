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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* One level: histogram keys[0..n) by (key >> shift) & mask; find the bin, best first,
 * where `running` (start + the bins' weights) first reaches `target`; where it never
 * does (rounding), the last bin with weight. Returns the digit (-1: no weight at all)
 * and adds to *above / *mass_above the totals of the bins before it. */
static int level(const int32_t *keys, int64_t n, int shift, int bits, int by_count,
                 double target, double *above, double *mass_above, double *counts,
                 double *masses) {
    const int bins = 1 << bits;
    const int32_t mask = bins - 1;
    memset(counts, 0, sizeof(double) * bins);
    memset(masses, 0, sizeof(double) * bins);
    for (int64_t i = 0; i < n; i++) {
        int digit = (keys[i] >> shift) & mask;
        counts[digit] += 1.0;
        masses[digit] += (double)key_as_float(keys[i]);
    }
    const double *weights = by_count ? counts : masses;
    double running = *above, mass = *mass_above;
    int last = -1;
    for (int digit = mask; digit >= 0; digit--) {
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
    /* never reached: the last bin with weight, the totals before it */
    *above = running - weights[last];
    *mass_above = mass - masses[last];
    return last;
}

/* The row's cut-off where the running weight (1 a token, or its probability) of the
 * keys in descending order reaches `target`. `gathered`: scratch of `vocab` keys.
 * Returns 0 when no key has weight (a row with every probability zero, by mass). */
static int select_key(const int32_t *keys, int64_t vocab, int by_count, double target,
                      int32_t *gathered, double *counts, double *masses,
                      struct crossing *out) {
    double above = 0.0, mass_above = 0.0;
    int shift = 30 - FIRST_BITS;
    int digit = level(keys, vocab, shift, FIRST_BITS, by_count, target, &above, &mass_above,
                      counts, masses);
    if (digit < 0) return 0;
    int32_t prefix = digit;
    int64_t n = 0;
    for (int64_t i = 0; i < vocab; i++)
        if ((keys[i] >> shift) == prefix) gathered[n++] = keys[i];
    while (shift > 0) {
        shift -= LATER_BITS;
        digit = level(gathered, n, shift, LATER_BITS, by_count, target, &above, &mass_above,
                      counts, masses);
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
                         double *counts, double *masses) {
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
    int32_t cut = 0;      /* keep every key > cut ... */
    double ties = vocab;  /* ... and this many = cut */
    double mass = 0.0;
    struct crossing found;
    if (has_k) {
        select_key(keys, vocab, 1, (double)k, gathered, counts, masses, &found);
        cut = found.value;
        ties = (double)k - found.above;
        mass = found.mass_above + ties * (double)key_as_float(cut);
    } else {
        double block = 0.0; /* the whole row, in the order the histogram would add it */
        for (int64_t i = 0; i < vocab; i++) block += (double)p[i];
        mass = block;
    }
    if (nucleus) {
        double target = top_p * mass;
        if (target < 2.2250738585072014e-308) target = 2.2250738585072014e-308;
        if (select_key(keys, vocab, 0, target, gathered, counts, masses, &found)) {
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
    double *counts = malloc(sizeof(double) * MOST_BINS);
    double *masses = malloc(sizeof(double) * MOST_BINS);
    if (!gathered || !counts || !masses) {
        j->status = 1; /* read after the join; the rows are left for the caller to redo */
    } else {
        for (int64_t r = begin; r < end; r++)
            truncate_row(j, j->probs + r * j->stride, r, gathered, counts, masses);
    }
    free(gathered);
    free(counts);
    free(masses);
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
