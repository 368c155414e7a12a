/*
 * bench/redis_idem.c — parts (b) and (c) of issue 15's benchmark alone
 * (./scripts/bench redis_idem); ./scripts/bench redis runs them too, in the
 * issue's line. Redis from KEEL_TEST_REDIS.
 */
#include "redis_idem.h"

int main(void) {
  double pairs, floor_pairs, ns, allocs;
  idem_bench(getenv("KEEL_TEST_REDIS"), &pairs, &floor_pairs, &ns, &allocs);
  printf(
      "redis_idem idem_pairs_per_s=%.0f idem_floor_per_s=%.0f shared_breaker_ns=%.2f "
      "shared_breaker_allocs=%.6f\n",
      pairs, floor_pairs, ns, allocs);
  return 0;
}
