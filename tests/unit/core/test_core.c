/* Core: error codes, allocator, version, random source, backoff policies.
 * The retry runner has its own file (test_retry.c). */
#include <criterion/criterion.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/histogram.h"
#include "core/util.h"
#include "keel/common.h"
#include "keel/retry.h"
#include "support/harness.h"

/* ---- errors ------------------------------------------------------------ */

Test(core, every_keel_code_has_a_name_and_message) {
  int count = 0;
#define CHECK_CODE(name, value, msg)                                      \
  cr_assert_str_eq(keel_err_name(value), "KEEL_" #name);                  \
  cr_assert_str_eq(keel_strerror(value), msg);                            \
  cr_assert(strlen(msg) > 0);                                             \
  cr_assert(value <= -30000 && value > -31000, "%s out of range", #name); \
  cr_assert_eq((int)KEEL_##name, value);                                  \
  cr_assert_str_neq(keel_strerror(value), "unknown error", "%s", #name);  \
  count++;
  KEEL_ERRNO_MAP(CHECK_CODE)
#undef CHECK_CODE
  cr_assert_geq(count, 19);
}

Test(core, keel_codes_are_distinct_and_never_collide_with_libuv) {
  static const int codes[] = {
#define LIST_CODE(name, value, msg) value,
      KEEL_ERRNO_MAP(LIST_CODE)
#undef LIST_CODE
  };
  size_t n = sizeof codes / sizeof codes[0];
  for (size_t i = 0; i < n; i++) {
    for (size_t j = i + 1; j < n; j++) cr_assert_neq(codes[i], codes[j]);
    /* appended in order with the next number: -30001, -30002, ... */
    cr_assert_eq(codes[i], -30001 - (int)i, "code #%zu renumbered", i);
#define NOT_UV(name, msg) cr_assert_neq(codes[i], UV_##name);
    UV_ERRNO_MAP(NOT_UV)
#undef NOT_UV
  }
}

Test(core, libuv_codes_pass_through) {
  int count = 0;
#define CHECK_UV(name, msg)                                           \
  cr_assert_str_eq(keel_err_name(UV_##name), "UV_" #name);            \
  cr_assert_str_eq(keel_strerror(UV_##name), uv_strerror(UV_##name)); \
  count++;
  UV_ERRNO_MAP(CHECK_UV)
#undef CHECK_UV
  cr_assert_gt(count, 50);
  cr_assert_str_eq(keel_err_name(UV_ECANCELED), "UV_ECANCELED");
  cr_assert_str_eq(keel_strerror(UV_ETIMEDOUT), uv_strerror(UV_ETIMEDOUT));
}

Test(core, success_and_unknown_codes) {
  cr_assert_str_eq(keel_strerror(0), "success");
  cr_assert_str_eq(keel_err_name(0), "OK");
  /* unknown in keel's range, in libuv's range (uv_strerror would allocate a
   * message for it and leak it), positive, and the extremes */
  const int unknown[] = {-30998, -30000, -31000, -29999, -123456, 5, INT_MIN, INT_MAX};
  for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
    cr_assert_str_eq(keel_strerror(unknown[i]), "unknown error", "%d", unknown[i]);
    cr_assert_str_eq(keel_err_name(unknown[i]), "UNKNOWN", "%d", unknown[i]);
  }
}

/* ---- version ----------------------------------------------------------- */

Test(core, version_matches_header) {
  cr_assert_eq(keel_version(), (unsigned)KEEL_VERSION_HEX);
  cr_assert_eq(keel_version(), (unsigned)((KEEL_VERSION_MAJOR << 16) | (KEEL_VERSION_MINOR << 8) |
                                          KEEL_VERSION_PATCH));
  cr_assert_str_eq(keel_version_string(), KEEL_VERSION_STRING);
  cr_assert_str_eq(keel_version_string(), "0.1.0");
  cr_assert_eq(keel_version(), 0x000100u);
}

/* ---- allocator --------------------------------------------------------- */

Test(core, replace_allocator_rejects_null_and_changes_nothing) {
  kt_alloc_install();
  cr_assert_eq(keel_replace_allocator(NULL, realloc, calloc, free), UV_EINVAL);
  cr_assert_eq(keel_replace_allocator(malloc, NULL, calloc, free), UV_EINVAL);
  cr_assert_eq(keel_replace_allocator(malloc, realloc, NULL, free), UV_EINVAL);
  cr_assert_eq(keel_replace_allocator(malloc, realloc, calloc, NULL), UV_EINVAL);
  cr_assert_eq(keel_replace_allocator(NULL, NULL, NULL, NULL), UV_EINVAL);
  /* the counting allocator is still the one in use */
  uint64_t before = kt_alloc_count();
  void *p = keel__malloc(10);
  cr_assert_not_null(p);
  cr_assert_eq(kt_alloc_count(), before + 1);
  keel_free(p);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
  cr_assert_eq(keel_replace_allocator(malloc, realloc, calloc, free), 0);
}

Test(core, every_allocation_goes_through_the_allocator) {
  kt_alloc_install();
  uint64_t count = kt_alloc_count();
  void *m = keel__malloc(16);
  void *z = keel__malloc(0); /* a unique pointer, not NULL */
  void *c = keel__calloc(4, 8);
  char *s = keel__strdup("keel");
  char *sn = keel__strndup("keel-core", 4);
  cr_assert(m && z && c && s && sn);
  cr_assert_eq(kt_alloc_count(), count + 5);
  cr_assert_eq(kt_alloc_live_blocks(), 5);
  for (int i = 0; i < 32; i++) cr_assert_eq(((char *)c)[i], 0);
  cr_assert_str_eq(s, "keel");
  cr_assert_str_eq(sn, "keel");
  m = keel__realloc(m, 64);
  cr_assert_not_null(m);
  cr_assert_eq(kt_alloc_count(), count + 6);
  cr_assert_eq(kt_alloc_live_bytes(), 64 + 1 + 32 + 5 + 5);
  keel__free(m);
  keel__free(z);
  keel_free(c);
  keel_free(s);
  keel_free(sn);
  keel_free(NULL);
  keel__free(NULL);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
  cr_assert_eq(kt_alloc_live_bytes(), 0);
  cr_assert_null(keel__strdup(NULL));
}

Test(core, calloc_overflow_never_reaches_the_allocator) {
  kt_alloc_install();
  uint64_t count = kt_alloc_count();
  cr_assert_null(keel__calloc(SIZE_MAX / 2, 3));
  cr_assert_null(keel__calloc(SIZE_MAX, SIZE_MAX));
  cr_assert_eq(kt_alloc_count(), count);
}

Test(core, allocation_failures_are_reported_as_null) {
  kt_alloc_install();
  kt_alloc_fail_nth(1);
  void *a = keel__malloc(8);
  void *b = keel__malloc(8); /* the one that fails */
  void *c = keel__malloc(8);
  cr_assert_not_null(a);
  cr_assert_null(b);
  cr_assert_not_null(c);
  keel_free(a);
  keel_free(c);
  kt_alloc_fail_after(0);
  cr_assert_null(keel__strdup("x"));
  cr_assert_null(keel__calloc(1, 1));
  kt_alloc_fail_after(-1);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
}

static void deferred(void *arg) {
  (*(int *)arg)++;
}

Test(core, call_later_uses_the_allocator_and_runs_later) {
  kt_alloc_install();
  uv_loop_t loop;
  uv_loop_init(&loop);
  int calls = 0;
  uint64_t count = kt_alloc_count();
  cr_assert_eq(keel__call_later(&loop, deferred, &calls), 0);
  cr_assert_eq(calls, 0, "never inside the call");
  cr_assert_eq(kt_alloc_count(), count + 1);
  kt_alloc_fail_after(0);
  cr_assert_eq(keel__call_later(&loop, deferred, &calls), UV_ENOMEM);
  kt_alloc_fail_after(-1);
  uv_run(&loop, UV_RUN_DEFAULT);
  cr_assert_eq(calls, 1);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
  kt_loop_finish(&loop);
}

/* ---- random source ----------------------------------------------------- */

/* Reference values from an independent implementation (splitmix64 seeding,
 * xoroshiro128+ with 24/16/37): the same seed gives the same sequence on
 * every platform. */
Test(rng, pinned_sequence) {
  keel_rng rng;
  keel_rng_seed(&rng, 42);
  cr_assert_eq(keel_rng_next(&rng), 0xe6c71559e2525f98ull);
  cr_assert_eq(keel_rng_next(&rng), 0x13b69ac93ec06b57ull);
  cr_assert_eq(keel_rng_next(&rng), 0x879006cb74f40d36ull);
  keel_rng_seed(&rng, 0);
  cr_assert_eq(keel_rng_next(&rng), 0x509946a41cd733a3ull);
  cr_assert_eq(keel_rng_next(&rng), 0xd805fcac6824536eull);
}

Test(rng, deterministic_per_seed) {
  keel_rng a, b, c;
  keel_rng_seed(&a, 7);
  keel_rng_seed(&b, 7);
  keel_rng_seed(&c, 8);
  int differ = 0;
  for (int i = 0; i < 100; i++) {
    uint64_t x = keel_rng_next(&a);
    cr_assert_eq(x, keel_rng_next(&b));
    differ += x != keel_rng_next(&c);
  }
  cr_assert_gt(differ, 95);
}

Test(rng, between_bounds) {
  keel_rng rng;
  keel_rng_seed(&rng, 1);
  bool seen_low = false, seen_high = false;
  for (int i = 0; i < 10000; i++) {
    uint64_t v = keel_rng_between(&rng, 10, 20);
    cr_assert(v >= 10 && v <= 20, "%llu", (unsigned long long)v);
    seen_low |= v == 10;
    seen_high |= v == 20;
  }
  cr_assert(seen_low && seen_high, "both ends are reachable");
  /* two-value range at the top of uint64_t */
  bool top = false, below = false;
  for (int i = 0; i < 200; i++) {
    uint64_t v = keel_rng_between(&rng, UINT64_MAX - 1, UINT64_MAX);
    cr_assert(v >= UINT64_MAX - 1);
    top |= v == UINT64_MAX;
    below |= v == UINT64_MAX - 1;
  }
  cr_assert(top && below);
  /* [0, 1] and the full range */
  int ones = 0;
  for (int i = 0; i < 1000; i++) ones += (int)keel_rng_between(&rng, 0, 1);
  cr_assert(ones > 400 && ones < 600, "roughly fair: %d", ones);
  (void)keel_rng_between(&rng, 0, UINT64_MAX);
  /* a span just above half the range rejects often: still bounded */
  for (int i = 0; i < 1000; i++)
    cr_assert_leq(keel_rng_between(&rng, 5, (UINT64_MAX / 2) + 7), (UINT64_MAX / 2) + 7);
  cr_assert_eq(keel_rng_between(&rng, 5, 5), 5);
  cr_assert_eq(keel_rng_between(&rng, 9, 3), 9, "low when high < low");
}

Test(rng, null_is_harmless) {
  keel_rng_seed(NULL, 1);
  cr_assert_eq(keel_rng_next(NULL), 0);
  cr_assert_eq(keel_rng_between(NULL, 3, 10), 3);
}

/* ---- backoff ----------------------------------------------------------- */

static void assert_sequence(const keel_backoff *b, keel_rng *rng, const uint64_t *expected,
                            unsigned n) {
  uint64_t prev = 0;
  for (unsigned i = 1; i <= n; i++) {
    uint64_t d = keel_backoff_delay(b, i, prev, rng);
    cr_assert_eq(d, expected[i - 1], "retry %u: %llu, expected %llu", i, (unsigned long long)d,
                 (unsigned long long)expected[i - 1]);
    prev = d;
  }
}

Test(backoff, fixed) {
  keel_backoff b;
  keel_backoff_fixed(&b, 250);
  cr_assert_eq(b.kind, KEEL_BACKOFF_FIXED);
  for (unsigned n = 0; n < 10; n++) cr_assert_eq(keel_backoff_delay(&b, n, 0, NULL), 250);
  cr_assert_eq(keel_backoff_delay(&b, UINT_MAX, 0, NULL), 250);
  b.max_ms = 100; /* invalid (cap below base) but still bounded by the cap */
  cr_assert_eq(keel_backoff_validate(&b, NULL), UV_EINVAL);
  cr_assert_eq(keel_backoff_delay(&b, 1, 0, NULL), 100);
}

Test(backoff, exponential_sequences) {
  keel_backoff b;
  keel_backoff_exponential(&b, 100, 2.0, 0);
  const uint64_t doubling[] = {100, 200, 400, 800, 1600, 3200};
  assert_sequence(&b, NULL, doubling, 6);
  cr_assert_eq(keel_backoff_delay(&b, 0, 0, NULL), 100, "retry 0 counts as 1");
  /* seed 004: retryDelay 100, backoffMultiplier 2, maxDelay 1000 */
  keel_backoff_exponential(&b, 100, 2.0, 1000);
  const uint64_t capped[] = {100, 200, 400, 800, 1000, 1000, 1000};
  assert_sequence(&b, NULL, capped, 7);
  keel_backoff_exponential(&b, 1000, 1.5, 3000);
  const uint64_t halves[] = {1000, 1500, 2250, 3000, 3000};
  assert_sequence(&b, NULL, halves, 5);
  /* 1.15 is not exact in binary: 100 * 1.15 = 114.99999999999999 must still
   * be 115 (rounded, not truncated) */
  keel_backoff_exponential(&b, 100, 1.15, 0);
  cr_assert_eq(keel_backoff_delay(&b, 2, 0, NULL), 115);
  keel_backoff_exponential(&b, 10, 1.1, 0);
  cr_assert_eq(keel_backoff_delay(&b, 3, 0, NULL), 12); /* 12.1 */
  keel_backoff_exponential(&b, 7, 1.0, 0);
  cr_assert_eq(keel_backoff_delay(&b, 1000, 0, NULL), 7);
  keel_backoff_exponential(&b, 0, 2.0, 0);
  cr_assert_eq(keel_backoff_delay(&b, 1000, 0, NULL), 0);
}

Test(backoff, full_jitter_pinned_and_bounded) {
  keel_backoff b;
  keel_backoff_full_jitter(&b, 100, 2.0, 1000);
  cr_assert_eq(b.kind, KEEL_BACKOFF_FULL_JITTER);
  keel_rng rng;
  keel_rng_seed(&rng, 7);
  const uint64_t pinned[] = {86, 176, 350, 328, 789, 268, 844, 284}; /* reference impl. */
  assert_sequence(&b, &rng, pinned, 8);
  keel_rng_seed(&rng, 42);
  bool hit_cap_range = false;
  for (unsigned n = 1; n < 40; n++) {
    uint64_t ceiling = n > 10 ? 1000 : 100ull << (n - 1);
    if (ceiling > 1000) ceiling = 1000;
    for (int i = 0; i < 100; i++) {
      uint64_t d = keel_backoff_delay(&b, n, 0, &rng);
      cr_assert_leq(d, ceiling);
      hit_cap_range |= d > 900;
    }
  }
  cr_assert(hit_cap_range, "draws reach the top of the range");
  cr_assert_eq(keel_backoff_delay(&b, 3, 0, NULL), 400, "without rng: the ceiling");
  cr_assert_eq(keel_backoff_delay(&b, 30, 0, NULL), 1000);
}

Test(backoff, decorrelated_jitter_pinned_and_follows_the_aws_formula) {
  keel_backoff b;
  keel_backoff_decorrelated_jitter(&b, 100, 1000);
  cr_assert_eq(b.kind, KEEL_BACKOFF_DECORRELATED_JITTER);
  keel_rng rng;
  keel_rng_seed(&rng, 7);
  const uint64_t pinned[] = {178, 498, 402, 761, 343, 566, 1000, 1000, 1000, 1000};
  assert_sequence(&b, &rng, pinned, 10);
  /* min(cap, uniform [base, 3 * prev]): never below base, never above cap
   * or 3 * prev, and the cap itself is hit often once 3 * prev > cap (the
   * draw is capped after it is made, as in the AWS formula) */
  keel_backoff_decorrelated_jitter(&b, 100, 5000);
  keel_rng_seed(&rng, 9);
  uint64_t prev = 0;
  int at_cap = 0;
  for (unsigned n = 1; n < 2000; n++) {
    uint64_t d = keel_backoff_delay(&b, n, prev, &rng);
    uint64_t high = (prev < 100 ? 100 : prev) * 3;
    cr_assert_geq(d, 100);
    cr_assert_leq(d, high < 5000 ? high : 5000);
    at_cap += d == 5000;
    prev = d;
  }
  cr_assert_gt(at_cap, 500, "capped draws pile up at the cap: %d", at_cap);
  cr_assert_eq(keel_backoff_delay(&b, 1, 0, NULL), 300, "without rng: min(cap, 3 * base)");
  cr_assert_eq(keel_backoff_delay(&b, 2, 4000, NULL), 5000);
}

Test(backoff, never_overflows) {
  keel_backoff policies[8];
  keel_backoff_fixed(&policies[0], UINT64_MAX);
  keel_backoff_exponential(&policies[1], 100, 2.0, 0);
  keel_backoff_exponential(&policies[2], 100, 2.0, 60000);
  keel_backoff_exponential(&policies[3], 1, 1.0000001, 0); /* grows slowly: no long loop */
  keel_backoff_full_jitter(&policies[4], 100, 10.0, 0);
  keel_backoff_full_jitter(&policies[5], 100, 1e300, 5000);
  keel_backoff_decorrelated_jitter(&policies[6], 100, 0);
  keel_backoff_decorrelated_jitter(&policies[7], UINT64_MAX / 4, 0);
  const unsigned retries[] = {1, 2, 63, 64, 65, 1000, 100000, UINT_MAX};
  keel_rng rng;
  keel_rng_seed(&rng, 3);
  for (size_t p = 0; p < 8; p++) {
    uint64_t cap = policies[p].max_ms != 0 ? policies[p].max_ms : UINT64_MAX / 2;
    uint64_t prev = 0;
    for (size_t i = 0; i < sizeof retries / sizeof retries[0]; i++) {
      uint64_t d = keel_backoff_delay(&policies[p], retries[i], prev, &rng);
      cr_assert_leq(d, cap, "policy %zu retry %u: %llu", p, retries[i], (unsigned long long)d);
      uint64_t u = keel_backoff_delay(&policies[p], retries[i], prev, NULL);
      cr_assert_leq(u, cap);
      prev = d;
    }
  }
  cr_assert_eq(keel_backoff_delay(&policies[1], 1000, 0, NULL), UINT64_MAX / 2, "saturates");
  cr_assert_eq(keel_backoff_delay(&policies[2], 1000, 0, NULL), 60000, "caps");
  cr_assert_eq(keel_backoff_delay(&policies[1], 64, 0, NULL), UINT64_MAX / 2);
  cr_assert_eq(keel_backoff_delay(&policies[0], 5, 0, NULL), UINT64_MAX / 2);
  /* decorrelated with a previous delay near the top: 3 * prev saturates */
  cr_assert_leq(keel_backoff_delay(&policies[6], 9, UINT64_MAX - 5, &rng), UINT64_MAX / 2);
}

Test(backoff, invalid_policies_still_give_bounded_delays) {
  keel_backoff b;
  keel_backoff_exponential(&b, 100, NAN, 1000); /* NaN */
  cr_assert_eq(keel_backoff_delay(&b, 5, 0, NULL), 100, "a bad factor acts as 1");
  b.factor = -3.0;
  cr_assert_eq(keel_backoff_delay(&b, 5, 0, NULL), 100);
  b.factor = 0.5;
  cr_assert_eq(keel_backoff_delay(&b, 5, 0, NULL), 100);
  b.kind = (keel_backoff_kind)42;
  cr_assert_eq(keel_backoff_delay(&b, 5, 0, NULL), 100);
  cr_assert_eq(keel_backoff_delay(NULL, 5, 0, NULL), 0);
  keel_backoff_fixed(NULL, 1);
  keel_backoff_exponential(NULL, 1, 2, 0);
  keel_backoff_full_jitter(NULL, 1, 2, 0);
  keel_backoff_decorrelated_jitter(NULL, 1, 0);
}

Test(backoff, validate) {
  keel_backoff b;
  const char *why = "unset";
  keel_backoff_exponential(&b, 100, 0.5, 0);
  cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL);
  cr_assert_not_null(why);
  cr_assert(strstr(why, "factor") != NULL, "%s", why);
  keel_backoff_exponential(&b, 100, INFINITY, 0);
  cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL);
  keel_backoff_exponential(&b, 100, NAN, 0);
  cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL);
  keel_backoff_exponential(&b, 100, 2, 50);
  cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL);
  cr_assert(strstr(why, "max_ms") != NULL, "%s", why);
  keel_backoff_decorrelated_jitter(&b, 0, 1000);
  cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL);
  cr_assert(strstr(why, "base_ms") != NULL, "%s", why);
  b.kind = (keel_backoff_kind)99;
  cr_assert_eq(keel_backoff_validate(&b, NULL), UV_EINVAL);
  b.kind = (keel_backoff_kind)-1;
  cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL);
  cr_assert(strstr(why, "kind") != NULL, "%s", why);
  cr_assert_eq(keel_backoff_validate(NULL, &why), UV_EINVAL);
  cr_assert_not_null(why);

  keel_backoff_fixed(&b, 0);
  cr_assert_eq(keel_backoff_validate(&b, &why), 0);
  cr_assert_null(why);
  keel_backoff_exponential(&b, 100, 1.0, 100);
  cr_assert_eq(keel_backoff_validate(&b, &why), 0);
  keel_backoff_full_jitter(&b, 100, 2, 1000);
  cr_assert_eq(keel_backoff_validate(&b, &why), 0);
  keel_backoff_decorrelated_jitter(&b, 1, 0);
  cr_assert_eq(keel_backoff_validate(&b, NULL), 0);
}

/* #15: FIXED (and decorrelated jitter) ignore the factor, as the header
 * says, so no factor value makes them invalid. */
Test(backoff, kinds_that_ignore_the_factor_accept_any) {
  const double factors[] = {0.0, -1.0, 0.5, NAN, INFINITY};
  for (size_t i = 0; i < sizeof factors / sizeof factors[0]; i++) {
    keel_backoff b;
    const char *why = "unset";
    keel_backoff_fixed(&b, 250);
    b.factor = factors[i];
    cr_assert_eq(keel_backoff_validate(&b, &why), 0, "fixed, factor %g: %s", factors[i],
                 why ? why : "");
    cr_assert_eq(keel_backoff_delay(&b, 7, 0, NULL), 250);
    keel_backoff_decorrelated_jitter(&b, 10, 1000);
    b.factor = factors[i];
    cr_assert_eq(keel_backoff_validate(&b, &why), 0, "decorrelated, factor %g", factors[i]);
    keel_backoff_exponential(&b, 10, factors[i], 1000);
    cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL, "exponential, factor %g", factors[i]);
    keel_backoff_full_jitter(&b, 10, factors[i], 1000);
    cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL, "full jitter, factor %g", factors[i]);
  }
}

/* ---- small helpers: edges ------------------------------------------------ */

Test(core_edges, histogram_buckets_and_quantiles) {
  keel__histogram h;
  memset(&h, 0, sizeof h);
  cr_assert_eq(keel__histogram_quantile(&h, 0.5), 0.0, "empty");
  for (uint64_t v = 0; v < 4; v++) keel__histogram_record(&h, v);
  cr_assert_eq(keel__histogram_quantile(&h, 0.0), 0.0);
  cr_assert_eq(keel__histogram_quantile(&h, 1.0), 3.0, "clamped to the largest rank");
  for (int i = 0; i < 96; i++) keel__histogram_record(&h, 1000);
  double p50 = keel__histogram_quantile(&h, 0.5);
  cr_assert(p50 >= 1000 * 0.75 && p50 <= 1000, "p50 %g within a bucket of 1000", p50);
  keel__histogram_record(&h, UINT64_MAX);
  cr_assert_eq(h.count, 101);
  cr_assert_eq(h.max_ns, UINT64_MAX);
  cr_assert_geq(keel__histogram_quantile(&h, 0.999), 1e18, "the top bucket");
  /* quantile of the maximum is clamped to what was seen */
  keel__histogram g;
  memset(&g, 0, sizeof g);
  keel__histogram_record(&g, 1001);
  cr_assert_eq(keel__histogram_quantile(&g, 0.5), 1001.0);
}

Test(core_edges, allocator_and_text_helpers) {
  cr_assert_null(keel__calloc(SIZE_MAX / 2, 4), "calloc checks its multiplication");
  void *p = keel__calloc(0, 8);
  cr_assert_not_null(p, "zero-size calloc still returns a block");
  keel__free(p);
  p = keel__malloc(0);
  cr_assert_not_null(p);
  p = keel__realloc(p, 0);
  cr_assert_not_null(p);
  keel_free(p);
  keel__free(NULL);
  cr_assert_null(keel__strndup(NULL, 3));
  char *s = keel__strndup("abcdef", 3);
  cr_assert_str_eq(s, "abc");
  keel__free(s);
  cr_assert_eq(keel__fail(NULL, UV_EINVAL, "%s", "nowhere"), UV_EINVAL);
  char buf[KEEL__ERRBUF_SIZE];
  cr_assert_eq(keel__fail(buf, UV_EIO, "n=%d", 5), UV_EIO);
  cr_assert_str_eq(buf, "n=5");
  cr_assert_eq(keel__why(NULL, 10, UV_EINVAL, "x"), UV_EINVAL);
  cr_assert_eq(keel__why(buf, 0, UV_EINVAL, "x"), UV_EINVAL);
  cr_assert_eq(keel__why(buf, sizeof buf, 0, NULL), 0);
  cr_assert_str_eq(buf, "");
}
