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
 *
 * Callbacks. done (execute) and the operation itself never run inside the
 * keel call that caused them: always on a later loop iteration. The two
 * events, on_state_change and on_rejected, are notifications: they run
 * synchronously inside the call that made the change or the rejection
 * (acquire, release, execute, done, get_state, get_stats, force_open,
 * disable, reset), after the breaker's state is fully updated. The breaker
 * may be used and closed from inside every callback: done, the operation,
 * on_state_change, on_rejected and classify.
 *
 * Closing. After keel_breaker_close() began, acquire, release, execute,
 * force_open, disable and reset return KEEL_ECLOSING and take nothing;
 * get_state, get_stats and last_error still answer until the close
 * callback. execute() calls accepted before and not finished get
 * done(UV_ECANCELED) on a later iteration, before the close callback.
 *
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

/* Returns "closed", "open", "half_open", "forced_open", "disabled" or "unknown"
 * (a static string). Any thread. */
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
 * Called inside keel_breaker_release() / keel_breaker_done(); it may
 * close the breaker (the outcome is then not counted).
 */
typedef keel_breaker_outcome (*keel_breaker_classify_fn)(int status, void *data);

/* Called on every state change, only when the state really changes (from !=
 * to; the seed's onOpen: to == OPEN; onClose: to == CLOSED). Runs inside the
 * call that made the change (see the top of this file); the breaker may be
 * used and closed from inside. */
typedef void (*keel_breaker_state_cb)(keel_breaker *b, keel_breaker_state from,
                                      keel_breaker_state to, void *data);

/* Called for every rejected call (KEEL_EOPEN), inside keel_breaker_acquire()
 * or keel_breaker_execute(); the breaker may be used and closed from
 * inside (an execute() whose rejection closed the breaker returns
 * KEEL_ECLOSING and calls nothing). */
typedef void (*keel_breaker_reject_cb)(keel_breaker *b, keel_breaker_state state, void *data);

/*
 * A fallback for keel_breaker_execute() (opossum's fallback, Polly's
 * Fallback strategy): called instead of handing done a rejection
 * (KEEL_EOPEN, KEEL_EPROBES) and, with opts.fallback_on_failure, a failure
 * (a status < 0 other than UV_ECANCELED, UV_ETIMEDOUT included). status is
 * what done would have got; data is the execute() call's data. What it
 * returns is what done gets (0 when the fallback served the call). Runs
 * right before done, from the loop (never inside a keel call); it may close
 * the breaker.
 */
typedef int (*keel_breaker_fallback_fn)(keel_breaker *b, int status, void *data);

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
  /* Both rates compare exactly: a threshold written with up to 9 decimals
   * is taken as that decimal (0.55 means 55/100: 55 failures in 100 calls
   * trip, 54 do not), whatever the double's binary rounding. Any other
   * double (1.0 / 3) is compared as failures/calls >= the double's value. */

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
   * the probes that never reported count as failed and it reopens.
   * With half_open_probes > 0 (see below) the probes are judged by rate
   * instead. */
  uint32_t half_open_max_calls;
  uint32_t half_open_successes;
  uint64_t half_open_max_wait_ms;

  keel_breaker_classify_fn classify; /* NULL: the default described above */
  void *classify_data;
  keel_breaker_state_cb on_state_change; /* may be NULL */
  keel_breaker_reject_cb on_rejected;    /* may be NULL */
  void *data;                            /* passed to the two callbacks */
  keel_clock clock;                      /* default: uv_now(loop) */

  /* resilience4j's permittedNumberOfCallsInHalfOpenState: HALF_OPEN lets
   * exactly this many probes through in all (at most half_open_max_calls
   * at once), waits for all of them, then reopens when their failure rate
   * reaches failure_rate_threshold (or their slow rate
   * slow_call_rate_threshold, with slow_call_ms) and closes otherwise.
   * Needs failure_rate_threshold > 0. 0 (default): the rule above
   * (half_open_successes, any failure reopens). */
  uint32_t half_open_probes;
  /* true: acquire() and execute() answer KEEL_EPROBES (not KEEL_EOPEN) when
   * the breaker is HALF_OPEN with every probe taken, so callers can tell
   * "open" from "probing, try again soon". false (default): KEEL_EOPEN for
   * both, as in keel 0.1 (keel_breaker_acquire_ex() tells them apart
   * always). */
  bool distinct_probe_code;
  bool fallback_on_failure;          /* fallback also for failures (see the type) */
  keel_breaker_fallback_fn fallback; /* execute() only; NULL (default): none */
  uint64_t reserved_[6];             /* ABI room: zero (opts_init does); never set */
} keel_breaker_opts;

/* Zeroes the whole struct, then fills the defaults documented above.
 * NULL: no-op. Any thread. */
KEEL_EXTERN void keel_breaker_opts_init(keel_breaker_opts *opts);

/*
 * Creates a breaker in the CLOSED state. opts is copied (not needed after
 * the call); the breaker is the caller's until keel_breaker_close(). Calls
 * no callback.
 * Returns 0 and sets *out; UV_EINVAL for a NULL loop, opts or out or bad
 * options (no trip condition, a rate outside its range, window_size 0 with
 * a count window, minimum_calls > window_size with a count window (the
 * rates could never be computed), window_ms < window_buckets, a factor <
 * 1, half_open_probes without failure_rate_threshold, ...), with the
 * reason from keel_breaker_new_ex() or keel_breaker_validate_opts();
 * UV_ENOMEM; or an error of uv_timer_init(). *out is untouched on failure
 * and nothing is allocated. Loop thread only.
 */
KEEL_EXTERN int keel_breaker_new(uv_loop_t *loop, const keel_breaker_opts *opts,
                                 keel_breaker **out);

/* Like keel_breaker_new() (same errors), and explains a failure: writes the
 * reason (NUL-terminated, truncated to why_cap) into why_buf, "" on success.
 * why_buf may be NULL. Loop thread only. */
KEEL_EXTERN int keel_breaker_new_ex(uv_loop_t *loop, const keel_breaker_opts *opts,
                                    keel_breaker **out, char *why_buf, size_t why_cap);

/*
 * Checks opts without creating anything. Returns 0 (and sets *why to NULL)
 * or UV_EINVAL (NULL opts or a bad field) and, when why is not NULL, a
 * static explanation in *why. Any thread.
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
 * (on_rejected is called first); UV_EINVAL for a NULL b or permit;
 * KEEL_ECLOSING after keel_breaker_close() began (also when on_state_change
 * closed the breaker during this call). *permit is untouched on failure.
 * In DISABLED every call is permitted and nothing is recorded. May call
 * on_state_change (a due OPEN -> HALF_OPEN) and on_rejected. Allocates
 * nothing. Loop thread only.
 */
KEEL_EXTERN int keel_breaker_acquire(keel_breaker *b, keel_breaker_permit *permit);

/*
 * Like keel_breaker_acquire(), and on a rejection tells why and for how
 * long: KEEL_EOPEN (OPEN or FORCED_OPEN) or KEEL_EPROBES (HALF_OPEN with
 * every probe taken; whatever opts.distinct_probe_code says), and sets
 * *retry_after_ms (may be NULL) to keel_breaker_retry_after_ms()'s answer.
 * *retry_after_ms is set to 0 when a permit is granted; untouched on the
 * other errors. Same other errors, events and thread rule as acquire.
 */
KEEL_EXTERN int keel_breaker_acquire_ex(keel_breaker *b, keel_breaker_permit *permit,
                                        uint64_t *retry_after_ms);

/*
 * How long until the breaker lets a call through (for an HTTP Retry-After
 * or a client's back-off), after any due time-based transition: 0 when a
 * call would be permitted now (CLOSED, DISABLED, HALF_OPEN with a probe
 * free); in OPEN the rest of the open period; in HALF_OPEN with every
 * probe taken the time until stuck probes are given up
 * (half_open_max_wait_ms; a probe may free a slot sooner); UINT64_MAX in
 * FORCED_OPEN (until an operator resets it). 0 for NULL. May call
 * on_state_change. Loop thread only.
 */
KEEL_EXTERN uint64_t keel_breaker_retry_after_ms(keel_breaker *b);

/*
 * Records the outcome of a permitted call and marks the permit used.
 * status: 0 for success or a negative error, judged by opts.classify.
 * duration_ms: how long the call took (for slow-call detection; keel does
 * not read a clock here).
 * Returns 0 when recorded; KEEL_ESTALE when the permit is from before a state
 * change or was already released (ignored, counted in stats.calls_stale);
 * KEEL_ECLOSING when the breaker is closing (ignored; a permit must not be
 * released after the close callback: the breaker is gone); UV_EINVAL for a
 * NULL or never-filled permit. May call on_state_change. Allocates nothing.
 * Loop thread only.
 */
KEEL_EXTERN int keel_breaker_release(keel_breaker_permit *permit, int status, uint64_t duration_ms);

/* ---- execute: an asynchronous call guarded by the breaker --------------- */

typedef struct keel_breaker_call keel_breaker_call;

/*
 * Starts the guarded operation, on a later loop iteration than the
 * keel_breaker_execute() that queued it. It must report exactly once with
 * keel_breaker_done(call, status), now or later from the loop thread,
 * even after a timeout or close (the report is then ignored); the close
 * callback waits for that report. It may close the breaker.
 */
typedef void (*keel_breaker_op_fn)(keel_breaker_call *call, void *data);

/*
 * The result of keel_breaker_execute(), exactly once, never inside a keel
 * call (from the breaker's start timer or the timeout): the operation's
 * status, reported with keel_breaker_done();
 * KEEL_EOPEN when rejected (the operation was not started; KEEL_EPROBES for
 * a half-open rejection with opts.distinct_probe_code); UV_ETIMEDOUT
 * when it did not report within timeout_ms (counted as a failure);
 * UV_ECANCELED when keel_breaker_close() came before the operation
 * reported (on a later iteration than the close, before its callback). It
 * may close the breaker. With opts.fallback, the fallback's answer replaces
 * a rejection (and, with fallback_on_failure, a failure).
 */
typedef void (*keel_breaker_done_cb)(keel_breaker *b, int status, void *data);

/*
 * Acquires a permit and, if granted, runs op on a later loop iteration; op's
 * report (or the timeout) is recorded with its duration and done is called.
 * timeout_ms 0 means no timeout. data is the caller's, passed to op and
 * done. The call's memory comes from a free list on the breaker, so a
 * steady stream of calls does not allocate.
 * Returns 0 (done will be called exactly once, also for KEEL_EOPEN);
 * UV_EINVAL (NULL b, op or done; reason in keel_breaker_last_error());
 * UV_ENOMEM; KEEL_ECLOSING after close began, or when on_state_change /
 * on_rejected closed the breaker during this call. On an error nothing is
 * called back. May call on_state_change and on_rejected (see the top).
 * Loop thread only.
 */
KEEL_EXTERN int keel_breaker_execute(keel_breaker *b, keel_breaker_op_fn op, uint64_t timeout_ms,
                                     keel_breaker_done_cb done, void *data);

/*
 * Reports the outcome of an operation started by keel_breaker_execute()
 * (the "operation finished" call; keel_breaker_call_done() is its old
 * name).
 * Records it now; done gets this status on a later loop iteration, never
 * inside this call (also when the breaker is closed in between: a result
 * reported before the close stands). call must not be used after this
 * report.
 * Returns 0; KEEL_ESTALE when the call had already ended (timed out, or
 * cancelled by keel_breaker_close(): ignored, done has or will have its
 * UV_ETIMEDOUT / UV_ECANCELED); UV_EINVAL for NULL or a second report. The
 * call's memory is recycled by this report. May call on_state_change.
 * Loop thread only.
 */
KEEL_EXTERN int keel_breaker_done(keel_breaker_call *call, int status);

/* Deprecated: the old name of keel_breaker_done(), kept (same function,
 * same ABI) for programs written against keel 0.1. */
KEEL_EXTERN int keel_breaker_call_done(keel_breaker_call *call, int status);

/* ---- operator controls ------------------------------------------------- */

/* The three operator controls return 0, UV_EINVAL for a NULL b or
 * KEEL_ECLOSING after close began, call on_state_change when (and only
 * when) the state changes, and are loop-thread only. */

/* Rejects every call until keel_breaker_reset() (no effect when already
 * FORCED_OPEN). */
KEEL_EXTERN int keel_breaker_force_open(keel_breaker *b);

/* Permits every call and records nothing until keel_breaker_reset() (no
 * effect when already DISABLED). */
KEEL_EXTERN int keel_breaker_disable(keel_breaker *b);

/* Back to CLOSED with empty windows, no consecutive failures and the base
 * open duration; permits acquired before are stale. From CLOSED this is no
 * state change: on_state_change is not called and stats.state_changes does
 * not move. */
KEEL_EXTERN int keel_breaker_reset(keel_breaker *b);

/* The current state (the seed's getState), after any due time-based
 * transition (which calls on_state_change). KEEL_BREAKER_CLOSED for NULL.
 * Loop thread only. */
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
  uint64_t window_failures;      /* gauge: failures in the window, also below
                                    minimum_calls (0 without a window) */
  uint64_t window_slow;          /* gauge: slow calls in the window, likewise */
  uint64_t duration_total_ms;    /* counter: sum of the durations released
                                    (execute() measures its own) */
  double duration_mean_ms;       /* duration_total_ms / calls released (succeeded,
                                    failed and ignored); 0 before any */
  uint64_t reserved_[4];         /* ABI room: filled with zero; never read */
} keel_breaker_stats;

/* Fills *out, after any due time-based transition (which calls
 * on_state_change). Does nothing when b or out is NULL. Loop thread only. */
KEEL_EXTERN void keel_breaker_get_stats(keel_breaker *b, keel_breaker_stats *out);

/* Text of the last error (bad input to a verb); "" when none; "breaker is
 * NULL" for NULL. Valid until the next call on b. Loop thread only. */
KEEL_EXTERN const char *keel_breaker_last_error(const keel_breaker *b);

/*
 * Closes the breaker. NULL-safe; idempotent (a second call does nothing);
 * may be called from inside any of the breaker's callbacks. Calls nothing
 * back inside this call. From now on the verbs return KEEL_ECLOSING.
 * execute() calls not finished get done(UV_ECANCELED) on a later loop
 * iteration; their operations, if started, must still report with
 * keel_breaker_done() (it returns KEEL_ESTALE). cb (may be NULL) runs
 * with (b, data) on a later loop iteration, after those done calls, once
 * every timer is closed and every operation has reported; b is freed then
 * and uv_loop_close() can return 0. Loop thread only.
 */
KEEL_EXTERN void keel_breaker_close(keel_breaker *b, keel_close_cb cb, void *data);

struct keel_serve;

/*
 * Shows b on the keel_serve server s under name (keel/serve.h), as kind
 * "breaker". The registration is dropped from s when b's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or b closing). Loop thread only.
 */
KEEL_EXTERN int keel_breaker_serve(struct keel_serve *s, keel_breaker *b, const char *name);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_BREAKER_H */
