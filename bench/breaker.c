/*
 * bench/breaker.c — what the breaker costs per call (./scripts/bench breaker).
 *
 *  overhead_ns   acquire+release around a call in the CLOSED state, minus the
 *                same loop calling the operation bare (median of 7 runs of
 *                10 M calls)
 *  reject_ns     acquire in the OPEN state (rejected)
 *  allocs        allocations per call, counted through keel_replace_allocator
 *  execute_ns    keel_breaker_execute() around an operation completed on the
 *                loop, minus the same operation driven without the breaker
 *
 * Peers measured on this machine (Node.js, from the issue): cockatiel adds
 * 145 ns per call in the closed state, opossum 979 ns (612 ns tuned).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "keel/breaker.h"
#include "microbench.h"

#define CALLS 10000000
#define RUNS 7

static double now_ns(void) {
  return bench_clock_ns(CLOCK_MONOTONIC);
}

/* The guarded operation: small, but the compiler cannot drop it. */
__attribute__((noinline)) static int operation(int i) {
  sink = i;
  return (i & 1023) == 0 ? UV_EIO : 0;
}

static double bare_run(void) {
  double t0 = now_ns();
  int failures = 0;
  for (int i = 0; i < CALLS; i++) failures += operation(i) != 0;
  double t1 = now_ns();
  sink = failures;
  return (t1 - t0) / CALLS;
}

static double guarded_run(keel_breaker *b) {
  double t0 = now_ns();
  for (int i = 0; i < CALLS; i++) {
    keel_breaker_permit permit;
    if (keel_breaker_acquire(b, &permit) == 0) keel_breaker_release(&permit, operation(i), 0);
  }
  double t1 = now_ns();
  return (t1 - t0) / CALLS;
}

static double reject_run(keel_breaker *b) {
  double t0 = now_ns();
  int rejected = 0;
  for (int i = 0; i < CALLS; i++) {
    keel_breaker_permit permit;
    rejected += keel_breaker_acquire(b, &permit) == KEEL_EOPEN;
  }
  double t1 = now_ns();
  sink = rejected;
  return (t1 - t0) / CALLS;
}

/* ---- execute(): an operation completed by the loop -------------------- */

#define ASYNC_CALLS 200000

typedef struct async_bench {
  uv_loop_t *loop;
  uv_idle_t idle;
  keel_breaker *breaker;
  keel_breaker_call *pending_call;
  bool pending_bare;
  int remaining;
} async_bench;

static void next_async(async_bench *a);

static void on_exec_done(keel_breaker *b, int status, void *data) {
  (void)b;
  (void)status;
  next_async(data);
}

static void exec_op(keel_breaker_call *call, void *data) {
  ((async_bench *)data)->pending_call = call; /* completes on the next idle tick */
}

/* The operation completes on the next loop iteration, as a real async one. */
static void on_idle(uv_idle_t *idle) {
  async_bench *a = idle->data;
  if (a->pending_call != NULL) {
    keel_breaker_call *call = a->pending_call;
    a->pending_call = NULL;
    keel_breaker_done(call, operation(a->remaining));
  } else if (a->pending_bare) {
    a->pending_bare = false;
    sink = operation(a->remaining);
    next_async(a);
  }
}

static void next_async(async_bench *a) {
  if (--a->remaining <= 0) {
    uv_idle_stop(&a->idle);
    return;
  }
  if (a->breaker != NULL)
    keel_breaker_execute(a->breaker, exec_op, 1000, on_exec_done, a);
  else
    a->pending_bare = true;
}

static double async_run(uv_loop_t *loop, keel_breaker *b) {
  async_bench a = {.loop = loop, .breaker = b, .remaining = ASYNC_CALLS + 1};
  uv_idle_init(loop, &a.idle);
  a.idle.data = &a;
  uv_idle_start(&a.idle, on_idle);
  double t0 = now_ns();
  next_async(&a);
  uv_run(loop, UV_RUN_DEFAULT);
  double t1 = now_ns();
  uv_close((uv_handle_t *)&a.idle, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  return (t1 - t0) / ASYNC_CALLS;
}

int main(void) {
  keel_replace_allocator(bench_count_malloc, bench_count_realloc, bench_count_calloc, free);
  uv_loop_t loop;
  uv_loop_init(&loop);

  keel_breaker_opts opts;
  keel_breaker_opts_init(&opts);
  opts.failure_threshold = 1000000; /* stays closed: 1 call in 1024 fails */
  keel_breaker *closed;
  if (keel_breaker_new(&loop, &opts, &closed) != 0) return 1;

  double overhead[RUNS], bare[RUNS], guarded[RUNS], reject[RUNS];
  guarded_run(closed); /* warm up */
  uint64_t allocs_before = allocations;
  for (int r = 0; r < RUNS; r++) {
    bare[r] = bare_run();
    guarded[r] = guarded_run(closed);
    overhead[r] = guarded[r] - bare[r];
  }
  uint64_t guarded_allocs = allocations - allocs_before;

  keel_breaker_opts open_opts;
  keel_breaker_opts_init(&open_opts);
  open_opts.failure_threshold = 1;
  open_opts.reset_timeout_ms = 3600000;
  open_opts.reset_timeout_max_ms = 0;
  keel_breaker *open;
  if (keel_breaker_new(&loop, &open_opts, &open) != 0) {
    fprintf(stderr, "keel_breaker_new failed\n");
    return 1;
  }
  keel_breaker_permit permit;
  keel_breaker_acquire(open, &permit);
  keel_breaker_release(&permit, UV_EIO, 0);
  allocs_before = allocations;
  for (int r = 0; r < RUNS; r++) reject[r] = reject_run(open);
  uint64_t reject_allocs = allocations - allocs_before;

  /* execute(): warm the free list, then measure against the bare async op. */
  async_run(&loop, closed);
  double exec_overhead[RUNS];
  allocs_before = allocations;
  for (int r = 0; r < 3; r++) {
    double bare_async = async_run(&loop, NULL);
    double exec_async = async_run(&loop, closed);
    exec_overhead[r] = exec_async - bare_async;
  }
  uint64_t exec_allocs = allocations - allocs_before;

  double overhead_ns = median(overhead, RUNS);
  double reject_ns = median(reject, RUNS);
  double exec_ns = median(exec_overhead, 3);
  double calls = (double)CALLS * RUNS * 2 + (double)ASYNC_CALLS * 3;
  double allocs_per_call = (double)(guarded_allocs + reject_allocs + exec_allocs) / calls;

  printf("bare call:              %6.2f ns (median of %d x %d calls)\n", median(bare, RUNS), RUNS,
         CALLS);
  printf("acquire+call+release:   %6.2f ns\n", median(guarded, RUNS));
  printf("closed-state overhead:  %6.2f ns   (cockatiel 145 ns, opossum 979 ns / 612 ns tuned)\n",
         overhead_ns);
  printf("open-state rejection:   %6.2f ns\n", reject_ns);
  printf("execute() overhead:     %6.2f ns   over the same loop-completed op without a breaker\n",
         exec_ns);
  printf("allocations per call:   %.6f\n", allocs_per_call);
  printf("peer ratio (closed):    cockatiel/keel = %.0fx, opossum/keel = %.0fx\n",
         145.0 / (overhead_ns > 0.1 ? overhead_ns : 0.1),
         979.0 / (overhead_ns > 0.1 ? overhead_ns : 0.1));

  keel_breaker_close(closed, NULL, NULL);
  keel_breaker_close(open, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  printf("breaker overhead_ns=%.2f reject_ns=%.2f allocs_per_call=%g execute_overhead_ns=%.1f\n",
         overhead_ns, reject_ns, allocs_per_call, exec_ns);
  return 0;
}
