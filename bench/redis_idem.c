/*
 * bench/redis_idem.c — idempotency keys and the shared breaker
 * (./scripts/bench redis_idem), parts (b) and (c) of issue 15's benchmark:
 *
 *  idem_pairs_per_s   begin + complete pairs per second through keel_idem on
 *                     Redis, 64 concurrent requests on distinct keys over one
 *                     connection
 *  idem_floor_per_s   the floor: bare hiredis async (its libuv adapter) on the
 *                     same loop sending the same two scripts by EVALSHA with
 *                     the same concurrency
 *  shared_breaker_ns  acquire + release in the CLOSED state of a breaker
 *                     shared through Redis (syncing every 5 ms while the loop
 *                     runs), minus the same loop calling the operation bare
 *  shared_breaker_allocs  allocations per call on that path
 *
 * Redis address: KEEL_TEST_REDIS (host:port), which scripts/bench sets.
 */
#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "idem/idem_internal.h"
#include "keel/breaker_shared.h"
#include "keel/idempotency.h"

#define CONCURRENCY 64
#define PAIRS 20000
#define RUNS 3

static char host[64] = "127.0.0.1";
static int port = 6379;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- keel ------------------------------------------------------------------ */

typedef struct kworker {
  keel_idem *idem;
  int *next, *done;
  char key[32];
  keel_idem_token token;
} kworker;

static char scope[64];

static void k_start(kworker *w);

static void k_completed(keel_idem *idem, int status, void *data) {
  (void)idem;
  kworker *w = data;
  if (status != 0) {
    fprintf(stderr, "complete: %s\n", keel_err_name(status));
    exit(1);
  }
  (*w->done)++;
  k_start(w);
}

static void k_begun(keel_idem *idem, int status, const keel_idem_reply *r, void *data) {
  kworker *w = data;
  if (status != 0 || r->completed) {
    fprintf(stderr, "begin: %s\n", keel_err_name(status));
    exit(1);
  }
  w->token = r->token;
  keel_idem_complete(idem, scope, w->key, &w->token, 200, "{\"ok\":true}", 11, k_completed, w);
}

static void k_start(kworker *w) {
  if (*w->next >= PAIRS) return;
  snprintf(w->key, sizeof w->key, "k%d", (*w->next)++);
  keel_idem_begin(w->idem, scope, w->key, "fingerprint", k_begun, w);
}

static double keel_run(int run) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char url[128];
  snprintf(url, sizeof url, "redis://%s:%d", host, port);
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = url;
  keel_redis *r;
  if (keel_redis_new(&loop, &ro, &r) != 0) exit(1);
  keel_idem *idem;
  if (keel_idem_new_redis(&loop, r, NULL, &idem) != 0) exit(1);
  snprintf(scope, sizeof scope, "bench-keel-%d-%ld", run, (long)time(NULL));
  /* Warm up: connect and load the scripts. */
  int next = 0, done = 0;
  kworker warm = {.idem = idem, .next = &next, .done = &done};
  int target = 1;
  next = PAIRS - 1;
  k_start(&warm);
  while (done < target) uv_run(&loop, UV_RUN_ONCE);
  next = 0;
  done = 0;
  snprintf(scope, sizeof scope, "bench-keel-%d-%ld-m", run, (long)time(NULL));
  static kworker w[CONCURRENCY];
  double t0 = now_s();
  for (int i = 0; i < CONCURRENCY; i++) {
    w[i] = (kworker){.idem = idem, .next = &next, .done = &done};
    k_start(&w[i]);
  }
  while (done < PAIRS) uv_run(&loop, UV_RUN_ONCE);
  double t = now_s() - t0;
  keel_idem_close(idem, NULL, NULL);
  keel_redis_close(r, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return PAIRS / t;
}

/* ---- bare hiredis ------------------------------------------------------------ */

static char sha[2][41];
static int f_next, f_done;
static char fscope[64];

typedef struct fworker {
  redisAsyncContext *ac;
  char key[128];
  char token[33];
} fworker;

static void f_start(fworker *w);

static void f_completed(redisAsyncContext *ac, void *reply, void *data) {
  (void)ac;
  redisReply *rep = reply;
  if (rep == NULL || rep->type != REDIS_REPLY_INTEGER || rep->integer != 1) {
    fprintf(stderr, "floor complete failed\n");
    exit(1);
  }
  f_done++;
  f_start(data);
}

static void f_begun(redisAsyncContext *ac, void *reply, void *data) {
  fworker *w = data;
  redisReply *rep = reply;
  if (rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->element[0]->integer != 0) {
    fprintf(stderr, "floor begin failed\n");
    exit(1);
  }
  redisAsyncCommand(ac, f_completed, w, "EVALSHA %s 1 %s %s %s %b %s %s", sha[1], w->key, w->token,
                    "200", "{\"ok\":true}", (size_t)11, "1", "86400000");
}

static void f_start(fworker *w) {
  if (f_next >= PAIRS) return;
  /* The same key layout and token format as keel's. */
  snprintf(w->key, sizeof w->key, "keel:idem:{%zu:%sk%d}", strlen(fscope), fscope, f_next++);
  snprintf(w->token, sizeof w->token, "%08x%08x%08x%08x", (unsigned)rand(), (unsigned)rand(),
           (unsigned)rand(), (unsigned)rand());
  redisAsyncCommand(w->ac, f_begun, w, "EVALSHA %s 1 %s %s %s %s", sha[0], w->key, "fingerprint",
                    w->token, "60000");
}

static double floor_run(int run) {
  redisContext *c = redisConnect(host, port);
  if (c == NULL || c->err) exit(1);
  for (int i = 0; i < 2; i++) {
    redisReply *rep = redisCommand(c, "SCRIPT LOAD %s", keel__idem_redis_source(i));
    if (rep == NULL || rep->type != REDIS_REPLY_STRING) exit(1);
    snprintf(sha[i], sizeof sha[i], "%s", rep->str);
    freeReplyObject(rep);
  }
  redisFree(c);
  uv_loop_t loop;
  uv_loop_init(&loop);
  redisAsyncContext *ac = redisAsyncConnect(host, port);
  if (ac == NULL || ac->err) exit(1);
  redisLibuvAttach(ac, &loop);
  snprintf(fscope, sizeof fscope, "bench-floor-%d-%ld", run, (long)time(NULL));
  static fworker w[CONCURRENCY];
  f_next = f_done = 0;
  double t0 = now_s();
  for (int i = 0; i < CONCURRENCY; i++) {
    w[i].ac = ac;
    f_start(&w[i]);
  }
  while (f_done < PAIRS) uv_run(&loop, UV_RUN_ONCE);
  double t = now_s() - t0;
  redisAsyncDisconnect(ac);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return PAIRS / t;
}

/* ---- shared breaker ------------------------------------------------------------ */

#define CALLS 10000000
static volatile int sink;
static uint64_t allocations;
static void *count_malloc(size_t n) {
  allocations++;
  return malloc(n);
}
static void *count_realloc(void *p, size_t n) {
  allocations++;
  return realloc(p, n);
}
static void *count_calloc(size_t c, size_t n) {
  allocations++;
  return calloc(c, n);
}

__attribute__((noinline)) static int operation(int i) {
  sink = i;
  return 0;
}

static double per_call_ns(double t0, double t1) {
  return (t1 - t0) * 1e9 / CALLS;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double breaker_run(double *allocs_per_call, double *unshared_ns) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char url[128];
  snprintf(url, sizeof url, "redis://%s:%d", host, port);
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = url;
  keel_redis *r;
  if (keel_redis_new(&loop, &ro, &r) != 0) exit(1);
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  keel_breaker *b;
  if (keel_breaker_new(&loop, &bo, &b) != 0) exit(1);
  keel_breaker *plain;
  if (keel_breaker_new(&loop, &bo, &plain) != 0) exit(1);
  keel_breaker_shared_opts so;
  keel_breaker_shared_opts_init(&so);
  char name[64];
  snprintf(name, sizeof name, "bench-%ld", (long)time(NULL));
  so.name = name;
  keel_breaker_shared *sh;
  if (keel_breaker_shared_new(&loop, b, r, &so, &sh) != 0) exit(1);
  for (int i = 0; i < 100; i++) {
    uv_run(&loop, UV_RUN_NOWAIT);
    uv_sleep(1);
  }
  double bare[5], shared[5], unshared[5];
  uint64_t allocs = 0;
  for (int k = 0; k < 5; k++) {
    double t0 = now_s();
    for (int i = 0; i < CALLS; i++) {
      if ((i & 4095) == 0) uv_run(&loop, UV_RUN_NOWAIT);
      sink = operation(i);
    }
    double t1 = now_s();
    bare[k] = per_call_ns(t0, t1);
    uint64_t a0 = allocations;
    t0 = now_s();
    for (int i = 0; i < CALLS; i++) {
      if ((i & 4095) == 0) uv_run(&loop, UV_RUN_NOWAIT);
      keel_breaker_permit p;
      if (keel_breaker_acquire(b, &p) == 0) keel_breaker_release(&p, operation(i), 0);
    }
    t1 = now_s();
    allocs += allocations - a0;
    shared[k] = per_call_ns(t0, t1);
    t0 = now_s();
    for (int i = 0; i < CALLS; i++) {
      if ((i & 4095) == 0) uv_run(&loop, UV_RUN_NOWAIT);
      keel_breaker_permit p;
      if (keel_breaker_acquire(plain, &p) == 0) keel_breaker_release(&p, operation(i), 0);
    }
    t1 = now_s();
    unshared[k] = per_call_ns(t0, t1);
  }
  keel_breaker_shared_stats st;
  keel_breaker_shared_get_stats(sh, &st);
  fprintf(stderr, "shared breaker: %llu syncs, %llu outcomes published, fallback %d\n",
          (unsigned long long)st.syncs, (unsigned long long)st.published_outcomes, st.fallback);
  keel_breaker_shared_close(sh, NULL, NULL);
  keel_breaker_close(b, NULL, NULL);
  keel_breaker_close(plain, NULL, NULL);
  keel_redis_close(r, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  qsort(unshared, 5, sizeof(double), cmp_double);
  qsort(bare, 5, sizeof(double), cmp_double);
  *unshared_ns = unshared[2] - bare[2] > 0 ? unshared[2] - bare[2] : 0;
  qsort(shared, 5, sizeof(double), cmp_double);
  *allocs_per_call = (double)allocs / (5.0 * CALLS);
  /* The hiredis reads/writes of the syncs inside the loop runs count too:
   * they are the sharing's cost, spread over the calls. */
  double d = shared[2] - bare[2];
  return d > 0 ? d : 0;
}

int main(void) {
  const char *addr = getenv("KEEL_TEST_REDIS");
  if (addr != NULL) {
    const char *colon = strrchr(addr, ':');
    if (colon != NULL && (size_t)(colon - addr) < sizeof host) {
      memcpy(host, addr, (size_t)(colon - addr));
      host[colon - addr] = '\0';
      port = (int)strtol(colon + 1, NULL, 10);
    }
  }
  keel_replace_allocator(count_malloc, count_realloc, count_calloc, free);
  double k[RUNS], f[RUNS];
  for (int i = 0; i < RUNS; i++) {
    /* Alternate so that the machine's load hits both alike. */
    f[i] = floor_run(i);
    k[i] = keel_run(i);
    fprintf(stderr, "run %d: keel %.0f pairs/s, floor %.0f pairs/s (%.2f)\n", i, k[i], f[i],
            k[i] / f[i]);
  }
  qsort(k, RUNS, sizeof(double), cmp_double);
  qsort(f, RUNS, sizeof(double), cmp_double);
  double allocs, unshared;
  double ns = breaker_run(&allocs, &unshared);
  printf("idem begin+complete: %.0f pairs/s, floor %.0f pairs/s, ratio %.2f (bar >= 0.85)\n",
         k[RUNS / 2], f[RUNS / 2], k[RUNS / 2] / f[RUNS / 2]);
  printf(
      "shared breaker closed path: %.2f ns/call over a bare call (the same breaker unshared: "
      "%.2f ns), %.6f allocs/call in the loop, syncs included (bar <= 15 ns, 0)\n",
      ns, unshared, allocs);
  printf(
      "redis_idem idem_pairs_per_s=%.0f idem_floor_per_s=%.0f shared_breaker_ns=%.2f "
      "shared_breaker_allocs=%.6f\n",
      k[RUNS / 2], f[RUNS / 2], ns, allocs);
  return 0;
}
