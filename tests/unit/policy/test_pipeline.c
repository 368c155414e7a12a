/* Pipeline: each policy alone, every pair of policies in both orders, Polly's
 * timeout-inside/outside-retry semantics, hedging cancelling the loser
 * exactly once, the bulkhead under 4 threads, allocation failure, and close
 * from inside every callback. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/policy.h"
#include "support/harness.h"

#define FAIL_ST UV_EIO

enum beh {
  B_OK = 1,    /* reports 0 inside op */
  B_FAIL,      /* reports FAIL_ST inside op */
  B_HANG,      /* reports only when told to stop (inside the cancel callback) */
  B_SLOW_OK,   /* reports 0 after 30 ms */
  B_SLOW_FAIL, /* reports FAIL_ST after 30 ms */
  B_PARK,      /* keeps the attempt for the next B_FLUSH (reports when told to stop) */
  B_FLUSH      /* reports the parked attempt (0), then its own (0), inside op */
};

typedef struct world world;

typedef struct call {
  world *w;
  int id; /* for the log */
  int script[8];
  int nscript;
  int ops;
  int dones;
  keel_pipeline_result r;
  int cancels;
  int cancel_reason;
  int stale_reports;
  int late_ok; /* slow attempts reported after cancel */
} call;

typedef struct slow {
  uv_timer_t t;
  keel_attempt *a;
  call *c;
  int status;
  bool cancelled;
} slow;

struct world {
  uv_loop_t loop;
  uint64_t now;
  keel_pipeline *p;
  keel_breaker *b;
  keel_ratelimit *rl;
  int events[16];
  int closed;
  int slow_out;
  int close_in; /* close from inside this callback kind (see enum below) */
  int fallback_calls;
  bool in_execute;
  bool close_called;
  keel_attempt *parked; /* B_PARK */
  int log[1024][5];     /* what happened, in order (the flat path's test) */
  int nlog;
};

static void log_add(world *w, int what, int a, int b, int c, int d) {
  if (w->nlog >= 1024) return;
  int *e = w->log[w->nlog++];
  e[0] = what;
  e[1] = a;
  e[2] = b;
  e[3] = c;
  e[4] = d;
}

enum {
  IN_NONE = 0,
  IN_OP,
  IN_DONE,
  IN_CANCEL,
  IN_FALLBACK,
  IN_EVENT,
  IN_CLASSIFY,
  IN_SLOW,
  IN_BREAKER, /* the breaker's on_state_change / on_rejected */
  IN_CLOCK    /* the limiter's clock */
};

static world *g_w;
static uint64_t g_slow_ms = 30;
static int g_running, g_running_max; /* attempts in progress, seen by the test */

static uint64_t fake_now(void *data) {
  return ((world *)data)->now;
}

static void maybe_close(world *w, int where);

/* The limiter's clock, which may close the pipeline (IN_CLOCK). */
static uint64_t closing_now(void *data) {
  world *w = data;
  maybe_close(w, IN_CLOCK);
  return w->now;
}

static void on_closed(void *obj, void *data) {
  (void)obj;
  ((world *)data)->closed++;
}

static void maybe_close(world *w, int where) {
  if (w->close_in == where && !w->close_called && w->p != NULL) {
    w->close_called = true;
    keel_pipeline_close(w->p, on_closed, w);
  }
}

static void on_cancel(keel_attempt *a, int reason, void *data) {
  call *c = data;
  c->cancels++;
  c->cancel_reason = reason;
  log_add(c->w, 3, c->id, (int)keel_attempt_number(a), reason, 0);
  cr_assert_neq(keel_attempt_cancelled(a), 0);
  maybe_close(c->w, IN_CANCEL);
}

static void on_cancel_report(keel_attempt *a, int reason, void *data) {
  on_cancel(a, reason, data);
  call *c = data;
  int rc = keel_attempt_done(a, UV_ECANCELED);
  cr_assert_eq(rc, KEEL_ESTALE);
  c->stale_reports++;
}

static void slow_closed(uv_handle_t *h) {
  free(h);
}

static void on_park_cancel(keel_attempt *a, int reason, void *data) {
  call *c = data;
  if (c->w->parked == a) c->w->parked = NULL;
  on_cancel_report(a, reason, data);
}

static void on_slow(uv_timer_t *t) {
  slow *s = (slow *)t;
  world *w = s->c->w;
  g_running--;
  int rc = keel_attempt_done(s->a, s->status);
  if (rc == KEEL_ESTALE)
    s->c->late_ok++;
  else
    cr_assert_eq(rc, 0);
  w->slow_out--;
  maybe_close(w, IN_SLOW);
  uv_close((uv_handle_t *)t, slow_closed);
}

static void op(keel_attempt *a, void *data) {
  call *c = data;
  world *w = c->w;
  cr_assert(!w->in_execute, "op ran inside execute");
  int n = c->ops++;
  log_add(w, 1, c->id, (int)keel_attempt_number(a), 0, 0);
  cr_assert_eq(keel_attempt_number(a), (unsigned)c->ops > 0 ? keel_attempt_number(a) : 0);
  cr_assert_eq(keel_attempt_pipeline(a), w->p);
  cr_assert_eq(keel_attempt_cancelled(a), 0);
  int b = c->script[n < c->nscript ? n : c->nscript - 1];
  maybe_close(w, IN_OP);
  switch (b) {
    case B_OK:
      cr_assert_eq(keel_attempt_done(a, 0), 0);
      break;
    case B_FAIL:
      cr_assert_eq(keel_attempt_done(a, FAIL_ST), 0);
      break;
    case B_HANG:
      keel_attempt_on_cancel(a, on_cancel_report, c);
      break;
    case B_PARK:
      if (w->parked == NULL) {
        w->parked = a;
        keel_attempt_on_cancel(a, on_park_cancel, c);
      } else {
        cr_assert_eq(keel_attempt_done(a, 0), 0);
      }
      break;
    case B_FLUSH:
      if (w->parked != NULL) {
        keel_attempt *x = w->parked;
        w->parked = NULL;
        cr_assert_eq(keel_attempt_done(x, 0), 0);
      }
      cr_assert_eq(keel_attempt_done(a, 0), 0);
      break;
    default: {
      slow *s = calloc(1, sizeof *s);
      s->a = a;
      s->c = c;
      s->status = b == B_SLOW_OK ? 0 : FAIL_ST;
      uv_timer_init(&w->loop, &s->t);
      uv_timer_start(&s->t, on_slow, g_slow_ms, 0);
      if (++g_running > g_running_max) g_running_max = g_running;
      w->slow_out++;
      keel_attempt_on_cancel(a, on_cancel, c);
    }
  }
}

static void done(keel_pipeline *p, const keel_pipeline_result *r, void *data) {
  call *c = data;
  cr_assert(!c->w->in_execute, "done ran inside execute");
  cr_assert_eq(p, c->w->p);
  c->dones++;
  c->r = *r;
  log_add(c->w, 2, c->id, r->status, (int)r->attempts, r->policy);
  maybe_close(c->w, IN_DONE);
}

static void on_event(keel_pipeline *p, const keel_policy_event *ev, void *data) {
  world *w = data;
  (void)p;
  cr_assert(ev->kind > 0 && ev->kind < 16);
  w->events[ev->kind]++;
  /* (a cancel names the operation's place below the policies: -1 here) */
  log_add(w, 10 + (int)ev->kind, ev->kind == KEEL_EVENT_CANCEL ? -1 : (int)ev->policy,
          (int)ev->attempt, ev->status, (int)ev->delay_ms);
  maybe_close(w, IN_EVENT);
}

static int fallback_fn(keel_pipeline *p, int status, void *call_data, void *fb_data) {
  (void)p;
  (void)call_data;
  world *w = fb_data;
  w->fallback_calls++;
  log_add(w, 4, status, 0, 0, 0);
  maybe_close(w, IN_FALLBACK);
  return status == FAIL_ST || status == UV_ETIMEDOUT ? 7 : status;
}

static int classify(int status, void *data) {
  world *w = data;
  maybe_close(w, IN_CLASSIFY);
  return keel_retry_default_classify(status, NULL);
}

static void world_init(world *w) {
  memset(w, 0, sizeof *w);
  g_w = w;
  cr_assert_eq(uv_loop_init(&w->loop), 0);
  w->now = 1000;
}

static void make_breaker(world *w, uint32_t threshold) {
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  bo.failure_threshold = threshold;
  bo.clock.now = fake_now;
  bo.clock.data = w;
  cr_assert_eq(keel_breaker_new(&w->loop, &bo, &w->b), 0);
}

static void make_limiter(world *w, uint64_t burst) {
  keel_ratelimit_opts ro;
  keel_ratelimit_opts_init(&ro);
  ro.rate = 1;
  ro.burst = burst;
  ro.clock.now = fake_now;
  ro.clock.data = w;
  cr_assert_eq(keel_ratelimit_new(&w->loop, &ro, &w->rl), 0);
}

static void make_pipeline(world *w, const keel_policy *pols, size_t n) {
  keel_pipeline_opts o;
  keel_pipeline_opts_init(&o);
  o.policies = pols;
  o.npolicies = n;
  o.on_event = on_event;
  o.data = w;
  o.clock.now = fake_now;
  o.clock.data = w;
  cr_assert_eq(keel_pipeline_new(&w->loop, &o, &w->p), 0);
}

static void exec(world *w, call *c, const int *script, int n) {
  memset(c, 0, sizeof *c);
  c->w = w;
  for (int i = 0; i < n; i++) c->script[i] = script[i];
  c->nscript = n;
  w->in_execute = true;
  cr_assert_eq(keel_pipeline_execute(w->p, op, done, c), 0);
  w->in_execute = false;
  cr_assert_eq(c->ops, 0);
  cr_assert_eq(c->dones, 0);
}

static void world_finish(world *w) {
  if (!w->close_called) keel_pipeline_close(w->p, on_closed, w);
  w->close_called = true;
  keel_breaker_close(w->b, NULL, NULL);
  keel_ratelimit_close(w->rl, NULL, NULL);
  kt_loop_finish(&w->loop);
  cr_assert_eq(w->closed, 1);
  cr_assert_eq(w->slow_out, 0);
}

static void run(world *w) {
  uv_run(&w->loop, UV_RUN_DEFAULT);
}

static keel_retry_opts fast_retry(unsigned attempts) {
  keel_retry_opts ro;
  keel_retry_opts_init(&ro);
  keel_backoff_fixed(&ro.backoff, 1);
  ro.max_attempts = attempts;
  return ro;
}

/* ---- each policy alone -------------------------------------------------- */

Test(pipeline, bare_call_runs_later_and_passes_the_status) {
  world w;
  world_init(&w);
  make_pipeline(&w, NULL, 0);
  call c1, c2;
  exec(&w, &c1, (int[]){B_OK}, 1);
  exec(&w, &c2, (int[]){B_FAIL}, 1);
  run(&w);
  cr_assert_eq(c1.dones, 1);
  cr_assert_eq(c1.r.status, 0);
  cr_assert_eq(c1.r.attempts, 1);
  cr_assert_eq(c1.r.policy, -1);
  cr_assert_eq(c2.r.status, FAIL_ST);
  keel_pipeline_stats st;
  keel_pipeline_get_stats(w.p, &st);
  cr_assert_eq(st.calls, 2);
  cr_assert_eq(st.succeeded, 1);
  cr_assert_eq(st.failed, 1);
  cr_assert_eq(st.in_flight, 0);
  cr_assert_eq(st.attempts, 2);
  world_finish(&w);
}

Test(pipeline, bad_input) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_pipeline_opts o;
  keel_pipeline_opts_init(&o);
  cr_assert_eq(o.max_calls, 100000);
  const char *why = NULL;
  keel_policy_timeout(&pol, 0);
  o.policies = &pol;
  o.npolicies = 1;
  keel_pipeline *p = (keel_pipeline *)0x1;
  cr_assert_eq(keel_pipeline_new(&w.loop, &o, &p), UV_EINVAL);
  cr_assert_eq(p, (keel_pipeline *)0x1);
  cr_assert_eq(keel_pipeline_validate_opts(&o, &why), UV_EINVAL);
  cr_assert_str_eq(why, "timeout_ms must be > 0");
  keel_policy_breaker(&pol, NULL);
  cr_assert_eq(keel_pipeline_validate_opts(&o, &why), UV_EINVAL);
  keel_policy_hedging(&pol, 10, 17);
  cr_assert_eq(keel_pipeline_validate_opts(&o, &why), UV_EINVAL);
  keel_policy_bulkhead(&pol, 0, 1);
  cr_assert_eq(keel_pipeline_validate_opts(&o, &why), UV_EINVAL);
  keel_policy_retry(&pol, NULL);
  pol.u.retry.max_attempts = 0;
  cr_assert_eq(keel_pipeline_validate_opts(&o, &why), UV_EINVAL);
  pol.kind = (keel_policy_kind)99;
  cr_assert_eq(keel_pipeline_validate_opts(&o, &why), UV_EINVAL);
  cr_assert_str_eq(keel_policy_kind_name(KEEL_POLICY_HEDGING), "hedging");
  cr_assert_str_eq(keel_policy_kind_name((keel_policy_kind)99), "unknown");
  o.npolicies = 33;
  cr_assert_eq(keel_pipeline_validate_opts(&o, &why), UV_EINVAL);
  o.npolicies = 0;
  o.max_calls = 2;
  cr_assert_eq(keel_pipeline_new(&w.loop, &o, &w.p), 0);
  call c[3];
  cr_assert_eq(keel_pipeline_execute(NULL, op, done, &c[0]), UV_EINVAL);
  cr_assert_eq(keel_pipeline_execute(w.p, NULL, done, &c[0]), UV_EINVAL);
  cr_assert_eq(keel_pipeline_execute(w.p, op, NULL, &c[0]), UV_EINVAL);
  exec(&w, &c[0], (int[]){B_OK}, 1);
  exec(&w, &c[1], (int[]){B_OK}, 1);
  cr_assert_eq(keel_pipeline_execute(w.p, op, done, &c[2]), KEEL_EFULL);
  cr_assert_eq(keel_attempt_done(NULL, 0), UV_EINVAL);
  cr_assert_eq(keel_attempt_cancelled(NULL), UV_EINVAL);
  cr_assert_eq(keel_attempt_number(NULL), 0);
  keel_attempt_on_cancel(NULL, NULL, NULL);
  keel_pipeline_get_stats(NULL, NULL);
  keel_pipeline_close(NULL, NULL, NULL);
  run(&w);
  cr_assert_eq(c[0].dones + c[1].dones, 2);
  keel_pipeline_close(w.p, on_closed, &w);
  cr_assert_eq(keel_pipeline_execute(w.p, op, done, &c[2]), KEEL_ECLOSING);
  cr_assert_eq(keel_pipeline_execute_threadsafe(w.p, op, done, &c[2]), KEEL_ECLOSING);
  cr_assert_eq(w.closed, 0);
  kt_loop_finish(&w.loop);
  cr_assert_eq(w.closed, 1);
}

Test(pipeline, ratelimit_rejects_with_retry_after) {
  world w;
  world_init(&w);
  make_limiter(&w, 2);
  keel_policy pol;
  keel_policy_ratelimit(&pol, w.rl);
  make_pipeline(&w, &pol, 1);
  call c[3];
  for (int i = 0; i < 3; i++) exec(&w, &c[i], (int[]){B_OK}, 1);
  run(&w);
  cr_assert_eq(c[0].r.status, 0);
  cr_assert_eq(c[1].r.status, 0);
  cr_assert_eq(c[2].r.status, KEEL_ERATELIMIT);
  cr_assert_eq(c[2].r.policy, 0);
  cr_assert_eq(c[2].r.retry_after_ms, 1000);
  cr_assert_eq(c[2].r.attempts, 0);
  cr_assert_eq(c[2].ops, 0);
  cr_assert_eq(w.events[KEEL_EVENT_RATELIMITED], 1);
  w.now += 1000;
  exec(&w, &c[2], (int[]){B_OK}, 1);
  run(&w);
  cr_assert_eq(c[2].r.status, 0);
  world_finish(&w);
}

Test(pipeline, timeout_tells_the_attempt_to_stop_once) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_policy_timeout(&pol, 20);
  make_pipeline(&w, &pol, 1);
  call hang, fast;
  exec(&w, &hang, (int[]){B_HANG}, 1);
  exec(&w, &fast, (int[]){B_OK}, 1);
  run(&w);
  cr_assert_eq(hang.r.status, UV_ETIMEDOUT);
  cr_assert_eq(hang.r.policy, 0);
  cr_assert_eq(hang.cancels, 1);
  cr_assert_eq(hang.cancel_reason, UV_ETIMEDOUT);
  cr_assert_eq(hang.stale_reports, 1);
  cr_assert_eq(fast.r.status, 0);
  cr_assert_eq(fast.cancels, 0);
  cr_assert_eq(w.events[KEEL_EVENT_TIMEOUT], 1);
  cr_assert_eq(w.events[KEEL_EVENT_CANCEL], 1);
  world_finish(&w);
}

Test(pipeline, retry_until_success_and_not_on_fatal) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_retry_opts ro = fast_retry(4);
  ro.classify = classify;
  ro.classify_data = &w;
  keel_policy_retry(&pol, &ro);
  make_pipeline(&w, &pol, 1);
  call c1, c2, c3;
  exec(&w, &c1, (int[]){B_FAIL, B_FAIL, B_OK}, 3);
  exec(&w, &c2, (int[]){B_FAIL}, 1);
  exec(&w, &c3, (int[]){B_OK}, 1);
  c3.script[0] = B_OK;
  run(&w);
  cr_assert_eq(c1.r.status, 0);
  cr_assert_eq(c1.r.attempts, 3);
  cr_assert_eq(c1.ops, 3);
  cr_assert_eq(c2.r.status, FAIL_ST);
  cr_assert_eq(c2.r.attempts, 4);
  cr_assert_eq(c3.r.attempts, 1);
  cr_assert_eq(w.events[KEEL_EVENT_RETRY], 2 + 3);
  world_finish(&w);
}

static int fatal_classify(int status, void *data) {
  (void)data;
  return status != FAIL_ST;
}

Test(pipeline, retry_classify_says_no) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_retry_opts ro = fast_retry(4);
  ro.classify = fatal_classify;
  keel_policy_retry(&pol, &ro);
  make_pipeline(&w, &pol, 1);
  call c;
  exec(&w, &c, (int[]){B_FAIL}, 1);
  run(&w);
  cr_assert_eq(c.r.status, FAIL_ST);
  cr_assert_eq(c.r.attempts, 1);
  world_finish(&w);
}

static int retry_on_202(int status, void *result, void *data) {
  (void)result;
  (void)data;
  return status == 202;
}

static int accepted_then_ok_calls;
static void op_accepted_then_ok(keel_attempt *a, void *data) {
  call *c = data;
  c->ops++;
  accepted_then_ok_calls++;
  keel_attempt_done(a, c->ops == 1 ? 202 : 0);
}

Test(pipeline, retry_on_a_result_jitter_and_budget) {
  world w;
  world_init(&w);
  keel_retry_budget_opts bo;
  keel_retry_budget_opts_init(&bo);
  bo.ratio = 0;
  bo.min_retries = 1;
  keel_retry_budget *budget;
  cr_assert_eq(keel_retry_budget_new(&w.loop, &bo, &budget), 0);
  keel_policy pol;
  keel_retry_opts ro = fast_retry(3);
  ro.retry_result = retry_on_202;
  ro.jitter = 0.5;
  ro.budget = budget;
  keel_policy_retry(&pol, &ro);
  make_pipeline(&w, &pol, 1);
  call c1, c2;
  memset(&c1, 0, sizeof c1);
  c1.w = &w;
  cr_assert_eq(keel_pipeline_execute(w.p, op_accepted_then_ok, done, &c1), 0);
  run(&w);
  cr_assert_eq(c1.r.status, 0);
  cr_assert_eq(c1.r.attempts, 2, "retried on the 202 result");
  /* the budget (one retry per window) is spent: no retry now */
  memset(&c2, 0, sizeof c2);
  c2.w = &w;
  cr_assert_eq(keel_pipeline_execute(w.p, op_accepted_then_ok, done, &c2), 0);
  run(&w);
  cr_assert_eq(c2.r.status, 202);
  cr_assert_eq(c2.r.attempts, 1);
  world_finish(&w);
  keel_retry_budget_free(budget);
  keel_policy bad;
  ro.jitter = 2;
  keel_policy_retry(&bad, &ro);
  keel_pipeline_opts o;
  keel_pipeline_opts_init(&o);
  o.policies = &bad;
  o.npolicies = 1;
  cr_assert_eq(keel_pipeline_validate_opts(&o, NULL), UV_EINVAL);
}

Test(pipeline, breaker_opens_and_rejects) {
  world w;
  world_init(&w);
  make_breaker(&w, 2);
  keel_policy pol;
  keel_policy_breaker(&pol, w.b);
  make_pipeline(&w, &pol, 1);
  call c[3];
  for (int i = 0; i < 2; i++) {
    exec(&w, &c[i], (int[]){B_FAIL}, 1);
    run(&w);
    cr_assert_eq(c[i].r.status, FAIL_ST);
  }
  exec(&w, &c[2], (int[]){B_OK}, 1);
  run(&w);
  cr_assert_eq(c[2].r.status, KEEL_EOPEN);
  cr_assert_eq(c[2].r.policy, 0);
  cr_assert_eq(c[2].ops, 0);
  cr_assert_eq(w.events[KEEL_EVENT_BREAKER_REJECTED], 1);
  keel_pipeline_stats st;
  keel_pipeline_get_stats(w.p, &st);
  cr_assert_eq(st.breaker_rejected, 1);
  world_finish(&w);
}

Test(pipeline, fallback_replaces_a_failure) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_policy_fallback(&pol, fallback_fn, &w);
  make_pipeline(&w, &pol, 1);
  call c1, c2;
  exec(&w, &c1, (int[]){B_FAIL}, 1);
  exec(&w, &c2, (int[]){B_OK}, 1);
  run(&w);
  cr_assert_eq(c1.r.status, 7);
  cr_assert_eq(c1.r.policy, 0);
  cr_assert_eq(c2.r.status, 0);
  cr_assert_eq(w.fallback_calls, 1);
  world_finish(&w);
}

Test(pipeline, hedging_first_success_wins_and_loser_is_cancelled_once) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_policy_hedging(&pol, 10, 3);
  make_pipeline(&w, &pol, 1);
  call c;
  /* attempt 1 hangs, attempt 2 succeeds 30 ms later; attempt 3 (at 20 ms)
   * hangs: both hanging attempts are told to stop exactly once */
  exec(&w, &c, (int[]){B_HANG, B_SLOW_OK, B_HANG}, 3);
  run(&w);
  cr_assert_eq(c.dones, 1);
  cr_assert_eq(c.r.status, 0);
  cr_assert_eq(c.r.attempts, 3);
  cr_assert_eq(c.cancels, 2);
  cr_assert_eq(c.cancel_reason, UV_ECANCELED);
  cr_assert_eq(c.stale_reports, 2);
  cr_assert_eq(w.events[KEEL_EVENT_HEDGE], 2);
  world_finish(&w);
}

Test(pipeline, hedging_on_failure_only) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_policy_hedging(&pol, KEEL_HEDGE_ON_FAILURE, 2);
  make_pipeline(&w, &pol, 1);
  call c1, c2;
  exec(&w, &c1, (int[]){B_FAIL, B_OK}, 2);
  exec(&w, &c2, (int[]){B_FAIL, B_FAIL}, 2);
  run(&w);
  cr_assert_eq(c1.r.status, 0);
  cr_assert_eq(c1.r.attempts, 2);
  cr_assert_eq(c2.r.status, FAIL_ST);
  cr_assert_eq(c2.r.attempts, 2);
  cr_assert_eq(c1.cancels + c2.cancels, 0);
  world_finish(&w);
}

Test(pipeline, hedging_slow_loser_reports_late) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_policy_hedging(&pol, 0, 2); /* both at once */
  make_pipeline(&w, &pol, 1);
  call c;
  exec(&w, &c, (int[]){B_SLOW_FAIL, B_OK}, 2);
  run(&w);
  cr_assert_eq(c.r.status, 0);
  cr_assert_eq(c.cancels, 1);
  cr_assert_eq(c.late_ok, 1, "the loser's late report is stale");
  world_finish(&w);
}

Test(pipeline, bulkhead_limits_and_queue) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_policy_bulkhead(&pol, 2, 1);
  make_pipeline(&w, &pol, 1);
  call c[5];
  for (int i = 0; i < 5; i++) exec(&w, &c[i], (int[]){B_SLOW_OK}, 1);
  uv_run(&w.loop, UV_RUN_NOWAIT);
  keel_pipeline_stats st;
  keel_pipeline_get_stats(w.p, &st);
  cr_assert_eq(st.bulkhead_active, 2);
  cr_assert_eq(st.bulkhead_queued, 1);
  run(&w);
  int ok = 0, full = 0;
  for (int i = 0; i < 5; i++) {
    cr_assert_eq(c[i].dones, 1);
    if (c[i].r.status == 0) ok++;
    if (c[i].r.status == KEEL_EFULL) full++;
  }
  cr_assert_eq(ok, 3);
  cr_assert_eq(full, 2);
  keel_pipeline_get_stats(w.p, &st);
  cr_assert_eq(st.bulkhead_rejected, 2);
  cr_assert_eq(st.bulkhead_active_max, 2);
  cr_assert_eq(st.bulkhead_queued_max, 1);
  cr_assert_eq(st.bulkhead_active, 0);
  cr_assert_eq(w.events[KEEL_EVENT_BULKHEAD_QUEUED], 1);
  cr_assert_eq(w.events[KEEL_EVENT_BULKHEAD_REJECTED], 2);
  world_finish(&w);
}

static uint32_t hook_limit_value = 1;
static int hook_samples;
static uint32_t hook_limit(void *data) {
  (void)data;
  return hook_limit_value;
}
static void hook_sample(void *data, uint64_t d, int status, uint32_t in_flight) {
  (void)data;
  (void)d;
  (void)status;
  (void)in_flight;
  hook_samples++;
}

Test(pipeline, bulkhead_limit_hook) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_policy_bulkhead(&pol, 4, 10);
  pol.u.bulkhead.hook.limit = hook_limit;
  pol.u.bulkhead.hook.sample = hook_sample;
  hook_limit_value = 1;
  hook_samples = 0;
  make_pipeline(&w, &pol, 1);
  call c[3];
  for (int i = 0; i < 3; i++) exec(&w, &c[i], (int[]){B_SLOW_OK}, 1);
  run(&w);
  keel_pipeline_stats st;
  keel_pipeline_get_stats(w.p, &st);
  cr_assert_eq(st.bulkhead_active_max, 1);
  cr_assert_eq(hook_samples, 3);
  world_finish(&w);
}

Test(pipeline, bulkhead_follows_an_adaptive_limit) {
  world w;
  world_init(&w);
  keel_adaptive_opts ao;
  keel_adaptive_opts_init(&ao);
  ao.initial_limit = 2;
  ao.min_limit = 1;
  ao.max_limit = 2;
  keel_adaptive *lim;
  cr_assert_eq(keel_adaptive_new(&ao, &lim), 0);
  keel_policy pol;
  keel_policy_bulkhead(&pol, 8, 10);
  pol.u.bulkhead.adaptive = lim;
  make_pipeline(&w, &pol, 1);
  call c[6];
  for (int i = 0; i < 6; i++) exec(&w, &c[i], (int[]){B_SLOW_OK}, 1);
  run(&w);
  for (int i = 0; i < 6; i++) cr_assert_eq(c[i].r.status, 0);
  keel_pipeline_stats st;
  keel_pipeline_get_stats(w.p, &st);
  cr_assert_eq(st.bulkhead_active_max, 2, "the adaptive limit (2), not max_concurrent (8)");
  cr_assert_eq(st.bulkhead_queued_max, 4);
  keel_adaptive_stats as;
  keel_adaptive_get_stats(lim, &as);
  cr_assert_eq(as.acquired, 6);
  cr_assert_eq(as.in_flight, 0);
  cr_assert_eq(as.rejected, 0);
  world_finish(&w);
  keel_adaptive_free(lim);
}

/* ---- Polly's documented orders ------------------------------------------ */

Test(pipeline, timeout_inside_retry_bounds_each_attempt) {
  world w;
  world_init(&w);
  keel_policy pol[2];
  keel_retry_opts ro = fast_retry(3);
  keel_policy_retry(&pol[0], &ro);
  keel_policy_timeout(&pol[1], 10);
  make_pipeline(&w, pol, 2);
  call c;
  exec(&w, &c, (int[]){B_HANG, B_HANG, B_OK}, 3);
  run(&w);
  cr_assert_eq(c.r.status, 0, "a timed-out attempt is retried");
  cr_assert_eq(c.r.attempts, 3);
  cr_assert_eq(c.cancels, 2);
  world_finish(&w);
}

Test(pipeline, timeout_outside_retry_bounds_the_whole) {
  world w;
  world_init(&w);
  keel_policy pol[2];
  keel_retry_opts ro = fast_retry(100);
  keel_backoff_fixed(&ro.backoff, 5);
  keel_policy_timeout(&pol[0], 40);
  keel_policy_retry(&pol[1], &ro);
  make_pipeline(&w, pol, 2);
  call c;
  exec(&w, &c, (int[]){B_FAIL}, 1);
  run(&w);
  cr_assert_eq(c.r.status, UV_ETIMEDOUT, "the retries stop at the outer timeout");
  cr_assert_eq(c.r.policy, 0);
  cr_assert(c.r.attempts >= 2 && c.r.attempts < 100);
  world_finish(&w);
}

Test(pipeline, breaker_inside_retry_counts_every_attempt) {
  world w;
  world_init(&w);
  make_breaker(&w, 2);
  keel_policy pol[2];
  keel_retry_opts ro = fast_retry(4);
  keel_policy_retry(&pol[0], &ro);
  keel_policy_breaker(&pol[1], w.b);
  make_pipeline(&w, pol, 2);
  call c;
  exec(&w, &c, (int[]){B_FAIL}, 1);
  run(&w);
  /* two failures open the breaker; the retries then get KEEL_EOPEN */
  cr_assert_eq(c.ops, 2);
  cr_assert_eq(c.r.status, KEEL_EOPEN);
  cr_assert_eq(c.r.policy, 1);
  world_finish(&w);
}

Test(pipeline, breaker_outside_retry_counts_the_final_result) {
  world w;
  world_init(&w);
  make_breaker(&w, 2);
  keel_policy pol[2];
  keel_retry_opts ro = fast_retry(4);
  keel_policy_breaker(&pol[0], w.b);
  keel_policy_retry(&pol[1], &ro);
  make_pipeline(&w, pol, 2);
  call c;
  exec(&w, &c, (int[]){B_FAIL}, 1);
  run(&w);
  cr_assert_eq(c.ops, 4);
  cr_assert_eq(c.r.status, FAIL_ST);
  cr_assert_eq(keel_breaker_get_state(w.b), KEEL_BREAKER_CLOSED, "one failure counted");
  world_finish(&w);
}

Test(pipeline, retry_honours_the_limiters_retry_after) {
  world w;
  world_init(&w);
  make_limiter(&w, 1);
  keel_policy pol[2];
  keel_retry_opts ro = fast_retry(2);
  keel_policy_retry(&pol[0], &ro);
  keel_policy_ratelimit(&pol[1], w.rl);
  make_pipeline(&w, pol, 2);
  call c1, c2;
  exec(&w, &c1, (int[]){B_OK}, 1);
  exec(&w, &c2, (int[]){B_OK}, 1);
  uv_run(&w.loop, UV_RUN_NOWAIT);
  uv_run(&w.loop, UV_RUN_NOWAIT);
  cr_assert_eq(w.events[KEEL_EVENT_RETRY], 1);
  /* the retry waits the limiter's 1000 ms, not the backoff's 1 ms */
  w.now += 1000; /* the limiter's clock */
  run(&w);
  cr_assert_eq(c1.r.status, 0);
  cr_assert_eq(c2.r.status, 0);
  cr_assert_eq(c2.r.attempts, 1);
  world_finish(&w);
}

/* ---- every pair of policies in both orders ------------------------------ */

static void fill_policy(world *w, keel_policy *pol, int kind) {
  switch (kind) {
    case KEEL_POLICY_RATELIMIT:
      keel_policy_ratelimit(pol, w->rl);
      break;
    case KEEL_POLICY_TIMEOUT:
      keel_policy_timeout(pol, 15);
      break;
    case KEEL_POLICY_RETRY: {
      keel_retry_opts ro = fast_retry(3);
      keel_policy_retry(pol, &ro);
      break;
    }
    case KEEL_POLICY_BREAKER:
      keel_policy_breaker(pol, w->b);
      break;
    case KEEL_POLICY_FALLBACK:
      keel_policy_fallback(pol, fallback_fn, w);
      break;
    case KEEL_POLICY_HEDGING:
      keel_policy_hedging(pol, 5, 2);
      break;
    case KEEL_POLICY_BULKHEAD:
      keel_policy_bulkhead(pol, 2, 2);
      break;
  }
}

#define NCALLS 8
static const int pair_scripts[NCALLS][3] = {
    {B_OK, B_OK, B_OK},       {B_FAIL, B_OK, B_OK},
    {B_FAIL, B_FAIL, B_FAIL}, {B_HANG, B_OK, B_OK},
    {B_SLOW_OK, B_OK, B_OK},  {B_SLOW_FAIL, B_OK, B_OK},
    {B_HANG, B_HANG, B_HANG}, {B_SLOW_FAIL, B_SLOW_FAIL, B_SLOW_FAIL},
};

/* Runs the eight scripted calls through (a, b) and checks what holds for
 * every pair: one done per call, every attempt reports and is told to stop
 * at most once, only the documented statuses, the loop ends clean. */
static void run_pair(int ka, int kb, int close_in) {
  world w;
  world_init(&w);
  w.close_in = close_in;
  make_breaker(&w, 100);
  make_limiter(&w, NCALLS - 1);
  keel_policy pol[2];
  fill_policy(&w, &pol[0], ka);
  fill_policy(&w, &pol[1], kb);
  make_pipeline(&w, pol, 2);
  call c[NCALLS];
  for (int i = 0; i < NCALLS; i++) exec(&w, &c[i], pair_scripts[i], 3);
  run(&w);
  if (close_in == IN_NONE) {
    keel_pipeline_stats st;
    keel_pipeline_get_stats(w.p, &st);
    cr_assert_eq(st.calls, NCALLS);
    /* calls whose attempts hang with nothing to stop them wait for the close */
    cr_assert_eq(st.succeeded + st.failed + st.in_flight, NCALLS, "pair %s,%s: %llu + %llu",
                 keel_policy_kind_name(ka), keel_policy_kind_name(kb),
                 (unsigned long long)st.succeeded, (unsigned long long)st.failed);
  }
  world_finish(&w);
  bool has_timeout = ka == KEEL_POLICY_TIMEOUT || kb == KEEL_POLICY_TIMEOUT;
  bool has_hedge = ka == KEEL_POLICY_HEDGING || kb == KEEL_POLICY_HEDGING;
  bool has_bulkhead = ka == KEEL_POLICY_BULKHEAD || kb == KEEL_POLICY_BULKHEAD;
  for (int i = 0; i < NCALLS; i++) {
    cr_assert_eq(c[i].dones, 1, "pair %s,%s call %d: %d dones", keel_policy_kind_name(ka),
                 keel_policy_kind_name(kb), i, c[i].dones);
    cr_assert(c[i].cancels <= c[i].ops);
    int st = c[i].r.status;
    cr_assert(st == 0 || st == 7 || st == FAIL_ST || st == UV_ETIMEDOUT || st == KEEL_ERATELIMIT ||
                  st == KEEL_EFULL || st == UV_ECANCELED,
              "pair %s,%s call %d: status %d", keel_policy_kind_name(ka), keel_policy_kind_name(kb),
              i, st);
    if (close_in != IN_NONE) continue;
    if (i == 0 && ka != KEEL_POLICY_BULKHEAD && kb != KEEL_POLICY_BULKHEAD)
      cr_assert_eq(st, 0, "pair %s,%s: the happy call", keel_policy_kind_name(ka),
                   keel_policy_kind_name(kb));
    /* a hanging attempt ends only by a timeout or a hedged sibling */
    if (i == 6 && !has_timeout && !has_hedge)
      cr_assert(st == UV_ECANCELED || (st == KEEL_EFULL && has_bulkhead), "pair %s,%s: %d",
                keel_policy_kind_name(ka), keel_policy_kind_name(kb), st);
    /* a hanging attempt under a timeout ends with the timeout (or a
     * fallback's value) unless a hedged sibling or the bulkhead decided */
    if (i == 6 && has_timeout && !has_hedge && !has_bulkhead)
      cr_assert(st == UV_ETIMEDOUT || st == 7, "pair %s,%s: %d", keel_policy_kind_name(ka),
                keel_policy_kind_name(kb), st);
  }
}

Test(pipeline, every_pair_in_both_orders, .timeout = 240) {
  for (int a = KEEL_POLICY_RATELIMIT; a <= KEEL_POLICY_BULKHEAD; a++)
    for (int b = KEEL_POLICY_RATELIMIT; b <= KEEL_POLICY_BULKHEAD; b++)
      if (a != b) run_pair(a, b, IN_NONE);
}

/* ---- close from inside every callback ----------------------------------- */

Test(pipeline, close_from_inside_every_callback, .timeout = 240) {
  static const int pairs[][2] = {
      {KEEL_POLICY_TIMEOUT, KEEL_POLICY_HEDGING},   {KEEL_POLICY_FALLBACK, KEEL_POLICY_RETRY},
      {KEEL_POLICY_RETRY, KEEL_POLICY_TIMEOUT},     {KEEL_POLICY_BULKHEAD, KEEL_POLICY_BREAKER},
      {KEEL_POLICY_RATELIMIT, KEEL_POLICY_HEDGING}, {KEEL_POLICY_HEDGING, KEEL_POLICY_BULKHEAD},
  };
  for (int where = IN_OP; where <= IN_SLOW; where++)
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++)
      run_pair(pairs[i][0], pairs[i][1], where);
}

Test(pipeline, close_from_classify) {
  world w;
  world_init(&w);
  w.close_in = IN_CLASSIFY;
  keel_policy pol;
  keel_retry_opts ro = fast_retry(4);
  ro.classify = classify;
  ro.classify_data = &w;
  keel_policy_retry(&pol, &ro);
  make_pipeline(&w, &pol, 1);
  call c;
  exec(&w, &c, (int[]){B_FAIL}, 1);
  kt_loop_finish(&w.loop);
  cr_assert_eq(w.closed, 1);
  cr_assert_eq(c.dones, 1);
  cr_assert_eq(c.ops, 1, "no attempt after the close");
  cr_assert(c.r.status == FAIL_ST || c.r.status == UV_ECANCELED);
}

Test(pipeline, close_with_calls_not_started) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_policy_timeout(&pol, 1000);
  make_pipeline(&w, &pol, 1);
  call c1, c2;
  exec(&w, &c1, (int[]){B_OK}, 1);
  uv_run(&w.loop, UV_RUN_NOWAIT);
  exec(&w, &c2, (int[]){B_HANG}, 1);
  keel_pipeline_close(w.p, on_closed, &w);
  keel_pipeline_close(w.p, on_closed, &w);
  cr_assert_eq(c2.dones, 0);
  kt_loop_finish(&w.loop);
  cr_assert_eq(w.closed, 1);
  cr_assert_eq(c2.dones, 1);
  cr_assert_eq(c2.r.status, UV_ECANCELED);
  cr_assert_eq(c2.ops, 0);
}

Test(pipeline, close_waits_for_a_hanging_attempt) {
  world w;
  world_init(&w);
  make_pipeline(&w, NULL, 0);
  call c;
  exec(&w, &c, (int[]){B_HANG}, 1);
  uv_run(&w.loop, UV_RUN_NOWAIT);
  cr_assert_eq(c.ops, 1);
  keel_pipeline_close(w.p, on_closed, &w);
  kt_loop_finish(&w.loop);
  cr_assert_eq(c.dones, 1);
  cr_assert_eq(c.r.status, UV_ECANCELED);
  cr_assert_eq(c.cancels, 1, "told to stop once by the close");
  cr_assert_eq(c.stale_reports, 1);
  cr_assert_eq(w.closed, 1);
}

/* ---- the flat path against the general one -------------------------------
 *
 * A pipeline of rate limit, timeout, retry, breaker and fallback only runs
 * its calls on a flat path (src/policy/pipeline.c, flat_run()); an innermost
 * bulkhead that never fills keeps the same policies on the general path.
 * Both must do the same things in the same order: operations, reports,
 * cancellations, events, fallbacks, the breaker's hooks, results, stats,
 * also when the pipeline is closed from inside any callback. */

static void breaker_state_hook(keel_breaker *b, keel_breaker_state from, keel_breaker_state to,
                               void *data) {
  (void)b;
  world *w = data;
  log_add(w, 5, (int)from, (int)to, 0, 0);
  maybe_close(w, IN_BREAKER);
}

static void breaker_reject_hook(keel_breaker *b, keel_breaker_state state, void *data) {
  (void)b;
  world *w = data;
  log_add(w, 6, (int)state, 0, 0, 0);
  maybe_close(w, IN_BREAKER);
}

#define DIFF_CALLS 10
static const int diff_scripts[DIFF_CALLS][3] = {
    {B_OK, B_OK, B_OK},      {B_PARK, B_OK, B_OK},        {B_FLUSH, B_OK, B_OK},
    {B_FAIL, B_OK, B_OK},    {B_FAIL, B_FAIL, B_FAIL},    {B_HANG, B_OK, B_OK},
    {B_SLOW_OK, B_OK, B_OK}, {B_SLOW_FAIL, B_FAIL, B_OK}, {B_FAIL, B_FAIL, B_FAIL},
    {B_OK, B_OK, B_OK},
};

/* Retries the operation's failure and timeouts, not the limiter's or the
 * breaker's answers: no retry waits for a timer that could race with the
 * loop's passes (the backoff is 0), so both runs see the same order. */
static int diff_classify(int status, void *data) {
  world *w = data;
  log_add(w, 30, status, 0, 0, 0);
  maybe_close(w, IN_CLASSIFY);
  return status == FAIL_ST || status == UV_ETIMEDOUT;
}

static void diff_policy(world *w, keel_policy *pol, int kind) {
  if (kind == KEEL_POLICY_RETRY) {
    keel_retry_opts ro = fast_retry(3);
    keel_backoff_fixed(&ro.backoff, 0);
    ro.classify = diff_classify;
    ro.classify_data = w;
    keel_policy_retry(pol, &ro);
  } else {
    fill_policy(w, pol, kind);
  }
}

/* Runs the scripted calls through kinds (general: with the innermost
 * bulkhead) and logs what happened into w. */
static void run_diff(world *w, const int *kinds, size_t n, bool general, int close_in) {
  world_init(w);
  w->close_in = close_in;
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  bo.failure_threshold = 3;
  bo.on_state_change = breaker_state_hook;
  bo.on_rejected = breaker_reject_hook;
  bo.data = w;
  bo.clock.now = fake_now;
  bo.clock.data = w;
  cr_assert_eq(keel_breaker_new(&w->loop, &bo, &w->b), 0);
  keel_ratelimit_opts ro;
  keel_ratelimit_opts_init(&ro);
  ro.rate = 1;
  ro.burst = DIFF_CALLS - 2;
  ro.clock.now = closing_now;
  ro.clock.data = w;
  cr_assert_eq(keel_ratelimit_new(&w->loop, &ro, &w->rl), 0);
  keel_policy pol[8];
  for (size_t i = 0; i < n; i++) diff_policy(w, &pol[i], kinds[i]);
  if (general) keel_policy_bulkhead(&pol[n], 1000, 0);
  make_pipeline(w, pol, n + (general ? 1 : 0));
  call c[DIFF_CALLS];
  for (int i = 0; i < DIFF_CALLS; i++) {
    exec(w, &c[i], diff_scripts[i], 3);
    c[i].id = i;
  }
  run(w);
  if (!w->close_called) { /* (closed from inside: freed by now) */
    keel_pipeline_stats st;
    keel_pipeline_get_stats(w->p, &st);
    log_add(w, 7, (int)st.calls, (int)st.succeeded, (int)st.failed, (int)st.attempts);
    log_add(w, 8, (int)st.ratelimited, (int)st.timeouts, (int)st.retries, (int)st.breaker_rejected);
    log_add(w, 9, (int)st.fallbacks, (int)st.cancels, (int)st.in_flight, 0);
    w->close_called = true;
    keel_pipeline_close(w->p, on_closed, w);
  }
  run(w); /* the pipeline's close: every permit and token given back */
  cr_assert_eq(w->closed, 1);
  keel_breaker_stats bs;
  keel_breaker_get_stats(w->b, &bs);
  log_add(w, 20, (int)bs.state, (int)bs.calls_permitted, (int)bs.calls_rejected,
          (int)bs.calls_succeeded);
  log_add(w, 21, (int)bs.calls_failed, (int)bs.calls_ignored, (int)bs.state_changes,
          (int)bs.probes_in_flight);
  keel_ratelimit_stats rs;
  keel_ratelimit_get_stats(w->rl, &rs);
  log_add(w, 22, (int)rs.allowed, (int)rs.rejected, (int)rs.available, 0);
  world_finish(w);
  for (int i = 0; i < DIFF_CALLS; i++) cr_assert_eq(c[i].dones, 1);
}

static void diff_one(const int *kinds, size_t n, int close_in) {
  static world flat, general; /* large: not on the stack */
  run_diff(&flat, kinds, n, false, close_in);
  run_diff(&general, kinds, n, true, close_in);
  char name[128] = "";
  for (size_t i = 0; i < n; i++) {
    size_t len = strlen(name);
    snprintf(name + len, sizeof name - len, "%s%s", i ? "," : "", keel_policy_kind_name(kinds[i]));
  }
  cr_assert(flat.nlog < 1024);
  if (getenv("DIFF_DUMP") != NULL)
    for (int i = 0; i < flat.nlog || i < general.nlog; i++)
      fprintf(stderr, "%3d: %3d %3d %6d %6d %3d | %3d %3d %6d %6d %3d\n", i, flat.log[i][0],
              flat.log[i][1], flat.log[i][2], flat.log[i][3], flat.log[i][4], general.log[i][0],
              general.log[i][1], general.log[i][2], general.log[i][3], general.log[i][4]);
  for (int i = 0; i < flat.nlog && i < general.nlog; i++)
    cr_assert(memcmp(flat.log[i], general.log[i], sizeof flat.log[i]) == 0,
              "%s (close in %d), entry %d: flat %d %d %d %d %d, general %d %d %d %d %d", name,
              close_in, i, flat.log[i][0], flat.log[i][1], flat.log[i][2], flat.log[i][3],
              flat.log[i][4], general.log[i][0], general.log[i][1], general.log[i][2],
              general.log[i][3], general.log[i][4]);
  cr_assert_eq(flat.nlog, general.nlog, "%s (close in %d)", name, close_in);
}

Test(pipeline, flat_path_does_what_the_general_one_does, .timeout = 240) {
  static const int k[] = {KEEL_POLICY_RATELIMIT, KEEL_POLICY_TIMEOUT, KEEL_POLICY_RETRY,
                          KEEL_POLICY_BREAKER, KEEL_POLICY_FALLBACK};
  /* every ordered choice of three of the five */
  for (int a = 0; a < 5; a++)
    for (int b = 0; b < 5; b++)
      for (int c = 0; c < 5; c++)
        if (a != b && b != c && a != c) diff_one((int[]){k[a], k[b], k[c]}, 3, IN_NONE);
  /* the benchmark's four, in both directions, and all five */
  diff_one((int[]){k[0], k[1], k[2], k[3]}, 4, IN_NONE);
  diff_one((int[]){k[3], k[2], k[1], k[0]}, 4, IN_NONE);
  diff_one((int[]){k[4], k[0], k[1], k[2], k[3]}, 5, IN_NONE);
  diff_one((int[]){k[1], k[3], k[4], k[2], k[0]}, 5, IN_NONE);
  diff_one(NULL, 0, IN_NONE);
}

Test(pipeline, flat_path_closed_from_inside_every_callback, .timeout = 240) {
  static const int lists[][5] = {
      {KEEL_POLICY_RATELIMIT, KEEL_POLICY_TIMEOUT, KEEL_POLICY_RETRY, KEEL_POLICY_BREAKER,
       KEEL_POLICY_FALLBACK},
      {KEEL_POLICY_FALLBACK, KEEL_POLICY_BREAKER, KEEL_POLICY_RETRY, KEEL_POLICY_TIMEOUT,
       KEEL_POLICY_RATELIMIT},
      {KEEL_POLICY_TIMEOUT, KEEL_POLICY_BREAKER, KEEL_POLICY_RATELIMIT, KEEL_POLICY_FALLBACK,
       KEEL_POLICY_RETRY},
  };
  for (int where = IN_OP; where <= IN_CLOCK; where++)
    for (size_t i = 0; i < sizeof lists / sizeof lists[0]; i++) diff_one(lists[i], 5, where);
}

/* ---- bulkhead under 4 threads pushing through the thread-safe path ------ */

#define TS_THREADS 4
#define TS_PER_THREAD 400

typedef struct ts_arg {
  world *w;
  call *calls;
  int accepted;
  int full;
} ts_arg;

static void noop_timer(uv_timer_t *t) {
  (void)t;
}

static void ts_thread(void *arg) {
  ts_arg *t = arg;
  for (int i = 0; i < TS_PER_THREAD; i++) {
    call *c = &t->calls[i];
    memset(c, 0, sizeof *c);
    c->w = t->w;
    c->script[0] = B_SLOW_OK;
    c->nscript = 1;
    int rc = keel_pipeline_execute_threadsafe(t->w->p, op, done, c);
    if (rc == 0) {
      t->accepted++;
    } else {
      cr_assert_eq(rc, KEEL_EFULL);
      t->full++;
    }
    if (i % 50 == 0) uv_sleep(1);
  }
}

Test(pipeline, bulkhead_limits_hold_under_4_threads, .timeout = 120) {
  world w;
  world_init(&w);
  keel_policy pol;
  keel_policy_bulkhead(&pol, 3, 5);
  keel_pipeline_opts o;
  keel_pipeline_opts_init(&o);
  o.policies = &pol;
  o.npolicies = 1;
  cr_assert_eq(keel_pipeline_new(&w.loop, &o, &w.p), 0);
  g_slow_ms = 1;
  g_running = g_running_max = 0;
  static call calls[TS_THREADS][TS_PER_THREAD];
  ts_arg args[TS_THREADS];
  uv_thread_t th[TS_THREADS];
  for (int i = 0; i < TS_THREADS; i++) {
    args[i] = (ts_arg){&w, calls[i], 0, 0};
    cr_assert_eq(uv_thread_create(&th[i], ts_thread, &args[i]), 0);
  }
  /* keep the loop turning while the threads push */
  uv_timer_t keep;
  uv_timer_init(&w.loop, &keep);
  uv_timer_start(&keep, noop_timer, 2, 2);
  for (int spins = 0; spins < 20000; spins++) {
    uv_run(&w.loop, UV_RUN_ONCE);
    keel_pipeline_stats st;
    keel_pipeline_get_stats(w.p, &st);
    cr_assert_leq(st.bulkhead_active, 3);
    cr_assert_leq(st.bulkhead_queued, 5);
    if (spins > 10 && st.calls > 0 && st.in_flight == 0 && g_running == 0) {
      int total = 0;
      for (int i = 0; i < TS_THREADS; i++) total += args[i].accepted + args[i].full;
      if (total == TS_THREADS * TS_PER_THREAD) break;
    }
    uv_timer_start(&keep, noop_timer, 1, 0);
  }
  for (int i = 0; i < TS_THREADS; i++) uv_thread_join(&th[i]);
  uv_run(&w.loop, UV_RUN_DEFAULT);
  uv_close((uv_handle_t *)&keep, NULL);
  g_slow_ms = 30;
  int accepted = 0, ok = 0, full = 0;
  for (int i = 0; i < TS_THREADS; i++) {
    accepted += args[i].accepted;
    for (int j = 0; j < TS_PER_THREAD; j++) {
      call *c = &calls[i][j];
      cr_assert_leq(c->dones, 1);
      if (c->dones == 1 && c->r.status == 0) ok++;
      if (c->dones == 1 && c->r.status == KEEL_EFULL) full++;
    }
  }
  cr_assert_eq(ok + full, accepted, "every accepted push is answered once");
  cr_assert_gt(ok, 0);
  cr_assert_leq(g_running_max, 3, "never more than 3 attempts at once");
  keel_pipeline_stats st;
  keel_pipeline_get_stats(w.p, &st);
  cr_assert_leq(st.bulkhead_active_max, 3);
  cr_assert_leq(st.bulkhead_queued_max, 5);
  cr_assert_eq(st.bulkhead_rejected, (uint64_t)full);
  world_finish(&w);
}

/* ---- allocation failure --------------------------------------------------- */

static void failmalloc_scenario(void *arg) {
  (void)arg;
  world w;
  world_init(&w);
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  if (keel_breaker_new(&w.loop, &bo, &w.b) != 0) w.b = NULL;
  keel_ratelimit_opts ro;
  keel_ratelimit_opts_init(&ro);
  if (keel_ratelimit_new(&w.loop, &ro, &w.rl) != 0) w.rl = NULL;
  if (w.b == NULL || w.rl == NULL) {
    keel_breaker_close(w.b, NULL, NULL);
    keel_ratelimit_close(w.rl, NULL, NULL);
    kt_loop_finish(&w.loop);
    return;
  }
  keel_policy pol[7];
  for (int k = KEEL_POLICY_RATELIMIT; k <= KEEL_POLICY_BULKHEAD; k++)
    fill_policy(&w, &pol[k - 1], k);
  keel_pipeline_opts o;
  keel_pipeline_opts_init(&o);
  o.policies = pol;
  o.npolicies = 7;
  int rc = keel_pipeline_new(&w.loop, &o, &w.p);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    keel_breaker_close(w.b, NULL, NULL);
    keel_ratelimit_close(w.rl, NULL, NULL);
    kt_loop_finish(&w.loop);
    return;
  }
  call c[4];
  bool accepted[4];
  static const int scripts[4][2] = {
      {B_OK, B_OK}, {B_FAIL, B_OK}, {B_HANG, B_OK}, {B_SLOW_FAIL, B_SLOW_OK}};
  for (int i = 0; i < 4; i++) {
    memset(&c[i], 0, sizeof c[i]);
    c[i].w = &w;
    memcpy(c[i].script, scripts[i], sizeof scripts[i]);
    c[i].nscript = 2;
    rc = keel_pipeline_execute(w.p, op, done, &c[i]);
    cr_assert(rc == 0 || rc == UV_ENOMEM);
    accepted[i] = rc == 0;
  }
  run(&w);
  world_finish(&w);
  for (int i = 0; i < 4; i++) {
    cr_assert_eq(c[i].dones, accepted[i] ? 1 : 0);
    if (accepted[i])
      cr_assert(c[i].r.status == 0 || c[i].r.status == 7 || c[i].r.status == UV_ENOMEM ||
                    c[i].r.status == UV_ETIMEDOUT,
                "call %d status %d", i, c[i].r.status);
  }
}

Test(pipeline, allocation_failure, .timeout = 240) {
  kt_failmalloc_run(failmalloc_scenario, NULL);
}
