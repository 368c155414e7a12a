/*
 * Verifier throughput: a 1 M-row, 8-column table walked in keyset batches
 * by a validator that reads 3 columns (no fix-ups), against the rate at
 * which `COPY (SELECT ...) TO STDOUT` reads the same rows on one connection
 * (the physical ceiling of reading them). Runs at the default batch size
 * (1000) and at the seed's 50.
 *
 * Last line: verify rows_per_s=<x> copy_rows_per_s=<y> ratio=<x/y> rows_per_s_batch50=<z>
 * Conninfo from KEEL_PG (scripts/bench sets it). Optional argument: rows.
 */
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/verify.h"

#define TABLE "keel_bench_verify"

static PGconn *blocking(const char *conninfo) {
  PGconn *c = PQconnectdb(conninfo);
  if (PQstatus(c) != CONNECTION_OK) {
    fprintf(stderr, "connect: %s", PQerrorMessage(c));
    exit(1);
  }
  return c;
}

static void exec_ok(PGconn *c, const char *sql) {
  PGresult *r = PQexec(c, sql);
  if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
    fprintf(stderr, "%s: %s", sql, PQerrorMessage(c));
    exit(1);
  }
  PQclear(r);
}

static long long scalar(PGconn *c, const char *sql) {
  PGresult *r = PQexec(c, sql);
  long long v = -1;
  if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
    v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
  PQclear(r);
  return v;
}

static void ensure_table(PGconn *c, long long rows) {
  char sql[1024];
  long long have = scalar(c, "SELECT count(*) FROM " TABLE);
  if (have == rows) return;
  PQclear(PQexec(c, "DROP TABLE IF EXISTS " TABLE));
  exec_ok(c, "CREATE TABLE " TABLE
             " (id bigint PRIMARY KEY, status text, payment_status text, "
             "payment_id text, amount numeric(12,2), created_at timestamptz, qty int, note text)");
  snprintf(sql, sizeof sql,
           "INSERT INTO " TABLE
           " SELECT g, CASE WHEN g %% 3 = 0 THEN 'completed' ELSE 'open' END, "
           "CASE WHEN g %% 2 = 0 THEN 'paid' ELSE 'unpaid' END, 'pay_' || g, (g %% 1000) / 7.0, "
           "timestamptz '2024-01-01' + g * interval '1 second', g %% 17, 'note ' || (g %% 97) "
           "FROM generate_series(1, %lld) g",
           rows);
  exec_ok(c, sql);
  exec_ok(c, "VACUUM ANALYZE " TABLE);
}

static double copy_rate(PGconn *c, long long expect) {
  uint64_t t0 = uv_hrtime();
  PGresult *r = PQexec(c, "COPY (SELECT * FROM " TABLE ") TO STDOUT");
  if (PQresultStatus(r) != PGRES_COPY_OUT) {
    fprintf(stderr, "COPY: %s", PQerrorMessage(c));
    exit(1);
  }
  PQclear(r);
  long long n = 0;
  char *buf;
  int len;
  while ((len = PQgetCopyData(c, &buf, 0)) > 0) {
    n++;
    PQfreemem(buf);
  }
  while ((r = PQgetResult(c)) != NULL) PQclear(r);
  double s = (double)(uv_hrtime() - t0) / 1e9;
  if (n != expect) fprintf(stderr, "COPY returned %lld rows, expected %lld\n", n, expect);
  return (double)n / s;
}

typedef struct ctx {
  bool done;
  int status;
  uint64_t t0, t1;
  uint64_t checksum;
} ctx;

static bool validate(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v;
  ctx *x = data;
  const char *status = keel_verify_row_get(row, "status");
  const char *pay = keel_verify_row_get(row, "payment_status");
  const char *pid = keel_verify_row_get(row, "payment_id");
  x->checksum += (status ? (unsigned char)status[0] : 0u) + (pay ? (unsigned char)pay[0] : 0u) +
                 (pid ? 1u : 0u);
  return status != NULL && (pay == NULL || strcmp(pay, "paid") != 0 || pid != NULL);
}

static void run_done(keel_verify *v, int status, void *data) {
  (void)v;
  ctx *x = data;
  x->t1 = uv_hrtime();
  x->status = status;
  x->done = true;
}

static double verify_rate(const char *conninfo, uint32_t batch, long long expect) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  ctx x = {0};
  keel_verify_opts o;
  keel_verify_opts_init(&o);
  o.conninfo = conninfo;
  o.table = TABLE;
  o.batch_size = batch;
  o.validate = validate;
  o.on_run_done = run_done;
  o.data = &x;
  keel_verify *v;
  int rc = keel_verify_new(&loop, &o, &v);
  if (rc < 0) {
    fprintf(stderr, "keel_verify_new: %s\n", keel_strerror(rc));
    exit(1);
  }
  x.t0 = uv_hrtime();
  keel_verify_run_now(v);
  while (!x.done) uv_run(&loop, UV_RUN_ONCE);
  keel_verify_stats st;
  keel_verify_get_stats(v, &st);
  if (x.status != 0 || (long long)st.rows_scanned != expect) {
    fprintf(stderr, "verify run: status %s, %llu rows (%s)\n", keel_err_name(x.status),
            (unsigned long long)st.rows_scanned, keel_verify_last_error(v));
    exit(1);
  }
  keel_verify_close(v, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  double s = (double)(x.t1 - x.t0) / 1e9;
  return (double)st.rows_scanned / s;
}

int main(int argc, char **argv) {
  const char *conninfo = getenv("KEEL_PG");
  if (conninfo == NULL) conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL) {
    fprintf(stderr, "set KEEL_PG\n");
    return 1;
  }
  long long rows = argc > 1 ? strtoll(argv[1], NULL, 10) : 1000000;
  PGconn *c = blocking(conninfo);
  ensure_table(c, rows);
  (void)copy_rate(c, rows); /* warm the cache */
  double copy = 0, ver = 0;
  for (int i = 0; i < 2; i++) {
    double r = copy_rate(c, rows);
    if (r > copy) copy = r;
    r = verify_rate(conninfo, 1000, rows);
    if (r > ver) ver = r;
  }
  double b50 = verify_rate(conninfo, 50, rows);
  PQfinish(c);
  printf("rows %lld, 8 columns, validator reads 3\n", rows);
  printf("COPY (SELECT ...) TO STDOUT:  %.0f rows/s\n", copy);
  printf("verify, batch 1000:          %.0f rows/s (%.1f %% of COPY)\n", ver, 100.0 * ver / copy);
  printf("verify, batch 50:            %.0f rows/s\n", b50);
  printf("verify rows_per_s=%.0f copy_rows_per_s=%.0f ratio=%.3f rows_per_s_batch50=%.0f\n", ver,
         copy, ver / copy, b50);
  return 0;
}
