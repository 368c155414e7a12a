/*
 * bench/occ.h — the versioned-update part shared by bench/integrity.c
 * (direct) and bench/integrity_pooler.c (through PgBouncer): a pool of 4,
 * a table of ROWS rows, keel_occ_update on distinct rows with 4 in flight,
 * and pgbench running the equivalent plain UPDATE in the same run. Set
 * `conninfo` and `seconds` before occ_bench_open().
 */
#ifndef KEEL_BENCH_OCC_H
#define KEEL_BENCH_OCC_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "keel/integrity.h"

#define ROWS 400000

static const char *conninfo;
static int seconds = 5;

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
  if (bench_now_s() < b->deadline && b->next_id <= ROWS) issue_update(b);
}

static void issue_update(bench *b) {
  char id[24];
  snprintf(id, sizeof id, "%ld", b->next_id++);
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
  b->next_id = 1;
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

/* The pool, the context and the table "<prefix>_<pid>", filled and
 * analysed; exits on failure. */
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
  char sql[512];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id int PRIMARY KEY, name text, version bigint NOT NULL DEFAULT 1)",
           b->table);
  run_sql(b, sql);
  snprintf(sql, sizeof sql,
           "INSERT INTO %s (id, name) SELECT g, 'row ' || g FROM generate_series(1, %d) g",
           b->table, ROWS);
  run_sql(b, sql);
  snprintf(sql, sizeof sql, "VACUUM ANALYZE %s", b->table);
  run_sql(b, sql);
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
