/*
 * bench/pg.c — statements per second through keel's PostgreSQL layer,
 * against bare libpq in the same run (a blocking loop: the floor).
 *
 *   keel pipelined : N x "SELECT $1::int" queued at once on one connection
 *   keel serial    : the same with opts.pipeline = false
 *   keel pool      : N statements through a pool of 4
 *   libpq serial   : PQexecParams N times (blocking)
 *   libpq pipeline : PQsendQueryParams + PQpipelineSync N times, then read
 *
 * Conninfo from env KEEL_PG (or KEEL_TEST_PG). Last line:
 * pg pipelined_per_s=<a> serial_per_s=<b> pool4_per_s=<c> floor_serial_per_s=<d>
 *    floor_pipelined_per_s=<e>
 */
#include <keel.h>

#include "common.h"
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N 20000

typedef struct run {
  int done;
  int failed;
} run;

static void on_result(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  run *r = data;
  r->done++;
  if (status != 0) r->failed++;
}

static double bench_conn(const char *conninfo, bool pipeline) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = conninfo;
  o.pipeline = pipeline;
  keel_pg *c;
  if (keel_pg_new(&loop, &o, &c) != 0) exit(1);
  run warm = {0};
  keel_pg_query(c, "SELECT 1", 0, NULL, on_result, &warm);
  while (warm.done == 0) uv_run(&loop, UV_RUN_ONCE);
  run r = {0};
  char num[16];
  double t0 = bench_now_s();
  for (int i = 0; i < N; i++) {
    snprintf(num, sizeof num, "%d", i);
    const char *p[] = {num};
    keel_pg_query(c, "SELECT $1::int", 1, p, on_result, &r);
  }
  while (r.done < N) uv_run(&loop, UV_RUN_ONCE);
  double dt = bench_now_s() - t0;
  keel_pg_close(c, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  if (r.failed) fprintf(stderr, "%d failed\n", r.failed);
  return N / dt;
}

static void on_pool_result(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  on_result(c, status, res, data);
}

static double bench_pool(const char *conninfo) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_pool_opts o;
  keel_pg_pool_opts_init(&o);
  o.conn.conninfo = conninfo;
  o.size = 4;
  keel_pg_pool *pool;
  if (keel_pg_pool_new(&loop, &o, &pool) != 0) exit(1);
  run warm = {0};
  for (int i = 0; i < 4; i++) keel_pg_pool_query(pool, "SELECT 1", 0, NULL, on_pool_result, &warm);
  while (warm.done < 4) uv_run(&loop, UV_RUN_ONCE);
  run r = {0};
  char num[16];
  double t0 = bench_now_s();
  for (int i = 0; i < N; i++) {
    snprintf(num, sizeof num, "%d", i);
    const char *p[] = {num};
    keel_pg_pool_query(pool, "SELECT $1::int", 1, p, on_pool_result, &r);
  }
  while (r.done < N) uv_run(&loop, UV_RUN_ONCE);
  double dt = bench_now_s() - t0;
  keel_pg_pool_close(pool, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  if (r.failed) fprintf(stderr, "%d failed\n", r.failed);
  return N / dt;
}

static double floor_serial(const char *conninfo) {
  PGconn *conn = PQconnectdb(conninfo);
  if (PQstatus(conn) != CONNECTION_OK) exit(1);
  char num[16];
  double t0 = bench_now_s();
  for (int i = 0; i < N; i++) {
    snprintf(num, sizeof num, "%d", i);
    const char *p[] = {num};
    PQclear(PQexecParams(conn, "SELECT $1::int", 1, NULL, p, NULL, NULL, 0));
  }
  double dt = bench_now_s() - t0;
  PQfinish(conn);
  return N / dt;
}

static double floor_pipelined(const char *conninfo) {
  PGconn *conn = PQconnectdb(conninfo);
  if (PQstatus(conn) != CONNECTION_OK) exit(1);
  char num[16];
  double t0 = bench_now_s();
  PQenterPipelineMode(conn);
  for (int i = 0; i < N; i++) {
    snprintf(num, sizeof num, "%d", i);
    const char *p[] = {num};
    PQsendQueryParams(conn, "SELECT $1::int", 1, NULL, p, NULL, NULL, 0);
    PQpipelineSync(conn);
  }
  PQflush(conn);
  int syncs = 0;
  while (syncs < N) {
    PGresult *res = PQgetResult(conn);
    if (res == NULL) continue;
    if (PQresultStatus(res) == PGRES_PIPELINE_SYNC) syncs++;
    PQclear(res);
  }
  double dt = bench_now_s() - t0;
  PQexitPipelineMode(conn);
  PQfinish(conn);
  return N / dt;
}

int main(void) {
  const char *conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || conninfo[0] == '\0') conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL) {
    fprintf(stderr, "set KEEL_PG\n");
    return 1;
  }
  double pipe[3], serial[3], pool[3], fserial[3], fpipe[3];
  for (int i = 0; i < 3; i++) {
    pipe[i] = bench_conn(conninfo, true);
    fpipe[i] = floor_pipelined(conninfo);
    serial[i] = bench_conn(conninfo, false);
    fserial[i] = floor_serial(conninfo);
    pool[i] = bench_pool(conninfo);
    printf(
        "run %d: keel pipelined %.0f/s, libpq pipelined %.0f/s, keel serial %.0f/s, libpq "
        "serial %.0f/s, keel pool(4) %.0f/s\n",
        i + 1, pipe[i], fpipe[i], serial[i], fserial[i], pool[i]);
  }
  printf(
      "pg pipelined_per_s=%.0f serial_per_s=%.0f pool4_per_s=%.0f floor_serial_per_s=%.0f "
      "floor_pipelined_per_s=%.0f\n",
      bench_median3(pipe[0], pipe[1], pipe[2]), bench_median3(serial[0], serial[1], serial[2]),
      bench_median3(pool[0], pool[1], pool[2]), bench_median3(fserial[0], fserial[1], fserial[2]),
      bench_median3(fpipe[0], fpipe[1], fpipe[2]));
  return 0;
}
