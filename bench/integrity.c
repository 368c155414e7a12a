/*
 * bench/integrity.c — versioned updates and slug inserts per second
 * (./scripts/bench integrity).
 *
 *  occ     keel_occ_update on distinct rows (each row once, expected version
 *          1) through a pool of 4 connections, 4 in flight
 *  plain   pgbench -c 4 with the equivalent plain single-row UPDATE, same
 *          table shape, same run
 *  slug    keel_slug_insert with 8 concurrent creators of the same name
 * BENCH_INTEGRITY_SECONDS sets the duration of each part (default 5).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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

typedef struct slug_state {
  bench *b;
  long inserted;
  long failed;
  int running;
} slug_state;

static void issue_slug(slug_state *s);

static void on_slug(keel_integrity *ig, int status, const char *slug, void *data) {
  (void)ig;
  (void)slug;
  slug_state *s = data;
  s->running--;
  if (status == 0)
    s->inserted++;
  else
    s->failed++;
  if (bench_now_s() < s->b->deadline) issue_slug(s);
}

static void issue_slug(slug_state *s) {
  static const char *const cols[] = {"owner"};
  static const char *const vals[] = {"1"};
  char table[48];
  snprintf(table, sizeof table, "%s_slugs", s->b->table);
  keel_slug_spec spec = {.table = table,
                         .slug_column = "slug",
                         .name = "Jane Doe",
                         .columns = cols,
                         .values = vals,
                         .count = 1};
  if (keel_slug_insert(s->b->ig, &spec, on_slug, s) == 0) s->running++;
}

static double slug_rate(bench *b, long *inserted) {
  slug_state s = {b, 0, 0, 0};
  double start = bench_now_s();
  b->deadline = start + seconds;
  for (int i = 0; i < 8; i++) issue_slug(&s);
  while (s.running > 0) uv_run(&b->loop, UV_RUN_ONCE);
  double elapsed = bench_now_s() - start;
  *inserted = s.inserted;
  if (s.failed)
    fprintf(stderr, "slug: %ld failed: %s\n", s.failed, keel_integrity_last_error(b->ig));
  return (double)s.inserted / elapsed;
}

int main(void) {
  conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || conninfo[0] == '\0') {
    fprintf(stderr, "KEEL_PG is not set (run ./scripts/bench integrity)\n");
    return 1;
  }
  if (getenv("BENCH_INTEGRITY_SECONDS") != NULL) seconds = atoi(getenv("BENCH_INTEGRITY_SECONDS"));
  if (seconds < 1) seconds = 1;
  bench b;
  memset(&b, 0, sizeof b);
  uv_loop_init(&b.loop);
  snprintf(b.table, sizeof b.table, "keel_bench_occ_%d", (int)getpid());
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = conninfo;
  po.size = 4;
  if (keel_pg_pool_new(&b.loop, &po, &b.pool) != 0) return 1;
  if (keel_integrity_new(&b.loop, b.pool, NULL, &b.ig) != 0) return 1;
  char sql[512];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id int PRIMARY KEY, name text, version bigint NOT NULL DEFAULT 1)",
           b.table);
  run_sql(&b, sql);
  snprintf(sql, sizeof sql,
           "INSERT INTO %s (id, name) SELECT g, 'row ' || g FROM generate_series(1, %d) g", b.table,
           ROWS);
  run_sql(&b, sql);
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s_slugs (id serial PRIMARY KEY, slug text UNIQUE NOT "
           "NULL, owner int)",
           b.table);
  run_sql(&b, sql);
  snprintf(sql, sizeof sql, "VACUUM ANALYZE %s", b.table);
  run_sql(&b, sql);

  double occ = occ_rate(&b);
  double plain = plain_rate(&b);
  long slugs = 0;
  double slug = slug_rate(&b, &slugs);
  keel_integrity_stats st;
  keel_integrity_get_stats(b.ig, &st);

  snprintf(sql, sizeof sql, "DROP TABLE %s, %s_slugs", b.table, b.table);
  run_sql(&b, sql);
  keel_integrity_close(b.ig, NULL, NULL);
  keel_pg_pool_close(b.pool, NULL, NULL);
  uv_run(&b.loop, UV_RUN_DEFAULT);
  uv_loop_close(&b.loop);

  printf("versioned updates (keel, 4 connections):  %10.0f /s\n", occ);
  printf("plain UPDATE (pgbench -c 4):               %10.0f /s   ratio %.2f (bar >= 0.90)\n", plain,
         plain > 0 ? occ / plain : 0);
  printf(
      "slug inserts (8 creators, same name):      %10.0f /s   (%ld slugs, %llu round trips, "
      "%llu collisions)\n",
      slug, slugs, (unsigned long long)st.slug_round_trips, (unsigned long long)st.slug_collisions);
  printf(
      "integrity occ_updates_per_s=%.0f plain_updates_per_s=%.0f ratio=%.2f "
      "slug_inserts_per_s=%.0f\n",
      occ, plain, plain > 0 ? occ / plain : 0, slug);
  return 0;
}
