/*
 * bench/policies.c — what the policies cost per call (./scripts/bench policies).
 *
 *  limiter_ns          keel_ratelimit_take() (GCRA, always allowed) around a
 *                      no-op call, minus the same loop calling it bare
 *                      (median of 7 runs of 10 M calls)
 *  pipeline_ns         keel_pipeline_execute() with rate limit + timeout +
 *                      retry + breaker around a no-op operation that reports
 *                      at once, minus the same operation and done called
 *                      bare; calls go in batches of 256 per loop turn
 *                      (median of 7 runs of 2 M calls)
 *  allocs_per_call     allocations per pipeline call after warm-up, counted
 *                      through keel_replace_allocator
 *  redis_limiter_per_s keel_ratelimit_redis_take() decisions per second, 64
 *                      in flight on one connection, and
 *  redis_floor_per_s   bare hiredis async (its stock libuv adapter) on the
 *                      same loop sending the same script by EVALSHA with the
 *                      same arguments and concurrency; each 1 s, alternately,
 *                      5 rounds, medians (Redis from KEEL_TEST_REDIS, which
 *                      scripts/bench starts; 0 and 0 without it)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "keel/policy.h"
#include "policy/ratelimit_redis.h"
#include "microbench.h"

#define LIMITER_CALLS 10000000
#define PIPE_CALLS 2000000
#define BATCH 256
#define RUNS 7

static double now_ns(void) {
  return bench_clock_ns(CLOCK_THREAD_CPUTIME_ID);
}

__attribute__((noinline)) static int operation(int i) {
  sink = i;
  return 0;
}

/* ---- limiter ---- */

static double limiter_run(keel_ratelimit *rl, int guarded) {
  double t0 = now_ns();
  for (int i = 0; i < LIMITER_CALLS; i++) {
    if (guarded && keel_ratelimit_take(rl, 1, NULL) != 0) abort();
    operation(i);
  }
  return (now_ns() - t0) / LIMITER_CALLS;
}

/* ---- pipeline ---- */

static int completed;

static void op(keel_attempt *a, void *data) {
  (void)data;
  keel_attempt_done(a, operation(completed));
}

static void done(keel_pipeline *p, const keel_pipeline_result *r, void *data) {
  (void)p;
  (void)data;
  if (r->status != 0) abort();
  completed++;
}

typedef void (*bare_op_fn)(int *out);
__attribute__((noinline)) static void bare_op(int *out) {
  *out = operation(completed);
}
__attribute__((noinline)) static void bare_done(int status) {
  if (status != 0) abort();
  completed++;
}

static double bare_run(void) {
  volatile bare_op_fn fn = bare_op;
  double t0 = now_ns();
  for (int i = 0; i < PIPE_CALLS; i++) {
    int st;
    fn(&st);
    bare_done(st);
  }
  return (now_ns() - t0) / PIPE_CALLS;
}

static double pipe_run(uv_loop_t *loop, keel_pipeline *p, int calls) {
  completed = 0;
  double t0 = now_ns();
  for (int sent = 0; sent < calls; sent += BATCH) {
    for (int i = 0; i < BATCH; i++)
      if (keel_pipeline_execute(p, op, done, NULL) != 0) abort();
    while (completed < sent + BATCH) uv_run(loop, UV_RUN_NOWAIT);
  }
  return (now_ns() - t0) / calls;
}

/* ---- Redis: keel's shared limiter against bare hiredis -------------------- */

#define INFLIGHT 64
#define REDIS_ROUNDS 5
#define REDIS_SECONDS 1.0
#define BIG_RATE "1"           /* emission interval 1 us */
#define BIG_TAU "100000000000" /* burst tolerance: never says no */

static double mono_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct rbench {
  double deadline;
  long decisions, failures;
  int running;
  keel_ratelimit_redis *rl;
  redisAsyncContext *ac;
  char sha[41];
} rbench;

static void k_send(rbench *b);
static void k_answer(keel_ratelimit_redis *rl, int status, uint64_t after, uint64_t rem,
                     void *data) {
  (void)rl;
  (void)after;
  (void)rem;
  rbench *b = data;
  if (status != 0) b->failures++;
  b->decisions++;
  k_send(b);
}
static void k_send(rbench *b) {
  if (mono_s() >= b->deadline || keel_ratelimit_redis_take(b->rl, "bench", 1, k_answer, b) != 0)
    b->running--;
}

static void f_send(rbench *b);
static void f_answer(redisAsyncContext *ac, void *reply, void *data) {
  (void)ac;
  rbench *b = data;
  redisReply *rep = reply;
  if (rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->elements != 3 ||
      rep->element[0]->integer != 1)
    b->failures++;
  b->decisions++;
  f_send(b);
}
static void f_send(rbench *b) {
  if (mono_s() >= b->deadline) {
    b->running--;
    return;
  }
  const char *argv[] = {"EVALSHA", b->sha, "1", "keel:bench:floor", BIG_RATE, BIG_TAU, "1"};
  redisAsyncCommandArgv(b->ac, f_answer, b, 7, argv, NULL);
}

static double redis_round(uv_loop_t *loop, rbench *b, int keel) {
  b->decisions = b->failures = 0;
  b->running = INFLIGHT;
  double t0 = mono_s();
  b->deadline = t0 + REDIS_SECONDS;
  for (int i = 0; i < INFLIGHT; i++) keel ? k_send(b) : f_send(b);
  while (b->running > 0) uv_run(loop, UV_RUN_ONCE);
  if (b->failures > 0) fprintf(stderr, "%s: %ld failures\n", keel ? "keel" : "floor", b->failures);
  return (double)b->decisions / (mono_s() - t0);
}

static void on_connected(const redisAsyncContext *ac, int status) {
  (void)ac;
  if (status != REDIS_OK) exit(1);
}

/* Runs both sides; 0 and 0 when KEEL_TEST_REDIS is not set. */
static void redis_bench(double *keel_per_s, double *floor_per_s) {
  *keel_per_s = *floor_per_s = 0;
  const char *addr = getenv("KEEL_TEST_REDIS");
  if (addr == NULL || strrchr(addr, ':') == NULL) return;
  char host[128];
  const char *colon = strrchr(addr, ':');
  snprintf(host, sizeof host, "%.*s", (int)(colon - addr), addr);
  int port = (int)strtol(colon + 1, NULL, 10);
  uv_loop_t loop;
  uv_loop_init(&loop);
  rbench b;
  memset(&b, 0, sizeof b);
  /* load the script once (neither side pays a NOSCRIPT round) */
  redisContext *c = redisConnect(host, port);
  if (c == NULL || c->err != 0) exit(1);
  redisReply *rep = redisCommand(c, "SCRIPT LOAD %s", keel__ratelimit_redis_script());
  if (rep == NULL || rep->type != REDIS_REPLY_STRING) exit(1);
  snprintf(b.sha, sizeof b.sha, "%s", rep->str);
  freeReplyObject(rep);
  redisFree(c);

  char url[160];
  snprintf(url, sizeof url, "redis://%s:%d", host, port);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  keel_redis *r;
  if (keel_redis_new(&loop, &o, &r) != 0) exit(1);
  keel_ratelimit_redis_opts ro;
  keel_ratelimit_redis_opts_init(&ro);
  ro.rate = 1000000; /* interval 1 us */
  ro.burst = 100000; /* tau 100 000 000 000 us: never says no */
  ro.prefix = "keel:bench:";
  if (keel_ratelimit_redis_new(r, &ro, &b.rl) != 0) exit(1);
  b.ac = redisAsyncConnect(host, port);
  if (b.ac == NULL || b.ac->err != 0) exit(1);
  redisLibuvAttach(b.ac, &loop);
  redisAsyncSetConnectCallback(b.ac, on_connected);
  redis_round(&loop, &b, 1); /* warm-up: connect both */
  redis_round(&loop, &b, 0);
  double k[REDIS_ROUNDS], f[REDIS_ROUNDS];
  for (int i = 0; i < REDIS_ROUNDS; i++) {
    k[i] = redis_round(&loop, &b, 1);
    f[i] = redis_round(&loop, &b, 0);
  }
  *keel_per_s = median(k, REDIS_ROUNDS);
  *floor_per_s = median(f, REDIS_ROUNDS);
  redisAsyncDisconnect(b.ac);
  keel_ratelimit_redis_close(b.rl, NULL, NULL);
  keel_redis_close(r, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
}

int main(void) {
  keel_replace_allocator(bench_count_malloc, bench_count_realloc, bench_count_calloc, free);
  uv_loop_t loop;
  uv_loop_init(&loop);

  keel_ratelimit_opts ro;
  keel_ratelimit_opts_init(&ro);
  ro.rate = 1000000000; /* one per ns: never says no */
  ro.period_ms = 1000;
  ro.burst = UINT64_C(1) << 32;
  keel_ratelimit *rl;
  if (keel_ratelimit_new(&loop, &ro, &rl) != 0) return 1;

  double lim[RUNS];
  for (int r = 0; r < RUNS; r++) {
    double bare = limiter_run(rl, 0);
    double guarded = limiter_run(rl, 1);
    lim[r] = guarded - bare;
  }
  double limiter_ns = median(lim, RUNS);
  if (limiter_ns < 0) limiter_ns = 0;

  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  keel_breaker *b;
  if (keel_breaker_new(&loop, &bo, &b) != 0) return 1;
  keel_policy pol[4];
  keel_policy_ratelimit(&pol[0], rl);
  keel_policy_timeout(&pol[1], 10000);
  keel_policy_retry(&pol[2], NULL);
  keel_policy_breaker(&pol[3], b);
  keel_pipeline_opts po;
  keel_pipeline_opts_init(&po);
  po.policies = pol;
  po.npolicies = 4;
  keel_pipeline *p;
  if (keel_pipeline_new(&loop, &po, &p) != 0) return 1;

  pipe_run(&loop, p, 20 * BATCH); /* warm the free lists */
  uint64_t a0 = allocations;
  double pipe[RUNS];
  for (int r = 0; r < RUNS; r++) {
    double bare = bare_run();
    double guarded = pipe_run(&loop, p, PIPE_CALLS);
    pipe[r] = guarded - bare;
  }
  double allocs_per_call = (double)(allocations - a0) / ((double)PIPE_CALLS * RUNS);
  double pipeline_ns = median(pipe, RUNS);
  if (pipeline_ns < 0) pipeline_ns = 0;

  keel_pipeline_close(p, NULL, NULL);
  keel_breaker_close(b, NULL, NULL);
  keel_ratelimit_close(rl, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&loop) != 0) return 1;

  printf("limiter: %.2f ns per decision over a bare call\n", limiter_ns);
  printf("pipeline (rate limit + timeout + retry + breaker): %.1f ns per call over a bare call\n",
         pipeline_ns);
  printf("allocations per pipeline call: %.4f\n", allocs_per_call);
  double redis_keel, redis_floor;
  redis_bench(&redis_keel, &redis_floor);
  printf(
      "redis limiter: %.0f decisions/s, bare hiredis EVALSHA of the same script: %.0f/s "
      "(%.2f x)\n",
      redis_keel, redis_floor, redis_floor > 0 ? redis_keel / redis_floor : 0.0);
  printf(
      "policies limiter_ns=%.2f pipeline_ns=%.1f allocs_per_call=%.4f redis_limiter_per_s=%.0f "
      "redis_floor_per_s=%.0f\n",
      limiter_ns, pipeline_ns, allocs_per_call, redis_keel, redis_floor);
  return 0;
}
