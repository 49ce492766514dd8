/* Per row of probabilities, the mass of the tokens at least as probable as a
 * given floor (the sampler's check that a drawn token lies inside the nucleus).
 *
 * One pass over the row (nucleus_mass.h). The order depends only on the row, so
 * a row's result is the same alone or in any batch, with any number of threads.
 * Built at first use by layers/native.py.
 */
#include <stdint.h>

#include "nucleus_mass.h"

/* probs [rows, vocab] (row stride `stride`), floors [rows] -> mass [rows] (float64). */
int mass_at_least_f32(const float *probs, int64_t rows, int64_t vocab, int64_t stride,
                      const float *floors, double *mass, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        mass[r] = row_mass(probs + r * stride, vocab, floors[r]);
    }
    return 0;
}
