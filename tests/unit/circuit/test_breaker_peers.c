/* What gobreaker's, resilience4j's, cockatiel's and opossum's own tests
 * expect of a breaker: half-open decided by the failure rate of N probes
 * (resilience4j permittedNumberOfCallsInHalfOpenState), a rejection code
 * for "every probe taken" distinct from "open", the time until a call is
 * allowed (Retry-After), a fallback, minimum_calls > window_size rejected,
 * failures in the window visible below minimum_calls, total and mean call
 * duration, and the old name keel_breaker_call_done() still working.
 * Injected clock. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "keel/breaker.h"
#include "support/harness.h"

typedef struct fx {
  uv_loop_t loop;
  uint64_t now;
  keel_breaker_opts opts;
  keel_breaker *b;
  int changes;
  keel_breaker_state last_to;
  /* execute */
  int done_calls, done_status;
  int op_status;
  bool old_name;
  int fallbacks, fallback_status;
  void *fallback_data;
  uint64_t op_cost_ms;
} fx;

static uint64_t now_of(void *data) {
  return ((fx *)data)->now;
}

static void on_change(keel_breaker *b, keel_breaker_state from, keel_breaker_state to, void *data) {
  (void)b;
  (void)from;
  fx *f = data;
  f->changes++;
  f->last_to = to;
}

static void setup(fx *f) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  f->now = 1000;
  keel_breaker_opts_init(&f->opts);
  f->opts.clock.now = now_of;
  f->opts.clock.data = f;
  f->opts.on_state_change = on_change;
  f->opts.data = f;
}

static void create(fx *f) {
  char why[256];
  cr_assert_eq(keel_breaker_new_ex(&f->loop, &f->opts, &f->b, why, sizeof why), 0, "%s", why);
}

static void teardown(fx *f) {
  keel_breaker_close(f->b, NULL, NULL);
  kt_loop_finish(&f->loop);
}

static int call(fx *f, int status, uint64_t duration_ms) {
  keel_breaker_permit p;
  int rc = keel_breaker_acquire(f->b, &p);
  if (rc == 0) cr_assert_eq(keel_breaker_release(&p, status, duration_ms), 0);
  return rc;
}

/* resilience4j-like: rate over a count window of 4, 4 probes in half-open. */
static void rate_breaker(fx *f) {
  setup(f);
  f->opts.failure_threshold = 0;
  f->opts.window = KEEL_BREAKER_WINDOW_COUNT;
  f->opts.window_size = 4;
  f->opts.minimum_calls = 4;
  f->opts.failure_rate_threshold = 0.5;
  f->opts.reset_timeout_ms = 1000;
  f->opts.half_open_probes = 4;
  f->opts.half_open_max_calls = 4;
  create(f);
  for (int i = 0; i < 4; i++) cr_assert_eq(call(f, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f->b), KEEL_BREAKER_OPEN);
  f->now += 1000;
  cr_assert_eq(keel_breaker_get_state(f->b), KEEL_BREAKER_HALF_OPEN);
}

Test(breaker_peers, half_open_closes_when_probe_failure_rate_is_below_threshold) {
  /* resilience4j: shouldTransitionToClosedStateWhenFailureRateBelowThreshold. */
  fx f;
  rate_breaker(&f);
  keel_breaker_permit p[5];
  for (int i = 0; i < 4; i++) cr_assert_eq(keel_breaker_acquire(f.b, &p[i]), 0);
  uint64_t ra = 7;
  cr_expect_eq(keel_breaker_acquire_ex(f.b, &p[4], &ra), KEEL_EPROBES, "all 4 probes taken");
  cr_expect_eq(keel_breaker_acquire(f.b, &p[4]), KEEL_EOPEN, "0.1 code by default");
  cr_assert_eq(keel_breaker_release(&p[0], UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_release(&p[1], 0, 1), 0);
  cr_assert_eq(keel_breaker_release(&p[2], 0, 1), 0);
  cr_expect_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN, "waits for every probe");
  cr_assert_eq(keel_breaker_release(&p[3], 0, 1), 0);
  cr_expect_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED, "1/4 < 50 %%");
  teardown(&f);
}

Test(breaker_peers, half_open_reopens_when_probe_failure_rate_reaches_threshold) {
  /* resilience4j: shouldTransitionBackToOpenStateWhenFailureRateIsAboveThreshold;
   * with the 0.1 rule the first failed probe would have reopened at once. */
  fx f;
  rate_breaker(&f);
  keel_breaker_permit p[4];
  for (int i = 0; i < 4; i++) cr_assert_eq(keel_breaker_acquire(f.b, &p[i]), 0);
  cr_assert_eq(keel_breaker_release(&p[0], UV_EIO, 1), 0);
  cr_expect_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN, "one failure is not enough");
  cr_assert_eq(keel_breaker_release(&p[1], UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_release(&p[2], 0, 1), 0);
  cr_assert_eq(keel_breaker_release(&p[3], 0, 1), 0);
  cr_expect_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN, "2/4 >= 50 %%");
  teardown(&f);
}

Test(breaker_peers, ignored_probe_gives_its_turn_back) {
  fx f;
  rate_breaker(&f);
  keel_breaker_permit p[5];
  for (int i = 0; i < 4; i++) cr_assert_eq(keel_breaker_acquire(f.b, &p[i]), 0);
  cr_assert_eq(keel_breaker_release(&p[0], UV_ECANCELED, 1), 0); /* ignored */
  cr_assert_eq(keel_breaker_acquire(f.b, &p[4]), 0, "a fifth probe replaces it");
  for (int i = 1; i < 5; i++) cr_assert_eq(keel_breaker_release(&p[i], 0, 1), 0);
  cr_expect_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  teardown(&f);
}

Test(breaker_peers, distinct_probe_code_and_half_open_probes_validation) {
  fx f;
  setup(&f);
  f.opts.failure_threshold = 1;
  f.opts.reset_timeout_ms = 100;
  f.opts.distinct_probe_code = true;
  create(&f);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_expect_eq(call(&f, 0, 1), KEEL_EOPEN, "open");
  f.now += 100;
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(f.b, &p), 0);
  keel_breaker_permit q;
  cr_expect_eq(keel_breaker_acquire(f.b, &q), KEEL_EPROBES, "half-open, probe taken");
  keel_breaker_stats st;
  keel_breaker_get_stats(f.b, &st);
  cr_expect_eq(st.calls_rejected, 2);
  teardown(&f);

  keel_breaker_opts o;
  keel_breaker_opts_init(&o);
  o.half_open_probes = 5;
  o.failure_rate_threshold = 0;
  const char *why = NULL;
  cr_expect_eq(keel_breaker_validate_opts(&o, &why), UV_EINVAL);
  cr_expect(why != NULL && strstr(why, "half_open_probes") != NULL);
}

Test(breaker_peers, retry_after_in_every_state) {
  fx f;
  setup(&f);
  f.opts.failure_threshold = 1;
  f.opts.reset_timeout_ms = 30000;
  f.opts.half_open_max_wait_ms = 5000;
  create(&f);
  cr_expect_eq(keel_breaker_retry_after_ms(f.b), 0, "closed");
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  f.now += 10000;
  cr_expect_eq(keel_breaker_retry_after_ms(f.b), 20000, "open: the rest of the period");
  keel_breaker_permit p;
  uint64_t ra = 0;
  cr_expect_eq(keel_breaker_acquire_ex(f.b, &p, &ra), KEEL_EOPEN);
  cr_expect_eq(ra, 20000);
  f.now += 20000;
  cr_expect_eq(keel_breaker_retry_after_ms(f.b), 0, "half-open with a free probe");
  cr_assert_eq(keel_breaker_acquire_ex(f.b, &p, &ra), 0);
  cr_expect_eq(ra, 0);
  f.now += 1000;
  keel_breaker_permit q;
  cr_expect_eq(keel_breaker_acquire_ex(f.b, &q, &ra), KEEL_EPROBES);
  cr_expect_eq(ra, 4000, "until the stuck probe is given up");
  cr_assert_eq(keel_breaker_force_open(f.b), 0);
  cr_expect_eq(keel_breaker_retry_after_ms(f.b), UINT64_MAX);
  cr_expect_eq(keel_breaker_retry_after_ms(NULL), 0);
  teardown(&f);
}

Test(breaker_peers, minimum_calls_above_window_size_is_rejected_with_a_reason) {
  /* resilience4j clamps; keel says no rather than accept it silently. */
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_breaker_opts o;
  keel_breaker_opts_init(&o);
  o.window = KEEL_BREAKER_WINDOW_COUNT;
  o.window_size = 5;
  o.minimum_calls = 10;
  keel_breaker *b = (keel_breaker *)&o;
  char why[256];
  cr_expect_eq(keel_breaker_new_ex(&loop, &o, &b, why, sizeof why), UV_EINVAL);
  cr_expect(strstr(why, "minimum_calls") != NULL, "%s", why);
  cr_expect_eq(b, (keel_breaker *)&o, "untouched");
  o.minimum_calls = 5;
  cr_assert_eq(keel_breaker_new(&loop, &o, &b), 0, "equal is fine");
  keel_breaker_close(b, NULL, NULL);
  o.window = KEEL_BREAKER_WINDOW_TIME;
  o.minimum_calls = 1000; /* a time window has no size bound */
  cr_assert_eq(keel_breaker_validate_opts(&o, NULL), 0);
  kt_loop_finish(&loop);
}

Test(breaker_peers, failures_in_the_window_are_visible_below_minimum_calls) {
  /* gobreaker's Counts: TotalFailures from the first call. */
  fx f;
  setup(&f);
  f.opts.failure_threshold = 0;
  f.opts.window = KEEL_BREAKER_WINDOW_COUNT;
  f.opts.window_size = 10;
  f.opts.minimum_calls = 10;
  create(&f);
  for (int i = 0; i < 3; i++) cr_assert_eq(call(&f, UV_EIO, 1), 0);
  for (int i = 0; i < 2; i++) cr_assert_eq(call(&f, 0, 1), 0);
  keel_breaker_stats st;
  keel_breaker_get_stats(f.b, &st);
  cr_expect_eq(st.window_calls, 5);
  cr_expect_eq(st.window_failures, 3);
  cr_expect_eq(st.window_slow, 0);
  cr_expect(st.failure_rate < 0, "the rate itself waits for minimum_calls");
  cr_expect_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  teardown(&f);
}

Test(breaker_peers, total_and_mean_call_duration) {
  /* opossum stats: latencyMean; resilience4j: total duration. */
  fx f;
  setup(&f);
  create(&f);
  keel_breaker_stats st;
  keel_breaker_get_stats(f.b, &st);
  cr_expect_eq(st.duration_mean_ms, 0.0);
  cr_assert_eq(call(&f, 0, 10), 0);
  cr_assert_eq(call(&f, UV_EIO, 20), 0);
  cr_assert_eq(call(&f, UV_ECANCELED, 30), 0); /* ignored: still a call that took time */
  keel_breaker_get_stats(f.b, &st);
  cr_expect_eq(st.duration_total_ms, 60);
  cr_expect_eq(st.duration_mean_ms, 20.0);
  for (int i = 0; i < 4; i++) cr_expect_eq(st.reserved_[i], 0);
  teardown(&f);
}

/* ---- execute: fallback, codes, old name ----------------------------------- */

static void op(keel_breaker_call *call, void *data) {
  fx *f = data;
  f->now += f->op_cost_ms;
  if (f->old_name)
    cr_assert_eq(keel_breaker_call_done(call, f->op_status), 0);
  else
    cr_assert_eq(keel_breaker_done(call, f->op_status), 0);
}

static void done(keel_breaker *b, int status, void *data) {
  (void)b;
  fx *f = data;
  f->done_calls++;
  f->done_status = status;
}

static int fallback(keel_breaker *b, int status, void *data) {
  (void)b;
  fx *f = data;
  f->fallbacks++;
  f->fallback_status = status;
  f->fallback_data = data;
  return 0; /* served from the fallback */
}

static void exec(fx *f) {
  int before = f->fallbacks;
  cr_assert_eq(keel_breaker_execute(f->b, op, 0, done, f), 0);
  cr_expect_eq(f->fallbacks, before, "no fallback inside execute()");
  uv_run(&f->loop, UV_RUN_DEFAULT);
}

Test(breaker_peers, fallback_serves_rejections_and_optionally_failures) {
  fx f;
  setup(&f);
  f.opts.failure_threshold = 1;
  f.opts.fallback = fallback;
  create(&f);
  f.op_status = UV_EIO;
  exec(&f);
  cr_expect_eq(f.done_status, UV_EIO, "a failure passes without fallback_on_failure");
  cr_expect_eq(f.fallbacks, 0);
  exec(&f); /* open now */
  cr_expect_eq(f.fallbacks, 1);
  cr_expect_eq(f.fallback_status, KEEL_EOPEN);
  cr_expect_eq(f.fallback_data, &f, "the execute() call's data");
  cr_expect_eq(f.done_status, 0, "done gets the fallback's answer");
  teardown(&f);

  setup(&f);
  f.opts.failure_threshold = 100;
  f.opts.fallback = fallback;
  f.opts.fallback_on_failure = true;
  create(&f);
  f.op_status = UV_EIO;
  exec(&f);
  cr_expect_eq(f.fallbacks, 1);
  cr_expect_eq(f.fallback_status, UV_EIO);
  cr_expect_eq(f.done_status, 0);
  f.op_status = 0;
  exec(&f);
  cr_expect_eq(f.fallbacks, 1, "not for a success");
  keel_breaker_stats st;
  keel_breaker_get_stats(f.b, &st);
  cr_expect_eq(st.calls_failed, 1, "the failure still counts for the breaker");
  teardown(&f);
}

Test(breaker_peers, execute_answers_eprobes_with_distinct_probe_code) {
  fx f;
  setup(&f);
  f.opts.failure_threshold = 1;
  f.opts.reset_timeout_ms = 100;
  f.opts.distinct_probe_code = true;
  create(&f);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  f.now += 100;
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(f.b, &p), 0); /* the only probe */
  exec(&f);
  cr_expect_eq(f.done_status, KEEL_EPROBES);
  cr_assert_eq(keel_breaker_release(&p, 0, 1), 0);
  cr_expect_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  teardown(&f);
}

Test(breaker_peers, old_name_keel_breaker_call_done_and_measured_duration) {
  fx f;
  setup(&f);
  create(&f);
  f.old_name = true;
  f.op_cost_ms = 25;
  exec(&f);
  cr_expect_eq(f.done_status, 0);
  keel_breaker_stats st;
  keel_breaker_get_stats(f.b, &st);
  cr_expect_eq(st.calls_succeeded, 1);
  cr_expect_eq(st.duration_total_ms, 25, "execute() measured the op on the clock");
  teardown(&f);
}
