/* Change listener against the real PostgreSQL: trigger install, operations
 * and masks, filters, oversize rows, garbage payloads, handler changes from
 * inside handlers, killed connection with a gap event, stop/start, raw
 * channels, close. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/listen.h"
#include "listen/filter.h"
#include "support/harness.h"

typedef struct seen {
  int count;
  keel_change_op ops[64];
  char names[64][32];
  char old_names[64][32];
  bool fetched[64];
} seen;

typedef struct fixture {
  uv_loop_t loop;
  keel_listener *l;
  char table[64];
  char channel[64];
  seen a, b;
  int gaps;
  uint64_t gap_ms;
  int raw;
  char raw_payload[64];
  bool installed;
  char conninfo[512]; /* with application_name = the channel, to find its backend */
} fixture;

static void record(seen *s, const keel_change *c) {
  int i = s->count++;
  if (i >= 64) return;
  s->ops[i] = keel_change_operation(c);
  const char *name = keel_change_new(c, "name");
  const char *old_name = keel_change_old(c, "name");
  snprintf(s->names[i], 32, "%s", name ? name : "(null)");
  snprintf(s->old_names[i], 32, "%s", old_name ? old_name : "(null)");
  s->fetched[i] = keel_change_was_fetched(c);
}

static void handler_a(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  record(&((fixture *)data)->a, c);
}

static void handler_b(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  record(&((fixture *)data)->b, c);
}

static void on_gap(keel_listener *l, uint64_t ms, void *data) {
  (void)l;
  fixture *f = data;
  f->gaps++;
  f->gap_ms = ms;
}

static void on_installed(keel_pg *conn, int status, void *data) {
  cr_assert_eq(status, 0, "install: %s", keel_pg_last_error(conn));
  ((fixture *)data)->installed = true;
}

static void closed_conn(void *object, void *data) {
  (void)object;
  (void)data;
}

/* Creates the table, installs the trigger through keel, creates a listener. */
static void setup(fixture *f, unsigned events, const char *filter) {
  memset(f, 0, sizeof *f);
  uv_loop_init(&f->loop);
  kt_unique_name(f->table, sizeof f->table, "lt");
  kt_unique_name(f->channel, sizeof f->channel, "lc");
  char sql[512];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id serial PRIMARY KEY, team_id int, name text, score numeric, "
           "big text)",
           f->table);
  kt_pg_exec(sql);
  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = kt_pg_conninfo();
  keel_pg *conn;
  cr_assert_eq(keel_pg_new(&f->loop, &po, &conn), 0);
  cr_assert_eq(keel_listener_install(conn, f->table, NULL, f->channel, on_installed, f), 0);
  while (!f->installed) uv_run(&f->loop, UV_RUN_ONCE);
  keel_pg_close(conn, closed_conn, NULL);

  keel_listener_opts o;
  keel_listener_opts_init(&o);
  snprintf(f->conninfo, sizeof f->conninfo, "%s application_name=%s", kt_pg_conninfo(), f->channel);
  o.conninfo = f->conninfo;
  o.table = f->table;
  o.events = events;
  o.filter = filter;
  o.channel = f->channel;
  o.heartbeat_ms = 500;
  o.connect_timeout_ms = 1000;
  keel_backoff_fixed(&o.reconnect_backoff, 50);
  o.on_gap = on_gap;
  o.data = f;
  cr_assert_eq(keel_listener_new(&f->loop, &o, &f->l), 0);
  cr_assert_eq(keel_listener_on(f->l, "a", handler_a, f), 0);
}

static void run_until_active(fixture *f) {
  uint64_t start = uv_now(&f->loop);
  while (!keel_listener_is_active(f->l) && uv_now(&f->loop) - start < 10000)
    uv_run(&f->loop, UV_RUN_ONCE);
  cr_assert(keel_listener_is_active(f->l));
}

static void run_until_count(fixture *f, seen *s, int n) {
  uint64_t start = uv_now(&f->loop);
  while (s->count < n && uv_now(&f->loop) - start < 10000) uv_run(&f->loop, UV_RUN_ONCE);
  cr_assert_eq(s->count, n, "got %d changes, expected %d", s->count, n);
}

static void timer_noop(uv_timer_t *t) {
  (void)t;
}

/* Runs the loop a little longer to be sure nothing else arrives. */
static void settle(fixture *f, uint64_t ms) {
  uint64_t start = uv_now(&f->loop);
  uv_timer_t t;
  uv_timer_init(&f->loop, &t);
  uv_timer_start(&t, timer_noop, ms, 0);
  while (uv_now(&f->loop) - start < ms) uv_run(&f->loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&t, NULL);
  uv_run(&f->loop, UV_RUN_NOWAIT); /* t lives on this stack frame: finish its close */
}

static void exec_fmt(const char *fmt, const char *table) {
  char sql[512];
  snprintf(sql, sizeof sql, fmt, table, table);
  kt_pg_exec(sql);
}

static void teardown(fixture *f) {
  keel_listener_close(f->l, NULL, NULL);
  kt_loop_finish(&f->loop);
  exec_fmt("DROP TABLE %s", f->table);
}

Test(listen, insert_update_delete_reach_handlers) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  cr_assert_eq(keel_listener_start(f.l), 0);
  run_until_active(&f);
  exec_fmt("INSERT INTO %s (team_id, name) VALUES (123, 'alpha')", f.table);
  exec_fmt("UPDATE %s SET name = 'beta'", f.table);
  exec_fmt("DELETE FROM %s", f.table);
  run_until_count(&f, &f.a, 3);
  cr_assert_eq(f.a.ops[0], KEEL_CHANGE_INSERT);
  cr_assert_str_eq(f.a.names[0], "alpha");
  cr_assert_eq(f.a.ops[1], KEEL_CHANGE_UPDATE);
  cr_assert_str_eq(f.a.names[1], "beta");
  cr_assert_str_eq(f.a.old_names[1], "alpha");
  cr_assert_eq(f.a.ops[2], KEEL_CHANGE_DELETE);
  cr_assert_str_eq(f.a.names[2], "(null)");
  cr_assert_str_eq(f.a.old_names[2], "beta");
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.received, 3);
  cr_assert_eq(s.delivered, 3);
  cr_assert_gt(s.latency_max_us, 0.0);
  cr_assert(s.active);
  teardown(&f);
}

Test(listen, event_mask_and_filter) {
  fixture f;
  setup(&f, KEEL_CHANGE_UPDATE, "team_id=eq.123&score=gte.9.5");
  keel_listener_start(f.l);
  run_until_active(&f);
  exec_fmt(
      "INSERT INTO %s (team_id, name, score) VALUES (123, 'a', 10), (7, 'b', 10), "
      "(123, 'c', 2)",
      f.table);
  exec_fmt("UPDATE %s SET name = name || '2'", f.table);
  run_until_count(&f, &f.a, 1);
  settle(&f, 200);
  cr_assert_eq(f.a.count, 1);
  cr_assert_eq(f.a.ops[0], KEEL_CHANGE_UPDATE);
  cr_assert_str_eq(f.a.names[0], "a2");
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.received, 6);
  cr_assert_eq(s.filtered, 5);
  teardown(&f);
}

Test(listen, oversize_row_is_fetched_by_key) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  keel_listener_start(f.l);
  run_until_active(&f);
  exec_fmt("INSERT INTO %s (name, big) VALUES ('huge', repeat('x', 20000))", f.table);
  exec_fmt("INSERT INTO %s (name) VALUES ('small')", f.table);
  run_until_count(&f, &f.a, 2);
  cr_assert_str_eq(f.a.names[0], "huge", "fetched row, in order");
  cr_assert(f.a.fetched[0]);
  cr_assert_str_eq(f.a.names[1], "small");
  cr_assert(!f.a.fetched[1]);
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.fetched, 1);
  teardown(&f);
}

Test(listen, garbage_payloads_are_counted_not_fatal) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  keel_listener_start(f.l);
  run_until_active(&f);
  char sql[256];
  snprintf(sql, sizeof sql, "SELECT pg_notify('%s', 'not json {'), pg_notify('%s', '{\"op\":1}')",
           f.channel, f.channel);
  free(kt_pg_scalar(sql));
  exec_fmt("INSERT INTO %s (name) VALUES ('after')", f.table);
  run_until_count(&f, &f.a, 1);
  cr_assert_str_eq(f.a.names[0], "after");
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.malformed, 2);
  cr_assert(strstr(keel_listener_last_error(f.l), "malformed") != NULL);
  teardown(&f);
}

static fixture *current;
static void remover(keel_listener *l, const keel_change *c, void *data) {
  (void)c;
  (void)data;
  /* Inside a handler: remove ourselves and "a", add "b". */
  keel_listener_off(l, "remover");
  keel_listener_off(l, "a");
  keel_listener_on(l, "b", handler_b, current);
}

Test(listen, handlers_changed_inside_a_handler) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  current = &f;
  keel_listener_on(f.l, "remover", remover, NULL);
  cr_assert_eq(keel_listener_on(f.l, "a", handler_a, &f), 0, "same id replaces");
  keel_listener_start(f.l);
  run_until_active(&f);
  exec_fmt("INSERT INTO %s (name) VALUES ('one')", f.table);
  exec_fmt("INSERT INTO %s (name) VALUES ('two')", f.table);
  run_until_count(&f, &f.b, 1);
  settle(&f, 100);
  cr_assert_eq(f.a.count, 1, "a ran for the first change only (it came before remover)");
  cr_assert_eq(f.b.count, 1, "b sees the change after it was added");
  cr_assert_str_eq(f.b.names[0], "two");
  cr_assert_eq(keel_listener_off(f.l, "a"), KEEL_ENOTFOUND);
  teardown(&f);
}

static int backend_pid_of_listener(const char *channel) {
  char sql[256];
  snprintf(sql, sizeof sql,
           "SELECT pid FROM pg_stat_activity WHERE application_name = '%s' LIMIT 1", channel);
  char *pid = kt_pg_scalar(sql);
  int value = pid ? atoi(pid) : 0;
  free(pid);
  return value;
}

Test(listen, killed_connection_reconnects_and_reports_a_gap) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  keel_listener_start(f.l);
  run_until_active(&f);
  int pid = backend_pid_of_listener(f.channel);
  cr_assert_gt(pid, 0);
  char sql[128];
  snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)", pid);
  free(kt_pg_scalar(sql));
  uint64_t down = uv_now(&f.loop);
  while (keel_listener_is_active(f.l) && uv_now(&f.loop) - down < 5000)
    uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert(!keel_listener_is_active(f.l), "inactive while disconnected");
  /* A change while nobody listens is lost: that is what the gap reports. */
  exec_fmt("INSERT INTO %s (name) VALUES ('lost')", f.table);
  uint64_t start = uv_now(&f.loop);
  while (f.gaps == 0 && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.gaps, 1);
  cr_assert(keel_listener_is_active(f.l));
  exec_fmt("INSERT INTO %s (name) VALUES ('after')", f.table);
  run_until_count(&f, &f.a, 1);
  cr_assert_str_eq(f.a.names[0], "after");
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.gaps, 1);
  cr_assert_eq(s.reconnects, 1);
  teardown(&f);
}

static void on_raw(keel_listener *l, const char *channel, const char *payload, void *data) {
  (void)l;
  (void)channel;
  fixture *f = data;
  f->raw++;
  snprintf(f->raw_payload, sizeof f->raw_payload, "%s", payload);
}

Test(listen, raw_channels_and_stop_start) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  char raw[64];
  kt_unique_name(raw, sizeof raw, "raw");
  cr_assert_eq(keel_listener_listen_channel(f.l, raw, on_raw, &f), 0);
  keel_listener_start(f.l);
  run_until_active(&f);
  char sql[160];
  snprintf(sql, sizeof sql, "SELECT pg_notify('%s', 'ping')", raw);
  free(kt_pg_scalar(sql));
  uint64_t start = uv_now(&f.loop);
  while (f.raw == 0 && uv_now(&f.loop) - start < 5000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_str_eq(f.raw_payload, "ping");
  cr_assert_eq(keel_listener_stop(f.l), 0);
  cr_assert(!keel_listener_is_active(f.l));
  exec_fmt("INSERT INTO %s (name) VALUES ('while stopped')", f.table);
  cr_assert_eq(keel_listener_start(f.l), 0);
  run_until_active(&f);
  exec_fmt("INSERT INTO %s (name) VALUES ('restarted')", f.table);
  run_until_count(&f, &f.a, 1);
  cr_assert_str_eq(f.a.names[0], "restarted");
  teardown(&f);
}

Test(listen, invalid_options) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  keel_listener *l = (keel_listener *)0x1;
  char why[128];
  cr_assert_eq(keel_listener_new_ex(&loop, &o, &l, why, sizeof why), UV_EINVAL, "no conninfo");
  o.conninfo = kt_pg_conninfo();
  o.table = "t";
  o.filter = "team_id=like.1";
  cr_assert_eq(keel_listener_new_ex(&loop, &o, &l, why, sizeof why), UV_EINVAL);
  cr_assert(strstr(why, "like") != NULL, "%s", why);
  o.filter = NULL;
  o.events = 0;
  cr_assert_eq(keel_listener_new(&loop, &o, &l), UV_EINVAL);
  o.events = KEEL_CHANGE_ALL;
  o.table = "a.b.c";
  cr_assert_eq(keel_listener_new(&loop, &o, &l), UV_EINVAL);
  cr_assert_eq(l, (keel_listener *)0x1);
  o.table = "t";
  cr_assert_eq(keel_listener_new(&loop, &o, &l), 0);
  cr_assert_eq(keel_listener_on(l, NULL, handler_a, NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_add_table(l, "x", KEEL_CHANGE_ALL, "a=eq", NULL), UV_EINVAL);
  keel_listener_close(l, NULL, NULL);
  kt_loop_finish(&loop);
  char buf[4096];
  cr_assert_gt(keel_listener_install_sql(buf, sizeof buf, "public.orders", "id", NULL), 0);
  cr_assert(strstr(buf, "CREATE TRIGGER \"keel_notify_orders\"") != NULL);
  cr_assert_eq(keel_listener_install_sql(buf, 10, "orders", "id", NULL), UV_ENOBUFS);
}

Test(listen, close_with_a_fetch_in_flight) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  keel_listener_start(f.l);
  run_until_active(&f);
  exec_fmt("INSERT INTO %s (name, big) VALUES ('huge', repeat('x', 20000))", f.table);
  keel_listener_stats s;
  uint64_t start = uv_now(&f.loop);
  do {
    uv_run(&f.loop, UV_RUN_ONCE);
    keel_listener_get_stats(f.l, &s);
  } while (s.fetched == 0 && uv_now(&f.loop) - start < 5000);
  cr_assert_eq(s.fetched, 1);
  teardown(&f); /* the fetch is cancelled; nothing leaks, loop closes */
  cr_assert_eq(f.a.count, 0);
}

static void on_installed_flag(keel_pg *conn, int status, void *data) {
  cr_assert_eq(status, 0, "install: %s", keel_pg_last_error(conn));
  *(bool *)data = true;
}

/* With the filter pushed into the trigger, unwanted changes are never sent:
 * the listener receives only matching ones (INSERT/UPDATE by the new row,
 * DELETE by the old row). */
Test(listen, filter_pushed_into_the_trigger) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, "team_id=eq.123&name=neq.skip");
  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = kt_pg_conninfo();
  keel_pg *conn;
  cr_assert_eq(keel_pg_new(&f.loop, &po, &conn), 0);
  bool done = false;
  cr_assert_eq(keel_listener_install_filtered(
                   conn, f.table, NULL, f.channel, KEEL_CHANGE_INSERT | KEEL_CHANGE_DELETE,
                   "team_id=eq.123&name=neq.skip", on_installed_flag, &done),
               0);
  while (!done) uv_run(&f.loop, UV_RUN_ONCE);
  done = false;
  cr_assert_eq(keel_listener_install_filtered(conn, f.table, NULL, f.channel, KEEL_CHANGE_ALL,
                                              "x=like.1", on_installed_flag, &done),
               UV_EINVAL);
  keel_pg_close(conn, closed_conn, NULL);
  keel_listener_start(f.l);
  run_until_active(&f);
  exec_fmt("INSERT INTO %s (team_id, name) VALUES (123, 'a'), (7, 'b'), (123, 'skip')", f.table);
  exec_fmt("UPDATE %s SET name = name || '2'", f.table);
  exec_fmt("DELETE FROM %s WHERE team_id = 123", f.table);
  run_until_count(&f, &f.a, 3);
  settle(&f, 200);
  cr_assert_eq(f.a.count, 3);
  cr_assert_eq(f.a.ops[0], KEEL_CHANGE_INSERT);
  cr_assert_str_eq(f.a.names[0], "a");
  cr_assert_eq(f.a.ops[1], KEEL_CHANGE_DELETE);
  cr_assert_eq(f.a.ops[2], KEEL_CHANGE_DELETE);
  cr_assert_str_eq(f.a.old_names[1], "a2");
  cr_assert_str_eq(f.a.old_names[2], "skip2");
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.received, 3, "the trigger sent only matching changes");
  cr_assert_eq(s.filtered, 0);
  teardown(&f);
}

/* An oversize change whose row is gone by the time the listener reads it:
 * the handler still gets the change as it was (issue 12 #3: from the
 * overflow table, not by re-reading the row). */
typedef struct gone_seen {
  int count;
  keel_change_op op;
  bool has_new, fetched;
  char key[16];
} gone_seen;

static void gone_handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  gone_seen *g = data;
  if (g->count++ > 0) return;
  g->op = keel_change_operation(c);
  g->has_new = keel_change_has_new(c);
  g->fetched = keel_change_was_fetched(c);
  const char *key = keel_change_key(c, "id");
  snprintf(g->key, sizeof g->key, "%s", key ? key : "(null)");
}

Test(listen, oversize_row_gone_before_the_fetch) {
  fixture f;
  setup(&f, KEEL_CHANGE_INSERT, NULL);
  gone_seen g = {0};
  keel_listener_on(f.l, "a", gone_handler, &g); /* replaces the fixture's handler */
  keel_listener_start(f.l);
  run_until_active(&f);
  char sql[512];
  snprintf(sql, sizeof sql,
           "BEGIN; INSERT INTO %s (id, name, big) VALUES (41, 'huge', repeat('x', 20000)); "
           "DELETE FROM %s WHERE id = 41; COMMIT",
           f.table, f.table);
  kt_pg_exec(sql);
  uint64_t start = uv_now(&f.loop);
  while (g.count == 0 && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(g.count, 1);
  cr_assert_eq(g.op, KEEL_CHANGE_INSERT);
  cr_assert(g.has_new, "the row as it was inserted");
  cr_assert(g.fetched);
  cr_assert_str_eq(g.key, "41");
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.fetched, 1, "a fetch was tried");
  teardown(&f);
}

static void closing_handler(keel_listener *l, const keel_change *c, void *data) {
  (void)c;
  fixture *f = data;
  f->a.count++;
  keel_listener_close(l, NULL, NULL); /* from inside a handler */
  keel_listener_close(l, NULL, NULL); /* a second close does nothing */
  f->l = NULL;
}

Test(listen, close_inside_a_handler) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  keel_listener_on(f.l, "a", closing_handler, &f);
  keel_listener_on(f.l, "b", handler_b, &f);
  keel_listener_start(f.l);
  run_until_active(&f);
  exec_fmt("INSERT INTO %s (name) SELECT 'n' || g FROM generate_series(1, 5) g", f.table);
  uint64_t start = uv_now(&f.loop);
  while (f.l != NULL && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.a.count, 1, "nothing is delivered after close");
  cr_assert_eq(f.b.count, 0, "not even to the next handler of the same change");
  kt_loop_finish(&f.loop);
  exec_fmt("DROP TABLE %s", f.table);
}

/* One listener, two tables and a raw channel on its one connection. */
Test(listen, several_tables_on_one_connection) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  char second[64], sql[512];
  kt_unique_name(second, sizeof second, "lt2");
  snprintf(sql, sizeof sql, "CREATE TABLE %s (id int PRIMARY KEY, name text)", second);
  kt_pg_exec(sql);
  char install[8192];
  cr_assert_gt(keel_listener_install_sql(install, sizeof install, second, "id", f.channel), 0);
  kt_pg_exec(install);
  cr_assert_eq(keel_listener_add_table(f.l, second, KEEL_CHANGE_INSERT, "id=gt.1", f.channel), 0);
  keel_listener_start(f.l);
  run_until_active(&f);
  exec_fmt("INSERT INTO %s (name) VALUES ('first table')", f.table);
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1, 'filtered out'), (2, 'second table')",
           second);
  kt_pg_exec(sql);
  run_until_count(&f, &f.a, 2);
  settle(&f, 100);
  cr_assert_eq(f.a.count, 2);
  cr_assert_str_eq(f.a.names[0], "first table");
  cr_assert_str_eq(f.a.names[1], "second table");
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.filtered, 1);
  teardown(&f);
  snprintf(sql, sizeof sql, "DROP TABLE %s", second);
  kt_pg_exec(sql);
}

/* A raw channel added while the listener is active: it LISTENs at once and
 * is inactive until that is done; NOTIFYs on it are then delivered, and
 * the table's changes still are. */
Test(listen, raw_channel_added_while_active) {
  fixture f;
  setup(&f, KEEL_CHANGE_ALL, NULL);
  keel_listener_start(f.l);
  run_until_active(&f);
  char raw[64];
  kt_unique_name(raw, sizeof raw, "late_raw");
  cr_assert_eq(keel_listener_listen_channel(f.l, raw, on_raw, &f), 0);
  cr_assert_not(keel_listener_is_active(f.l), "inactive until its LISTEN is done");
  cr_assert_eq(f.raw, 0, "nothing runs inside the call");
  run_until_active(&f);
  char sql[160];
  snprintf(sql, sizeof sql, "SELECT pg_notify('%s', 'late')", raw);
  free(kt_pg_scalar(sql));
  uint64_t start = uv_now(&f.loop);
  while (f.raw == 0 && uv_now(&f.loop) - start < 5000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.raw, 1);
  cr_assert_str_eq(f.raw_payload, "late");
  exec_fmt("INSERT INTO %s (name) VALUES ('after the raw channel')", f.table);
  run_until_count(&f, &f.a, 1);
  cr_assert_str_eq(f.a.names[0], "after the raw channel");
  teardown(&f);
}
