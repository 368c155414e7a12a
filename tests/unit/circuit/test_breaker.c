/* Circuit breaker: every transition of every policy, windows, probes,
 * permits, execute() with timeouts, operator controls, events, stats and
 * close. Time is an injected clock advanced by the tests. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "circuit/window.h"
#include "keel/breaker.h"
#include "support/harness.h"

typedef struct fixture {
  uv_loop_t loop;
  uint64_t now;
  keel_breaker_opts opts;
  keel_breaker *b;
  int changes;
  keel_breaker_state from[64], to[64];
  int rejected;
} fixture;

static uint64_t fake_now(void *data) {
  return ((fixture *)data)->now;
}

static uint64_t fake_now_u64(void *data) {
  return *(uint64_t *)data;
}

static void on_change(keel_breaker *b, keel_breaker_state from, keel_breaker_state to, void *data) {
  (void)b;
  fixture *f = data;
  if (f->changes < 64) {
    f->from[f->changes] = from;
    f->to[f->changes] = to;
  }
  f->changes++;
}

static void on_rejected(keel_breaker *b, keel_breaker_state state, void *data) {
  (void)b;
  (void)state;
  ((fixture *)data)->rejected++;
}

static void setup(fixture *f) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  f->now = 1000;
  keel_breaker_opts_init(&f->opts);
  f->opts.clock.now = fake_now;
  f->opts.clock.data = f;
  f->opts.on_state_change = on_change;
  f->opts.on_rejected = on_rejected;
  f->opts.data = f;
}

static void create(fixture *f) {
  cr_assert_eq(keel_breaker_new(&f->loop, &f->opts, &f->b), 0);
}

static void teardown(fixture *f) {
  keel_breaker_close(f->b, NULL, NULL);
  kt_loop_finish(&f->loop);
}

/* One call through acquire/release; returns the acquire result. */
static int call(fixture *f, int status, uint64_t duration_ms) {
  keel_breaker_permit p;
  int rc = keel_breaker_acquire(f->b, &p);
  if (rc == 0) cr_assert_eq(keel_breaker_release(&p, status, duration_ms), 0);
  return rc;
}

Test(breaker, defaults_are_the_seeds) {
  keel_breaker_opts o;
  keel_breaker_opts_init(&o);
  cr_assert_eq(o.failure_threshold, 5);
  cr_assert_eq(o.reset_timeout_ms, 30000);
  cr_assert_eq(o.half_open_max_calls, 1);
  cr_assert_eq(keel_breaker_validate_opts(&o, NULL), 0);
}

Test(breaker, consecutive_failures_open_then_half_open_then_close) {
  fixture f;
  setup(&f);
  create(&f);
  for (int i = 0; i < 4; i++) cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  cr_assert_eq(call(&f, 0, 1), 0); /* a success resets the streak */
  for (int i = 0; i < 4; i++) cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  cr_assert_eq(f.changes, 1);
  cr_assert_eq(f.from[0], KEEL_BREAKER_CLOSED);
  cr_assert_eq(f.to[0], KEEL_BREAKER_OPEN);

  cr_assert_eq(call(&f, 0, 1), KEEL_EOPEN);
  cr_assert_eq(f.rejected, 1);
  f.now += 29999;
  cr_assert_eq(call(&f, 0, 1), KEEL_EOPEN);
  f.now += 1;
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN);
  cr_assert_eq(call(&f, 0, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  cr_assert_eq(f.changes, 3);
  cr_assert_eq(f.to[1], KEEL_BREAKER_HALF_OPEN);
  cr_assert_eq(f.to[2], KEEL_BREAKER_CLOSED);

  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_permitted, 11);
  cr_assert_eq(s.calls_rejected, 2);
  cr_assert_eq(s.calls_failed, 9);
  cr_assert_eq(s.calls_succeeded, 2);
  cr_assert_eq(s.state_changes, 3);
  cr_assert_eq(s.state, KEEL_BREAKER_CLOSED);
  cr_assert_eq(s.state_entered_ms, f.now);
  cr_assert_eq(s.failure_rate, -1.0);
  teardown(&f);
}

Test(breaker, failed_probe_reopens_with_growing_period_and_cap) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 1;
  f.opts.reset_timeout_ms = 100;
  f.opts.reset_backoff_factor = 2.0;
  f.opts.reset_timeout_max_ms = 350;
  create(&f);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  uint64_t expected[] = {200, 350, 350};
  uint64_t period = 100;
  for (int round = 0; round < 3; round++) {
    f.now += period - 1;
    cr_assert_eq(call(&f, 0, 1), KEEL_EOPEN, "round %d", round);
    f.now += 1;
    cr_assert_eq(call(&f, UV_EIO, 1), 0); /* the probe fails */
    cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
    keel_breaker_stats s;
    keel_breaker_get_stats(f.b, &s);
    cr_assert_eq(s.open_duration_ms, expected[round], "round %d: %llu", round,
                 (unsigned long long)s.open_duration_ms);
    period = expected[round];
  }
  f.now += period;
  cr_assert_eq(call(&f, 0, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.open_duration_ms, 100, "back to the base period on close");
  teardown(&f);
}

Test(breaker, half_open_admits_at_most_n_probes_and_needs_m_successes) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 1;
  f.opts.reset_timeout_ms = 10;
  f.opts.half_open_max_calls = 3;
  f.opts.half_open_successes = 4;
  create(&f);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  f.now += 10;
  keel_breaker_permit permits[100];
  int granted = 0;
  for (int i = 0; i < 100; i++)
    if (keel_breaker_acquire(f.b, &permits[granted]) == 0) granted++;
  cr_assert_eq(granted, 3, "a stampede of 100 acquires lets exactly 3 probes through");
  cr_assert_eq(f.rejected, 97);
  for (int i = 0; i < 3; i++) {
    cr_assert(permits[i].probe);
    cr_assert_eq(keel_breaker_release(&permits[i], 0, 1), 0);
  }
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN, "3 of 4 successes");
  cr_assert_eq(call(&f, 0, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  teardown(&f);
}

Test(breaker, lost_probe_cannot_wedge_half_open) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 1;
  f.opts.reset_timeout_ms = 100;
  f.opts.half_open_max_wait_ms = 50;
  create(&f);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  f.now += 100;
  keel_breaker_permit lost;
  cr_assert_eq(keel_breaker_acquire(f.b, &lost), 0); /* never released */
  cr_assert_eq(call(&f, 0, 1), KEEL_EOPEN);
  f.now += 50;
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN, "max wait reopens");
  f.now += 100;
  cr_assert_eq(call(&f, 0, 1), 0, "a new probe after the next open period");
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  cr_assert_eq(keel_breaker_release(&lost, 0, 1), KEEL_ESTALE);
  teardown(&f);
}

Test(breaker, stale_permit_is_ignored) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 2;
  create(&f);
  keel_breaker_permit old;
  cr_assert_eq(keel_breaker_acquire(f.b, &old), 0);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  f.now += 30000;
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN);
  /* A success from before the trip must not close the breaker. */
  cr_assert_eq(keel_breaker_release(&old, 0, 1), KEEL_ESTALE);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN);
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(f.b, &p), 0);
  cr_assert_eq(keel_breaker_release(&p, 0, 1), 0);
  cr_assert_eq(keel_breaker_release(&p, 0, 1), KEEL_ESTALE, "a permit is used once");
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_stale, 2);
  teardown(&f);
}

Test(breaker, failure_rate_over_count_window_with_minimum_calls) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 0;
  f.opts.window = KEEL_BREAKER_WINDOW_COUNT;
  f.opts.window_size = 10;
  f.opts.minimum_calls = 6;
  f.opts.failure_rate_threshold = 0.5;
  create(&f);
  /* 5 failures: 100 % but below the minimum number of calls. */
  for (int i = 0; i < 5; i++) call(&f, UV_EIO, 1);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.failure_rate, -1.0);
  keel_breaker_reset(f.b);
  /* Alternate success/failure: rate hovers at 50 % from 6 calls on. */
  for (int i = 0; i < 5; i++) call(&f, i % 2 ? UV_EIO : 0, 1);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.window_calls, 5);
  call(&f, UV_EIO, 1); /* 3 of 6 */
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  teardown(&f);
}

Test(breaker, count_window_slides) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 0;
  f.opts.window = KEEL_BREAKER_WINDOW_COUNT;
  f.opts.window_size = 4;
  f.opts.minimum_calls = 4;
  f.opts.failure_rate_threshold = 0.75;
  create(&f);
  call(&f, UV_EIO, 1);
  call(&f, UV_EIO, 1);
  for (int i = 0; i < 10; i++) call(&f, 0, 1); /* the failures slide out */
  call(&f, UV_EIO, 1);
  call(&f, UV_EIO, 1);
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.window_calls, 4);
  cr_assert_float_eq(s.failure_rate, 0.5, 1e-9);
  cr_assert_eq(s.state, KEEL_BREAKER_CLOSED);
  call(&f, UV_EIO, 1);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  teardown(&f);
}

Test(breaker, time_window_buckets_expire) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 0;
  f.opts.window = KEEL_BREAKER_WINDOW_TIME;
  f.opts.window_ms = 1000;
  f.opts.window_buckets = 10;
  f.opts.minimum_calls = 4;
  f.opts.failure_rate_threshold = 0.5;
  create(&f);
  call(&f, UV_EIO, 1);
  call(&f, UV_EIO, 1);
  call(&f, UV_EIO, 1);
  f.now += 1000; /* all three fall out of the window */
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.window_calls, 0);
  call(&f, 0, 1);
  call(&f, 0, 1);
  call(&f, 0, 1);
  call(&f, UV_EIO, 1);
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.window_calls, 4);
  cr_assert_float_eq(s.failure_rate, 0.25, 1e-9);
  f.now += 500;
  call(&f, UV_EIO, 1);
  call(&f, UV_EIO, 1); /* 3 failures of 6 */
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  teardown(&f);
}

Test(breaker, time_window_after_long_idle) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 0;
  f.opts.window = KEEL_BREAKER_WINDOW_TIME;
  f.opts.window_ms = 100;
  f.opts.window_buckets = 4;
  f.opts.minimum_calls = 2;
  create(&f);
  call(&f, 0, 1);
  f.now += 1000000000ull; /* expiring is bounded by the bucket count */
  call(&f, UV_EIO, 1);
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.window_calls, 1);
  teardown(&f);
}

Test(breaker, slow_call_rate_trips) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 0;
  f.opts.failure_rate_threshold = 0;
  f.opts.window = KEEL_BREAKER_WINDOW_COUNT;
  f.opts.window_size = 10;
  f.opts.minimum_calls = 4;
  f.opts.slow_call_ms = 200;
  f.opts.slow_call_rate_threshold = 0.5;
  create(&f);
  call(&f, 0, 10);
  call(&f, 0, 250);
  call(&f, 0, 10);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  call(&f, 0, 200);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN, "2 slow of 4 = 50 %%");
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_slow, 2);
  cr_assert_eq(s.calls_succeeded, 4);
  /* A slow probe reopens. */
  f.now += 30000;
  call(&f, 0, 500);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  teardown(&f);
}

static keel_breaker_outcome not_found_is_fine(int status, void *data) {
  (void)data;
  if (status == KEEL_ENOTFOUND) return KEEL_BREAKER_SUCCESS;
  if (status == UV_EAGAIN) return KEEL_BREAKER_IGNORE;
  return status < 0 ? KEEL_BREAKER_FAILURE : KEEL_BREAKER_SUCCESS;
}

Test(breaker, predicate_decides_what_counts) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 2;
  f.opts.classify = not_found_is_fine;
  create(&f);
  for (int i = 0; i < 10; i++) call(&f, KEEL_ENOTFOUND, 1);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  call(&f, UV_EIO, 1);
  call(&f, UV_EAGAIN, 1); /* ignored: the streak stays at 1 */
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.consecutive_failures, 1);
  cr_assert_eq(s.calls_ignored, 1);
  call(&f, UV_EIO, 1);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  teardown(&f);
}

Test(breaker, default_predicate_ignores_cancel) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 1;
  create(&f);
  call(&f, UV_ECANCELED, 1);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  teardown(&f);
}

Test(breaker, force_open_disable_reset) {
  fixture f;
  setup(&f);
  create(&f);
  cr_assert_eq(keel_breaker_force_open(f.b), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_FORCED_OPEN);
  f.now += 1000000;
  cr_assert_eq(call(&f, 0, 1), KEEL_EOPEN, "forced open never half-opens by itself");
  cr_assert_eq(keel_breaker_disable(f.b), 0);
  for (int i = 0; i < 100; i++) cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_DISABLED, "nothing recorded");
  cr_assert_eq(keel_breaker_reset(f.b), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  cr_assert_eq(f.changes, 3);
  cr_assert_eq(f.to[0], KEEL_BREAKER_FORCED_OPEN);
  cr_assert_eq(f.to[1], KEEL_BREAKER_DISABLED);
  cr_assert_eq(f.to[2], KEEL_BREAKER_CLOSED);
  cr_assert_eq(keel_breaker_force_open(NULL), UV_EINVAL);
  cr_assert_str_eq(keel_breaker_state_name(KEEL_BREAKER_HALF_OPEN), "half_open");
  teardown(&f);
}

Test(breaker, invalid_options_are_rejected) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_breaker *b = (keel_breaker *)0x1;
  keel_breaker_opts o;
  const char *why = NULL;
  char text[256];
#define BAD(stmt)                                                                          \
  do {                                                                                     \
    keel_breaker_opts_init(&o);                                                            \
    stmt;                                                                                  \
    cr_assert_eq(keel_breaker_validate_opts(&o, &why), UV_EINVAL, #stmt);                  \
    cr_assert_not_null(why);                                                               \
    cr_assert_eq(keel_breaker_new(&loop, &o, &b), UV_EINVAL, #stmt);                       \
    cr_assert_eq(keel_breaker_new_ex(&loop, &o, &b, text, sizeof text), UV_EINVAL, #stmt); \
    cr_assert_str_eq(text, why, #stmt);                                                    \
    cr_assert_eq(b, (keel_breaker *)0x1, "out untouched");                                 \
  } while (0)
  BAD(o.failure_threshold = 0);
  BAD(o.failure_rate_threshold = 1.5);
  BAD(o.failure_rate_threshold = -0.1);
  BAD((o.window = KEEL_BREAKER_WINDOW_COUNT, o.slow_call_rate_threshold = 0));
  BAD((o.window = KEEL_BREAKER_WINDOW_COUNT, o.window_size = 0));
  BAD((o.window = KEEL_BREAKER_WINDOW_TIME, o.window_ms = 5, o.window_buckets = 10));
  BAD(o.slow_call_ms = 100);
  BAD(o.reset_timeout_ms = 0);
  BAD(o.reset_backoff_factor = 0.5);
  BAD(o.half_open_max_calls = 0);
  BAD(o.half_open_successes = 0);
  BAD(o.window = (keel_breaker_window)42);
#undef BAD
  cr_assert_eq(keel_breaker_new(&loop, NULL, &b), UV_EINVAL);
  cr_assert_eq(keel_breaker_new(NULL, &o, &b), UV_EINVAL);
  cr_assert_eq(keel_breaker_new_ex(NULL, &o, &b, text, sizeof text), UV_EINVAL);
  cr_assert_str_eq(text, "loop and out are required");
  keel_breaker_opts_init(&o);
  cr_assert_eq(keel_breaker_new_ex(&loop, &o, &b, text, sizeof text), 0);
  cr_assert_str_eq(text, "");
  keel_breaker_close(b, NULL, NULL);
  cr_assert_eq(keel_breaker_acquire(NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_breaker_release(NULL, 0, 0), UV_EINVAL);
  kt_loop_finish(&loop);
}

/* ---- execute() ------------------------------------------------------- */

typedef struct op_ctx {
  fixture *f;
  int mode; /* 0: succeed now, 1: fail now, 2: keep the call for later */
  keel_breaker_call *held[16];
  int held_count;
  int done_count;
  int statuses[64];
} op_ctx;

static void op(keel_breaker_call *c, void *data) {
  op_ctx *ctx = data;
  if (ctx->mode == 0)
    keel_breaker_call_done(c, 0);
  else if (ctx->mode == 1)
    keel_breaker_call_done(c, UV_EIO);
  else
    ctx->held[ctx->held_count++] = c;
}

static void done(keel_breaker *b, int status, void *data) {
  (void)b;
  op_ctx *ctx = data;
  ctx->statuses[ctx->done_count++] = status;
}

Test(breaker, execute_success_failure_and_rejection) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 2;
  create(&f);
  op_ctx ctx = {.f = &f, .mode = 0};
  cr_assert_eq(keel_breaker_execute(f.b, op, 0, done, &ctx), 0);
  cr_assert_eq(ctx.done_count, 0, "never called from inside execute()");
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_count, 1);
  cr_assert_eq(ctx.statuses[0], 0);
  ctx.mode = 1;
  keel_breaker_execute(f.b, op, 0, done, &ctx);
  keel_breaker_execute(f.b, op, 0, done, &ctx);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  keel_breaker_execute(f.b, op, 0, done, &ctx);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_count, 4);
  cr_assert_eq(ctx.statuses[1], UV_EIO);
  cr_assert_eq(ctx.statuses[3], KEEL_EOPEN);
  cr_assert_eq(keel_breaker_execute(f.b, NULL, 0, done, &ctx), UV_EINVAL);
  cr_assert_str_neq(keel_breaker_last_error(f.b), "");
  teardown(&f);
}

Test(breaker, execute_timeout_and_late_completion) {
  fixture f;
  setup(&f);
  f.opts.clock.now = NULL; /* real loop time for the timer */
  f.opts.failure_threshold = 1;
  create(&f);
  op_ctx ctx = {.f = &f, .mode = 2};
  cr_assert_eq(keel_breaker_execute(f.b, op, 20, done, &ctx), 0);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_count, 1);
  cr_assert_eq(ctx.statuses[0], UV_ETIMEDOUT);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN, "a timeout is a failure");
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_timed_out, 1);
  cr_assert_eq(s.calls_failed, 1);
  /* The late completion is ignored and recycles the call. */
  cr_assert_eq(keel_breaker_call_done(ctx.held[0], 0), KEEL_ESTALE);
  cr_assert_eq(ctx.done_count, 1);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  teardown(&f);
}

static int closed_count;
static void on_closed(void *object, void *data) {
  (void)object;
  (void)data;
  closed_count++;
}

Test(breaker, close_with_calls_in_flight) {
  fixture f;
  setup(&f);
  create(&f);
  op_ctx ctx = {.f = &f, .mode = 2};
  for (int i = 0; i < 3; i++) keel_breaker_execute(f.b, op, 1000, done, &ctx);
  uv_run(&f.loop, UV_RUN_NOWAIT); /* ops started, held */
  cr_assert_eq(ctx.held_count, 3);
  keel_breaker_execute(f.b, op, 0, done, &ctx); /* queued, not started */
  closed_count = 0;
  keel_breaker_close(f.b, on_closed, NULL);
  cr_assert_eq(ctx.done_count, 0, "close calls nothing back inside the call");
  cr_assert_eq(keel_breaker_execute(f.b, op, 0, done, &ctx), KEEL_ECLOSING);
  uv_run(&f.loop, UV_RUN_NOWAIT);
  cr_assert_eq(ctx.done_count, 4, "on a later iteration");
  for (int i = 0; i < 4; i++) cr_assert_eq(ctx.statuses[i], UV_ECANCELED);
  cr_assert_eq(ctx.held_count, 3, "the queued operation never started");
  cr_assert_eq(closed_count, 0, "waits for the held operations to report");
  for (int i = 0; i < 3; i++) cr_assert_eq(keel_breaker_call_done(ctx.held[i], 0), KEEL_ESTALE);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(closed_count, 1);
  cr_assert_eq(ctx.done_count, 4, "each callback exactly once");
  cr_assert_eq(uv_loop_close(&f.loop), 0);
}

Test(breaker, steady_state_allocates_nothing) {
  kt_alloc_install();
  fixture f;
  setup(&f);
  create(&f);
  op_ctx ctx = {.f = &f, .mode = 0};
  keel_breaker_execute(f.b, op, 100, done, &ctx);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  uint64_t before = kt_alloc_count();
  for (int i = 0; i < 10000; i++) call(&f, i % 3 ? 0 : UV_EIO, 1);
  for (int i = 0; i < 50; i++) {
    ctx.done_count = 0;
    keel_breaker_execute(f.b, op, 100, done, &ctx);
    uv_run(&f.loop, UV_RUN_DEFAULT);
  }
  cr_assert_eq(kt_alloc_count(), before, "no allocation per call");
  keel_breaker_close(f.b, NULL, NULL);
  kt_loop_finish(&f.loop);
  cr_assert_eq(kt_alloc_live_blocks(), 0, "everything freed");
}

Test(breaker, allocation_failure_is_clean) {
  kt_alloc_install();
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_breaker_opts o;
  keel_breaker_opts_init(&o);
  o.window = KEEL_BREAKER_WINDOW_TIME;
  for (int64_t n = 0; n < 4; n++) {
    kt_alloc_fail_after(n);
    keel_breaker *b = NULL;
    int rc = keel_breaker_new(&loop, &o, &b);
    kt_alloc_fail_after(-1);
    if (rc == 0)
      keel_breaker_close(b, NULL, NULL);
    else
      cr_assert_eq(rc, UV_ENOMEM);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(kt_alloc_live_blocks(), 0, "nothing leaked after failing at %lld", (long long)n);
  }
  kt_loop_finish(&loop);
}

/* ---- the callback contract (issue 13: #6, #14, close) ------------------- */

/* A breaker whose callbacks can close it; records everything that came. */
typedef struct contract {
  uv_loop_t loop;
  uint64_t now;
  keel_breaker *b;
  int close_in_change_to; /* close when on_state_change reports this state; -1 never */
  bool close_in_reject;
  bool close_in_done;
  int close_in_op; /* 0 never; 1 before reporting; 2 after a synchronous report */
  int op_mode;     /* 0 succeed now, 1 fail now, 2 hold, 3 first succeeds, rest held */
  int ops_started;
  bool in_keel;      /* set around keel calls that must not call back */
  bool in_call_done; /* around keel_breaker_call_done(): done must not come */
  int changes;
  int rejects;
  int done_count;
  int statuses[16];
  int closed;
  int closed_before_done; /* done calls that came after close_cb (must stay 0) */
  keel_breaker_call *held[16];
  int held_count;
} contract;

static uint64_t contract_now(void *data) {
  return ((contract *)data)->now;
}

static void contract_closed(void *object, void *data) {
  contract *c = data;
  cr_assert_eq(object, c->b);
  c->closed++;
}

static void contract_change(keel_breaker *b, keel_breaker_state from, keel_breaker_state to,
                            void *data) {
  contract *c = data;
  (void)from;
  cr_assert(!c->in_keel, "on_state_change inside a call that must not call back");
  c->changes++;
  if ((int)to == c->close_in_change_to) keel_breaker_close(b, contract_closed, c);
}

static void contract_reject(keel_breaker *b, keel_breaker_state state, void *data) {
  contract *c = data;
  (void)state;
  c->rejects++;
  if (c->close_in_reject) keel_breaker_close(b, contract_closed, c);
}

static void contract_done(keel_breaker *b, int status, void *data) {
  contract *c = data;
  cr_assert(!c->in_keel, "done inside a call that must not call back");
  cr_assert(!c->in_call_done, "done inside keel_breaker_call_done()");
  if (c->closed) c->closed_before_done++;
  if (c->done_count < 16) c->statuses[c->done_count] = status;
  c->done_count++;
  if (c->close_in_done) keel_breaker_close(b, contract_closed, c);
}

static void contract_op(keel_breaker_call *call, void *data) {
  contract *c = data;
  if (c->close_in_op == 1) keel_breaker_close(c->b, contract_closed, c);
  if (c->op_mode == 2 || (c->op_mode == 3 && c->ops_started++ > 0)) {
    c->held[c->held_count++] = call;
  } else {
    c->in_call_done = true;
    int rc = keel_breaker_call_done(call, c->op_mode == 1 ? UV_EIO : 0);
    c->in_call_done = false;
    cr_assert_eq(rc, c->close_in_op == 1 ? KEEL_ESTALE : 0);
  }
  if (c->close_in_op == 2) keel_breaker_close(c->b, contract_closed, c);
}

static void contract_setup(contract *c, keel_breaker_opts *o) {
  memset(c, 0, sizeof *c);
  cr_assert_eq(uv_loop_init(&c->loop), 0);
  c->now = 1000;
  c->close_in_change_to = -1;
  keel_breaker_opts_init(o);
  o->clock.now = contract_now;
  o->clock.data = c;
  o->on_state_change = contract_change;
  o->on_rejected = contract_reject;
  o->data = c;
}

static void contract_create(contract *c, const keel_breaker_opts *o) {
  cr_assert_eq(keel_breaker_new(&c->loop, o, &c->b), 0);
}

/* After close began every verb answers KEEL_ECLOSING and takes nothing. */
static void assert_closing(contract *c) {
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(c->b, &p), KEEL_ECLOSING);
  cr_assert_eq(keel_breaker_execute(c->b, contract_op, 0, contract_done, c), KEEL_ECLOSING);
  cr_assert_eq(keel_breaker_force_open(c->b), KEEL_ECLOSING);
  cr_assert_eq(keel_breaker_disable(c->b), KEEL_ECLOSING);
  cr_assert_eq(keel_breaker_reset(c->b), KEEL_ECLOSING);
}

static void contract_finish(contract *c) {
  uv_run(&c->loop, UV_RUN_DEFAULT);
  cr_assert_eq(c->closed, 1, "close callback exactly once");
  cr_assert_eq(c->closed_before_done, 0, "every done before the close callback");
  cr_assert_eq(uv_loop_close(&c->loop), 0);
}

/* #6: closing from inside done tripped libuv's !uv__is_closing assertion. */
Test(breaker_contract, close_inside_done_after_a_synchronous_report) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  contract_create(&c, &o);
  c.close_in_done = true;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), 0);
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), 0);
  contract_finish(&c);
  cr_assert_eq(c.done_count, 2);
  cr_assert_eq(c.statuses[0], 0);
  cr_assert_eq(c.statuses[1], 0, "reported before the close: the result stands");
}

Test(breaker_contract, close_inside_done_drops_what_has_not_reported) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  contract_create(&c, &o);
  c.close_in_done = true;
  c.op_mode = 3;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), 0);
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), 0);
  while (c.done_count == 0) uv_run(&c.loop, UV_RUN_ONCE);
  cr_assert_eq(c.held_count, 1);
  for (int i = 0; i < c.held_count; i++) keel_breaker_call_done(c.held[i], 0);
  contract_finish(&c);
  cr_assert_eq(c.done_count, 2);
  cr_assert_eq(c.statuses[0], 0);
  cr_assert_eq(c.statuses[1], UV_ECANCELED, "dropped by the close");
}

Test(breaker_contract, close_inside_done_after_a_late_report) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  contract_create(&c, &o);
  c.close_in_done = true;
  c.op_mode = 2;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 50, contract_done, &c), 0);
  uv_run(&c.loop, UV_RUN_NOWAIT);
  cr_assert_eq(c.held_count, 1);
  c.in_keel = true;
  cr_assert_eq(keel_breaker_call_done(c.held[0], UV_EIO), 0);
  c.in_keel = false;
  cr_assert_eq(c.done_count, 0, "done never inside call_done");
  uv_run(&c.loop, UV_RUN_NOWAIT);
  cr_assert_eq(c.done_count, 1);
  cr_assert_eq(c.statuses[0], UV_EIO);
  contract_finish(&c);
  cr_assert_eq(c.done_count, 1);
}

Test(breaker_contract, close_inside_done_of_a_timeout) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  o.clock.now = NULL; /* the timeout runs on the loop's timers */
  contract_create(&c, &o);
  c.close_in_done = true;
  c.op_mode = 2;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 5, contract_done, &c), 0);
  while (c.done_count == 0) uv_run(&c.loop, UV_RUN_ONCE);
  cr_assert_eq(c.statuses[0], UV_ETIMEDOUT);
  uv_run(&c.loop, UV_RUN_NOWAIT);
  cr_assert_eq(c.closed, 0, "the close waits for the operation's report");
  cr_assert_eq(keel_breaker_call_done(c.held[0], 0), KEEL_ESTALE);
  contract_finish(&c);
  cr_assert_eq(c.done_count, 1);
}

Test(breaker_contract, close_inside_done_of_a_rejection) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  contract_create(&c, &o);
  cr_assert_eq(keel_breaker_force_open(c.b), 0);
  c.close_in_done = true;
  for (int i = 0; i < 3; i++)
    cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), 0);
  contract_finish(&c);
  cr_assert_eq(c.done_count, 3);
  cr_assert_eq(c.statuses[0], KEEL_EOPEN);
  cr_assert_eq(c.statuses[1], UV_ECANCELED);
  cr_assert_eq(c.statuses[2], UV_ECANCELED);
}

Test(breaker_contract, close_inside_the_operation) {
  for (int when = 1; when <= 2; when++) {
    contract c;
    keel_breaker_opts o;
    contract_setup(&c, &o);
    contract_create(&c, &o);
    c.close_in_op = when;
    cr_assert_eq(keel_breaker_execute(c.b, contract_op, 100, contract_done, &c), 0);
    c.close_in_op = 0;
    cr_assert_eq(keel_breaker_execute(c.b, contract_op, 100, contract_done, &c), 0);
    c.close_in_op = when;
    contract_finish(&c);
    cr_assert_eq(c.done_count, 2, "close %s the report", when == 1 ? "before" : "after");
    /* Closed before its report: the operation is dropped (UV_ECANCELED);
     * reported first: its status stands. The second never starts. */
    cr_assert_eq(c.statuses[0], when == 1 ? UV_ECANCELED : 0);
    cr_assert_eq(c.statuses[1], UV_ECANCELED);
  }
}

Test(breaker_contract, close_inside_on_state_change_from_release) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  o.failure_threshold = 2;
  contract_create(&c, &o);
  c.close_in_change_to = KEEL_BREAKER_OPEN;
  keel_breaker_permit p1, p2, p3;
  cr_assert_eq(keel_breaker_acquire(c.b, &p1), 0);
  cr_assert_eq(keel_breaker_acquire(c.b, &p2), 0);
  cr_assert_eq(keel_breaker_acquire(c.b, &p3), 0);
  cr_assert_eq(keel_breaker_release(&p1, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_release(&p2, UV_EIO, 1), 0, "tripped and closed inside");
  cr_assert_eq(c.changes, 1);
  cr_assert_eq(keel_breaker_release(&p3, 0, 1), KEEL_ECLOSING, "a permit out at close");
  cr_assert_eq(keel_breaker_get_state(c.b), KEEL_BREAKER_OPEN, "still readable until close_cb");
  assert_closing(&c);
  contract_finish(&c);
}

Test(breaker_contract, close_inside_on_state_change_from_execute) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  o.failure_threshold = 1;
  contract_create(&c, &o);
  c.close_in_change_to = KEEL_BREAKER_OPEN;
  c.op_mode = 1;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), 0);
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), 0);
  contract_finish(&c);
  cr_assert_eq(c.done_count, 2);
  cr_assert_eq(c.statuses[0], UV_EIO, "its report came before the close");
  cr_assert_eq(c.statuses[1], UV_ECANCELED);
}

Test(breaker_contract, close_inside_on_state_change_from_acquire) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  o.failure_threshold = 1;
  contract_create(&c, &o);
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(c.b, &p), 0);
  cr_assert_eq(keel_breaker_release(&p, UV_EIO, 1), 0);
  c.close_in_change_to = KEEL_BREAKER_HALF_OPEN;
  c.now += o.reset_timeout_ms;
  cr_assert_eq(keel_breaker_acquire(c.b, &p), KEEL_ECLOSING, "closed while half-opening");
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), KEEL_ECLOSING);
  contract_finish(&c);
  cr_assert_eq(c.done_count, 0);
}

Test(breaker_contract, close_inside_on_state_change_from_execute_acquire) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  o.failure_threshold = 1;
  contract_create(&c, &o);
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(c.b, &p), 0);
  cr_assert_eq(keel_breaker_release(&p, UV_EIO, 1), 0);
  c.close_in_change_to = KEEL_BREAKER_HALF_OPEN;
  c.now += o.reset_timeout_ms;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), KEEL_ECLOSING,
               "not accepted: closed inside");
  contract_finish(&c);
  cr_assert_eq(c.done_count, 0, "nothing accepted, nothing called");
}

Test(breaker_contract, close_inside_on_state_change_from_operator_calls) {
  for (int k = 0; k < 3; k++) {
    contract c;
    keel_breaker_opts o;
    contract_setup(&c, &o);
    contract_create(&c, &o);
    if (k == 2) keel_breaker_force_open(c.b);
    c.close_in_change_to = k == 0   ? KEEL_BREAKER_FORCED_OPEN
                           : k == 1 ? KEEL_BREAKER_DISABLED
                                    : KEEL_BREAKER_CLOSED;
    int rc = k == 0   ? keel_breaker_force_open(c.b)
             : k == 1 ? keel_breaker_disable(c.b)
                      : keel_breaker_reset(c.b);
    cr_assert_eq(rc, 0);
    assert_closing(&c);
    contract_finish(&c);
  }
}

Test(breaker_contract, close_inside_on_rejected) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  contract_create(&c, &o);
  keel_breaker_force_open(c.b);
  c.close_in_reject = true;
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(c.b, &p), KEEL_EOPEN);
  cr_assert_eq(c.rejects, 1);
  assert_closing(&c);
  cr_assert_eq(c.rejects, 1, "no event after close");
  contract_finish(&c);

  /* The same through execute: the call is not accepted. */
  contract_setup(&c, &o);
  contract_create(&c, &o);
  keel_breaker_force_open(c.b);
  c.close_in_reject = true;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), KEEL_ECLOSING);
  contract_finish(&c);
  cr_assert_eq(c.done_count, 0);
}

Test(breaker_contract, close_calls_back_on_a_later_iteration_only) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  contract_create(&c, &o);
  c.op_mode = 2;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 100, contract_done, &c), 0);
  uv_run(&c.loop, UV_RUN_NOWAIT);
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 100, contract_done, &c), 0);
  c.in_keel = true;
  keel_breaker_close(c.b, contract_closed, &c);
  keel_breaker_close(c.b, contract_closed, &c); /* idempotent */
  c.in_keel = false;
  cr_assert_eq(c.done_count, 0);
  cr_assert_eq(c.closed, 0);
  assert_closing(&c);
  /* A report between close and the cancellation: still UV_ECANCELED. */
  cr_assert_eq(keel_breaker_call_done(c.held[0], 0), KEEL_ESTALE);
  cr_assert_eq(keel_breaker_call_done(c.held[0], 0), UV_EINVAL, "a second report");
  contract_finish(&c);
  cr_assert_eq(c.done_count, 2);
  cr_assert_eq(c.statuses[0], UV_ECANCELED);
  cr_assert_eq(c.statuses[1], UV_ECANCELED);
  cr_assert_eq(c.held_count, 1);
}

/* #14: reset of a CLOSED breaker is no state change. */
Test(breaker_contract, reset_of_a_closed_breaker_is_no_state_change) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  o.failure_threshold = 3;
  contract_create(&c, &o);
  keel_breaker_permit p, old;
  cr_assert_eq(keel_breaker_acquire(c.b, &old), 0);
  for (int i = 0; i < 2; i++) {
    cr_assert_eq(keel_breaker_acquire(c.b, &p), 0);
    cr_assert_eq(keel_breaker_release(&p, UV_EIO, 1), 0);
  }
  c.in_keel = true;
  cr_assert_eq(keel_breaker_reset(c.b), 0);
  c.in_keel = false;
  cr_assert_eq(c.changes, 0, "on_state_change(closed, closed) must not fire");
  keel_breaker_stats s;
  keel_breaker_get_stats(c.b, &s);
  cr_assert_eq(s.state_changes, 0);
  cr_assert_eq(s.state, KEEL_BREAKER_CLOSED);
  cr_assert_eq(s.consecutive_failures, 0, "the reset still starts over");
  cr_assert_eq(keel_breaker_release(&old, UV_EIO, 1), KEEL_ESTALE);
  /* A real change still counts. */
  keel_breaker_force_open(c.b);
  cr_assert_eq(keel_breaker_reset(c.b), 0);
  keel_breaker_get_stats(c.b, &s);
  cr_assert_eq(s.state_changes, 2);
  cr_assert_eq(c.changes, 2);
  keel_breaker_close(c.b, contract_closed, &c);
  contract_finish(&c);
}

/* ---- #13: rate thresholds compare exactly --------------------------------- */

static double decimal(unsigned k, unsigned digits) {
  char text[32];
  snprintf(text, sizeof text, "%u.%0*u", k / (digits == 2 ? 100u : 1000u), (int)digits,
           k % (digits == 2 ? 100u : 1000u));
  return strtod(text, NULL); /* what a user writing 0.55 gets */
}

Test(breaker_rate, exhaustive_for_hundredths_and_thousandths) {
  for (unsigned digits = 2; digits <= 3; digits++) {
    unsigned den = digits == 2 ? 100 : 1000;
    for (unsigned k = 1; k <= den; k++) {
      keel__rate rate;
      keel__rate_init(&rate, decimal(k, digits));
      for (uint32_t calls = 1; calls <= 1000; calls++) {
        /* the smallest part with part / calls >= k / den */
        uint32_t least = (uint32_t)(((uint64_t)k * calls + den - 1) / den);
        cr_assert(keel__rate_reached(&rate, least, calls), "%u/%u at %u/%u", least, calls, k, den);
        if (least > 0)
          cr_assert(!keel__rate_reached(&rate, least - 1, calls), "%u/%u at %u/%u", least - 1,
                    calls, k, den);
      }
    }
  }
}

Test(breaker_rate, more_decimals_and_other_doubles) {
  keel__rate rate;
  keel__rate_init(&rate, 0.123456789);
  cr_assert_eq(rate.den, 1000000000u);
  cr_assert(keel__rate_reached(&rate, 123456789, 1000000000u - 1));
  keel__rate_init(&rate, 0.000001);
  cr_assert(keel__rate_reached(&rate, 1, 1000000));
  cr_assert(!keel__rate_reached(&rate, 0, 1000000));
  cr_assert(!keel__rate_reached(&rate, 16, 16777216));
  cr_assert(keel__rate_reached(&rate, 17, 16777216));
  keel__rate_init(&rate, 1.0);
  cr_assert(keel__rate_reached(&rate, 7, 7));
  cr_assert(!keel__rate_reached(&rate, 6, 7));
  keel__rate_init(&rate, 0.0);
  cr_assert(keel__rate_reached(&rate, 0, 7));
  /* Not a short decimal: compared with the double itself. */
  keel__rate_init(&rate, 1.0 / 3.0);
  cr_assert_eq(rate.den, 0);
  cr_assert(keel__rate_reached(&rate, 1, 3));
  cr_assert(!keel__rate_reached(&rate, 33, 100));
  keel__rate_init(&rate, 0.1 * 3); /* 0.30000000000000004 */
  cr_assert(!keel__rate_reached(&rate, 3, 10));
  cr_assert(keel__rate_reached(&rate, 4, 10));
  /* the largest counts: no overflow */
  keel__rate_init(&rate, 0.999999999);
  /* 0.999999999 * 4294967295 = 4294967290.705... */
  cr_assert(!keel__rate_reached(&rate, 4294967290u, UINT32_MAX));
  cr_assert(keel__rate_reached(&rate, 4294967291u, UINT32_MAX));
}

/* The cases, end to end: n failures of 100 calls at threshold n/100
 * open a count window; n - 1 do not. */
static keel_breaker_state after_calls(double threshold, bool slow, unsigned bad, unsigned calls) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  o.failure_threshold = 0;
  o.window = KEEL_BREAKER_WINDOW_COUNT;
  o.window_size = calls;
  o.minimum_calls = calls;
  if (slow) {
    o.failure_rate_threshold = 0;
    o.slow_call_ms = 100;
    o.slow_call_rate_threshold = threshold;
  } else {
    o.failure_rate_threshold = threshold;
  }
  contract_create(&c, &o);
  for (unsigned i = 0; i < calls; i++) {
    keel_breaker_permit p;
    cr_assert_eq(keel_breaker_acquire(c.b, &p), 0, "call %u", i);
    bool is_bad = i >= calls - bad; /* the bad ones last: no earlier trip */
    cr_assert_eq(keel_breaker_release(&p, is_bad && !slow ? UV_EIO : 0, is_bad && slow ? 100 : 1),
                 0);
  }
  keel_breaker_state state = keel_breaker_get_state(c.b);
  keel_breaker_close(c.b, contract_closed, &c);
  contract_finish(&c);
  return state;
}

Test(breaker_rate, equality_opens_the_breaker) {
  static const char *thresholds[] = {"0.55", "0.07", "0.28", "0.56", "0.5", "0.29", "0.57", "1"};
  for (size_t i = 0; i < sizeof thresholds / sizeof thresholds[0]; i++) {
    double t = strtod(thresholds[i], NULL);
    unsigned n = (unsigned)(t * 100 + 0.5);
    for (int slow = 0; slow <= 1; slow++) {
      cr_assert_eq(after_calls(t, slow, n, 100), KEEL_BREAKER_OPEN, "%u of 100 at %s (%s)", n,
                   thresholds[i], slow ? "slow" : "failures");
      cr_assert_eq(after_calls(t, slow, n - 1, 100), KEEL_BREAKER_CLOSED, "%u of 100 at %s (%s)",
                   n - 1, thresholds[i], slow ? "slow" : "failures");
    }
  }
}

/* ---- allocation failure: new, execute with timeouts, close --------------- */

static void breaker_oom_scenario(void *arg) {
  (void)arg;
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  o.clock.now = NULL;
  o.window = KEEL_BREAKER_WINDOW_TIME;
  o.failure_threshold = 2;
  keel_breaker *sentinel = (keel_breaker *)&c;
  c.b = sentinel;
  int rc = keel_breaker_new(&c.loop, &o, &c.b);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    cr_assert_eq(c.b, sentinel, "*out untouched");
    kt_loop_finish(&c.loop);
    return;
  }
  int accepted = 0;
  /* A success reported at once, a call that times out, two held over the
   * close. Each execute may fail with UV_ENOMEM (a new call record). */
  int expected_before_close = 0;
  for (int i = 0; i < 4; i++) {
    c.op_mode = i == 0 ? 0 : 2;
    rc = keel_breaker_execute(c.b, contract_op, i == 1 ? 1 : 1000, contract_done, &c);
    if (rc == 0) {
      accepted++;
      if (i < 2) expected_before_close++;
    } else {
      cr_assert_eq(rc, UV_ENOMEM);
      cr_assert_geq(kt_failmalloc_index(), 0);
    }
    uv_run(&c.loop, UV_RUN_NOWAIT);
  }
  while (c.done_count < expected_before_close) uv_run(&c.loop, UV_RUN_ONCE);
  keel_breaker_close(c.b, contract_closed, &c);
  uv_run(&c.loop, UV_RUN_NOWAIT);
  cr_assert_eq(c.done_count, accepted, "every accepted call's done exactly once");
  for (int i = 0; i < c.held_count; i++) keel_breaker_call_done(c.held[i], 0);
  contract_finish(&c);
  cr_assert_eq(c.done_count, accepted);
}

Test(breaker_contract, every_allocation_failure_is_clean) {
  kt_failmalloc_run(breaker_oom_scenario, NULL);
  cr_assert_geq(kt_failmalloc_count(), 4, "breaker, window, calls");
  cr_assert_eq(kt_alloc_live_blocks(), 0);
}

static keel_breaker_outcome closing_classify(int status, void *data) {
  contract *c = data;
  keel_breaker_close(c->b, contract_closed, c);
  return status == 0 ? KEEL_BREAKER_SUCCESS : KEEL_BREAKER_FAILURE;
}

Test(breaker_contract, close_inside_classify) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  o.failure_threshold = 1;
  o.classify = closing_classify;
  o.classify_data = &c;
  contract_create(&c, &o);
  c.op_mode = 1;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), 0);
  contract_finish(&c);
  cr_assert_eq(c.done_count, 1);
  cr_assert_eq(c.statuses[0], UV_EIO, "reported before the close: the status stands");
  cr_assert_eq(c.changes, 0, "not counted once closed: no trip, no event after close");
}

/* ABI: opts_init zeroes the whole struct (reserved_ included); stats come
 * with reserved_ zero. */
Test(breaker_contract, reserved_space_is_zero) {
  keel_breaker_opts o;
  memset(&o, 0xAB, sizeof o);
  keel_breaker_opts_init(&o);
  for (size_t i = 0; i < sizeof o.reserved_ / sizeof o.reserved_[0]; i++)
    cr_assert_eq(o.reserved_[i], 0);
  cr_assert_eq(o.on_state_change, NULL);
  cr_assert_eq(o.classify, NULL);
  contract c;
  contract_setup(&c, &o);
  contract_create(&c, &o);
  keel_breaker_stats s;
  memset(&s, 0xAB, sizeof s);
  keel_breaker_get_stats(c.b, &s);
  for (size_t i = 0; i < sizeof s.reserved_ / sizeof s.reserved_[0]; i++)
    cr_assert_eq(s.reserved_[i], 0);
  keel_breaker_close(c.b, contract_closed, &c);
  contract_finish(&c);
}

/* A report made from a timer callback (before poll) is delivered in the same
 * loop iteration: the loop must not block in poll until some other event. */
static void report_from_timer(uv_timer_t *t) {
  contract *c = t->data;
  c->in_call_done = true;
  cr_assert_eq(keel_breaker_call_done(c->held[0], 0), 0);
  c->in_call_done = false;
}

static void far_timer(uv_timer_t *t) {
  *(bool *)t->data = true;
}

Test(breaker_contract, done_after_a_report_from_a_timer_does_not_wait_for_poll) {
  contract c;
  keel_breaker_opts o;
  contract_setup(&c, &o);
  contract_create(&c, &o);
  c.op_mode = 2;
  cr_assert_eq(keel_breaker_execute(c.b, contract_op, 0, contract_done, &c), 0);
  uv_run(&c.loop, UV_RUN_NOWAIT);
  cr_assert_eq(c.held_count, 1);
  uv_timer_t report, far;
  bool far_fired = false;
  uv_timer_init(&c.loop, &report);
  uv_timer_init(&c.loop, &far);
  report.data = &c;
  far.data = &far_fired;
  uv_timer_start(&report, report_from_timer, 1, 0);
  uv_timer_start(&far, far_timer, 60000, 0);
  while (c.done_count == 0 && !far_fired) uv_run(&c.loop, UV_RUN_ONCE);
  cr_assert(!far_fired, "done waited for an unrelated event");
  cr_assert_eq(c.done_count, 1);
  cr_assert_eq(c.statuses[0], 0);
  uv_close((uv_handle_t *)&report, NULL);
  uv_close((uv_handle_t *)&far, NULL);
  keel_breaker_close(c.b, contract_closed, &c);
  contract_finish(&c);
}

/* ---- edges: every validation branch, NULL arguments, timeouts in each state */

Test(breaker_edges, every_validation_rule) {
  keel_breaker_opts o;
  const char *why;
  keel_breaker_opts_init(NULL);
#define BAD(stmt)                                                         \
  do {                                                                    \
    keel_breaker_opts_init(&o);                                           \
    stmt;                                                                 \
    why = NULL;                                                           \
    cr_assert_eq(keel_breaker_validate_opts(&o, &why), UV_EINVAL, #stmt); \
    cr_assert_not_null(why, #stmt);                                       \
  } while (0)
#define GOOD(stmt)                                                            \
  do {                                                                        \
    keel_breaker_opts_init(&o);                                               \
    stmt;                                                                     \
    why = "unset";                                                            \
    cr_assert_eq(keel_breaker_validate_opts(&o, &why), 0, #stmt ": %s", why); \
    cr_assert_null(why);                                                      \
  } while (0)
  BAD(o.slow_call_rate_threshold = 1.5);
  BAD(o.slow_call_rate_threshold = NAN);
  BAD(o.failure_rate_threshold = NAN);
  BAD((o.failure_threshold = 0, o.window = KEEL_BREAKER_WINDOW_COUNT,
       o.failure_rate_threshold = 0));
  BAD((o.window = KEEL_BREAKER_WINDOW_COUNT, o.window_size = (1u << 24) + 1));
  BAD((o.window = KEEL_BREAKER_WINDOW_TIME, o.window_buckets = 0));
  BAD((o.window = KEEL_BREAKER_WINDOW_TIME, o.window_buckets = 65537, o.window_ms = 1000000));
  BAD((o.window = KEEL_BREAKER_WINDOW_COUNT, o.minimum_calls = 0));
  BAD(o.reset_backoff_factor = INFINITY);
  BAD(o.reset_backoff_factor = NAN);
  BAD((o.reset_timeout_ms = 1000, o.reset_timeout_max_ms = 999));
  GOOD((o.failure_threshold = 0, o.window = KEEL_BREAKER_WINDOW_COUNT, o.failure_rate_threshold = 0,
        o.slow_call_ms = 10));
  GOOD((o.failure_threshold = 0, o.window = KEEL_BREAKER_WINDOW_TIME));
  GOOD((o.window = KEEL_BREAKER_WINDOW_COUNT, o.window_size = 1u << 24));
  GOOD((o.window = KEEL_BREAKER_WINDOW_TIME, o.window_buckets = 65536, o.window_ms = 65536));
  GOOD(o.reset_timeout_max_ms = 0);
  GOOD(o.minimum_calls = 0); /* only checked with a window */
  cr_assert_eq(keel_breaker_validate_opts(NULL, NULL), UV_EINVAL);
#undef BAD
#undef GOOD
}

Test(breaker_edges, null_arguments) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_breaker_opts o;
  keel_breaker_opts_init(&o);
  cr_assert_eq(keel_breaker_new(&loop, &o, NULL), UV_EINVAL);
  char text[64];
  cr_assert_eq(keel_breaker_new_ex(&loop, &o, NULL, text, sizeof text), UV_EINVAL);
  cr_assert_eq(keel_breaker_new_ex(&loop, NULL, NULL, NULL, 0), UV_EINVAL);
  cr_assert_eq(keel_breaker_get_state(NULL), KEEL_BREAKER_CLOSED);
  keel_breaker_get_stats(NULL, NULL);
  cr_assert_str_eq(keel_breaker_last_error(NULL), "breaker is NULL");
  cr_assert_eq(keel_breaker_disable(NULL), UV_EINVAL);
  cr_assert_eq(keel_breaker_reset(NULL), UV_EINVAL);
  cr_assert_eq(keel_breaker_execute(NULL, op, 0, done, NULL), UV_EINVAL);
  cr_assert_eq(keel_breaker_call_done(NULL, 0), UV_EINVAL);
  keel_breaker_permit empty = {0};
  cr_assert_eq(keel_breaker_release(&empty, 0, 0), UV_EINVAL);
  keel_breaker_close(NULL, NULL, NULL);
  keel_breaker *b;
  cr_assert_eq(keel_breaker_new(&loop, &o, &b), 0);
  cr_assert_str_eq(keel_breaker_last_error(b), "");
  keel_breaker_get_stats(b, NULL);
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(b, NULL), UV_EINVAL);
  cr_assert_eq(keel_breaker_acquire(b, &p), 0);
  cr_assert_eq(keel_breaker_release(&p, 0, 0), 0);
  cr_assert_eq(keel_breaker_release(&p, 0, 0), KEEL_ESTALE, "released twice");
  cr_assert_eq(keel_breaker_execute(b, op, 0, NULL, NULL), UV_EINVAL);
  keel_breaker_close(b, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(breaker_edges, new_ex_explains_out_of_memory) {
  kt_alloc_install();
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_breaker_opts o;
  keel_breaker_opts_init(&o);
  keel_breaker *b = NULL;
  char text[64];
  kt_alloc_fail_after(0);
  cr_assert_eq(keel_breaker_new_ex(&loop, &o, &b, text, sizeof text), UV_ENOMEM);
  kt_alloc_fail_after(-1);
  cr_assert_str_eq(text, keel_strerror(UV_ENOMEM));
  cr_assert_null(b);
  o.window = KEEL_BREAKER_WINDOW_COUNT;
  kt_alloc_fail_after(1); /* the breaker, not its ring */
  cr_assert_eq(keel_breaker_new(&loop, &o, &b), UV_ENOMEM);
  kt_alloc_fail_after(-1);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
  kt_loop_finish(&loop);
}

Test(breaker_edges, without_callbacks_and_with_an_uncapped_growing_period) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  uint64_t now = 0;
  keel_breaker_opts o;
  keel_breaker_opts_init(&o);
  o.clock.now = fake_now_u64;
  o.clock.data = &now;
  o.failure_threshold = 1;
  o.reset_timeout_ms = 1000;
  o.reset_backoff_factor = 1e6;
  o.reset_timeout_max_ms = 0; /* no cap: saturates instead of overflowing */
  keel_breaker *b;
  cr_assert_eq(keel_breaker_new(&loop, &o, &b), 0);
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(b, &p), 0);
  cr_assert_eq(keel_breaker_release(&p, UV_EIO, 0), 0);
  keel_breaker_stats s;
  uint64_t last = 0;
  for (int i = 0; i < 6; i++) {
    keel_breaker_get_stats(b, &s);
    cr_assert_eq(s.state, KEEL_BREAKER_OPEN);
    cr_assert_geq(s.open_duration_ms, last, "never shrinks (no overflow)");
    last = s.open_duration_ms;
    now += s.open_duration_ms;
    cr_assert_eq(keel_breaker_acquire(b, &p), 0, "probe %d", i);
    cr_assert_eq(keel_breaker_release(&p, UV_EIO, 0), 0);
  }
  cr_assert_lt(last, UINT64_MAX / 2);
  cr_assert_eq(keel_breaker_force_open(b), 0);
  cr_assert_eq(keel_breaker_force_open(b), 0, "already forced: nothing");
  cr_assert_eq(keel_breaker_disable(b), 0);
  cr_assert_eq(keel_breaker_disable(b), 0);
  keel_breaker_get_stats(b, &s);
  cr_assert_eq(s.state_changes, 15);
  keel_breaker_close(b, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(breaker_edges, probe_outcomes_ignored_slow_and_stale) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 1;
  f.opts.window = KEEL_BREAKER_WINDOW_COUNT;
  f.opts.window_size = 10;
  f.opts.slow_call_ms = 100;
  f.opts.half_open_max_calls = 2;
  f.opts.half_open_successes = 2;
  create(&f);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  f.now += 30000;
  keel_breaker_permit p1, p2, p3;
  cr_assert_eq(keel_breaker_acquire(f.b, &p1), 0);
  cr_assert(p1.probe);
  cr_assert_eq(keel_breaker_acquire(f.b, &p2), 0);
  cr_assert_eq(keel_breaker_acquire(f.b, &p3), KEEL_EOPEN, "two probe slots");
  cr_assert_eq(keel_breaker_release(&p1, UV_ECANCELED, 1), 0, "ignored: frees its slot");
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.probes_in_flight, 1);
  cr_assert_eq(s.calls_ignored, 1);
  cr_assert_eq(keel_breaker_release(&p2, 0, 150), 0, "a slow probe reopens");
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  /* two good probes close it */
  f.now += 60000;
  cr_assert_eq(keel_breaker_acquire(f.b, &p1), 0);
  cr_assert_eq(keel_breaker_acquire(f.b, &p2), 0);
  cr_assert_eq(keel_breaker_release(&p1, 0, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN);
  cr_assert_eq(keel_breaker_release(&p2, 0, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  /* a slow success in CLOSED counts as slow, not as a failure */
  cr_assert_eq(call(&f, 0, 500), 0);
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_slow, 2);
  cr_assert_eq(s.consecutive_failures, 0);
  cr_assert_eq(s.slow_call_rate, -1.0, "below minimum_calls");
  teardown(&f);
}

/* execute() timeouts while DISABLED, in HALF_OPEN, and after a state change. */
Test(breaker_edges, timeouts_in_every_state) {
  fixture f;
  setup(&f);
  f.opts.clock.now = NULL;
  f.opts.failure_threshold = 1;
  f.opts.reset_timeout_ms = 1;
  create(&f);
  op_ctx ctx = {.f = &f, .mode = 2};
  keel_breaker_disable(f.b);
  cr_assert_eq(keel_breaker_execute(f.b, op, 1, done, &ctx), 0);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.statuses[0], UV_ETIMEDOUT);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_DISABLED, "nothing recorded");
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_timed_out, 1);
  cr_assert_eq(s.calls_failed, 0);
  /* a timeout after a state change is stale */
  keel_breaker_reset(f.b);
  cr_assert_eq(keel_breaker_execute(f.b, op, 5, done, &ctx), 0);
  uv_run(&f.loop, UV_RUN_NOWAIT);
  keel_breaker_force_open(f.b);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.statuses[1], UV_ETIMEDOUT);
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_stale, 1);
  /* a probe that times out reopens */
  keel_breaker_reset(f.b);
  keel_breaker_permit p;
  keel_breaker_acquire(f.b, &p);
  keel_breaker_release(&p, UV_EIO, 0);
  uv_sleep(3);
  uv_update_time(&f.loop);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN);
  cr_assert_eq(keel_breaker_execute(f.b, op, 1, done, &ctx), 0);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.statuses[2], UV_ETIMEDOUT);
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.state, KEEL_BREAKER_OPEN);
  for (int i = 0; i < ctx.held_count; i++)
    cr_assert_eq(keel_breaker_call_done(ctx.held[i], 0), KEEL_ESTALE);
  teardown(&f);
}

/* HALF_OPEN probes: an ignored probe frees its slot and changes nothing; a
 * successful but slow probe reopens when slowness counts; two successes
 * are needed when half_open_successes is 2. */
Test(breaker, half_open_ignored_and_slow_probes) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 1;
  f.opts.slow_call_ms = 100;
  f.opts.window = KEEL_BREAKER_WINDOW_COUNT; /* slowness needs a window */
  f.opts.minimum_calls = 100;                /* whose rates never count here */
  f.opts.half_open_successes = 2;
  f.opts.reset_timeout_ms = 1000;
  create(&f);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  f.now += 1000;
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN);

  /* cancelled probe: ignored, its slot is free again at once */
  keel_breaker_permit p, q;
  cr_assert_eq(keel_breaker_acquire(f.b, &p), 0);
  cr_assert_eq(keel_breaker_acquire(f.b, &q), KEEL_EOPEN, "one probe at a time");
  cr_assert_eq(keel_breaker_release(&p, UV_ECANCELED, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN);
  keel_breaker_stats s;
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_ignored, 1);

  /* a successful probe that is slow reopens */
  cr_assert_eq(call(&f, 0, 150), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_slow, 1);
  cr_assert_eq(s.calls_succeeded, 1);

  /* two fast successes close it; the first is not enough */
  f.now += 1000;
  cr_assert_eq(call(&f, 0, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_HALF_OPEN, "1 of 2 successes");
  cr_assert_eq(call(&f, 0, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);

  /* closed, below minimum_calls: a slow success does not trip */
  cr_assert_eq(call(&f, 0, 500), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  keel_breaker_get_stats(f.b, &s);
  cr_assert_eq(s.calls_slow, 2);
  teardown(&f);
}

/* The consecutive-failure condition alone, with a window that never trips
 * (rates off): it trips on the streak while the window keeps counting. */
Test(breaker, streak_trips_with_a_count_window) {
  fixture f;
  setup(&f);
  f.opts.failure_threshold = 3;
  f.opts.window = KEEL_BREAKER_WINDOW_COUNT;
  f.opts.window_size = 10;
  f.opts.failure_rate_threshold = 0; /* the rates never count (minimum_calls >
                                        window_size, once used for this, is rejected) */
  create(&f);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_CLOSED);
  cr_assert_eq(call(&f, UV_EIO, 1), 0);
  cr_assert_eq(keel_breaker_get_state(f.b), KEEL_BREAKER_OPEN);
  cr_assert_eq(f.changes, 1);
  teardown(&f);
}
