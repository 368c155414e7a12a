/* Edges of the pg module's plain helpers: every result accessor with NULL,
 * out-of-range rows and columns and NULL values; keel_pg_quote_ident at
 * each limit; and transaction statements written with comments, START
 * TRANSACTION, savepoints, AND CHAIN, END and ABORT, which keel must read
 * as the transaction control they are. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/pg.h"
#include "support/harness.h"

Test(pg_edges, result_accessors_accept_null) {
  cr_assert_eq(keel_pg_result_nrows(NULL), 0);
  cr_assert_eq(keel_pg_result_ncols(NULL), 0);
  cr_assert_eq(keel_pg_result_col(NULL, "a"), -1);
  cr_assert_null(keel_pg_result_col_name(NULL, 0));
  cr_assert_null(keel_pg_result_value(NULL, 0, 0));
  cr_assert_null(keel_pg_result_get(NULL, 0, "a"));
  cr_assert_eq(keel_pg_result_length(NULL, 0, 0), 0);
  cr_assert(keel_pg_result_is_null(NULL, 0, 0));
  cr_assert_eq(keel_pg_result_affected(NULL), 0);
  cr_assert_null(keel_pg_result_sqlstate(NULL));
  cr_assert_null(keel_pg_result_error(NULL));
  cr_assert_null(keel_pg_result_raw(NULL));
}

Test(pg_edges, quote_ident_limits) {
  char buf[200];
  cr_assert_eq(keel_pg_quote_ident(NULL, sizeof buf, "a", false), UV_EINVAL);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, NULL, false), UV_EINVAL);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "", false), UV_EINVAL);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "s.t", false), UV_EINVAL, "not qualified");
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "a.b.c", true), UV_EINVAL);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, ".t", true), UV_EINVAL);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "s.", true), UV_EINVAL);
  char long_part[80];
  memset(long_part, 'x', 64);
  long_part[64] = '\0';
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, long_part, false), UV_EINVAL, "64 bytes");
  long_part[63] = '\0';
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, long_part, false), 65, "63 bytes fit");
  char qualified[160];
  snprintf(qualified, sizeof qualified, "s.%s", long_part);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, qualified, true), 3 + 1 + 65);
  memset(long_part, 'y', 64);
  long_part[64] = '\0';
  snprintf(qualified, sizeof qualified, "s.%s", long_part);
  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, qualified, true), UV_EINVAL);

  cr_assert_eq(keel_pg_quote_ident(buf, sizeof buf, "we\"ird", false), 9);
  cr_assert_str_eq(buf, "\"we\"\"ird\"");
  /* every capacity short of the quoted text is UV_ENOBUFS, never a cut */
  const char *ident = "my\"schema.my table";
  const char *want = "\"my\"\"schema\".\"my table\"";
  int full = (int)strlen(want);
  for (int cap = 0; cap <= full; cap++) {
    memset(buf, '#', sizeof buf);
    cr_assert_eq(keel_pg_quote_ident(buf, (size_t)cap, ident, true), UV_ENOBUFS, "cap %d", cap);
  }
  cr_assert_eq(keel_pg_quote_ident(buf, (size_t)full + 1, ident, true), full);
  cr_assert_str_eq(buf, want);
}

typedef struct rx {
  uv_loop_t loop;
  keel_pg *conn;
  int results;
  int statuses[32];
  char sqlstates[32][8];
  bool checked;
} rx;

static void store(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  rx *x = data;
  int i = x->results++;
  x->statuses[i] = status;
  const char *state = keel_pg_result_sqlstate(res);
  snprintf(x->sqlstates[i], sizeof x->sqlstates[i], "%s", state ? state : "");
}

static void check_rows(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  rx *x = data;
  cr_assert_eq(status, 0);
  cr_assert_eq(keel_pg_result_nrows(res), 2);
  cr_assert_eq(keel_pg_result_ncols(res), 3);
  cr_assert_eq(keel_pg_result_col(res, "a"), 0);
  cr_assert_eq(keel_pg_result_col(res, "A"), -1, "names compare exactly");
  cr_assert_eq(keel_pg_result_col(res, "Mixed"), 2);
  cr_assert_eq(keel_pg_result_col(res, NULL), -1);
  cr_assert_str_eq(keel_pg_result_col_name(res, 1), "b");
  cr_assert_null(keel_pg_result_col_name(res, -1));
  cr_assert_null(keel_pg_result_col_name(res, 3));
  cr_assert_str_eq(keel_pg_result_value(res, 0, 0), "1");
  cr_assert_str_eq(keel_pg_result_get(res, 1, "Mixed"), "xyzw");
  cr_assert_null(keel_pg_result_get(res, 0, "nope"));
  cr_assert_null(keel_pg_result_value(res, 0, 1), "SQL NULL");
  cr_assert(keel_pg_result_is_null(res, 0, 1));
  cr_assert_not(keel_pg_result_is_null(res, 0, 0));
  cr_assert_eq(keel_pg_result_length(res, 1, 2), 4);
  cr_assert_eq(keel_pg_result_length(res, 0, 1), 0, "NULL has no length");
  for (int row = -1; row <= 2; row++)
    for (int col = -1; col <= 3; col++) {
      if (row >= 0 && row < 2 && col >= 0 && col < 3) continue;
      cr_assert_null(keel_pg_result_value(res, row, col), "%d,%d", row, col);
      cr_assert(keel_pg_result_is_null(res, row, col));
      cr_assert_eq(keel_pg_result_length(res, row, col), 0);
    }
  cr_assert_eq(keel_pg_result_affected(res), 2, "SELECT 2");
  cr_assert_null(keel_pg_result_sqlstate(res));
  cr_assert_null(keel_pg_result_error(res));
  cr_assert_not_null(keel_pg_result_raw(res));
  x->checked = true;
  store(c, status, res, data);
}

static void check_no_tuples(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  cr_assert_eq(status, 0);
  cr_assert_eq(keel_pg_result_affected(res), 0, "SET has no row count");
  cr_assert_eq(keel_pg_result_nrows(res), 0);
  store(c, status, res, data);
}

static void check_error(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  cr_assert_eq(status, KEEL_EPG);
  cr_assert_str_eq(keel_pg_result_sqlstate(res), "22012");
  cr_assert(strstr(keel_pg_result_error(res), "division by zero") != NULL, "%s",
            keel_pg_result_error(res));
  cr_assert_eq(keel_pg_result_nrows(res), 0);
  cr_assert_eq(keel_pg_result_affected(res), 0);
  store(c, status, res, data);
}

static void wait_for(rx *x, int n) {
  uint64_t start = uv_now(&x->loop);
  while (x->results < n && uv_now(&x->loop) - start < 15000) uv_run(&x->loop, UV_RUN_ONCE);
  cr_assert_eq(x->results, n, "%d of %d results", x->results, n);
}

static void open_conn(rx *x) {
  memset(x, 0, sizeof *x);
  uv_loop_init(&x->loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  cr_assert_eq(keel_pg_new(&x->loop, &o, &x->conn), 0);
}

static void close_conn(rx *x) {
  keel_pg_close(x->conn, NULL, NULL);
  kt_loop_finish(&x->loop);
}

Test(pg_edges, result_accessors_on_real_results) {
  rx x;
  open_conn(&x);
  cr_assert_eq(keel_pg_query(x.conn,
                             "SELECT * FROM (VALUES (1, NULL::text, 'ab'), (2, 'b', 'xyzw')) "
                             "AS v(a, b, \"Mixed\") ORDER BY a",
                             0, NULL, check_rows, &x),
               0);
  cr_assert_eq(
      keel_pg_query(x.conn, "SET application_name = 'kt_edges'", 0, NULL, check_no_tuples, &x), 0);
  cr_assert_eq(keel_pg_query(x.conn, "SELECT 1 / 0", 0, NULL, check_error, &x), 0);
  wait_for(&x, 3);
  cr_assert(x.checked);
  close_conn(&x);
}

/* Transaction control spelled every way PostgreSQL accepts: the rows that
 * were committed are there, the rolled-back ones are not, and nothing is
 * refused on the way. */
Test(pg_edges, transaction_control_in_every_spelling) {
  char table[64], sql[32][256];
  kt_unique_name(table, sizeof table, "edges");
  snprintf(sql[0], sizeof sql[0], "CREATE TABLE %s (n int)", table);
  kt_pg_exec(sql[0]);
  int n = 0;
  snprintf(sql[n++], 256, "-- a comment first\n/* and a block */ START TRANSACTION");
  snprintf(sql[n++], 256, "INSERT INTO %s VALUES (1)", table);
  snprintf(sql[n++], 256, "SAVEPOINT s");
  snprintf(sql[n++], 256, "INSERT INTO %s VALUES (2)", table);
  snprintf(sql[n++], 256, "ROLLBACK TO SAVEPOINT s");
  snprintf(sql[n++], 256, "/* unterminated-looking */ COMMIT AND CHAIN");
  snprintf(sql[n++], 256, "INSERT INTO %s VALUES (3)", table);
  snprintf(sql[n++], 256, "abort");
  snprintf(sql[n++], 256, "  Begin Isolation Level Serializable");
  snprintf(sql[n++], 256, "INSERT INTO %s VALUES (4)", table);
  snprintf(sql[n++], 256, "end");
  snprintf(sql[n++], 256, "BEGIN");
  snprintf(sql[n++], 256, "INSERT INTO %s VALUES (5)", table);
  snprintf(sql[n++], 256, "ROLLBACK AND NO CHAIN");
  snprintf(sql[n++], 256, "/* only a comment */");
  snprintf(sql[n++], 256, "-- only a comment");
  rx x;
  open_conn(&x);
  for (int i = 0; i < n; i++)
    cr_assert_eq(keel_pg_query(x.conn, sql[i], 0, NULL, store, &x), 0, "%s", sql[i]);
  wait_for(&x, n);
  for (int i = 0; i < n; i++)
    cr_assert_eq(x.statuses[i], 0, "%s: %d (%s)", sql[i], x.statuses[i], x.sqlstates[i]);
  close_conn(&x);
  char q[128];
  snprintf(q, sizeof q, "SELECT string_agg(n::text, ',' ORDER BY n) FROM %s", table);
  char *rows = kt_pg_scalar(q);
  cr_assert_str_eq(rows, "1,4");
  free(rows);
  snprintf(q, sizeof q, "DROP TABLE %s", table);
  kt_pg_exec(q);
}

/* Statements that start like transaction control but are not a block's
 * end on this session (two-phase commands, a bare START): each fails on
 * its own and the session goes on. */
Test(pg_edges, two_phase_and_bare_start_are_not_block_control) {
  rx x;
  open_conn(&x);
  const char *sql[] = {"COMMIT PREPARED 'kt_no_such_gid'", "ROLLBACK PREPARED 'kt_no_such_gid'",
                       "START", "SELECT 7"};
  for (int i = 0; i < 4; i++)
    cr_assert_eq(keel_pg_query(x.conn, sql[i], 0, NULL, store, &x), 0, "%s", sql[i]);
  wait_for(&x, 4);
  cr_assert_eq(x.statuses[0], KEEL_EPG);
  cr_assert_str_eq(x.sqlstates[0], "42704", "no such prepared transaction");
  cr_assert_eq(x.statuses[1], KEEL_EPG);
  cr_assert_str_eq(x.sqlstates[1], "42704");
  cr_assert_eq(x.statuses[2], KEEL_EPG);
  cr_assert_str_eq(x.sqlstates[2], "42601", "a syntax error");
  cr_assert_eq(x.statuses[3], 0, "the session goes on");
  close_conn(&x);
}
