/* The asynchronous retry runner of keel/retry.h: one uv_timer_t drives both
 * the wait before a retry and the start of each attempt, so an attempt is
 * never started re-entrantly from inside keel_retry_start() or from inside a
 * report, and a synchronous report cannot grow the stack. */
#include <stdbool.h>

#include "core/alloc.h"
#include "core/util.h"
#include "keel/retry.h"

typedef enum retry_phase {
  PHASE_SCHEDULED, /* timer armed: the next attempt starts when it fires */
  PHASE_IN_FLIGHT, /* attempt started, waiting for keel_retry_report() */
  PHASE_DONE       /* done callback delivered (or being delivered) */
} retry_phase;

struct keel_retry {
  uv_loop_t *loop;
  uv_timer_t timer;
  keel_retry_opts opts;
  keel_retry_attempt_fn attempt_fn;
  keel_retry_done_cb done_cb;
  void *data;
  keel_rng rng;
  retry_phase phase;
  unsigned attempts;
  uint64_t started_at_ms;
  uint64_t last_delay_ms;
  /* A report that arrived inside attempt_fn; handled after it returns. */
  bool reported_inside_attempt;
  bool in_attempt;
  int reported_status;
  /* Close bookkeeping: memory is released once the timer is closed and no
   * attempt is in flight. */
  bool closing;
  bool timer_closed;
  keel_close_cb close_cb;
  void *close_data;
};

static int default_classify(int status, void *classify_data) {
  (void)classify_data;
  return status != UV_ECANCELED && status != UV_EINVAL && status != KEEL_EABORTED;
}

void keel_retry_opts_init(keel_retry_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  keel_backoff_exponential(&opts->backoff, 100, 2.0, 0);
  opts->max_attempts = 4;
}

static uint64_t retry_now(const keel_retry *r) {
  return keel__clock_now(&r->opts.clock, r->loop);
}

static void maybe_free(keel_retry *r) {
  if (!r->closing || !r->timer_closed || r->phase == PHASE_IN_FLIGHT || r->in_attempt) return;
  keel_close_cb cb = r->close_cb;
  void *close_data = r->close_data;
  keel__free(r);
  if (cb != NULL) cb(r, close_data);
}

static void finish(keel_retry *r, int status) {
  if (r->phase == PHASE_DONE) return;
  r->phase = PHASE_DONE;
  uv_timer_stop(&r->timer);
  r->done_cb(r, status, r->attempts, r->data);
}

static void on_timer(uv_timer_t *timer);

/* Handles the outcome of the attempt that just ended. */
static void handle_outcome(keel_retry *r, int status) {
  if (status == 0) {
    finish(r, 0);
    return;
  }
  keel_retry_classify_fn classify = r->opts.classify ? r->opts.classify : default_classify;
  if (r->attempts >= r->opts.max_attempts || !classify(status, r->opts.classify_data)) {
    finish(r, status);
    return;
  }
  uint64_t delay = keel_backoff_delay(&r->opts.backoff, r->attempts, r->last_delay_ms, &r->rng);
  if (r->opts.deadline_ms != 0) {
    uint64_t elapsed = retry_now(r) - r->started_at_ms;
    /* A retry that could only start after the deadline is not worth waiting
     * for: report the failure we have now. */
    if (elapsed >= r->opts.deadline_ms || delay > r->opts.deadline_ms - elapsed) {
      finish(r, status);
      return;
    }
  }
  r->last_delay_ms = delay;
  r->phase = PHASE_SCHEDULED;
  uv_timer_start(&r->timer, on_timer, delay, 0);
}

static void start_attempt(keel_retry *r) {
  r->attempts++;
  r->phase = PHASE_IN_FLIGHT;
  r->in_attempt = true;
  r->reported_inside_attempt = false;
  r->attempt_fn(r, r->attempts, r->data);
  r->in_attempt = false;
  if (r->reported_inside_attempt) {
    r->reported_inside_attempt = false;
    r->phase = PHASE_SCHEDULED; /* no longer in flight */
    if (r->closing)
      maybe_free(r);
    else
      handle_outcome(r, r->reported_status);
    return;
  }
  if (r->closing) maybe_free(r);
}

static void on_timer(uv_timer_t *timer) {
  keel_retry *r = timer->data;
  if (r->phase != PHASE_SCHEDULED || r->closing) return;
  if (r->opts.deadline_ms != 0 && r->attempts > 0 &&
      retry_now(r) - r->started_at_ms > r->opts.deadline_ms) {
    finish(r, UV_ETIMEDOUT);
    return;
  }
  start_attempt(r);
}

int keel_retry_start(uv_loop_t *loop, const keel_retry_opts *opts, keel_retry_attempt_fn attempt,
                     keel_retry_done_cb done, void *data, keel_retry **out) {
  if (loop == NULL || opts == NULL || attempt == NULL || done == NULL || out == NULL)
    return UV_EINVAL;
  if (opts->max_attempts == 0) return UV_EINVAL;
  if (keel_backoff_validate(&opts->backoff, NULL) != 0) return UV_EINVAL;
  keel_retry *r = keel__calloc(1, sizeof *r);
  if (r == NULL) return UV_ENOMEM;
  r->loop = loop;
  r->opts = *opts;
  r->attempt_fn = attempt;
  r->done_cb = done;
  r->data = data;
  keel_rng_seed(&r->rng, opts->seed != 0 ? opts->seed : uv_hrtime());
  int rc = uv_timer_init(loop, &r->timer);
  if (rc != 0) {
    keel__free(r);
    return rc;
  }
  r->timer.data = r;
  r->started_at_ms = retry_now(r);
  r->phase = PHASE_SCHEDULED;
  /* Attempt 1 starts on the next loop iteration, never inside this call. */
  uv_timer_start(&r->timer, on_timer, 0, 0);
  *out = r;
  return 0;
}

int keel_retry_report(keel_retry *r, int status) {
  if (r == NULL || r->phase != PHASE_IN_FLIGHT) return UV_EINVAL;
  if (status > 0) status = 0;
  if (r->in_attempt) {
    /* Reported synchronously: unwind attempt_fn first (trampoline). */
    if (r->reported_inside_attempt) return UV_EINVAL;
    r->reported_inside_attempt = true;
    r->reported_status = status;
    return 0;
  }
  r->phase = PHASE_SCHEDULED;
  if (r->closing) {
    maybe_free(r);
    return 0;
  }
  handle_outcome(r, status);
  return 0;
}

unsigned keel_retry_attempts(const keel_retry *r) {
  return r == NULL ? 0 : r->attempts;
}

uint64_t keel_retry_last_delay_ms(const keel_retry *r) {
  return r == NULL ? 0 : r->last_delay_ms;
}

static void on_timer_closed(uv_handle_t *handle) {
  keel_retry *r = handle->data;
  r->timer_closed = true;
  maybe_free(r);
}

void keel_retry_close(keel_retry *r, keel_close_cb close_cb, void *data) {
  if (r == NULL || r->closing) return;
  r->closing = true;
  r->close_cb = close_cb;
  r->close_data = data;
  bool in_flight = r->phase == PHASE_IN_FLIGHT;
  if (r->phase != PHASE_DONE) finish(r, UV_ECANCELED);
  if (in_flight) r->phase = PHASE_IN_FLIGHT; /* memory stays until it reports */
  uv_close((uv_handle_t *)&r->timer, on_timer_closed);
}
