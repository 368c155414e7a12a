/*
 * keel/policy.h — resilience policies composed as one pipeline.
 *
 * A pipeline wraps one asynchronous operation in a chosen list of policies,
 * outermost first (Polly v8's ResiliencePipelineBuilder order: the first
 * policy added sees the call first and the result last):
 *
 *   rate limit  keel_ratelimit decides; rejected: KEEL_ERATELIMIT (with the
 *               time until allowed in result.retry_after_ms)
 *   timeout     everything inside gets timeout_ms; then UV_ETIMEDOUT and
 *               the attempts inside are told to stop
 *   retry       keel_retry_opts: backoff, max_attempts, deadline, classify
 *   breaker     a keel_breaker (keel/breaker.h) guards what is inside;
 *               rejected: KEEL_EOPEN
 *   fallback    a failure is handed to a function that may replace it
 *   hedging     a second attempt starts after a delay (or when the first
 *               fails); the first success wins, the others are told to stop
 *   bulkhead    at most max_concurrent inside at once, max_queued waiting;
 *               beyond that KEEL_EFULL
 *
 * Where a policy sits matters, as in Polly: a timeout inside a retry bounds
 * each attempt (a timed-out attempt is retried); a timeout outside bounds
 * the whole (the retries stop with UV_ETIMEDOUT). A breaker inside a retry
 * counts every attempt; outside, only the final result.
 *
 *     keel_policy pol[4];
 *     keel_policy_ratelimit(&pol[0], limiter);
 *     keel_policy_timeout(&pol[1], 2000);        // the whole call
 *     keel_retry_opts ro; keel_retry_opts_init(&ro);
 *     keel_policy_retry(&pol[2], &ro);
 *     keel_policy_breaker(&pol[3], breaker);
 *     keel_pipeline_opts o; keel_pipeline_opts_init(&o);
 *     o.policies = pol; o.npolicies = 4;
 *     keel_pipeline *p;
 *     if (keel_pipeline_new(loop, &o, &p) != 0) abort();
 *     keel_pipeline_execute(p, call_service, on_result, req);
 *
 * The operation gets a keel_attempt: its number, whether it was told to
 * stop, and keel_attempt_done() to report. Each attempt is told to stop
 * (keel_attempt_on_cancel) at most once: when a timeout around it expires,
 * when a hedged sibling won, or when the pipeline closes; it still reports
 * with keel_attempt_done() (the report is then ignored).
 *
 * Callbacks. The operation, done, the cancel callback, fallback, classify
 * and on_event run from the pipeline's own loop callbacks (an idle handle
 * and timers), never inside keel_pipeline_execute(), keel_attempt_done() or
 * keel_pipeline_close(). The pipeline may be closed from inside every one
 * of them. A breaker's own on_state_change / on_rejected run inside the
 * pipeline's callbacks too (see keel/breaker.h).
 *
 * Memory. A call takes no allocation in the steady state: call frames come
 * from a free list on the pipeline; a timeout arms no timer per call (one
 * list of deadlines per timeout policy, one timer for its earliest entry).
 *
 * Everything is loop-thread only except keel_pipeline_execute_threadsafe().
 */
#ifndef KEEL_POLICY_H
#define KEEL_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "keel/adaptive.h"
#include "keel/breaker.h"
#include "keel/common.h"
#include "keel/ratelimit.h"
#include "keel/retry.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_pipeline keel_pipeline;
typedef struct keel_attempt keel_attempt;

typedef enum keel_policy_kind {
  KEEL_POLICY_RATELIMIT = 1,
  KEEL_POLICY_TIMEOUT,
  KEEL_POLICY_RETRY,
  KEEL_POLICY_BREAKER,
  KEEL_POLICY_FALLBACK,
  KEEL_POLICY_HEDGING,
  KEEL_POLICY_BULKHEAD
} keel_policy_kind;

/* Returns "ratelimit", "timeout", "retry", "breaker", "fallback", "hedging",
 * "bulkhead" or "unknown" (static). Any thread. */
KEEL_EXTERN const char *keel_policy_kind_name(keel_policy_kind kind);

/*
 * Fallback: called with a failed status (< 0) of what is inside it. Returns
 * the status the call ends with instead: 0 (or >= 0) when the fallback
 * produced a value (write it where call_data points: the data given to
 * keel_pipeline_execute()), or a negative status (the same one to decline).
 * Runs from a pipeline callback; it may close the pipeline.
 */
typedef int (*keel_fallback_fn)(keel_pipeline *p, int status, void *call_data, void *fallback_data);

/* Hedging delay meaning "start the next attempt only when one failed"
 * (Polly's Timeout.InfiniteTimeSpan). */
#define KEEL_HEDGE_ON_FAILURE UINT64_MAX

/*
 * Bulkhead limit hook (adaptive concurrency): when limit is set, the
 * bulkhead asks it for the current limit before each admission (the result
 * is clamped to 1..max_concurrent), and sample (may be NULL) is told each
 * finished call's duration, status and the calls in flight then. NULL (the
 * default): the fixed max_concurrent.
 */
typedef struct keel_limit_hook {
  uint32_t (*limit)(void *data);
  void (*sample)(void *data, uint64_t duration_ms, int status, uint32_t in_flight);
  void *data;
} keel_limit_hook;

/* One policy: fill it with one of the keel_policy_*() functions below. A
 * plain value, copied by keel_pipeline_new(). */
typedef struct keel_policy {
  keel_policy_kind kind;
  union {
    keel_ratelimit *ratelimit; /* RATELIMIT: the caller's; outlives the pipeline */
    uint64_t timeout_ms;       /* TIMEOUT: > 0 */
    keel_retry_opts retry;     /* RETRY: backoff, max_attempts, deadline_ms,
                                  classify, seed (0: from uv_hrtime()), jitter,
                                  retry_result (called with result NULL: a
                                  status >= 0 it accepts is retried) and budget
                                  (shared; it must outlive the pipeline) are
                                  used; on_retry, on_retry_info, delay_fn and
                                  clock are not (they take a runner: see
                                  on_event); a retry waits at least the
                                  retry_after_ms reported from inside */
    keel_breaker *breaker;     /* BREAKER: the caller's; outlives the pipeline */
    struct {
      keel_fallback_fn fn;
      void *data;
    } fallback; /* FALLBACK */
    struct {
      uint64_t delay_ms;     /* next attempt after this; 0: all at once;
                                KEEL_HEDGE_ON_FAILURE: only after a failure */
      uint32_t max_attempts; /* total attempts incl. the first; >= 1 */
    } hedging;               /* HEDGING */
    struct {
      uint32_t max_concurrent; /* >= 1 */
      uint32_t max_queued;     /* waiting beyond max_concurrent; 0 = none */
      keel_limit_hook hook;    /* a limit of your own; zero = fixed */
      /* An adaptive concurrency limit (keel/adaptive.h), the caller's, which
       * outlives the pipeline; NULL (default): none. A call is admitted
       * when it has room too (max_concurrent stays the hard cap) and takes
       * one of its slots; the call's latency in microseconds (uv_hrtime)
       * is its sample: a success, KEEL_ADAPTIVE_DROPPED for UV_ETIMEDOUT,
       * KEEL_EFULL, KEEL_ERATELIMIT and KEEL_EOPEN from inside, IGNORE for
       * a call cancelled from outside, SUCCESS for any other result. */
      keel_adaptive *adaptive;
    } bulkhead;             /* BULKHEAD */
    uint64_t reserved_[24]; /* ABI room: size of the union */
  } u;
} keel_policy;

/* The fillers below zero *pol and set every field; NULL pol: no-op. They
 * validate nothing (keel_pipeline_new() does). Any thread. */
KEEL_EXTERN void keel_policy_ratelimit(keel_policy *pol, keel_ratelimit *rl);
KEEL_EXTERN void keel_policy_timeout(keel_policy *pol, uint64_t timeout_ms);
/* opts NULL: keel_retry_opts_init()'s defaults. opts is copied. */
KEEL_EXTERN void keel_policy_retry(keel_policy *pol, const keel_retry_opts *opts);
KEEL_EXTERN void keel_policy_breaker(keel_policy *pol, keel_breaker *b);
KEEL_EXTERN void keel_policy_fallback(keel_policy *pol, keel_fallback_fn fn, void *data);
KEEL_EXTERN void keel_policy_hedging(keel_policy *pol, uint64_t delay_ms, uint32_t max_attempts);
KEEL_EXTERN void keel_policy_bulkhead(keel_policy *pol, uint32_t max_concurrent,
                                      uint32_t max_queued);

/* ---- events ------------------------------------------------------------- */

typedef enum keel_policy_event_kind {
  KEEL_EVENT_RATELIMITED = 1,  /* rate limit said no (delay_ms: retry after) */
  KEEL_EVENT_TIMEOUT,          /* a timeout expired */
  KEEL_EVENT_RETRY,            /* a retry was decided (attempt: the next one,
                                  status: the failure, delay_ms: the wait) */
  KEEL_EVENT_BREAKER_REJECTED, /* the breaker said no (status: its code) */
  KEEL_EVENT_FALLBACK,         /* fallback called (status: the failure) */
  KEEL_EVENT_HEDGE,            /* a hedged attempt started (attempt) */
  KEEL_EVENT_CANCEL,           /* an attempt was told to stop (status: why) */
  KEEL_EVENT_BULKHEAD_QUEUED,  /* a call waits for a bulkhead slot */
  KEEL_EVENT_BULKHEAD_REJECTED /* the bulkhead was full (KEEL_EFULL) */
} keel_policy_event_kind;

typedef struct keel_policy_event {
  keel_policy_event_kind kind;
  size_t policy;     /* index of the policy in opts.policies */
  unsigned attempt;  /* see the kinds above; else the call's attempts so far */
  int status;        /* see the kinds above; else 0 */
  uint64_t delay_ms; /* see the kinds above; else 0 */
  void *call_data;   /* the data of the keel_pipeline_execute() */
} keel_policy_event;

/* A notification (Polly's telemetry, resilience4j's event publisher):
 * runs from a pipeline callback, may close the pipeline. */
typedef void (*keel_pipeline_event_cb)(keel_pipeline *p, const keel_policy_event *ev, void *data);

/* ---- pipeline ----------------------------------------------------------- */

typedef struct keel_pipeline_opts {
  const keel_policy *policies;     /* outermost first; copied; may be NULL when
                                      npolicies is 0 */
  size_t npolicies;                /* at most 32 */
  uint32_t max_calls;              /* calls accepted and not finished, thread-safe
                                      pushes included; beyond: KEEL_EFULL; default
                                      100000 */
  keel_pipeline_event_cb on_event; /* may be NULL */
  void *data;                      /* passed to on_event */
  keel_clock clock;                /* durations told to a breaker / hook;
                                      default: uv_now(loop). Timers (timeout,
                                      retry and hedging delays) run on the
                                      loop's time. */
  uint64_t reserved_[8];           /* ABI room: zero (opts_init does); never set */
} keel_pipeline_opts;

/* Zeroes the whole struct, then fills the defaults above (no policy).
 * NULL: no-op. Any thread. */
KEEL_EXTERN void keel_pipeline_opts_init(keel_pipeline_opts *opts);

/*
 * Checks opts (and every policy) without creating anything. Returns 0 (and
 * *why = NULL) or UV_EINVAL with a static reason in *why (why may be
 * NULL): NULL opts, more than 32 policies, an unknown kind, a NULL limiter,
 * breaker or fallback function, timeout_ms 0, a retry whose max_attempts is
 * 0 or whose backoff keel_backoff_validate() rejects, hedging max_attempts
 * 0 or above 16, bulkhead max_concurrent 0, max_calls 0. Any thread.
 */
KEEL_EXTERN int keel_pipeline_validate_opts(const keel_pipeline_opts *opts, const char **why);

/*
 * Creates a pipeline. opts and its policies are copied; the limiters and
 * breakers they name stay the caller's and must outlive the pipeline (close
 * the pipeline first). Calls no callback.
 * Returns 0 and sets *out; UV_EINVAL (NULL loop, opts or out; what
 * keel_pipeline_validate_opts() rejects); UV_ENOMEM; an error of
 * uv_async_init() or uv_mutex_init(). *out is untouched on failure and
 * nothing is left allocated. Loop thread only.
 */
KEEL_EXTERN int keel_pipeline_new(uv_loop_t *loop, const keel_pipeline_opts *opts,
                                  keel_pipeline **out);

/*
 * Runs one attempt of the operation. Called from a pipeline callback with
 * the attempt and the data given to keel_pipeline_execute(). It must report
 * exactly once with keel_attempt_done(), now or later from the loop thread,
 * also after it was told to stop (the close callback waits for that
 * report). It may close the pipeline.
 */
typedef void (*keel_pipeline_op_fn)(keel_attempt *a, void *data);

typedef struct keel_pipeline_result {
  int status;              /* 0 (or the operation's >= 0) or an error: the
                              operation's failure, KEEL_ERATELIMIT, KEEL_EOPEN,
                              KEEL_EPROBES, KEEL_EFULL, UV_ETIMEDOUT,
                              UV_ENOMEM (a call frame could not be allocated),
                              UV_ECANCELED (closed first), or what a fallback
                              returned */
  unsigned attempts;       /* attempts of the operation started */
  int policy;              /* index of the policy that produced status; -1:
                              the operation's own status */
  uint64_t retry_after_ms; /* KEEL_ERATELIMIT: when the limiter would allow;
                              else 0 */
  uint64_t duration_ms;    /* clock time from execute to done */
} keel_pipeline_result;

/* The result, exactly once per accepted call, from a pipeline callback
 * (never inside a keel call). It may close the pipeline. */
typedef void (*keel_pipeline_done_cb)(keel_pipeline *p, const keel_pipeline_result *r, void *data);

/*
 * Accepts one call: on a later loop iteration the outermost policy sees it.
 * data (the caller's) is passed to op, done, fallback and events.
 * Returns 0 (done will run exactly once); UV_EINVAL (NULL p, op or done);
 * KEEL_EFULL when max_calls are in flight; UV_ENOMEM; KEEL_ECLOSING after
 * keel_pipeline_close() began. On an error nothing is called back. Allocates
 * only when its free list of call frames is empty. Loop thread only.
 */
KEEL_EXTERN int keel_pipeline_execute(keel_pipeline *p, keel_pipeline_op_fn op,
                                      keel_pipeline_done_cb done, void *data);

/*
 * keel_pipeline_execute() from any thread, the loop's included (the queue's
 * thread-safe path: a mutex-guarded list and a uv_async_t). The call is
 * accepted on the loop thread later; op and done run on the loop thread.
 * Returns 0 (done will run exactly once, on the loop thread: UV_ENOMEM in
 * the result if the loop could not take the call, UV_ECANCELED if the
 * pipeline closed first); UV_EINVAL (NULL p, op or done); KEEL_EFULL when
 * max_calls are in flight or waiting; UV_ENOMEM; KEEL_ECLOSING after close
 * began. Threads must stop calling it before the close callback runs.
 * Thread-safe.
 */
KEEL_EXTERN int keel_pipeline_execute_threadsafe(keel_pipeline *p, keel_pipeline_op_fn op,
                                                 keel_pipeline_done_cb done, void *data);

/* ---- the attempt (per-attempt context) ---------------------------------- */

/*
 * Told once that the pipeline stopped waiting for this attempt: reason is
 * UV_ETIMEDOUT (a timeout around it expired) or UV_ECANCELED (a hedged
 * sibling won, or the pipeline closed). Stop the
 * work if you can; keel_attempt_done() is still owed (it may be called from
 * inside this callback). It may close the pipeline.
 */
typedef void (*keel_attempt_cancel_fn)(keel_attempt *a, int reason, void *data);

/*
 * Reports the attempt's outcome: 0 (or >= 0) for success, a negative error
 * for failure. Records it; the policies around it and done run later, never
 * inside this call. a must not be used after this call.
 * Returns 0; KEEL_ESTALE when the attempt had been told to stop (the report
 * is ignored; the memory is released); UV_EINVAL for NULL or a second
 * report. Loop thread only.
 */
KEEL_EXTERN int keel_attempt_done(keel_attempt *a, int status);

/* Sets the callback told when the pipeline stops waiting for this attempt
 * (replaces an earlier one; fn NULL removes it). If the attempt was already
 * told to stop, fn is not called: check keel_attempt_cancelled(). NULL a:
 * no-op. Loop thread only. */
KEEL_EXTERN void keel_attempt_on_cancel(keel_attempt *a, keel_attempt_cancel_fn fn, void *data);

/* 0 while the pipeline waits for this attempt; else why it stopped waiting
 * (UV_ETIMEDOUT or UV_ECANCELED). UV_EINVAL for NULL. Loop thread only. */
KEEL_EXTERN int keel_attempt_cancelled(const keel_attempt *a);

/* The attempt's number within its call, 1-based, counting every retry and
 * hedged attempt in start order. 0 for NULL. Loop thread only. */
KEEL_EXTERN unsigned keel_attempt_number(const keel_attempt *a);

/* The pipeline the attempt belongs to (NULL for NULL). Loop thread only. */
KEEL_EXTERN keel_pipeline *keel_attempt_pipeline(const keel_attempt *a);

/* ---- stats and close ---------------------------------------------------- */

typedef struct keel_pipeline_stats {
  uint64_t calls;               /* counter: calls accepted */
  uint64_t succeeded;           /* counter: done with status >= 0 */
  uint64_t failed;              /* counter: done with status < 0 */
  uint64_t attempts;            /* counter: operation attempts started */
  uint64_t ratelimited;         /* counter: KEEL_ERATELIMIT answers */
  uint64_t timeouts;            /* counter: timeouts expired */
  uint64_t retries;             /* counter: retries decided */
  uint64_t breaker_rejected;    /* counter: KEEL_EOPEN / KEEL_EPROBES answers */
  uint64_t fallbacks;           /* counter: fallback calls */
  uint64_t hedges;              /* counter: hedged attempts started (after the
                                   first) */
  uint64_t cancels;             /* counter: attempts told to stop */
  uint64_t bulkhead_rejected;   /* counter: KEEL_EFULL from a bulkhead */
  uint64_t in_flight;           /* gauge: calls accepted, done not yet run */
  uint64_t bulkhead_active;     /* gauge: calls inside bulkheads (all of them) */
  uint64_t bulkhead_queued;     /* gauge: calls waiting at bulkheads */
  uint64_t bulkhead_active_max; /* gauge: highest bulkhead_active of one bulkhead seen */
  uint64_t bulkhead_queued_max; /* gauge: highest bulkhead_queued of one bulkhead seen */
  uint64_t reserved_[8];        /* ABI room: filled with zero; never read */
} keel_pipeline_stats;

/* Fills *out. Does nothing when p or out is NULL. Loop thread only. */
KEEL_EXTERN void keel_pipeline_get_stats(keel_pipeline *p, keel_pipeline_stats *out);

struct keel_serve;

/*
 * Shows p on the keel_serve server s under name (keel/serve.h), as kind
 * "pipeline". The registration is dropped from s when p's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or the object closing). Loop thread only.
 */
KEEL_EXTERN int keel_pipeline_serve(struct keel_serve *s, keel_pipeline *p, const char *name);

/*
 * Closes the pipeline. NULL-safe; idempotent; may be called from inside
 * every callback of the pipeline. Calls nothing back inside this call. From
 * now on execute returns KEEL_ECLOSING. Calls accepted and not finished get
 * done(UV_ECANCELED) on a later iteration; their attempts in flight are
 * told to stop (UV_ECANCELED) and must still report. cb (may be NULL) runs
 * with (p, data) on a later iteration, after those done calls, once every
 * attempt has reported and every handle is closed; p is freed then and
 * uv_loop_close() can return 0. The limiters and breakers the policies name
 * are not closed. Loop thread only.
 */
KEEL_EXTERN void keel_pipeline_close(keel_pipeline *p, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_POLICY_H */
