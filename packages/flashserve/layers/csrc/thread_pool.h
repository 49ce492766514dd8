/* The CPU kernels' parallel loop (csrc/thread_pool.c, loaded once for every kernel).
 *
 * flashserve_run_chunks(fn, ctx, chunks, threads) calls fn(ctx, c) once for every c in
 * [0, chunks), on the calling thread and up to threads - 1 others, and returns when all
 * have run: as an OpenMP region, or, after a region's thread started late (the OS had
 * parked it: another process on its core), for a while on the pool's own workers, where
 * the caller takes every chunk no worker took and never waits for one that has not
 * started. Chunks must be independent; which thread runs one must not change its
 * result. */
#ifndef FLASHSERVE_THREAD_POOL_H
#define FLASHSERVE_THREAD_POOL_H

#include <stdint.h>

typedef void (*chunk_fn)(void *ctx, int64_t chunk);

void flashserve_run_chunks(chunk_fn fn, void *ctx, int64_t chunks, int threads);

/* The common case: items [0, items) in contiguous ranges as even as they divide,
 * fn(ctx, begin, end) for each: as many ranges as threads in an OpenMP region (each
 * thread one, as a static schedule would), `chunks` for the pool's workers (more, smaller
 * ranges leave less for the caller to wait on when a worker is parked). */
typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

void flashserve_run_ranges(range_fn fn, void *ctx, int64_t items, int64_t chunks, int threads);

/* Chunks per thread where the work splits freely: enough that a worker the OS parks
 * for a while leaves little for the caller to wait on at the end. */
#define CHUNKS_PER_THREAD 8

#endif
