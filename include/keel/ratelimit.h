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
 *
 * Shared through Redis (keel_ratelimit_redis, at the end of this file): the
 * same GCRA in one Lua script on Redis's clock (like redis-cell and
 * go-redis's redis_rate), one key per tenant, so that every process using
 * the same Redis and prefix shares one budget per tenant. A decision is one
 * EVALSHA round trip, answered to a callback.
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
#include "keel/redis.h"

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

struct keel_serve;

/*
 * Shows rl on the keel_serve server s under name (keel/serve.h), as kind
 * "ratelimit". The registration is dropped from s when rl's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or the object closing). Loop thread only.
 */
KEEL_EXTERN int keel_ratelimit_serve(struct keel_serve *s, keel_ratelimit *rl, const char *name);

/*
 * Closes the limiter. NULL-safe; idempotent. From now on take and reset
 * return KEEL_ECLOSING. cb (may be NULL) runs with (rl, data) on a later
 * loop iteration (the limiter keeps one never-started uv_timer_t for
 * this), after which rl is freed and uv_loop_close() can return 0. A
 * pipeline that uses rl must be closed first. Loop thread only.
 */
KEEL_EXTERN void keel_ratelimit_close(keel_ratelimit *rl, keel_close_cb cb, void *data);

/* ---- shared through Redis ---------------------------------------------- */

typedef struct keel_ratelimit_redis keel_ratelimit_redis;

typedef struct keel_ratelimit_redis_opts {
  uint64_t rate;         /* calls per period per tenant; > 0; default 100 */
  uint64_t period_ms;    /* > 0; default 1000 */
  uint64_t burst;        /* > 0; default 0 = rate */
  const char *prefix;    /* key prefix (copied), the key is prefix + tenant;
                            default "keel:rl:" */
  uint64_t timeout_ms;   /* per decision (keel_redis_eval_timeout); 0 (default):
                            the client's command_timeout_ms */
  uint64_t reserved_[8]; /* ABI room: zero (opts_init does); never set */
} keel_ratelimit_redis_opts;

/* Zeroes the whole struct, then fills the defaults above. NULL: no-op. Any
 * thread. */
KEEL_EXTERN void keel_ratelimit_redis_opts_init(keel_ratelimit_redis_opts *opts);

/*
 * Creates a shared limiter on client (the caller's; it must stay open until
 * this limiter's close callback). opts is copied. Calls no callback; sends
 * nothing until the first take.
 * The script (KEYS[1] = prefix + tenant; ARGV = emission interval and burst
 * tolerance in microseconds, n) reads Redis's TIME, keeps the tenant's
 * theoretical arrival time in its key (which expires when the tenant's
 * budget is full again) and answers {allowed, retry_after_us, remaining}.
 * Every process must use the same rate, period_ms and burst for a prefix.
 * Returns 0 and sets *out; UV_EINVAL for a NULL client, opts or out, or
 * rate, period_ms, burst out of range (as keel_ratelimit_validate_opts()
 * for GCRA, at most one call per microsecond), or a prefix longer than 200
 * bytes; KEEL_ECLOSING when keel_redis_close() was called on client;
 * UV_ENOMEM. Nothing is created and *out is untouched on failure. Loop
 * thread only.
 */
KEEL_EXTERN int keel_ratelimit_redis_new(keel_redis *client, const keel_ratelimit_redis_opts *opts,
                                         keel_ratelimit_redis **out);

/*
 * The decision for one take, exactly once, on a later loop iteration (from
 * the Redis client's reply callback): status 0 (allowed: the budget is
 * spent), KEEL_ERATELIMIT (not allowed; retry_after_ms: when the same take
 * would be allowed, at least 1), or the Redis error of the round trip
 * (UV_ETIMEDOUT, KEEL_EREDIS, KEEL_ECONN, KEEL_EPROTO for a reply of the
 * wrong shape, UV_ECANCELED when the client or the limiter was closed
 * first: a take sent may have spent budget). remaining: calls that could go
 * now (0 on an error). The limiter may be closed from inside.
 */
typedef void (*keel_ratelimit_redis_cb)(keel_ratelimit_redis *rl, int status,
                                        uint64_t retry_after_ms, uint64_t remaining, void *data);

/*
 * Asks Redis for n calls' worth of tenant's budget (one EVALSHA; tenant
 * is copied, any bytes, at most 300). cb is required; data is passed to it.
 * Allocates only when its free list of requests is empty.
 * Returns 0 (cb will run exactly once); UV_EINVAL (NULL rl, tenant or cb, n
 * 0 or above burst, tenant too long); KEEL_ECLOSING after close began; or
 * what keel_redis_eval() refuses with (UV_ENOBUFS, KEEL_ECONN,
 * KEEL_ECLOSING, UV_ENOMEM). Nothing is called back on an error. Loop thread
 * only.
 */
KEEL_EXTERN int keel_ratelimit_redis_take(keel_ratelimit_redis *rl, const char *tenant, uint64_t n,
                                          keel_ratelimit_redis_cb cb, void *data);

typedef struct keel_ratelimit_redis_stats {
  uint64_t allowed;      /* counter: takes allowed */
  uint64_t rejected;     /* counter: takes answered KEEL_ERATELIMIT */
  uint64_t errors;       /* counter: takes answered with an error */
  uint64_t in_flight;    /* gauge: takes sent and not answered */
  uint64_t reserved_[8]; /* ABI room: filled with zero; never read */
} keel_ratelimit_redis_stats;

/* Fills *out. Does nothing for NULL rl or out. Loop thread only. */
KEEL_EXTERN void keel_ratelimit_redis_get_stats(const keel_ratelimit_redis *rl,
                                                keel_ratelimit_redis_stats *out);

/*
 * Shows rl on the keel_serve server s under name (keel/serve.h), as kind
 * "ratelimit_redis". The registration is dropped from s when rl's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or the object closing). Loop thread only.
 */
KEEL_EXTERN int keel_ratelimit_redis_serve(struct keel_serve *s, keel_ratelimit_redis *rl,
                                           const char *name);

/*
 * Closes the limiter. NULL-safe; idempotent; may be called from inside its
 * callbacks. Takes from now on return KEEL_ECLOSING; takes in flight are
 * answered UV_ECANCELED when their reply comes (their outcome is dropped).
 * cb (may be NULL) runs with (rl, data) on a later loop iteration once
 * every take in flight has been answered; rl is freed then. Loop thread
 * only.
 */
KEEL_EXTERN void keel_ratelimit_redis_close(keel_ratelimit_redis *rl, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_RATELIMIT_H */
