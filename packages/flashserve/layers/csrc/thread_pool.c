/* The CPU kernels' parallel loop: see thread_pool.h.
 *
 * Two ways to run a job. Normally an OpenMP region over the chunks, on the threads torch
 * uses for its own ops (one set of threads: with a second, each set's idle spinning
 * takes cores from the other). But an OpenMP region ends when every one of its threads
 * has arrived, and a thread the OS has parked (another process wanted its core) arrives
 * only when it runs again, milliseconds later, at every region. So when a region's
 * thread starts late, jobs go to this pool's own workers for a while instead: the
 * calling thread takes every chunk no worker took, and waits only for chunks taken.
 *
 * The pool runs one job at a time (a second caller, or a chunk that itself runs chunks,
 * runs its job alone). A job is published as a generation number in the high half of
 * `claim`; the low half is the next chunk to take. A thread takes chunk i of generation
 * g by a compare-and-swap from (g, i) to (g, i + 1), so a worker that wakes late, after
 * the caller finished g and published g + 1, cannot take a chunk of the wrong job; the
 * job's fields, written before its generation is published, are read only after a
 * successful take, and cannot change before that chunk is done.
 *
 * Idle workers spin for a while (a decode step calls kernels tens of microseconds
 * apart), yielding the core to anything else runnable, then sleep on a futex. Built and
 * loaded (RTLD_GLOBAL, before any kernel) by layers/native.py. */
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "thread_pool.h"

#define MAX_WORKERS 255
/* How long an idle worker keeps looking for the next job before it sleeps. */
#define SPIN_NS 300000L
/* How long the caller waits for a taken chunk before it lets others have its core. */
#define CALLER_SPIN_NS 50000L
/* An OpenMP thread starting this long after its region did was parked, not waking up. */
#define LATE_START_NS 1000000L
/* After a late start, jobs go to the pool this long before OpenMP is tried again. */
#define POOL_PERIOD_NS 2000000000L

static struct {
    _Atomic uint64_t claim; /* generation << 32 | next chunk */
    _Atomic int64_t done;   /* chunks of the current job finished */
    chunk_fn fn;
    void *ctx;
    _Atomic int64_t chunks;
    _Atomic int threads; /* workers 1 .. threads - 1 join the current job */
    _Atomic uint32_t wake; /* futex word: bumped to wake sleeping workers */
    _Atomic int sleepers;
    int started;        /* workers created (indices 1 .. started) */
    uint32_t generation; /* of the last job published (the caller's lock held) */
    pthread_mutex_t caller; /* held by the thread whose job the pool runs */
    int mode;           /* ADAPTIVE, or always one of the two (benchmarks' A/B) */
    int64_t pool_until; /* ADAPTIVE: jobs go to the pool until then (now_ns) */
    int late_starts;    /* OpenMP regions that had a thread start late, since the load */
} pool = {.caller = PTHREAD_MUTEX_INITIALIZER};

enum { ADAPTIVE = 0, ALWAYS_OPENMP = 1, ALWAYS_POOL = 2 };

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
}

/* Take and run chunks of generation `gen` until none is left. */
static void take_chunks(uint32_t gen) {
    for (;;) {
        uint64_t seen = atomic_load(&pool.claim);
        int64_t next = (int64_t)(seen & 0xffffffffu);
        if ((uint32_t)(seen >> 32) != gen || next >= atomic_load(&pool.chunks)) return;
        if (!atomic_compare_exchange_weak(&pool.claim, &seen, seen + 1)) continue;
        pool.fn(pool.ctx, next);
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *worker(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t last = (uint32_t)(atomic_load(&pool.claim) >> 32);
    for (;;) {
        int64_t since = now_ns();
        uint32_t gen;
        for (int polls = 0;; polls++) {
            gen = (uint32_t)(atomic_load(&pool.claim) >> 32);
            if (gen != last) break;
            relax();
            if ((polls & 63) == 63) {
                if (now_ns() - since > SPIN_NS) {
                    uint32_t word = atomic_load(&pool.wake);
                    atomic_fetch_add(&pool.sleepers, 1);
                    if ((uint32_t)(atomic_load(&pool.claim) >> 32) == last)
                        syscall(SYS_futex, &pool.wake, FUTEX_WAIT_PRIVATE, word, NULL, NULL, 0);
                    atomic_fetch_sub(&pool.sleepers, 1);
                    since = now_ns();
                } else {
                    sched_yield(); /* anything else runnable goes first */
                }
            }
        }
        last = gen;
        if (index < atomic_load(&pool.threads)) take_chunks(gen);
    }
    return NULL;
}

/* Workers up to index threads - 1; returns how many exist. */
static int start_workers(int threads) {
    int wanted = threads - 1 < MAX_WORKERS ? threads - 1 : MAX_WORKERS;
    while (pool.started < wanted) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker, (void *)(intptr_t)(pool.started + 1));
        pthread_attr_destroy(&attr);
        if (failed) break; /* fewer workers: the caller takes what they would have */
        pool.started++;
    }
    return pool.started;
}

/* A forked child has none of the parent's workers (nor the parent's caller), and its
 * OpenMP may hang at the first region if the parent ran any (libgomp is not fork-safe):
 * its jobs go to workers of its own. */
static void after_fork_in_child(void) {
    pthread_mutex_init(&pool.caller, NULL);
    pool.started = 0;
    atomic_store(&pool.sleepers, 0);
    pool.mode = ALWAYS_POOL;
}

static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

static void install_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }

static void run_inline(chunk_fn fn, void *ctx, int64_t chunks) {
    for (int64_t c = 0; c < chunks; c++) fn(ctx, c);
}

/* The job as one OpenMP region, chunks handed out dynamically; returns whether one of
 * its threads started late. */
static int run_openmp(chunk_fn fn, void *ctx, int64_t chunks, int threads) {
    const int64_t start = now_ns();
    _Atomic int late = 0;
#pragma omp parallel num_threads(threads)
    {
        if (omp_get_thread_num() != 0 && now_ns() - start > LATE_START_NS)
            atomic_store(&late, 1);
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; c++) fn(ctx, c);
    }
    return atomic_load(&late);
}

static void run_pool(chunk_fn fn, void *ctx, int64_t chunks, int threads) {
    if (start_workers(threads) == 0) {
        run_inline(fn, ctx, chunks);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.chunks, chunks);
    atomic_store(&pool.threads, threads);
    atomic_store(&pool.done, 0);
    uint32_t gen = ++pool.generation;
    atomic_store(&pool.claim, (uint64_t)gen << 32);
    if (atomic_load(&pool.sleepers) > 0) {
        atomic_fetch_add(&pool.wake, 1);
        syscall(SYS_futex, &pool.wake, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    }
    take_chunks(gen);
    /* Every chunk is taken: wait for the ones workers are still running. */
    int64_t since = now_ns();
    for (int polls = 0; atomic_load(&pool.done) < chunks; polls++) {
        relax();
        if ((polls & 63) == 63 && now_ns() - since > CALLER_SPIN_NS) sched_yield();
    }
}

/* The way the next job runs (the caller's lock held): 1 the pool's workers. */
static int next_job_to_pool(void) {
    return pool.mode == ALWAYS_POOL ||
           (pool.mode == ADAPTIVE && pool.pool_until && now_ns() < pool.pool_until);
}

static void run_locked(chunk_fn fn, void *ctx, int64_t chunks, int threads, int to_pool) {
    pthread_once(&fork_handler_once, install_fork_handler);
    if (to_pool) {
        run_pool(fn, ctx, chunks, threads);
        return;
    }
    pool.pool_until = 0;
    if (run_openmp(fn, ctx, chunks, threads)) {
        pool.late_starts++;
        if (pool.mode == ADAPTIVE) pool.pool_until = now_ns() + POOL_PERIOD_NS;
    }
}

/* The caller's lock, or 0: run the job on this thread alone. */
static int lock_caller(int64_t chunks, int threads) {
    return threads > 1 && chunks > 1 && chunks <= INT32_MAX &&
           pthread_mutex_trylock(&pool.caller) == 0;
}

void flashserve_run_chunks(chunk_fn fn, void *ctx, int64_t chunks, int threads) {
    if (chunks <= 0) return;
    if (!lock_caller(chunks, threads)) {
        run_inline(fn, ctx, chunks);
        return;
    }
    run_locked(fn, ctx, chunks, threads, next_job_to_pool());
    pthread_mutex_unlock(&pool.caller);
}

struct range_job {
    range_fn fn;
    void *ctx;
    int64_t items, ranges;
};

static void one_range(void *job, int64_t r) {
    const struct range_job *j = job;
    j->fn(j->ctx, j->items * r / j->ranges, j->items * (r + 1) / j->ranges);
}

void flashserve_run_ranges(range_fn fn, void *ctx, int64_t items, int64_t chunks, int threads) {
    if (items <= 0) return;
    if (!lock_caller(items < chunks ? items : chunks, threads)) {
        fn(ctx, 0, items);
        return;
    }
    int to_pool = next_job_to_pool();
    int64_t ranges = to_pool ? chunks : threads;
    ranges = ranges < items ? ranges : items;
    struct range_job job = {fn, ctx, items, ranges};
    run_locked(one_range, &job, ranges, threads, to_pool);
    pthread_mutex_unlock(&pool.caller);
}

/* Benchmarks' A/B, read once when the library loads: FLASHSERVE_CPU_THREADING=openmp or
 * =pool fixes the mode; anything else leaves it adaptive. */
__attribute__((constructor)) static void mode_from_environment(void) {
    const char *mode = getenv("FLASHSERVE_CPU_THREADING");
    if (mode && !strcmp(mode, "openmp")) pool.mode = ALWAYS_OPENMP;
    if (mode && !strcmp(mode, "pool")) pool.mode = ALWAYS_POOL;
}

/* 0: adaptive (the default), 1: always OpenMP regions, 2: always the pool's workers. */
int flashserve_pool_mode(int mode) {
    pool.mode = mode;
    pool.pool_until = 0;
    return 0;
}

/* How many OpenMP regions had a thread start late (benchmarks report it). */
int flashserve_pool_late_starts(void) { return pool.late_starts; }
