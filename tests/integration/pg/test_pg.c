/* Async PostgreSQL layer against the real server of the harness: queries,
 * pipelining, errors, reconnect after a killed backend, pool, transactions,
 * notifications, close. */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "keel/pg.h"
#include "support/harness.h"

typedef struct ctx {
  uv_loop_t loop;
  keel_pg *c;
  int results;
  int statuses[256];
  char values[256][64];
  char sqlstate[8];
  int ups, downs;
  int notifies;
  char notify_payload[128];
  bool done;
} ctx;

static void on_state(keel_pg *c, bool up, int status, void *data) {
  (void)c;
  (void)status;
  ctx *x = data;
  if (up)
    x->ups++;
  else
    x->downs++;
}

static void on_notify(keel_pg *c, const char *channel, const char *payload, int pid, void *data) {
  (void)c;
  (void)channel;
  (void)pid;
  ctx *x = data;
  x->notifies++;
  snprintf(x->notify_payload, sizeof x->notify_payload, "%s", payload);
}

static void open_conn(ctx *x) {
  memset(x, 0, sizeof *x);
  uv_loop_init(&x->loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.on_state = on_state;
  o.on_notify = on_notify;
  o.data = x;
  keel_backoff_fixed(&o.reconnect_backoff, 50);
  cr_assert_eq(keel_pg_new(&x->loop, &o, &x->c), 0);
}

static void close_conn(ctx *x) {
  keel_pg_close(x->c, NULL, NULL);
  kt_loop_finish(&x->loop);
}

static void store(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  ctx *x = data;
  int i = x->results++;
  x->statuses[i] = status;
  const char *v = keel_pg_result_value(res, 0, 0);
  snprintf(x->values[i], sizeof x->values[i], "%s", v ? v : "(null)");
  const char *state = keel_pg_result_sqlstate(res);
  if (state != NULL) snprintf(x->sqlstate, sizeof x->sqlstate, "%s", state);
}

static void wait_results(ctx *x, int n) {
  uint64_t start = uv_now(&x->loop);
  while (x->results < n && uv_now(&x->loop) - start < 10000) uv_run(&x->loop, UV_RUN_ONCE);
  cr_assert_eq(x->results, n, "results %d of %d", x->results, n);
}

Test(pg, connect_and_query_with_params_and_null) {
  ctx x;
  open_conn(&x);
  const char *params[] = {"41", NULL};
  cr_assert_eq(keel_pg_query(x.c, "SELECT $1::int + 1, $2::text IS NULL", 2, params, store, &x), 0);
  cr_assert_eq(x.results, 0, "never called inside keel_pg_query");
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], 0);
  cr_assert_str_eq(x.values[0], "42");
  cr_assert(keel_pg_is_connected(x.c));
  /* Through a pooler it is the pooler's cancel key, any non-zero number. */
  if (kt_behind_pooler())
    cr_assert_neq(keel_pg_backend_pid(x.c), 0);
  else
    cr_assert_gt(keel_pg_backend_pid(x.c), 0);
  cr_assert_eq(x.ups, 1);
  close_conn(&x);
}

static void check_columns(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  ctx *x = data;
  cr_assert_eq(status, 0);
  cr_assert_eq(keel_pg_result_nrows(res), 2);
  cr_assert_eq(keel_pg_result_ncols(res), 3);
  cr_assert_eq(keel_pg_result_col(res, "Name"), 1, "exact, case-sensitive names");
  cr_assert_eq(keel_pg_result_col(res, "missing"), -1);
  cr_assert_str_eq(keel_pg_result_get(res, 0, "Name"), "a");
  cr_assert_null(keel_pg_result_get(res, 1, "note"));
  cr_assert(keel_pg_result_is_null(res, 1, 2));
  cr_assert(!keel_pg_result_is_null(res, 0, 2));
  cr_assert_eq(keel_pg_result_length(res, 0, 2), 3);
  cr_assert_null(keel_pg_result_value(res, 5, 0), "out of range is NULL");
  cr_assert_str_eq(keel_pg_result_col_name(res, 0), "id");
  cr_assert_not_null(keel_pg_result_raw(res));
  x->results++;
}

Test(pg, results_by_name_and_null_aware) {
  ctx x;
  open_conn(&x);
  keel_pg_query(x.c,
                "SELECT * FROM (VALUES (1, 'a', 'xyz'), (2, 'b', NULL)) AS t(id, \"Name\", note) "
                "ORDER BY id",
                0, NULL, check_columns, &x);
  wait_results(&x, 1);
  close_conn(&x);
}

Test(pg, pipeline_keeps_order_and_isolates_errors) {
  ctx x;
  open_conn(&x);
  enum { N = 200 };
  char num[16];
  for (int i = 0; i < N; i++) {
    snprintf(num, sizeof num, "%d", i);
    const char *p[] = {num};
    const char *sql = i == 100 ? "SELECT 1/0" : "SELECT $1::int";
    cr_assert_eq(keel_pg_query(x.c, sql, i == 100 ? 0 : 1, i == 100 ? NULL : p, store, &x), 0);
  }
  wait_results(&x, N);
  for (int i = 0; i < N; i++) {
    if (i == 100) {
      cr_assert_eq(x.statuses[i], KEEL_EPG);
      continue;
    }
    cr_assert_eq(x.statuses[i], 0, "statement %d", i);
    snprintf(num, sizeof num, "%d", i);
    cr_assert_str_eq(x.values[i], num, "in order");
  }
  cr_assert_str_eq(x.sqlstate, "22012");
  cr_assert(strstr(keel_pg_last_error(x.c), "22012") != NULL);
  keel_pg_stats s;
  keel_pg_get_stats(x.c, &s);
  cr_assert_eq(s.queries, N);
  cr_assert_eq(s.errors, 1);
  close_conn(&x);
}

Test(pg, unique_violation_reports_sqlstate) {
  char table[64], sql[256];
  kt_unique_name(table, sizeof table, "uniq");
  snprintf(sql, sizeof sql, "CREATE TABLE %s (id int PRIMARY KEY)", table);
  kt_pg_exec(sql);
  ctx x;
  open_conn(&x);
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (1)", table);
  keel_pg_query(x.c, sql, 0, NULL, store, &x);
  keel_pg_query(x.c, sql, 0, NULL, store, &x);
  wait_results(&x, 2);
  cr_assert_eq(x.statuses[0], 0);
  cr_assert_eq(x.statuses[1], KEEL_EPG);
  cr_assert_str_eq(x.sqlstate, "23505");
  close_conn(&x);
  snprintf(sql, sizeof sql, "DROP TABLE %s", table);
  kt_pg_exec(sql);
}

Test(pg, killed_backend_fails_in_flight_and_reconnects) {
  KT_SKIP_BEHIND_POOLER("kills its own backend by pid (a pooler's pid is not a server's)");
  ctx x;
  open_conn(&x);
  keel_pg_query(x.c, "SELECT 1", 0, NULL, store, &x);
  wait_results(&x, 1);
  int pid = keel_pg_backend_pid(x.c);
  cr_assert_gt(pid, 0);
  keel_pg_query(x.c, "SELECT pg_sleep(5)", 0, NULL, store, &x);
  uv_run(&x.loop, UV_RUN_NOWAIT);
  char sql[128];
  snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)", pid);
  free(kt_pg_scalar(sql));
  wait_results(&x, 2);
  /* Sent in autocommit, lost before its reply: it may have run. */
  cr_assert_eq(x.statuses[1], KEEL_EINDOUBT, "in flight: %s", keel_err_name(x.statuses[1]));
  cr_assert_eq(x.downs, 1);
  /* A statement queued while down runs after the reconnect. */
  keel_pg_query(x.c, "SELECT 7", 0, NULL, store, &x);
  wait_results(&x, 3);
  cr_assert_eq(x.statuses[2], 0);
  cr_assert_str_eq(x.values[2], "7");
  cr_assert_eq(x.ups, 2);
  cr_assert_neq(keel_pg_backend_pid(x.c), pid);
  keel_pg_stats s;
  keel_pg_get_stats(x.c, &s);
  cr_assert_eq(s.connects, 2);
  cr_assert_eq(s.disconnects, 1);
  cr_assert_geq(s.reconnects, 1);
  close_conn(&x);
}

Test(pg, unreachable_server_reports_down_and_times_out_queries) {
  ctx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = "host=127.0.0.1 port=1 user=nobody dbname=none connect_timeout=2";
  o.on_state = on_state;
  o.data = &x;
  o.query_timeout_ms = 300;
  keel_backoff_fixed(&o.reconnect_backoff, 50);
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  keel_pg_query(x.c, "SELECT 1", 0, NULL, store, &x);
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], UV_ETIMEDOUT);
  cr_assert_geq(x.downs, 2, "retries while down");
  cr_assert_eq(x.ups, 0);
  cr_assert_str_neq(keel_pg_last_error(x.c), "");
  close_conn(&x);
}

Test(pg, close_with_queries_in_flight_cancels_each_once) {
  ctx x;
  open_conn(&x);
  keel_pg_query(x.c, "SELECT 1", 0, NULL, store, &x);
  wait_results(&x, 1);
  for (int i = 0; i < 5; i++) keel_pg_query(x.c, "SELECT pg_sleep(1)", 0, NULL, store, &x);
  uv_run(&x.loop, UV_RUN_NOWAIT);
  keel_pg_close(x.c, NULL, NULL);
  cr_assert_eq(x.results, 1, "no callback runs inside close");
  cr_assert_eq(keel_pg_query(x.c, "SELECT 1", 0, NULL, store, &x), KEEL_ECLOSING);
  kt_loop_finish(&x.loop);
  cr_assert_eq(x.results, 6);
  for (int i = 1; i < 6; i++) cr_assert_eq(x.statuses[i], UV_ECANCELED);
}

static void close_inside(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  store(c, status, res, data);
  keel_pg_close(c, NULL, NULL);
}

Test(pg, close_from_inside_a_result_callback) {
  ctx x;
  open_conn(&x);
  keel_pg_query(x.c, "SELECT 1", 0, NULL, close_inside, &x);
  keel_pg_query(x.c, "SELECT 2", 0, NULL, store, &x);
  keel_pg_query(x.c, "SELECT 3", 0, NULL, store, &x);
  kt_loop_finish(&x.loop);
  cr_assert_eq(x.results, 3);
  cr_assert_eq(x.statuses[0], 0);
  cr_assert_eq(x.statuses[1], UV_ECANCELED);
  cr_assert_eq(x.statuses[2], UV_ECANCELED);
}

Test(pg, listen_notify) {
  KT_SKIP_BEHIND_POOLER("LISTEN needs a session of its own");
  ctx x;
  open_conn(&x);
  char channel[64], sql[160];
  kt_unique_name(channel, sizeof channel, "chan");
  snprintf(sql, sizeof sql, "LISTEN %s", channel);
  keel_pg_query(x.c, sql, 0, NULL, store, &x);
  wait_results(&x, 1);
  snprintf(sql, sizeof sql, "SELECT pg_notify('%s', 'hello')", channel);
  free(kt_pg_scalar(sql));
  uint64_t start = uv_now(&x.loop);
  while (x.notifies == 0 && uv_now(&x.loop) - start < 5000) uv_run(&x.loop, UV_RUN_ONCE);
  cr_assert_eq(x.notifies, 1);
  cr_assert_str_eq(x.notify_payload, "hello");
  close_conn(&x);
}

Test(pg, invalid_input) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  keel_pg *c = (keel_pg *)0x1;
  cr_assert_eq(keel_pg_new(&loop, &o, &c), UV_EINVAL, "conninfo required");
  cr_assert_eq(c, (keel_pg *)0x1);
  o.conninfo = kt_pg_conninfo();
  cr_assert_eq(keel_pg_new(&loop, &o, &c), 0);
  cr_assert_eq(keel_pg_query(c, NULL, 0, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_query(c, "SELECT $1", 1, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_query(NULL, "SELECT 1", 0, NULL, NULL, NULL), UV_EINVAL);
  keel_pg_close(c, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(pg, quote_ident) {
  char buf[160];
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "orders", false), 8);
  cr_assert_str_eq(buf, "\"orders\"");
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "app.Orders", true), 14);
  cr_assert_str_eq(buf, "\"app\".\"Orders\"");
  keel_pg_quote_ident(buf, sizeof buf, "we\"ird", false);
  cr_assert_str_eq(buf, "\"we\"\"ird\"");
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "a.b", false), UV_EINVAL);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "a.b.c", true), UV_EINVAL);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "", true), UV_EINVAL);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, ".x", true), UV_EINVAL);
  char long_name[80];
  memset(long_name, 'x', 64);
  long_name[64] = '\0';
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, long_name, false), UV_EINVAL);
  cr_assert_eq(keel_pg_quote_ident(buf, 4, "orders", false), UV_ENOBUFS);
}

/* ---- pool and transactions ------------------------------------------------ */

typedef struct pool_ctx {
  uv_loop_t loop;
  keel_pg_pool *pool;
  int results;
  int order[64];
  int statuses[64];
  int tx_status[8];
  char tx_sqlstate[8][8];
  int tx_done;
  char table[64];
} pool_ctx;

static void pool_store(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  pool_ctx *p = data;
  p->statuses[p->results++] = status;
}

static void open_pool(pool_ctx *p, unsigned size) {
  memset(p, 0, sizeof *p);
  uv_loop_init(&p->loop);
  keel_pg_pool_opts o;
  keel_pg_pool_opts_init(&o);
  o.conn.conninfo = kt_pg_conninfo();
  o.size = size;
  cr_assert_eq(keel_pg_pool_new(&p->loop, &o, &p->pool), 0);
}

static void pool_wait(pool_ctx *p, int *counter, int n) {
  uint64_t start = uv_now(&p->loop);
  while (*counter < n && uv_now(&p->loop) - start < 10000) uv_run(&p->loop, UV_RUN_ONCE);
  cr_assert_eq(*counter, n);
}

Test(pg, pool_runs_more_queries_than_connections) {
  pool_ctx p;
  open_pool(&p, 3);
  for (int i = 0; i < 30; i++)
    cr_assert_eq(keel_pg_pool_query(p.pool, "SELECT pg_sleep(0.01)", 0, NULL, pool_store, &p), 0);
  keel_pg_pool_stats s;
  keel_pg_pool_get_stats(p.pool, &s);
  cr_assert_eq(s.waiting, 30);
  pool_wait(&p, &p.results, 30);
  for (int i = 0; i < 30; i++) cr_assert_eq(p.statuses[i], 0);
  keel_pg_pool_get_stats(p.pool, &s);
  cr_assert_eq(s.queries, 30);
  cr_assert_eq(s.connected, 3);
  cr_assert_eq(s.size, 3);
  keel_pg_pool_close(p.pool, NULL, NULL);
  kt_loop_finish(&p.loop);
}

typedef struct acquire_ctx {
  pool_ctx *p;
  int id;
} acquire_ctx;

static void on_acquired(keel_pg_pool *pool, keel_pg *conn, int status, void *data) {
  acquire_ctx *a = data;
  cr_assert_eq(status, 0);
  a->p->order[a->p->results++] = a->id;
  keel_pg_pool_release(pool, conn);
}

Test(pg, pool_waiters_are_served_fifo) {
  pool_ctx p;
  open_pool(&p, 1);
  acquire_ctx a[10];
  for (int i = 0; i < 10; i++) {
    a[i] = (acquire_ctx){&p, i};
    keel_pg_pool_acquire(p.pool, on_acquired, &a[i]);
  }
  pool_wait(&p, &p.results, 10);
  for (int i = 0; i < 10; i++) cr_assert_eq(p.order[i], i);
  cr_assert_eq(keel_pg_pool_release(p.pool, NULL), UV_EINVAL);
  keel_pg_pool_close(p.pool, NULL, NULL);
  kt_loop_finish(&p.loop);
}

typedef struct tx_body_ctx {
  pool_ctx *p;
  bool fail_statement;
  int slot;
  keel_pg_tx *tx;
} tx_body_ctx;

static void after_insert(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  (void)status;
  tx_body_ctx *b = data;
  /* The body reports success even when its statement failed: the helper
   * must still roll back. */
  keel_pg_tx_finish(b->tx, 0);
}

static void tx_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  tx_body_ctx *b = data;
  b->tx = tx;
  char sql[200];
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (%d)", b->p->table,
           b->fail_statement ? 1 : 100 + b->slot);
  keel_pg_query(conn, sql, 0, NULL, after_insert, b);
}

static void tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool;
  tx_body_ctx *b = data;
  b->p->tx_status[b->slot] = status;
  snprintf(b->p->tx_sqlstate[b->slot], 8, "%s", sqlstate ? sqlstate : "");
  b->p->tx_done++;
}

Test(pg, transactions_commit_and_roll_back) {
  pool_ctx p;
  open_pool(&p, 2);
  kt_unique_name(p.table, sizeof p.table, "tx");
  char sql[200];
  snprintf(sql, sizeof sql, "CREATE TABLE %s (id int PRIMARY KEY); INSERT INTO %s VALUES (1)",
           p.table, p.table);
  kt_pg_exec(sql);
  tx_body_ctx ok = {&p, false, 0, NULL};
  tx_body_ctx dup = {&p, true, 1, NULL}; /* inserts 1 again: unique violation */
  cr_assert_eq(keel_pg_pool_transaction(p.pool, KEEL_PG_READ_COMMITTED, tx_body, tx_done, &ok), 0);
  cr_assert_eq(keel_pg_pool_transaction(p.pool, KEEL_PG_SERIALIZABLE, tx_body, tx_done, &dup), 0);
  pool_wait(&p, &p.tx_done, 2);
  cr_assert_eq(p.tx_status[0], 0);
  cr_assert_eq(p.tx_status[1], KEEL_EPG, "the failed statement rolls the transaction back");
  cr_assert_str_eq(p.tx_sqlstate[1], "23505");
  keel_pg_pool_stats s;
  keel_pg_pool_get_stats(p.pool, &s);
  cr_assert_eq(s.transactions, 1);
  cr_assert_eq(s.rollbacks, 1);
  keel_pg_pool_close(p.pool, NULL, NULL);
  kt_loop_finish(&p.loop);
  snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", p.table);
  char *count = kt_pg_scalar(sql);
  cr_assert_str_eq(count, "2", "row 100 committed, nothing else");
  free(count);
}

/* ---- more transactions ------------------------------------------------------ */

typedef struct tx2 {
  pool_ctx *p;
  keel_pg_tx *tx;
  keel_pg *conn;
  int step;
  int stmt_status;
  int pid;
  bool wait_for_up;
} tx2;

static void user_error_step(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  tx2 *t = data;
  t->stmt_status = status;
  keel_pg_tx_finish(t->tx, UV_EINVAL); /* the user's own error: roll back */
}

static void user_error_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  tx2 *t = data;
  t->tx = tx;
  cr_assert_eq(keel_pg_pool_release(t->p->pool, conn), UV_EINVAL,
               "a transaction's connection is not released by hand");
  char sql[200];
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (5)", t->p->table);
  cr_assert_eq(keel_pg_query(conn, sql, 0, NULL, user_error_step, t), 0);
}

static void tx2_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool;
  tx2 *t = data;
  t->p->tx_status[0] = status;
  snprintf(t->p->tx_sqlstate[0], 8, "%s", sqlstate ? sqlstate : "");
  t->p->tx_done++;
}

static char *count_rows(const char *table) {
  char sql[160];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
  return kt_pg_scalar(sql);
}

Test(pg, transaction_rolls_back_on_user_error) {
  pool_ctx p;
  open_pool(&p, 1);
  kt_unique_name(p.table, sizeof p.table, "txu");
  char sql[200];
  snprintf(sql, sizeof sql, "CREATE TABLE %s (id int PRIMARY KEY)", p.table);
  kt_pg_exec(sql);
  tx2 t = {.p = &p};
  cr_assert_eq(
      keel_pg_pool_transaction(p.pool, KEEL_PG_REPEATABLE_READ, user_error_body, tx2_done, &t), 0);
  pool_wait(&p, &p.tx_done, 1);
  cr_assert_eq(t.stmt_status, 0, "the statement itself succeeded");
  cr_assert_eq(p.tx_status[0], UV_EINVAL, "done gets the user's error");
  cr_assert_str_eq(p.tx_sqlstate[0], "");
  keel_pg_pool_stats s;
  keel_pg_pool_get_stats(p.pool, &s);
  cr_assert_eq(s.rollbacks, 1);
  cr_assert_eq(s.transactions, 0);
  /* The connection went back to the pool usable (no open transaction). */
  cr_assert_eq(keel_pg_pool_query(p.pool, "SELECT 1", 0, NULL, pool_store, &p), 0);
  pool_wait(&p, &p.results, 1);
  cr_assert_eq(p.statuses[0], 0);
  keel_pg_pool_close(p.pool, NULL, NULL);
  kt_loop_finish(&p.loop);
  char *n = count_rows(p.table);
  cr_assert_str_eq(n, "0", "rolled back");
  free(n);
}

static void serial_update_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  tx2 *t = data;
  t->stmt_status = status;
  keel_pg_tx_finish(t->tx, 0);
}

static void serial_read_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  tx2 *t = data;
  cr_assert_eq(status, 0);
  /* Another session changes the row after this transaction's snapshot. */
  char sql[200];
  snprintf(sql, sizeof sql, "UPDATE %s SET v = v + 1 WHERE id = 1", t->p->table);
  kt_pg_exec(sql);
  snprintf(sql, sizeof sql, "UPDATE %s SET v = v + 10 WHERE id = 1", t->p->table);
  cr_assert_eq(keel_pg_query(c, sql, 0, NULL, serial_update_done, t), 0);
}

static void serial_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  tx2 *t = data;
  t->tx = tx;
  char sql[200];
  snprintf(sql, sizeof sql, "SELECT v FROM %s WHERE id = 1", t->p->table);
  cr_assert_eq(keel_pg_query(conn, sql, 0, NULL, serial_read_done, t), 0);
}

Test(pg, serialization_failure_reports_40001) {
  pool_ctx p;
  open_pool(&p, 1);
  kt_unique_name(p.table, sizeof p.table, "txs");
  char sql[200];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id int PRIMARY KEY, v int); INSERT INTO %s VALUES (1, 0)", p.table,
           p.table);
  kt_pg_exec(sql);
  tx2 t = {.p = &p};
  cr_assert_eq(keel_pg_pool_transaction(p.pool, KEEL_PG_SERIALIZABLE, serial_body, tx2_done, &t),
               0);
  pool_wait(&p, &p.tx_done, 1);
  cr_assert_eq(t.stmt_status, KEEL_EPG);
  cr_assert_eq(p.tx_status[0], KEEL_EPG);
  cr_assert_str_eq(p.tx_sqlstate[0], "40001");
  cr_assert(strstr(keel_pg_pool_last_error(p.pool), "40001") != NULL, "%s",
            keel_pg_pool_last_error(p.pool));
  keel_pg_pool_close(p.pool, NULL, NULL);
  kt_loop_finish(&p.loop);
  snprintf(sql, sizeof sql, "SELECT v FROM %s WHERE id = 1", p.table);
  char *v = kt_pg_scalar(sql);
  cr_assert_str_eq(v, "1", "only the other session's update");
  free(v);
}

/* A connection lost in the middle of a transaction: later statements of the
 * body must not run in autocommit on the new session. */
static tx2 *lost_tx;

static void lost_insert_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  tx2 *t = data;
  t->stmt_status = status;
  keel_pg_tx_finish(t->tx, 0);
}

static void lost_pool_state(keel_pg *c, bool up, int status, void *data) {
  (void)status;
  (void)data;
  tx2 *t = lost_tx;
  if (!up || t == NULL || !t->wait_for_up || c != t->conn) return;
  t->wait_for_up = false;
  char sql[200];
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (7)", t->p->table);
  cr_assert_eq(keel_pg_query(c, sql, 0, NULL, lost_insert_done, t), 0);
}

static void lost_pid_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  tx2 *t = data;
  cr_assert_eq(status, 0);
  char sql[100];
  snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%s)", keel_pg_result_value(res, 0, 0));
  t->wait_for_up = true;
  free(kt_pg_scalar(sql));
}

static void lost_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  tx2 *t = data;
  t->tx = tx;
  t->conn = conn;
  cr_assert_eq(keel_pg_query(conn, "SELECT pg_backend_pid()", 0, NULL, lost_pid_done, t), 0);
}

Test(pg, transaction_broken_by_reconnect_fails_with_econn) {
  pool_ctx p;
  memset(&p, 0, sizeof p);
  uv_loop_init(&p.loop);
  keel_pg_pool_opts o;
  keel_pg_pool_opts_init(&o);
  o.conn.conninfo = kt_pg_conninfo();
  o.conn.on_state = lost_pool_state;
  keel_backoff_fixed(&o.conn.reconnect_backoff, 20);
  o.size = 1;
  cr_assert_eq(keel_pg_pool_new(&p.loop, &o, &p.pool), 0);
  kt_unique_name(p.table, sizeof p.table, "txl");
  char sql[200];
  snprintf(sql, sizeof sql, "CREATE TABLE %s (id int PRIMARY KEY)", p.table);
  kt_pg_exec(sql);
  tx2 t = {.p = &p};
  lost_tx = &t;
  cr_assert_eq(keel_pg_pool_transaction(p.pool, KEEL_PG_READ_COMMITTED, lost_body, tx2_done, &t),
               0);
  pool_wait(&p, &p.tx_done, 1);
  cr_assert_eq(t.stmt_status, KEEL_ECONN, "%s", keel_err_name(t.stmt_status));
  cr_assert_eq(p.tx_status[0], KEEL_ECONN, "%s", keel_err_name(p.tx_status[0]));
  /* The pool still works on the new session. */
  cr_assert_eq(keel_pg_pool_query(p.pool, "SELECT 1", 0, NULL, pool_store, &p), 0);
  pool_wait(&p, &p.results, 1);
  cr_assert_eq(p.statuses[0], 0);
  keel_pg_pool_close(p.pool, NULL, NULL);
  kt_loop_finish(&p.loop);
  lost_tx = NULL;
  char *n = count_rows(p.table);
  cr_assert_str_eq(n, "0", "nothing ran outside the transaction");
  free(n);
}

/* ---- close while connecting, allocation failure ----------------------------- */

static void count_close(void *object, void *data) {
  (void)object;
  ++*(int *)data;
}

Test(pg, close_while_connecting_and_while_waiting_to_reconnect) {
  ctx x;
  open_conn(&x);
  keel_pg_query(x.c, "SELECT 1", 0, NULL, store, &x);
  int closed = 0;
  keel_pg_close(x.c, count_close, &closed);
  cr_assert_eq(closed, 0, "close callback runs later");
  cr_assert_eq(x.results, 0, "the cancelled query's callback runs later too");
  uv_run(&x.loop, UV_RUN_DEFAULT);
  cr_assert_eq(x.results, 1);
  cr_assert_eq(x.statuses[0], UV_ECANCELED);
  cr_assert_eq(closed, 1);
  cr_assert_eq(x.ups, 0);
  cr_assert_eq(uv_loop_close(&x.loop), 0);

  /* A closed port: down, backoff timer armed, then close. */
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = "host=127.0.0.1 port=1 user=nobody dbname=none";
  o.on_state = on_state;
  o.data = &x;
  keel_backoff_fixed(&o.reconnect_backoff, 1000);
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  uint64_t start = uv_now(&x.loop);
  /* The first attempt runs from a timer (never inside keel_pg_new), and
   * UV_RUN_ONCE may then wait for the backoff timer: one or two downs. */
  while (x.downs == 0 && uv_now(&x.loop) - start < 5000) uv_run(&x.loop, UV_RUN_ONCE);
  cr_assert_geq(x.downs, 1);
  cr_assert(!keel_pg_is_connected(x.c));
  keel_pg_close(x.c, count_close, &closed);
  uv_run(&x.loop, UV_RUN_DEFAULT);
  cr_assert_eq(closed, 2);
  cr_assert_eq(uv_loop_close(&x.loop), 0);
}

Test(pg, allocation_failure_during_new_is_clean) {
  kt_alloc_install();
  bool conn_ok = false, pool_ok = false;
  for (int64_t i = 0; i < 64 && !(conn_ok && pool_ok); i++) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    int64_t blocks = kt_alloc_live_blocks();
    keel_pg_opts o;
    keel_pg_opts_init(&o);
    o.conninfo = kt_pg_conninfo();
    keel_pg *c = (keel_pg *)0x1;
    kt_alloc_fail_after(i);
    int rc = keel_pg_new(&loop, &o, &c);
    kt_alloc_fail_after(-1);
    if (rc == 0) {
      conn_ok = true;
      keel_pg_close(c, NULL, NULL);
    } else {
      cr_assert_eq(rc, UV_ENOMEM);
      cr_assert_eq(c, (keel_pg *)0x1, "out untouched");
    }
    keel_pg_pool_opts po;
    keel_pg_pool_opts_init(&po);
    po.conn.conninfo = kt_pg_conninfo();
    po.size = 3;
    keel_pg_pool *p = (keel_pg_pool *)0x1;
    kt_alloc_fail_after(i);
    rc = keel_pg_pool_new(&loop, &po, &p);
    kt_alloc_fail_after(-1);
    if (rc == 0) {
      pool_ok = true;
      keel_pg_pool_close(p, NULL, NULL);
    } else {
      cr_assert_eq(rc, UV_ENOMEM);
      cr_assert_eq(p, (keel_pg_pool *)0x1, "out untouched");
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0, "no handle left (i = %lld)", (long long)i);
    cr_assert_eq(kt_alloc_live_blocks(), blocks, "no leak (i = %lld)", (long long)i);
  }
  cr_assert(conn_ok && pool_ok);
}

/* ---- timeouts and health checks -------------------------------------------- */

static void keep_alive_tick(uv_timer_t *t) {
  (void)t;
}

Test(pg, query_timeout_resets_the_connection) {
  ctx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.on_state = on_state;
  o.data = &x;
  o.query_timeout_ms = 1000; /* room for a loaded machine: SELECT 5 below must fit */
  keel_backoff_fixed(&o.reconnect_backoff, 20);
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  /* Connected first: the statement must be sent when its deadline passes. */
  uint64_t start = uv_now(&x.loop);
  while (x.ups == 0 && uv_now(&x.loop) - start < 10000) uv_run(&x.loop, UV_RUN_ONCE);
  cr_assert_eq(x.ups, 1);
  keel_pg_query(x.c, "SELECT pg_sleep(10)", 0, NULL, store, &x);
  wait_results(&x, 1);
  /* Sent in autocommit, reset before its reply: it may have run. */
  cr_assert_eq(x.statuses[0], KEEL_EINDOUBT, "%s", keel_err_name(x.statuses[0]));
  cr_assert(strstr(keel_pg_last_error(x.c), "time") != NULL, "%s", keel_pg_last_error(x.c));
  cr_assert_eq(x.downs, 1, "the connection is reset, never left with a late answer pending");
  /* Reconnected first, so that the next statement's deadline does not
   * also cover the reconnect on a loaded machine. */
  start = uv_now(&x.loop);
  while (x.ups < 2 && uv_now(&x.loop) - start < 15000) uv_run(&x.loop, UV_RUN_ONCE);
  cr_assert_eq(x.ups, 2);
  keel_pg_query(x.c, "SELECT 5", 0, NULL, store, &x);
  wait_results(&x, 2);
  cr_assert_eq(x.statuses[1], 0);
  cr_assert_str_eq(x.values[1], "5");
  cr_assert_eq(x.ups, 2);
  close_conn(&x);
}

/* A backend stopped with SIGSTOP keeps its socket open but never answers,
 * like a half-open connection: the idle health check finds it. */
Test(pg, health_check_detects_an_unresponsive_server) {
  KT_SKIP_BEHIND_POOLER("stops a server backend by pid: the pooler sends the probe to another");
  ctx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.on_state = on_state;
  o.data = &x;
  o.health_check_interval_ms = 100;
  o.connect_timeout_ms = 1000; /* also the health probe's deadline; room for a loaded machine */
  keel_backoff_fixed(&o.reconnect_backoff, 20);
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  uv_timer_t tick;
  uv_timer_init(&x.loop, &tick);
  uv_timer_start(&tick, keep_alive_tick, 20, 20);
  keel_pg_query(x.c, "SELECT pg_backend_pid()", 0, NULL, store, &x);
  wait_results(&x, 1);
  int pid = atoi(x.values[0]);
  cr_assert_gt(pid, 0);
  cr_assert_eq(kill(pid, SIGSTOP), 0);
  uint64_t start = uv_now(&x.loop);
  while (x.downs == 0 && uv_now(&x.loop) - start < 5000) uv_run(&x.loop, UV_RUN_ONCE);
  kill(pid, SIGCONT);
  char sql[100];
  snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)", pid);
  free(kt_pg_scalar(sql));
  cr_assert_eq(x.downs, 1, "health check noticed the silent server");
  start = uv_now(&x.loop);
  while (x.ups < 2 && uv_now(&x.loop) - start < 15000) uv_run(&x.loop, UV_RUN_ONCE);
  cr_assert_eq(x.ups, 2);
  cr_assert_neq(keel_pg_backend_pid(x.c), pid);
  keel_pg_stats s;
  keel_pg_get_stats(x.c, &s);
  cr_assert_eq(s.queries, 1, "health probes are not counted as statements");
  uv_close((uv_handle_t *)&tick, NULL);
  close_conn(&x);
}

static void idle_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  (void)conn;
  tx2 *t = data;
  t->tx = tx; /* finishes later, after the pool is closed */
  t->step = 1;
}

Test(pg, pool_close_ends_a_running_transaction_once) {
  pool_ctx p;
  open_pool(&p, 1);
  tx2 t = {.p = &p};
  cr_assert_eq(keel_pg_pool_transaction(p.pool, KEEL_PG_READ_COMMITTED, idle_body, tx2_done, &t),
               0);
  /* A second one waits for the connection and is cancelled at close. */
  tx2 t2 = {.p = &p};
  cr_assert_eq(keel_pg_pool_transaction(p.pool, KEEL_PG_READ_COMMITTED, idle_body, tx2_done, &t2),
               0);
  cr_assert_eq(keel_pg_pool_query(p.pool, "SELECT 1", 0, NULL, pool_store, &p), 0);
  uint64_t start = uv_now(&p.loop);
  while (t.step == 0 && uv_now(&p.loop) - start < 5000) uv_run(&p.loop, UV_RUN_ONCE);
  cr_assert_eq(t.step, 1);
  int closed = 0;
  keel_pg_pool_close(p.pool, count_close, &closed);
  cr_assert_eq(p.tx_done + p.results + closed, 0, "no callback runs inside close");
  keel_pg_tx_finish(t.tx, 0); /* does nothing now */
  uv_run(&p.loop, UV_RUN_DEFAULT);
  cr_assert_eq(p.tx_done, 2, "both transactions ended once");
  cr_assert_eq(p.tx_status[0], UV_ECANCELED);
  cr_assert_eq(p.results, 1);
  cr_assert_eq(p.statuses[0], UV_ECANCELED);
  cr_assert_eq(t2.step, 0, "the waiting body never ran");
  cr_assert_eq(closed, 1);
  cr_assert_eq(uv_loop_close(&p.loop), 0);
}

/* ---- TCP keepalives, key/value and URI conninfo ----------------------------- */

static int keepidle_of(const char *conninfo) {
  ctx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = conninfo;
  o.keepalive_idle_s = 7;
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  keel_pg_query(x.c, "SELECT 1", 0, NULL, store, &x);
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], 0, "%s", keel_pg_last_error(x.c));
  int fd = PQsocket(keel_pg_raw(x.c));
  int idle = -1;
  socklen_t len = sizeof idle;
  cr_assert_eq(getsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, &len), 0);
  close_conn(&x);
  return idle;
}

Test(pg, keepalives_for_key_value_and_uri_conninfo) {
  cr_assert_eq(keepidle_of(kt_pg_conninfo()), 7);
  PQconninfoOption *opts = PQconninfoParse(kt_pg_conninfo(), NULL);
  cr_assert_not_null(opts);
  const char *host = "127.0.0.1", *port = "5432", *user = "postgres", *db = "postgres";
  for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
    if (o->val == NULL) continue;
    if (strcmp(o->keyword, "host") == 0) host = o->val;
    if (strcmp(o->keyword, "port") == 0) port = o->val;
    if (strcmp(o->keyword, "user") == 0) user = o->val;
    if (strcmp(o->keyword, "dbname") == 0) db = o->val;
  }
  char uri[256];
  snprintf(uri, sizeof uri, "postgresql://%s@%s:%s/%s", user, host, port, db);
  cr_assert_eq(keepidle_of(uri), 7, "%s", uri);
  char uri_q[300];
  snprintf(uri_q, sizeof uri_q, "%s?application_name=keel_test", uri);
  cr_assert_eq(keepidle_of(uri_q), 7, "%s", uri_q);
  PQconninfoFree(opts);
}

/* ---- close from inside other callbacks ---------------------------------------- */

static void close_pool_inside(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  pool_ctx *p = data;
  p->statuses[p->results++] = status;
  keel_pg_pool_close(p->pool, NULL, NULL);
  keel_pg_pool_close(p->pool, NULL, NULL); /* a second call does nothing */
}

Test(pg, pool_close_from_inside_a_pool_callback) {
  pool_ctx p;
  open_pool(&p, 1);
  cr_assert_eq(keel_pg_pool_query(p.pool, "SELECT 1", 0, NULL, close_pool_inside, &p), 0);
  cr_assert_eq(keel_pg_pool_query(p.pool, "SELECT 2", 0, NULL, pool_store, &p), 0);
  uv_run(&p.loop, UV_RUN_DEFAULT);
  cr_assert_eq(p.results, 2);
  cr_assert_eq(p.statuses[0], 0);
  cr_assert_eq(p.statuses[1], UV_ECANCELED);
  cr_assert_eq(uv_loop_close(&p.loop), 0);
}

static void close_on_up(keel_pg *c, bool up, int status, void *data) {
  on_state(c, up, status, data);
  if (up) keel_pg_close(c, NULL, NULL);
}

static void close_on_notify(keel_pg *c, const char *channel, const char *payload, int pid,
                            void *data) {
  on_notify(c, channel, payload, pid, data);
  keel_pg_close(c, NULL, NULL);
}

Test(pg, close_from_inside_on_state_and_on_notify) {
  ctx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.on_state = close_on_up;
  o.data = &x;
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  keel_pg_query(x.c, "SELECT 1", 0, NULL, store, &x);
  uv_run(&x.loop, UV_RUN_DEFAULT);
  cr_assert_eq(x.ups, 1);
  cr_assert_eq(x.results, 1);
  cr_assert_eq(x.statuses[0], UV_ECANCELED);
  cr_assert_eq(uv_loop_close(&x.loop), 0);

  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  o.on_state = NULL;
  o.on_notify = close_on_notify;
  cr_assert_eq(keel_pg_new(&x.loop, &o, &x.c), 0);
  char channel[64], sql[200];
  kt_unique_name(channel, sizeof channel, "chan");
  snprintf(sql, sizeof sql, "LISTEN %s", channel);
  keel_pg_query(x.c, sql, 0, NULL, NULL, NULL);
  snprintf(sql, sizeof sql, "NOTIFY %s, 'one'", channel);
  keel_pg_query(x.c, sql, 0, NULL, NULL, NULL);
  snprintf(sql, sizeof sql, "NOTIFY %s, 'two'", channel);
  keel_pg_query(x.c, sql, 0, NULL, NULL, NULL);
  keel_pg_query(x.c, "SELECT pg_sleep(2)", 0, NULL, store, &x);
  uv_run(&x.loop, UV_RUN_DEFAULT);
  cr_assert_eq(x.notifies, 1, "nothing is delivered after close");
  cr_assert_str_eq(x.notify_payload, "one");
  cr_assert_eq(x.results, 1);
  cr_assert_eq(x.statuses[0], UV_ECANCELED);
  cr_assert_eq(uv_loop_close(&x.loop), 0);
}
