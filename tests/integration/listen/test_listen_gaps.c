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
#include <time.h>
#include <unistd.h>

#include "keel/listen.h"
#include "support/harness.h"

#define MAX_ROWS 100000
#define MAX_GAPS 16

typedef struct drill {
  uv_loop_t loop;
  keel_listener *l;
  char table[64];
  char channel[64];
  char app[80];
  kt_private_pg pg; /* the restart drill's own server */
  char conninfo[256];
  atomic_bool stop;
  atomic_int writer_errors;
  int gaps;
  int64_t from_us[MAX_GAPS], to_us[MAX_GAPS];
  bool delivered[MAX_ROWS];
  int gaps_seen_at[MAX_ROWS];
  int delivered_count;
  int duplicates;
} drill;

static void handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  drill *d = data;
  const char *id = keel_change_new(c, "id");
  int n = id ? atoi(id) : -1;
  if (n < 0 || n >= MAX_ROWS) return;
  if (d->delivered[n]) d->duplicates++;
  d->delivered[n] = true;
  d->gaps_seen_at[n] = d->gaps;
  d->delivered_count++;
}

static void on_gap(keel_listener *l, uint64_t ms, void *data) {
  (void)ms;
  drill *d = data;
  cr_assert_lt(d->gaps, MAX_GAPS);
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

/* The listener stopped by hand and started again: what commits meanwhile
 * (and what it had received but not delivered) is inside the gap the new
 * session reports. */
static void stop_and_start(drill *d) {
  cr_assert_eq(keel_listener_stop(d->l), 0);
  cr_assert(!keel_listener_is_active(d->l));
  run_for(d, 300);
  cr_assert_eq(keel_listener_start(d->l), 0);
}

/* A writer commits a row a millisecond while fault() strikes the listener
 * twice: every committed row is delivered or inside a reported gap window,
 * one gap per fault, nothing delivered before the gap event it came after. */
static void gap_drill(void (*fault)(drill *d)) {
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
  fault(&d);
  run_for(&d, 2000);
  fault(&d);
  run_for(&d, 1500);
  atomic_store(&d.stop, true);
  pthread_join(thread, NULL);
  run_for(&d, 1500); /* the tail arrives */
  cr_assert_eq(d.gaps, 2, "one gap per fault");
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

Test(listen_gaps, every_committed_change_is_delivered_or_inside_a_gap, .timeout = 120) {
  gap_drill(kill_listener);
}

Test(listen_gaps, stop_and_start_report_the_gap_between, .timeout = 120) {
  gap_drill(stop_and_start);
}

/* The drill as issue 12 ran it: a writer at 700 changes/s, the
 * listener's backend killed 3 times and the server restarted once (its own
 * server, never the shared one). Every committed change is delivered or was
 * committed inside a reported gap window, judged by the server's own commit
 * timestamps (track_commit_timestamp), with no slack; and nothing is
 * delivered before the gap event of the reconnect it came after.
 * KEEL_DRILL_SECONDS sets the length (default 16; the drill is 60). */
static uint64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* 700 single-row autocommit INSERTs a second, paced by the clock;
 * reconnects through the restart. */
static void *paced_writer(void *arg) {
  drill *d = arg;
  PGconn *conn = PQconnectdb(d->pg.conninfo);
  uint64_t next = now_us();
  while (!atomic_load(&d->stop)) {
    if (PQstatus(conn) != CONNECTION_OK) {
      usleep(20000);
      PQreset(conn);
      continue;
    }
    PGresult *res = PQexec(conn, "INSERT INTO drill DEFAULT VALUES");
    if (PQresultStatus(res) != PGRES_COMMAND_OK) atomic_fetch_add(&d->writer_errors, 1);
    PQclear(res);
    next += 1000000 / 700;
    uint64_t t = now_us();
    if (next > t) usleep((useconds_t)(next - t));
  }
  PQfinish(conn);
  return NULL;
}

/* Each fault hits a listener that is connected and caught up, so each one
 * must be reported by its own gap event (on a loaded machine a reconnect
 * can take longer than the step between faults). */
static void wait_active(drill *d) {
  uint64_t start = uv_now(&d->loop);
  while (!keel_listener_is_active(d->l) && uv_now(&d->loop) - start < 30000) run_for(d, 50);
  cr_assert(keel_listener_is_active(d->l), "the listener reconnected");
}

static void kill_private_listener(drill *d) {
  wait_active(d);
  kt_private_pg_exec(&d->pg,
                     "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                     "application_name = 'keel_drill'");
}

Test(listen_gaps, kills_and_a_restart_lose_nothing_outside_the_gaps, .timeout = 300) {
  static drill d;
  memset(&d, 0, sizeof d);
  const char *env = getenv("KEEL_DRILL_SECONDS");
  int seconds = env != NULL ? atoi(env) : 16;
  if (seconds < 8) seconds = 8;
  kt_private_pg_init(&d.pg, "-c track_commit_timestamp=on");
  kt_private_pg_ctl(&d.pg, "start", "fast");
  kt_private_pg_exec(&d.pg, "CREATE TABLE drill (id serial PRIMARY KEY)");
  char sql[8192];
  cr_assert_gt(keel_listener_install_sql(sql, sizeof sql, "drill", "id", "drill_changes"), 0);
  kt_private_pg_exec(&d.pg, sql);

  uv_loop_init(&d.loop);
  snprintf(d.conninfo, sizeof d.conninfo, "%s application_name=keel_drill", d.pg.conninfo);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = d.conninfo;
  o.table = "drill";
  o.channel = "drill_changes";
  o.heartbeat_ms = 200;
  o.connect_timeout_ms = 1000;
  keel_backoff_fixed(&o.reconnect_backoff, 100);
  o.on_gap = on_gap;
  o.data = &d;
  cr_assert_eq(keel_listener_new(&d.loop, &o, &d.l), 0);
  cr_assert_eq(keel_listener_on(d.l, "h", handler, &d), 0);
  cr_assert_eq(keel_listener_start(d.l), 0);
  uint64_t t0 = uv_now(&d.loop);
  while (!keel_listener_is_active(d.l) && uv_now(&d.loop) - t0 < 10000)
    uv_run(&d.loop, UV_RUN_ONCE);
  cr_assert(keel_listener_is_active(d.l));

  pthread_t thread;
  pthread_create(&thread, NULL, paced_writer, &d);
  uint64_t step = (uint64_t)seconds * 1000 / 5;
  run_for(&d, step);
  kill_private_listener(&d);
  run_for(&d, step);
  kill_private_listener(&d);
  run_for(&d, step);
  /* the loop does not run during the restart: the listener finds out later */
  wait_active(&d);
  kt_private_pg_ctl(&d.pg, "restart", "immediate");
  run_for(&d, step);
  kill_private_listener(&d);
  run_for(&d, step);
  atomic_store(&d.stop, true);
  pthread_join(thread, NULL);
  run_for(&d, 2000); /* the tail arrives */
  cr_assert_eq(d.gaps, 4, "each of the 4 faults reported by one gap (got %d)", d.gaps);
  cr_assert_eq(d.duplicates, 0);

  /* every committed row with its commit time */
  char cmd[1024];
  snprintf(cmd, sizeof cmd,
           "psql -X -At \"%s\" -c \"SELECT id, (extract(epoch from "
           "pg_xact_commit_timestamp(xmin)) * 1000000)::int8 FROM drill ORDER BY id\"",
           d.pg.conninfo);
  FILE *rows = popen(cmd, "r");
  cr_assert_not_null(rows);
  int committed = 0, missed = 0;
  int id;
  long long commit_us;
  while (fscanf(rows, "%d|%lld\n", &id, &commit_us) == 2) {
    committed++;
    cr_assert_lt(id, MAX_ROWS);
    if (d.delivered[id]) {
      /* delivered before gap j's event ⇒ committed before gap j's window end */
      for (int j = d.gaps_seen_at[id]; j < d.gaps; j++)
        cr_assert_lt(commit_us, d.to_us[j], "row %d (commit %lld) delivered before gap %d's event",
                     id, commit_us, j);
    } else {
      missed++;
      bool inside = false;
      for (int j = 0; j < d.gaps; j++)
        if (commit_us >= d.from_us[j] && commit_us <= d.to_us[j]) inside = true;
      if (!inside) {
        for (int j = 0; j < d.gaps; j++)
          cr_log_error("gap %d: [%lld, %lld]", j, (long long)d.from_us[j], (long long)d.to_us[j]);
      }
      cr_assert(inside, "row %d (commit %lld) was lost outside every gap window", id, commit_us);
    }
  }
  pclose(rows);
  /* The writer aims at 700/s; a loaded 2-core machine gave it 380-630/s,
   * and less under heavier load. What the drill needs is writes through
   * every fault: at least 60/s over the run. */
  cr_assert_gt(committed, seconds * 60, "the writer ran (%d rows)", committed);
  cr_log_info(
      "committed %d, delivered %d, missed %d (all inside the windows), gaps %d, writer "
      "errors %d",
      committed, d.delivered_count, missed, d.gaps, atomic_load(&d.writer_errors));
  fprintf(stderr, "drill: %d s, committed %d, delivered %d, missed %d inside %d gap windows\n",
          seconds, committed, d.delivered_count, missed, d.gaps);
  keel_listener_close(d.l, NULL, NULL);
  kt_loop_finish(&d.loop);
  kt_private_pg_destroy(&d.pg);
}
