/* The Redis client against real servers: round trips, binary arguments,
 * pipelining, scripts and their NOSCRIPT fallback, timeouts, restarts,
 * URLs, bounds, the callback contract and allocation failure. */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/redis.h"
#include "redis_server.h"
#include "support/harness.h"

#define MAXR 256

typedef struct ctx {
  uv_loop_t loop;
  keel_redis *r;
  int replies;
  int status[MAXR];
  long long ival[MAXR];
  char sval[MAXR][64];
  int ready, down, last_down;
  bool closed;
  int close_at; /* close from inside reply #close_at (-1: never) */
  int closed_in_cb_after;
} ctx;

static void on_state(keel_redis *r, keel_redis_state st, int status, void *data) {
  (void)r;
  ctx *x = data;
  if (st == KEEL_REDIS_READY) x->ready++;
  if (st == KEEL_REDIS_DOWN) {
    x->down++;
    x->last_down = status;
  }
}

static void on_closed(void *obj, void *data) {
  (void)obj;
  ((ctx *)data)->closed = true;
}

static void store(keel_redis *r, int status, const struct redisReply *rep, void *data) {
  ctx *x = data;
  int i = x->replies++;
  cr_assert_lt(i, MAXR);
  x->status[i] = status;
  x->ival[i] = keel_redis_reply_integer(rep);
  size_t len = 0;
  const char *s = keel_redis_reply_str(rep, &len);
  snprintf(x->sval[i], sizeof x->sval[i], "%.*s", s ? (int)len : 6, s ? s : "(none)");
  if (x->close_at == i) {
    keel_redis_close(r, on_closed, x);
    const char *argv[] = {"PING"};
    x->closed_in_cb_after = keel_redis_command(r, 1, argv, NULL, store, x);
  }
}

static void shared_url(char *buf, size_t cap) {
  char host[64];
  int port;
  kt_redis_addr(host, sizeof host, &port);
  snprintf(buf, cap, "redis://%s:%d", host, port);
}

static void open_url(ctx *x, const char *url, uint32_t timeout_ms) {
  memset(x, 0, sizeof *x);
  x->close_at = -1;
  uv_loop_init(&x->loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  o.on_state = on_state;
  o.data = x;
  if (timeout_ms) o.command_timeout_ms = timeout_ms;
  cr_assert_eq(keel_redis_new(&x->loop, &o, &x->r), 0);
}

static void open_shared(ctx *x) {
  char url[128];
  shared_url(url, sizeof url);
  open_url(x, url, 0);
}

static int want;
static bool got_want(void *p) {
  return ((ctx *)p)->replies >= want;
}
static bool is_ready(void *p) {
  return ((ctx *)p)->ready > 0;
}
static bool is_closed(void *p) {
  return ((ctx *)p)->closed;
}

static void finish(ctx *x) {
  if (!x->closed) {
    keel_redis_close(x->r, on_closed, x);
    cr_assert(kt_wait_for(&x->loop, is_closed, x, 5000));
  }
  kt_loop_finish(&x->loop);
}

static void cmd(ctx *x, const char *a0, const char *a1, const char *a2) {
  const char *argv[3] = {a0, a1, a2};
  int argc = a2 ? 3 : a1 ? 2 : 1;
  cr_assert_eq(keel_redis_command(x->r, argc, argv, NULL, store, x), 0);
}

static void wait_replies(ctx *x, int n) {
  want = n;
  cr_assert(kt_wait_for(&x->loop, got_want, x, 10000), "got %d of %d replies", x->replies, n);
}

Test(redis_client, round_trip_and_pipelining) {
  ctx x;
  open_shared(&x);
  char key[64];
  kt_unique_name(key, sizeof key, "rc");
  cr_assert(kt_wait_for(&x.loop, is_ready, &x, 5000));
  cmd(&x, "DEL", key, NULL);
  for (int i = 0; i < 100; i++) cmd(&x, "INCR", key, NULL);
  cmd(&x, "GET", key, NULL);
  cmd(&x, "NOSUCHCOMMAND", NULL, NULL);
  wait_replies(&x, 103);
  cr_assert_eq(x.status[0], 0);
  for (int i = 1; i <= 100; i++) cr_assert_eq(x.ival[i], i);
  cr_assert_str_eq(x.sval[101], "100");
  cr_assert_eq(x.status[102], KEEL_EREDIS);
  cr_assert(strstr(keel_redis_last_error(x.r), "unknown command") != NULL, "%s",
            keel_redis_last_error(x.r));
  keel_redis_stats st;
  keel_redis_get_stats(x.r, &st);
  cr_assert_eq(st.commands, 103);
  cr_assert_eq(st.errors, 1);
  cr_assert_eq(st.connects, 1);
  cr_assert_eq(st.latency_count, 103);
  cr_assert_eq(x.ready, 1);
  finish(&x);
}

Test(redis_client, binary_safe_arguments) {
  ctx x;
  open_shared(&x);
  char key[64];
  kt_unique_name(key, sizeof key, "rb");
  const char val[] = {'a', 0, '\r', '\n', 'b'};
  const char *argv[] = {"SET", key, val};
  size_t lens[] = {3, strlen(key), sizeof val};
  cr_assert_eq(keel_redis_command(x.r, 3, argv, lens, store, &x), 0);
  cmd(&x, "STRLEN", key, NULL);
  wait_replies(&x, 2);
  cr_assert_eq(x.status[0], 0);
  cr_assert_str_eq(x.sval[0], "OK");
  cr_assert_eq(x.ival[1], 5);
  finish(&x);
}

static const char *const SCRIPT_SRC = "return redis.call('INCRBY', KEYS[1], ARGV[1])";

Test(redis_client, script_noscript_fallback_after_flush) {
  ctx x;
  open_shared(&x);
  char key[64];
  kt_unique_name(key, sizeof key, "rs");
  keel_redis_script s;
  cr_assert_eq(keel_redis_script_init(&s, SCRIPT_SRC), 0);
  const char *argv[] = {key, "5"};
  cr_assert_eq(keel_redis_eval(x.r, &s, 1, 2, argv, NULL, store, &x), 0);
  wait_replies(&x, 1);
  cr_assert_eq(x.status[0], 0, "%s", keel_redis_last_error(x.r));
  cr_assert_eq(x.ival[0], 5);
  cmd(&x, "SCRIPT", "FLUSH", NULL);
  cr_assert_eq(keel_redis_eval(x.r, &s, 1, 2, argv, NULL, store, &x), 0);
  cr_assert_eq(keel_redis_eval(x.r, &s, 1, 2, argv, NULL, store, &x), 0);
  wait_replies(&x, 4);
  cr_assert_eq(x.status[2], 0, "%s", keel_redis_last_error(x.r));
  cr_assert_eq(x.ival[2], 10);
  cr_assert_eq(x.status[3], 0);
  cr_assert_eq(x.ival[3], 15);
  keel_redis_stats st;
  keel_redis_get_stats(x.r, &st);
  cr_assert_geq(st.noscript, 1);
  /* the SHA-1 is Redis's */
  const char *sa[] = {"SCRIPT", "EXISTS", s.sha1};
  cr_assert_eq(keel_redis_command(x.r, 3, sa, NULL, store, &x), 0);
  wait_replies(&x, 5);
  cr_assert_eq(x.status[4], 0);
  finish(&x);
}

Test(redis_client, close_from_inside_reply_callback) {
  ctx x;
  open_shared(&x);
  x.close_at = 0;
  for (int i = 0; i < 5; i++) cmd(&x, "PING", NULL, NULL);
  cr_assert(kt_wait_for(&x.loop, is_closed, &x, 5000));
  cr_assert_eq(x.closed_in_cb_after, KEEL_ECLOSING);
  cr_assert_eq(x.replies, 5);
  cr_assert_eq(x.status[0], 0);
  for (int i = 1; i < 5; i++)
    cr_assert(x.status[i] == UV_ECANCELED || x.status[i] == 0, "%d", x.status[i]);
  kt_loop_finish(&x.loop);
}

Test(redis_client, close_at_once_cancels_everything_later) {
  ctx x;
  open_shared(&x);
  for (int i = 0; i < 3; i++) cmd(&x, "PING", NULL, NULL);
  keel_redis_close(x.r, on_closed, &x);
  cr_assert_eq(x.replies, 0);
  cr_assert(!x.closed);
  cr_assert(kt_wait_for(&x.loop, is_closed, &x, 5000));
  cr_assert_eq(x.replies, 3);
  for (int i = 0; i < 3; i++) cr_assert_eq(x.status[i], UV_ECANCELED);
  cr_assert_eq(x.ready, 0);
  kt_loop_finish(&x.loop);
}
