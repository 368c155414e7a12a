/* The adaptive concurrency limit of keel/adaptive.h, driven by a simulated
 * downstream in simulated time (no loop, no sleeping): convergence of the
 * gradient and AIMD limits, bounds, the "grow only when used" rule, the
 * counters, validation and allocation failure. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "keel/adaptive.h"
#include "support/harness.h"

#define BASE_US 10000u /* unloaded latency */
#define KNEE 40u       /* latency grows beyond this many in flight */
#define MAX_FLIGHT 1024u

/* A downstream whose latency is BASE_US up to KNEE calls in flight and grows
 * in proportion beyond (a queue inside the server). Demand is unbounded: a
 * new call starts as soon as the limiter lets one through. */
typedef struct sim {
  keel_adaptive *lim;
  uint64_t now;
  uint64_t end[MAX_FLIGHT]; /* completion times of calls in flight (unsorted) */
  uint64_t lat[MAX_FLIGHT];
  unsigned n;
  uint32_t min_seen, max_seen; /* limit over the measured phase */
  uint64_t *latencies;         /* measured phase */
  size_t nlat;
} sim;

static void fill(sim *s) {
  while (s->n < MAX_FLIGHT && keel_adaptive_try_acquire(s->lim)) {
    unsigned inflight = s->n + 1;
    uint64_t lat = inflight <= KNEE ? BASE_US : (uint64_t)BASE_US * inflight / KNEE;
    s->end[s->n] = s->now + lat;
    s->lat[s->n] = lat;
    s->n++;
  }
}

/* Runs `calls` completions; records the limit and latencies of the second
 * half. */
static void run_sim(sim *s, unsigned calls) {
  s->min_seen = UINT32_MAX;
  s->max_seen = 0;
  s->latencies = calloc(calls, sizeof *s->latencies);
  s->nlat = 0;
  fill(s);
  for (unsigned done = 0; done < calls; done++) {
    cr_assert(s->n > 0);
    unsigned first = 0;
    for (unsigned i = 1; i < s->n; i++)
      if (s->end[i] < s->end[first]) first = i;
    s->now = s->end[first];
    uint64_t lat = s->lat[first];
    s->end[first] = s->end[s->n - 1];
    s->lat[first] = s->lat[s->n - 1];
    s->n--;
    cr_assert_eq(keel_adaptive_release(s->lim, lat, KEEL_ADAPTIVE_SUCCESS), 0);
    if (done >= calls / 2) {
      uint32_t l = keel_adaptive_limit(s->lim);
      if (l < s->min_seen) s->min_seen = l;
      if (l > s->max_seen) s->max_seen = l;
      s->latencies[s->nlat++] = lat;
    }
    fill(s);
  }
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static uint64_t p99(sim *s) {
  qsort(s->latencies, s->nlat, sizeof *s->latencies, cmp_u64);
  return s->latencies[s->nlat * 99 / 100];
}

static void finish(sim *s) {
  for (; s->n > 0; s->n--) cr_assert_eq(keel_adaptive_release(s->lim, 1, KEEL_ADAPTIVE_IGNORE), 0);
  free(s->latencies);
  keel_adaptive_free(s->lim);
}

Test(adaptive, gradient_converges_between_30_and_50_with_p99_within_2x) {
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  sim s = {0};
  cr_assert_eq(keel_adaptive_new(&o, &s.lim), 0);
  run_sim(&s, 200000);
  cr_expect_geq(s.min_seen, 30, "limit fell to %u", s.min_seen);
  cr_expect_leq(s.max_seen, 50, "limit rose to %u", s.max_seen);
  uint64_t p = p99(&s);
  cr_expect_leq(p, 2 * BASE_US, "p99 %llu us", (unsigned long long)p);
  keel_adaptive_stats st;
  keel_adaptive_get_stats(s.lim, &st);
  cr_expect_eq(st.min_rtt, BASE_US);
  cr_expect_gt(st.increases, 0);
  cr_expect_gt(st.decreases, 0);
  finish(&s);
}

Test(adaptive, aimd_converges_between_30_and_50_with_p99_within_2x) {
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  o.algorithm = KEEL_ADAPTIVE_AIMD;
  sim s = {0};
  cr_assert_eq(keel_adaptive_new(&o, &s.lim), 0);
  run_sim(&s, 200000);
  cr_expect_geq(s.min_seen, 30, "limit fell to %u", s.min_seen);
  cr_expect_leq(s.max_seen, 50, "limit rose to %u", s.max_seen);
  cr_expect_leq(p99(&s), 2 * BASE_US);
  finish(&s);
}

Test(adaptive, fixed_limit_of_200_does_not_keep_p99_within_2x) {
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  o.initial_limit = o.min_limit = o.max_limit = 200; /* a fixed limit */
  sim s = {0};
  cr_assert_eq(keel_adaptive_new(&o, &s.lim), 0);
  run_sim(&s, 50000);
  cr_expect_eq(s.min_seen, 200);
  cr_expect_gt(p99(&s), 2 * BASE_US, "the simulated downstream must punish 200 in flight");
  finish(&s);
}

Test(adaptive, latency_step_down_then_up_follows) {
  /* From a fast downstream the limit climbs to max; when latency doubles
   * at every level it comes down. */
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  o.max_limit = 100;
  keel_adaptive *a;
  cr_assert_eq(keel_adaptive_new(&o, &a), 0);
  for (int w = 0; w < 200; w++) {
    uint32_t l = keel_adaptive_limit(a);
    for (uint32_t i = 0; i < l; i++) cr_assert(keel_adaptive_try_acquire(a));
    for (uint32_t i = 0; i < l; i++) keel_adaptive_release(a, 100, KEEL_ADAPTIVE_SUCCESS);
  }
  cr_expect_eq(keel_adaptive_limit(a), 100);
  for (int w = 0; w < 50; w++) {
    uint32_t l = keel_adaptive_limit(a);
    for (uint32_t i = 0; i < l; i++) cr_assert(keel_adaptive_try_acquire(a));
    for (uint32_t i = 0; i < l; i++) keel_adaptive_release(a, 100u * l, KEEL_ADAPTIVE_SUCCESS);
  }
  cr_expect_lt(keel_adaptive_limit(a), 20, "limit %u", keel_adaptive_limit(a));
  cr_expect_geq(keel_adaptive_limit(a), 1);
  keel_adaptive_free(a);
}

Test(adaptive, limit_is_a_hard_bound_and_rejections_count) {
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  o.initial_limit = 3;
  keel_adaptive *a;
  cr_assert_eq(keel_adaptive_new(&o, &a), 0);
  cr_assert(keel_adaptive_try_acquire(a));
  cr_assert(keel_adaptive_try_acquire(a));
  cr_assert(keel_adaptive_has_room(a));
  cr_assert(keel_adaptive_try_acquire(a));
  cr_assert_not(keel_adaptive_has_room(a));
  cr_assert_not(keel_adaptive_try_acquire(a));
  keel_adaptive_stats st;
  keel_adaptive_get_stats(a, &st);
  cr_expect_eq(st.in_flight, 3);
  cr_expect_eq(st.acquired, 3);
  cr_expect_eq(st.rejected, 1);
  cr_expect_eq(st.limit, 3);
  for (int i = 0; i < 3; i++) cr_assert_eq(keel_adaptive_release(a, 5, KEEL_ADAPTIVE_IGNORE), 0);
  cr_expect_eq(keel_adaptive_release(a, 5, KEEL_ADAPTIVE_SUCCESS), UV_EINVAL, "nothing in flight");
  cr_assert(keel_adaptive_try_acquire(a));
  cr_expect_eq(keel_adaptive_release(a, 5, (keel_adaptive_outcome)7), UV_EINVAL);
  keel_adaptive_get_stats(a, &st);
  cr_expect_eq(st.in_flight, 1, "a bad outcome changes nothing");
  cr_expect_eq(st.windows, 0, "ignored samples make no window");
  keel_adaptive_free(a);
}

Test(adaptive, idle_limit_does_not_grow) {
  /* One call at a time at flat latency: the limit is not used, so it must
   * not climb to max (Netflix's "app-limited" rule). */
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  keel_adaptive *a;
  cr_assert_eq(keel_adaptive_new(&o, &a), 0);
  for (int i = 0; i < 10000; i++) {
    cr_assert(keel_adaptive_try_acquire(a));
    keel_adaptive_release(a, 100, KEEL_ADAPTIVE_SUCCESS);
  }
  cr_expect_eq(keel_adaptive_limit(a), 20);
  keel_adaptive_free(a);
}

Test(adaptive, aimd_backs_off_on_drops) {
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  o.algorithm = KEEL_ADAPTIVE_AIMD;
  o.initial_limit = 100;
  o.window_samples = 10;
  o.min_limit = 5;
  keel_adaptive *a;
  cr_assert_eq(keel_adaptive_new(&o, &a), 0);
  for (int w = 0; w < 100; w++) {
    for (int i = 0; i < 60; i++) cr_assert(keel_adaptive_try_acquire(a));
    for (int i = 0; i < 60; i++) keel_adaptive_release(a, 100, KEEL_ADAPTIVE_DROPPED);
    if (keel_adaptive_limit(a) < 60) break;
  }
  keel_adaptive_stats st;
  keel_adaptive_get_stats(a, &st);
  cr_expect_lt(st.limit, 60);
  cr_expect_eq(st.dropped % 60, 0);
  cr_expect_gt(st.decreases, 0);
  cr_expect_eq(st.increases, 0);
  keel_adaptive_free(a);
}

Test(adaptive, largest_latencies_count_as_flat_latency) {
  /* "any unit": samples near UINT64_MAX are flat latency like any other.
   * A window average of 2^64 was converted to uint64_t out of range
   * (undefined; 0 on x86): min_rtt stayed 0 and the gradient halved a
   * limit whose latency never moved. */
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  o.window_samples = 10;
  keel_adaptive *a;
  cr_assert_eq(keel_adaptive_new(&o, &a), 0);
  for (int w = 0; w < 5; w++) {
    uint32_t l = keel_adaptive_limit(a);
    for (uint32_t i = 0; i < l; i++) cr_assert(keel_adaptive_try_acquire(a));
    for (uint32_t i = 0; i < l; i++) keel_adaptive_release(a, UINT64_MAX, KEEL_ADAPTIVE_SUCCESS);
  }
  keel_adaptive_stats st;
  keel_adaptive_get_stats(a, &st);
  cr_expect_eq(st.min_rtt, UINT64_MAX);
  cr_expect_eq(st.last_rtt, UINT64_MAX);
  cr_expect_eq(st.decreases, 0);
  cr_expect_gt(st.limit, 20, "flat latency raises a used limit (got %u)", st.limit);
  keel_adaptive_free(a);
}

Test(adaptive, bounds_hold) {
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  o.min_limit = 4;
  o.max_limit = 8;
  o.initial_limit = 100;
  keel_adaptive *a;
  cr_assert_eq(keel_adaptive_new(&o, &a), 0);
  cr_expect_eq(keel_adaptive_limit(a), 8, "initial is clamped");
  for (int w = 0; w < 100; w++) {
    uint32_t l = keel_adaptive_limit(a);
    for (uint32_t i = 0; i < l; i++) keel_adaptive_try_acquire(a);
    for (uint32_t i = 0; i < l; i++)
      keel_adaptive_release(a, (uint64_t)(w + 1) * 1000, KEEL_ADAPTIVE_SUCCESS);
    cr_assert_geq(keel_adaptive_limit(a), 4);
    cr_assert_leq(keel_adaptive_limit(a), 8);
  }
  cr_expect_eq(keel_adaptive_limit(a), 4);
  keel_adaptive_free(a);
}

Test(adaptive, validation) {
  keel_adaptive_opts o;
  const char *why = "x";
  keel_adaptive *a = (keel_adaptive *)&o;
  cr_expect_eq(keel_adaptive_validate_opts(NULL, &why), UV_EINVAL);
  cr_expect_not_null(why);
  keel_adaptive_opts_init(&o);
  cr_expect_eq(keel_adaptive_validate_opts(&o, &why), 0);
  cr_expect_null(why);
  o.min_limit = 0;
  cr_expect_eq(keel_adaptive_new(&o, &a), UV_EINVAL);
  cr_expect_eq(a, (keel_adaptive *)&o, "out untouched");
  keel_adaptive_opts_init(&o);
  o.max_limit = 0;
  cr_expect_eq(keel_adaptive_validate_opts(&o, &why), UV_EINVAL);
  keel_adaptive_opts_init(&o);
  o.rtt_tolerance = -1;
  cr_expect_eq(keel_adaptive_validate_opts(&o, &why), UV_EINVAL);
  keel_adaptive_opts_init(&o);
  o.aimd_backoff = 1.0;
  cr_expect_eq(keel_adaptive_validate_opts(&o, &why), UV_EINVAL);
  keel_adaptive_opts_init(&o);
  o.algorithm = (keel_adaptive_algorithm)9;
  cr_expect_eq(keel_adaptive_validate_opts(&o, &why), UV_EINVAL);
  cr_expect_eq(keel_adaptive_new(&o, NULL), UV_EINVAL);
  cr_expect_not(keel_adaptive_try_acquire(NULL));
  cr_expect_eq(keel_adaptive_release(NULL, 1, KEEL_ADAPTIVE_SUCCESS), UV_EINVAL);
  cr_expect_eq(keel_adaptive_limit(NULL), 0);
  keel_adaptive_get_stats(NULL, NULL);
  keel_adaptive_free(NULL);
}

static void alloc_scenario(void *arg) {
  (void)arg;
  keel_adaptive_opts o;
  keel_adaptive_opts_init(&o);
  keel_adaptive *a = NULL;
  int rc = keel_adaptive_new(&o, &a);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    cr_assert_null(a);
    return;
  }
  cr_assert(keel_adaptive_try_acquire(a));
  cr_assert_eq(keel_adaptive_release(a, 3, KEEL_ADAPTIVE_SUCCESS), 0);
  keel_adaptive_free(a);
}

Test(adaptive, allocation_failure) {
  kt_failmalloc_run(alloc_scenario, NULL);
  cr_expect_eq(kt_failmalloc_count(), 1);
}
