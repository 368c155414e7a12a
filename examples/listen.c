/*
 * examples/listen.c — print filtered row changes as they happen.
 *
 * Creates a demo table (`keel_demo_projects`; `keel_demo_projects_<pid>` in
 * the finite run, dropped at the end), installs keel's trigger on it,
 * and listens for UPDATEs of team 123's projects (the seed's
 * RealtimeListener with event 'UPDATE' and filter 'team_id=eq.123').
 *
 * Run: KEEL_PG="host=... dbname=..." ./listen
 *        makes a few changes itself and exits 0 once it saw the two that
 *        match the filter
 *      ./listen --forever
 *        keeps listening until Ctrl-C; try from psql:
 *        UPDATE keel_demo_projects SET name = 'x' WHERE team_id = 123;
 */
#include <keel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct app {
  uv_loop_t *loop;
  keel_pg *admin; /* installs the trigger and makes the demo changes */
  keel_listener *listener;
  uv_signal_t sigint;
  bool forever;
  int seen;
  bool closing;
  char table[64];
  char sql[256];
} app;

/* Formats a statement about the demo table (one at a time: keel_pg_query
 * copies it). */
static const char *sql(app *a, const char *fmt) {
  snprintf(a->sql, sizeof a->sql, fmt, a->table, a->table);
  return a->sql;
}

static void close_admin(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  (void)data;
  if (status != 0 && status != UV_ECANCELED)
    fprintf(stderr, "dropping the demo table failed: %s\n", keel_pg_last_error(c));
  keel_pg_close(c, NULL, NULL);
}

static void shut_down(app *a) {
  if (a->closing) return;
  a->closing = true;
  keel_listener_close(a->listener, NULL, NULL);
  /* The finite run drops its table first (close would cancel the DROP). */
  if (a->forever ||
      keel_pg_query(a->admin, sql(a, "DROP TABLE IF EXISTS %s"), 0, NULL, close_admin, NULL) != 0)
    keel_pg_close(a->admin, NULL, NULL);
  if (!uv_is_closing((uv_handle_t *)&a->sigint)) uv_close((uv_handle_t *)&a->sigint, NULL);
}

/* The seed's onChange('project-list-component', payload => ...). */
static void on_project(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  app *a = data;
  printf("%s %s: id=%s name %s -> %s (team %s, %lld us after the change)\n",
         keel_change_operation_name(c), keel_change_table(c), keel_change_key(c, "id"),
         keel_change_old(c, "name"), keel_change_new(c, "name"), keel_change_new(c, "team_id"),
         (long long)keel_change_latency_us(c));
  if (++a->seen == 2 && !a->forever) shut_down(a);
}

static void on_gap(keel_listener *l, uint64_t ms, void *data) {
  (void)l;
  (void)data;
  printf("reconnected after %llu ms: changes in between may be missed, reload now\n",
         (unsigned long long)ms);
}

static void ignore(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  (void)data;
  if (status != 0 && status != UV_ECANCELED)
    fprintf(stderr, "demo statement failed: %s\n", keel_pg_last_error(c));
}

static void make_changes(app *a) {
  /* Two UPDATEs match the filter; the INSERT, and the UPDATE of team 7, don't. */
  keel_pg_query(a->admin, sql(a, "INSERT INTO %s (team_id, name) VALUES (123, 'new')"), 0, NULL,
                ignore, NULL);
  keel_pg_query(a->admin, sql(a, "UPDATE %s SET name = name || '!' WHERE team_id = 7"), 0, NULL,
                ignore, NULL);
  keel_pg_query(a->admin,
                sql(a, "UPDATE %s SET name = name || '!' WHERE team_id = 123 AND id <= 2"), 0, NULL,
                ignore, NULL);
}

/* Polls until the listener is active, then makes the demo changes. */
static void wait_active(uv_timer_t *timer) {
  app *a = timer->data;
  if (!keel_listener_is_active(a->listener)) return;
  uv_timer_stop(timer);
  uv_close((uv_handle_t *)timer, (uv_close_cb)free);
  if (!a->forever) make_changes(a);
  printf("listening for UPDATEs of team 123 (Ctrl-C to stop)\n");
}

static void on_installed(keel_pg *conn, int status, void *data) {
  app *a = data;
  if (status != 0) {
    fprintf(stderr, "install failed: %s\n", keel_pg_last_error(conn));
    shut_down(a);
    return;
  }
  keel_listener_start(a->listener);
  uv_timer_t *timer = malloc(sizeof *timer);
  uv_timer_init(a->loop, timer);
  timer->data = a;
  uv_timer_start(timer, wait_active, 10, 10);
}

static void on_table(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)res;
  app *a = data;
  if (status != 0) {
    fprintf(stderr, "setup failed: %s\n", keel_pg_last_error(conn));
    shut_down(a);
    return;
  }
  keel_listener_install(conn, a->table, "id", NULL, on_installed, a);
}

static void on_sigint(uv_signal_t *signal, int signum) {
  (void)signum;
  shut_down(signal->data);
}

int main(int argc, char **argv) {
  const char *conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || conninfo[0] == '\0') conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL) {
    fprintf(stderr, "set KEEL_PG to a PostgreSQL connection string\n");
    return 1;
  }
  app a;
  memset(&a, 0, sizeof a);
  a.loop = uv_default_loop();
  a.forever = argc > 1 && strcmp(argv[1], "--forever") == 0;
  if (a.forever)
    snprintf(a.table, sizeof a.table, "keel_demo_projects");
  else
    snprintf(a.table, sizeof a.table, "keel_demo_projects_%d", (int)getpid());

  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = conninfo;
  if (keel_pg_new(a.loop, &po, &a.admin) != 0) return 1;

  keel_listener_opts lo;
  keel_listener_opts_init(&lo);
  lo.conninfo = conninfo;
  lo.table = a.table;
  lo.events = KEEL_CHANGE_UPDATE;
  lo.filter = "team_id=eq.123";
  lo.on_gap = on_gap;
  lo.data = &a;
  char why[256];
  int rc = keel_listener_new_ex(a.loop, &lo, &a.listener, why, sizeof why);
  if (rc != 0) {
    fprintf(stderr, "keel_listener_new: %s\n", why);
    return 1;
  }
  keel_listener_on(a.listener, "project-list-component", on_project, &a);

  /* One statement per query (parameterised statements cannot be chained);
   * they run in order on the connection. */
  keel_pg_query(a.admin, sql(&a, "DROP TABLE IF EXISTS %s"), 0, NULL, ignore, NULL);
  keel_pg_query(a.admin, sql(&a, "CREATE TABLE %s (id serial PRIMARY KEY, team_id int, name text)"),
                0, NULL, ignore, NULL);
  keel_pg_query(a.admin,
                sql(&a,
                    "INSERT INTO %s (team_id, name) VALUES (123, 'apollo'), (123, 'gemini'), "
                    "(7, 'mercury')"),
                0, NULL, on_table, &a);
  uv_signal_init(a.loop, &a.sigint);
  a.sigint.data = &a;
  uv_signal_start_oneshot(&a.sigint, on_sigint, SIGINT);
  if (!a.forever) uv_unref((uv_handle_t *)&a.sigint);

  uv_run(a.loop, UV_RUN_DEFAULT);
  if (uv_loop_close(a.loop) != 0) return 1;
  return a.forever || a.seen == 2 ? 0 : 1;
}
