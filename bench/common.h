/*
 * bench/common.h — what several benchmarks share: a monotonic clock, the
 * median of three runs, and running pgbench with a one-file script.
 */
#ifndef KEEL_BENCH_COMMON_H
#define KEEL_BENCH_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Callgrind's client requests when valgrind's header is there (a run under
 * `valgrind --tool=callgrind --collect-atstart=no` then measures only the
 * windows a benchmark marks); no-ops otherwise. */
#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#endif
#endif
#ifndef CALLGRIND_ZERO_STATS
#define CALLGRIND_ZERO_STATS
#define CALLGRIND_DUMP_STATS_AT(label) ((void)(label))
#endif

static inline uint64_t bench_mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline double bench_now_s(void) {
  return (double)bench_mono_ns() / 1e9;
}

/* Sorts latency samples (ns) and reads the p50 and p99 in microseconds;
 * both 0 for no samples. */
static inline int bench_cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

static inline void bench_percentiles_us(uint64_t *samples, int count, double *p50_us,
                                        double *p99_us) {
  *p50_us = *p99_us = 0;
  if (count <= 0) return;
  qsort(samples, (size_t)count, sizeof *samples, bench_cmp_u64);
  *p50_us = (double)samples[count / 2] / 1000.0;
  *p99_us = (double)samples[(int)(count * 0.99)] / 1000.0;
}

static inline double bench_median3(double a, double b, double c) {
  if ((a <= b && b <= c) || (c <= b && b <= a)) return b;
  if ((b <= a && a <= c) || (c <= a && a <= b)) return a;
  return c;
}

/*
 * Runs pgbench -n -c clients [-j threads] -T seconds with script_text as its
 * only script, against conninfo (pgbench from KEEL_TEST_PG_BINDIR when set).
 * threads 0 leaves pgbench's default (one thread). Returns the tps it
 * reports, 0 when it could not run; *processed (may be NULL) gets the number
 * of transactions it says it ran.
 */
static inline double bench_pgbench(const char *conninfo, const char *script_text, int clients,
                                   int threads, int seconds, long long *processed) {
  char script[] = "/tmp/keel-bench-script-XXXXXX";
  int fd = mkstemp(script);
  size_t len = strlen(script_text);
  if (fd < 0 || write(fd, script_text, len) != (ssize_t)len) exit(1);
  close(fd);
  const char *bindir = getenv("KEEL_TEST_PG_BINDIR");
  char thread_opt[32] = "";
  if (threads > 0) snprintf(thread_opt, sizeof thread_opt, "-j %d ", threads);
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "%s%spgbench -n -c %d %s-T %d -f %s '%s' 2>/dev/null",
           bindir ? bindir : "", bindir ? "/" : "", clients, thread_opt, seconds, script, conninfo);
  FILE *p = popen(cmd, "r");
  double tps = 0;
  if (processed != NULL) *processed = 0;
  char line[512];
  while (p != NULL && fgets(line, sizeof line, p) != NULL) {
    if (strncmp(line, "tps = ", 6) == 0) tps = atof(line + 6);
    const char *count = strstr(line, "actually processed:");
    if (count != NULL && processed != NULL) *processed = atoll(count + 19);
  }
  if (p != NULL) pclose(p);
  unlink(script);
  return tps;
}

#endif
