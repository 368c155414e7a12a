/*
 * bench/redis_idem.h — parts (b) and (c) of issue 15's benchmark, shared by
 * bench/redis.c (the line) and bench/redis_idem.c (these parts
 * alone):
 *
 *  idem pairs/s       begin + complete pairs per second through keel_idem on
 *                     Redis, 64 concurrent requests on distinct keys over one
 *                     connection
 *  idem floor/s       bare hiredis async (its libuv adapter) on the same loop
 *                     sending the same two scripts by EVALSHA with the same
 *                     concurrency
 *  shared_breaker_ns  acquire + release in the CLOSED state of a breaker
 *                     shared through Redis (syncing every 5 ms while the loop
 *                     runs), minus the same loop calling the operation bare;
 *                     and the allocations per call in that loop
 */
#ifndef KEEL_BENCH_REDIS_IDEM_H
#define KEEL_BENCH_REDIS_IDEM_H

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

#define IDEM_CONCURRENCY 64
#define IDEM_PAIRS 20000
#define IDEM_RUNS 3

static char idem_host[64] = "127.0.0.1";
static int idem_port = 6379;

static double idem_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- keel ------------------------------------------------------------------ */

typedef struct idem_kworker {
  keel_idem *idem;
  int *next, *done;
  char key[32];
  keel_idem_token token;
} idem_kworker;

static char idem_scope[64];

static void idem_k_start(idem_kworker *w);

static void idem_k_completed(keel_idem *idem, int status, void *data) {
  (void)idem;
  idem_kworker *w = data;
  if (status != 0) {
    fprintf(stderr, "complete: %s\n", keel_err_name(status));
    exit(1);
  }
  (*w->done)++;
  idem_k_start(w);
}

static void idem_k_begun(keel_idem *idem, int status, const keel_idem_reply *r, void *data) {
  idem_kworker *w = data;
  if (status != 0 || r->completed) {
    fprintf(stderr, "begin: %s\n", keel_err_name(status));
    exit(1);
  }
  w->token = r->token;
  keel_idem_complete(idem, idem_scope, w->key, &w->token, 200, "{\"ok\":true}", 11,
                     idem_k_completed, w);
}

static void idem_k_start(idem_kworker *w) {
  if (*w->next >= IDEM_PAIRS) return;
  snprintf(w->key, sizeof w->key, "k%d", (*w->next)++);
  keel_idem_begin(w->idem, idem_scope, w->key, "fingerprint", idem_k_begun, w);
}

static double idem_keel_run(int run) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char url[128];
  snprintf(url, sizeof url, "redis://%s:%d", idem_host, idem_port);
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = url;
  keel_redis *r;
  if (keel_redis_new(&loop, &ro, &r) != 0) exit(1);
  keel_idem *idem;
  if (keel_idem_new_redis(&loop, r, NULL, &idem) != 0) exit(1);
  snprintf(idem_scope, sizeof idem_scope, "bench-keel-%d-%ld", run, (long)time(NULL));
  /* Warm up: connect and load the scripts. */
  int next = 0, done = 0;
  idem_kworker warm = {.idem = idem, .next = &next, .done = &done};
  int target = 1;
  next = IDEM_PAIRS - 1;
  idem_k_start(&warm);
  while (done < target) uv_run(&loop, UV_RUN_ONCE);
  next = 0;
  done = 0;
  snprintf(idem_scope, sizeof idem_scope, "bench-keel-%d-%ld-m", run, (long)time(NULL));
  static idem_kworker w[IDEM_CONCURRENCY];
  double t0 = idem_now_s();
  for (int i = 0; i < IDEM_CONCURRENCY; i++) {
    w[i] = (idem_kworker){.idem = idem, .next = &next, .done = &done};
    idem_k_start(&w[i]);
  }
  while (done < IDEM_PAIRS) uv_run(&loop, UV_RUN_ONCE);
  double t = idem_now_s() - t0;
  keel_idem_close(idem, NULL, NULL);
  keel_redis_close(r, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return IDEM_PAIRS / t;
}

/* ---- bare hiredis ------------------------------------------------------------ */

static char idem_sha[2][41];
static int idem_f_next, idem_f_done;
static char idem_fscope[64];

typedef struct idem_fworker {
  redisAsyncContext *ac;
  char key[128];
  char token[33];
} idem_fworker;

static void idem_f_start(idem_fworker *w);

static void idem_f_completed(redisAsyncContext *ac, void *reply, void *data) {
  (void)ac;
  redisReply *rep = reply;
  if (rep == NULL || rep->type != REDIS_REPLY_INTEGER || rep->integer != 1) {
    fprintf(stderr, "floor complete failed\n");
    exit(1);
  }
  idem_f_done++;
  idem_f_start(data);
}

static void idem_f_begun(redisAsyncContext *ac, void *reply, void *data) {
  idem_fworker *w = data;
  redisReply *rep = reply;
  if (rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->element[0]->integer != 0) {
    fprintf(stderr, "floor begin failed\n");
    exit(1);
  }
  redisAsyncCommand(ac, idem_f_completed, w, "EVALSHA %s 1 %s %s %s %b %s %s", idem_sha[1], w->key,
                    w->token, "200", "{\"ok\":true}", (size_t)11, "1", "86400000");
}

static void idem_f_start(idem_fworker *w) {
  if (idem_f_next >= IDEM_PAIRS) return;
  /* The same key layout and token format as keel's. */
  snprintf(w->key, sizeof w->key, "keel:idem:{%zu:%sk%d}", strlen(idem_fscope), idem_fscope,
           idem_f_next++);
  snprintf(w->token, sizeof w->token, "%08x%08x%08x%08x", (unsigned)rand(), (unsigned)rand(),
           (unsigned)rand(), (unsigned)rand());
  redisAsyncCommand(w->ac, idem_f_begun, w, "EVALSHA %s 1 %s %s %s %s", idem_sha[0], w->key,
                    "fingerprint", w->token, "60000");
}

static double idem_floor_run(int run) {
  redisContext *c = redisConnect(idem_host, idem_port);
  if (c == NULL || c->err) exit(1);
  for (int i = 0; i < 2; i++) {
    redisReply *rep = redisCommand(c, "SCRIPT LOAD %s", keel__idem_redis_source(i));
    if (rep == NULL || rep->type != REDIS_REPLY_STRING) exit(1);
    snprintf(idem_sha[i], sizeof idem_sha[i], "%s", rep->str);
    freeReplyObject(rep);
  }
  redisFree(c);
  uv_loop_t loop;
  uv_loop_init(&loop);
  redisAsyncContext *ac = redisAsyncConnect(idem_host, idem_port);
  if (ac == NULL || ac->err) exit(1);
  redisLibuvAttach(ac, &loop);
  snprintf(idem_fscope, sizeof idem_fscope, "bench-floor-%d-%ld", run, (long)time(NULL));
  static idem_fworker w[IDEM_CONCURRENCY];
  idem_f_next = idem_f_done = 0;
  double t0 = idem_now_s();
  for (int i = 0; i < IDEM_CONCURRENCY; i++) {
    w[i].ac = ac;
    idem_f_start(&w[i]);
  }
  while (idem_f_done < IDEM_PAIRS) uv_run(&loop, UV_RUN_ONCE);
  double t = idem_now_s() - t0;
  redisAsyncDisconnect(ac);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return IDEM_PAIRS / t;
}

/* ---- shared breaker ------------------------------------------------------------ */

#define IDEM_CALLS 10000000
static volatile int idem_sink;
static uint64_t idem_allocations;
static void *idem_count_malloc(size_t n) {
  idem_allocations++;
  return malloc(n);
}
static void *idem_count_realloc(void *p, size_t n) {
  idem_allocations++;
  return realloc(p, n);
}
static void *idem_count_calloc(size_t c, size_t n) {
  idem_allocations++;
  return calloc(c, n);
}

__attribute__((noinline)) static int idem_operation(int i) {
  idem_sink = i;
  return 0;
}

static double idem_per_call_ns(double t0, double t1) {
  return (t1 - t0) * 1e9 / IDEM_CALLS;
}

static int idem_cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double idem_breaker_run(double *allocs_per_call, double *unshared_ns) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char url[128];
  snprintf(url, sizeof url, "redis://%s:%d", idem_host, idem_port);
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
    double t0 = idem_now_s();
    for (int i = 0; i < IDEM_CALLS; i++) {
      if ((i & 4095) == 0) uv_run(&loop, UV_RUN_NOWAIT);
      idem_sink = idem_operation(i);
    }
    double t1 = idem_now_s();
    bare[k] = idem_per_call_ns(t0, t1);
    uint64_t a0 = idem_allocations;
    t0 = idem_now_s();
    for (int i = 0; i < IDEM_CALLS; i++) {
      if ((i & 4095) == 0) uv_run(&loop, UV_RUN_NOWAIT);
      keel_breaker_permit p;
      if (keel_breaker_acquire(b, &p) == 0) keel_breaker_release(&p, idem_operation(i), 0);
    }
    t1 = idem_now_s();
    allocs += idem_allocations - a0;
    shared[k] = idem_per_call_ns(t0, t1);
    t0 = idem_now_s();
    for (int i = 0; i < IDEM_CALLS; i++) {
      if ((i & 4095) == 0) uv_run(&loop, UV_RUN_NOWAIT);
      keel_breaker_permit p;
      if (keel_breaker_acquire(plain, &p) == 0) keel_breaker_release(&p, idem_operation(i), 0);
    }
    t1 = idem_now_s();
    unshared[k] = idem_per_call_ns(t0, t1);
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
  qsort(unshared, 5, sizeof(double), idem_cmp_double);
  qsort(bare, 5, sizeof(double), idem_cmp_double);
  *unshared_ns = unshared[2] - bare[2] > 0 ? unshared[2] - bare[2] : 0;
  qsort(shared, 5, sizeof(double), idem_cmp_double);
  *allocs_per_call = (double)allocs / (5.0 * IDEM_CALLS);
  /* The hiredis reads/writes of the syncs inside the loop runs count too:
   * they are the sharing's cost, spread over the calls. */
  double d = shared[2] - bare[2];
  return d > 0 ? d : 0;
}

/* The shared breaker's open-together latency: two processes' breakers
 * (here two clients and breakers on one loop, each with its own
 * subscriber connection), the periodic sync 10 s away; one trips on local
 * failures and the other opens on the broadcast. Reported in ms (median
 * and worst of IDEM_OPEN_ROUNDS), not in the last line. */
#define IDEM_OPEN_ROUNDS 21
typedef struct idem_open_node {
  keel_redis *r;
  keel_breaker *b;
  keel_breaker_shared *sh;
  uint64_t opened_ns;
} idem_open_node;

static void idem_on_open(keel_breaker *b, keel_breaker_state from, keel_breaker_state to,
                         void *data) {
  (void)b;
  (void)from;
  idem_open_node *n = data;
  if (to == KEEL_BREAKER_OPEN && n->opened_ns == 0) n->opened_ns = uv_hrtime();
}

static void idem_open_together(double *p50_ms, double *max_ms) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char url[128];
  snprintf(url, sizeof url, "redis://%s:%d", idem_host, idem_port);
  double ms[IDEM_OPEN_ROUNDS];
  for (int round = 0; round < IDEM_OPEN_ROUNDS; round++) {
    char name[64];
    snprintf(name, sizeof name, "bench-open-%ld-%d", (long)time(NULL), round);
    idem_open_node n[2];
    memset(n, 0, sizeof n);
    for (int i = 0; i < 2; i++) {
      keel_redis_opts ro;
      keel_redis_opts_init(&ro);
      ro.url = url;
      if (keel_redis_new(&loop, &ro, &n[i].r) != 0) exit(1);
      keel_breaker_opts bo;
      keel_breaker_opts_init(&bo);
      bo.on_state_change = idem_on_open;
      bo.data = &n[i];
      if (keel_breaker_new(&loop, &bo, &n[i].b) != 0) exit(1);
      keel_breaker_shared_opts so;
      keel_breaker_shared_opts_init(&so);
      so.name = name;
      so.publish_interval_ms = 10000;
      if (keel_breaker_shared_new(&loop, n[i].b, n[i].r, &so, &n[i].sh) != 0) exit(1);
    }
    keel_breaker_shared_stats st[2];
    do {
      uv_run(&loop, UV_RUN_ONCE);
      for (int i = 0; i < 2; i++) keel_breaker_shared_get_stats(n[i].sh, &st[i]);
    } while (!(st[0].subscribed && st[1].subscribed && st[0].syncs > 0 && st[1].syncs > 0));
    for (int i = 0; i < 5; i++) {
      keel_breaker_permit p;
      if (keel_breaker_acquire(n[0].b, &p) == 0) keel_breaker_release(&p, -5, 0);
    }
    uint64_t start = uv_hrtime();
    while (n[1].opened_ns == 0 && uv_hrtime() - start < 5000000000ull) uv_run(&loop, UV_RUN_ONCE);
    ms[round] = n[1].opened_ns != 0 ? (double)(n[1].opened_ns - n[0].opened_ns) / 1e6 : 5000.0;
    for (int i = 0; i < 2; i++) {
      keel_breaker_shared_close(n[i].sh, NULL, NULL);
      keel_breaker_close(n[i].b, NULL, NULL);
      keel_redis_close(n[i].r, NULL, NULL);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  uv_loop_close(&loop);
  qsort(ms, IDEM_OPEN_ROUNDS, sizeof(double), idem_cmp_double);
  *p50_ms = ms[IDEM_OPEN_ROUNDS / 2];
  *max_ms = ms[IDEM_OPEN_ROUNDS - 1];
}

/* Runs parts (b) and (c); addr "host:port" or NULL. Replaces keel's
 * allocator (counting): call it after every keel object of before is gone. */
static void idem_bench(const char *addr, double *pairs, double *floor_pairs, double *breaker_ns,
                       double *breaker_allocs) {
  if (addr != NULL) {
    const char *colon = strrchr(addr, ':');
    if (colon != NULL && (size_t)(colon - addr) < sizeof idem_host) {
      memcpy(idem_host, addr, (size_t)(colon - addr));
      idem_host[colon - addr] = '\0';
      idem_port = (int)strtol(colon + 1, NULL, 10);
    }
  }
  keel_replace_allocator(idem_count_malloc, idem_count_realloc, idem_count_calloc, free);
  double k[IDEM_RUNS], f[IDEM_RUNS];
  for (int i = 0; i < IDEM_RUNS; i++) {
    /* Alternate so that the machine's load hits both alike. */
    f[i] = idem_floor_run(i);
    k[i] = idem_keel_run(i);
    fprintf(stderr, "  idem run %d: keel %.0f pairs/s, floor %.0f pairs/s (%.2f)\n", i, k[i], f[i],
            k[i] / f[i]);
  }
  qsort(k, IDEM_RUNS, sizeof(double), idem_cmp_double);
  qsort(f, IDEM_RUNS, sizeof(double), idem_cmp_double);
  double unshared;
  *breaker_ns = idem_breaker_run(breaker_allocs, &unshared);
  *pairs = k[IDEM_RUNS / 2];
  *floor_pairs = f[IDEM_RUNS / 2];
  printf("idem begin+complete: %.0f pairs/s, floor %.0f pairs/s, ratio %.2f (bar >= 0.85)\n",
         *pairs, *floor_pairs, *pairs / *floor_pairs);
  printf(
      "shared breaker closed path: %.2f ns/call over a bare call (the same breaker unshared: "
      "%.2f ns), %.6f allocs/call in the loop, syncs included (bar <= 15 ns, 0)\n",
      *breaker_ns, unshared, *breaker_allocs);
  double open_p50, open_max;
  idem_open_together(&open_p50, &open_max);
  printf(
      "shared breaker open-together: the other process opened %.3f ms (median; worst %.3f ms) "
      "after the one that tripped, by broadcast (sync interval 10 s)\n",
      open_p50, open_max);
}

#endif
