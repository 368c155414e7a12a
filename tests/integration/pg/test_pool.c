/* The pool against the real server of the harness: close with transaction
 * statements in flight, the first error of a transaction, unreachable
 * servers and the acquire timeout, the waiter bound, the callback contract
 * and allocation failure. */
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "keel/pg.h"
#include "support/harness.h"

typedef struct pctx {
  uv_loop_t loop;
  keel_pg_pool *pool;
  keel_pg_tx *tx;
  int pid;         /* backend of the (size 1) pool */
  int finish_with; /* status the body finishes with */
  int stop_at;     /* 0 none, 1 BEGIN, 2 COMMIT/ROLLBACK: SIGSTOP the backend first */
  bool close_after_finish;
  int body_runs;
  int done_calls;
  int done_status;
  char done_sqlstate[8];
  int results;
  int statuses[64];
  char values[64][32];
  int closed;
  int done_after_close; /* done callbacks seen after the close callback */
} pctx;

static void open_pool_with(pctx *p, unsigned size, const char *conninfo, uint32_t timeout_ms) {
  memset(p, 0, sizeof *p);
  uv_loop_init(&p->loop);
  keel_pg_pool_opts o;
  keel_pg_pool_opts_init(&o);
  o.conn.conninfo = conninfo;
  o.size = size;
  o.acquire_timeout_ms = timeout_ms;
  keel_backoff_fixed(&o.conn.reconnect_backoff, 50);
  cr_assert_eq(keel_pg_pool_new(&p->loop, &o, &p->pool), 0);
}

static void open_pool(pctx *p, unsigned size) {
  open_pool_with(p, size, kt_pg_conninfo(), 30000);
}

static void store(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  pctx *p = data;
  int i = p->results++;
  p->statuses[i] = status;
  const char *v = keel_pg_result_value(res, 0, 0);
  snprintf(p->values[i], sizeof p->values[i], "%s", v ? v : "(null)");
}

static void run_until(pctx *p, int *counter, int n) {
  uint64_t start = uv_now(&p->loop);
  while (*counter < n && uv_now(&p->loop) - start < 10000) uv_run(&p->loop, UV_RUN_ONCE);
  cr_assert_eq(*counter, n);
}

static void on_closed(void *object, void *data) {
  (void)object;
  pctx *p = data;
  p->closed++;
}

static void tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool;
  pctx *p = data;
  p->done_calls++;
  p->done_status = status;
  snprintf(p->done_sqlstate, sizeof p->done_sqlstate, "%s", sqlstate ? sqlstate : "");
  if (p->closed) p->done_after_close++;
}

static uint64_t in_flight(pctx *p) {
  keel_pg_pool_stats s;
  keel_pg_pool_get_stats(p->pool, &s);
  return s.in_flight;
}

/* The backend of a size-1 pool. */
static int backend_pid(pctx *p) {
  int before = p->results;
  cr_assert_eq(keel_pg_pool_query(p->pool, "SELECT pg_backend_pid()", 0, NULL, store, p), 0);
  run_until(p, &p->results, before + 1);
  cr_assert_eq(p->statuses[before], 0);
  return atoi(p->values[before]);
}

/* ---- 1. close with BEGIN, COMMIT or ROLLBACK in flight (issue 13 #1) ------- */

static void finishing_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  (void)conn;
  pctx *p = data;
  p->tx = tx;
  p->body_runs++;
  if (p->stop_at == 2) cr_assert_eq(kill(p->pid, SIGSTOP), 0);
  keel_pg_tx_finish(tx, p->finish_with);
  if (p->close_after_finish) {
    keel_pg_pool_close(p->pool, on_closed, p);
    cr_assert_eq(p->done_calls, 0, "no callback inside close");
  }
}

/* Closes the pool while the transaction's own statement (BEGIN at stop 1,
 * COMMIT or ROLLBACK at stop 2) has been sent and the backend, stopped,
 * cannot answer. done must run exactly once, before the close callback. */
static void close_with_statement_in_flight(int stop_at, int finish_with) {
  pctx p;
  open_pool(&p, 1);
  p.pid = backend_pid(&p);
  p.stop_at = stop_at;
  p.finish_with = finish_with;
  if (stop_at == 1) cr_assert_eq(kill(p.pid, SIGSTOP), 0);
  cr_assert_eq(
      keel_pg_pool_transaction(p.pool, KEEL_PG_READ_COMMITTED, finishing_body, tx_done, &p), 0);
  uint64_t start = uv_now(&p.loop);
  /* Wait until the statement is on the wire (stop 2: after the body ran). */
  while ((in_flight(&p) == 0 || (stop_at == 2 && p.body_runs == 0)) &&
         uv_now(&p.loop) - start < 5000)
    uv_run(&p.loop, UV_RUN_ONCE);
  cr_assert_eq(in_flight(&p), 1);
  cr_assert_eq(p.body_runs, stop_at == 1 ? 0 : 1);
  keel_pg_pool_close(p.pool, on_closed, &p);
  cr_assert_eq(p.done_calls + p.closed, 0, "no callback inside close");
  uv_run(&p.loop, UV_RUN_DEFAULT);
  kill(p.pid, SIGCONT);
  cr_assert_eq(p.done_calls, 1, "done exactly once");
  if (stop_at == 2 && finish_with == 0)
    cr_assert(p.done_status == UV_ECANCELED || p.done_status == KEEL_EINDOUBT, "%s",
              keel_err_name(p.done_status));
  else
    cr_assert_eq(p.done_status, UV_ECANCELED, "%s", keel_err_name(p.done_status));
  cr_assert_eq(p.done_after_close, 0, "done before the close callback");
  cr_assert_eq(p.closed, 1);
  cr_assert_eq(uv_loop_close(&p.loop), 0);
}

Test(pool, close_with_begin_in_flight_ends_the_transaction_once) {
  close_with_statement_in_flight(1, 0);
}

Test(pool, close_with_commit_in_flight_ends_the_transaction_once) {
  close_with_statement_in_flight(2, 0);
}

Test(pool, close_with_rollback_in_flight_ends_the_transaction_once) {
  close_with_statement_in_flight(2, UV_EINVAL);
}

/* The same with COMMIT / ROLLBACK still queued: the body finishes and
 * closes the pool at once. */
static void close_right_after_finish(int finish_with) {
  pctx p;
  open_pool(&p, 1);
  p.finish_with = finish_with;
  p.close_after_finish = true;
  cr_assert_eq(
      keel_pg_pool_transaction(p.pool, KEEL_PG_READ_COMMITTED, finishing_body, tx_done, &p), 0);
  uv_run(&p.loop, UV_RUN_DEFAULT);
  cr_assert_eq(p.body_runs, 1);
  cr_assert_eq(p.done_calls, 1, "done exactly once");
  cr_assert_eq(p.done_status, UV_ECANCELED, "%s", keel_err_name(p.done_status));
  cr_assert_eq(p.done_after_close, 0);
  cr_assert_eq(p.closed, 1);
  cr_assert_eq(uv_loop_close(&p.loop), 0);
}

Test(pool, close_right_after_commit_is_queued) {
  close_right_after_finish(0);
}

Test(pool, close_right_after_rollback_is_queued) {
  close_right_after_finish(KEEL_EPG);
}

/* Close right after the transaction was accepted, and right after its
 * connection was handed over (BEGIN queued, not sent). */
Test(pool, close_with_begin_queued_or_waiting) {
  for (int variant = 0; variant < 2; variant++) {
    pctx p;
    open_pool(&p, 1);
    backend_pid(&p); /* connected */
    p.finish_with = 0;
    cr_assert_eq(
        keel_pg_pool_transaction(p.pool, KEEL_PG_READ_COMMITTED, finishing_body, tx_done, &p), 0);
    if (variant == 1) {
      /* One iteration: the dispatch hands the connection over and queues
       * BEGIN. */
      uv_run(&p.loop, UV_RUN_NOWAIT);
    }
    keel_pg_pool_close(p.pool, on_closed, &p);
    cr_assert_eq(p.done_calls + p.closed, 0, "no callback inside close");
    uv_run(&p.loop, UV_RUN_DEFAULT);
    cr_assert_eq(p.body_runs, 0);
    cr_assert_eq(p.done_calls, 1, "done exactly once (variant %d)", variant);
    cr_assert_eq(p.done_status, UV_ECANCELED);
    cr_assert_eq(p.done_after_close, 0);
    cr_assert_eq(p.closed, 1);
    cr_assert_eq(uv_loop_close(&p.loop), 0);
  }
}

/* ---- 4. a transaction reports its first failing statement (issue 14) ------ */

typedef struct three {
  pctx *p;
  keel_pg_tx *tx;
  const char *second; /* the statement that fails */
  bool finish_with_zero;
  int statuses[3];
  char sqlstates[3][8];
  int n;
} three;

static void three_step(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  three *t = data;
  const char *state = keel_pg_result_sqlstate(res);
  snprintf(t->sqlstates[t->n], sizeof t->sqlstates[t->n], "%s", state ? state : "");
  t->statuses[t->n++] = status;
  if (t->n == 3) keel_pg_tx_finish(t->tx, t->finish_with_zero ? 0 : status);
}

static void three_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  three *t = data;
  t->tx = tx;
  /* Queued together: one pipelined write. */
  cr_assert_eq(keel_pg_query(conn, "SELECT 1", 0, NULL, three_step, t), 0);
  cr_assert_eq(keel_pg_query(conn, t->second, 0, NULL, three_step, t), 0);
  cr_assert_eq(keel_pg_query(conn, "SELECT 3", 0, NULL, three_step, t), 0);
}

static void three_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  three *t = data;
  tx_done(pool, status, sqlstate, t->p);
}

static void first_error_case(const char *second, const char *want, bool finish_with_zero) {
  pctx p;
  open_pool(&p, 1);
  three t = {.p = &p, .second = second, .finish_with_zero = finish_with_zero};
  cr_assert_eq(keel_pg_pool_transaction(p.pool, KEEL_PG_SERIALIZABLE, three_body, three_done, &t),
               0);
  run_until(&p, &p.done_calls, 1);
  cr_assert_eq(t.statuses[0], 0);
  cr_assert_eq(t.statuses[1], KEEL_EPG);
  cr_assert_str_eq(t.sqlstates[1], want);
  cr_assert_eq(t.statuses[2], KEEL_EPG);
  cr_assert_str_eq(t.sqlstates[2], "25P02", "the statement after it only says 'aborted'");
  cr_assert_eq(p.done_status, KEEL_EPG, "%s", keel_err_name(p.done_status));
  cr_assert_str_eq(p.done_sqlstate, want, "done reports the first failure, not %s",
                   p.done_sqlstate);
  cr_assert(strstr(keel_pg_pool_last_error(p.pool), want) != NULL, "%s",
            keel_pg_pool_last_error(p.pool));
  keel_pg_pool_stats s;
  keel_pg_pool_get_stats(p.pool, &s);
  cr_assert_eq(s.rollbacks, 1);
  cr_assert_eq(s.transactions, 0);
  /* The connection went back clean: no transaction left open on it. */
  cr_assert_eq(keel_pg_pool_query(p.pool, "SELECT 7", 0, NULL, store, &p), 0);
  run_until(&p, &p.results, 1);
  cr_assert_eq(p.statuses[0], 0);
  cr_assert_str_eq(p.values[0], "7");
  keel_pg_pool_close(p.pool, NULL, NULL);
  kt_loop_finish(&p.loop);
}

#define RAISE(code) "DO $$BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '" code "'; END$$"

Test(pool, first_failure_40001_is_reported) {
  first_error_case(RAISE("40001"), "40001", false);
  first_error_case(RAISE("40001"), "40001", true);
}

Test(pool, first_failure_40P01_is_reported) {
  first_error_case(RAISE("40P01"), "40P01", false);
  first_error_case(RAISE("40P01"), "40P01", true);
}

Test(pool, first_failure_23505_is_reported) {
  first_error_case(RAISE("23505"), "23505", false);
  first_error_case(
      "SELECT * FROM (SELECT 1 AS k UNION ALL SELECT 1) x, "
      "LATERAL (SELECT 1 / 0) y",
      "22012", true);
}

Test(pool, first_failure_42601_is_reported) {
  first_error_case("SELEC 1", "42601", false);
  first_error_case("SELEC 1", "42601", true);
}
