/* The asynchronous retry runner of keel/retry.h.
 *
 * One uv_timer_t drives everything: it starts each attempt (after the
 * backoff delay, or at once for attempt 1) and it handles each reported
 * outcome (armed with timeout 0 by keel_retry_report). So user code
 * (attempt, classify, on_retry, done) only ever runs from on_timer: never
 * inside keel_retry_start() or keel_retry_report(). An attempt that reports
 * synchronously just arms the timer and unwinds; libuv then runs the timer
 * again from its own loop, iteratively: the trampoline that keeps 100 000
 * immediate failures from growing the stack.
 *
 * Memory: the runner lives until keel_retry_close(); its timer is closed as
 * soon as no attempt is in flight (at close, or at the late report of the
 * attempt that was in flight), and the memory is freed in the timer's close
 * callback, right before the user's close_cb. */
#include <math.h>
#include <stdbool.h>

#include "core/alloc.h"
#include "core/retry_stats.h"
#include "core/util.h"
#include "keel/retry.h"

struct keel_retry {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  uv_timer_t timer;
  keel_retry_opts opts;
  keel_retry_attempt_fn attempt_fn;
  keel_retry_done_cb done_cb;
  void *data;
  keel_rng rng;
  unsigned attempts;
  uint64_t started_at_ms;
  uint64_t last_delay_ms;
  int last_status;         /* latest failure, 0 when none */
  int reported_status;     /* outcome waiting for the timer when `pending` */
  void *result;            /* reported with keel_retry_done_ex() */
  uint64_t retry_after_ms; /* likewise */
  uint64_t attempt_started_ms;
  uint64_t attempt_duration_ms;
  bool in_flight;     /* attempt started, its report not yet received */
  bool pending;       /* outcome reported, not yet handled */
  bool done_called;   /* done delivered (or being delivered) */
  bool closing;       /* keel_retry_close() was called */
  int owed_status;    /* closing: what done gets on the timer's next run */
  bool timer_closing; /* uv_close() issued on the timer */
  keel_close_cb close_cb;
  void *close_data;
};

int keel_retry_default_classify(int status, void *classify_data) {
  (void)classify_data;
  if (status >= 0) return 0;
  switch (status) {
    case UV_ECANCELED:
    case UV_EINVAL:
    case UV_ENOMEM:
    case KEEL_EABORTED:
    case KEEL_ECLOSING:
      return 0;
    default:
      return 1;
  }
}

void keel_retry_opts_init(keel_retry_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  keel_backoff_exponential(&opts->backoff, 100, 2.0, 0);
  opts->max_attempts = 4;
}

/* Milliseconds since keel_retry_start() on the runner's clock; a clock that
 * went backwards counts as no time passed. */
static uint64_t elapsed_ms(const keel_retry *r) {
  uint64_t now = keel__clock_now(&r->opts.clock, r->loop);
  return now > r->started_at_ms ? now - r->started_at_ms : 0;
}

static void on_timer_closed(uv_handle_t *handle) {
  keel_retry *r = handle->data;
  keel_close_cb cb = r->close_cb;
  void *close_data = r->close_data;
  keel__free(r);
  if (cb != NULL) cb(r, close_data);
}

static void close_timer(keel_retry *r) {
  if (r->timer_closing) return;
  r->timer_closing = true;
  uv_close((uv_handle_t *)&r->timer, on_timer_closed);
}

/* Delivers the result. Nothing of r may be touched after it by the caller
 * except through the closing flags (done may close the runner, but the
 * memory is only freed in a later close callback). */
static void finish(keel_retry *r, int status) {
  if (r->done_called) return;
  r->done_called = true;
  uv_timer_stop(&r->timer);
  r->done_cb(r, status, r->attempts, r->data);
}

static void on_timer(uv_timer_t *timer);

/* After close: the timer's last run delivers what close owes to done (a
 * later iteration, never inside keel_retry_close()), then closes the timer
 * unless an abandoned attempt has yet to report. */
static void on_close_timer(uv_timer_t *timer) {
  keel_retry *r = timer->data;
  finish(r, r->owed_status); /* done may report the attempt in flight */
  if (!r->in_flight) close_timer(r);
}

/* ---- retry budget ------------------------------------------------------ */

#define KEEL__BUDGET_BUCKETS 10

struct keel_retry_budget {
  uv_loop_t *loop;
  keel_retry_budget_opts opts;
  uint64_t bucket_ms;
  uint64_t epoch[KEEL__BUDGET_BUCKETS]; /* now / bucket_ms when last reset */
  uint64_t calls[KEEL__BUDGET_BUCKETS];
  uint64_t retries[KEEL__BUDGET_BUCKETS];
  keel_retry_budget_stats stats;
};

void keel_retry_budget_opts_init(keel_retry_budget_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->ratio = 0.2;
  opts->min_retries = 10;
  opts->window_ms = 10000;
}

int keel_retry_budget_new(uv_loop_t *loop, const keel_retry_budget_opts *opts,
                          keel_retry_budget **out) {
  if (loop == NULL || opts == NULL || out == NULL) return UV_EINVAL;
  if (!(isfinite(opts->ratio) && opts->ratio >= 0.0 && opts->ratio <= 1000.0)) return UV_EINVAL;
  if (opts->window_ms < KEEL__BUDGET_BUCKETS) return UV_EINVAL;
  keel_retry_budget *b = keel__calloc(1, sizeof *b);
  if (b == NULL) return UV_ENOMEM;
  b->loop = loop;
  b->opts = *opts;
  b->bucket_ms = opts->window_ms / KEEL__BUDGET_BUCKETS;
  *out = b;
  return 0;
}

void keel_retry_budget_free(keel_retry_budget *b) {
  keel__free(b);
}

/* The bucket of now, emptied when it last served an older period; and the
 * window's totals. */
static unsigned budget_bucket(keel_retry_budget *b, uint64_t *calls, uint64_t *retries) {
  uint64_t epoch = keel__clock_now(&b->opts.clock, b->loop) / b->bucket_ms;
  unsigned at = (unsigned)(epoch % KEEL__BUDGET_BUCKETS);
  if (b->epoch[at] != epoch) {
    b->calls[at] = b->retries[at] = 0;
    b->epoch[at] = epoch;
  }
  *calls = *retries = 0;
  for (unsigned i = 0; i < KEEL__BUDGET_BUCKETS; i++) {
    /* A bucket counts while it is one of the window's last ten periods. */
    if (b->epoch[i] > epoch || epoch - b->epoch[i] >= KEEL__BUDGET_BUCKETS) continue;
    *calls += b->calls[i];
    *retries += b->retries[i];
  }
  return at;
}

void keel_retry_budget_record_call(keel_retry_budget *b) {
  if (b == NULL) return;
  uint64_t calls, retries;
  unsigned at = budget_bucket(b, &calls, &retries);
  b->calls[at]++;
  b->stats.calls++;
}

bool keel_retry_budget_try_retry(keel_retry_budget *b) {
  if (b == NULL) return false;
  uint64_t calls, retries;
  unsigned at = budget_bucket(b, &calls, &retries);
  double allowed = (double)b->opts.min_retries + b->opts.ratio * (double)calls;
  if ((double)(retries + 1) > allowed) {
    b->stats.refused++;
    return false;
  }
  b->retries[at]++;
  b->stats.retries++;
  return true;
}

void keel_retry_budget_get_stats(keel_retry_budget *b, keel_retry_budget_stats *out) {
  if (b == NULL || out == NULL) return;
  uint64_t calls, retries;
  budget_bucket(b, &calls, &retries);
  *out = b->stats;
  out->window_calls = calls;
  out->window_retries = retries;
  memset(out->reserved_, 0, sizeof out->reserved_);
}

/* ---- runner ------------------------------------------------------------ */

/* The delay before the next attempt: the backoff, jitter, the server's
 * hint. */
static uint64_t proposed_delay(keel_retry *r) {
  uint64_t delay = keel_backoff_delay(&r->opts.backoff, r->attempts, r->last_delay_ms, &r->rng);
  if (r->opts.jitter > 0.0 && delay > 0) {
    double low = (double)delay * (1.0 - r->opts.jitter);
    double high = (double)delay * (1.0 + r->opts.jitter);
    if (high >= (double)(UINT64_MAX / 4)) high = (double)(UINT64_MAX / 4);
    delay = keel_rng_between(&r->rng, (uint64_t)(low + 0.5), (uint64_t)(high + 0.5));
  }
  if (delay < r->retry_after_ms) delay = r->retry_after_ms;
  return delay;
}

static void fill_info(const keel_retry *r, int status, uint64_t delay, keel_retry_info *info) {
  memset(info, 0, sizeof *info);
  info->attempt = r->attempts;
  info->status = status;
  info->result = r->result;
  info->duration_ms = r->attempt_duration_ms;
  info->retry_after_ms = r->retry_after_ms;
  info->delay_ms = delay;
}

/* Handles the outcome of the attempt that just ended (from on_timer). */
static void decide(keel_retry *r, int status) {
  /* What done gets when retrying stops here: the failure, or for a result
   * that still wanted a retry, KEEL_EEXHAUSTED. */
  int final = status;
  if (status >= 0) {
    int again = 0;
    if (r->opts.retry_result != NULL) {
      again = r->opts.retry_result(status, r->result, r->opts.classify_data);
      if (r->closing || r->done_called) return; /* closed from inside */
    }
    if (!again) {
      finish(r, 0);
      return;
    }
    final = KEEL_EEXHAUSTED;
  } else {
    r->last_status = status;
  }
  if (r->attempts >= r->opts.max_attempts) {
    finish(r, final);
    return;
  }
  if (status < 0) {
    keel_retry_classify_fn classify =
        r->opts.classify != NULL ? r->opts.classify : keel_retry_default_classify;
    int retryable = classify(status, r->opts.classify_data);
    if (r->closing || r->done_called) return; /* closed from inside classify */
    if (!retryable) {
      finish(r, status);
      return;
    }
  }
  uint64_t delay = proposed_delay(r);
  keel_retry_info info;
  if (r->opts.delay_fn != NULL) {
    fill_info(r, status, delay, &info);
    delay = r->opts.delay_fn(r, &info, r->data);
    if (r->closing || r->done_called) return;
    if (delay == UINT64_MAX) {
      finish(r, final);
      return;
    }
  }
  if (r->opts.deadline_ms != 0) {
    /* A retry that could only start after the deadline is not worth waiting
     * for: report the failure we have now. */
    uint64_t elapsed = elapsed_ms(r);
    if (elapsed > r->opts.deadline_ms || delay > r->opts.deadline_ms - elapsed) {
      finish(r, final);
      return;
    }
  }
  if (r->opts.budget != NULL && !keel_retry_budget_try_retry(r->opts.budget)) {
    finish(r, final);
    return;
  }
  r->last_delay_ms = delay;
  if (r->opts.on_retry != NULL) {
    r->opts.on_retry(r, r->attempts + 1, status, delay, r->data);
    if (r->closing || r->done_called) return;
  }
  if (r->opts.on_retry_info != NULL) {
    fill_info(r, status, delay, &info);
    r->opts.on_retry_info(r, &info, r->data);
    if (r->closing || r->done_called) return;
  }
  uv_timer_start(&r->timer, on_timer, delay, 0);
}

static void on_timer(uv_timer_t *timer) {
  keel_retry *r = timer->data;
  if (r->closing || r->done_called || r->in_flight) return;
  if (r->pending) {
    r->pending = false;
    decide(r, r->reported_status);
    return;
  }
  /* Start the next attempt. With a real clock the delay already fit in the
   * deadline; an injected clock (or a blocked loop) may have jumped past it. */
  if (r->attempts > 0 && r->opts.deadline_ms != 0 && elapsed_ms(r) > r->opts.deadline_ms) {
    finish(r, r->last_status);
    return;
  }
  r->attempts++;
  r->in_flight = true;
  r->result = NULL;
  r->retry_after_ms = 0;
  r->attempt_started_ms = keel__clock_now(&r->opts.clock, r->loop);
  r->attempt_fn(r, r->attempts, r->data);
}

int keel_retry_start(uv_loop_t *loop, const keel_retry_opts *opts, keel_retry_attempt_fn attempt,
                     keel_retry_done_cb done, void *data, keel_retry **out) {
  if (loop == NULL || opts == NULL || attempt == NULL || done == NULL || out == NULL)
    return UV_EINVAL;
  if (opts->max_attempts == 0) return UV_EINVAL;
  if (keel_backoff_validate(&opts->backoff, NULL) != 0) return UV_EINVAL;
  if (!(opts->jitter >= 0.0 && opts->jitter <= 1.0)) return UV_EINVAL;
  keel_retry *r = keel__calloc(1, sizeof *r);
  if (r == NULL) return UV_ENOMEM;
  int rc = uv_timer_init(loop, &r->timer);
  if (rc != 0) {
    keel__free(r);
    return rc;
  }
  r->loop = loop;
  r->opts = *opts;
  r->attempt_fn = attempt;
  r->done_cb = done;
  r->data = data;
  r->timer.data = r;
  keel_rng_seed(&r->rng, opts->seed != 0 ? opts->seed : uv_hrtime() ^ (uint64_t)(uintptr_t)r);
  r->started_at_ms = keel__clock_now(&r->opts.clock, loop);
  keel_retry_budget_record_call(r->opts.budget);
  /* Attempt 1 starts on a later loop iteration, never inside this call. */
  uv_timer_start(&r->timer, on_timer, 0, 0);
  *out = r;
  return 0;
}

int keel_retry_done(keel_retry *r, int status) {
  return keel_retry_done_ex(r, status, NULL, 0);
}

int keel_retry_report(keel_retry *r, int status) {
  return keel_retry_done_ex(r, status, NULL, 0);
}

void *keel_retry_result(const keel_retry *r) {
  return r == NULL ? NULL : r->result;
}

int keel_retry_done_ex(keel_retry *r, int status, void *result, uint64_t retry_after_ms) {
  if (r == NULL) return UV_EINVAL;
  if (!r->in_flight) return r->closing ? KEEL_ECLOSING : UV_EINVAL;
  r->in_flight = false;
  if (r->closing) {
    /* The report of an abandoned attempt: the runner can go once done has
     * had its UV_ECANCELED (else on_close_timer closes the timer). */
    if (r->done_called) close_timer(r);
    return 0;
  }
  r->pending = true;
  r->reported_status = status > 0 ? 0 : status;
  r->result = result;
  r->retry_after_ms = retry_after_ms;
  uint64_t now = keel__clock_now(&r->opts.clock, r->loop);
  r->attempt_duration_ms = now > r->attempt_started_ms ? now - r->attempt_started_ms : 0;
  uv_timer_start(&r->timer, on_timer, 0, 0);
  return 0;
}

unsigned keel_retry_attempts(const keel_retry *r) {
  return r == NULL ? 0 : r->attempts;
}

uint64_t keel_retry_last_delay_ms(const keel_retry *r) {
  return r == NULL ? 0 : r->last_delay_ms;
}

int keel_retry_last_status(const keel_retry *r) {
  return r == NULL ? 0 : r->last_status;
}

void keel_retry_close(keel_retry *r, keel_close_cb close_cb, void *data) {
  if (r == NULL || r->closing) return;
  keel__stats_hooks_detach(&r->stats_hooks);
  r->closing = true;
  r->close_cb = close_cb;
  r->close_data = data;
  uv_timer_stop(&r->timer);
  if (!r->done_called) {
    /* A success already reported only waited for the timer: it stands.
     * done gets its result from the timer on a later iteration, before
     * close_cb, never inside this call. */
    r->owed_status = r->pending && r->reported_status == 0 ? 0 : UV_ECANCELED;
    r->pending = false;
    uv_timer_start(&r->timer, on_close_timer, 0, 0);
    return;
  }
  if (!r->in_flight) close_timer(r);
}

keel__stats_hooks *keel__retry_stats_hooks(keel_retry *r) {
  return r->closing ? NULL : &r->stats_hooks; /* no registration once closing */
}

void keel__retry_peek(const keel_retry *r, unsigned *attempts, int *last_status, bool *done,
                      uint64_t *last_delay_ms) {
  *attempts = r->attempts;
  *last_status = r->last_status;
  *done = r->done_called;
  *last_delay_ms = r->last_delay_ms;
}
