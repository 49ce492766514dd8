/* One linear product, y [rows, features] = x [rows, k] . w [features, k]^T (+ bias), as
 * the linear kernels (skinny_gemm.c, packed_gemm.c) hand it to the thread pool's ranges
 * (native.LINEAR_KERNEL_ARGS: the same arguments from Python). */
#ifndef FLASHSERVE_LINEAR_JOB_H
#define FLASHSERVE_LINEAR_JOB_H

#include <stdatomic.h>
#include <stdint.h>

struct linear_job {
    const float *x, *w, *bias;
    int64_t ldx, rows, features, k, ldy;
    float *y;
    _Atomic int failed; /* a range could not allocate its scratch memory */
};

#endif
