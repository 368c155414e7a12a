/* The retry runner of keel/retry.h on a real loop: results, attempt counts,
 * waits, deadline (injected clock), classifier, on_retry, close from every
 * callback, late reports, the trampoline, allocation failure. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "keel/common.h"
#include "keel/retry.h"
#include "support/harness.h"

#define MAX_SEEN 32

typedef enum report_mode {
  REPORT_SYNC,  /* inside attempt_fn */
  REPORT_LATER, /* from a 1 ms timer */
  REPORT_MANUAL /* the test reports by hand */
} report_mode;

typedef struct run {
  uv_loop_t loop;
  uv_timer_t later;
  keel_retry *r;
  /* behaviour */
  unsigned fail_first; /* attempts 1..fail_first fail with fail_status */
  int fail_status;
  report_mode mode;
  bool close_in_done;
  bool close_in_attempt_before_report;
  bool close_in_attempt_after_report;
  unsigned close_in_on_retry_at; /* close when on_retry announces this attempt */
  bool close_in_classify;
  uint64_t *clock;           /* injected clock, advanced by the hooks below */
  uint64_t attempt_cost_ms;  /* added to *clock by each attempt */
  uint64_t on_retry_jump_ms; /* added to *clock by on_retry */
  /* observations */
  bool in_report; /* around keel_retry_report(): no callback may run */
  unsigned attempts_seen;
  int done_calls;
  int status;
  unsigned attempts;
  int classify_calls;
  uint64_t attempt_times[MAX_SEEN];
  unsigned retry_events;
  unsigned retry_next[MAX_SEEN];
  int retry_status[MAX_SEEN];
  uint64_t retry_delay[MAX_SEEN];
  int closed;
  void *closed_object;
} run;

static int outcome_of(run *ctx, unsigned n) {
  return n <= ctx->fail_first ? ctx->fail_status : 0;
}

static int report(run *ctx, int status) {
  ctx->in_report = true;
  int rc = keel_retry_report(ctx->r, status);
  ctx->in_report = false;
  return rc;
}

static void report_later_cb(uv_timer_t *t) {
  run *ctx = t->data;
  cr_assert_eq(report(ctx, outcome_of(ctx, ctx->attempts_seen)), 0);
}

static void on_closed(void *object, void *data) {
  run *ctx = data;
  ctx->closed++;
  ctx->closed_object = object;
}

static void attempt(keel_retry *r, unsigned n, void *data) {
  run *ctx = data;
  cr_assert(!ctx->in_report, "attempt started from inside keel_retry_report");
  cr_assert_eq(ctx->done_calls, 0, "attempt after done");
  cr_assert_eq(n, ctx->attempts_seen + 1, "attempts are numbered 1, 2, 3, ...");
  cr_assert_eq(keel_retry_attempts(r), n);
  ctx->r = r;
  if (n <= MAX_SEEN) ctx->attempt_times[n - 1] = uv_now(&ctx->loop);
  ctx->attempts_seen = n;
  if (ctx->clock != NULL) *ctx->clock += ctx->attempt_cost_ms;
  if (ctx->close_in_attempt_before_report) keel_retry_close(r, on_closed, ctx);
  switch (ctx->mode) {
    case REPORT_SYNC:
      cr_assert_eq(report(ctx, outcome_of(ctx, n)), 0);
      break;
    case REPORT_LATER:
      uv_timer_start(&ctx->later, report_later_cb, 1, 0);
      break;
    case REPORT_MANUAL:
      break;
  }
  if (ctx->close_in_attempt_after_report) keel_retry_close(r, on_closed, ctx);
}

static void done(keel_retry *r, int status, unsigned attempts, void *data) {
  run *ctx = data;
  cr_assert(!ctx->in_report, "done called from inside keel_retry_report");
  ctx->done_calls++;
  ctx->status = status;
  ctx->attempts = attempts;
  if (ctx->close_in_done) keel_retry_close(r, on_closed, ctx);
}

static int classify_count(int status, void *data) {
  run *ctx = data;
  cr_assert(!ctx->in_report);
  ctx->classify_calls++;
  if (ctx->close_in_classify) keel_retry_close(ctx->r, on_closed, ctx);
  return keel_retry_default_classify(status, NULL);
}

static void on_retry(keel_retry *r, unsigned next, int status, uint64_t delay_ms, void *data) {
  run *ctx = data;
  cr_assert(!ctx->in_report);
  cr_assert_eq(next, keel_retry_attempts(r) + 1);
  cr_assert_eq(delay_ms, keel_retry_last_delay_ms(r));
  cr_assert_eq(status, keel_retry_last_status(r));
  if (ctx->retry_events < MAX_SEEN) {
    ctx->retry_next[ctx->retry_events] = next;
    ctx->retry_status[ctx->retry_events] = status;
    ctx->retry_delay[ctx->retry_events] = delay_ms;
  }
  ctx->retry_events++;
  if (ctx->clock != NULL) *ctx->clock += ctx->on_retry_jump_ms;
  if (ctx->close_in_on_retry_at == next) keel_retry_close(r, on_closed, ctx);
}

static void run_init(run *ctx) {
  memset(ctx, 0, sizeof *ctx);
  cr_assert_eq(uv_loop_init(&ctx->loop), 0);
  uv_timer_init(&ctx->loop, &ctx->later);
  ctx->later.data = ctx;
  ctx->fail_status = UV_EIO;
  ctx->close_in_done = true;
  ctx->status = 1;
}

static void run_finish(run *ctx) {
  uv_close((uv_handle_t *)&ctx->later, NULL);
  kt_loop_finish(&ctx->loop);
}

static keel_retry_opts fast_opts(run *ctx) {
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_exponential(&o.backoff, 1, 2.0, 0);
  o.classify = classify_count;
  o.classify_data = ctx;
  o.on_retry = on_retry;
  return o;
}

static keel_retry *start(run *ctx, const keel_retry_opts *o) {
  keel_retry *r = NULL;
  cr_assert_eq(keel_retry_start(&ctx->loop, o, attempt, done, ctx, &r), 0);
  cr_assert_not_null(r);
  ctx->r = r;
  cr_assert_eq(ctx->attempts_seen, 0, "attempt 1 never starts inside keel_retry_start");
  return r;
}

/* ---- configuration ----------------------------------------------------- */

Test(retry, defaults_are_retry_with_backoff) {
  keel_retry_opts o;
  memset(&o, 0xAB, sizeof o);
  keel_retry_opts_init(&o);
  cr_assert_eq(o.max_attempts, 4);
  cr_assert_eq(o.deadline_ms, 0);
  cr_assert_null(o.classify);
  cr_assert_null(o.on_retry);
  cr_assert_null(o.clock.now);
  cr_assert_eq(o.seed, 0);
  cr_assert_eq(o.backoff.kind, KEEL_BACKOFF_EXPONENTIAL);
  cr_assert_eq(keel_backoff_delay(&o.backoff, 1, 0, NULL), 100);
  cr_assert_eq(keel_backoff_delay(&o.backoff, 2, 0, NULL), 200);
  cr_assert_eq(keel_backoff_delay(&o.backoff, 3, 0, NULL), 400);
  for (size_t i = 0; i < sizeof o.reserved_ / sizeof o.reserved_[0]; i++)
    cr_assert_eq(o.reserved_[i], 0, "opts_init zeroes the ABI room");
  keel_retry_opts_init(NULL);
}

Test(retry, default_classifier) {
  const int fatal[] = {UV_ECANCELED, UV_EINVAL, UV_ENOMEM, KEEL_EABORTED, KEEL_ECLOSING, 0, 1};
  for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++)
    cr_assert_eq(keel_retry_default_classify(fatal[i], NULL), 0, "%s", keel_err_name(fatal[i]));
  const int transient[] = {UV_EIO,          UV_EAGAIN,       UV_ETIMEDOUT,        UV_ECONNRESET,
                           UV_ECONNREFUSED, KEEL_ECONN,      KEEL_ESERIALIZATION, KEEL_ECONFLICT,
                           KEEL_EPG,        KEEL_ERETRYABLE, KEEL_EOPEN};
  for (size_t i = 0; i < sizeof transient / sizeof transient[0]; i++)
    cr_assert_neq(keel_retry_default_classify(transient[i], NULL), 0, "%s",
                  keel_err_name(transient[i]));
}

Test(retry, invalid_arguments) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_retry *r = (keel_retry *)0x1;
  run ctx;
  cr_assert_eq(keel_retry_start(NULL, &o, attempt, done, &ctx, &r), UV_EINVAL);
  cr_assert_eq(keel_retry_start(&loop, NULL, attempt, done, &ctx, &r), UV_EINVAL);
  cr_assert_eq(keel_retry_start(&loop, &o, NULL, done, &ctx, &r), UV_EINVAL);
  cr_assert_eq(keel_retry_start(&loop, &o, attempt, NULL, &ctx, &r), UV_EINVAL);
  cr_assert_eq(keel_retry_start(&loop, &o, attempt, done, &ctx, NULL), UV_EINVAL);
  o.max_attempts = 0;
  cr_assert_eq(keel_retry_start(&loop, &o, attempt, done, &ctx, &r), UV_EINVAL);
  keel_retry_opts_init(&o);
  o.backoff.factor = 0.1;
  cr_assert_eq(keel_retry_start(&loop, &o, attempt, done, &ctx, &r), UV_EINVAL);
  keel_retry_opts_init(&o);
  keel_backoff_decorrelated_jitter(&o.backoff, 0, 100);
  cr_assert_eq(keel_retry_start(&loop, &o, attempt, done, &ctx, &r), UV_EINVAL);
  cr_assert_eq(r, (keel_retry *)0x1, "out untouched on failure");
  cr_assert_eq(keel_retry_report(NULL, 0), UV_EINVAL);
  cr_assert_eq(keel_retry_attempts(NULL), 0);
  cr_assert_eq(keel_retry_last_delay_ms(NULL), 0);
  cr_assert_eq(keel_retry_last_status(NULL), 0);
  keel_retry_close(NULL, NULL, NULL);
  kt_loop_finish(&loop);
}

/* ---- results ------------------------------------------------------------ */

Test(retry, success_on_first_attempt) {
  run ctx;
  run_init(&ctx);
  keel_retry_opts o = fast_opts(&ctx);
  keel_retry *r = start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.attempts, 1);
  cr_assert_eq(ctx.classify_calls, 0, "successes are not classified");
  cr_assert_eq(ctx.retry_events, 0);
  cr_assert_eq(ctx.closed, 1);
  cr_assert_eq(ctx.closed_object, r, "close_cb gets the runner's address");
  run_finish(&ctx);
}

Test(retry, success_after_failures_reported_later_waits_the_backoff) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 2;
  ctx.mode = REPORT_LATER;
  keel_retry_opts o = fast_opts(&ctx);
  keel_backoff_exponential(&o.backoff, 20, 2.0, 0);
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.attempts, 3);
  cr_assert_eq(ctx.classify_calls, 2);
  /* attempt 2 >= 20 ms after attempt 1's report, attempt 3 >= 40 ms after 2's */
  cr_assert_geq(ctx.attempt_times[1] - ctx.attempt_times[0], 20 + 1);
  cr_assert_geq(ctx.attempt_times[2] - ctx.attempt_times[1], 40 + 1);
  cr_assert_eq(ctx.retry_events, 2);
  cr_assert_eq(ctx.retry_next[0], 2);
  cr_assert_eq(ctx.retry_delay[0], 20);
  cr_assert_eq(ctx.retry_status[0], UV_EIO);
  cr_assert_eq(ctx.retry_next[1], 3);
  cr_assert_eq(ctx.retry_delay[1], 40);
  run_finish(&ctx);
}

Test(retry, success_after_failures_reported_synchronously) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 3;
  ctx.fail_status = UV_EAGAIN;
  ctx.close_in_done = false;
  keel_retry_opts o = fast_opts(&ctx);
  keel_retry *r = start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.attempts, 4);
  cr_assert_eq(keel_retry_attempts(r), 4);
  cr_assert_eq(keel_retry_last_status(r), UV_EAGAIN, "the last failure is kept");
  cr_assert_eq(keel_retry_last_delay_ms(r), 4, "1, 2, 4 ms");
  cr_assert_eq(ctx.closed, 0);
  keel_retry_close(r, on_closed, &ctx);
  cr_assert_eq(ctx.done_calls, 1, "close after done calls nothing");
  cr_assert_eq(ctx.closed, 0, "close_cb never inside close");
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

Test(retry, positive_status_is_success) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 1;
  ctx.fail_status = 7; /* e.g. a byte count */
  keel_retry_opts o = fast_opts(&ctx);
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.attempts, 1);
  run_finish(&ctx);
}

Test(retry, attempts_run_out_with_the_last_status) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.fail_status = UV_ECONNREFUSED;
  keel_retry_opts o = fast_opts(&ctx);
  o.max_attempts = 3;
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECONNREFUSED);
  cr_assert_eq(ctx.attempts, 3);
  cr_assert_eq(ctx.attempts_seen, 3);
  cr_assert_eq(ctx.classify_calls, 2, "the last failure needs no classification");
  cr_assert_eq(ctx.retry_events, 2);
  run_finish(&ctx);
}

Test(retry, one_attempt_never_retries) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  keel_retry_opts o = fast_opts(&ctx);
  o.max_attempts = 1;
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.status, UV_EIO);
  cr_assert_eq(ctx.attempts, 1);
  cr_assert_eq(ctx.retry_events, 0);
  run_finish(&ctx);
}

static int only_eagain(int status, void *data) {
  cr_assert_eq(*(int *)data, 1234, "classify_data is passed through");
  return status == UV_EAGAIN;
}

Test(retry, classifier_stops_non_retryable) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.fail_status = UV_EPERM;
  int marker = 1234;
  keel_retry_opts o = fast_opts(&ctx);
  o.classify = only_eagain;
  o.classify_data = &marker;
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_EPERM);
  cr_assert_eq(ctx.attempts, 1);
  cr_assert_eq(ctx.retry_events, 0);
  run_finish(&ctx);
}

Test(retry, default_classifier_in_the_runner) {
  const int fatal[] = {UV_ECANCELED, UV_EINVAL, UV_ENOMEM, KEEL_EABORTED, KEEL_ECLOSING};
  for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++) {
    run ctx;
    run_init(&ctx);
    ctx.fail_first = 100;
    ctx.fail_status = fatal[i];
    keel_retry_opts o = fast_opts(&ctx);
    o.classify = NULL;
    start(&ctx, &o);
    uv_run(&ctx.loop, UV_RUN_DEFAULT);
    cr_assert_eq(ctx.status, fatal[i]);
    cr_assert_eq(ctx.attempts, 1, "%s is not retried", keel_err_name(fatal[i]));
    run_finish(&ctx);
  }
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.fail_status = KEEL_ECONN;
  keel_retry_opts o = fast_opts(&ctx);
  o.classify = NULL;
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.status, KEEL_ECONN);
  cr_assert_eq(ctx.attempts, 4, "other errors are retried up to max_attempts");
  run_finish(&ctx);
}

Test(retry, jitter_is_deterministic_with_a_seed) {
  uint64_t delays[2][MAX_SEEN];
  for (int k = 0; k < 2; k++) {
    run ctx;
    run_init(&ctx);
    ctx.fail_first = 100;
    keel_retry_opts o = fast_opts(&ctx);
    keel_backoff_full_jitter(&o.backoff, 2, 2.0, 16);
    o.max_attempts = 8;
    o.seed = 99;
    start(&ctx, &o);
    uv_run(&ctx.loop, UV_RUN_DEFAULT);
    cr_assert_eq(ctx.retry_events, 7);
    memcpy(delays[k], ctx.retry_delay, sizeof delays[k]);
    run_finish(&ctx);
  }
  /* the runner draws from keel_rng seeded with opts.seed, in order */
  keel_backoff b;
  keel_backoff_full_jitter(&b, 2, 2.0, 16);
  keel_rng rng;
  keel_rng_seed(&rng, 99);
  uint64_t prev = 0;
  for (unsigned i = 0; i < 7; i++) {
    uint64_t expected = keel_backoff_delay(&b, i + 1, prev, &rng);
    cr_assert_eq(delays[0][i], expected, "retry %u", i + 1);
    cr_assert_eq(delays[1][i], expected);
    prev = expected;
  }
}

/* ---- deadline ----------------------------------------------------------- */

static uint64_t fake_now(void *data) {
  return *(uint64_t *)data;
}

static void deadline_run(uint64_t deadline, uint64_t delay, unsigned expect_attempts) {
  run ctx;
  run_init(&ctx);
  uint64_t now = 5000;
  ctx.fail_first = 100;
  ctx.clock = &now;
  ctx.attempt_cost_ms = 1000; /* each attempt "takes" a second of injected time */
  keel_retry_opts o = fast_opts(&ctx);
  keel_backoff_fixed(&o.backoff, delay);
  o.max_attempts = 50;
  o.deadline_ms = deadline;
  o.clock.now = fake_now;
  o.clock.data = &now;
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_EIO, "the deadline reports the last failure, not UV_ETIMEDOUT");
  cr_assert_eq(ctx.attempts, expect_attempts, "deadline %llu delay %llu: %u attempts",
               (unsigned long long)deadline, (unsigned long long)delay, ctx.attempts);
  run_finish(&ctx);
}

Test(retry, deadline_on_the_injected_clock) {
  /* attempts end at +1000, +2000, +3000 (injected); a retry starts only if
   * end + delay <= deadline */
  deadline_run(2500, 0, 3);
  deadline_run(2500, 2, 3);
  deadline_run(2002, 2, 3); /* a retry may start exactly at the deadline */
  deadline_run(2001, 2, 2); /* ... not one ms after it */
  deadline_run(999, 0, 1);  /* the first attempt always runs */
  deadline_run(0, 0, 50);   /* 0: no deadline */
}

Test(retry, clock_jump_while_waiting_stops_before_the_next_attempt) {
  run ctx;
  run_init(&ctx);
  uint64_t now = 100;
  ctx.fail_first = 100;
  ctx.fail_status = KEEL_ECONN;
  ctx.clock = &now;
  ctx.on_retry_jump_ms = 10000; /* time passes (a blocked loop) during the wait */
  keel_retry_opts o = fast_opts(&ctx);
  o.max_attempts = 10;
  o.deadline_ms = 5000;
  o.clock.now = fake_now;
  o.clock.data = &now;
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.retry_events, 1);
  cr_assert_eq(ctx.attempts, 1, "the retry due after the deadline is not started");
  cr_assert_eq(ctx.status, KEEL_ECONN);
  run_finish(&ctx);
}

Test(retry, clock_going_backwards_counts_as_no_time) {
  run ctx;
  run_init(&ctx);
  uint64_t now = 1000000;
  ctx.fail_first = 5;
  ctx.clock = &now;
  ctx.on_retry_jump_ms = (uint64_t)-1000; /* wraps: the clock moves back 1 s */
  keel_retry_opts o = fast_opts(&ctx);
  o.max_attempts = 10;
  o.deadline_ms = 1000;
  o.clock.now = fake_now;
  o.clock.data = &now;
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.attempts, 6);
  run_finish(&ctx);
}

Test(retry, deadline_with_real_timers) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  keel_retry_opts o = fast_opts(&ctx);
  keel_backoff_fixed(&o.backoff, 30);
  o.max_attempts = 100;
  o.deadline_ms = 100;
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_EIO);
  cr_assert(ctx.attempts >= 2 && ctx.attempts <= 4, "attempts %u", ctx.attempts);
  run_finish(&ctx);
}

/* ---- close -------------------------------------------------------------- */

Test(retry, close_while_waiting_cancels_once) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.close_in_done = false;
  keel_retry_opts o = fast_opts(&ctx);
  keel_backoff_fixed(&o.backoff, 60000);
  keel_retry *r = start(&ctx, &o);
  while (ctx.retry_events < 1) uv_run(&ctx.loop, UV_RUN_NOWAIT);
  cr_assert_eq(ctx.done_calls, 0);
  ctx.in_report = true; /* no callback inside close */
  keel_retry_close(r, on_closed, &ctx);
  keel_retry_close(r, on_closed, &ctx); /* idempotent */
  ctx.in_report = false;
  cr_assert_eq(ctx.done_calls, 0, "done is never called inside close");
  cr_assert_eq(ctx.closed, 0, "close_cb is never called inside close");
  cr_assert_eq(keel_retry_report(r, 0), KEEL_ECLOSING, "nothing in flight, closing");
  uv_run(&ctx.loop, UV_RUN_ONCE);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  cr_assert_eq(ctx.attempts, 1);
  uv_run(&ctx.loop, UV_RUN_DEFAULT); /* returns at once: the 60 s timer is gone */
  cr_assert_eq(ctx.closed, 1);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.attempts_seen, 1);
  run_finish(&ctx);
}

Test(retry, close_before_the_first_attempt) {
  run ctx;
  run_init(&ctx);
  ctx.close_in_done = false;
  keel_retry_opts o = fast_opts(&ctx);
  keel_retry *r = start(&ctx, &o);
  keel_retry_close(r, on_closed, &ctx);
  cr_assert_eq(ctx.done_calls, 0, "not inside close");
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  cr_assert_eq(ctx.attempts, 0);
  cr_assert_eq(ctx.attempts_seen, 0, "no attempt after close");
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

Test(retry, close_inside_attempt_then_a_late_report) {
  run ctx;
  run_init(&ctx);
  ctx.mode = REPORT_LATER;
  ctx.close_in_done = false;
  ctx.close_in_attempt_before_report = true;
  keel_retry_opts o = fast_opts(&ctx);
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  cr_assert_eq(ctx.attempts_seen, 1);
  cr_assert_eq(ctx.closed, 1, "closed once the late report came");
  run_finish(&ctx);
}

Test(retry, close_inside_attempt_after_a_synchronous_success) {
  run ctx;
  run_init(&ctx);
  ctx.close_in_done = false;
  ctx.close_in_attempt_after_report = true;
  keel_retry_opts o = fast_opts(&ctx);
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, 0, "a success already reported stands");
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

Test(retry, close_inside_attempt_after_a_synchronous_failure) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.close_in_done = false;
  ctx.close_in_attempt_after_report = true;
  keel_retry_opts o = fast_opts(&ctx);
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  cr_assert_eq(ctx.attempts_seen, 1);
  cr_assert_eq(ctx.classify_calls, 0);
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

Test(retry, close_inside_on_retry) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.close_in_done = false;
  ctx.close_in_on_retry_at = 3;
  keel_retry_opts o = fast_opts(&ctx);
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  cr_assert_eq(ctx.attempts, 2);
  cr_assert_eq(ctx.attempts_seen, 2, "the announced attempt never starts");
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

Test(retry, close_inside_classify) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.close_in_done = false;
  ctx.close_in_classify = true;
  keel_retry_opts o = fast_opts(&ctx);
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  cr_assert_eq(ctx.attempts_seen, 1);
  cr_assert_eq(ctx.retry_events, 0);
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

Test(retry, close_inside_done_from_a_synchronous_attempt) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 1;
  keel_retry_opts o = fast_opts(&ctx);
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

Test(retry, close_between_a_success_report_and_its_handling) {
  run ctx;
  run_init(&ctx);
  ctx.mode = REPORT_MANUAL;
  ctx.close_in_done = false;
  keel_retry_opts o = fast_opts(&ctx);
  keel_retry *r = start(&ctx, &o);
  while (ctx.attempts_seen < 1) uv_run(&ctx.loop, UV_RUN_NOWAIT);
  cr_assert_eq(report(&ctx, 0), 0);
  cr_assert_eq(ctx.done_calls, 0, "report never calls done");
  keel_retry_close(r, on_closed, &ctx);
  cr_assert_eq(ctx.done_calls, 0, "close never calls done");
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

Test(retry, late_report_after_close_is_safe) {
  run ctx;
  run_init(&ctx);
  ctx.mode = REPORT_MANUAL;
  ctx.close_in_done = false;
  keel_retry_opts o = fast_opts(&ctx);
  keel_retry *r = start(&ctx, &o);
  while (ctx.attempts_seen < 1) uv_run(&ctx.loop, UV_RUN_NOWAIT);
  keel_retry_close(r, on_closed, &ctx);
  cr_assert_eq(ctx.done_calls, 0);
  for (int i = 0; i < 5; i++) uv_run(&ctx.loop, UV_RUN_NOWAIT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  cr_assert_eq(ctx.closed, 0, "the memory waits for the attempt in flight");
  cr_assert_eq(report(&ctx, UV_EIO), 0, "the late report is accepted and ignored");
  cr_assert_eq(ctx.done_calls, 1);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.closed, 1);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.attempts_seen, 1);
  run_finish(&ctx);
}

Test(retry, reports_without_an_attempt_in_flight_are_rejected) {
  run ctx;
  run_init(&ctx);
  ctx.mode = REPORT_MANUAL;
  ctx.fail_first = 1;
  ctx.close_in_done = false;
  keel_retry_opts o = fast_opts(&ctx);
  keel_retry *r = start(&ctx, &o);
  cr_assert_eq(keel_retry_report(r, 0), UV_EINVAL, "attempt 1 has not started yet");
  while (ctx.attempts_seen < 1) uv_run(&ctx.loop, UV_RUN_NOWAIT);
  cr_assert_eq(report(&ctx, UV_EIO), 0);
  cr_assert_eq(report(&ctx, 0), UV_EINVAL, "a second report for the same attempt");
  while (ctx.attempts_seen < 2) uv_run(&ctx.loop, UV_RUN_ONCE);
  cr_assert_eq(report(&ctx, 0), 0);
  while (ctx.done_calls < 1) uv_run(&ctx.loop, UV_RUN_ONCE);
  cr_assert_eq(ctx.status, 0, "the second report was not taken for attempt 2");
  cr_assert_eq(ctx.attempts, 2);
  cr_assert_eq(keel_retry_report(r, 0), UV_EINVAL, "after done");
  keel_retry_close(r, on_closed, &ctx);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

/* ---- the trampoline ------------------------------------------------------ */

typedef struct deep_run {
  unsigned attempts;
  int status;
  uintptr_t lowest_frame;
  uintptr_t highest_frame;
} deep_run;

static void always_fail(keel_retry *r, unsigned n, void *data) {
  deep_run *s = data;
  uintptr_t frame = (uintptr_t)__builtin_frame_address(0);
  if (frame < s->lowest_frame) s->lowest_frame = frame;
  if (frame > s->highest_frame) s->highest_frame = frame;
  s->attempts = n;
  cr_assert_eq(keel_retry_report(r, UV_EAGAIN), 0);
}

static void deep_done(keel_retry *r, int status, unsigned attempts, void *data) {
  deep_run *s = data;
  s->status = status;
  s->attempts = attempts;
  keel_retry_close(r, NULL, NULL);
}

Test(retry, synchronous_reports_do_not_grow_the_stack) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_fixed(&o.backoff, 0);
  o.max_attempts = 100000;
  deep_run s = {0, 1, UINTPTR_MAX, 0};
  keel_retry *r;
  cr_assert_eq(keel_retry_start(&loop, &o, always_fail, deep_done, &s, &r), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  cr_assert_eq(s.status, UV_EAGAIN);
  cr_assert_eq(s.attempts, 100000);
  /* every attempt starts from the same depth: recursion would spread the
   * frames over megabytes (or overflow the stack) */
  cr_assert_lt(s.highest_frame - s.lowest_frame, 4096, "frames spread over %zu bytes",
               (size_t)(s.highest_frame - s.lowest_frame));
  kt_loop_finish(&loop);
}

/* ---- allocation failure ------------------------------------------------- */

typedef struct oom_scenario {
  int runners;
} oom_scenario;

static void oom_done(keel_retry *r, int status, unsigned attempts, void *data) {
  int *result = data;
  result[0] = status;
  result[1] = (int)attempts;
  keel_retry_close(r, NULL, NULL);
}

static void oom_attempt(keel_retry *r, unsigned n, void *data) {
  (void)data;
  keel_retry_report(r, n < 2 ? UV_EAGAIN : 0);
}

/* Several runners on one loop; each start may fail with UV_ENOMEM, the
 * others must finish normally, and nothing may leak. */
static void retry_scenario(void *arg) {
  oom_scenario *sc = arg;
  uv_loop_t loop;
  cr_assert_eq(uv_loop_init(&loop), 0);
  int results[8][2];
  int started[8];
  int ok = 0;
  for (int i = 0; i < sc->runners; i++) {
    keel_retry_opts o;
    keel_retry_opts_init(&o);
    keel_backoff_fixed(&o.backoff, 0);
    results[i][0] = 1;
    results[i][1] = -1;
    keel_retry *r = (keel_retry *)&started; /* must stay untouched on failure */
    started[i] = keel_retry_start(&loop, &o, oom_attempt, oom_done, results[i], &r);
    if (started[i] == 0) {
      ok++;
    } else {
      cr_assert_eq(started[i], UV_ENOMEM, "runner %d: %s", i, keel_err_name(started[i]));
      cr_assert_eq(r, (keel_retry *)&started);
      cr_assert_geq(kt_failmalloc_index(), 0, "only fails when an allocation fails");
    }
  }
  if (kt_failmalloc_index() < 0) cr_assert_eq(ok, sc->runners);
  uv_run(&loop, UV_RUN_DEFAULT);
  for (int i = 0; i < sc->runners; i++) {
    if (started[i] != 0) continue;
    cr_assert_eq(results[i][0], 0);
    cr_assert_eq(results[i][1], 2);
  }
  kt_loop_finish(&loop);
}

Test(retry, every_allocation_failure_is_clean) {
  oom_scenario sc = {3};
  kt_failmalloc_run(retry_scenario, &sc);
  cr_assert_eq(kt_failmalloc_count(), 3, "one allocation per runner, none per attempt");
  cr_assert_eq(kt_alloc_live_blocks(), 0);
}

Test(retry, no_allocation_per_attempt) {
  kt_alloc_install();
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_fixed(&o.backoff, 0);
  o.max_attempts = 1000;
  deep_run s = {0, 1, UINTPTR_MAX, 0};
  keel_retry *r;
  uint64_t before = kt_alloc_count();
  cr_assert_eq(keel_retry_start(&loop, &o, always_fail, deep_done, &s, &r), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  cr_assert_eq(s.attempts, 1000);
  cr_assert_eq(kt_alloc_count() - before, 1);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
  kt_loop_finish(&loop);
}

/* ---- the callback contract (issue 13) ------------------------------------ */

/* close calls nothing back inside the call, done comes on a later iteration
 * and before close_cb, whatever the runner was doing. */
static void closed_after_done(void *object, void *data) {
  run *ctx = data;
  (void)object;
  cr_assert_eq(ctx->done_calls, 1, "done before close_cb");
  ctx->closed++;
}

Test(retry, close_reports_on_a_later_iteration_before_close_cb) {
  /* phase 0: before attempt 1; 1: attempt in flight; 2: success reported,
   * not handled; 3: waiting for a retry */
  for (int phase = 0; phase < 4; phase++) {
    run ctx;
    run_init(&ctx);
    ctx.mode = REPORT_MANUAL;
    ctx.close_in_done = false;
    ctx.fail_first = phase == 3 ? 1 : 0;
    keel_retry_opts o = fast_opts(&ctx);
    keel_backoff_fixed(&o.backoff, 60000);
    keel_retry *r = start(&ctx, &o);
    if (phase >= 1)
      while (ctx.attempts_seen < 1) uv_run(&ctx.loop, UV_RUN_NOWAIT);
    if (phase == 2) cr_assert_eq(report(&ctx, 0), 0);
    if (phase == 3) {
      cr_assert_eq(report(&ctx, UV_EIO), 0);
      while (ctx.retry_events < 1) uv_run(&ctx.loop, UV_RUN_NOWAIT);
    }
    ctx.in_report = true;
    keel_retry_close(r, closed_after_done, &ctx);
    ctx.in_report = false;
    cr_assert_eq(ctx.done_calls, 0, "phase %d: done inside close", phase);
    if (phase == 1) cr_assert_eq(report(&ctx, 0), 0, "the abandoned attempt reports");
    uv_run(&ctx.loop, UV_RUN_DEFAULT);
    cr_assert_eq(ctx.done_calls, 1, "phase %d", phase);
    cr_assert_eq(ctx.status, phase == 2 ? 0 : UV_ECANCELED, "phase %d", phase);
    cr_assert_eq(ctx.closed, 1, "phase %d", phase);
    run_finish(&ctx);
  }
}

/* The abandoned attempt reports from inside the UV_ECANCELED done. */
static void done_reports_the_abandoned_attempt(keel_retry *r, int status, unsigned attempts,
                                               void *data) {
  run *ctx = data;
  (void)attempts;
  ctx->done_calls++;
  ctx->status = status;
  cr_assert_eq(keel_retry_report(r, 0), 0);
  cr_assert_eq(keel_retry_report(r, 0), KEEL_ECLOSING, "nothing in flight any more");
}

Test(retry, abandoned_attempt_reports_from_inside_done) {
  run ctx;
  run_init(&ctx);
  ctx.mode = REPORT_MANUAL;
  keel_retry_opts o = fast_opts(&ctx);
  keel_retry *r = NULL;
  cr_assert_eq(
      keel_retry_start(&ctx.loop, &o, attempt, done_reports_the_abandoned_attempt, &ctx, &r), 0);
  ctx.r = r;
  while (ctx.attempts_seen < 1) uv_run(&ctx.loop, UV_RUN_NOWAIT);
  keel_retry_close(r, on_closed, &ctx);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  cr_assert_eq(ctx.closed, 1);
  run_finish(&ctx);
}

/* #15: a FIXED backoff ignores its factor, so factor 0 is accepted. */
Test(retry, fixed_backoff_with_factor_zero_is_accepted) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 2;
  keel_retry_opts o = fast_opts(&ctx);
  keel_backoff_fixed(&o.backoff, 1);
  o.backoff.factor = 0;
  start(&ctx, &o);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.attempts, 3);
  cr_assert_eq(ctx.retry_delay[0], 1);
  cr_assert_eq(ctx.retry_delay[1], 1);
  run_finish(&ctx);
}

/* Allocation failure over start, attempts (failures and a wait) and a close
 * while an attempt is in flight and another runner waits for its retry. */
typedef struct oom_close {
  int done_calls[3];
  int status[3];
  int closed[3];
  keel_retry *r[3];
} oom_close;

static void oom_close_attempt(keel_retry *r, unsigned n, void *data) {
  (void)n;
  oom_close *s = data;
  /* runner 0 fails at once and waits 60 s; runner 1 holds its attempt */
  if (r == s->r[0]) keel_retry_report(r, UV_EAGAIN);
}

static int oom_close_index(oom_close *s, keel_retry *r) {
  for (int i = 0; i < 3; i++)
    if (s->r[i] == r) return i;
  cr_assert_fail("unknown runner");
  return 0;
}

static void oom_close_done(keel_retry *r, int status, unsigned attempts, void *data) {
  (void)attempts;
  oom_close *s = data;
  int i = oom_close_index(s, r);
  s->done_calls[i]++;
  s->status[i] = status;
}

static void oom_close_closed(void *object, void *data) {
  oom_close *s = data;
  int i = oom_close_index(s, object);
  cr_assert_eq(s->done_calls[i], 1, "done before close_cb");
  s->closed[i]++;
}

static void retry_close_scenario(void *arg) {
  (void)arg;
  uv_loop_t loop;
  cr_assert_eq(uv_loop_init(&loop), 0);
  oom_close s;
  memset(&s, 0, sizeof s);
  int started[2];
  for (int i = 0; i < 2; i++) {
    keel_retry_opts o;
    keel_retry_opts_init(&o);
    keel_backoff_fixed(&o.backoff, 60000);
    started[i] = keel_retry_start(&loop, &o, oom_close_attempt, oom_close_done, &s, &s.r[i]);
    if (started[i] != 0) {
      cr_assert_eq(started[i], UV_ENOMEM);
      s.r[i] = NULL;
    }
  }
  for (int i = 0; i < 3; i++) uv_run(&loop, UV_RUN_NOWAIT);
  for (int i = 0; i < 2; i++)
    if (started[i] == 0) keel_retry_close(s.r[i], oom_close_closed, &s);
  for (int i = 0; i < 2; i++) cr_assert_eq(s.done_calls[i], 0);
  uv_run(&loop, UV_RUN_NOWAIT);
  if (started[1] == 0) cr_assert_eq(keel_retry_report(s.r[1], 0), 0);
  kt_loop_finish(&loop);
  for (int i = 0; i < 2; i++) {
    if (started[i] != 0) continue;
    cr_assert_eq(s.done_calls[i], 1);
    cr_assert_eq(s.status[i], UV_ECANCELED);
    cr_assert_eq(s.closed[i], 1);
  }
}

Test(retry, allocation_failure_with_close_is_clean) {
  kt_failmalloc_run(retry_close_scenario, NULL);
  cr_assert_eq(kt_failmalloc_count(), 2);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
}
