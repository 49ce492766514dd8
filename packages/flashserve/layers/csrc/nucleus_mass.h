/* A row's mass at or above a floor (the sampler's check that a drawn token lies
 * inside the nucleus), shared by mass_at_least.c and vocab_race.c so that both
 * give the same bits. Blocks of 256 tokens are summed in 8 float32 lanes, lanes
 * by one fixed tree, blocks in float64: the order depends only on the row. */
#ifndef FLASHSERVE_NUCLEUS_MASS_H
#define FLASHSERVE_NUCLEUS_MASS_H

#include <stdint.h>

#include "vector_ops.h"

#define NUCLEUS_MASS_BLOCK 256

static inline double row_mass(const float *p, int64_t vocab, float floor) {
    const vf floors = broadcast(floor);
    const vf zero = (vf){0};
    double total = 0.0;
    for (int64_t start = 0; start < vocab; start += NUCLEUS_MASS_BLOCK) {
        int64_t end = start + NUCLEUS_MASS_BLOCK < vocab ? start + NUCLEUS_MASS_BLOCK : vocab;
        vf acc = zero;
        int64_t j = start;
        for (; j + LANES <= end; j += LANES) {
            vf v = load_f32(p + j);
            acc += (vf)((vi)v & (vi)(v >= floors));
        }
        float block = lane_sums4(acc, zero, zero, zero)[0];
        for (; j < end; j++) {
            if (p[j] >= floor) block += p[j];
        }
        total += block;
    }
    return total;
}

#endif
