/*
 * bench/integrity.c — versioned updates and slug inserts per second
 * (./scripts/bench integrity).
 *
 *  occ     keel_occ_update on distinct rows (each row once, expected version
 *          1) through a pool of 4 connections, 4 in flight
 *  plain   pgbench -c 4 with the equivalent plain single-row UPDATE, same
 *          table shape, same run
 *  slug    keel_slug_insert with 8 concurrent creators of the same name
 * BENCH_INTEGRITY_SECONDS sets the duration of each part (default 5),
 * BENCH_INTEGRITY_ROUNDS the rounds of the two (default 3; each side's
 * median counts; see bench/occ.h for how the parts are kept fair).
 */
#include "occ.h"

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
  if (getenv("BENCH_INTEGRITY_ROUNDS") != NULL) rounds = atoi(getenv("BENCH_INTEGRITY_ROUNDS"));
  bench b;
  occ_bench_open(&b, "keel_bench_occ");
  char sql[512];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s_slugs (id serial PRIMARY KEY, slug text UNIQUE NOT "
           "NULL, owner int)",
           b.table);
  run_sql(&b, sql);

  double occ, plain;
  occ_compare(&b, &occ, &plain);
  long slugs = 0;
  double slug = slug_rate(&b, &slugs);
  keel_integrity_stats st;
  keel_integrity_get_stats(b.ig, &st);

  snprintf(sql, sizeof sql, "DROP TABLE %s_slugs", b.table);
  run_sql(&b, sql);
  occ_bench_close(&b);

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
