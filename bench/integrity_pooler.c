/*
 * bench/integrity_pooler.c — versioned updates per second through PgBouncer
 * in transaction mode (./scripts/bench integrity_pooler), against plain
 * UPDATE through the same pooler, in the same run (issue 20).
 *
 *  occ     keel_occ_update on distinct rows (each row once, expected version
 *          1) through a pool of 4 connections to the pooler, 4 in flight,
 *          statement_mode AUTO (the default: it finds the pooler and goes
 *          unnamed; the statements re-sent at the switch are printed)
 *  plain   pgbench -c 4 -j 2 with the equivalent plain single-row UPDATE
 *          through the same pooler, same table shape
 * KEEL_PG_POOLER is the pooler's conninfo (scripts/bench sets it);
 * BENCH_INTEGRITY_SECONDS sets the duration of each part (default 5),
 * BENCH_INTEGRITY_ROUNDS the rounds of the two (default 3; each side's
 * median counts; see bench/occ.h for how the parts are kept fair).
 */
#include "occ.h"

int main(void) {
  conninfo = getenv("KEEL_PG_POOLER");
  if (conninfo == NULL || conninfo[0] == '\0') {
    fprintf(stderr, "KEEL_PG_POOLER is not set (run ./scripts/bench integrity_pooler)\n");
    return 1;
  }
  if (getenv("BENCH_INTEGRITY_SECONDS") != NULL) seconds = atoi(getenv("BENCH_INTEGRITY_SECONDS"));
  if (seconds < 1) seconds = 1;
  if (getenv("BENCH_INTEGRITY_ROUNDS") != NULL) rounds = atoi(getenv("BENCH_INTEGRITY_ROUNDS"));
  bench b;
  occ_bench_open(&b, "keel_bench_occp");

  double occ, plain;
  occ_compare(&b, &occ, &plain);
  keel_pg_pool_stats ps;
  keel_pg_pool_get_stats(b.pool, &ps);

  occ_bench_close(&b);

  printf("through PgBouncer (transaction mode):\n");
  printf(
      "versioned updates (keel, 4 connections):  %10.0f /s   (statements re-sent at the "
      "switch to unnamed: %llu; unnamed: %s)\n",
      occ, (unsigned long long)ps.statement_retries, ps.unnamed ? "yes" : "no");
  printf("plain UPDATE (pgbench -c 4):               %10.0f /s   ratio %.2f (bar >= 0.80)\n", plain,
         plain > 0 ? occ / plain : 0);
  printf("integrity_pooler occ_updates_per_s=%.0f plain_updates_per_s=%.0f ratio=%.2f\n", occ,
         plain, plain > 0 ? occ / plain : 0);
  return 0;
}
