/*
 * The seed's orders example with keel's verifier: every order must have a
 * status, a completed order a completion_date, a paid order a payment_id.
 * Invalid orders are fixed asynchronously through a keel_pg_pool.
 *
 * Without arguments: creates a demo table, runs the verification twice
 * (the first run finds and fixes the bad rows, the second finds none),
 * drops the table and exits 0. With --forever: verifies every 10 s until
 * Ctrl-C.  Conninfo from KEEL_PG, else KEEL_TEST_PG.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keel.h"

typedef struct app {
  uv_loop_t *loop;
  keel_pg *setup;
  keel_pg_pool *pool;
  keel_verify *verifier;
  uv_signal_t sigint;
  char table[64];
  char fix_sql[512];
  bool forever;
  int runs;
  int exit_code;
} app;

/* ---- the validator: synchronous, names the problems it finds ------------- */

static bool validate_order(keel_verify *v, const keel_verify_row *order, void *data) {
  (void)v, (void)data;
  const char *status = keel_verify_row_get(order, "status");
  const char *payment_status = keel_verify_row_get(order, "payment_status");
  if (status == NULL) keel_verify_row_problem(order, "missing_status");
  if (status != NULL && strcmp(status, "completed") == 0 &&
      keel_verify_row_is_null(order, "completion_date"))
    keel_verify_row_problem(order, "missing_completion_date");
  if (payment_status != NULL && strcmp(payment_status, "paid") == 0 &&
      keel_verify_row_is_null(order, "payment_id"))
    keel_verify_row_problem(order, "missing_payment_id");
  return true; /* invalid as soon as a problem was named */
}

/* ---- the fix-up: asynchronous, reports with keel_verify_fix_done ---------- */

static void fixed(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c, (void)res;
  keel_verify_fix *fix = data;
  keel_verify_fix_done(fix, status); /* < 0: retried with the backoff policy */
}

static void fix_order(keel_verify *v, keel_verify_fix *fix, const keel_verify_row *order,
                      void *data) {
  (void)v;
  app *a = data;
  const char *id = keel_verify_row_get(order, "id");
  printf("fixing inconsistent order %s\n", id);
  const char *params[] = {id};
  int rc = keel_pg_pool_query(a->pool, a->fix_sql, 1, params, fixed, fix);
  if (rc < 0) keel_verify_fix_done(fix, rc);
}

/* ---- runs and shutdown ------------------------------------------------------- */

static void print_stats(app *a) {
  keel_verify_stats st;
  keel_verify_get_stats(a->verifier, &st);
  printf("run %" PRIu64 ": %" PRIu64 " rows, %" PRIu64 " invalid, %" PRIu64 " problems, %" PRIu64
         " fixed, %" PRIu64 " fix failures, %" PRIu64 " ms\n",
         st.runs_started, st.rows_last_run, st.rows_invalid, st.problems_last_run,
         st.fixes_succeeded, st.fixes_failed, st.last_run_duration_ms);
  for (unsigned i = 0; i < st.ncodes; i++)
    printf("  %-26s last run %" PRIu64 ", total %" PRIu64 "\n", st.top_codes[i].code,
           st.top_codes[i].last_run, st.top_codes[i].total);
}

static void shutdown_app(app *a) {
  char sql[128];
  snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", a->table);
  keel_verify_close(a->verifier, NULL, NULL);
  a->verifier = NULL;
  keel_pg_pool_close(a->pool, NULL, NULL);
  keel_pg_query(a->setup, sql, 0, NULL, NULL, NULL);
  keel_pg_close(a->setup, NULL, NULL); /* queued DROP runs first */
  if (!uv_is_closing((uv_handle_t *)&a->sigint)) uv_close((uv_handle_t *)&a->sigint, NULL);
}

static void run_done(keel_verify *v, int status, void *data) {
  app *a = data;
  a->runs++;
  if (status < 0) {
    fprintf(stderr, "run failed: %s (%s)\n", keel_err_name(status), keel_verify_last_error(v));
    a->exit_code = 1;
    shutdown_app(a);
    return;
  }
  print_stats(a);
  if (a->forever) return;
  keel_verify_stats st;
  keel_verify_get_stats(v, &st);
  if (a->runs == 1) {
    if (st.problems_last_run == 0) a->exit_code = 1; /* the demo rows are bad */
    keel_verify_run_now(v);                          /* verify the fixes */
    return;
  }
  if (st.problems_last_run != 0) a->exit_code = 1;
  printf("second run found %" PRIu64 " problems\n", st.problems_last_run);
  shutdown_app(a);
}

static void on_sigint(uv_signal_t *s, int signum) {
  (void)signum;
  shutdown_app(s->data);
}

static void setup_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  app *a = data;
  if (status < 0) {
    fprintf(stderr, "setup failed: %s\n", keel_pg_last_error(c));
    a->exit_code = 1;
    shutdown_app(a);
    return;
  }
  keel_verify_opts o;
  keel_verify_opts_init(&o);
  o.pool = a->pool;
  o.table = a->table;
  o.id_columns[0] = "id";
  o.batch_size = 50; /* the seed's */
  o.interval_ms = a->forever ? 10000 : 3600 * 1000;
  o.validate = validate_order;
  o.fix = fix_order;
  o.fix_concurrency = 4;
  o.on_run_done = run_done;
  o.data = a;
  int rc = keel_verify_new(a->loop, &o, &a->verifier);
  if (rc < 0) {
    fprintf(stderr, "keel_verify_new: %s\n", keel_strerror(rc));
    a->exit_code = 1;
    shutdown_app(a);
    return;
  }
  if (a->forever)
    keel_verify_start(a->verifier);
  else
    keel_verify_run_now(a->verifier);
}

int main(int argc, char **argv) {
  const char *conninfo = getenv("KEEL_PG");
  if (conninfo == NULL) conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL) {
    fprintf(stderr, "set KEEL_PG to a PostgreSQL connection string\n");
    return 1;
  }
  app a;
  memset(&a, 0, sizeof a);
  a.loop = uv_default_loop();
  a.forever = argc > 1 && strcmp(argv[1], "--forever") == 0;
  snprintf(a.table, sizeof a.table, "keel_example_orders_%ld", (long)getpid());
  snprintf(a.fix_sql, sizeof a.fix_sql,
           "UPDATE %s SET status = COALESCE(status, 'pending'), "
           "completion_date = CASE WHEN status = 'completed' "
           "THEN COALESCE(completion_date, updated_at) ELSE completion_date END, "
           "payment_id = CASE WHEN payment_status = 'paid' "
           "THEN COALESCE(payment_id, 'needs-review') ELSE payment_id END WHERE id = $1",
           a.table);

  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = conninfo;
  keel_pg_pool_opts pp;
  keel_pg_pool_opts_init(&pp);
  pp.conn.conninfo = conninfo;
  pp.size = 2;
  if (keel_pg_new(a.loop, &po, &a.setup) < 0 || keel_pg_pool_new(a.loop, &pp, &a.pool) < 0) {
    fprintf(stderr, "cannot create connections\n");
    return 1;
  }
  uv_signal_init(a.loop, &a.sigint);
  a.sigint.data = &a;
  uv_signal_start(&a.sigint, on_sigint, SIGINT);
  if (!a.forever) uv_unref((uv_handle_t *)&a.sigint);

  char sql[512];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id bigint PRIMARY KEY, status text, payment_status text, "
           "payment_id text, completion_date timestamptz, updated_at timestamptz NOT NULL "
           "DEFAULT now())",
           a.table);
  keel_pg_query(a.setup, sql, 0, NULL, NULL, NULL);
  /* 500 orders; some completed without a date, some paid without a payment id,
   * one without a status */
  snprintf(sql, sizeof sql,
           "INSERT INTO %s (id, status, payment_status, payment_id, completion_date) "
           "SELECT g, CASE WHEN g = 77 THEN NULL WHEN g %% 9 = 0 THEN 'completed' ELSE 'open' END, "
           "CASE WHEN g %% 4 = 0 THEN 'paid' ELSE 'unpaid' END, "
           "CASE WHEN g %% 4 = 0 AND g %% 13 <> 0 THEN 'pay_' || g END, "
           "CASE WHEN g %% 9 = 0 AND g %% 2 = 0 THEN now() END "
           "FROM generate_series(1, 500) g",
           a.table);
  keel_pg_query(a.setup, sql, 0, NULL, setup_done, &a);

  uv_run(a.loop, UV_RUN_DEFAULT);
  if (uv_loop_close(a.loop) != 0) {
    fprintf(stderr, "handles left open\n");
    return 1;
  }
  return a.exit_code;
}
