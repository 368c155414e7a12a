/*
 * keel/retry.h — backoff policies and an asynchronous retry runner.
 *
 * A keel_backoff says how long to wait before retry number n: fixed,
 * exponential (base * factor^(n-1), capped), exponential with full jitter
 * (uniform in [0, capped exponential]) or decorrelated jitter
 * (min(cap, uniform in [base, previous * 3])), the formulas of the AWS
 * Architecture Blog's "Exponential Backoff And Jitter". Jitter draws from a
 * keel_rng that the caller seeds, so tests are deterministic.
 *
 * The runner runs an asynchronous operation, asks a classifier whether a
 * failure is worth retrying, waits the policy's delay on a uv_timer_t and
 * tries again, up to max_attempts and within an overall deadline:
 *
 *     static void attempt(keel_retry *r, unsigned n, void *data) {
 *       start_my_request(data, on_reply);     // on_reply calls
 *     }                                        // keel_retry_report(r, status)
 *     static void done(keel_retry *r, int status, unsigned attempts, void *d) {
 *       printf("%s after %u attempts\n", keel_strerror(status), attempts);
 *       keel_retry_close(r, NULL, NULL);
 *     }
 *     keel_retry_opts o; keel_retry_opts_init(&o);    // 100, 200, 400 ms
 *     keel_retry *r; keel_retry_start(loop, &o, attempt, done, ctx, &r);
 */
#ifndef KEEL_RETRY_H
#define KEEL_RETRY_H

#include <stdint.h>
#include <uv.h>

#include "keel/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- random source --------------------------------------------------- */

/* A small, fast, seedable generator (xoshiro128+-class). Plain value: copy
 * or embed it; no allocation, no global state. Not thread-safe per instance. */
typedef struct keel_rng {
  uint64_t state[2];
} keel_rng;

/* Seeds rng deterministically from seed (any value, 0 included). */
KEEL_EXTERN void keel_rng_seed(keel_rng *rng, uint64_t seed);

/* Returns the next 64 random bits. */
KEEL_EXTERN uint64_t keel_rng_next(keel_rng *rng);

/* Returns a uniform integer in [low, high] (inclusive); low when high < low. */
KEEL_EXTERN uint64_t keel_rng_between(keel_rng *rng, uint64_t low, uint64_t high);

/* ---- backoff policies ------------------------------------------------- */

typedef enum keel_backoff_kind {
  KEEL_BACKOFF_FIXED = 0,          /* base_ms every time */
  KEEL_BACKOFF_EXPONENTIAL,        /* base_ms * factor^(n-1), at most max_ms */
  KEEL_BACKOFF_FULL_JITTER,        /* uniform [0, exponential(n)] */
  KEEL_BACKOFF_DECORRELATED_JITTER /* min(max_ms, uniform [base_ms, prev*3]) */
} keel_backoff_kind;

/* A backoff policy: plain value, copied by whoever takes it. */
typedef struct keel_backoff {
  keel_backoff_kind kind;
  uint64_t base_ms; /* first delay (and the floor of decorrelated jitter) */
  double factor;    /* growth per retry for the exponential kinds, >= 1 */
  uint64_t max_ms;  /* cap on any delay; 0 means no cap */
} keel_backoff;

/* Fills b with a fixed delay of delay_ms. */
KEEL_EXTERN void keel_backoff_fixed(keel_backoff *b, uint64_t delay_ms);

/* Fills b with an exponential policy: base_ms, base_ms*factor, ... capped at
 * max_ms (0: uncapped). */
KEEL_EXTERN void keel_backoff_exponential(keel_backoff *b, uint64_t base_ms, double factor,
                                          uint64_t max_ms);

/* Fills b with exponential backoff with full jitter. */
KEEL_EXTERN void keel_backoff_full_jitter(keel_backoff *b, uint64_t base_ms, double factor,
                                          uint64_t max_ms);

/* Fills b with decorrelated jitter between base_ms and max_ms. */
KEEL_EXTERN void keel_backoff_decorrelated_jitter(keel_backoff *b, uint64_t base_ms,
                                                  uint64_t max_ms);

/*
 * Checks a policy. Returns 0, or UV_EINVAL with a static explanation in
 * *why (when why is not NULL): unknown kind, factor < 1 or not finite,
 * max_ms < base_ms (when max_ms != 0).
 */
KEEL_EXTERN int keel_backoff_validate(const keel_backoff *b, const char **why);

/*
 * Returns the delay before retry number `retry` (1 for the first retry).
 * prev_delay_ms is the delay this function returned for the previous retry
 * (0 before the first); only decorrelated jitter uses it. rng may be NULL
 * for the non-jitter kinds; a jitter kind with a NULL rng returns the
 * un-jittered exponential delay. Never overflows: saturates at max_ms, or at
 * UINT64_MAX / 2 without a cap.
 */
KEEL_EXTERN uint64_t keel_backoff_delay(const keel_backoff *b, unsigned retry,
                                        uint64_t prev_delay_ms, keel_rng *rng);

/* ---- retry runner ----------------------------------------------------- */

typedef struct keel_retry keel_retry;

/*
 * Starts attempt number `attempt` (1-based). The operation must report its
 * outcome exactly once with keel_retry_report(), now (inside this call) or
 * later from the loop thread.
 */
typedef void (*keel_retry_attempt_fn)(keel_retry *r, unsigned attempt, void *data);

/* Returns nonzero when a failure with this status is worth retrying. */
typedef int (*keel_retry_classify_fn)(int status, void *classify_data);

/*
 * The final result, called exactly once: 0 after a successful attempt; the
 * last failure's status when it was not retryable, when attempts ran out, or
 * when the next retry could only start after the deadline; UV_ETIMEDOUT when
 * the deadline had passed by the time a retry was due; UV_ECANCELED after
 * keel_retry_close(). `attempts` counts the attempts started. The runner
 * may be closed from inside this callback.
 */
typedef void (*keel_retry_done_cb)(keel_retry *r, int status, unsigned attempts, void *data);

typedef struct keel_retry_opts {
  keel_backoff backoff;            /* default: exponential 100 ms x2, cap 0 */
  unsigned max_attempts;           /* total attempts incl. the first; default 4
                                      (100/200/400 ms waits); >= 1 */
  uint64_t deadline_ms;            /* overall budget from start; 0 = none */
  keel_retry_classify_fn classify; /* NULL: all failures retryable except
                                      UV_ECANCELED, UV_EINVAL, KEEL_EABORTED */
  void *classify_data;
  uint64_t seed;    /* jitter seed; 0 = seed from uv_hrtime() */
  keel_clock clock; /* default: uv_now(loop) */
} keel_retry_opts;

/* Fills opts with the defaults above (the seeds' retryWithBackoff). */
KEEL_EXTERN void keel_retry_opts_init(keel_retry_opts *opts);

/*
 * Creates a runner and starts attempt 1 on a later loop iteration.
 *
 * attempt and done are required; data is passed to both.
 * Returns 0 and sets *out, or UV_EINVAL (NULL argument, max_attempts 0, bad
 * backoff) or UV_ENOMEM; *out is untouched on failure and nothing is called.
 * Loop thread only.
 */
KEEL_EXTERN int keel_retry_start(uv_loop_t *loop, const keel_retry_opts *opts,
                                 keel_retry_attempt_fn attempt, keel_retry_done_cb done, void *data,
                                 keel_retry **out);

/*
 * Reports the outcome of the attempt in flight: 0 for success or a negative
 * error. A report when no attempt is in flight is ignored (returns
 * UV_EINVAL). Returns 0 otherwise. Loop thread only.
 */
KEEL_EXTERN int keel_retry_report(keel_retry *r, int status);

/* Returns the number of attempts started so far. */
KEEL_EXTERN unsigned keel_retry_attempts(const keel_retry *r);

/* Returns the delay (ms) waited before the latest retry, 0 before any. */
KEEL_EXTERN uint64_t keel_retry_last_delay_ms(const keel_retry *r);

/*
 * Closes the runner; NULL-safe; may be called from inside any callback of it.
 * If done has not been called yet, a pending retry is cancelled and done is
 * called with UV_ECANCELED. An attempt in flight may still report (it is
 * ignored); the memory is released after that report, and close_cb (may be
 * NULL) is called on a later loop iteration once the timer is closed.
 */
KEEL_EXTERN void keel_retry_close(keel_retry *r, keel_close_cb close_cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_RETRY_H */
