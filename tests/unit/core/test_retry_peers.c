/* What Polly's, cockatiel's and resilience4j's own retry tests expect:
 * retry on a result, linear backoff, percentage jitter, a delay generator
 * that honours the server's Retry-After, a retry budget (Envoy/Finagle),
 * the failed attempt's duration in the on_retry hook, and the old name
 * keel_retry_report() still working. Real loop, injected clock, no
 * sleeping (long delays are observed in the hooks, then the runner is
 * closed). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "keel/retry.h"
#include "support/harness.h"

typedef struct response {
  int code;
} response;

typedef struct t {
  uv_loop_t loop;
  keel_retry_opts opts;
  keel_retry *r;
  uint64_t now;
  /* behaviour */
  response responses[8]; /* attempt n reports responses[n-1] */
  int statuses[8];       /* and this status */
  uint64_t retry_after[8];
  uint64_t cost_ms;   /* the clock advances this much per attempt */
  bool close_in_hook; /* close from on_retry_info */
  bool use_old_name;
  /* observations */
  unsigned attempts;
  int done_calls, status;
  unsigned done_attempts;
  void *final_result;
  keel_retry_info infos[8];
  int info_count;
  uint64_t delays[8];
  int delay_count;
} t;

static uint64_t tnow(void *data) {
  return ((t *)data)->now;
}

static void attempt(keel_retry *r, unsigned n, void *data) {
  t *x = data;
  x->attempts = n;
  x->now += x->cost_ms;
  unsigned i = n - 1 < 8 ? n - 1 : 7;
  if (x->use_old_name)
    cr_assert_eq(keel_retry_report(r, x->statuses[i]), 0);
  else
    cr_assert_eq(keel_retry_done_ex(r, x->statuses[i], &x->responses[i], x->retry_after[i]), 0);
}

static void done(keel_retry *r, int status, unsigned attempts, void *data) {
  t *x = data;
  x->done_calls++;
  x->status = status;
  x->done_attempts = attempts;
  x->final_result = keel_retry_result(r);
  keel_retry_close(r, NULL, NULL);
}

static void on_info(keel_retry *r, const keel_retry_info *info, void *data) {
  t *x = data;
  if (x->info_count < 8) x->infos[x->info_count++] = *info;
  if (x->close_in_hook) keel_retry_close(r, NULL, NULL);
}

static void on_retry(keel_retry *r, unsigned next, int status, uint64_t delay_ms, void *data) {
  (void)r;
  (void)next;
  (void)status;
  t *x = data;
  if (x->delay_count < 8) x->delays[x->delay_count++] = delay_ms;
}

static int retry_503(int status, void *result, void *data) {
  (void)status;
  (void)data;
  return result != NULL && ((response *)result)->code == 503;
}

static void setup(t *x) {
  memset(x, 0, sizeof *x);
  cr_assert_eq(uv_loop_init(&x->loop), 0);
  keel_retry_opts_init(&x->opts);
  keel_backoff_fixed(&x->opts.backoff, 0);
  x->opts.clock.now = tnow;
  x->opts.clock.data = x;
  x->opts.on_retry_info = on_info;
  x->opts.on_retry = on_retry;
  x->opts.seed = 42;
  for (int i = 0; i < 8; i++) x->responses[i].code = 200;
}

static void run(t *x) {
  cr_assert_eq(keel_retry_start(&x->loop, &x->opts, attempt, done, x, &x->r), 0);
  uv_run(&x->loop, UV_RUN_DEFAULT);
  cr_assert_eq(uv_loop_close(&x->loop), 0);
}

Test(retry_peers, retries_on_a_result_then_returns_the_good_one) {
  /* Polly: HandleResult(r => r.StatusCode == 503). */
  t x;
  setup(&x);
  x.opts.retry_result = retry_503;
  x.responses[0].code = 503;
  x.responses[1].code = 503;
  run(&x);
  cr_expect_eq(x.done_calls, 1);
  cr_expect_eq(x.status, 0);
  cr_expect_eq(x.done_attempts, 3);
  cr_expect_eq(x.final_result, &x.responses[2]);
  cr_assert_eq(x.info_count, 2);
  cr_expect_eq(x.infos[0].status, 0);
  cr_expect_eq(x.infos[0].result, &x.responses[0]);
}

Test(retry_peers, a_result_still_bad_after_the_last_attempt_is_eexhausted) {
  t x;
  setup(&x);
  x.opts.retry_result = retry_503;
  x.opts.max_attempts = 3;
  for (int i = 0; i < 8; i++) x.responses[i].code = 503;
  run(&x);
  cr_expect_eq(x.status, KEEL_EEXHAUSTED);
  cr_expect_eq(x.done_attempts, 3);
  cr_expect_eq(x.final_result, &x.responses[2], "the last outcome is handed back");
}

Test(retry_peers, a_result_the_predicate_accepts_is_not_retried) {
  t x;
  setup(&x);
  x.opts.retry_result = retry_503;
  x.responses[0].code = 404;
  run(&x);
  cr_expect_eq(x.status, 0);
  cr_expect_eq(x.done_attempts, 1);
}

Test(retry_peers, linear_backoff) {
  /* Polly v8: DelayBackoffType.Linear, 100 ms: 100, 200, 300. */
  keel_backoff b;
  keel_backoff_linear(&b, 100, 0);
  cr_assert_eq(keel_backoff_validate(&b, NULL), 0);
  cr_expect_eq(keel_backoff_delay(&b, 1, 0, NULL), 100);
  cr_expect_eq(keel_backoff_delay(&b, 2, 0, NULL), 200);
  cr_expect_eq(keel_backoff_delay(&b, 3, 0, NULL), 300);
  keel_backoff_linear(&b, 100, 250);
  cr_expect_eq(keel_backoff_delay(&b, 3, 0, NULL), 250, "capped");
  keel_backoff_linear(&b, 100, 0);
  b.factor = 0.5;
  cr_expect_eq(keel_backoff_delay(&b, 3, 0, NULL), 200, "100 * (1 + 0.5 * 2)");
  b.factor = -1;
  cr_expect_eq(keel_backoff_validate(&b, NULL), UV_EINVAL);
  keel_backoff_linear(&b, 1000, 0);
  cr_expect_eq(keel_backoff_delay(&b, 4000000000u, 0, NULL), 4000000000000ull, "no overflow");

  /* and through the runner */
  t x;
  setup(&x);
  keel_backoff_linear(&x.opts.backoff, 100, 0);
  x.opts.max_attempts = 4;
  x.close_in_hook = true; /* close at the first retry: no real waiting */
  for (int i = 0; i < 8; i++) x.statuses[i] = UV_EIO;
  run(&x);
  cr_assert_eq(x.info_count, 1);
  cr_expect_eq(x.infos[0].delay_ms, 100);
  cr_expect_eq(x.status, UV_ECANCELED);
}

Test(retry_peers, percentage_jitter_stays_within_its_band) {
  /* resilience4j randomizationFactor / Polly UseJitter: 1000 ms +-25 %. */
  uv_loop_t loop;
  uv_loop_init(&loop);
  uint64_t low = UINT64_MAX, high = 0;
  for (int i = 0; i < 200; i++) {
    t x;
    setup(&x);
    keel_backoff_fixed(&x.opts.backoff, 1000);
    x.opts.jitter = 0.25;
    x.opts.seed = (uint64_t)i + 1;
    x.close_in_hook = true;
    x.statuses[0] = UV_EIO;
    run(&x);
    cr_assert_eq(x.info_count, 1);
    uint64_t d = x.infos[0].delay_ms;
    cr_assert_geq(d, 750);
    cr_assert_leq(d, 1250);
    if (d < low) low = d;
    if (d > high) high = d;
  }
  cr_expect_lt(low, 850, "spread over the band");
  cr_expect_gt(high, 1150);
  cr_assert_eq(uv_loop_close(&loop), 0);

  t bad;
  setup(&bad);
  bad.opts.jitter = 1.5;
  keel_retry *r = (keel_retry *)&bad;
  cr_expect_eq(keel_retry_start(&bad.loop, &bad.opts, attempt, done, &bad, &r), UV_EINVAL);
  cr_expect_eq(r, (keel_retry *)&bad);
  cr_assert_eq(uv_loop_close(&bad.loop), 0);
}

Test(retry_peers, retry_after_hint_is_honoured_by_default) {
  t x;
  setup(&x);
  keel_backoff_fixed(&x.opts.backoff, 100);
  x.statuses[0] = UV_EIO;
  x.retry_after[0] = 5000;
  x.close_in_hook = true;
  run(&x);
  cr_assert_eq(x.info_count, 1);
  cr_expect_eq(x.infos[0].retry_after_ms, 5000);
  cr_expect_eq(x.infos[0].delay_ms, 5000, "never before the server's hint");
  cr_expect_eq(x.delays[0], 5000, "on_retry sees the same delay");
}

static uint64_t delay_gen(keel_retry *r, const keel_retry_info *info, void *data) {
  (void)r;
  (void)data;
  /* Polly: DelayGenerator reading the Retry-After header; none: stop. */
  if (info->retry_after_ms == 0) return UINT64_MAX;
  return info->retry_after_ms / 2;
}

Test(retry_peers, delay_generator_decides_the_delay_or_stops) {
  t x;
  setup(&x);
  keel_backoff_fixed(&x.opts.backoff, 100);
  x.opts.delay_fn = delay_gen;
  x.statuses[0] = UV_EIO;
  x.retry_after[0] = 3000;
  x.close_in_hook = true;
  run(&x);
  cr_assert_eq(x.info_count, 1);
  cr_expect_eq(x.infos[0].delay_ms, 1500);

  t y;
  setup(&y);
  y.opts.delay_fn = delay_gen;
  y.statuses[0] = UV_ECONNRESET;
  run(&y);
  cr_expect_eq(y.status, UV_ECONNRESET, "no hint: the generator stopped retrying");
  cr_expect_eq(y.done_attempts, 1);
  cr_expect_eq(y.info_count, 0);
}

Test(retry_peers, on_retry_gets_the_failed_attempts_duration) {
  t x;
  setup(&x);
  x.cost_ms = 37;
  x.statuses[0] = UV_EIO;
  x.statuses[1] = UV_ETIMEDOUT;
  run(&x);
  cr_expect_eq(x.status, 0);
  cr_assert_eq(x.info_count, 2);
  cr_expect_eq(x.infos[0].attempt, 1);
  cr_expect_eq(x.infos[0].status, UV_EIO);
  cr_expect_eq(x.infos[0].duration_ms, 37);
  cr_expect_eq(x.infos[1].attempt, 2);
  cr_expect_eq(x.infos[1].status, UV_ETIMEDOUT);
  cr_expect_eq(x.infos[1].duration_ms, 37);
}

Test(retry_peers, old_name_keel_retry_report_still_works) {
  t x;
  setup(&x);
  x.use_old_name = true;
  x.statuses[0] = UV_EIO;
  run(&x);
  cr_expect_eq(x.status, 0);
  cr_expect_eq(x.done_attempts, 2);
  cr_expect_null(x.final_result);
}

/* ---- budget --------------------------------------------------------------- */

typedef struct fleet {
  uv_loop_t loop;
  uint64_t now;
  unsigned attempts;
  int done_calls;
} fleet;

static uint64_t fleet_now(void *data) {
  return ((fleet *)data)->now;
}

static void failing_attempt(keel_retry *r, unsigned n, void *data) {
  (void)n;
  ((fleet *)data)->attempts++;
  keel_retry_done(r, UV_EIO);
}

static void fleet_done(keel_retry *r, int status, unsigned attempts, void *data) {
  (void)attempts;
  cr_assert_eq(status, UV_EIO);
  ((fleet *)data)->done_calls++;
  keel_retry_close(r, NULL, NULL);
}

Test(retry_peers, budget_caps_retries_at_a_share_of_calls) {
  /* Finagle RetryBudget / Envoy retry_budget: 100 calls that all fail,
   * 20 % may be retried (no minimum): 20 retries, 80 refused. */
  fleet f;
  memset(&f, 0, sizeof f);
  uv_loop_init(&f.loop);
  keel_retry_budget_opts bo;
  keel_retry_budget_opts_init(&bo);
  bo.min_retries = 0;
  bo.clock.now = fleet_now;
  bo.clock.data = &f;
  keel_retry_budget *budget;
  cr_assert_eq(keel_retry_budget_new(&f.loop, &bo, &budget), 0);
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_fixed(&o.backoff, 0);
  o.max_attempts = 3;
  o.budget = budget;
  for (int i = 0; i < 100; i++) {
    keel_retry *r;
    cr_assert_eq(keel_retry_start(&f.loop, &o, failing_attempt, fleet_done, &f, &r), 0);
  }
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_expect_eq(f.done_calls, 100);
  cr_expect_eq(f.attempts, 120);
  keel_retry_budget_stats st;
  keel_retry_budget_get_stats(budget, &st);
  cr_expect_eq(st.calls, 100);
  cr_expect_eq(st.retries, 20);
  cr_expect_geq(st.refused, 80);
  cr_expect_eq(st.window_calls, 100);
  /* the window slides: 10 s later nothing is left to spend */
  f.now += 10000;
  cr_expect_not(keel_retry_budget_try_retry(budget));
  keel_retry_budget_get_stats(budget, &st);
  cr_expect_eq(st.window_calls, 0);
  keel_retry_budget_record_call(budget);
  for (int i = 0; i < 5; i++) keel_retry_budget_record_call(budget);
  cr_expect(keel_retry_budget_try_retry(budget), "6 calls allow 1.2 retries");
  cr_expect_not(keel_retry_budget_try_retry(budget));
  keel_retry_budget_free(budget);
  cr_assert_eq(uv_loop_close(&f.loop), 0);
}

Test(retry_peers, budget_minimum_and_validation) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  uint64_t now = 0;
  keel_retry_budget_opts bo;
  keel_retry_budget_opts_init(&bo);
  bo.min_retries = 3;
  bo.ratio = 0;
  bo.clock.now = (keel_now_fn)NULL;
  keel_retry_budget *b = NULL;
  cr_assert_eq(keel_retry_budget_new(&loop, &bo, &b), 0);
  for (int i = 0; i < 3; i++) cr_expect(keel_retry_budget_try_retry(b));
  cr_expect_not(keel_retry_budget_try_retry(b));
  keel_retry_budget_free(b);
  (void)now;
  keel_retry_budget *untouched = (keel_retry_budget *)&bo;
  bo.ratio = -1;
  cr_expect_eq(keel_retry_budget_new(&loop, &bo, &untouched), UV_EINVAL);
  bo.ratio = 0.2;
  bo.window_ms = 5;
  cr_expect_eq(keel_retry_budget_new(&loop, &bo, &untouched), UV_EINVAL);
  cr_expect_eq(untouched, (keel_retry_budget *)&bo);
  cr_expect_not(keel_retry_budget_try_retry(NULL));
  keel_retry_budget_record_call(NULL);
  keel_retry_budget_free(NULL);
  cr_assert_eq(uv_loop_close(&loop), 0);
}

static void budget_alloc_scenario(void *arg) {
  (void)arg;
  fleet f;
  memset(&f, 0, sizeof f);
  cr_assert_eq(uv_loop_init(&f.loop), 0);
  keel_retry_budget_opts bo;
  keel_retry_budget_opts_init(&bo);
  keel_retry_budget *budget = NULL;
  int rc = keel_retry_budget_new(&f.loop, &bo, &budget);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    cr_assert_eq(uv_loop_close(&f.loop), 0);
    return;
  }
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  keel_backoff_fixed(&o.backoff, 0);
  o.max_attempts = 2;
  o.budget = budget;
  int started = 0;
  for (int i = 0; i < 3; i++) {
    keel_retry *r;
    if (keel_retry_start(&f.loop, &o, failing_attempt, fleet_done, &f, &r) == 0) started++;
  }
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(f.done_calls, started, "every started runner finished exactly once");
  keel_retry_budget_free(budget);
  cr_assert_eq(uv_loop_close(&f.loop), 0);
}

Test(retry_peers, allocation_failure_with_a_budget) {
  kt_failmalloc_run(budget_alloc_scenario, NULL);
  cr_expect_eq(kt_failmalloc_count(), 4, "the budget and three runners");
}
