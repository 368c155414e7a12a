/* Statement modes through the real PgBouncer in transaction mode (issue
 * 20): a prepared name never runs another client's statement; a name the
 * server connection does not know switches AUTO to unnamed statements and
 * the statement is sent again once; NAMED reports it, UNNAMED never meets
 * it; inside a transaction the detection fails the statement with
 * KEEL_ECONN and the next transaction runs. Each test gets a database of
 * its own, so that its PgBouncer pool has only the server connections the
 * test makes (and which one serves whom is known). */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/pg.h"
#include "support/harness.h"

typedef struct pdb {
  char name[64];
  char direct[512]; /* straight to the server, this database */
  char pooled[512]; /* through PgBouncer, this database */
} pdb;

static void pdb_create(pdb *d) {
  kt_unique_name(d->name, sizeof d->name, "pdb");
  kt_pg_execf("CREATE DATABASE %s TEMPLATE template0", d->name);
  snprintf(d->direct, sizeof d->direct, "%s dbname=%s", kt_pg_direct_conninfo(), d->name);
  snprintf(d->pooled, sizeof d->pooled, "%s dbname=%s", kt_pg_pooler_conninfo(), d->name);
}

static void pdb_drop(pdb *d) {
  kt_pg_execf("DROP DATABASE IF EXISTS %s WITH (FORCE)", d->name);
}

static PGconn *pq_open(const char *conninfo) {
  PGconn *conn = PQconnectdb(conninfo);
  cr_assert_eq(PQstatus(conn), CONNECTION_OK, "%s", PQerrorMessage(conn));
  return conn;
}

static char *pq_scalar(PGconn *conn, const char *sql) {
  PGresult *res = PQexec(conn, sql);
  ExecStatusType st = PQresultStatus(res);
  cr_assert(st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK, "%s: %s", sql,
            PQresultErrorMessage(res));
  char *v = NULL;
  if (st == PGRES_TUPLES_OK && PQntuples(res) > 0 && !PQgetisnull(res, 0, 0))
    v = strdup(PQgetvalue(res, 0, 0));
  PQclear(res);
  return v;
}

static void pq_run(PGconn *conn, const char *sql) {
  free(pq_scalar(conn, sql));
}

typedef struct cx {
  uv_loop_t loop;
  int results;
  int statuses[16];
  char values[16][64];
  char sqlstates[16][8];
  int done;
  int done_status;
  char done_sqlstate[8];
} cx;

static void store(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  cx *x = data;
  int i = x->results++;
  x->statuses[i] = status;
  const char *v = keel_pg_result_value(res, 0, 0);
  snprintf(x->values[i], sizeof x->values[i], "%s", v ? v : "(null)");
  const char *st = keel_pg_result_sqlstate(res);
  snprintf(x->sqlstates[i], sizeof x->sqlstates[i], "%s", st ? st : "");
}

static void wait_results(cx *x, int n) {
  uint64_t start = uv_now(&x->loop);
  while (x->results < n && uv_now(&x->loop) - start < 15000) uv_run(&x->loop, UV_RUN_ONCE);
  cr_assert_eq(x->results, n);
}

static keel_pg *open_conn(cx *x, const char *conninfo, keel_pg_statement_mode mode) {
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = conninfo;
  o.statement_mode = mode;
  keel_pg *c;
  cr_assert_eq(keel_pg_new(&x->loop, &o, &c), 0);
  return c;
}

/* Issue 20: keel prepared "keel_s0" once per session; behind a transaction
 * pooler the server connection may hold another client's "keel_s0", and
 * keel executed it. Here another client's statements sit under the names
 * keel used to choose; keel's statement must run its own SQL. */
Test(pg_pooler, another_clients_prepared_statement_never_runs_by_name) {
  pdb d;
  pdb_create(&d);
  PGconn *admin = pq_open(d.direct);
  pq_run(admin, "CREATE TABLE victim (v text)");
  /* The other client: names on the pool's only server connection. */
  PGconn *other = pq_open(d.pooled);
  for (int i = 0; i < 8; i++) {
    char sql[200];
    snprintf(sql, sizeof sql,
             "PREPARE keel_s%d(text) AS INSERT INTO victim VALUES ($1) RETURNING 'other client'",
             i);
    pq_run(other, sql);
  }
  cx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg *c = open_conn(&x, d.pooled, KEEL_PG_STATEMENTS_AUTO);
  for (int i = 0; i < 4; i++) {
    const char *p[] = {"x"};
    cr_assert_eq(keel_pg_query_cached(c, "SELECT 'mine: ' || $1::text", 1, p, store, &x), 0);
  }
  wait_results(&x, 4);
  for (int i = 0; i < 4; i++) {
    cr_expect_eq(x.statuses[i], 0, "statement %d: %s (%s)", i, keel_pg_last_error(c),
                 x.sqlstates[i]);
    cr_expect_str_eq(x.values[i], "mine: x");
  }
  char *n = pq_scalar(admin, "SELECT count(*) FROM victim");
  cr_expect_str_eq(n, "0", "another client's statement ran under keel's name");
  free(n);
  keel_pg_close(c, NULL, NULL);
  kt_loop_finish(&x.loop);
  PQfinish(other);
  PQfinish(admin);
  pdb_drop(&d);
}

/* The statement keel prepared on one server connection is executed on
 * another one (the pooler gave that one away): 26000. */
static void moved_statement(keel_pg_statement_mode mode) {
  pdb d;
  pdb_create(&d);
  cx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg *c = open_conn(&x, d.pooled, mode);
  const char *p1[] = {"1"};
  cr_assert_eq(keel_pg_query_cached(c, "SELECT $1::int + 1", 1, p1, store, &x), 0);
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], 0, "%s", keel_pg_last_error(c));
  /* Another client now holds that server connection in a transaction. */
  PGconn *other = pq_open(d.pooled);
  pq_run(other, "BEGIN");
  pq_run(other, "SELECT 1");
  const char *p2[] = {"41"};
  cr_assert_eq(keel_pg_query_cached(c, "SELECT $1::int + 1", 1, p2, store, &x), 0);
  wait_results(&x, 2);
  keel_pg_stats s;
  keel_pg_get_stats(c, &s);
  if (mode == KEEL_PG_STATEMENTS_NAMED) {
    cr_expect_eq(x.statuses[1], KEEL_EPG);
    cr_expect_str_eq(x.sqlstates[1], "26000");
    cr_expect_eq(s.statement_retries, 0);
    cr_expect(!s.unnamed);
  } else {
    cr_expect_eq(x.statuses[1], 0, "%s", keel_pg_last_error(c));
    cr_expect_str_eq(x.values[1], "42");
    cr_expect_eq(s.statement_retries, mode == KEEL_PG_STATEMENTS_AUTO ? 1 : 0);
    cr_expect(s.unnamed);
    /* Unnamed from now on: never the error again. */
    pq_run(other, "ROLLBACK");
    pq_run(other, "BEGIN");
    pq_run(other, "SELECT 1");
    const char *p3[] = {"9"};
    cr_assert_eq(keel_pg_query_cached(c, "SELECT $1::int + 1", 1, p3, store, &x), 0);
    wait_results(&x, 3);
    cr_expect_eq(x.statuses[2], 0, "%s", keel_pg_last_error(c));
    cr_expect_str_eq(x.values[2], "10");
    keel_pg_get_stats(c, &s);
    cr_expect_eq(s.statement_retries, mode == KEEL_PG_STATEMENTS_AUTO ? 1 : 0);
  }
  pq_run(other, "ROLLBACK");
  PQfinish(other);
  keel_pg_close(c, NULL, NULL);
  kt_loop_finish(&x.loop);
  pdb_drop(&d);
}

Test(pg_pooler, auto_detects_unknown_name_and_retries_once_unnamed) {
  moved_statement(KEEL_PG_STATEMENTS_AUTO);
}

Test(pg_pooler, named_mode_reports_unknown_name) {
  moved_statement(KEEL_PG_STATEMENTS_NAMED);
}

Test(pg_pooler, unnamed_mode_never_meets_it) {
  moved_statement(KEEL_PG_STATEMENTS_UNNAMED);
}

/* An invalid mode is refused. */
Test(pg_pooler, bad_statement_mode_is_einval) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = "host=127.0.0.1";
  o.statement_mode = (keel_pg_statement_mode)7;
  keel_pg *c = (keel_pg *)&loop;
  cr_expect_eq(keel_pg_new(&loop, &o, &c), UV_EINVAL);
  cr_expect_eq(c, (keel_pg *)&loop);
  kt_loop_finish(&loop);
}

/* ---- inside a transaction ------------------------------------------------ */

static void body_cached(keel_pg_tx *tx, keel_pg *conn, void *data) {
  cx *x = data;
  const char *p[] = {"1"};
  cr_assert_eq(keel_pg_query_cached(conn, "SELECT $1::int + 1", 1, p, store, x), 0);
  keel_pg_tx_done(tx, 0);
}

static void tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool;
  cx *x = data;
  x->done++;
  x->done_status = status;
  snprintf(x->done_sqlstate, sizeof x->done_sqlstate, "%s", sqlstate ? sqlstate : "");
}

static void wait_done(cx *x, int n) {
  uint64_t start = uv_now(&x->loop);
  while (x->done < n && uv_now(&x->loop) - start < 15000) uv_run(&x->loop, UV_RUN_ONCE);
  cr_assert_eq(x->done, n);
}

/* No server connection of the database is left inside a transaction
 * (other than the one `except` holds). */
static void expect_no_idle_in_transaction(pdb *d, PGconn *admin, const char *except_pid) {
  char sql[400];
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pg_stat_activity WHERE datname = '%s' AND state LIKE 'idle in "
           "transaction%%' AND pid <> %s",
           d->name, except_pid);
  char *n = pq_scalar(admin, sql);
  cr_expect_str_eq(n, "0", "a server connection was left inside a transaction");
  free(n);
}

Test(pg_pooler, detection_inside_a_transaction_fails_it_with_econn_then_unnamed) {
  pdb d;
  pdb_create(&d);
  PGconn *admin = pq_open(d.direct);
  cx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg_pool_opts o;
  keel_pg_pool_opts_init(&o);
  o.conn.conninfo = d.pooled;
  o.size = 1;
  keel_pg_pool *pool;
  cr_assert_eq(keel_pg_pool_new(&x.loop, &o, &pool), 0);
  const char *p[] = {"1"};
  cr_assert_eq(keel_pg_pool_query_cached(pool, "SELECT $1::int + 1", 1, p, store, &x), 0);
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], 0);
  PGconn *other = pq_open(d.pooled);
  pq_run(other, "BEGIN");
  char *other_pid = pq_scalar(other, "SELECT pg_backend_pid()");
  cr_assert_eq(keel_pg_pool_transaction(pool, KEEL_PG_READ_COMMITTED, body_cached, tx_done, &x), 0);
  wait_done(&x, 1);
  cr_expect_eq(x.statuses[1], KEEL_ECONN, "status %d (%s)", x.statuses[1], x.sqlstates[1]);
  cr_expect_str_eq(x.sqlstates[1], "26000");
  cr_expect_eq(x.done_status, KEEL_ECONN, "%s", keel_pg_pool_last_error(pool));
  keel_pg_pool_stats s;
  keel_pg_pool_get_stats(pool, &s);
  cr_expect(s.unnamed);
  expect_no_idle_in_transaction(&d, admin, other_pid);
  /* Run again: it goes through (unnamed). */
  cr_assert_eq(keel_pg_pool_transaction(pool, KEEL_PG_READ_COMMITTED, body_cached, tx_done, &x), 0);
  wait_done(&x, 2);
  cr_expect_eq(x.statuses[2], 0);
  cr_expect_str_eq(x.values[2], "2");
  cr_expect_eq(x.done_status, 0, "%s", keel_pg_pool_last_error(pool));
  expect_no_idle_in_transaction(&d, admin, other_pid);
  free(other_pid);
  pq_run(other, "ROLLBACK");
  PQfinish(other);
  keel_pg_pool_close(pool, NULL, NULL);
  kt_loop_finish(&x.loop);
  PQfinish(admin);
  pdb_drop(&d);
}

/* One member's detection switches every member of the pool. */
Test(pg_pooler, detection_switches_the_whole_pool) {
  pdb d;
  pdb_create(&d);
  cx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg_pool_opts o;
  keel_pg_pool_opts_init(&o);
  o.conn.conninfo = d.pooled;
  o.size = 3;
  keel_pg_pool *pool;
  cr_assert_eq(keel_pg_pool_new(&x.loop, &o, &pool), 0);
  const char *p[] = {"1"};
  for (int i = 0; i < 6; i++)
    cr_assert_eq(keel_pg_pool_query_cached(pool, "SELECT $1::int + 1", 1, p, store, &x), 0);
  wait_results(&x, 6);
  PGconn *other = pq_open(d.pooled);
  pq_run(other, "BEGIN");
  pq_run(other, "SELECT 1");
  for (int i = 0; i < 6; i++)
    cr_assert_eq(keel_pg_pool_query_cached(pool, "SELECT $1::int + 1", 1, p, store, &x), 0);
  wait_results(&x, 12);
  for (int i = 0; i < 12; i++) cr_expect_eq(x.statuses[i], 0, "statement %d", i);
  keel_pg_pool_stats s;
  keel_pg_pool_get_stats(pool, &s);
  /* Which server connection each member lands on is PgBouncer's choice:
   * when a member met a name the server connection lacks, it switched the
   * whole pool to unnamed statements. */
  if (s.statement_retries >= 1) cr_expect(s.unnamed);
  pq_run(other, "ROLLBACK");
  PQfinish(other);
  keel_pg_pool_close(pool, NULL, NULL);
  kt_loop_finish(&x.loop);
  pdb_drop(&d);
}

/* ---- 42P05: the name is already there ----------------------------------- */

/* keel's hash of a statement's text (64-bit FNV-1a), as in its names. */
static unsigned long long text_hash(const char *sql) {
  unsigned long long h = 14695981039346656037ull;
  for (const unsigned char *p = (const unsigned char *)sql; *p; p++)
    h = (h ^ *p) * 1099511628211ull;
  return h;
}

/* Another client (sharing the server connection) learns keel's session
 * nonce and puts its own statement under the very name keel will prepare
 * next: the PREPARE fails with 42P05, and the statement, in the same sync,
 * is skipped by the server; it never runs the other client's SQL. AUTO
 * switches to unnamed and sends it again; NAMED reports 42P05. */
static void name_taken(keel_pg_statement_mode mode) {
  pdb d;
  pdb_create(&d);
  PGconn *admin = pq_open(d.direct);
  pq_run(admin, "CREATE TABLE victim (v text)");
  cx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg *c = open_conn(&x, d.pooled, mode);
  const char *p1[] = {"1"};
  cr_assert_eq(keel_pg_query_cached(c, "SELECT 1 + $1::int", 1, p1, store, &x), 0);
  wait_results(&x, 1);
  cr_assert_eq(x.statuses[0], 0, "%s", keel_pg_last_error(c));
  PGconn *other = pq_open(d.pooled);
  char *name = pq_scalar(other, "SELECT name FROM pg_prepared_statements WHERE name LIKE 'keel%'");
  cr_assert_not_null(name, "keel's statement is on the only server connection");
  const char *nonce = strrchr(name, '_');
  cr_assert_not_null(nonce);
  const char *mine = "SELECT 'mine: ' || $1::text";
  char sql[300];
  snprintf(sql, sizeof sql,
           "PREPARE keel_%016llx%s(text) AS INSERT INTO victim VALUES ($1) RETURNING 'other'",
           text_hash(mine), nonce);
  pq_run(other, sql);
  free(name);
  const char *p2[] = {"x"};
  cr_assert_eq(keel_pg_query_cached(c, mine, 1, p2, store, &x), 0);
  wait_results(&x, 2);
  keel_pg_stats s;
  keel_pg_get_stats(c, &s);
  if (mode == KEEL_PG_STATEMENTS_AUTO) {
    cr_expect_eq(x.statuses[1], 0, "%s", keel_pg_last_error(c));
    cr_expect_str_eq(x.values[1], "mine: x");
    cr_expect_eq(s.statement_retries, 1);
    cr_expect(s.unnamed);
  } else {
    cr_expect_eq(x.statuses[1], KEEL_EPG);
    cr_expect_str_eq(x.sqlstates[1], "42P05");
    cr_expect(!s.unnamed);
  }
  char *n = pq_scalar(admin, "SELECT count(*) FROM victim");
  cr_expect_str_eq(n, "0", "another client's statement ran under keel's name");
  free(n);
  PQfinish(other);
  keel_pg_close(c, NULL, NULL);
  kt_loop_finish(&x.loop);
  PQfinish(admin);
  pdb_drop(&d);
}

Test(pg_pooler, auto_name_already_taken_never_runs_it_and_goes_unnamed) {
  name_taken(KEEL_PG_STATEMENTS_AUTO);
}

Test(pg_pooler, named_mode_reports_name_already_taken) {
  name_taken(KEEL_PG_STATEMENTS_NAMED);
}

/* ---- COPY ------------------------------------------------------------------ */

/* PgBouncer before 1.22.1 forgets at the end of a COPY how many replies the
 * client still waits for, and gives the server connection back to its pool
 * at the COPY's ReadyForQuery: a statement pipelined behind the COPY lost
 * its reply (keel waited for it forever; it could reach another client).
 * Seen as pg_conn::copy_never_hangs_the_connection losing 1 of 3 results
 * under load; the statement behind the COPY here answers late (pg_sleep),
 * so the reply always comes after the COPY's ReadyForQuery. keel sends
 * nothing behind a COPY until the COPY is done. */
Test(pg_pooler, a_statement_pipelined_behind_a_copy_gets_its_reply) {
  cx x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_pg *c = open_conn(&x, kt_pg_pooler_conninfo(), KEEL_PG_STATEMENTS_AUTO);
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(keel_pg_query(c, "COPY (SELECT 1) TO STDOUT", 0, NULL, store, &x), 0);
    cr_assert_eq(keel_pg_query(c, "SELECT 8 FROM pg_sleep(0.05)", 0, NULL, store, &x), 0);
    wait_results(&x, 2 * (i + 1));
    cr_assert_eq(x.statuses[2 * i], 0, "%s", keel_err_name(x.statuses[2 * i]));
    cr_assert_eq(x.statuses[2 * i + 1], 0, "%s", keel_pg_last_error(c));
    cr_assert_str_eq(x.values[2 * i + 1], "8");
  }
  keel_pg_close(c, NULL, NULL);
  kt_loop_finish(&x.loop);
}
