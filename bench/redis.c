/*
 * bench/redis.c — keel's Redis layer against bare hiredis on the same loop.
 *
 *   (a) lock: acquire + release pairs per second, 64 lockers on distinct
 *       keys over one connection (keel_redis_lock_acquire / _release),
 *       against the floor: bare hiredis async (its stock libuv adapter) on
 *       the same loop sending the same two scripts by EVALSHA with the same
 *       concurrency and arguments. Bar: keel >= 0.85 x floor.
 *   (b) idempotency keys and (c) the shared breaker: added by the
 *       idempotency work (part 2 of issue 15); 0 until then.
 *
 * Each part runs keel and its floor alternately, ROUNDS times for
 * SECONDS each, and reports the median of each (the machine is shared:
 * compare the ratio within one run). Redis from env KEEL_TEST_REDIS
 * ("host:port", scripts/bench starts one). Last line:
 * redis lock_pairs_per_s=<x> lock_floor_per_s=<y> idem_pairs_per_s=<z>
 *   idem_floor_per_s=<w> shared_breaker_ns=<v>
 */
#include <keel.h>

#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "redis/redis_internal.h"

#define LOCKERS 64
#define ROUNDS 7
#define SECONDS 1.0

static char g_host[128] = "127.0.0.1";
static int g_port = 6379;

static void parse_addr(void) {
  const char *a = getenv("KEEL_TEST_REDIS");
  if (a == NULL) return;
  const char *colon = strrchr(a, ':');
  if (colon == NULL) return;
  snprintf(g_host, sizeof g_host, "%.*s", (int)(colon - a), a);
  g_port = (int)strtol(colon + 1, NULL, 10);
}

static double median(double *v, int n) {
  for (int i = 1; i < n; i++)
    for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
      double t = v[j];
      v[j] = v[j - 1];
      v[j - 1] = t;
    }
  return v[n / 2];
}

/* ---- (a) locks through keel --------------------------------------------- */

typedef struct klocker {
  struct kbench *b;
  char name[32];
} klocker;

typedef struct kbench {
  uv_loop_t *loop;
  keel_redis *r;
  klocker lockers[LOCKERS];
  keel_redis_lock_opts o;
  double deadline;
  long pairs;
  long failures;
  int running;
} kbench;

static void k_start(klocker *k);

static void k_released(keel_redis_lock *l, int status, void *data) {
  (void)l;
  klocker *k = data;
  if (status != 0) k->b->failures++;
  k->b->pairs++;
  k_start(k);
}

static void k_acquired(keel_redis_lock *l, int status, void *data) {
  klocker *k = data;
  if (status != 0 || keel_redis_lock_release(l, k_released, k) != 0) {
    k->b->failures++;
    k_start(k);
  }
}

static void k_start(klocker *k) {
  kbench *b = k->b;
  if (bench_now_s() >= b->deadline) {
    b->running--;
    return;
  }
  keel_redis_lock *l;
  if (keel_redis_lock_acquire(b->r, k->name, &b->o, k_acquired, k, &l) != 0) {
    b->failures++;
    b->running--;
  }
}

static double run_keel_locks(uv_loop_t *loop, keel_redis *r) {
  kbench b;
  memset(&b, 0, sizeof b);
  b.loop = loop;
  b.r = r;
  keel_redis_lock_opts_init(&b.o);
  b.o.ttl_ms = 30000;
  double t0 = bench_now_s();
  b.deadline = t0 + SECONDS;
  b.running = LOCKERS;
  for (int i = 0; i < LOCKERS; i++) {
    b.lockers[i].b = &b;
    snprintf(b.lockers[i].name, sizeof b.lockers[i].name, "bench:%d", i);
    k_start(&b.lockers[i]);
  }
  while (b.running > 0) uv_run(loop, UV_RUN_ONCE);
  double t = bench_now_s() - t0;
  if (b.failures > 0) fprintf(stderr, "keel locks: %ld failures\n", b.failures);
  return (double)b.pairs / t;
}

/* ---- (a) floor: bare hiredis, same scripts ------------------------------------ */

typedef struct flocker {
  struct fbench *b;
  char key[48], fkey[56];
  char token[33];
} flocker;

typedef struct fbench {
  redisAsyncContext *ac;
  flocker lockers[LOCKERS];
  char acquire_sha[41], release_sha[41];
  double deadline;
  long pairs;
  long failures;
  int running;
} fbench;

static void f_start(flocker *f);

static void f_released(redisAsyncContext *ac, void *reply, void *data) {
  (void)ac;
  flocker *f = data;
  redisReply *rep = reply;
  if (rep == NULL || rep->type != REDIS_REPLY_INTEGER || rep->integer != 1) f->b->failures++;
  f->b->pairs++;
  f_start(f);
}

static void f_acquired(redisAsyncContext *ac, void *reply, void *data) {
  flocker *f = data;
  redisReply *rep = reply;
  if (rep == NULL || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
      rep->element[0]->integer != 1) {
    f->b->failures++;
    f_start(f);
    return;
  }
  const char *argv[] = {"EVALSHA", f->b->release_sha, "1", f->key, f->token};
  redisAsyncCommandArgv(ac, f_released, f, 5, argv, NULL);
}

static void f_start(flocker *f) {
  fbench *b = f->b;
  if (bench_now_s() >= b->deadline) {
    b->running--;
    return;
  }
  const char *argv[] = {"EVALSHA", b->acquire_sha, "2", f->key, f->fkey, f->token, "30000"};
  redisAsyncCommandArgv(b->ac, f_acquired, f, 7, argv, NULL);
}

static void f_connected(const redisAsyncContext *ac, int status) {
  (void)ac;
  if (status != REDIS_OK) {
    fprintf(stderr, "floor: connect failed\n");
    exit(1);
  }
}

static double run_floor_locks(uv_loop_t *loop, redisAsyncContext *ac) {
  fbench b;
  memset(&b, 0, sizeof b);
  b.ac = ac;
  keel_redis_script s;
  keel_redis_script_init(&s, keel__redis_lock_script(0));
  memcpy(b.acquire_sha, s.sha1, 41);
  keel_redis_script_init(&s, keel__redis_lock_script(1));
  memcpy(b.release_sha, s.sha1, 41);
  double t0 = bench_now_s();
  b.deadline = t0 + SECONDS;
  b.running = LOCKERS;
  for (int i = 0; i < LOCKERS; i++) {
    flocker *f = &b.lockers[i];
    f->b = &b;
    snprintf(f->key, sizeof f->key, "keel:lock:{floor:%d}", i);
    snprintf(f->fkey, sizeof f->fkey, "keel:lock:{floor:%d}:fence", i);
    snprintf(f->token, sizeof f->token, "%032x", (unsigned)(i * 2654435761u));
    f_start(f);
  }
  while (b.running > 0) uv_run(loop, UV_RUN_ONCE);
  double t = bench_now_s() - t0;
  if (b.failures > 0) fprintf(stderr, "floor locks: %ld failures\n", b.failures);
  return (double)b.pairs / t;
}

/* Loads the lock scripts (so neither side pays a NOSCRIPT round). */
static void load_scripts(void) {
  redisContext *c = redisConnect(g_host, g_port);
  if (c == NULL || c->err != 0) {
    fprintf(stderr, "cannot connect to Redis at %s:%d\n", g_host, g_port);
    exit(1);
  }
  for (int i = 0; i < 3; i++) {
    redisReply *rep = redisCommand(c, "SCRIPT LOAD %s", keel__redis_lock_script(i));
    if (rep == NULL || rep->type != REDIS_REPLY_STRING) exit(1);
    freeReplyObject(rep);
  }
  redisFree(c);
}

static bool g_ready;
static void on_state(keel_redis *r, keel_redis_state st, int status, void *data) {
  (void)r;
  (void)status;
  (void)data;
  if (st == KEEL_REDIS_READY) g_ready = true;
}

static void closed(void *o, void *d) {
  (void)o;
  *(bool *)d = true;
}

static void bench_locks(double *keel_out, double *floor_out) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char url[200];
  snprintf(url, sizeof url, "redis://%s:%d", g_host, g_port);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  o.on_state = on_state;
  o.command_timeout_ms = 10000;
  keel_redis *r;
  if (keel_redis_new(&loop, &o, &r) != 0) exit(1);
  while (!g_ready) uv_run(&loop, UV_RUN_ONCE);
  redisAsyncContext *ac = redisAsyncConnect(g_host, g_port);
  if (ac == NULL || ac->err != 0) exit(1);
  redisLibuvAttach(ac, &loop);
  redisAsyncSetConnectCallback(ac, f_connected);
  double k[ROUNDS], f[ROUNDS];
  for (int i = 0; i < ROUNDS; i++) {
    k[i] = run_keel_locks(&loop, r);
    f[i] = run_floor_locks(&loop, ac);
    printf("  round %d: keel %.0f pairs/s, floor %.0f pairs/s\n", i + 1, k[i], f[i]);
  }
  keel_redis_stats st;
  keel_redis_get_stats(r, &st);
  printf("  keel client: %llu commands, p50 %.0f us, p99 %.0f us\n",
         (unsigned long long)st.commands, st.latency_p50_us, st.latency_p99_us);
  bool done = false;
  keel_redis_close(r, closed, &done);
  redisAsyncFree(ac);
  uv_run(&loop, UV_RUN_DEFAULT);
  if (!done || uv_loop_close(&loop) != 0) fprintf(stderr, "loop not clean\n");
  *keel_out = median(k, ROUNDS);
  *floor_out = median(f, ROUNDS);
}

int main(void) {
  parse_addr();
  load_scripts();
  double lock = 0, lock_floor = 0;
  printf("(a) lock acquire+release pairs, %d lockers on distinct keys, one connection\n", LOCKERS);
  bench_locks(&lock, &lock_floor);
  printf("  median: keel %.0f pairs/s, floor %.0f pairs/s, ratio %.3f (bar >= 0.85)\n", lock,
         lock_floor, lock_floor > 0 ? lock / lock_floor : 0);
  /* (b) and (c): filled in by the idempotency work */
  double idem = 0, idem_floor = 0, shared_breaker_ns = 0;
  printf(
      "redis lock_pairs_per_s=%.0f lock_floor_per_s=%.0f idem_pairs_per_s=%.0f "
      "idem_floor_per_s=%.0f shared_breaker_ns=%.1f\n",
      lock, lock_floor, idem, idem_floor, shared_breaker_ns);
  return 0;
}
