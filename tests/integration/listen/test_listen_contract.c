/* The listener under every interleaving (issue 13): add_table while a change
 * waits behind a row fetch, stop/close from a handler while fetches are in
 * flight and the connection drops, long and non-ASCII table names, the
 * callback contract (nothing inside the call, close from every callback,
 * KEEL_ECLOSING after close), and allocation failure on the main paths. */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keel/listen.h"
#include "support/harness.h"

typedef struct fixture {
  uv_loop_t loop;
  keel_listener *l;
  char table[64];
  char channel[64];
  int delivered;
  int gaps;
  int errors;
  int raw;
  bool in_call; /* set around keel calls: no callback may run then */
  bool called_inside;
  bool closed;
  bool stop_in_handler;
  bool close_in_handler;
  bool close_in_gap;
  bool close_in_raw;
  char names[8][32];
  char conninfo[512]; /* with application_name = the channel, to find its backend */
} fixture;

static void note_callback(fixture *f) {
  if (f->in_call) f->called_inside = true;
}

static void handler(keel_listener *l, const keel_change *c, void *data) {
  fixture *f = data;
  note_callback(f);
  const char *name = keel_change_new(c, "name");
  if (f->delivered < 8) snprintf(f->names[f->delivered], 32, "%s", name ? name : "(null)");
  f->delivered++;
  if (f->stop_in_handler) {
    f->stop_in_handler = false;
    cr_assert_eq(keel_listener_stop(l), 0);
  }
  if (f->close_in_handler) {
    f->close_in_handler = false;
    keel_listener_close(l, NULL, NULL);
    f->l = NULL;
  }
}

static void on_gap(keel_listener *l, uint64_t ms, void *data) {
  (void)ms;
  fixture *f = data;
  note_callback(f);
  f->gaps++;
  if (f->close_in_gap) {
    keel_listener_close(l, NULL, NULL);
    f->l = NULL;
  }
}

static void on_error(keel_listener *l, int err, const char *message, void *data) {
  (void)l;
  (void)err;
  (void)message;
  fixture *f = data;
  note_callback(f);
  f->errors++;
}

static void on_closed(void *object, void *data) {
  (void)object;
  fixture *f = data;
  note_callback(f);
  f->closed = true;
}

static void exec_fmt(const char *fmt, const char *table) {
  char sql[512];
  snprintf(sql, sizeof sql, fmt, table, table);
  kt_pg_exec(sql);
}

static void make_table(fixture *f) {
  exec_fmt("CREATE TABLE %s (id serial PRIMARY KEY, name text, big text)", f->table);
  char sql[8192];
  cr_assert_gt(keel_listener_install_sql(sql, sizeof sql, f->table, "id", f->channel), 0);
  kt_pg_exec(sql);
}

static void setup(fixture *f) {
  memset(f, 0, sizeof *f);
  uv_loop_init(&f->loop);
  kt_unique_name(f->table, sizeof f->table, "lct");
  kt_unique_name(f->channel, sizeof f->channel, "lcc");
  make_table(f);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  snprintf(f->conninfo, sizeof f->conninfo, "%s application_name=%s", kt_pg_conninfo(), f->channel);
  o.conninfo = f->conninfo;
  o.table = f->table;
  o.channel = f->channel;
  o.heartbeat_ms = 500;
  o.connect_timeout_ms = 1000;
  keel_backoff_fixed(&o.reconnect_backoff, 50);
  o.on_gap = on_gap;
  o.on_error = on_error;
  o.data = f;
  f->in_call = true;
  cr_assert_eq(keel_listener_new(&f->loop, &o, &f->l), 0);
  cr_assert_eq(keel_listener_on(f->l, "h", handler, f), 0);
  f->in_call = false;
}

static void run_until_active(fixture *f) {
  uint64_t start = uv_now(&f->loop);
  while (!keel_listener_is_active(f->l) && uv_now(&f->loop) - start < 10000)
    uv_run(&f->loop, UV_RUN_ONCE);
  cr_assert(keel_listener_is_active(f->l));
}

static void start(fixture *f) {
  f->in_call = true;
  cr_assert_eq(keel_listener_start(f->l), 0);
  f->in_call = false;
  run_until_active(f);
}

static uint64_t fetched(fixture *f) {
  keel_listener_stats s;
  keel_listener_get_stats(f->l, &s);
  return s.fetched;
}

static void finish(fixture *f) {
  if (f->l != NULL) {
    f->in_call = true;
    keel_listener_close(f->l, on_closed, f);
    f->in_call = false;
    f->l = NULL;
  }
  kt_loop_finish(&f->loop);
  cr_assert(!f->called_inside, "a callback ran inside a keel call");
  exec_fmt("DROP TABLE %s", f->table);
}

/* A session of its own that holds ACCESS EXCLUSIVE on a table (keel's
 * overflow table), so that the listener's reads of oversize changes wait. */
static PGconn *lock_table(const char *table) {
  PGconn *conn = PQconnectdb(kt_pg_conninfo());
  cr_assert_eq(PQstatus(conn), CONNECTION_OK);
  char sql[256];
  snprintf(sql, sizeof sql, "BEGIN; LOCK TABLE %s IN ACCESS EXCLUSIVE MODE", table);
  PGresult *res = PQexec(conn, sql);
  cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK, "%s", PQerrorMessage(conn));
  PQclear(res);
  return conn;
}

/* The listener's backend (application_name = its channel) waiting on the
 * lock (its overflow read). */
static void kill_waiting_fetcher(const char *app) {
  char sql[512];
  snprintf(sql, sizeof sql,
           "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '%s' "
           "AND wait_event_type = 'Lock'",
           app);
  char *r = kt_pg_scalar(sql);
  cr_assert_not_null(r, "no fetch was waiting");
  free(r);
}

static void run_until_fetched(fixture *f, uint64_t n) {
  uint64_t start = uv_now(&f->loop);
  while (fetched(f) < n && uv_now(&f->loop) - start < 10000) uv_run(&f->loop, UV_RUN_ONCE);
  cr_assert_eq(fetched(f), n);
}

/* Issue 13 #2: queued changes pointed into the subscriptions array, which
 * add_table reallocates (heap-use-after-free in the filter match). */
Test(listen_contract, add_table_while_a_change_waits_behind_a_fetch) {
  fixture f;
  setup(&f);
  start(&f);
  PGconn *lock = NULL;
  exec_fmt("INSERT INTO %s (name, big) VALUES ('huge', repeat('x', 20000))", f.table);
  exec_fmt("INSERT INTO %s (name) VALUES ('small')", f.table);
  lock = lock_table("public.keel_overflow");
  run_until_fetched(&f, 1);
  for (int i = 0; i < 4; i++) {
    char other[64];
    kt_unique_name(other, sizeof other, "other");
    cr_assert_eq(keel_listener_add_table(f.l, other, KEEL_CHANGE_ALL, "name=neq.x", f.channel), 0);
  }
  PQfinish(lock); /* the fetch goes on */
  uint64_t t0 = uv_now(&f.loop);
  while (f.delivered < 2 && uv_now(&f.loop) - t0 < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.delivered, 2);
  cr_assert_str_eq(f.names[0], "huge");
  cr_assert_str_eq(f.names[1], "small");
  finish(&f);
}

/* Issue 13 #3: a handler stops (or closes) the listener while row fetches are
 * in flight and the connection drops; the fetches then fail with a lost
 * connection's code (not UV_ECANCELED) and must not touch the dropped
 * changes. */
static void stop_or_close_with_fetches_in_flight(bool close) {
  fixture f;
  setup(&f);
  start(&f);
  /* Three oversize changes arrive while the loop does not run; their
   * fetches then wait on the lock, pipelined behind each other. */
  exec_fmt("INSERT INTO %s (name, big) VALUES ('h1', repeat('x', 20000))", f.table);
  exec_fmt("INSERT INTO %s (name, big) VALUES ('h2', repeat('x', 20000))", f.table);
  exec_fmt("INSERT INTO %s (name, big) VALUES ('h3', repeat('x', 20000))", f.table);
  PGconn *lock = lock_table("public.keel_overflow");
  run_until_fetched(&f, 3);
  for (int i = 0; i < 20; i++) uv_run(&f.loop, UV_RUN_NOWAIT); /* fetches sent */
  if (close)
    f.close_in_handler = true;
  else
    f.stop_in_handler = true;
  kill_waiting_fetcher(f.channel);
  PQfinish(lock);
  uint64_t t0 = uv_now(&f.loop);
  while (f.delivered == 0 && uv_now(&f.loop) - t0 < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.delivered, 1, "the first change, with its key only; the rest were dropped");
  if (!close) {
    /* stopped: nothing else comes; start again works */
    for (int i = 0; i < 50; i++) uv_run(&f.loop, UV_RUN_NOWAIT);
    cr_assert_eq(f.delivered, 1);
    start(&f);
    exec_fmt("INSERT INTO %s (name) VALUES ('again')", f.table);
    t0 = uv_now(&f.loop);
    while (f.delivered < 2 && uv_now(&f.loop) - t0 < 10000) uv_run(&f.loop, UV_RUN_ONCE);
    cr_assert_eq(f.delivered, 2);
    cr_assert_str_eq(f.names[1], "again");
  }
  finish(&f);
}

Test(listen_contract, stop_in_a_handler_while_fetches_in_flight_and_the_connection_drops) {
  stop_or_close_with_fetches_in_flight(false);
}

Test(listen_contract, close_in_a_handler_while_fetches_in_flight_and_the_connection_drops) {
  stop_or_close_with_fetches_in_flight(true);
}

/* Issue 13 #11: trigger names for 48..63-byte table names, and names cut on
 * a UTF-8 character boundary. */
static void long_name_case(const char *table) {
  fixture f;
  memset(&f, 0, sizeof f);
  uv_loop_init(&f.loop);
  snprintf(f.table, sizeof f.table, "%s", table);
  kt_unique_name(f.channel, sizeof f.channel, "lcc");
  char sql[8192], quoted[160];
  cr_assert_gt(keel_pg_quote_ident(quoted, sizeof quoted, table, false), 0);
  snprintf(sql, sizeof sql, "CREATE TABLE %s (id serial PRIMARY KEY, name text)", quoted);
  kt_pg_exec(sql);
  int n = keel_listener_install_filtered_sql(sql, sizeof sql, table, "id", f.channel,
                                             KEEL_CHANGE_ALL, "name=neq.skip");
  cr_assert_gt(n, 0, "install sql for %s: %d", table, n);
  kt_pg_exec(sql);
  /* both triggers exist, names valid, at most 63 bytes, distinct */
  char q[512];
  snprintf(q, sizeof q,
           "SELECT count(*) || ',' || max(octet_length(tgname)) FROM pg_trigger WHERE tgrelid = "
           "'%s'::regclass AND tgname LIKE 'keel_notify_%%'",
           quoted);
  char *got = kt_pg_scalar(q);
  cr_assert_not_null(got);
  int count = 0, longest = 0;
  cr_assert_eq(sscanf(got, "%d,%d", &count, &longest), 2);
  free(got);
  cr_assert_eq(count, 3, "insert, update and delete triggers");
  cr_assert_leq(longest, 63);
  /* installing twice replaces them (same names) */
  kt_pg_exec(sql);
  got = kt_pg_scalar(q);
  cr_assert(strncmp(got, "3,", 2) == 0, "%s", got);
  free(got);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.table = table;
  o.channel = f.channel;
  o.data = &f;
  cr_assert_eq(keel_listener_new(&f.loop, &o, &f.l), 0);
  keel_listener_on(f.l, "h", handler, &f);
  start(&f);
  snprintf(sql, sizeof sql, "INSERT INTO %s (name) VALUES ('skip'), ('kept')", quoted);
  kt_pg_exec(sql);
  uint64_t t0 = uv_now(&f.loop);
  while (f.delivered < 1 && uv_now(&f.loop) - t0 < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.delivered, 1);
  cr_assert_str_eq(f.names[0], "kept");
  keel_listener_close(f.l, NULL, NULL);
  kt_loop_finish(&f.loop);
  snprintf(sql, sizeof sql, "DROP TABLE %s", quoted);
  kt_pg_exec(sql);
}

Test(listen_contract, long_and_non_ascii_table_names) {
  char name[80];
  int pid = (int)getpid() % 100000;
  for (int len = 48; len <= 63; len += 5) { /* 48, 53, 58, 63 bytes */
    int n = snprintf(name, sizeof name, "lct_long_%05d_", pid);
    for (; n < len; n++) name[n] = (char)('a' + n % 26);
    name[n] = '\0';
    long_name_case(name);
  }
  /* 2-byte characters from an odd offset: a cut at a fixed byte count splits
   * one (invalid UTF-8: 22021) */
  int n = snprintf(name, sizeof name, "lu%05d", pid);
  while (n + 2 <= 63) {
    name[n++] = (char)0xC3;
    name[n++] = (char)0xA9; /* é */
  }
  name[n] = '\0';
  long_name_case(name);
  /* 3-byte characters */
  n = snprintf(name, sizeof name, "lv%05d", pid);
  while (n + 3 <= 63) {
    name[n++] = (char)0xE2;
    name[n++] = (char)0x82;
    name[n++] = (char)0xAC; /* € */
  }
  name[n] = '\0';
  long_name_case(name);
}

/* ---- the callback contract ----------------------------------------------- */

static void on_raw(keel_listener *l, const char *channel, const char *payload, void *data) {
  (void)channel;
  (void)payload;
  fixture *f = data;
  note_callback(f);
  f->raw++;
  if (f->close_in_raw) {
    keel_listener_close(l, NULL, NULL);
    f->l = NULL;
  }
}

Test(listen_contract, calls_after_close_return_keel_eclosing) {
  fixture f;
  setup(&f);
  start(&f);
  f.in_call = true;
  keel_listener_close(f.l, on_closed, &f);
  cr_assert_eq(keel_listener_start(f.l), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_stop(f.l), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_on(f.l, "x", handler, &f), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_off(f.l, "h"), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_add_table(f.l, "t2", KEEL_CHANGE_ALL, NULL, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_listen_channel(f.l, "c2", on_raw, &f), KEEL_ECLOSING);
  keel_listener_close(f.l, on_closed, &f); /* a second close does nothing */
  f.in_call = false;
  cr_assert(!f.closed, "the close callback comes on a later iteration");
  f.l = NULL;
  kt_loop_finish(&f.loop);
  cr_assert(f.closed);
  cr_assert(!f.called_inside);
  exec_fmt("DROP TABLE %s", f.table);
}

Test(listen_contract, nothing_runs_inside_new_start_stop_close) {
  fixture f;
  setup(&f);
  /* A server nobody listens on: start returns, connect fails later. */
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = "host=127.0.0.1 port=1 connect_timeout=1";
  o.table = f.table;
  o.on_gap = on_gap;
  o.on_error = on_error;
  o.data = &f;
  keel_listener *bad;
  f.in_call = true;
  cr_assert_eq(keel_listener_new(&f.loop, &o, &bad), 0);
  cr_assert_eq(keel_listener_start(bad), 0);
  f.in_call = false;
  for (int i = 0; i < 20; i++) uv_run(&f.loop, UV_RUN_NOWAIT);
  cr_assert(!keel_listener_is_active(bad));
  f.in_call = true;
  cr_assert_eq(keel_listener_stop(bad), 0);
  cr_assert_eq(keel_listener_start(bad), 0);
  keel_listener_close(bad, NULL, NULL);
  f.in_call = false;
  /* the good one: start, stop, start again, close with a change pending */
  start(&f);
  exec_fmt("INSERT INTO %s (name) VALUES ('one')", f.table);
  f.in_call = true;
  cr_assert_eq(keel_listener_stop(f.l), 0);
  cr_assert_eq(keel_listener_start(f.l), 0);
  f.in_call = false;
  run_until_active(&f);
  exec_fmt("INSERT INTO %s (name) VALUES ('two')", f.table);
  f.in_call = true;
  keel_listener_close(f.l, on_closed, &f);
  f.in_call = false;
  f.l = NULL;
  finish(&f);
  cr_assert(f.closed);
}

Test(listen_contract, close_from_inside_every_callback) {
  /* a handler */
  fixture f;
  setup(&f);
  f.close_in_handler = true;
  start(&f);
  exec_fmt("INSERT INTO %s (name) SELECT 'n' || g FROM generate_series(1, 3) g", f.table);
  uint64_t t0 = uv_now(&f.loop);
  while (f.l != NULL && uv_now(&f.loop) - t0 < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_null(f.l);
  finish(&f);
  cr_assert_eq(f.delivered, 1);

  /* a raw channel's callback, with more notifications in the same batch */
  setup(&f);
  char raw[64], sql[256];
  kt_unique_name(raw, sizeof raw, "lcr");
  cr_assert_eq(keel_listener_listen_channel(f.l, raw, on_raw, &f), 0);
  f.close_in_raw = true;
  start(&f);
  snprintf(sql, sizeof sql, "SELECT pg_notify('%s', 'a'), pg_notify('%s', 'b')", raw, raw);
  free(kt_pg_scalar(sql));
  t0 = uv_now(&f.loop);
  while (f.l != NULL && uv_now(&f.loop) - t0 < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  finish(&f);
  cr_assert_eq(f.raw, 1, "nothing after close");

  /* on_gap, after the listener's backend was killed */
  setup(&f);
  f.close_in_gap = true;
  start(&f);
  snprintf(sql, sizeof sql,
           "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
           "'%s'",
           f.channel);
  free(kt_pg_scalar(sql));
  t0 = uv_now(&f.loop);
  while (f.l != NULL && uv_now(&f.loop) - t0 < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_null(f.l, "on_gap ran and closed");
  finish(&f);
  cr_assert_eq(f.gaps, 1);
}

/* ---- allocation failure on the main paths ---------------------------------- */

static fixture alloc_f;

static void alloc_scenario(void *arg) {
  (void)arg;
  fixture *f = &alloc_f;
  uv_loop_init(&f->loop);
  f->delivered = 0;
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.table = f->table;
  o.channel = f->channel;
  keel_backoff_fixed(&o.reconnect_backoff, 10);
  keel_listener *l = NULL;
  int rc = keel_listener_new(&f->loop, &o, &l);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    kt_loop_finish(&f->loop);
    return;
  }
  rc = keel_listener_on(l, "h", handler, f);
  cr_assert(rc == 0 || rc == UV_ENOMEM);
  char other[80];
  snprintf(other, sizeof other, "%s_o", f->table);
  rc = keel_listener_add_table(l, other, KEEL_CHANGE_ALL, "name=eq.x", f->channel);
  cr_assert(rc == 0 || rc == UV_ENOMEM);
  rc = keel_listener_start(l);
  cr_assert(rc == 0 || rc == UV_ENOMEM, "start: %d", rc);
  /* the counting run must get through; a failing one may not */
  uint64_t wait_ms = kt_failmalloc_index() < 0 ? 10000 : 300;
  if (rc == 0) {
    uint64_t t0 = uv_now(&f->loop);
    while (!keel_listener_is_active(l) && uv_now(&f->loop) - t0 < wait_ms)
      uv_run(&f->loop, UV_RUN_ONCE);
    if (keel_listener_is_active(l)) {
      char sql[256];
      snprintf(sql, sizeof sql,
               "SELECT pg_notify('%s', '{\"op\":\"INSERT\",\"schema\":\"public\",\"table\":\"%s\","
               "\"ts_us\":1,\"pk\":{\"id\":1},\"new\":{\"id\":1,\"name\":\"n\"}}')",
               f->channel, f->table);
      free(kt_pg_scalar(sql));
      t0 = uv_now(&f->loop);
      while (f->delivered == 0 && uv_now(&f->loop) - t0 < wait_ms) uv_run(&f->loop, UV_RUN_ONCE);
    }
    if (kt_failmalloc_index() < 0) cr_assert_eq(f->delivered, 1, "the counting run delivers");
    rc = keel_listener_stop(l);
    cr_assert_eq(rc, 0);
  }
  keel_listener_close(l, NULL, NULL);
  kt_loop_finish(&f->loop);
}

Test(listen_contract, every_allocation_failure_on_the_main_paths, .timeout = 600) {
  memset(&alloc_f, 0, sizeof alloc_f);
  kt_unique_name(alloc_f.channel, sizeof alloc_f.channel, "lca");
  kt_unique_name(alloc_f.table, sizeof alloc_f.table, "lca");
  exec_fmt("CREATE TABLE %s (id int PRIMARY KEY, name text)", alloc_f.table);
  exec_fmt("CREATE TABLE %s_o (id int PRIMARY KEY, name text)", alloc_f.table);
  kt_failmalloc_run(alloc_scenario, NULL);
  cr_assert_gt(kt_failmalloc_count(), 10);
  exec_fmt("DROP TABLE %s, %s_o", alloc_f.table);
}
