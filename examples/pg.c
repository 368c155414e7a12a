/*
 * examples/pg.c — async PostgreSQL on a uv loop: a pool, parameterised
 * queries, results by column name, and a transaction.
 *
 * Run: KEEL_PG="host=... dbname=..." ./pg [--forever]
 * (falls back to KEEL_TEST_PG). Exits 0 when every step succeeded. With
 * --forever it repeats the query every second until Ctrl-C.
 */
#include <keel.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct app {
  keel_pg_pool *pool;
  int failures;
  int outstanding; /* the pool closes when both requests are done */
  bool forever;
  uv_timer_t again;
  uv_signal_t sigint;
} app;

static void finished_one(app *a) {
  if (--a->outstanding == 0 && !a->forever) keel_pg_pool_close(a->pool, NULL, NULL);
}

static void on_numbers(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  app *a = data;
  if (status != 0) {
    fprintf(stderr, "query failed: %s\n", keel_pg_last_error(c));
    a->failures++;
  } else {
    for (int row = 0; row < keel_pg_result_nrows(res); row++)
      printf("n=%s square=%s\n", keel_pg_result_get(res, row, "n"),
             keel_pg_result_get(res, row, "square"));
  }
  finished_one(a);
}

static void on_committed(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  app *a = data;
  if (status != 0) {
    fprintf(stderr, "transaction failed (%s): %s\n", sqlstate ? sqlstate : "-",
            keel_pg_pool_last_error(pool));
    a->failures++;
  } else {
    printf("transaction committed\n");
  }
  finished_one(a);
}

static void after_insert(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  printf("inserted %llu row(s)\n", (unsigned long long)keel_pg_result_affected(res));
  /* 0 commits; an error rolls back. */
  keel_pg_tx_done(data, status);
}

static void transfer(keel_pg_tx *tx, keel_pg *conn, void *data) {
  (void)data;
  keel_pg_query(conn, "CREATE TEMP TABLE IF NOT EXISTS notes (body text)", 0, NULL, NULL, NULL);
  const char *params[] = {"hello from keel"};
  keel_pg_query(conn, "INSERT INTO notes VALUES ($1)", 1, params, after_insert, tx);
}

static void on_numbers(keel_pg *c, int status, const keel_pg_result *res, void *data);

static void run_again(uv_timer_t *timer) {
  app *a = timer->data;
  const char *params[] = {"3"};
  a->outstanding++;
  if (keel_pg_pool_query(a->pool, "SELECT n, n * n AS square FROM generate_series(1, $1::int) AS n",
                         1, params, on_numbers, a) != 0)
    a->outstanding--;
}

static void on_sigint(uv_signal_t *sig, int signum) {
  (void)signum;
  app *a = sig->data;
  printf("stopping\n");
  uv_close((uv_handle_t *)&a->again, NULL);
  uv_close((uv_handle_t *)&a->sigint, NULL);
  keel_pg_pool_close(a->pool, NULL, NULL);
}

int main(int argc, char **argv) {
  const char *conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || conninfo[0] == '\0') conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL) {
    fprintf(stderr, "set KEEL_PG to a PostgreSQL connection string\n");
    return 1;
  }
  uv_loop_t *loop = uv_default_loop();
  app a = {0};
  a.outstanding = 2;
  a.forever = argc > 1 && strcmp(argv[1], "--forever") == 0;
  keel_pg_pool_opts opts;
  keel_pg_pool_opts_init(&opts);
  opts.conn.conninfo = conninfo;
  opts.size = 2;
  int rc = keel_pg_pool_new(loop, &opts, &a.pool);
  if (rc != 0) {
    fprintf(stderr, "keel_pg_pool_new: %s\n", keel_strerror(rc));
    return 1;
  }
  const char *params[] = {"5"};
  keel_pg_pool_query(a.pool, "SELECT n, n * n AS square FROM generate_series(1, $1::int) AS n", 1,
                     params, on_numbers, &a);
  keel_pg_pool_transaction(a.pool, KEEL_PG_READ_COMMITTED, transfer, on_committed, &a);
  if (a.forever) {
    uv_timer_init(loop, &a.again);
    a.again.data = &a;
    uv_timer_start(&a.again, run_again, 1000, 1000);
    uv_signal_init(loop, &a.sigint);
    a.sigint.data = &a;
    uv_signal_start(&a.sigint, on_sigint, SIGINT);
  }
  uv_run(loop, UV_RUN_DEFAULT);
  if (uv_loop_close(loop) != 0) return 1;
  return a.failures == 0 ? 0 : 1;
}
