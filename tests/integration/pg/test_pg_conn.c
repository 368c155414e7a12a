/* One connection's outcomes under faults, against the real server: replies
 * kept when the session dies before the sync, KEEL_EINDOUBT for statements
 * whose effect is unknown, transaction blocks never split across sessions,
 * statements libpq refuses, permanent connect errors, conninfo checks,
 * bounds, the callback contract and allocation failure. Connections are cut
 * at exact points of the server's reply stream by a proxy (pgproxy.c). */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/pg.h"
#include "pgproxy.h"
#include "support/harness.h"

#define MAXR 64

typedef struct ctx {
  uv_loop_t loop;
  keel_pg *c;
  pgproxy *proxy;
  char conninfo[256];
  int results;
  int statuses[MAXR];
  char values[MAXR][64];
  char errors[MAXR][256];
  int ups, downs, last_state_status;
  const char *then_sql; /* queued from the callback of result #then_at */
  int then_at;
} ctx;

static void on_state(keel_pg *c, bool up, int status, void *data) {
  (void)c;
  ctx *x = data;
  if (up)
    x->ups++;
  else
    x->downs++;
  x->last_state_status = status;
}

static void store(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  ctx *x = data;
  int i = x->results++;
  cr_assert_lt(i, MAXR);
  x->statuses[i] = status;
  const char *v = keel_pg_result_value(res, 0, 0);
  snprintf(x->values[i], sizeof x->values[i], "%s", v ? v : "(null)");
  snprintf(x->errors[i], sizeof x->errors[i], "%s", keel_pg_last_error(c));
  if (x->then_sql != NULL && x->then_at == i) {
    const char *sql = x->then_sql;
    x->then_sql = NULL;
    cr_assert_eq(keel_pg_query(c, sql, 0, NULL, store, x), 0);
  }
}

static void open_with(ctx *x, bool through_proxy, bool pipeline) {
  memset(x, 0, sizeof *x);
  uv_loop_init(&x->loop);
  snprintf(x->conninfo, sizeof x->conninfo, "%s", kt_pg_conninfo());
  if (through_proxy)
    x->proxy = pgproxy_start(&x->loop, kt_pg_conninfo(), x->conninfo, sizeof x->conninfo);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = x->conninfo;
  o.on_state = on_state;
  o.data = x;
  o.pipeline = pipeline;
  keel_backoff_fixed(&o.reconnect_backoff, 20);
  cr_assert_eq(keel_pg_new(&x->loop, &o, &x->c), 0);
}

static void wait_results(ctx *x, int n) {
  uint64_t start = uv_now(&x->loop);
  while (x->results < n && uv_now(&x->loop) - start < 10000) uv_run(&x->loop, UV_RUN_ONCE);
  cr_assert_eq(x->results, n, "results %d of %d", x->results, n);
}

static void wait_up(ctx *x, int ups) {
  uint64_t start = uv_now(&x->loop);
  while (x->ups < ups && uv_now(&x->loop) - start < 10000) uv_run(&x->loop, UV_RUN_ONCE);
  cr_assert_geq(x->ups, ups);
}

static void finish(ctx *x) {
  keel_pg_close(x->c, NULL, NULL);
  if (x->proxy != NULL) pgproxy_stop(x->proxy);
  kt_loop_finish(&x->loop);
}

static void make_table(char *name, size_t cap) {
  kt_unique_name(name, cap, "conn");
  char sql[256];
  snprintf(sql, sizeof sql, "CREATE TABLE %s (id int PRIMARY KEY)", name);
  kt_pg_exec(sql);
}

static long count_rows(const char *table) {
  char sql[160];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
  char *v = kt_pg_scalar(sql);
  long n = strtol(v, NULL, 10);
  free(v);
  return n;
}

static void query(ctx *x, const char *sql) {
  cr_assert_eq(keel_pg_query(x->c, sql, 0, NULL, store, x), 0, "%s", sql);
}

/* ---- issue 14: replies kept, KEEL_EINDOUBT, blocks bound to a session ---- */

/* The drill's double apply: COMMIT's reply arrived, the session died before
 * the pipeline's sync. The COMMIT succeeded and must be reported so. */
static void commit_reply_then_cut(bool pipeline) {
  ctx x;
  char t[64], sql[160];
  make_table(t, sizeof t);
  open_with(&x, true, pipeline);
  wait_up(&x, 1);
  pgproxy_cut_at(x.proxy, "COMMIT", true);
  query(&x, "BEGIN");
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1)", t);
  query(&x, sql);
  query(&x, "COMMIT");
  wait_results(&x, 3);
  cr_assert_eq(pgproxy_cuts(x.proxy), 1);
  cr_assert_eq(x.statuses[0], 0);
  cr_assert_eq(x.statuses[1], 0);
  cr_assert_eq(x.statuses[2], 0, "COMMIT whose reply arrived: %s (%s)",
               keel_err_name(x.statuses[2]), x.errors[2]);
  cr_assert_eq(count_rows(t), 1);
  /* The connection comes back and works. */
  query(&x, "SELECT 5");
  wait_results(&x, 4);
  cr_assert_eq(x.statuses[3], 0);
  cr_assert_geq(x.downs, 1);
  finish(&x);
}

Test(pg_conn, commit_reply_kept_when_session_dies_before_sync) {
  commit_reply_then_cut(true);
}

Test(pg_conn, commit_reply_kept_without_pipelining) {
  commit_reply_then_cut(false);
}

/* COMMIT sent, its reply lost: it did commit on the server, and keel must
 * say that it cannot know (never KEEL_ECONN, which would invite a retry). */
Test(pg_conn, commit_lost_in_flight_is_in_doubt) {
  ctx x;
  char t[64], sql[160];
  make_table(t, sizeof t);
  open_with(&x, true, true);
  wait_up(&x, 1);
  pgproxy_cut_at(x.proxy, "COMMIT", false);
  query(&x, "BEGIN");
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1)", t);
  query(&x, sql);
  query(&x, "COMMIT");
  wait_results(&x, 3);
  cr_assert_eq(x.statuses[2], KEEL_EINDOUBT, "%s", keel_err_name(x.statuses[2]));
  cr_assert(strstr(x.errors[2], "may or may not") != NULL, "%s", x.errors[2]);
  cr_assert_eq(count_rows(t), 1, "it did commit: in doubt was the truth");
  finish(&x);
}

/* An autocommit write whose reply was lost ran anyway: in doubt. */
Test(pg_conn, autocommit_write_lost_in_flight_is_in_doubt) {
  ctx x;
  char t[64], sql[160];
  make_table(t, sizeof t);
  open_with(&x, true, true);
  wait_up(&x, 1);
  pgproxy_cut_at(x.proxy, "INSERT", false);
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1)", t);
  query(&x, sql);
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], KEEL_EINDOUBT, "%s", keel_err_name(x.statuses[0]));
  cr_assert_eq(count_rows(t), 1);
  finish(&x);
}

/* An autocommit statement commits at its sync: its reply without the sync
 * is not a confirmed commit. */
Test(pg_conn, autocommit_reply_without_sync_is_in_doubt) {
  ctx x;
  char t[64], sql[160];
  make_table(t, sizeof t);
  open_with(&x, true, true);
  wait_up(&x, 1);
  pgproxy_cut_at(x.proxy, "INSERT", true);
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1)", t);
  query(&x, sql);
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], KEEL_EINDOUBT, "%s", keel_err_name(x.statuses[0]));
  finish(&x);
}

/* A statement of an open block lost with its session rolled back: KEEL_ECONN.
 * The COMMIT queued after it never runs alone on the next session. */
static void block_statement_lost(bool pipeline) {
  ctx x;
  char t[64], sql[160];
  make_table(t, sizeof t);
  open_with(&x, true, pipeline);
  wait_up(&x, 1);
  pgproxy_cut_at(x.proxy, "INSERT", false);
  query(&x, "BEGIN");
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1)", t);
  query(&x, sql);
  x.then_sql = "COMMIT"; /* queued from the INSERT's callback, after the loss */
  x.then_at = 1;
  wait_results(&x, 3);
  cr_assert_eq(x.statuses[0], 0);
  cr_assert_eq(x.statuses[1], KEEL_ECONN, "%s", keel_err_name(x.statuses[1]));
  cr_assert_eq(x.statuses[2], KEEL_ECONN, "COMMIT must not succeed alone: %s",
               keel_err_name(x.statuses[2]));
  wait_up(&x, 2);
  cr_assert_eq(count_rows(t), 0);
  /* Outside the block, statements run on the new session again. */
  query(&x, "SELECT 9");
  wait_results(&x, 4);
  cr_assert_eq(x.statuses[3], 0);
  finish(&x);
}

Test(pg_conn, block_statement_lost_is_econn_and_commit_never_runs_alone) {
  block_statement_lost(true);
}

Test(pg_conn, block_statement_lost_without_pipelining) {
  block_statement_lost(false);
}

/* Issue 14: with pipelining off, BEGIN lost before its reply, the INSERT and
 * COMMIT queued behind it (never sent) must fail, not run in autocommit on
 * the next session. */
Test(pg_conn, queued_block_never_runs_on_the_next_session) {
  ctx x;
  char t[64], sql[160];
  make_table(t, sizeof t);
  open_with(&x, true, false);
  wait_up(&x, 1);
  pgproxy_cut_at(x.proxy, "BEGIN", false);
  query(&x, "BEGIN");
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1)", t);
  query(&x, sql);
  query(&x, "COMMIT");
  wait_results(&x, 3);
  cr_assert_eq(x.statuses[0], KEEL_ECONN, "BEGIN: %s", keel_err_name(x.statuses[0]));
  cr_assert_eq(x.statuses[1], KEEL_ECONN, "INSERT: %s", keel_err_name(x.statuses[1]));
  cr_assert_eq(x.statuses[2], KEEL_ECONN, "COMMIT: %s", keel_err_name(x.statuses[2]));
  wait_up(&x, 2);
  query(&x, "SELECT 1");
  wait_results(&x, 4);
  cr_assert_eq(count_rows(t), 0, "the INSERT ran alone on the new session");
  finish(&x);
}

/* Pipelined BEGIN; INSERT; COMMIT all sent, the INSERT's reply lost: the
 * COMMIT went out too, so the INSERT's effect is as unknown as the COMMIT's. */
Test(pg_conn, block_with_commit_in_flight_is_in_doubt) {
  ctx x;
  char t[64], sql[160];
  make_table(t, sizeof t);
  open_with(&x, true, true);
  wait_up(&x, 1);
  pgproxy_cut_at(x.proxy, "INSERT", false);
  query(&x, "BEGIN");
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1)", t);
  query(&x, sql);
  query(&x, "COMMIT");
  wait_results(&x, 3);
  cr_assert_eq(x.statuses[1], KEEL_EINDOUBT, "%s", keel_err_name(x.statuses[1]));
  cr_assert_eq(x.statuses[2], KEEL_EINDOUBT, "%s", keel_err_name(x.statuses[2]));
  finish(&x);
}

/* An autocommit statement whose commit fails at its sync (a deferred
 * unique constraint) failed: never a success. */
Test(pg_conn, commit_time_error_of_an_autocommit_statement_is_its_outcome) {
  ctx x;
  char t[64], sql[256];
  kt_unique_name(t, sizeof t, "deferred");
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id int, CONSTRAINT %s_u UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)", t,
           t);
  kt_pg_exec(sql);
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1)", t);
  kt_pg_exec(sql);
  open_with(&x, false, true);
  query(&x, sql);
  query(&x, "SELECT 2");
  wait_results(&x, 2);
  cr_assert_eq(x.statuses[0], KEEL_EPG, "%s", keel_err_name(x.statuses[0]));
  cr_assert(strstr(x.errors[0], "23505") != NULL, "%s", x.errors[0]);
  cr_assert_eq(x.statuses[1], 0);
  cr_assert_str_eq(x.values[1], "2");
  cr_assert_eq(count_rows(t), 1);
  finish(&x);
}

/* ---- issue 13 #7: statements libpq refuses -------------------------------- */

Test(pg_conn, too_many_parameters_rejected_at_enqueue) {
  ctx x;
  open_with(&x, false, true);
  enum { N = 70000 };
  const char **values = calloc(N, sizeof *values);
  for (int i = 0; i < N; i++) values[i] = "1";
  cr_assert_eq(keel_pg_query(x.c, "SELECT $1", N, values, store, &x), UV_EINVAL);
  cr_assert(strstr(keel_pg_last_error(x.c), "65535") != NULL, "%s", keel_pg_last_error(x.c));
  cr_assert_eq(keel_pg_query_cached(x.c, "SELECT $1", N, values, store, &x), UV_EINVAL);
  cr_assert_eq(keel_pg_query(x.c, "SELECT $1", -1, values, store, &x), UV_EINVAL);
  free(values);
  query(&x, "SELECT 3");
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], 0);
  keel_pg_stats s;
  keel_pg_get_stats(x.c, &s);
  cr_assert_eq(s.reconnects, 0);
  cr_assert_eq(s.disconnects, 0);
  finish(&x);
}

/* A sent statement past its deadline: inside a block the reset rolls it
 * back (UV_ETIMEDOUT); in autocommit it may have run (KEEL_EINDOUBT). */
Test(pg_conn, timed_out_statement_in_a_block_is_certain) {
  ctx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.on_state = on_state;
  o.data = &x;
  o.query_timeout_ms = 300;
  keel_backoff_fixed(&o.reconnect_backoff, 20);
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  wait_up(&x, 1);
  query(&x, "BEGIN");
  query(&x, "SELECT pg_sleep(3)");
  query(&x, "ROLLBACK");
  wait_results(&x, 3);
  cr_assert_eq(x.statuses[0], 0);
  cr_assert_eq(x.statuses[1], UV_ETIMEDOUT, "%s", keel_err_name(x.statuses[1]));
  cr_assert_eq(x.statuses[2], KEEL_ECONN, "%s", keel_err_name(x.statuses[2]));
  wait_up(&x, 2);
  query(&x, "SELECT pg_sleep(3)");
  wait_results(&x, 4);
  cr_assert_eq(x.statuses[3], KEEL_EINDOUBT, "%s", keel_err_name(x.statuses[3]));
  cr_assert(strstr(x.errors[3], "timed out") != NULL, "%s", x.errors[3]);
  finish(&x);
}

/* ---- issue 13 #10: permanent connect errors ------------------------------- */

/* conninfo of the test server with one keyword replaced/added. */
static void conninfo_with(char *out, size_t cap, const char *extra) {
  snprintf(out, cap, "%s %s", kt_pg_conninfo(), extra);
}

static void open_opts(ctx *x, const char *conninfo, bool retry_permanent) {
  memset(x, 0, sizeof *x);
  uv_loop_init(&x->loop);
  snprintf(x->conninfo, sizeof x->conninfo, "%s", conninfo);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = x->conninfo;
  o.on_state = on_state;
  o.data = x;
  o.retry_permanent_errors = retry_permanent;
  keel_backoff_fixed(&o.reconnect_backoff, 10);
  cr_assert_eq(keel_pg_new(&x->loop, &o, &x->c), 0);
}

static void tick(uv_timer_t *t) {
  (void)t;
}

static void run_for(ctx *x, uint64_t ms) {
  uv_timer_t t;
  uv_timer_init(&x->loop, &t);
  uint64_t start = uv_now(&x->loop);
  uv_timer_start(&t, tick, 10, 10); /* wakes the loop */
  while (uv_now(&x->loop) - start < ms) uv_run(&x->loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&t, NULL);
  uv_run(&x->loop, UV_RUN_NOWAIT);
}

static void permanent_error(const char *extra, int code, const char *text) {
  char conninfo[256];
  conninfo_with(conninfo, sizeof conninfo, extra);
  ctx x;
  open_opts(&x, conninfo, false);
  query(&x, "SELECT 1");
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], code, "queued statement: %s (%s)", keel_err_name(x.statuses[0]),
               x.errors[0]);
  cr_assert(strstr(x.errors[0], text) != NULL, "%s", x.errors[0]);
  run_for(&x, 300);
  cr_assert_eq(x.downs, 1, "stops retrying: %d attempts", x.downs);
  cr_assert_eq(x.last_state_status, code);
  cr_assert_eq(x.ups, 0);
  cr_assert_eq(keel_pg_query(x.c, "SELECT 1", 0, NULL, store, &x), code);
  cr_assert(strstr(keel_pg_last_error(x.c), text) != NULL, "%s", keel_pg_last_error(x.c));
  keel_pg_stats s;
  keel_pg_get_stats(x.c, &s);
  cr_assert_eq(s.reconnects, 0);
  finish(&x);

  /* Told to keep trying: it does. */
  open_opts(&x, conninfo, true);
  uv_timer_t t;
  uv_timer_init(&x.loop, &t);
  uv_timer_start(&t, tick, 10, 10);
  uint64_t start = uv_now(&x.loop);
  while (x.downs < 3 && uv_now(&x.loop) - start < 10000) uv_run(&x.loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&t, NULL);
  cr_assert_geq(x.downs, 3, "retries: %d", x.downs);
  cr_assert_eq(x.last_state_status, code);
  finish(&x);
}

Test(pg_conn, missing_database_is_enodb_and_stops_retrying) {
  KT_SKIP_BEHIND_POOLER("the pooler answers the login itself, with its own errors");
  permanent_error("dbname=kt_no_such_database", KEEL_ENODB, "3D000");
}

Test(pg_conn, unknown_role_is_eauth_and_stops_retrying) {
  KT_SKIP_BEHIND_POOLER("the pooler answers the login itself, with its own errors");
  permanent_error("user=kt_no_such_role", KEEL_EAUTH, "28000");
}

static void on_silent_connection(uv_stream_t *server, int status) {
  (void)server;
  (void)status; /* never accepted, never answered */
}

Test(pg_conn, connect_timeout_says_what_happened) {
  ctx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  uv_tcp_t silent;
  uv_tcp_init(&x.loop, &silent);
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  cr_assert_eq(uv_tcp_bind(&silent, (const struct sockaddr *)&addr, 0), 0);
  cr_assert_eq(uv_listen((uv_stream_t *)&silent, 8, on_silent_connection), 0);
  struct sockaddr_storage name;
  int len = sizeof name;
  uv_tcp_getsockname(&silent, (struct sockaddr *)&name, &len);
  snprintf(x.conninfo, sizeof x.conninfo,
           "host=127.0.0.1 port=%d user=u dbname=d sslmode=disable gssencmode=disable",
           ntohs(((struct sockaddr_in *)&name)->sin_port));
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = x.conninfo;
  o.on_state = on_state;
  o.data = &x;
  o.connect_timeout_ms = 200;
  keel_backoff_fixed(&o.reconnect_backoff, 5000);
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  uint64_t start = uv_now(&x.loop);
  while (x.downs == 0 && uv_now(&x.loop) - start < 5000) uv_run(&x.loop, UV_RUN_ONCE);
  cr_assert_eq(x.downs, 1);
  cr_assert_eq(x.last_state_status, UV_ETIMEDOUT);
  cr_assert(strncmp(keel_pg_last_error(x.c), "connect timed out after 200 ms", 30) == 0, "%s",
            keel_pg_last_error(x.c));
  uv_close((uv_handle_t *)&silent, NULL);
  finish(&x);
}

/* ---- issue 13 #16: conninfo, no callback inside new, DNS off the loop ----- */

Test(pg_conn, bad_conninfo_is_einval_with_the_reason) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = "hots=localhost dbname=x";
  keel_pg *c = (keel_pg *)0x1;
  cr_assert_eq(keel_pg_new(&loop, &o, &c), UV_EINVAL);
  cr_assert_eq(c, (keel_pg *)0x1, "*out untouched");
  char why[256];
  cr_assert_eq(keel_pg_new_ex(&loop, &o, &c, why, sizeof why), UV_EINVAL);
  cr_assert(strstr(why, "hots") != NULL, "%s", why);
  o.conninfo = "postgresql://[::1";
  cr_assert_eq(keel_pg_new_ex(&loop, &o, &c, why, sizeof why), UV_EINVAL);
  cr_assert_neq(why[0], '\0');
  cr_assert_eq(c, (keel_pg *)0x1);
  kt_loop_finish(&loop);
}

Test(pg_conn, no_callback_inside_new_or_reset) {
  ctx x;
  open_opts(&x, "host=127.0.0.1 port=1 user=u dbname=d", false);
  cr_assert_eq(x.downs, 0, "on_state inside keel_pg_new");
  uint64_t start = uv_now(&x.loop);
  while (x.downs == 0 && uv_now(&x.loop) - start < 5000) uv_run(&x.loop, UV_RUN_ONCE);
  cr_assert_geq(x.downs, 1);
  finish(&x);

  /* reset with a statement in flight: nothing runs inside the call. */
  open_with(&x, false, true);
  wait_up(&x, 1);
  query(&x, "SELECT pg_sleep(2)");
  uv_run(&x.loop, UV_RUN_NOWAIT);
  int downs = x.downs;
  cr_assert_eq(keel_pg_reset(x.c), 0);
  cr_assert_eq(x.results, 0, "result callback inside keel_pg_reset");
  cr_assert_eq(x.downs, downs, "on_state inside keel_pg_reset");
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], KEEL_EINDOUBT, "%s", keel_err_name(x.statuses[0]));
  wait_up(&x, 2);
  query(&x, "SELECT 4");
  wait_results(&x, 2);
  cr_assert_eq(x.statuses[1], 0);
  keel_pg_close(x.c, NULL, NULL);
  cr_assert_eq(keel_pg_reset(x.c), KEEL_ECLOSING);
  kt_loop_finish(&x.loop);
}

Test(pg_conn, host_names_are_resolved_off_the_loop) {
  char port[16] = "5432";
  char *err = NULL;
  PQconninfoOption *opts = PQconninfoParse(kt_pg_conninfo(), &err);
  cr_assert_not_null(opts);
  for (PQconninfoOption *o = opts; o->keyword != NULL; o++)
    if (strcmp(o->keyword, "port") == 0 && o->val != NULL)
      snprintf(port, sizeof port, "%s", o->val);
  PQconninfoFree(opts);
  char conninfo[256];
  snprintf(conninfo, sizeof conninfo, "host=localhost port=%s user=postgres dbname=postgres", port);
  ctx x;
  open_opts(&x, conninfo, false);
  query(&x, "SELECT 6");
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], 0, "%s", x.errors[0]);
  cr_assert_str_eq(x.values[0], "6");
  finish(&x);

  /* A name that does not resolve: keel's lookup says so (libpq's own
   * blocking lookup would say "could not translate host name"). */
  open_opts(&x, "host=kt-no-such-host.invalid user=u dbname=d", false);
  uint64_t start = uv_now(&x.loop);
  while (x.downs == 0 && uv_now(&x.loop) - start < 8000) uv_run(&x.loop, UV_RUN_ONCE);
  cr_assert_geq(x.downs, 1);
  /* "could not resolve host ...", or "... (resolving the host name)" when
   * the resolver takes longer than connect_timeout_ms. */
  cr_assert(strstr(keel_pg_last_error(x.c), "resolv") != NULL, "%s", keel_pg_last_error(x.c));
  finish(&x);
}

/* ---- issue 13: bounds, ABI room ------------------------------------------- */

Test(pg_conn, max_pending_bounds_the_queue_while_disconnected) {
  keel_pg_opts o;
  memset(&o, 0x5a, sizeof o);
  keel_pg_opts_init(&o);
  cr_assert_eq(o.max_pending, 100000);
  cr_assert(!o.retry_permanent_errors);
  for (size_t i = 0; i < sizeof o.reserved_ / sizeof o.reserved_[0]; i++)
    cr_assert_eq(o.reserved_[i], 0);
  ctx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  o.conninfo = "host=127.0.0.1 port=1 user=u dbname=d";
  o.max_pending = 3;
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  for (int i = 0; i < 3; i++) query(&x, "SELECT 1");
  cr_assert_eq(keel_pg_query(x.c, "SELECT 1", 0, NULL, store, &x), KEEL_EFULL);
  cr_assert(strstr(keel_pg_last_error(x.c), "max_pending") != NULL, "%s", keel_pg_last_error(x.c));
  keel_pg_stats s;
  memset(&s, 0x5a, sizeof s);
  keel_pg_get_stats(x.c, &s);
  cr_assert_eq(s.queued, 3);
  for (size_t i = 0; i < sizeof s.reserved_ / sizeof s.reserved_[0]; i++)
    cr_assert_eq(s.reserved_[i], 0);
  finish(&x);
  cr_assert_eq(x.results, 3);
  for (int i = 0; i < 3; i++) cr_assert_eq(x.statuses[i], UV_ECANCELED);
}

/* ---- allocation failure over the main paths -------------------------------- */

typedef struct fm {
  uv_loop_t loop;
  int accepted[8];
  int called[8];
  int closed;
} fm;

static void fm_result(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)status;
  (void)res;
  ++*(int *)data;
}

static void fm_closed(void *object, void *data) {
  (void)object;
  ++*(int *)data;
}

static bool fm_all_called(const fm *f, int upto) {
  for (int i = 0; i < upto; i++)
    if (f->accepted[i] && f->called[i] == 0) return false;
  return true;
}

static void fm_queue(fm *f, keel_pg *c, int i, const char *sql, bool cached) {
  const char *params[] = {"7"};
  int nparams = strchr(sql, '$') != NULL ? 1 : 0;
  int rc = (cached ? keel_pg_query_cached : keel_pg_query)(c, sql, nparams, params, fm_result,
                                                           &f->called[i]);
  if (rc == 0)
    f->accepted[i] = 1;
  else
    cr_assert_eq(rc, UV_ENOMEM, "query %d: %s", i, keel_err_name(rc));
}

/* Connect, a query, pipelined and cached queries, then close with queries
 * still queued: every accepted statement's callback runs exactly once, the
 * close callback once, nothing leaks (kt_failmalloc_run checks), and the
 * loop closes. */
static void pg_scenario(void *arg) {
  fm f;
  memset(&f, 0, sizeof f);
  uv_loop_init(&f.loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = arg;
  o.health_check_interval_ms = 0;
  keel_backoff_fixed(&o.reconnect_backoff, 5);
  keel_pg *c = (keel_pg *)0x1;
  int rc = keel_pg_new(&f.loop, &o, &c);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    cr_assert_eq(c, (keel_pg *)0x1);
    kt_loop_finish(&f.loop);
    return;
  }
  fm_queue(&f, c, 0, "SELECT 1", false);
  fm_queue(&f, c, 1, "SELECT 2", false);
  fm_queue(&f, c, 2, "SELECT $1::int", true);
  fm_queue(&f, c, 3, "SELECT 3", false);
  uv_timer_t t;
  uv_timer_init(&f.loop, &t);
  uv_timer_start(&t, tick, 5, 5);
  uint64_t start = uv_now(&f.loop);
  while (!fm_all_called(&f, 4) && uv_now(&f.loop) - start < 400) uv_run(&f.loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&t, NULL);
  fm_queue(&f, c, 4, "SELECT $1::int", true);
  fm_queue(&f, c, 5, "SELECT 5", false);
  keel_pg_close(c, fm_closed, &f.closed);
  cr_assert_eq(f.closed, 0, "close callback inside close");
  kt_loop_finish(&f.loop);
  cr_assert_eq(f.closed, 1);
  for (int i = 0; i < 6; i++)
    cr_assert_eq(f.called[i], f.accepted[i], "statement %d: called %d, accepted %d (run %lld)", i,
                 f.called[i], f.accepted[i], (long long)kt_failmalloc_index());
}

Test(pg_conn, allocation_failure_on_every_path, .timeout = 170) {
  char conninfo[256];
  snprintf(conninfo, sizeof conninfo, "%s", kt_pg_conninfo());
  kt_failmalloc_run(pg_scenario, conninfo);
  cr_assert_gt(kt_failmalloc_count(), 5);
  cr_log_info("allocations in the scenario: %llu", (unsigned long long)kt_failmalloc_count());
  /* The same with a host name: the lookup's allocations too. */
  char *at = strstr(conninfo, "127.0.0.1");
  cr_assert_not_null(at);
  char named[256];
  snprintf(named, sizeof named, "%.*slocalhost%s", (int)(at - conninfo), conninfo, at + 9);
  kt_failmalloc_run(pg_scenario, named);
  cr_log_info("with a host name: %llu", (unsigned long long)kt_failmalloc_count());
}

/* "Every statement is either sent or failed, never stuck": a COPY that
 * wants data keel has no API for used to leave libpq in COPY state, and the
 * loop spun in read_results forever. */
static void copy_never_hangs(bool pipeline) {
  ctx x;
  char t[64], sql[160];
  make_table(t, sizeof t);
  open_with(&x, false, pipeline);
  snprintf(sql, sizeof sql, "COPY %s FROM STDIN", t);
  query(&x, sql);
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], KEEL_EPG, "%s", keel_err_name(x.statuses[0]));
  query(&x, "COPY (SELECT 1) TO STDOUT");
  query(&x, "SELECT 8");
  wait_results(&x, 3);
  cr_assert_eq(x.statuses[1], 0, "%s", keel_err_name(x.statuses[1]));
  cr_assert_eq(x.statuses[2], 0);
  cr_assert_str_eq(x.values[2], "8");
  finish(&x);
}

/* Through PgBouncer (the pooler pass) it also checks that the statement
 * behind the COPY gets its reply (see pg_pooler's
 * a_statement_pipelined_behind_a_copy_gets_its_reply). */
Test(pg_conn, copy_never_hangs_the_connection) {
  copy_never_hangs(false);
  copy_never_hangs(true);
}

/* Issue 13 #7: a statement libpq refuses (here: libpq is busy with a query
 * sent behind keel's back through keel_pg_raw) fails alone with KEEL_ESEND
 * and libpq's reason; the connection is not reset, and the queue goes on.
 * Before, the refusal was taken for a lost connection: the statement stayed
 * at the head of the queue and the connection reconnected over and over. */
Test(pg_conn, statement_libpq_refuses_fails_alone_with_esend) {
  ctx x;
  open_with(&x, false, false);
  wait_up(&x, 1);
  PGconn *raw = keel_pg_raw(x.c);
  cr_assert_eq(PQsendQuery(raw, "SELECT 1"), 1);
  query(&x, "SELECT 2");
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], KEEL_ESEND, "%s", keel_err_name(x.statuses[0]));
  cr_assert(strstr(x.errors[0], "another command is already in progress") != NULL, "%s",
            x.errors[0]);
  /* The stray query's results, read by the test itself. */
  PGresult *r;
  while ((r = PQgetResult(raw)) != NULL) PQclear(r);
  query(&x, "SELECT 3");
  wait_results(&x, 2);
  cr_assert_eq(x.statuses[1], 0, "%s", x.errors[1]);
  cr_assert_str_eq(x.values[1], "3");
  keel_pg_stats s;
  keel_pg_get_stats(x.c, &s);
  cr_assert_eq(s.disconnects, 0);
  cr_assert_eq(s.reconnects, 0);
  cr_assert_eq(x.ups, 1);
  finish(&x);
}

/* An idle session ended by the server (pg_terminate_backend: FATAL 57P01)
 * is lost as soon as the FATAL arrives, with the server's reason; not only
 * at the EOF that follows (a peer that took over its advisory lock could
 * otherwise act before this connection knows it lost it). */
Test(pg_conn, idle_session_ended_by_the_server_is_lost_at_its_fatal) {
  KT_SKIP_BEHIND_POOLER("the server session that ends is the pooler's, not keel's");
  ctx x;
  open_with(&x, false, true);
  query(&x, "SELECT 1");
  wait_results(&x, 1);
  int pid = keel_pg_backend_pid(x.c);
  char sql[96];
  snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)", pid);
  free(kt_pg_scalar(sql));
  uint64_t start = uv_now(&x.loop);
  while (x.downs == 0 && uv_now(&x.loop) - start < 10000) uv_run(&x.loop, UV_RUN_ONCE);
  cr_assert_eq(x.downs, 1);
  cr_assert(strstr(keel_pg_last_error(x.c), "57P01") != NULL, "%s", keel_pg_last_error(x.c));
  wait_up(&x, 2);
  finish(&x);
}
