/*
 * keel/breaker.h — a circuit breaker.
 *
 * A breaker watches the outcomes of calls to a dependency and, when too many
 * fail (or are too slow), opens: calls are rejected at once with KEEL_EOPEN
 * for reset_timeout_ms instead of piling onto a struggling service. It then
 * lets a few probe calls through (HALF_OPEN); enough successes close it again,
 * a failure reopens it (optionally for longer each time).
 *
 *     keel_breaker_opts o;
 *     keel_breaker_opts_init(&o);            // 5 consecutive failures, 30 s open
 *     o.on_state_change = log_state;         // the seed's onOpen / onClose
 *     keel_breaker *b;
 *     if (keel_breaker_new(loop, &o, &b) != 0) abort();
 *
 *     keel_breaker_permit permit;
 *     if (keel_breaker_acquire(b, &permit) == KEEL_EOPEN) return serve_fallback();
 *     int status = call_the_dependency();
 *     keel_breaker_release(&permit, status, elapsed_ms);
 *
 * Transitions out of OPEN (to HALF_OPEN, when reset_timeout_ms has passed)
 * and out of a stuck HALF_OPEN happen when the breaker is next used
 * (acquire, execute, get_state, get_stats): the breaker owns no timer.
 * Everything is loop-thread only.
 */
#ifndef KEEL_BREAKER_H
#define KEEL_BREAKER_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_breaker keel_breaker;

typedef enum keel_breaker_state {
  KEEL_BREAKER_CLOSED = 0,  /* calls flow; outcomes are recorded */
  KEEL_BREAKER_OPEN,        /* calls are rejected until the open period ends */
  KEEL_BREAKER_HALF_OPEN,   /* a limited number of probe calls are let through */
  KEEL_BREAKER_FORCED_OPEN, /* operator: every call rejected until reset */
  KEEL_BREAKER_DISABLED     /* operator: every call permitted, nothing recorded */
} keel_breaker_state;

/* Returns "closed", "open", "half_open", "forced_open", "disabled" or "unknown". */
KEEL_EXTERN const char *keel_breaker_state_name(keel_breaker_state state);

/* Where outcomes are counted for the rate-based trip conditions. */
typedef enum keel_breaker_window {
  KEEL_BREAKER_WINDOW_NONE = 0, /* only consecutive failures trip the breaker */
  KEEL_BREAKER_WINDOW_COUNT,    /* the last window_size calls */
  KEEL_BREAKER_WINDOW_TIME      /* the calls of the last window_ms, in buckets */
} keel_breaker_window;

/* How one outcome counts. */
typedef enum keel_breaker_outcome {
  KEEL_BREAKER_SUCCESS = 0, /* counts as a success */
  KEEL_BREAKER_FAILURE,     /* counts as a failure */
  KEEL_BREAKER_IGNORE       /* not counted at all (frees a probe slot) */
} keel_breaker_outcome;

/*
 * Decides how a call's status counts. The default: 0 and positive statuses
 * are successes, UV_ECANCELED is ignored, every other negative status is a
 * failure. Use it so that e.g. KEEL_ENOTFOUND does not trip the breaker.
 */
typedef keel_breaker_outcome (*keel_breaker_classify_fn)(int status, void *data);

/* Called on every state change (the seed's onOpen: to == OPEN; onClose:
 * to == CLOSED). The breaker may be used from inside, but not closed. */
typedef void (*keel_breaker_state_cb)(keel_breaker *b, keel_breaker_state from,
                                      keel_breaker_state to, void *data);

/* Called for every rejected call (KEEL_EOPEN). */
typedef void (*keel_breaker_reject_cb)(keel_breaker *b, keel_breaker_state state, void *data);

typedef struct keel_breaker_opts {
  /* Trip on this many failures in a row; 0 turns the condition off.
   * Default 5 (the seed's failureThreshold). */
  uint32_t failure_threshold;

  /* Rate-based conditions over a sliding window; default WINDOW_NONE. */
  keel_breaker_window window;
  uint32_t window_size;            /* COUNT: calls in the window; default 100 */
  uint64_t window_ms;              /* TIME: window length; default 60000 */
  uint32_t window_buckets;         /* TIME: buckets (resolution window_ms/buckets); default 10 */
  uint32_t minimum_calls;          /* rates count only from this many calls; default 10 */
  double failure_rate_threshold;   /* trip when failures/calls >= this; in [0, 1],
                                      0 = off; default 0.5 */
  uint64_t slow_call_ms;           /* a call of at least this duration is slow;
                                      0 = off (default) */
  double slow_call_rate_threshold; /* trip when slow/calls >= this; in (0, 1];
                                      default 1.0 */

  /* OPEN lasts reset_timeout_ms (default 30000, the seed's resetTimeout),
   * multiplied by reset_backoff_factor (default 1: constant, >= 1) after each
   * failed probe, at most reset_timeout_max_ms (default 300000), and back to
   * reset_timeout_ms when the breaker closes. */
  uint64_t reset_timeout_ms;
  double reset_backoff_factor;
  uint64_t reset_timeout_max_ms;

  /* HALF_OPEN lets at most half_open_max_calls probes run at once (default 1:
   * no stampede) and closes after half_open_successes successful probes
   * (default 1); any failed probe reopens. If the breaker stays half-open
   * for half_open_max_wait_ms (default 0: reset_timeout_ms) without closing,
   * the probes that never reported count as failed and it reopens. */
  uint32_t half_open_max_calls;
  uint32_t half_open_successes;
  uint64_t half_open_max_wait_ms;

  keel_breaker_classify_fn classify; /* NULL: the default described above */
  void *classify_data;
  keel_breaker_state_cb on_state_change; /* may be NULL */
  keel_breaker_reject_cb on_rejected;    /* may be NULL */
  void *data;                            /* passed to the two callbacks */
  keel_clock clock;                      /* default: uv_now(loop) */
} keel_breaker_opts;

/* Fills opts with the defaults documented above. */
KEEL_EXTERN void keel_breaker_opts_init(keel_breaker_opts *opts);

/*
 * Creates a breaker in the CLOSED state. opts is copied.
 * Returns 0 and sets *out; UV_EINVAL for a NULL argument or bad options (no
 * trip condition, a rate outside its range, window_size 0 with a count
 * window, window_ms < window_buckets, a factor < 1, ...), with the reason
 * from keel_breaker_new_ex() or keel_breaker_validate_opts(); UV_ENOMEM.
 * *out is untouched on failure. Loop thread only.
 */
KEEL_EXTERN int keel_breaker_new(uv_loop_t *loop, const keel_breaker_opts *opts,
                                 keel_breaker **out);

/* Like keel_breaker_new(), and explains a failure: writes the reason
 * (NUL-terminated, truncated to why_cap) into why_buf, "" on success.
 * why_buf may be NULL. */
KEEL_EXTERN int keel_breaker_new_ex(uv_loop_t *loop, const keel_breaker_opts *opts,
                                    keel_breaker **out, char *why_buf, size_t why_cap);

/*
 * Checks opts without creating anything. Returns 0 or UV_EINVAL and, when
 * why is not NULL, a static explanation in *why.
 */
KEEL_EXTERN int keel_breaker_validate_opts(const keel_breaker_opts *opts, const char **why);

/* A permission to make one call. A plain value, no allocation: keep it until
 * the call ends and hand it to keel_breaker_release(). */
typedef struct keel_breaker_permit {
  keel_breaker *breaker;
  uint64_t generation; /* the breaker's state generation when acquired; 0 = used */
  bool probe;          /* acquired in HALF_OPEN */
} keel_breaker_permit;

/*
 * Asks to make a call. Returns 0 and fills *permit; KEEL_EOPEN when the
 * breaker is OPEN, FORCED_OPEN or HALF_OPEN with every probe slot taken
 * (on_rejected is called, *permit is untouched); UV_EINVAL for NULL.
 * In DISABLED every call is permitted and nothing is recorded.
 */
KEEL_EXTERN int keel_breaker_acquire(keel_breaker *b, keel_breaker_permit *permit);

/*
 * Records the outcome of a permitted call and marks the permit used.
 * status: 0 for success or a negative error, judged by opts.classify.
 * duration_ms: how long the call took (for slow-call detection; keel does
 * not read a clock here).
 * Returns 0 when recorded; KEEL_ESTALE when the permit is from before a state
 * change or was already released (ignored, counted in stats.calls_stale);
 * UV_EINVAL for NULL.
 */
KEEL_EXTERN int keel_breaker_release(keel_breaker_permit *permit, int status, uint64_t duration_ms);

/* ---- execute: an asynchronous call guarded by the breaker --------------- */

typedef struct keel_breaker_call keel_breaker_call;

/*
 * Starts the guarded operation. It must report exactly once with
 * keel_breaker_call_done(call, status), now or later from the loop thread,
 * even after a timeout or close (the report is then ignored).
 */
typedef void (*keel_breaker_op_fn)(keel_breaker_call *call, void *data);

/*
 * The result of keel_breaker_execute(), exactly once: the operation's
 * status; KEEL_EOPEN when rejected (the operation was not started);
 * UV_ETIMEDOUT when it did not report within timeout_ms (counted as a
 * failure); UV_ECANCELED when the breaker was closed first.
 */
typedef void (*keel_breaker_done_cb)(keel_breaker *b, int status, void *data);

/*
 * Acquires a permit and, if granted, runs op on a later loop iteration; op's
 * report (or the timeout) is recorded with its duration and done is called.
 * timeout_ms 0 means no timeout. The call's memory comes from a free list on
 * the breaker, so a steady stream of calls does not allocate.
 * Returns 0 (done will be called exactly once, also for KEEL_EOPEN), UV_EINVAL
 * (NULL b, op or done), UV_ENOMEM or KEEL_ECLOSING. Loop thread only.
 */
KEEL_EXTERN int keel_breaker_execute(keel_breaker *b, keel_breaker_op_fn op, uint64_t timeout_ms,
                                     keel_breaker_done_cb done, void *data);

/*
 * Reports the outcome of an operation started by keel_breaker_execute().
 * Returns 0, or KEEL_ESTALE when the call had already ended (timed out or
 * cancelled: ignored) — the call's memory is recycled by this report.
 */
KEEL_EXTERN int keel_breaker_call_done(keel_breaker_call *call, int status);

/* ---- operator controls ------------------------------------------------- */

/* Rejects every call until keel_breaker_reset(). Returns 0 or UV_EINVAL. */
KEEL_EXTERN int keel_breaker_force_open(keel_breaker *b);

/* Permits every call and records nothing until keel_breaker_reset(). */
KEEL_EXTERN int keel_breaker_disable(keel_breaker *b);

/* Back to CLOSED with empty windows and the base open duration. */
KEEL_EXTERN int keel_breaker_reset(keel_breaker *b);

/* The current state (the seed's getState), after any due time-based
 * transition. */
KEEL_EXTERN keel_breaker_state keel_breaker_get_state(keel_breaker *b);

typedef struct keel_breaker_stats {
  keel_breaker_state state;      /* gauge */
  uint64_t calls_permitted;      /* counter: acquires granted (execute included) */
  uint64_t calls_rejected;       /* counter: KEEL_EOPEN answers */
  uint64_t calls_succeeded;      /* counter */
  uint64_t calls_failed;         /* counter (timeouts included) */
  uint64_t calls_ignored;        /* counter: classified IGNORE */
  uint64_t calls_slow;           /* counter: duration >= slow_call_ms */
  uint64_t calls_timed_out;      /* counter: execute() timeouts */
  uint64_t calls_stale;          /* counter: releases ignored as stale */
  uint64_t state_changes;        /* counter */
  double failure_rate;           /* gauge: over the window, -1 below minimum_calls
                                    or without a window */
  double slow_call_rate;         /* gauge: likewise */
  uint32_t window_calls;         /* gauge: calls in the window */
  uint32_t consecutive_failures; /* gauge */
  uint32_t probes_in_flight;     /* gauge: HALF_OPEN permits not yet released */
  uint64_t open_duration_ms;     /* gauge: length of the current/next open period */
  uint64_t state_entered_ms;     /* gauge: clock time the current state began */
} keel_breaker_stats;

/* Fills *out. NULL-safe (does nothing). */
KEEL_EXTERN void keel_breaker_get_stats(keel_breaker *b, keel_breaker_stats *out);

/* Text of the last error (bad input to a verb); "" when none. */
KEEL_EXTERN const char *keel_breaker_last_error(const keel_breaker *b);

/*
 * Closes the breaker. NULL-safe; not from inside its own callbacks.
 * Pending execute() calls get done(UV_ECANCELED) now; their operations must
 * still report (ignored). cb (may be NULL) runs on a later loop iteration
 * once every timer is closed and every operation has reported.
 */
KEEL_EXTERN void keel_breaker_close(keel_breaker *b, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_BREAKER_H */
