/*
 * bench/microbench.h — what the nanosecond benchmarks (breaker, policies)
 * share: allocations counted through keel_replace_allocator, clocks, the
 * median of a run's samples and an operation the compiler cannot drop.
 */
#ifndef KEEL_BENCH_MICROBENCH_H
#define KEEL_BENCH_MICROBENCH_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

/* Allocations made since the counting allocator was installed:
 * keel_replace_allocator(bench_count_malloc, bench_count_realloc,
 * bench_count_calloc, free). */
static uint64_t allocations;

static void *bench_count_malloc(size_t n) {
  allocations++;
  return malloc(n);
}

static void *bench_count_realloc(void *p, size_t n) {
  allocations++;
  return realloc(p, n);
}

static void *bench_count_calloc(size_t c, size_t n) {
  allocations++;
  return calloc(c, n);
}

static inline double bench_clock_ns(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int bench_cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Sorts v in place. */
static inline double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, bench_cmp_double);
  return v[n / 2];
}

static volatile int sink;

#endif
