/* The Redis client against real servers: round trips, binary arguments,
 * pipelining, scripts and their NOSCRIPT fallback, timeouts, restarts,
 * URLs, bounds, the callback contract and allocation failure. */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/breaker.h"
#include "keel/breaker_shared.h"
#include "keel/idempotency.h"
#include "keel/ratelimit.h"
#include "keel/redis.h"
#include "redis/redis_internal.h"
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
  kt_redis_url(url, sizeof url);
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

/* docs/redis.md shows the lock scripts keel runs, verbatim. */
Test(redis_client, docs_show_the_lock_scripts) {
  FILE *f = fopen(KT_SOURCE_ROOT "/docs/redis.md", "rb");
  cr_assert(f != NULL);
  static char doc[65536];
  size_t n = fread(doc, 1, sizeof doc - 1, f);
  fclose(f);
  doc[n] = '\0';
  for (int i = 0; i < 3; i++)
    cr_assert(strstr(doc, keel__redis_lock_script(i)) != NULL, "script %d not in docs/redis.md", i);
}

Test(redis_client, sha1_is_redis_sha1) {
  keel_redis_script s;
  cr_assert_eq(keel_redis_script_init(&s, ""), 0);
  cr_assert_str_eq(s.sha1, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  cr_assert_eq(keel_redis_script_init(&s, "abc"), 0);
  cr_assert_str_eq(s.sha1, "a9993e364706816aba3e25717850c26c9cd0d89d");
  /* 56 bytes: the padding spills into a second block */
  cr_assert_eq(
      keel_redis_script_init(&s, "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"), 0);
  cr_assert_str_eq(s.sha1, "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
  cr_assert_eq(keel_redis_script_init(NULL, "x"), UV_EINVAL);
  cr_assert_eq(keel_redis_script_init(&s, NULL), UV_EINVAL);
}

/* ---- URLs, AUTH / SELECT, bounds, refusals ------------------------------- */

static bool is_down(void *p) {
  return ((ctx *)p)->down > 0;
}

Test(redis_client, url_auth_and_select_on_a_unix_socket) {
  kt_redis_server s;
  kt_redis_server_start(&s);
  cr_assert_neq(kt_redis_server_cmd(&s, "CONFIG SET requirepass s3cr@t"), -1);
  char url[256];
  snprintf(url, sizeof url, "unix://:s3cr%%40t@%s?db=3", s.path);
  ctx x;
  open_url(&x, url, 0);
  cmd(&x, "SET", "where", "db3");
  cmd(&x, "DBSIZE", NULL, NULL);
  wait_replies(&x, 2);
  cr_assert_eq(x.status[0], 0, "%s", keel_redis_last_error(x.r));
  cr_assert_eq(x.ival[1], 1);
  finish(&x);
  snprintf(url, sizeof url, "unix://:s3cr%%40t@%s", s.path); /* db 0: empty */
  open_url(&x, url, 0);
  cmd(&x, "DBSIZE", NULL, NULL);
  wait_replies(&x, 1);
  cr_assert_eq(x.status[0], 0);
  cr_assert_eq(x.ival[0], 0);
  finish(&x);
  /* a wrong password: DOWN with KEEL_EAUTH, the command waits, then times out */
  snprintf(url, sizeof url, "unix://:wrong@%s", s.path);
  open_url(&x, url, 300);
  cmd(&x, "PING", NULL, NULL);
  cr_assert(kt_wait_for(&x.loop, is_down, &x, 5000));
  cr_assert_eq(x.last_down, KEEL_EAUTH, "%s", keel_err_name(x.last_down));
  wait_replies(&x, 1);
  cr_assert_eq(x.status[0], UV_ETIMEDOUT);
  cr_assert_eq(x.ready, 0);
  finish(&x);
  kt_redis_server_destroy(&s);
}

Test(redis_client, urls_refused) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  keel_redis *r = (keel_redis *)&loop; /* never written on failure */
  const char *bad[] = {"http://x",        "redis://",     "redis://h:0",          "redis://h:99999",
                       "redis://h:12x",   "redis://h/db", "redis://h/70000",      "redis://u@h",
                       "redis://:p%zz@h", "unix://",      "unix://relative.sock", "unix:///s?db=x",
                       "unix:///s?foo=1", "redis://[::1", "redis://h:1/2/3"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    o.url = bad[i];
    cr_assert_eq(keel_redis_new(&loop, &o, &r), UV_EINVAL, "%s accepted", bad[i]);
  }
  cr_assert_eq(r, (keel_redis *)&loop);
  o.url = NULL;
  cr_assert_eq(keel_redis_new(&loop, &o, &r), UV_EINVAL);
  cr_assert_eq(keel_redis_new(NULL, &o, &r), UV_EINVAL);
  const char *good[] = {"redis://127.0.0.1", "redis://[::1]:7000/2", "redis://u:p@h:1/0",
                        "unix:///tmp/x.sock?db=2", "unix://:pw@/tmp/x.sock"};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    o.url = good[i];
    o.reconnect = false;
    cr_assert_eq(keel_redis_new(&loop, &o, &r), 0, "%s refused", good[i]);
    keel_redis_close(r, NULL, NULL);
  }
  kt_loop_finish(&loop);
}

Test(redis_client, bounds_and_refused_commands) {
  char url[128];
  kt_redis_url(url, sizeof url);
  ctx x;
  memset(&x, 0, sizeof x);
  x.close_at = -1;
  uv_loop_init(&x.loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  o.max_pending = 2;
  cr_assert_eq(keel_redis_new(&x.loop, &o, &x.r), 0);
  cmd(&x, "PING", NULL, NULL);
  cmd(&x, "PING", NULL, NULL);
  const char *argv[] = {"PING"};
  cr_assert_eq(keel_redis_command(x.r, 1, argv, NULL, store, &x), UV_ENOBUFS);
  const char *sub[] = {"subscribe", "ch"};
  cr_assert_eq(keel_redis_command(x.r, 2, sub, NULL, store, &x), UV_EINVAL);
  cr_assert_eq(keel_redis_command(x.r, 0, argv, NULL, store, &x), UV_EINVAL);
  cr_assert_eq(keel_redis_command(NULL, 1, argv, NULL, store, &x), UV_EINVAL);
  const char *nul[] = {"GET", NULL};
  cr_assert_eq(keel_redis_command(x.r, 2, nul, NULL, store, &x), UV_EINVAL);
  keel_redis_script s;
  keel_redis_script_init(&s, "return 1");
  cr_assert_eq(keel_redis_eval(x.r, &s, 2, 1, argv, NULL, store, &x), UV_EINVAL);
  cr_assert_eq(keel_redis_eval(x.r, NULL, 0, 0, NULL, NULL, store, &x), UV_EINVAL);
  wait_replies(&x, 2);
  cr_assert_eq(keel_redis_eval(x.r, &s, 0, 0, NULL, NULL, store, &x), 0);
  wait_replies(&x, 3);
  cr_assert_eq(x.ival[2], 1);
  cr_assert_eq(keel_redis_get_state(NULL), KEEL_REDIS_DOWN);
  cr_assert_str_eq(keel_redis_last_error(NULL), "");
  keel_redis_get_stats(NULL, NULL);
  keel_redis_close(NULL, NULL, NULL);
  finish(&x);
}

/* R2: (P)UNSUBSCRIBE through the command call were queued but never
 * answered, stalling every command behind them until the timeout; HELLO
 * and CLIENT REPLY break the one-reply-per-command protocol too. */
Test(redis_client, unsubscribe_hello_client_reply_refused_in_any_case) {
  ctx x;
  open_shared(&x);
  const char *one[][3] = {
      {"UNSUBSCRIBE", "ch", NULL}, {"punsubscribe", "p*", NULL}, {"SUnsubscribe", "ch", NULL},
      {"unsubscribe", NULL, NULL}, {"HELLO", "3", NULL},         {"hello", NULL, NULL},
      {"CLIENT", "REPLY", "OFF"},  {"client", "reply", "skip"},  {"Client", "Reply", "ON"},
      {"monitor", NULL, NULL},     {"Quit", NULL, NULL},         {"ssubscribe", "ch", NULL}};
  for (size_t i = 0; i < sizeof one / sizeof one[0]; i++) {
    int argc = one[i][2] ? 3 : one[i][1] ? 2 : 1;
    cr_assert_eq(keel_redis_command(x.r, argc, one[i], NULL, store, &x), UV_EINVAL,
                 "%s %s accepted", one[i][0], one[i][1] ? one[i][1] : "");
  }
  /* binary-safe lengths: "UNSUBSCRIBE" out of a longer buffer */
  const char *bin[] = {"UNSUBSCRIBEXYZ"};
  size_t binlen[] = {11};
  cr_assert_eq(keel_redis_command(x.r, 1, bin, binlen, store, &x), UV_EINVAL);
  /* not refused: other CLIENT subcommands, a longer name */
  const char *cl[] = {"CLIENT", "ID"};
  cr_assert_eq(keel_redis_command_timeout(x.r, 10000, 2, cl, NULL, store, &x), 0);
  cmd(&x, "PING", NULL, NULL);
  wait_replies(&x, 2);
  cr_assert_eq(x.status[0], 0);
  cr_assert_gt(x.ival[0], 0);
  cr_assert_eq(x.status[1], 0);
  cr_assert_str_eq(x.sval[1], "PONG");
  finish(&x);
}

/* R4: an empty password (redis://:@host) sent AUTH "" and the client
 * stayed DOWN with KEEL_EAUTH; an upper-case scheme was refused. */
Test(redis_client, empty_password_means_no_auth_and_scheme_in_any_case) {
  char host[64];
  int port;
  kt_redis_addr(host, sizeof host, &port);
  const char *fmts[] = {"redis://:@%s:%d", "REDIS://%s:%d", "Redis://:@%s:%d/0"};
  for (size_t i = 0; i < sizeof fmts / sizeof fmts[0]; i++) {
    char url[160];
    snprintf(url, sizeof url, fmts[i], host, port);
    ctx x;
    open_url(&x, url, 5000);
    cmd(&x, "PING", NULL, NULL);
    wait_replies(&x, 1);
    cr_assert_eq(x.status[0], 0, "%s: %s (%s)", url, keel_err_name(x.status[0]),
                 keel_redis_last_error(x.r));
    cr_assert_str_eq(x.sval[0], "PONG");
    cr_assert_eq(x.down, 0, "%s: DOWN %s", url, keel_err_name(x.last_down));
    finish(&x);
  }
  /* unix:// in any case, with an empty password, on an own server */
  kt_redis_server s;
  kt_redis_server_start(&s);
  char url[256];
  snprintf(url, sizeof url, "UNIX://:@%s", s.path);
  ctx x;
  open_url(&x, url, 5000);
  cmd(&x, "PING", NULL, NULL);
  wait_replies(&x, 1);
  cr_assert_eq(x.status[0], 0, "%s", keel_err_name(x.status[0]));
  cr_assert_eq(x.down, 0);
  finish(&x);
  kt_redis_server_destroy(&s);
  /* a user needs a non-empty password */
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  keel_redis *r = (keel_redis *)&loop;
  o.url = "redis://u:@h";
  cr_assert_eq(keel_redis_new(&loop, &o, &r), UV_EINVAL);
  o.url = "redisx://h";
  cr_assert_eq(keel_redis_new(&loop, &o, &r), UV_EINVAL);
  cr_assert_eq(r, (keel_redis *)&loop);
  kt_loop_finish(&loop);
}

static void count_close(void *obj, void *data) {
  (void)obj;
  (*(int *)data)++;
}

/* R5: objects created on a client whose close began: one code, nothing
 * created, *out untouched. */
Test(redis_client, creating_on_a_closing_client_is_eclosing) {
  ctx x;
  open_shared(&x);
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  keel_breaker *b = NULL;
  cr_assert_eq(keel_breaker_new(&x.loop, &bo, &b), 0);
  keel_redis_close(x.r, on_closed, &x);
  x.closed = false;
  keel_breaker_shared_opts so;
  keel_breaker_shared_opts_init(&so);
  so.name = "closing";
  keel_breaker_shared *sh = (keel_breaker_shared *)&so;
  cr_assert_eq(keel_breaker_shared_new(&x.loop, b, x.r, &so, &sh), KEEL_ECLOSING);
  cr_assert_eq(sh, (keel_breaker_shared *)&so);
  keel_idem *idem = (keel_idem *)&so;
  cr_assert_eq(keel_idem_new_redis(&x.loop, x.r, NULL, &idem), KEEL_ECLOSING);
  cr_assert_eq(idem, (keel_idem *)&so);
  keel_ratelimit_redis_opts ro;
  keel_ratelimit_redis_opts_init(&ro);
  keel_ratelimit_redis *rl = (keel_ratelimit_redis *)&so;
  cr_assert_eq(keel_ratelimit_redis_new(x.r, &ro, &rl), KEEL_ECLOSING);
  cr_assert_eq(rl, (keel_ratelimit_redis *)&so);
  cr_assert(kt_wait_for(&x.loop, is_closed, &x, 5000));
  int bclosed = 0;
  keel_breaker_close(b, count_close, &bclosed);
  kt_loop_finish(&x.loop);
  cr_assert_eq(bclosed, 1);
}

Test(redis_client, waiting_command_times_out_unsent_and_no_reconnect_fails_fast) {
  kt_redis_server s;
  kt_redis_server_start(&s);
  ctx x;
  memset(&x, 0, sizeof x);
  x.close_at = -1;
  uv_loop_init(&x.loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = s.url;
  o.reconnect = false;
  o.on_state = on_state;
  o.data = &x;
  cr_assert_eq(keel_redis_new(&x.loop, &o, &x.r), 0);
  cr_assert(kt_wait_for(&x.loop, is_ready, &x, 5000));
  kt_redis_server_stop(&s);
  cr_assert(kt_wait_for(&x.loop, is_down, &x, 5000));
  const char *argv[] = {"PING"};
  cr_assert_eq(keel_redis_command(x.r, 1, argv, NULL, store, &x), KEEL_ECONN);
  finish(&x);
  /* with reconnects: a command waiting for the server times out, never sent */
  open_url(&x, s.url, 200);
  cmd(&x, "PING", NULL, NULL);
  wait_replies(&x, 1);
  cr_assert_eq(x.status[0], UV_ETIMEDOUT);
  keel_redis_stats st;
  keel_redis_get_stats(x.r, &st);
  cr_assert_eq(st.timeouts, 1);
  cr_assert_eq(st.in_doubt, 0);
  cr_assert_geq(x.down, 1);
  finish(&x);
  kt_redis_server_destroy(&s);
}

/* Close from the DOWN callback while hiredis frees the lost context. */
static void close_on_down(keel_redis *r, keel_redis_state st, int status, void *data) {
  ctx *x = data;
  on_state(r, st, status, data);
  if (st == KEEL_REDIS_DOWN) keel_redis_close(r, on_closed, x);
}

Test(redis_client, close_from_state_callback_on_connection_loss) {
  kt_redis_server s;
  kt_redis_server_start(&s);
  ctx x;
  memset(&x, 0, sizeof x);
  x.close_at = -1;
  uv_loop_init(&x.loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = s.url;
  o.on_state = close_on_down;
  o.data = &x;
  cr_assert_eq(keel_redis_new(&x.loop, &o, &x.r), 0);
  cr_assert(kt_wait_for(&x.loop, is_ready, &x, 5000));
  cmd(&x, "DEBUG", "SLEEP", "1");
  cmd(&x, "PING", NULL, NULL);
  kt_wait_for(&x.loop, is_closed, &x, 100); /* sent */
  kt_redis_server_stop(&s);
  cr_assert(kt_wait_for(&x.loop, is_closed, &x, 5000));
  cr_assert_eq(x.replies, 2);
  for (int i = 0; i < 2; i++)
    cr_assert(x.status[i] == KEEL_EINDOUBT || x.status[i] == UV_ECANCELED, "%s",
              keel_err_name(x.status[i]));
  kt_loop_finish(&x.loop);
  kt_redis_server_destroy(&s);
}

/* ---- allocation failure ----------------------------------------------------- */

typedef struct fmc {
  uv_loop_t loop;
  keel_redis *r;
  int replies, closed;
} fmc;

static void fmc_closed(void *o, void *d) {
  (void)o;
  ((fmc *)d)->closed++;
}

static void fmc_reply(keel_redis *r, int status, const struct redisReply *rep, void *d) {
  (void)status;
  (void)rep;
  fmc *f = d;
  if (++f->replies == 3) keel_redis_close(r, fmc_closed, f);
}

static bool fmc_done(void *p) {
  return ((fmc *)p)->closed > 0;
}

static void fmc_scenario(void *arg) {
  (void)arg;
  fmc f;
  memset(&f, 0, sizeof f);
  uv_loop_init(&f.loop);
  char url[128];
  kt_redis_url(url, sizeof url);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  int rc = keel_redis_new(&f.loop, &o, &f.r);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    kt_loop_finish(&f.loop);
    return;
  }
  static keel_redis_script s;
  keel_redis_script_init(&s, "return 7");
  const char *argv[] = {"PING"};
  int accepted = 0;
  if (keel_redis_command(f.r, 1, argv, NULL, fmc_reply, &f) == 0) accepted++;
  if (keel_redis_eval(f.r, &s, 0, 0, NULL, NULL, fmc_reply, &f) == 0) accepted++;
  if (keel_redis_command(f.r, 1, argv, NULL, fmc_reply, &f) == 0) accepted++;
  if (accepted < 3) keel_redis_close(f.r, fmc_closed, &f);
  cr_assert(kt_wait_for(&f.loop, fmc_done, &f, 5000));
  cr_assert_eq(f.replies, accepted);
  cr_assert_eq(f.closed, 1);
  kt_loop_finish(&f.loop);
}

Test(redis_client, allocation_failure) {
  kt_failmalloc_run(fmc_scenario, NULL);
  cr_assert_gt(kt_failmalloc_count(), 3);
}
