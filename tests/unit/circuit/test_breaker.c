/* Circuit breaker: every transition of every policy, windows, probes,
 * permits, execute() with timeouts, operator controls, events, stats and
 * close. Time is an injected clock advanced by the tests. */
#include <criterion/criterion.h>
#include <string.h>

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
  cr_assert_eq(ctx.done_count, 4);
  for (int i = 0; i < 4; i++) cr_assert_eq(ctx.statuses[i], UV_ECANCELED);
  uv_run(&f.loop, UV_RUN_NOWAIT);
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
