/* Per row of probabilities, the mass of the tokens at least as probable as a
 * given floor (the sampler's check that a drawn token lies inside the nucleus).
 *
 * One pass over the row (nucleus_mass.h). The order depends only on the row, so
 * a row's result is the same alone or in any batch, with any number of threads.
 * Built at first use by layers/native.py.
 */
#include <stdint.h>

#include "nucleus_mass.h"
#include "thread_pool.h"

struct mass_job {
    const float *probs, *floors;
    int64_t vocab, stride;
    double *mass;
};

static void mass_rows(void *job, int64_t begin, int64_t end) {
    const struct mass_job *j = job;
    for (int64_t r = begin; r < end; r++)
        j->mass[r] = row_mass(j->probs + r * j->stride, j->vocab, j->floors[r]);
}

/* probs [rows, vocab] (row stride `stride`), floors [rows] -> mass [rows] (float64). */
int mass_at_least_f32(const float *probs, int64_t rows, int64_t vocab, int64_t stride,
                      const float *floors, double *mass, int threads) {
    struct mass_job job = {probs, floors, vocab, stride, mass};
    flashserve_run_ranges(mass_rows, &job, rows, (int64_t)threads * CHUNKS_PER_THREAD, threads);
    return 0;
}
