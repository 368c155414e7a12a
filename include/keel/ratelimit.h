/*
 * keel/ratelimit.h — a local rate limiter: token bucket or GCRA.
 *
 * A limiter answers one question, many times a second: may this call go
 * now? The answer is "yes" or "no, but in retry_after_ms it may" (what an
 * HTTP server puts in Retry-After). A decision is a few integer operations
 * on the loop's cached time (uv_now) or an injected clock: no allocation, no
 * clock read of its own, no timer. Two algorithms:
 *
 *   KEEL_RATELIMIT_GCRA          the generic cell rate algorithm (redis-cell,
 *                                go-redis's redis_rate, Stripe's limiter):
 *                                `rate` calls per `period_ms`, spread evenly,
 *                                with bursts of up to `burst` calls. Smooth:
 *                                one call's worth of budget comes back every
 *                                period_ms / rate.
 *   KEEL_RATELIMIT_TOKEN_BUCKET  a bucket of `burst` tokens, refilled with
 *                                `rate` tokens every `period_ms` in one step
 *                                (System.Threading.RateLimiting's
 *                                TokenBucketRateLimiter, used by Polly v8).
 *
 *     keel_ratelimit_opts o;
 *     keel_ratelimit_opts_init(&o);          // GCRA, 100 per second, burst 100
 *     o.rate = 10; o.burst = 20;             // 10/s, bursts of 20
 *     keel_ratelimit *rl;
 *     if (keel_ratelimit_new(loop, &o, &rl) != 0) abort();
 *
 *     uint64_t wait_ms;
 *     if (keel_ratelimit_take(rl, 1, &wait_ms) == KEEL_ERATELIMIT)
 *       return reply_429(wait_ms);           // Retry-After: wait_ms
 *
 * A limiter can guard a pipeline (keel/policy.h: keel_policy_ratelimit()).
 * It calls no callback except the close callback. Everything is loop-thread
 * only (the limiter reads uv_now() of its loop); with an injected clock
 * that is safe to read from any thread, a limiter may be used from one other
 * thread at a time instead.
 */
#ifndef KEEL_RATELIMIT_H
#define KEEL_RATELIMIT_H

#include <stdint.h>
#include <uv.h>

#include "keel/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_ratelimit keel_ratelimit;

typedef enum keel_ratelimit_kind {
  KEEL_RATELIMIT_GCRA = 0,    /* smooth: one call back every period_ms / rate */
  KEEL_RATELIMIT_TOKEN_BUCKET /* stepwise: rate tokens back every period_ms */
} keel_ratelimit_kind;

typedef struct keel_ratelimit_opts {
  keel_ratelimit_kind kind; /* default KEEL_RATELIMIT_GCRA */
  uint64_t rate;            /* calls (tokens) per period; > 0; default 100 */
  uint64_t period_ms;       /* > 0; default 1000 */
  uint64_t burst;           /* calls allowed at once from a full budget (the
                               bucket's capacity); > 0; default 0 = rate */
  keel_clock clock;         /* default: uv_now(loop) */
  uint64_t reserved_[8];    /* ABI room: zero (opts_init does); never set */
} keel_ratelimit_opts;

/* Zeroes the whole struct, then fills the defaults above. NULL: no-op. Any
 * thread. */
KEEL_EXTERN void keel_ratelimit_opts_init(keel_ratelimit_opts *opts);

/*
 * Creates a limiter with a full budget (burst calls may go at once). opts is
 * copied. Calls no callback.
 * Returns 0 and sets *out; UV_EINVAL for a NULL loop, opts or out, an
 * unknown kind, rate, period_ms or burst out of range (rate and period_ms
 * must be > 0, at most one call per nanosecond, period_ms and burst at most
 * 2^32; keel_ratelimit_validate_opts() tells which); UV_ENOMEM. *out is
 * untouched on failure and nothing is allocated. Loop thread only.
 */
KEEL_EXTERN int keel_ratelimit_new(uv_loop_t *loop, const keel_ratelimit_opts *opts,
                                   keel_ratelimit **out);

/* Checks opts without creating anything: 0 (and *why = NULL) or UV_EINVAL
 * with a static reason in *why (why may be NULL). Any thread. */
KEEL_EXTERN int keel_ratelimit_validate_opts(const keel_ratelimit_opts *opts, const char **why);

/*
 * Takes n calls' worth of budget (usually 1) at the clock's current time.
 * Returns 0 when allowed (the budget is spent); KEEL_ERATELIMIT when not
 * (nothing is spent) and then sets *retry_after_ms, when retry_after_ms is
 * not NULL, to the time after which the same request would be allowed
 * (rounded up to whole ms, at least 1); UV_EINVAL for a NULL rl, n 0 or n >
 * burst (never allowable; *retry_after_ms untouched); KEEL_ECLOSING after
 * keel_ratelimit_close(). *retry_after_ms is untouched when allowed.
 * Allocates nothing, calls nothing. Loop thread only.
 */
KEEL_EXTERN int keel_ratelimit_take(keel_ratelimit *rl, uint64_t n, uint64_t *retry_after_ms);

/* Like keel_ratelimit_take() at the caller's time now_ms instead of the
 * clock (same errors; a now_ms before the limiter's latest time counts as
 * that time). For callers that already hold a timestamp. Loop thread only. */
KEEL_EXTERN int keel_ratelimit_take_at(keel_ratelimit *rl, uint64_t now_ms, uint64_t n,
                                       uint64_t *retry_after_ms);

/* Back to a full budget; counters are kept. Returns 0, UV_EINVAL for NULL,
 * KEEL_ECLOSING after close. Loop thread only. */
KEEL_EXTERN int keel_ratelimit_reset(keel_ratelimit *rl);

typedef struct keel_ratelimit_stats {
  uint64_t allowed;      /* counter: calls allowed (n per take) */
  uint64_t rejected;     /* counter: takes answered KEEL_ERATELIMIT */
  uint64_t available;    /* gauge: calls that could go now */
  uint64_t reserved_[8]; /* ABI room: filled with zero; never read */
} keel_ratelimit_stats;

/* Fills *out at the clock's current time. Does nothing when rl or out is
 * NULL. Loop thread only. */
KEEL_EXTERN void keel_ratelimit_get_stats(keel_ratelimit *rl, keel_ratelimit_stats *out);

/*
 * Closes the limiter. NULL-safe; idempotent. From now on take and reset
 * return KEEL_ECLOSING. cb (may be NULL) runs with (rl, data) on a later
 * loop iteration (the limiter keeps one never-started uv_timer_t for
 * this), after which rl is freed and uv_loop_close() can return 0. A
 * pipeline that uses rl must be closed first. Loop thread only.
 */
KEEL_EXTERN void keel_ratelimit_close(keel_ratelimit *rl, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_RATELIMIT_H */
