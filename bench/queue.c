/*
 * bench/queue.c — job queue throughput and memory (./scripts/bench queue).
 *
 * No-op jobs (keel_job_done called inside the process callback),
 * concurrency 100, priorities random 0..9:
 *  stream  1 M jobs, at most 100 pending: more are pushed whenever the queue
 *          drains below 100 (from on_complete)
 *  bulk    1 M jobs pushed up front, then processed
 *  bytes   memory growth of a paused queue holding 1 M jobs / 1 M, counted
 *          through keel_replace_allocator
 *  allocs  allocations (malloc, calloc, realloc) made by keel per job over
 *          one stream and one bulk run, queue creation and close included
 * Peer figures for the same workloads come from bench/peers/queue.js when
 * Node.js and its packages are available (scripts/bench prints them).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "keel/queue.h"

#define JOBS 1000000
#define RUNS 5

static int64_t live_bytes;
static uint64_t allocations;
typedef struct header {
  size_t size;
  size_t pad;
} header;

static void *count_malloc(size_t n) {
  allocations++;
  header *h = malloc(sizeof *h + n);
  if (h == NULL) return NULL;
  h->size = n;
  live_bytes += (int64_t)n;
  return h + 1;
}
static void count_free(void *p) {
  if (p == NULL) return;
  header *h = (header *)p - 1;
  live_bytes -= (int64_t)h->size;
  free(h);
}
static void *count_realloc(void *p, size_t n) {
  if (p == NULL) return count_malloc(n);
  allocations++;
  header *old = (header *)p - 1;
  size_t old_size = old->size;
  header *h = realloc(old, sizeof *h + n);
  if (h == NULL) return NULL;
  live_bytes += (int64_t)n - (int64_t)old_size;
  h->size = n;
  return h + 1;
}
static void *count_calloc(size_t c, size_t n) {
  void *p = count_malloc(c * n);
  if (p != NULL) memset(p, 0, c * n);
  return p;
}

/* Process CPU time: on a machine shared with other work, wall-clock
 * throughput measures the neighbours; this one measures keel. */
static double cpu_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct bench {
  keel_queue *q;
  keel_rng rng;
  int pushed;
  int started;
  int target;
} bench;

static void process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)payload;
  (void)data;
  keel_job_done(job, 0);
}

static void process_counted(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)payload;
  ((bench *)data)->started++;
  keel_job_done(job, 0);
}

static void refill(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)job;
  (void)payload;
  bench *b = data;
  /* Keep at most 100 pending: top up whenever it drains below 100. Pending
   * is counted here (pushed - started): keel_queue_get_stats() computes
   * percentiles and would be measured instead of the queue. */
  int pending = b->pushed - b->started;
  while (pending < 100 && b->pushed < b->target) {
    keel_queue_push(q, NULL, (int)(keel_rng_next(&b->rng) % 10), NULL);
    b->pushed++;
    pending++;
  }
}

static double run_stream(double *cpu_rate) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  bench b = {.target = JOBS};
  keel_rng_seed(&b.rng, 1);
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.concurrency = 100;
  o.on_complete = refill;
  o.data = &b;
  keel_queue_new(&loop, process_counted, &o, &b.q);
  double c0 = cpu_now_s();
  double t0 = bench_now_s();
  for (; b.pushed < 100; b.pushed++)
    keel_queue_push(b.q, NULL, (int)(keel_rng_next(&b.rng) % 10), NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  double t1 = bench_now_s();
  *cpu_rate = JOBS / (cpu_now_s() - c0);
  keel_queue_stats s;
  keel_queue_get_stats(b.q, &s);
  if (s.completed != JOBS)
    fprintf(stderr, "stream: completed %llu\n", (unsigned long long)s.completed);
  keel_queue_close(b.q, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return JOBS / (t1 - t0);
}

static double run_bulk(double *cpu_rate) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_rng rng;
  keel_rng_seed(&rng, 2);
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.concurrency = 100;
  keel_queue *q;
  keel_queue_new(&loop, process, &o, &q);
  double c0 = cpu_now_s();
  double t0 = bench_now_s();
  for (int i = 0; i < JOBS; i++) keel_queue_push(q, NULL, (int)(keel_rng_next(&rng) % 10), NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  double t1 = bench_now_s();
  *cpu_rate = JOBS / (cpu_now_s() - c0);
  keel_queue_close(q, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return JOBS / (t1 - t0);
}

static double bytes_per_job(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.concurrency = 100;
  keel_queue *q;
  keel_queue_new(&loop, process, &o, &q);
  keel_queue_pause(q);
  keel_rng rng;
  keel_rng_seed(&rng, 3);
  int64_t before = live_bytes;
  for (int i = 0; i < JOBS; i++) keel_queue_push(q, NULL, (int)(keel_rng_next(&rng) % 10), NULL);
  int64_t grown = live_bytes - before;
  keel_queue_close(q, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return (double)grown / JOBS;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(void) {
  keel_replace_allocator(count_malloc, count_realloc, count_calloc, count_free);
  double stream[RUNS], bulk[RUNS], stream_cpu[RUNS], bulk_cpu[RUNS];
  uint64_t allocs_before = allocations;
  run_stream(&stream_cpu[0]);
  run_bulk(&bulk_cpu[0]);
  double allocs_per_job = (double)(allocations - allocs_before) / (2.0 * JOBS);
  for (int r = 0; r < RUNS; r++) {
    stream[r] = run_stream(&stream_cpu[r]);
    bulk[r] = run_bulk(&bulk_cpu[r]);
  }
  qsort(stream, RUNS, sizeof(double), cmp);
  qsort(bulk, RUNS, sizeof(double), cmp);
  qsort(stream_cpu, RUNS, sizeof(double), cmp);
  qsort(bulk_cpu, RUNS, sizeof(double), cmp);
  double bytes = bytes_per_job();
  printf("stream (1 M jobs, <= 100 pending): %12.0f jobs/s (median of %d)\n", stream[RUNS / 2],
         RUNS);
  printf("bulk   (1 M jobs pushed first):    %12.0f jobs/s\n", bulk[RUNS / 2]);
  printf("memory of a paused queue:          %12.1f bytes/job\n", bytes);
  printf("per CPU second (process CPU time): stream %.0f, bulk %.0f jobs/s\n", stream_cpu[RUNS / 2],
         bulk_cpu[RUNS / 2]);
  printf("allocations:                       %12.6f per job\n", allocs_per_job);
  printf(
      "queue stream_jobs_per_s=%.0f bulk_jobs_per_s=%.0f bytes_per_job=%.1f allocs_per_job=%.6f\n",
      stream[RUNS / 2], bulk[RUNS / 2], bytes, allocs_per_job);
  return 0;
}
