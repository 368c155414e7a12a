/*
 * keel/retry.h — backoff policies and an asynchronous retry runner.
 *
 * A keel_backoff says how long to wait before retry number n: fixed,
 * exponential (min(cap, base * factor^(n-1))), exponential with full jitter
 * (uniform in [0, capped exponential]) or decorrelated jitter
 * (min(cap, uniform in [base, previous * 3])), the formulas of the AWS
 * Architecture Blog's "Exponential Backoff And Jitter". Jitter draws from a
 * keel_rng that the caller seeds, so tests are deterministic.
 *
 * The runner runs an asynchronous operation, asks a classifier whether a
 * failure is worth retrying, waits the policy's delay on a uv_timer_t and
 * tries again, up to max_attempts and within an overall deadline; one final
 * callback gets the result and the number of attempts:
 *
 *     static void attempt(keel_retry *r, unsigned n, void *data) {
 *       start_my_request(data, on_reply);    // on_reply calls
 *     }                                       // keel_retry_done(r, status)
 *     static void done(keel_retry *r, int status, unsigned attempts, void *d) {
 *       printf("%s after %u attempts\n", keel_strerror(status), attempts);
 *       keel_retry_close(r, NULL, NULL);
 *     }
 *     keel_retry_opts o;
 *     keel_retry_opts_init(&o);                // 4 attempts: 100, 200, 400 ms
 *     keel_retry *r;
 *     int rc = keel_retry_start(loop, &o, attempt, done, ctx, &r);
 *
 * Every user callback of a runner (attempt, classify, on_retry, done) runs
 * from the runner's own timer callback, never from inside
 * keel_retry_start(), keel_retry_done() or keel_retry_close(): the done
 * that a close owes (UV_ECANCELED) comes on a later loop iteration, before
 * the close callback. keel_retry_close() may be called from inside every
 * callback of the runner.
 */
#ifndef KEEL_RETRY_H
#define KEEL_RETRY_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- random source --------------------------------------------------- */

/* A small, fast, seedable generator (xoroshiro128+). Plain value: copy or
 * embed it; no allocation, no global state. Not thread-safe per instance. */
typedef struct keel_rng {
  uint64_t state[2];
} keel_rng;

/* Seeds rng deterministically from seed (any value, 0 included): the same
 * seed gives the same sequence on every platform. NULL rng: no-op. Any
 * thread (one rng per thread). */
KEEL_EXTERN void keel_rng_seed(keel_rng *rng, uint64_t seed);

/* Returns the next 64 random bits (0 for a NULL rng). Any thread (one rng
 * per thread). */
KEEL_EXTERN uint64_t keel_rng_next(keel_rng *rng);

/* Returns a uniform, unbiased integer in [low, high] (both inclusive; the
 * whole uint64_t range works); low when high <= low or rng is NULL. Any
 * thread (one rng per thread). */
KEEL_EXTERN uint64_t keel_rng_between(keel_rng *rng, uint64_t low, uint64_t high);

/* ---- backoff policies ------------------------------------------------- */

typedef enum keel_backoff_kind {
  KEEL_BACKOFF_FIXED = 0,           /* min(max_ms, base_ms) every time */
  KEEL_BACKOFF_EXPONENTIAL,         /* min(max_ms, base_ms * factor^(n-1)) */
  KEEL_BACKOFF_FULL_JITTER,         /* uniform [0, exponential(n)] */
  KEEL_BACKOFF_DECORRELATED_JITTER, /* min(max_ms, uniform [base_ms, prev*3]) */
  KEEL_BACKOFF_LINEAR               /* min(max_ms, base_ms * (1 + factor*(n-1))) */
} keel_backoff_kind;

/* A backoff policy: plain value, copied by whoever takes it. Fill it with
 * one of the four functions below, then change fields if needed. */
typedef struct keel_backoff {
  keel_backoff_kind kind;
  uint64_t base_ms; /* first delay (and the floor of decorrelated jitter) */
  double factor;    /* growth per retry for EXPONENTIAL and FULL_JITTER,
                       >= 1; for LINEAR the step in units of base_ms, >= 0
                       (1: base, 2*base, 3*base, ...); FIXED and
                       DECORRELATED_JITTER ignore it (any value, 0 included,
                       is accepted for them) */
  uint64_t max_ms;  /* cap on any delay; 0 means no cap */
} keel_backoff;

/* The four fillers below set every field of b (it needs no other
 * initialisation), validate nothing (see keel_backoff_validate()) and work
 * on any thread. */

/* Fills b with a fixed delay of delay_ms (no cap). NULL b: no-op. */
KEEL_EXTERN void keel_backoff_fixed(keel_backoff *b, uint64_t delay_ms);

/* Fills b with an exponential policy: base_ms, base_ms*factor, ... capped at
 * max_ms (0: uncapped). Example: (100, 2.0, 1000) gives 100, 200, 400, 800,
 * 1000, 1000, ... NULL b: no-op. */
KEEL_EXTERN void keel_backoff_exponential(keel_backoff *b, uint64_t base_ms, double factor,
                                          uint64_t max_ms);

/* Fills b with exponential backoff with full jitter: retry n waits a uniform
 * draw in [0, min(max_ms, base_ms*factor^(n-1))]. NULL b: no-op. */
KEEL_EXTERN void keel_backoff_full_jitter(keel_backoff *b, uint64_t base_ms, double factor,
                                          uint64_t max_ms);

/* Fills b with decorrelated jitter: retry n waits min(max_ms, uniform in
 * [base_ms, 3 * previous delay]), the first previous delay being base_ms.
 * base_ms must be > 0 (from 0 it could never grow). NULL b: no-op. */
KEEL_EXTERN void keel_backoff_decorrelated_jitter(keel_backoff *b, uint64_t base_ms,
                                                  uint64_t max_ms);

/* Fills b with a linear policy (Polly v8's DelayBackoffType.Linear): retry n
 * waits min(max_ms, base_ms * n): 100, 200, 300, ... for base_ms 100 (factor
 * 1; set b->factor for another step: base_ms * (1 + factor * (n-1))). NULL
 * b: no-op. */
KEEL_EXTERN void keel_backoff_linear(keel_backoff *b, uint64_t base_ms, uint64_t max_ms);

/*
 * Checks a policy. Returns 0 (and sets *why to NULL), or UV_EINVAL with a
 * static explanation in *why (when why is not NULL): NULL policy, unknown
 * kind, factor < 1 or not finite for EXPONENTIAL and FULL_JITTER, factor < 0
 * or not finite for LINEAR (the other kinds ignore the factor), max_ms < base_ms (when max_ms !=
 * 0), decorrelated jitter with base_ms 0. Thread-safe.
 */
KEEL_EXTERN int keel_backoff_validate(const keel_backoff *b, const char **why);

/*
 * Returns the delay in ms before retry number `retry` (1 for the first
 * retry; 0 is treated as 1). prev_delay_ms is the delay this function
 * returned for the previous retry (0 before the first); only decorrelated
 * jitter uses it. rng may be NULL: the jitter kinds then return the upper
 * end of their range (the capped exponential delay, or min(max_ms,
 * 3 * prev) for decorrelated jitter). Never overflows for any retry number:
 * results saturate at max_ms, or at UINT64_MAX / 2 without a cap. A policy
 * that keel_backoff_validate() rejects still gives a bounded delay (a bad
 * factor acts as 1). NULL b: 0. Thread-safe when rng is not shared.
 */
KEEL_EXTERN uint64_t keel_backoff_delay(const keel_backoff *b, unsigned retry,
                                        uint64_t prev_delay_ms, keel_rng *rng);

/* ---- retry runner ----------------------------------------------------- */

typedef struct keel_retry keel_retry;

/*
 * Starts attempt number `attempt` (1-based). The operation must report its
 * outcome exactly once with keel_retry_done(), either inside this call or
 * later from the loop thread, even after keel_retry_close() (that report
 * is then ignored, and the runner's memory waits for it).
 */
typedef void (*keel_retry_attempt_fn)(keel_retry *r, unsigned attempt, void *data);

/*
 * Returns nonzero when a failure with this status is worth retrying. Called
 * only for failures (status < 0) while attempts remain.
 */
typedef int (*keel_retry_classify_fn)(int status, void *classify_data);

/*
 * Optional hook called when a retry has been decided, before the wait
 * starts (Polly's OnRetry, resilience4j's onRetry event): `next_attempt`
 * will start after `delay_ms`; `status` is the failure that caused it. Good
 * for logging and metrics. It may close the runner.
 */
typedef void (*keel_retry_event_cb)(keel_retry *r, unsigned next_attempt, int status,
                                    uint64_t delay_ms, void *data);

/*
 * What the runner knows about the attempt that just ended, for the hooks
 * below (a plain value, valid during the call only).
 */
typedef struct keel_retry_info {
  unsigned attempt;        /* the attempt that ended (1-based) */
  int status;              /* its status: < 0, or >= 0 when retried on its result */
  void *result;            /* what keel_retry_done_ex() reported with it; NULL otherwise */
  uint64_t duration_ms;    /* how long it ran (start to report, on opts.clock) */
  uint64_t retry_after_ms; /* the server's hint reported with it (Retry-After); 0: none */
  uint64_t delay_ms;       /* delay_fn: the delay keel proposes; on_retry_info: the
                              delay decided */
  uint64_t reserved_[4];   /* zero */
} keel_retry_info;

/*
 * Decides whether a *successful* outcome (status >= 0) is still worth
 * retrying, from the result reported with keel_retry_done_ex() (Polly's
 * ShouldHandle on a result, resilience4j's retryOnResult): e.g. an HTTP 503
 * response. Nonzero: retry. Called with opts.classify_data.
 */
typedef int (*keel_retry_result_fn)(int status, void *result, void *classify_data);

/*
 * Chooses the delay before the next attempt (Polly's DelayGenerator):
 * info->delay_ms is what keel would wait (the backoff, jitter included, and
 * at least info->retry_after_ms). Return the delay to wait, or UINT64_MAX to
 * stop retrying (done then gets the failure). Called from the runner's
 * timer; it may close the runner (the return value is then ignored).
 */
typedef uint64_t (*keel_retry_delay_fn)(keel_retry *r, const keel_retry_info *info, void *data);

/* on_retry with everything known about the failed attempt, its duration
 * included (Polly's OnRetry arguments). Called where on_retry is, after
 * it; it may close the runner. */
typedef void (*keel_retry_info_cb)(keel_retry *r, const keel_retry_info *info, void *data);

/* ---- retry budget ------------------------------------------------------- */

/*
 * A retry budget shared by many runners (Envoy's retry budget, Finagle's
 * RetryBudget): over a sliding window, retries may be at most
 * min_retries + ratio * calls, so that retries cannot multiply the load on
 * a dependency that is already failing. Runners created with opts.budget
 * count each start as a call and ask the budget before every retry; a
 * refused retry ends the runner with the failure it has (counted in the
 * budget's stats.refused). Without a loop or timer of its own: it reads
 * its clock when used. Loop thread only (like the runners).
 */
typedef struct keel_retry_budget keel_retry_budget;

typedef struct keel_retry_budget_opts {
  double ratio;          /* retries per call allowed in the window; default 0.2;
                            in [0, 1000] */
  uint32_t min_retries;  /* retries allowed per window whatever the calls; default 10 */
  uint64_t window_ms;    /* sliding window, in 10 buckets; default 10000; >= 10 */
  keel_clock clock;      /* default uv_now(loop) */
  uint64_t reserved_[8]; /* ABI room: zero (opts_init does); never set */
} keel_retry_budget_opts;

/* Zeroes the whole struct, then fills the defaults above. NULL: no-op. Any
 * thread. */
KEEL_EXTERN void keel_retry_budget_opts_init(keel_retry_budget_opts *opts);

/*
 * Creates a budget; opts is copied. loop is only read for uv_now() when no
 * clock is injected. Returns 0 and sets *out; UV_EINVAL (NULL loop, opts
 * or out, ratio outside [0, 1000] or not finite, window_ms < 10); UV_ENOMEM.
 * *out is untouched on failure. Free it with keel_retry_budget_free() once
 * no runner uses it. Loop thread only.
 */
KEEL_EXTERN int keel_retry_budget_new(uv_loop_t *loop, const keel_retry_budget_opts *opts,
                                      keel_retry_budget **out);

/* Frees the budget (NULL-safe); no runner may use it any more. */
KEEL_EXTERN void keel_retry_budget_free(keel_retry_budget *b);

/* For use without a runner: counts one call. NULL: no-op. */
KEEL_EXTERN void keel_retry_budget_record_call(keel_retry_budget *b);

/* For use without a runner: asks for one retry; true (counted) when the
 * window has room, false (counted in refused) otherwise or for NULL. */
KEEL_EXTERN bool keel_retry_budget_try_retry(keel_retry_budget *b);

typedef struct keel_retry_budget_stats {
  uint64_t calls;          /* counter */
  uint64_t retries;        /* counter: retries granted */
  uint64_t refused;        /* counter: retries refused */
  uint64_t window_calls;   /* gauge: calls in the window */
  uint64_t window_retries; /* gauge: retries in the window */
  uint64_t reserved_[8];   /* ABI room: filled with zero */
} keel_retry_budget_stats;

/* Fills *out; does nothing for NULL b or out. */
KEEL_EXTERN void keel_retry_budget_get_stats(keel_retry_budget *b, keel_retry_budget_stats *out);

/*
 * The final result, called exactly once, from the runner's timer (never
 * inside a keel call):
 *   0             an attempt succeeded;
 *   the last failure's status
 *                 when it was not retryable, when max_attempts ran out, or
 *                 when the deadline stopped the retries (the next retry
 *                 would have started after it): the deadline never turns
 *                 the result into UV_ETIMEDOUT, so the caller sees why the
 *                 last attempt failed;
 *   KEEL_EEXHAUSTED
 *                 the last attempt succeeded (status >= 0) but
 *                 opts.retry_result still wanted a retry and none was left
 *                 (max_attempts, deadline, budget or delay_fn): its result
 *                 is keel_retry_result();
 *   UV_ECANCELED  keel_retry_close() came first.
 * `attempts` counts the attempts started (0 when closed before the first).
 * The runner stays allocated until keel_retry_close(), which may be called
 * from inside this callback (and must be called at some point).
 */
typedef void (*keel_retry_done_cb)(keel_retry *r, int status, unsigned attempts, void *data);

typedef struct keel_retry_opts {
  keel_backoff backoff;            /* default: exponential 100 ms x2, no cap */
  unsigned max_attempts;           /* total attempts incl. the first; default 4
                                      (waits of 100, 200, 400 ms); >= 1 */
  uint64_t deadline_ms;            /* overall budget from keel_retry_start(); a
                                      retry that would start after it is not
                                      started; an attempt in flight is never
                                      interrupted; 0 = none (default) */
  keel_retry_classify_fn classify; /* NULL (default): every failure is
                                      retryable except UV_ECANCELED, UV_EINVAL,
                                      UV_ENOMEM, KEEL_EABORTED, KEEL_ECLOSING */
  void *classify_data;
  uint64_t seed;                     /* jitter seed; 0 (default) = from uv_hrtime() */
  keel_clock clock;                  /* deadline clock; default: uv_now(loop) */
  keel_retry_event_cb on_retry;      /* NULL (default): no hook */
  double jitter;                     /* percentage jitter (Polly UseJitter, resilience4j
                                        randomizationFactor): each delay is drawn uniformly
                                        in [d * (1 - jitter), d * (1 + jitter)]; in [0, 1];
                                        0 (default): none */
  keel_retry_result_fn retry_result; /* NULL (default): a status >= 0 ends the runner */
  keel_retry_delay_fn delay_fn;      /* NULL (default): the backoff (with jitter), at
                                        least the reported retry_after_ms */
  keel_retry_info_cb on_retry_info;  /* NULL (default): no hook */
  keel_retry_budget *budget;         /* NULL (default): none; shared, not copied: it
                                        must outlive the runner */
  uint64_t reserved_[3];             /* ABI room: zero (opts_init does); never set */
} keel_retry_opts;

/* Zeroes the whole struct, then fills the defaults above: the seeds'
 * retryWithBackoff (up to 4 attempts, waiting 100, 200 and 400 ms between
 * them). NULL: no-op. Any thread. */
KEEL_EXTERN void keel_retry_opts_init(keel_retry_opts *opts);

/*
 * The classifier used when opts.classify is NULL: returns 0 for
 * UV_ECANCELED, UV_EINVAL, UV_ENOMEM, KEEL_EABORTED and KEEL_ECLOSING (and
 * for status >= 0), nonzero for every other error. classify_data is unused.
 * Handy to extend: `return status != MY_FATAL && keel_retry_default_classify(status, NULL);`
 * Any thread.
 */
KEEL_EXTERN int keel_retry_default_classify(int status, void *classify_data);

/*
 * Creates a runner and starts attempt 1 on a later loop iteration.
 *
 * opts     copied; not needed after the call.
 * attempt  required; starts one attempt.
 * done     required; receives the result exactly once.
 * data     passed to attempt, on_retry and done; owned by the caller.
 *
 * Returns 0 and sets *out (the runner is the caller's until
 * keel_retry_close(), which must be called at some point), or UV_EINVAL
 * (NULL loop, opts, attempt, done or out; max_attempts 0; a backoff that
 * keel_backoff_validate() rejects; jitter outside [0, 1]), UV_ENOMEM, or an error of
 * uv_timer_init(); *out is untouched on failure, nothing is allocated and
 * nothing is called. Loop thread only.
 */
KEEL_EXTERN int keel_retry_start(uv_loop_t *loop, const keel_retry_opts *opts,
                                 keel_retry_attempt_fn attempt, keel_retry_done_cb done, void *data,
                                 keel_retry **out);

/*
 * Reports the outcome of the attempt in flight (the "operation finished"
 * call; keel_retry_report() is its old name): 0 (or any status >= 0) for
 * success, a negative error for failure. It only records the outcome: the
 * classifier, on_retry, the next attempt or done run later from the
 * runner's timer, never inside this call, so reporting from inside attempt
 * (synchronously) is fine and 100 000 immediate failures do not grow the
 * stack.
 *
 * Returns 0; UV_EINVAL for a NULL runner or when no attempt is in flight
 * (a second report for the same attempt; nothing changes); KEEL_ECLOSING
 * when no attempt is in flight and the runner is closing. After
 * keel_retry_close(), the report of the attempt that was in flight returns
 * 0, is ignored and lets the runner finish closing; the runner must not be
 * used after its close callback. Loop thread only.
 */
KEEL_EXTERN int keel_retry_done(keel_retry *r, int status);

/*
 * keel_retry_done() with the attempt's result and the server's hint:
 * result (the caller's, never freed by keel) goes to opts.retry_result,
 * the hooks and keel_retry_result(); retry_after_ms (0: none) is the least
 * delay before the next attempt unless delay_fn decides otherwise (an
 * HTTP Retry-After or a gRPC pushback). Same returns as keel_retry_done().
 * Loop thread only.
 */
KEEL_EXTERN int keel_retry_done_ex(keel_retry *r, int status, void *result,
                                   uint64_t retry_after_ms);

/* Deprecated: the old name of keel_retry_done(), kept (same function,
 * same ABI) for programs written against keel 0.1. */
KEEL_EXTERN int keel_retry_report(keel_retry *r, int status);

/* The result reported with the latest keel_retry_done_ex() (NULL when
 * none); answers until the close callback. Loop thread only. */
KEEL_EXTERN void *keel_retry_result(const keel_retry *r);

/* The three getters below never fail, answer until the close callback (0
 * for NULL) and are loop-thread only. */

/* Returns the number of attempts started so far (0 for NULL). */
KEEL_EXTERN unsigned keel_retry_attempts(const keel_retry *r);

/* Returns the delay (ms) waited before the latest retry, 0 before any. */
KEEL_EXTERN uint64_t keel_retry_last_delay_ms(const keel_retry *r);

/* Returns the status of the latest failed attempt, 0 when none failed. */
KEEL_EXTERN int keel_retry_last_status(const keel_retry *r);

/*
 * Closes the runner; NULL-safe; idempotent (a second call does nothing);
 * may be called from inside any callback of the runner. Calls nothing back
 * inside this call.
 *
 * If done has not been called yet, it is called once on a later loop
 * iteration, before close_cb: with 0 when the attempt had already reported
 * success (the outcome was only waiting for the timer), with UV_ECANCELED
 * otherwise (a pending retry is cancelled, an attempt in flight is
 * abandoned). No attempt, classify or on_retry runs after the close.
 *
 * close_cb (may be NULL) is called with r and data on a later loop
 * iteration, after done, once the timer is closed and, when an attempt was
 * in flight, after that attempt has reported (keel_retry_done): until
 * then the memory stays valid so a late report is safe. After close_cb, r
 * is freed and uv_loop_close() can return 0. Loop thread only.
 */
KEEL_EXTERN void keel_retry_close(keel_retry *r, keel_close_cb close_cb, void *data);

struct keel_serve;

/*
 * Shows r on the keel_serve server s under name (keel/serve.h), as kind
 * "retry". The registration is dropped from s when r's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or r closing). Loop thread only.
 */
KEEL_EXTERN int keel_retry_serve(struct keel_serve *s, keel_retry *r, const char *name);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_RETRY_H */
