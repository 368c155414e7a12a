/* Issue 12 #7: exact gaps. A writer commits rows continuously while the
 * listener's backend is killed twice: every committed row is either
 * delivered or inside a reported gap window, and nothing committed after a
 * reconnect is delivered before that reconnect's gap event. */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keel/listen.h"
#include "support/harness.h"

#define MAX_ROWS 20000

typedef struct drill {
  uv_loop_t loop;
  keel_listener *l;
  char table[64];
  char channel[64];
  char app[80];
  atomic_bool stop;
  int gaps;
  int64_t from_us[8], to_us[8];
  bool delivered[MAX_ROWS];
  int gaps_seen_at[MAX_ROWS];
  int delivered_count;
} drill;

static void handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  drill *d = data;
  const char *id = keel_change_new(c, "id");
  int n = id ? atoi(id) : -1;
  if (n < 0 || n >= MAX_ROWS) return;
  d->delivered[n] = true;
  d->gaps_seen_at[n] = d->gaps;
  d->delivered_count++;
}

static void on_gap(keel_listener *l, uint64_t ms, void *data) {
  (void)ms;
  drill *d = data;
  if (d->gaps < 8)
    cr_assert_eq(keel_listener_gap_window(l, &d->from_us[d->gaps], &d->to_us[d->gaps]), 0);
  cr_assert_lt(d->from_us[d->gaps], d->to_us[d->gaps]);
  d->gaps++;
}

static void *writer(void *arg) {
  drill *d = arg;
  PGconn *conn = PQconnectdb(kt_pg_conninfo());
  char sql[256];
  snprintf(sql, sizeof sql, "INSERT INTO %s DEFAULT VALUES", d->table);
  while (!atomic_load(&d->stop)) {
    PGresult *res = PQexec(conn, sql);
    PQclear(res);
    usleep(1000);
  }
  PQfinish(conn);
  return NULL;
}

static void run_for(drill *d, uint64_t ms) {
  uint64_t start = uv_now(&d->loop);
  while (uv_now(&d->loop) - start < ms)
    uv_run(&d->loop, UV_RUN_NOWAIT), usleep(200), uv_update_time(&d->loop);
}

static void kill_listener(drill *d) {
  char sql[256];
  snprintf(
      sql, sizeof sql,
      "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '%s'",
      d->app);
  char *n = kt_pg_scalar(sql);
  cr_assert_str_eq(n, "1");
  free(n);
}

Test(listen_gaps, every_committed_change_is_delivered_or_inside_a_gap, .timeout = 120) {
  static drill d;
  memset(&d, 0, sizeof d);
  uv_loop_init(&d.loop);
  kt_unique_name(d.table, sizeof d.table, "lg");
  kt_unique_name(d.channel, sizeof d.channel, "lgc");
  snprintf(d.app, sizeof d.app, "%s_app", d.table);
  char sql[8192];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id serial PRIMARY KEY, ts int8 DEFAULT (extract(epoch from "
           "clock_timestamp()) * 1000000)::int8)",
           d.table);
  kt_pg_exec(sql);
  cr_assert_gt(keel_listener_install_sql(sql, sizeof sql, d.table, "id", d.channel), 0);
  kt_pg_exec(sql);
  char conninfo[512];
  snprintf(conninfo, sizeof conninfo, "%s application_name=%s", kt_pg_conninfo(), d.app);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = conninfo;
  o.table = d.table;
  o.channel = d.channel;
  o.heartbeat_ms = 200;
  o.connect_timeout_ms = 1000;
  keel_backoff_fixed(&o.reconnect_backoff, 100);
  o.on_gap = on_gap;
  o.data = &d;
  cr_assert_eq(keel_listener_new(&d.loop, &o, &d.l), 0);
  keel_listener_on(d.l, "h", handler, &d);
  keel_listener_start(d.l);
  uint64_t t0 = uv_now(&d.loop);
  while (!keel_listener_is_active(d.l) && uv_now(&d.loop) - t0 < 10000)
    uv_run(&d.loop, UV_RUN_ONCE);
  cr_assert(keel_listener_is_active(d.l));
  pthread_t thread;
  pthread_create(&thread, NULL, writer, &d);
  run_for(&d, 1500);
  kill_listener(&d);
  run_for(&d, 2000);
  kill_listener(&d);
  run_for(&d, 1500);
  atomic_store(&d.stop, true);
  pthread_join(thread, NULL);
  run_for(&d, 1500); /* the tail arrives */
  cr_assert_eq(d.gaps, 2, "one gap per kill");
  /* every committed row: delivered, or its time inside a window (its time is
   * taken in its transaction, at most a commit's latency before it commits:
   * 50 ms of slack on the window's start for a loaded machine) */
  snprintf(sql, sizeof sql, "SELECT string_agg(id || ':' || ts, ',' ORDER BY id) FROM %s", d.table);
  char *rows = kt_pg_scalar(sql);
  cr_assert_not_null(rows);
  int committed = 0, missed = 0;
  for (char *p = rows; p && *p;) {
    int id = atoi(p);
    char *colon = strchr(p, ':');
    long long ts = atoll(colon + 1);
    committed++;
    if (id < MAX_ROWS && d.delivered[id]) {
      /* delivered before gap j's event ⇒ committed before gap j's window end */
      for (int j = d.gaps_seen_at[id]; j < d.gaps; j++)
        cr_assert_lt(ts, d.to_us[j], "row %d (ts %lld) delivered before gap %d's event", id, ts, j);
    } else {
      missed++;
      bool inside = false;
      for (int j = 0; j < d.gaps; j++)
        if (ts >= d.from_us[j] - 50000 && ts <= d.to_us[j]) inside = true;
      cr_assert(inside, "row %d (ts %lld) was lost outside every gap window", id, ts);
    }
    char *comma = strchr(p, ',');
    p = comma ? comma + 1 : NULL;
  }
  free(rows);
  cr_assert_gt(committed, 200, "the writer ran (%d rows)", committed); /* 1 per ms unloaded */
  cr_log_info("committed %d, missed %d (inside the windows), gaps %d", committed, missed, d.gaps);
  keel_listener_close(d.l, NULL, NULL);
  kt_loop_finish(&d.loop);
  snprintf(sql, sizeof sql, "DROP TABLE %s", d.table);
  kt_pg_exec(sql);
}
