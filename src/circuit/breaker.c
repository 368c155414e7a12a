/* The breaker's state machine: acquire/release, trip conditions, open-period
 * backoff, half-open probes and operator controls. No I/O: time comes from the
 * injected clock (the loop's cached time by default). */
#include <math.h>
#include <stdio.h>

#include "circuit/breaker_internal.h"
#include "core/alloc.h"

_Static_assert(sizeof(keel_breaker_opts) == 216, "keel_breaker_opts keeps its 0.1 size (ABI)");
_Static_assert(sizeof(keel_breaker_stats) == 192, "keel_breaker_stats keeps its 0.1 size (ABI)");

const char *keel_breaker_state_name(keel_breaker_state state) {
  switch (state) {
    case KEEL_BREAKER_CLOSED:
      return "closed";
    case KEEL_BREAKER_OPEN:
      return "open";
    case KEEL_BREAKER_HALF_OPEN:
      return "half_open";
    case KEEL_BREAKER_FORCED_OPEN:
      return "forced_open";
    case KEEL_BREAKER_DISABLED:
      return "disabled";
  }
  return "unknown";
}

void keel_breaker_opts_init(keel_breaker_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->failure_threshold = 5;
  opts->window = KEEL_BREAKER_WINDOW_NONE;
  opts->window_size = 100;
  opts->window_ms = 60000;
  opts->window_buckets = 10;
  opts->minimum_calls = 10;
  opts->failure_rate_threshold = 0.5;
  opts->slow_call_ms = 0;
  opts->slow_call_rate_threshold = 1.0;
  opts->reset_timeout_ms = 30000;
  opts->reset_backoff_factor = 1.0;
  opts->reset_timeout_max_ms = 300000;
  opts->half_open_max_calls = 1;
  opts->half_open_successes = 1;
  opts->half_open_max_wait_ms = 0;
}

int keel_breaker_validate_opts(const keel_breaker_opts *o, const char **why) {
  const char *problem = NULL;
  bool windowed = o != NULL && o->window != KEEL_BREAKER_WINDOW_NONE;
  if (o == NULL)
    problem = "opts is NULL";
  else if (o->window != KEEL_BREAKER_WINDOW_NONE && o->window != KEEL_BREAKER_WINDOW_COUNT &&
           o->window != KEEL_BREAKER_WINDOW_TIME)
    problem = "window must be KEEL_BREAKER_WINDOW_NONE, _COUNT or _TIME";
  else if (!(o->failure_rate_threshold >= 0.0 && o->failure_rate_threshold <= 1.0))
    problem = "failure_rate_threshold must be within [0, 1]";
  else if (!(o->slow_call_rate_threshold > 0.0 && o->slow_call_rate_threshold <= 1.0))
    problem = "slow_call_rate_threshold must be within (0, 1]";
  else if (o->failure_threshold == 0 &&
           !(windowed && (o->failure_rate_threshold > 0.0 || o->slow_call_ms > 0)))
    problem =
        "no trip condition: set failure_threshold > 0, or a window with "
        "failure_rate_threshold > 0 or slow_call_ms > 0";
  else if (!windowed && o->slow_call_ms > 0)
    problem = "slow_call_ms needs a window (KEEL_BREAKER_WINDOW_COUNT or _TIME)";
  else if (o->window == KEEL_BREAKER_WINDOW_COUNT && o->window_size == 0)
    problem = "window_size must be > 0 with a count window";
  else if (o->window == KEEL_BREAKER_WINDOW_COUNT && o->window_size > (1u << 24))
    problem = "window_size must be <= 16777216";
  else if (o->window == KEEL_BREAKER_WINDOW_COUNT && o->minimum_calls > o->window_size)
    problem =
        "minimum_calls must be <= window_size with a count window (the window never holds "
        "more than window_size calls, so the rates would never be computed)";
  else if (o->window == KEEL_BREAKER_WINDOW_TIME &&
           (o->window_buckets == 0 || o->window_buckets > 65536))
    problem = "window_buckets must be within 1..65536 with a time window";
  else if (o->window == KEEL_BREAKER_WINDOW_TIME && o->window_ms < o->window_buckets)
    problem = "window_ms must be >= window_buckets (a bucket is at least 1 ms)";
  else if (windowed && o->minimum_calls == 0)
    problem = "minimum_calls must be > 0";
  else if (o->reset_timeout_ms == 0)
    problem = "reset_timeout_ms must be > 0";
  else if (!(isfinite(o->reset_backoff_factor) && o->reset_backoff_factor >= 1.0))
    problem = "reset_backoff_factor must be a finite number >= 1";
  else if (o->reset_timeout_max_ms != 0 && o->reset_timeout_max_ms < o->reset_timeout_ms)
    problem = "reset_timeout_max_ms must be 0 (no cap) or >= reset_timeout_ms";
  else if (o->half_open_max_calls == 0)
    problem = "half_open_max_calls must be > 0";
  else if (o->half_open_successes == 0)
    problem = "half_open_successes must be > 0";
  else if (o->half_open_probes > 0 && !(o->failure_rate_threshold > 0.0))
    problem = "half_open_probes needs failure_rate_threshold > 0 (the probes are judged by rate)";
  if (why != NULL) *why = problem;
  return problem == NULL ? 0 : UV_EINVAL;
}

uint64_t keel__breaker_now(keel_breaker *b) {
  return keel__clock_now(&b->opts.clock, b->loop);
}

int keel_breaker_new_ex(uv_loop_t *loop, const keel_breaker_opts *opts, keel_breaker **out,
                        char *why_buf, size_t why_cap) {
  if (loop == NULL || out == NULL)
    return keel__why(why_buf, why_cap, UV_EINVAL, "loop and out are required");
  const char *why = NULL;
  if (keel_breaker_validate_opts(opts, &why) != 0)
    return keel__why(why_buf, why_cap, UV_EINVAL, why);
  int rc = keel_breaker_new(loop, opts, out);
  return keel__why(why_buf, why_cap, rc, rc == 0 ? "" : keel_strerror(rc));
}

int keel_breaker_new(uv_loop_t *loop, const keel_breaker_opts *opts, keel_breaker **out) {
  if (loop == NULL || out == NULL) return UV_EINVAL;
  if (keel_breaker_validate_opts(opts, NULL) != 0) return UV_EINVAL;
  keel_breaker *b = keel__calloc(1, sizeof *b);
  if (b == NULL) return UV_ENOMEM;
  b->loop = loop;
  b->opts = *opts;
  if (b->opts.half_open_max_wait_ms == 0) b->opts.half_open_max_wait_ms = opts->reset_timeout_ms;
  if (keel__window_init(&b->window, opts->window, opts->window_size, opts->window_ms,
                        opts->window_buckets) != 0) {
    keel__window_free(&b->window);
    keel__free(b);
    return UV_ENOMEM;
  }
  int rc = uv_timer_init(loop, &b->start_timer);
  if (rc != 0) {
    keel__window_free(&b->window);
    keel__free(b);
    return rc;
  }
  b->start_timer.data = b;
  /* Neither init allocates or fails on a valid loop. */
  uv_check_init(loop, &b->done_check);
  uv_idle_init(loop, &b->done_idle);
  b->done_check.data = b;
  b->done_idle.data = b;
  b->handles_open = 3;
  b->state = KEEL_BREAKER_CLOSED;
  b->generation = 1;
  b->open_duration_ms = opts->reset_timeout_ms;
  b->state_entered_ms = keel__breaker_now(b);
  keel__rate_init(&b->failure_rate, opts->failure_rate_threshold);
  keel__rate_init(&b->slow_rate, opts->slow_call_rate_threshold);
  *out = b;
  return 0;
}

static void transition(keel_breaker *b, keel_breaker_state to, uint64_t now) {
  keel_breaker_state from = b->state;
  b->state = to;
  b->generation++;
  b->state_entered_ms = now;
  b->probes_in_flight = 0;
  b->probe_successes = 0;
  b->probes_granted = 0;
  b->probe_failures = 0;
  b->probe_slow = 0;
  b->probe_allowance = 0;
  b->consecutive_failures = 0;
  b->stats.state_changes++;
  switch (to) {
    case KEEL_BREAKER_OPEN:
      b->open_until_ms = now + b->open_duration_ms;
      break;
    case KEEL_BREAKER_CLOSED:
      b->open_duration_ms = b->opts.reset_timeout_ms;
      keel__window_clear(&b->window);
      break;
    default:
      break;
  }
  if (b->share_hook != NULL) b->share_hook(b->share_ctx, from, to);
  if (b->opts.on_state_change != NULL) b->opts.on_state_change(b, from, to, b->opts.data);
}

void keel__breaker_set_state(keel_breaker *b, keel_breaker_state to, uint64_t open_ms) {
  if (b->closing || b->state == to || b->state == KEEL_BREAKER_FORCED_OPEN ||
      b->state == KEEL_BREAKER_DISABLED)
    return;
  uint64_t keep = b->open_duration_ms;
  if (to == KEEL_BREAKER_OPEN) b->open_duration_ms = open_ms;
  transition(b, to, keel__breaker_now(b));
  if (to == KEEL_BREAKER_OPEN) b->open_duration_ms = keep;
}

/* After a failed probe the next open period is longer (up to the cap). */
static void grow_open_duration(keel_breaker *b) {
  double next = (double)b->open_duration_ms * b->opts.reset_backoff_factor;
  uint64_t cap = b->opts.reset_timeout_max_ms;
  if (cap != 0 && next >= (double)cap)
    b->open_duration_ms = cap;
  else if (next < (double)(UINT64_MAX / 4))
    b->open_duration_ms = (uint64_t)next;
}

static void reopen(keel_breaker *b, uint64_t now) {
  grow_open_duration(b);
  transition(b, KEEL_BREAKER_OPEN, now);
}

/* Time-based transitions: OPEN → HALF_OPEN when the period is over, and a
 * half-open state whose probes never reported → OPEN again. */
static void advance_time(keel_breaker *b, uint64_t now) {
  if (b->state == KEEL_BREAKER_OPEN) {
    if (now >= b->open_until_ms) transition(b, KEEL_BREAKER_HALF_OPEN, now);
  } else if (b->state == KEEL_BREAKER_HALF_OPEN) {
    if (b->probes_in_flight > 0 && now - b->state_entered_ms >= b->opts.half_open_max_wait_ms)
      reopen(b, now);
  }
}

/* on_state_change and on_rejected may close the breaker: nothing is freed
 * before the close callback, so the code around them just carries on. */
static int reject(keel_breaker *b) {
  b->stats.calls_rejected++;
  if (b->opts.on_rejected != NULL) b->opts.on_rejected(b, b->state, b->opts.data);
  return KEEL_EOPEN;
}

/* Whether HALF_OPEN has a probe slot free. */
static bool probe_free(const keel_breaker *b) {
  if (b->probes_in_flight >= b->opts.half_open_max_calls) return false;
  if (b->share_probes && b->probes_granted >= b->probe_allowance) return false;
  return b->opts.half_open_probes == 0 || b->probes_granted < b->opts.half_open_probes;
}

/* The slow path of acquire: every state but CLOSED and DISABLED. Returns 0
 * (probe granted), KEEL_EOPEN or KEEL_EPROBES (rejected), KEEL_ECLOSING. */
static int acquire_slow(keel_breaker *b, keel_breaker_permit *permit) {
  if (b->state == KEEL_BREAKER_FORCED_OPEN) {
    reject(b);
    return KEEL_EOPEN;
  }
  advance_time(b, keel__breaker_now(b));
  if (b->closing) return KEEL_ECLOSING; /* closed by on_state_change */
  if (b->state == KEEL_BREAKER_OPEN) {
    reject(b);
    return KEEL_EOPEN;
  }
  if (!probe_free(b)) {
    reject(b);
    return KEEL_EPROBES;
  }
  b->probes_in_flight++;
  b->probes_granted++;
  b->stats.calls_permitted++;
  permit->breaker = b;
  permit->generation = b->generation;
  permit->probe = true;
  return 0;
}

int keel__breaker_acquire_code(keel_breaker *b, keel_breaker_permit *permit);
int keel__breaker_acquire_code(keel_breaker *b, keel_breaker_permit *permit) {
  if (b->state == KEEL_BREAKER_CLOSED || b->state == KEEL_BREAKER_DISABLED)
    return keel_breaker_acquire(b, permit);
  int rc = acquire_slow(b, permit);
  if (rc == KEEL_EPROBES && !b->opts.distinct_probe_code) rc = KEEL_EOPEN;
  return rc;
}

uint64_t keel_breaker_retry_after_ms(keel_breaker *b) {
  if (b == NULL) return 0;
  uint64_t now = keel__breaker_now(b);
  advance_time(b, now);
  switch (b->state) {
    case KEEL_BREAKER_OPEN:
      return b->open_until_ms > now ? b->open_until_ms - now : 0;
    case KEEL_BREAKER_FORCED_OPEN:
      return UINT64_MAX;
    case KEEL_BREAKER_HALF_OPEN: {
      if (probe_free(b)) return 0;
      uint64_t until = b->state_entered_ms + b->opts.half_open_max_wait_ms;
      return until > now ? until - now : 0;
    }
    default:
      return 0;
  }
}

int keel_breaker_acquire_ex(keel_breaker *b, keel_breaker_permit *permit,
                            uint64_t *retry_after_ms) {
  if (b == NULL || permit == NULL) return UV_EINVAL;
  if (b->closing) return KEEL_ECLOSING;
  if (b->state == KEEL_BREAKER_CLOSED || b->state == KEEL_BREAKER_DISABLED) {
    int rc = keel_breaker_acquire(b, permit);
    if (rc == 0 && retry_after_ms != NULL) *retry_after_ms = 0;
    return rc;
  }
  int rc = acquire_slow(b, permit);
  if (retry_after_ms != NULL && !b->closing) {
    if (rc == 0)
      *retry_after_ms = 0;
    else if (rc == KEEL_EOPEN || rc == KEEL_EPROBES)
      *retry_after_ms = keel_breaker_retry_after_ms(b);
  }
  return rc;
}

int keel_breaker_acquire(keel_breaker *b, keel_breaker_permit *permit) {
  if (b == NULL || permit == NULL) return UV_EINVAL;
  if (b->closing) return KEEL_ECLOSING;
  switch (b->state) {
    case KEEL_BREAKER_CLOSED:
    case KEEL_BREAKER_DISABLED:
      break;
    case KEEL_BREAKER_FORCED_OPEN:
    case KEEL_BREAKER_OPEN:
    case KEEL_BREAKER_HALF_OPEN: {
      int rc = acquire_slow(b, permit);
      return rc == KEEL_EPROBES && !b->opts.distinct_probe_code ? KEEL_EOPEN : rc;
    }
  }
  b->stats.calls_permitted++;
  permit->breaker = b;
  permit->generation = b->generation;
  permit->probe = false;
  return 0;
}

static bool rates_trip(keel_breaker *b, uint64_t now) {
  keel__window *w = &b->window;
  if (w->kind == KEEL_BREAKER_WINDOW_TIME) keel__window_expire(w, now);
  if (w->calls < b->opts.minimum_calls) return false;
  if (b->opts.failure_rate_threshold > 0.0 &&
      keel__rate_reached(&b->failure_rate, w->failures, w->calls))
    return true;
  return b->opts.slow_call_ms > 0 && keel__rate_reached(&b->slow_rate, w->slow, w->calls);
}

static keel_breaker_outcome classify(keel_breaker *b, int status) {
  if (b->opts.classify != NULL) {
    keel_breaker_outcome outcome = b->opts.classify(status, b->opts.classify_data);
    return b->closing ? KEEL_BREAKER_IGNORE : outcome; /* closed from inside */
  }
  if (status >= 0) return KEEL_BREAKER_SUCCESS;
  return status == UV_ECANCELED ? KEEL_BREAKER_IGNORE : KEEL_BREAKER_FAILURE;
}

/* HALF_OPEN with half_open_probes: count the probe; once all have
 * reported, reopen on the failure (or slow) rate, close otherwise. */
static void judge_probes(keel_breaker *b, bool failed, bool slow) {
  if (failed) b->probe_failures++;
  if (slow) b->probe_slow++;
  b->probe_successes++; /* here: probes reported */
  if (b->probe_successes < b->opts.half_open_probes) return;
  uint32_t n = b->probe_successes;
  bool bad = keel__rate_reached(&b->failure_rate, b->probe_failures, n) ||
             (b->opts.slow_call_ms > 0 && keel__rate_reached(&b->slow_rate, b->probe_slow, n));
  uint64_t now = keel__breaker_now(b);
  if (bad)
    reopen(b, now);
  else
    transition(b, KEEL_BREAKER_CLOSED, now);
}

/* Records an outcome that belongs to the current generation. Inlined into
 * release: the closed-state path must stay a few nanoseconds. */
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
static inline void
record(keel_breaker *b, bool probe, keel_breaker_outcome outcome, uint64_t duration_ms) {
  bool slow = b->opts.slow_call_ms > 0 && duration_ms >= b->opts.slow_call_ms;
  if (outcome == KEEL_BREAKER_IGNORE) {
    b->stats.calls_ignored++;
    if (probe && b->probes_in_flight > 0) b->probes_in_flight--;
    /* An ignored probe gives its turn back (resilience4j does not count it). */
    if (probe && b->state == KEEL_BREAKER_HALF_OPEN && b->probes_granted > 0) b->probes_granted--;
    return;
  }
  bool failed = outcome == KEEL_BREAKER_FAILURE;
  if (failed)
    b->stats.calls_failed++;
  else
    b->stats.calls_succeeded++;
  if (slow) b->stats.calls_slow++;

  if (b->state == KEEL_BREAKER_CLOSED) {
    b->consecutive_failures = failed ? b->consecutive_failures + 1 : 0;
    bool trip =
        b->opts.failure_threshold != 0 && b->consecutive_failures >= b->opts.failure_threshold;
    if (b->window.kind != KEEL_BREAKER_WINDOW_NONE) {
      uint64_t now = keel__breaker_now(b);
      keel__window_record(
          &b->window, (failed ? KEEL__OUTCOME_FAILED : 0u) | (slow ? KEEL__OUTCOME_SLOW : 0u), now);
      if (!trip) trip = rates_trip(b, now);
      if (trip) transition(b, KEEL_BREAKER_OPEN, now);
    } else if (trip) {
      transition(b, KEEL_BREAKER_OPEN, keel__breaker_now(b));
    }
    return;
  }
  if (b->state == KEEL_BREAKER_HALF_OPEN && probe) {
    if (b->probes_in_flight > 0) b->probes_in_flight--;
    if (b->opts.half_open_probes > 0) {
      judge_probes(b, failed, slow);
      return;
    }
    /* A slow probe is as bad a sign as a failed one when slowness trips. */
    if (failed || slow) {
      reopen(b, keel__breaker_now(b));
    } else if (++b->probe_successes >= b->opts.half_open_successes) {
      transition(b, KEEL_BREAKER_CLOSED, keel__breaker_now(b));
    }
  }
}

int keel_breaker_release(keel_breaker_permit *permit, int status, uint64_t duration_ms) {
  if (permit == NULL || permit->breaker == NULL) return UV_EINVAL;
  keel_breaker *b = permit->breaker;
  /* close bumps the generation: every permit out is then stale, and this
   * branch tells the two apart off the fast path. */
  if (permit->generation != b->generation) {
    if (b->closing) return KEEL_ECLOSING;
    b->stats.calls_stale++;
    permit->generation = 0;
    return KEEL_ESTALE;
  }
  permit->generation = 0;
  if (b->state == KEEL_BREAKER_DISABLED) return 0;
  /* Here, not in record(): the duration is then not kept across the
   * classifier call (a few instructions less on the hot path). */
  b->stats.duration_total_ms += duration_ms;
  record(b, permit->probe, classify(b, status), duration_ms);
  return 0;
}

/* Used by execute() for timeouts: the outcome is a failure whatever the
 * classifier says about UV_ETIMEDOUT. */
int keel__breaker_release_timeout(keel_breaker_permit *permit, uint64_t duration_ms);
int keel__breaker_release_timeout(keel_breaker_permit *permit, uint64_t duration_ms) {
  keel_breaker *b = permit->breaker;
  if (permit->generation != b->generation) {
    b->stats.calls_stale++;
    permit->generation = 0;
    return KEEL_ESTALE;
  }
  permit->generation = 0;
  b->stats.calls_timed_out++;
  if (b->state == KEEL_BREAKER_DISABLED) return 0;
  b->stats.duration_total_ms += duration_ms;
  record(b, permit->probe, KEEL_BREAKER_FAILURE, duration_ms);
  return 0;
}

int keel_breaker_force_open(keel_breaker *b) {
  if (b == NULL) return UV_EINVAL;
  if (b->closing) return KEEL_ECLOSING;
  if (b->state != KEEL_BREAKER_FORCED_OPEN)
    transition(b, KEEL_BREAKER_FORCED_OPEN, keel__breaker_now(b));
  return 0;
}

int keel_breaker_disable(keel_breaker *b) {
  if (b == NULL) return UV_EINVAL;
  if (b->closing) return KEEL_ECLOSING;
  if (b->state != KEEL_BREAKER_DISABLED) transition(b, KEEL_BREAKER_DISABLED, keel__breaker_now(b));
  return 0;
}

int keel_breaker_reset(keel_breaker *b) {
  if (b == NULL) return UV_EINVAL;
  if (b->closing) return KEEL_ECLOSING;
  if (b->state != KEEL_BREAKER_CLOSED) {
    transition(b, KEEL_BREAKER_CLOSED, keel__breaker_now(b));
    return 0;
  }
  /* Already CLOSED: no state change (no event, not counted), but the
   * windows and counters still start over and permits from before are
   * stale, as after any reset. */
  b->generation++;
  b->consecutive_failures = 0;
  b->open_duration_ms = b->opts.reset_timeout_ms;
  keel__window_clear(&b->window);
  return 0;
}

keel_breaker_state keel_breaker_get_state(keel_breaker *b) {
  if (b == NULL) return KEEL_BREAKER_CLOSED;
  advance_time(b, keel__breaker_now(b));
  return b->state;
}

static double rate_of(const keel_breaker *b, uint32_t part) {
  if (b->window.kind == KEEL_BREAKER_WINDOW_NONE || b->window.calls < b->opts.minimum_calls)
    return -1.0;
  return (double)part / (double)b->window.calls;
}

void keel_breaker_get_stats(keel_breaker *b, keel_breaker_stats *out) {
  if (b == NULL || out == NULL) return;
  uint64_t now = keel__breaker_now(b);
  advance_time(b, now);
  if (b->window.kind == KEEL_BREAKER_WINDOW_TIME) keel__window_expire(&b->window, now);
  *out = b->stats;
  out->state = b->state;
  out->failure_rate = rate_of(b, b->window.failures);
  out->slow_call_rate = rate_of(b, b->window.slow);
  out->window_calls = b->window.calls;
  out->consecutive_failures = b->consecutive_failures;
  out->probes_in_flight = b->probes_in_flight;
  out->open_duration_ms = b->open_duration_ms;
  out->state_entered_ms = b->state_entered_ms;
  out->window_failures = b->window.failures;
  out->window_slow = b->window.slow;
  uint64_t released = b->stats.calls_succeeded + b->stats.calls_failed + b->stats.calls_ignored;
  out->duration_mean_ms =
      released != 0 ? (double)b->stats.duration_total_ms / (double)released : 0.0;
  memset(out->reserved_, 0, sizeof out->reserved_);
}

const char *keel_breaker_last_error(const keel_breaker *b) {
  return b == NULL ? "breaker is NULL" : b->last_error;
}

/* The close callback of the breaker's own handles. */
static void on_start_timer_closed(uv_handle_t *handle) {
  keel_breaker *b = handle->data;
  b->handles_open--;
  keel__breaker_maybe_free(b);
}

void keel__breaker_maybe_free(keel_breaker *b) {
  if (!b->closing || b->handles_open != 0 || b->calls_allocated != 0) return;
  keel_close_cb cb = b->close_cb;
  void *data = b->close_data;
  keel__window_free(&b->window);
  keel__free(b);
  if (cb != NULL) cb(b, data);
}

void keel__breaker_close_start_timer(keel_breaker *b) {
  uv_close((uv_handle_t *)&b->start_timer, on_start_timer_closed);
}

void keel__breaker_close_done_handles(keel_breaker *b) {
  uv_close((uv_handle_t *)&b->done_check, on_start_timer_closed);
  uv_close((uv_handle_t *)&b->done_idle, on_start_timer_closed);
}

/* Calls no user code: what close owes (done(UV_ECANCELED) for every call
 * without a result) is paid by the start timer on a later iteration, and
 * the close callback comes after that. So close works from inside any of the
 * breaker's callbacks. */
void keel_breaker_close(keel_breaker *b, keel_close_cb cb, void *data) {
  if (b == NULL || b->closing) return;
  keel__stats_hooks_detach(&b->stats_hooks);
  b->closing = true;
  b->close_cb = cb;
  b->close_data = data;
  b->generation++; /* permits out are stale: their release gets KEEL_ECLOSING */
  keel__breaker_stop_calls(b);
  keel__breaker_close_done_handles(b);
  uv_timer_stop(&b->start_timer);
  uv_timer_start(&b->start_timer, keel__breaker_on_close_pump, 0, 0);
}
