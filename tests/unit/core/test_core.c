/* Core: error codes, allocator, version, backoff policies, the retry runner. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "keel/common.h"
#include "keel/retry.h"
#include "support/harness.h"

/* ---- errors, version, allocator --------------------------------------- */

Test(core, every_keel_code_has_a_name_and_message) {
#define CHECK_CODE(name, value, msg)                     \
  cr_assert_str_eq(keel_err_name(value), "KEEL_" #name); \
  cr_assert_str_eq(keel_strerror(value), msg);           \
  cr_assert(value <= -30000 && value > -31000, "%s out of range", #name);
  KEEL_ERRNO_MAP(CHECK_CODE)
#undef CHECK_CODE
  cr_assert_str_eq(keel_err_name(UV_ECANCELED), "UV_ECANCELED");
  cr_assert_str_eq(keel_strerror(UV_ENOMEM), uv_strerror(UV_ENOMEM));
  cr_assert_str_eq(keel_strerror(-30998), "unknown error");
  cr_assert_str_eq(keel_strerror(0), "success");
}

Test(core, version_matches_header) {
  cr_assert_eq(keel_version(), (unsigned)((KEEL_VERSION_MAJOR << 16) | (KEEL_VERSION_MINOR << 8) |
                                          KEEL_VERSION_PATCH));
  cr_assert_str_eq(keel_version_string(), "0.1.0");
}

Test(core, replace_allocator_rejects_null) {
  cr_assert_eq(keel_replace_allocator(NULL, realloc, calloc, free), UV_EINVAL);
  cr_assert_eq(keel_replace_allocator(malloc, realloc, calloc, NULL), UV_EINVAL);
}

static void attempt_ok(keel_retry *r, unsigned n, void *data);
static void done_store(keel_retry *r, int status, unsigned attempts, void *data);

Test(core, every_allocation_goes_through_the_allocator) {
  kt_alloc_install();
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_retry *r;
  int result[2] = {1, 0};
  uint64_t before = kt_alloc_count();
  cr_assert_eq(keel_retry_start(&loop, &o, attempt_ok, done_store, result, &r), 0);
  cr_assert_gt(kt_alloc_count(), before);
  cr_assert_gt(kt_alloc_live_blocks(), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  kt_loop_finish(&loop);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
}

/* ---- rng and backoff -------------------------------------------------- */

Test(core, rng_is_deterministic_and_bounded) {
  keel_rng a, b;
  keel_rng_seed(&a, 7);
  keel_rng_seed(&b, 7);
  for (int i = 0; i < 100; i++) cr_assert_eq(keel_rng_next(&a), keel_rng_next(&b));
  keel_rng_seed(&a, 0);
  cr_assert_neq(keel_rng_next(&a), 0);
  bool seen_low = false, seen_high = false;
  for (int i = 0; i < 10000; i++) {
    uint64_t v = keel_rng_between(&a, 10, 20);
    cr_assert(v >= 10 && v <= 20);
    seen_low |= v == 10;
    seen_high |= v == 20;
  }
  cr_assert(seen_low && seen_high, "both ends are reachable");
  cr_assert_eq(keel_rng_between(&a, 5, 5), 5);
  cr_assert_eq(keel_rng_between(&a, 9, 3), 9);
}

Test(core, fixed_and_exponential_sequences) {
  keel_backoff b;
  keel_backoff_fixed(&b, 250);
  for (unsigned n = 1; n < 10; n++) cr_assert_eq(keel_backoff_delay(&b, n, 0, NULL), 250);
  keel_backoff_exponential(&b, 100, 2.0, 0);
  uint64_t expected[] = {100, 200, 400, 800, 1600};
  for (unsigned n = 1; n <= 5; n++)
    cr_assert_eq(keel_backoff_delay(&b, n, 0, NULL), expected[n - 1], "retry %u", n);
  keel_backoff_exponential(&b, 1000, 1.5, 3000); /* seed 004: retryDelay, multiplier, maxDelay */
  cr_assert_eq(keel_backoff_delay(&b, 1, 0, NULL), 1000);
  cr_assert_eq(keel_backoff_delay(&b, 2, 0, NULL), 1500);
  cr_assert_eq(keel_backoff_delay(&b, 3, 0, NULL), 2250);
  cr_assert_eq(keel_backoff_delay(&b, 4, 0, NULL), 3000);
  cr_assert_eq(keel_backoff_delay(&b, 1000, 0, NULL), 3000, "no overflow far out");
  keel_backoff_exponential(&b, 100, 2.0, 0);
  cr_assert_eq(keel_backoff_delay(&b, 100000, 0, NULL), UINT64_MAX / 2, "saturates uncapped");
}

Test(core, full_jitter_stays_under_the_exponential_ceiling) {
  keel_backoff b;
  keel_backoff_full_jitter(&b, 100, 2.0, 1000);
  keel_rng rng;
  keel_rng_seed(&rng, 42);
  for (unsigned n = 1; n < 20; n++) {
    uint64_t ceiling = 100ull << (n - 1);
    if (ceiling > 1000 || n > 10) ceiling = 1000;
    for (int i = 0; i < 200; i++) cr_assert_leq(keel_backoff_delay(&b, n, 0, &rng), ceiling);
  }
  keel_rng r1, r2;
  keel_rng_seed(&r1, 3);
  keel_rng_seed(&r2, 3);
  for (unsigned n = 1; n < 10; n++)
    cr_assert_eq(keel_backoff_delay(&b, n, 0, &r1), keel_backoff_delay(&b, n, 0, &r2));
  cr_assert_eq(keel_backoff_delay(&b, 3, 0, NULL), 400, "without rng: the ceiling");
}

Test(core, decorrelated_jitter_follows_the_aws_formula) {
  keel_backoff b;
  keel_backoff_decorrelated_jitter(&b, 100, 5000);
  keel_rng rng;
  keel_rng_seed(&rng, 9);
  uint64_t prev = 0;
  for (unsigned n = 1; n < 200; n++) {
    uint64_t d = keel_backoff_delay(&b, n, prev, &rng);
    uint64_t high = (prev < 100 ? 100 : prev) * 3;
    cr_assert_geq(d, 100);
    cr_assert_leq(d, high < 5000 ? high : 5000);
    prev = d;
  }
}

Test(core, backoff_validation) {
  keel_backoff b;
  const char *why = NULL;
  keel_backoff_exponential(&b, 100, 0.5, 0);
  cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL);
  cr_assert_not_null(why);
  keel_backoff_exponential(&b, 100, 2, 50);
  cr_assert_eq(keel_backoff_validate(&b, &why), UV_EINVAL);
  b.kind = (keel_backoff_kind)99;
  cr_assert_eq(keel_backoff_validate(&b, NULL), UV_EINVAL);
  cr_assert_eq(keel_backoff_validate(NULL, &why), UV_EINVAL);
  keel_backoff_full_jitter(&b, 100, 2, 1000);
  cr_assert_eq(keel_backoff_validate(&b, &why), 0);
  cr_assert_null(why);
}

/* ---- retry runner ----------------------------------------------------- */

typedef struct run {
  uv_loop_t loop;
  int fail_first; /* attempts that fail before success */
  int fail_status;
  bool report_later; /* report from a timer rather than inside the attempt */
  bool close_in_done;
  uv_timer_t later;
  keel_retry *r;
  unsigned attempts_seen;
  int done_calls;
  int status;
  unsigned attempts;
  uint64_t attempt_times[16];
} run;

static void report_later_cb(uv_timer_t *t) {
  run *ctx = t->data;
  keel_retry_report(ctx->r, (int)ctx->attempts_seen <= ctx->fail_first ? ctx->fail_status : 0);
}

static void attempt(keel_retry *r, unsigned n, void *data) {
  run *ctx = data;
  ctx->r = r;
  cr_assert_eq(n, ctx->attempts_seen + 1);
  if (ctx->attempts_seen < 16) ctx->attempt_times[ctx->attempts_seen] = uv_now(&ctx->loop);
  ctx->attempts_seen = n;
  if (ctx->report_later) {
    uv_timer_start(&ctx->later, report_later_cb, 1, 0);
    return;
  }
  keel_retry_report(r, (int)n <= ctx->fail_first ? ctx->fail_status : 0);
}

static void done(keel_retry *r, int status, unsigned attempts, void *data) {
  run *ctx = data;
  ctx->done_calls++;
  ctx->status = status;
  ctx->attempts = attempts;
  if (ctx->close_in_done) keel_retry_close(r, NULL, NULL);
}

static void attempt_ok(keel_retry *r, unsigned n, void *data) {
  (void)n;
  (void)data;
  keel_retry_report(r, 0);
}

static void done_store(keel_retry *r, int status, unsigned attempts, void *data) {
  int *result = data;
  result[0] = status;
  result[1] = (int)attempts;
  keel_retry_close(r, NULL, NULL);
}

static void run_init(run *ctx) {
  memset(ctx, 0, sizeof *ctx);
  uv_loop_init(&ctx->loop);
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

static keel_retry_opts fast_opts(void) {
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_exponential(&o.backoff, 1, 2.0, 0);
  return o;
}

Test(retry, defaults_are_retry_with_backoff) {
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  cr_assert_eq(o.max_attempts, 4);
  cr_assert_eq(keel_backoff_delay(&o.backoff, 1, 0, NULL), 100);
  cr_assert_eq(keel_backoff_delay(&o.backoff, 2, 0, NULL), 200);
  cr_assert_eq(keel_backoff_delay(&o.backoff, 3, 0, NULL), 400);
}

Test(retry, success_on_first_attempt) {
  run ctx;
  run_init(&ctx);
  keel_retry_opts o = fast_opts();
  keel_retry *r;
  cr_assert_eq(keel_retry_start(&ctx.loop, &o, attempt, done, &ctx, &r), 0);
  cr_assert_eq(ctx.attempts_seen, 0, "attempt 1 never starts inside keel_retry_start");
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.attempts, 1);
  run_finish(&ctx);
}

Test(retry, success_after_failures_waits_the_backoff) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 2;
  ctx.report_later = true;
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_exponential(&o.backoff, 20, 2.0, 0);
  keel_retry *r;
  cr_assert_eq(keel_retry_start(&ctx.loop, &o, attempt, done, &ctx, &r), 0);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.status, 0);
  cr_assert_eq(ctx.attempts, 3);
  /* attempt 2 >= 20 ms after attempt 1's report, attempt 3 >= 40 ms after 2's */
  cr_assert_geq(ctx.attempt_times[1] - ctx.attempt_times[0], 20);
  cr_assert_geq(ctx.attempt_times[2] - ctx.attempt_times[1], 40);
  run_finish(&ctx);
}

Test(retry, attempts_run_out_with_last_status) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.fail_status = UV_ECONNREFUSED;
  keel_retry_opts o = fast_opts();
  o.max_attempts = 3;
  keel_retry *r;
  keel_retry_start(&ctx.loop, &o, attempt, done, &ctx, &r);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECONNREFUSED);
  cr_assert_eq(ctx.attempts, 3);
  run_finish(&ctx);
}

static int only_eagain(int status, void *data) {
  (void)data;
  return status == UV_EAGAIN;
}

Test(retry, classifier_stops_non_retryable) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.fail_status = UV_EPERM;
  keel_retry_opts o = fast_opts();
  o.classify = only_eagain;
  keel_retry *r;
  keel_retry_start(&ctx.loop, &o, attempt, done, &ctx, &r);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.status, UV_EPERM);
  cr_assert_eq(ctx.attempts, 1);
  run_finish(&ctx);
}

Test(retry, default_classifier_does_not_retry_aborted) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.fail_status = KEEL_EABORTED;
  keel_retry_opts o = fast_opts();
  keel_retry *r;
  keel_retry_start(&ctx.loop, &o, attempt, done, &ctx, &r);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.status, KEEL_EABORTED);
  cr_assert_eq(ctx.attempts, 1);
  run_finish(&ctx);
}

Test(retry, deadline_stops_retries) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_fixed(&o.backoff, 30);
  o.max_attempts = 100;
  o.deadline_ms = 100;
  keel_retry *r;
  keel_retry_start(&ctx.loop, &o, attempt, done, &ctx, &r);
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_EIO);
  cr_assert(ctx.attempts >= 2 && ctx.attempts <= 4, "attempts %u", ctx.attempts);
  run_finish(&ctx);
}

static void close_cb_count(void *object, void *data) {
  (void)object;
  (*(int *)data)++;
}

Test(retry, close_while_waiting_cancels_once) {
  run ctx;
  run_init(&ctx);
  ctx.fail_first = 100;
  ctx.close_in_done = false;
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_fixed(&o.backoff, 60000);
  keel_retry *r;
  keel_retry_start(&ctx.loop, &o, attempt, done, &ctx, &r);
  while (ctx.attempts_seen < 1) uv_run(&ctx.loop, UV_RUN_NOWAIT);
  cr_assert_eq(ctx.done_calls, 0);
  int closed = 0;
  keel_retry_close(r, close_cb_count, &closed);
  keel_retry_close(r, close_cb_count, &closed); /* idempotent */
  cr_assert_eq(ctx.done_calls, 1);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  cr_assert_eq(closed, 0, "close_cb is never called inside close");
  uv_run(&ctx.loop, UV_RUN_DEFAULT);
  cr_assert_eq(closed, 1);
  cr_assert_eq(ctx.done_calls, 1);
  run_finish(&ctx);
}

Test(retry, close_with_attempt_in_flight_waits_for_its_report) {
  run ctx;
  run_init(&ctx);
  ctx.report_later = true;
  ctx.close_in_done = false;
  keel_retry_opts o = fast_opts();
  keel_retry *r;
  keel_retry_start(&ctx.loop, &o, attempt, done, &ctx, &r);
  while (ctx.attempts_seen < 1) uv_run(&ctx.loop, UV_RUN_NOWAIT);
  int closed = 0;
  keel_retry_close(r, close_cb_count, &closed);
  cr_assert_eq(ctx.status, UV_ECANCELED);
  uv_run(&ctx.loop, UV_RUN_DEFAULT); /* the late report arrives and is ignored */
  cr_assert_eq(closed, 1);
  cr_assert_eq(ctx.done_calls, 1);
  run_finish(&ctx);
}

typedef struct sync_run {
  unsigned attempts;
  int status;
} sync_run;

static void always_fail(keel_retry *r, unsigned n, void *data) {
  ((sync_run *)data)->attempts = n;
  keel_retry_report(r, UV_EAGAIN);
}

static void sync_done(keel_retry *r, int status, unsigned attempts, void *data) {
  sync_run *s = data;
  s->status = status;
  s->attempts = attempts;
  keel_retry_close(r, NULL, NULL);
}

Test(retry, synchronous_reports_do_not_recurse) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_fixed(&o.backoff, 0);
  o.max_attempts = 100000;
  sync_run s = {0, 1};
  keel_retry *r;
  keel_retry_start(&loop, &o, always_fail, sync_done, &s, &r);
  uv_run(&loop, UV_RUN_DEFAULT);
  cr_assert_eq(s.status, UV_EAGAIN);
  cr_assert_eq(s.attempts, 100000);
  kt_loop_finish(&loop);
}

static uint64_t fake_clock_now(void *data) {
  return *(uint64_t *)data;
}

static void attempt_advance_clock(keel_retry *r, unsigned n, void *data) {
  (void)n;
  uint64_t *now = data;
  *now += 1000; /* each attempt "takes" one second of injected time */
  keel_retry_report(r, UV_EIO);
}

static void done_close(keel_retry *r, int status, unsigned attempts, void *data) {
  (void)data;
  cr_assert_eq(status, UV_EIO);
  cr_assert_eq(attempts, 3, "deadline 2500 ms of injected time allows 3 attempts");
  keel_retry_close(r, NULL, NULL);
}

Test(retry, injected_clock_drives_the_deadline) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  uint64_t now = 5000;
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_fixed(&o.backoff, 0);
  o.max_attempts = 50;
  o.deadline_ms = 2500;
  o.clock.now = fake_clock_now;
  o.clock.data = &now;
  keel_retry *r;
  /* attempt and done share `now` through data. */
  cr_assert_eq(keel_retry_start(&loop, &o, attempt_advance_clock, done_close, &now, &r), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  kt_loop_finish(&loop);
}

Test(retry, invalid_arguments) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_retry *r = (keel_retry *)0x1;
  cr_assert_eq(keel_retry_start(&loop, &o, NULL, done, NULL, &r), UV_EINVAL);
  cr_assert_eq(keel_retry_start(&loop, NULL, attempt, done, NULL, &r), UV_EINVAL);
  o.max_attempts = 0;
  cr_assert_eq(keel_retry_start(&loop, &o, attempt, done, NULL, &r), UV_EINVAL);
  keel_retry_opts_init(&o);
  o.backoff.factor = 0.1;
  cr_assert_eq(keel_retry_start(&loop, &o, attempt, done, NULL, &r), UV_EINVAL);
  cr_assert_eq(r, (keel_retry *)0x1, "out untouched on failure");
  cr_assert_eq(keel_retry_report(NULL, 0), UV_EINVAL);
  keel_retry_close(NULL, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(retry, allocation_failure_is_clean) {
  kt_alloc_install();
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_retry_opts o = fast_opts();
  keel_retry *r;
  kt_alloc_fail_after(0);
  cr_assert_eq(keel_retry_start(&loop, &o, attempt_ok, done_store, NULL, &r), UV_ENOMEM);
  kt_alloc_fail_after(-1);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
  kt_loop_finish(&loop);
}
