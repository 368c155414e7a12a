/*
 * bench/occ.h — the versioned-update part shared by bench/integrity.c
 * (direct) and bench/integrity_pooler.c (through PgBouncer): a pool of 4,
 * a table of ROWS rows, keel_occ_update on distinct rows with 4 in flight,
 * and pgbench running the equivalent plain UPDATE in the same run. Set
 * `conninfo`, `seconds` and `rounds` before occ_bench_open().
 *
 * Fair by construction (occ_compare): the parts alternate (occ, plain, then
 * plain, occ, ...) for `rounds` rounds and each side's median counts; every
 * part runs on a freshly loaded and analysed table (no part inherits the
 * other's dead rows, and autovacuum is off for it on both sides); both
 * spread their rows over the whole table (pgbench random ones, keel each
 * row once, in an order that strides across it), so neither gets the
 * other's page and index locality or contention.
 */
#ifndef KEEL_BENCH_OCC_H
#define KEEL_BENCH_OCC_H

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "keel/integrity.h"

#define ROWS 400000
/* keel visits row (k * ROW_STRIDE) % ROWS + 1 at step k: every row once
 * (the stride is coprime with ROWS), consecutive ones far apart. */
#define ROW_STRIDE 104729

static const char *conninfo;
static int seconds = 5;
static int rounds = 3;

typedef struct bench {
  uv_loop_t loop;
  keel_pg_pool *pool;
  keel_integrity *ig;
  double deadline;
  long next_id;
  long completed;
  long failed;
  int in_flight;
  char table[32];
} bench;

static void setup_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  int *done = data;
  if (status != 0) {
    fprintf(stderr, "setup: %s\n", keel_pg_last_error(c));
    exit(1);
  }
  (*done)++;
}

static void run_sql(bench *b, const char *sql) {
  int done = 0;
  keel_pg_pool_query(b->pool, sql, 0, NULL, setup_done, &done);
  while (done == 0) uv_run(&b->loop, UV_RUN_ONCE);
}

static void issue_update(bench *b);

static void on_update(keel_integrity *ig, int status, const char *version, bool inserted,
                      void *data) {
  (void)ig;
  (void)version;
  (void)inserted;
  bench *b = data;
  b->in_flight--;
  if (status == 0)
    b->completed++;
  else
    b->failed++;
  if (bench_now_s() < b->deadline && b->next_id < ROWS) issue_update(b);
}

static void issue_update(bench *b) {
  char id[24];
  snprintf(id, sizeof id, "%ld", (b->next_id++ * ROW_STRIDE) % ROWS + 1);
  static const char *const cols[] = {"name"};
  static const char *const vals[] = {"updated"};
  keel_occ_spec spec = {.table = b->table,
                        .key_column = "id",
                        .key_value = id,
                        .version_column = "version",
                        .expected_version = "1",
                        .set_columns = cols,
                        .set_values = vals,
                        .set_count = 1};
  if (keel_occ_update(b->ig, &spec, on_update, b) == 0) b->in_flight++;
}

static double occ_rate(bench *b) {
  b->completed = b->failed = 0;
  b->next_id = 0;
  double start = bench_now_s();
  b->deadline = start + seconds;
  for (int i = 0; i < 4; i++) issue_update(b);
  while (b->in_flight > 0) uv_run(&b->loop, UV_RUN_ONCE);
  double elapsed = bench_now_s() - start;
  if (b->failed)
    fprintf(stderr, "occ: %ld failed: %s\n", b->failed, keel_integrity_last_error(b->ig));
  return (double)b->completed / elapsed;
}

static double plain_rate(bench *b) {
  char text[256];
  snprintf(text, sizeof text,
           "\\set id random(1, %d)\nUPDATE %s SET name = 'updated', version = version + 1 "
           "WHERE id = :id;\n",
           ROWS, b->table);
  /* Two client threads: pgbench at its best, the stricter comparison. */
  return bench_pgbench(conninfo, text, 4, 2, seconds, NULL);
}

/* (Re)creates the table "<prefix>_<pid>": ROWS rows at version 1, analysed,
 * autovacuum off (a part is never measured with a vacuum of its table
 * running or not running by chance). */
static void occ_table_load(bench *b) {
  char sql[512];
  snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", b->table);
  run_sql(b, sql);
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id int PRIMARY KEY, name text, version bigint NOT NULL DEFAULT 1) "
           "WITH (autovacuum_enabled = off)",
           b->table);
  run_sql(b, sql);
  snprintf(sql, sizeof sql,
           "INSERT INTO %s (id, name) SELECT g, 'row ' || g FROM generate_series(1, %d) g",
           b->table, ROWS);
  run_sql(b, sql);
  snprintf(sql, sizeof sql, "VACUUM ANALYZE %s", b->table);
  run_sql(b, sql);
}

/* The pool, the context and the table; exits on failure. */
static void occ_bench_open(bench *b, const char *prefix) {
  memset(b, 0, sizeof *b);
  uv_loop_init(&b->loop);
  snprintf(b->table, sizeof b->table, "%s_%d", prefix, (int)getpid());
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = conninfo;
  po.size = 4;
  if (keel_pg_pool_new(&b->loop, &po, &b->pool) != 0) exit(1);
  if (keel_integrity_new(&b->loop, b->pool, NULL, &b->ig) != 0) exit(1);
  occ_table_load(b);
}

static int cmp_double(const void *x, const void *y) {
  double a = *(const double *)x, c = *(const double *)y;
  return (a > c) - (a < c);
}

/* Alternating rounds (see the top): *occ and *plain get each side's
 * median rate; each round's figures go to stderr. */
static void occ_compare(bench *b, double *occ, double *plain) {
  double o[16], p[16];
  int n = rounds < 1 ? 1 : rounds > 16 ? 16 : rounds;
  for (int r = 0; r < n; r++) {
    bool occ_first = r % 2 == 0;
    for (int part = 0; part < 2; part++) {
      if (part > 0 || r > 0) occ_table_load(b);
      if ((part == 0) == occ_first)
        o[r] = occ_rate(b);
      else
        p[r] = plain_rate(b);
    }
    fprintf(stderr, "round %d: occ %.0f /s, plain %.0f /s\n", r + 1, o[r], p[r]);
  }
  qsort(o, (size_t)n, sizeof o[0], cmp_double);
  qsort(p, (size_t)n, sizeof p[0], cmp_double);
  *occ = n % 2 ? o[n / 2] : (o[n / 2 - 1] + o[n / 2]) / 2;
  *plain = n % 2 ? p[n / 2] : (p[n / 2 - 1] + p[n / 2]) / 2;
}

/* Drops the table, closes the context and the pool, closes the loop. */
static void occ_bench_close(bench *b) {
  char sql[128];
  snprintf(sql, sizeof sql, "DROP TABLE %s", b->table);
  run_sql(b, sql);
  keel_integrity_close(b->ig, NULL, NULL);
  keel_pg_pool_close(b->pool, NULL, NULL);
  uv_run(&b->loop, UV_RUN_DEFAULT);
  uv_loop_close(&b->loop);
}

#endif
