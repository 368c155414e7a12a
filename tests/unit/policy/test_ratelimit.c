/* Rate limiter: GCRA and token bucket state machines on an injected clock,
 * Retry-After values, option checks, stats and close. */
#include <criterion/criterion.h>
#include <string.h>

#include "keel/ratelimit.h"
#include "support/harness.h"

static uint64_t fake_now(void *data) {
  return *(uint64_t *)data;
}

typedef struct fx {
  uv_loop_t loop;
  uint64_t now;
  keel_ratelimit_opts o;
  keel_ratelimit *rl;
} fx;

static void setup(fx *f, keel_ratelimit_kind kind, uint64_t rate, uint64_t period, uint64_t burst) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  f->now = 5000;
  keel_ratelimit_opts_init(&f->o);
  f->o.kind = kind;
  f->o.rate = rate;
  f->o.period_ms = period;
  f->o.burst = burst;
  f->o.clock.now = fake_now;
  f->o.clock.data = &f->now;
  cr_assert_eq(keel_ratelimit_new(&f->loop, &f->o, &f->rl), 0);
}

static int closed;
static void on_closed(void *obj, void *data) {
  (void)obj;
  (void)data;
  closed++;
}

static void teardown(fx *f) {
  closed = 0;
  keel_ratelimit_close(f->rl, on_closed, NULL);
  cr_assert_eq(closed, 0, "close callback ran inside close");
  kt_loop_finish(&f->loop);
  cr_assert_eq(closed, 1);
}

Test(ratelimit, defaults) {
  keel_ratelimit_opts o;
  memset(&o, 0xff, sizeof o);
  keel_ratelimit_opts_init(&o);
  cr_assert_eq(o.kind, KEEL_RATELIMIT_GCRA);
  cr_assert_eq(o.rate, 100);
  cr_assert_eq(o.period_ms, 1000);
  cr_assert_eq(o.burst, 0);
  cr_assert_null(o.clock.now);
  for (int i = 0; i < 8; i++) cr_assert_eq(o.reserved_[i], 0);
}

Test(ratelimit, bad_options) {
  const char *why = NULL;
  keel_ratelimit_opts o;
  keel_ratelimit_opts_init(&o);
  cr_assert_eq(keel_ratelimit_validate_opts(NULL, &why), UV_EINVAL);
  o.rate = 0;
  cr_assert_eq(keel_ratelimit_validate_opts(&o, &why), UV_EINVAL);
  cr_assert_str_eq(why, "rate must be > 0");
  keel_ratelimit_opts_init(&o);
  o.period_ms = 0;
  cr_assert_eq(keel_ratelimit_validate_opts(&o, &why), UV_EINVAL);
  keel_ratelimit_opts_init(&o);
  o.kind = (keel_ratelimit_kind)7;
  cr_assert_eq(keel_ratelimit_validate_opts(&o, &why), UV_EINVAL);
  keel_ratelimit_opts_init(&o);
  o.rate = 2000000;
  o.period_ms = 1; /* 2 per ns */
  cr_assert_eq(keel_ratelimit_validate_opts(&o, &why), UV_EINVAL);
  keel_ratelimit_opts_init(&o);
  cr_assert_eq(keel_ratelimit_validate_opts(&o, &why), 0);
  cr_assert_null(why);
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_ratelimit *rl = (keel_ratelimit *)0x1;
  o.rate = 0;
  cr_assert_eq(keel_ratelimit_new(&loop, &o, &rl), UV_EINVAL);
  cr_assert_eq(rl, (keel_ratelimit *)0x1, "out touched on failure");
  cr_assert_eq(keel_ratelimit_new(NULL, &o, &rl), UV_EINVAL);
  cr_assert_eq(keel_ratelimit_take(NULL, 1, NULL), UV_EINVAL);
  keel_ratelimit_close(NULL, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(ratelimit, gcra_burst_then_smooth) {
  fx f;
  setup(&f, KEEL_RATELIMIT_GCRA, 10, 1000, 5); /* one per 100 ms, bursts of 5 */
  uint64_t after = 0;
  for (int i = 0; i < 5; i++) cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), 0, "call %d", i);
  cr_assert_eq(after, 0, "untouched when allowed");
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 100);
  f.now += 99;
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 1);
  f.now += 1;
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), 0);
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 100);
  /* a long pause refills to burst, not beyond */
  f.now += 60000;
  for (int i = 0; i < 5; i++) cr_assert_eq(keel_ratelimit_take(f.rl, 1, NULL), 0);
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, NULL), KEEL_ERATELIMIT);
  /* n at once: 3 need 300 ms of budget */
  f.now += 500;
  after = 0;
  cr_assert_eq(keel_ratelimit_take(f.rl, 5, &after), 0);
  cr_assert_eq(keel_ratelimit_take(f.rl, 3, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 300);
  cr_assert_eq(keel_ratelimit_take(f.rl, 6, &after), UV_EINVAL, "more than burst never goes");
  cr_assert_eq(keel_ratelimit_take(f.rl, 0, &after), UV_EINVAL);
  keel_ratelimit_stats st;
  keel_ratelimit_get_stats(f.rl, &st);
  cr_assert_eq(st.allowed, 5 + 1 + 5 + 5);
  cr_assert_eq(st.rejected, 5);
  cr_assert_eq(st.available, 0);
  f.now += 200;
  keel_ratelimit_get_stats(f.rl, &st);
  cr_assert_eq(st.available, 2);
  teardown(&f);
}

Test(ratelimit, gcra_long_run_rate_is_exact) {
  fx f;
  setup(&f, KEEL_RATELIMIT_GCRA, 7, 1000, 3);
  uint64_t allowed = 0;
  for (int ms = 0; ms < 60000; ms++) {
    while (keel_ratelimit_take(f.rl, 1, NULL) == 0) allowed++;
    f.now++;
  }
  /* 60 s at 7/s plus the initial burst */
  cr_assert(allowed >= 60 * 7 && allowed <= 60 * 7 + 3, "allowed %llu",
            (unsigned long long)allowed);
  teardown(&f);
}

Test(ratelimit, gcra_sub_millisecond_interval) {
  fx f;
  /* one per 333 us; the clock ticks in ms, so a burst of at least 3 is
   * needed to reach the rate */
  setup(&f, KEEL_RATELIMIT_GCRA, 3000, 1000, 4);
  int allowed = 0;
  for (int ms = 0; ms < 1000; ms++) {
    while (keel_ratelimit_take(f.rl, 1, NULL) == 0) allowed++;
    f.now++;
  }
  cr_assert(allowed >= 2999 && allowed <= 3004, "allowed %d", allowed);
  teardown(&f);
}

Test(ratelimit, token_bucket_steps) {
  fx f;
  setup(&f, KEEL_RATELIMIT_TOKEN_BUCKET, 2, 1000, 4); /* +2 every second, up to 4 */
  uint64_t after = 0;
  for (int i = 0; i < 4; i++) cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), 0);
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 1000);
  f.now += 999; /* no refill before the step */
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 1);
  f.now += 1;
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), 0);
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), 0);
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 1000);
  cr_assert_eq(keel_ratelimit_take(f.rl, 3, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 2000, "3 tokens need two refills");
  f.now += 10500; /* many periods: capped at 4 */
  keel_ratelimit_stats st;
  keel_ratelimit_get_stats(f.rl, &st);
  cr_assert_eq(st.available, 4);
  cr_assert_eq(keel_ratelimit_take(f.rl, 4, &after), 0);
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 500, "the step stays on the period grid");
  teardown(&f);
}

Test(ratelimit, clock_going_back_is_held) {
  fx f;
  setup(&f, KEEL_RATELIMIT_GCRA, 1, 1000, 1);
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, NULL), 0);
  f.now -= 4000;
  uint64_t after = 0;
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, &after), KEEL_ERATELIMIT);
  cr_assert_eq(after, 1000);
  cr_assert_eq(keel_ratelimit_take_at(f.rl, f.now + 5000, 1, &after), 0);
  teardown(&f);
}

Test(ratelimit, reset_and_closing) {
  fx f;
  setup(&f, KEEL_RATELIMIT_GCRA, 1, 1000, 2);
  cr_assert_eq(keel_ratelimit_take(f.rl, 2, NULL), 0);
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, NULL), KEEL_ERATELIMIT);
  cr_assert_eq(keel_ratelimit_reset(f.rl), 0);
  cr_assert_eq(keel_ratelimit_take(f.rl, 2, NULL), 0);
  closed = 0;
  keel_ratelimit_close(f.rl, on_closed, NULL);
  keel_ratelimit_close(f.rl, on_closed, NULL);
  cr_assert_eq(keel_ratelimit_take(f.rl, 1, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_ratelimit_reset(f.rl), KEEL_ECLOSING);
  kt_loop_finish(&f.loop);
  cr_assert_eq(closed, 1);
}

Test(ratelimit, uses_loop_time_by_default) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_ratelimit_opts o;
  keel_ratelimit_opts_init(&o);
  o.rate = 1;
  o.burst = 1;
  keel_ratelimit *rl;
  cr_assert_eq(keel_ratelimit_new(&loop, &o, &rl), 0);
  cr_assert_eq(keel_ratelimit_take(rl, 1, NULL), 0);
  uint64_t after = 0;
  cr_assert_eq(keel_ratelimit_take(rl, 1, &after), KEEL_ERATELIMIT);
  cr_assert(after >= 1 && after <= 1000);
  keel_ratelimit_close(rl, NULL, NULL);
  kt_loop_finish(&loop);
}

static void failmalloc_scenario(void *arg) {
  (void)arg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_ratelimit_opts o;
  keel_ratelimit_opts_init(&o);
  keel_ratelimit *rl = NULL;
  int rc = keel_ratelimit_new(&loop, &o, &rl);
  if (rc == 0) {
    cr_assert_eq(keel_ratelimit_take(rl, 1, NULL), 0);
    keel_ratelimit_close(rl, NULL, NULL);
  } else {
    cr_assert_eq(rc, UV_ENOMEM);
    cr_assert_null(rl);
  }
  kt_loop_finish(&loop);
}

Test(ratelimit, allocation_failure) {
  kt_failmalloc_run(failmalloc_scenario, NULL);
}
