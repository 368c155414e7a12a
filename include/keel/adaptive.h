/*
 * keel/adaptive.h — an adaptive concurrency limit.
 *
 * A limit on the number of operations in flight that follows their measured
 * latency, after Netflix's concurrency-limits and Envoy's adaptive
 * concurrency filter: while latency stays at its unloaded level the limit
 * grows; once queueing inside the dependency makes latency rise, it shrinks.
 * The queue (keel_queue_opts.adaptive) and the policies' bulkhead use it; a
 * program can drive it by hand around any call:
 *
 *     keel_adaptive_opts o;
 *     keel_adaptive_opts_init(&o);        // gradient, limit 20 within 1..1000
 *     keel_adaptive *lim;
 *     if (keel_adaptive_new(&o, &lim) != 0) abort();
 *     if (!keel_adaptive_try_acquire(lim)) return reject_or_wait();
 *     ... the call, which took rtt (any unit, the same for every sample) ...
 *     keel_adaptive_release(lim, rtt, KEEL_ADAPTIVE_SUCCESS);
 *     keel_adaptive_free(lim);
 *
 * Two algorithms. GRADIENT (default; Envoy's gradient controller): samples
 * are averaged over a window of completions; min_rtt is the lowest window
 * average seen (the unloaded latency); after each window
 *     gradient  = clamp(min_rtt * (1 + rtt_tolerance) / window_rtt, 0.5, 2)
 *     new_limit = limit * gradient + sqrt(limit)
 * so that, with latency flat, the limit grows by sqrt(limit) per window, and
 * settles where the latency excess balances that headroom. AIMD: after each
 * window, limit + 1 when the window's latency stayed below
 * min_rtt * (1 + rtt_tolerance) (or below aimd_latency when set) and no
 * sample was a drop, limit * aimd_backoff otherwise. Either way the limit
 * stays within [min_limit, max_limit] and only grows while it is used (some
 * moment of the window had at least half the limit in flight).
 *
 * No loop, no clock, no callbacks and no allocation after keel_adaptive_new():
 * try_acquire and release are a few arithmetic operations. Not thread-safe:
 * one thread at a time (the loop thread, for the queue and the policies).
 */
#ifndef KEEL_ADAPTIVE_H
#define KEEL_ADAPTIVE_H

#include <stdbool.h>
#include <stdint.h>

#include "keel/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_adaptive keel_adaptive;

typedef enum keel_adaptive_algorithm {
  KEEL_ADAPTIVE_GRADIENT = 0, /* Envoy's gradient controller (default) */
  KEEL_ADAPTIVE_AIMD          /* additive increase, multiplicative decrease */
} keel_adaptive_algorithm;

/* How one finished operation counts. */
typedef enum keel_adaptive_outcome {
  KEEL_ADAPTIVE_SUCCESS = 0, /* a latency sample */
  KEEL_ADAPTIVE_DROPPED,     /* an overload signal (timeout, rejected by the dependency):
                                a sample of its rtt, and AIMD backs off */
  KEEL_ADAPTIVE_IGNORE       /* frees the slot, no sample (a cancelled call) */
} keel_adaptive_outcome;

typedef struct keel_adaptive_opts {
  keel_adaptive_algorithm algorithm; /* default KEEL_ADAPTIVE_GRADIENT */
  uint32_t initial_limit;            /* default 20; clamped into [min_limit, max_limit] */
  uint32_t min_limit;                /* default 1; >= 1 */
  uint32_t max_limit;                /* default 1000; >= min_limit */
  uint32_t window_samples;           /* completions per window; 0 (default): the current
                                        limit, at least 10 */
  double rtt_tolerance;              /* latency excess over min_rtt taken as unloaded;
                                        default 0 (GRADIENT), 0.1 (AIMD is set to this when
                                        left 0); >= 0 */
  double aimd_backoff;               /* AIMD: factor on an overloaded window; in (0, 1),
                                        default 0.9 */
  uint64_t aimd_latency;             /* AIMD: a window average above this is overload
                                        (same unit as the samples); 0 (default): use
                                        min_rtt * (1 + rtt_tolerance) */
  uint64_t reserved_[8];             /* ABI room: zero (opts_init does); never set */
} keel_adaptive_opts;

/* Zeroes the whole struct, then fills the defaults above. NULL: no-op. Any
 * thread. */
KEEL_EXTERN void keel_adaptive_opts_init(keel_adaptive_opts *opts);

/*
 * Checks opts without creating anything. Returns 0 (and sets *why to NULL)
 * or UV_EINVAL (NULL opts, min_limit 0, max_limit < min_limit, a negative or
 * non-finite rtt_tolerance, aimd_backoff outside (0, 1), an unknown
 * algorithm) with a static explanation in *why when why is not NULL. Any
 * thread.
 */
KEEL_EXTERN int keel_adaptive_validate_opts(const keel_adaptive_opts *opts, const char **why);

/*
 * Creates a limiter; opts is copied. Returns 0 and sets *out; UV_EINVAL for
 * NULL opts or out or bad options (see keel_adaptive_validate_opts());
 * UV_ENOMEM. *out is untouched on failure. Free it with keel_adaptive_free().
 * Any thread (the object is then used by one thread at a time).
 */
KEEL_EXTERN int keel_adaptive_new(const keel_adaptive_opts *opts, keel_adaptive **out);

/* Frees the limiter. NULL-safe. Calls nothing. */
KEEL_EXTERN void keel_adaptive_free(keel_adaptive *a);

/*
 * Takes a slot when fewer than limit operations are in flight: returns true
 * (release it later exactly once with keel_adaptive_release()), or false
 * (nothing taken; counted in stats.rejected). false for NULL. Allocates
 * nothing.
 */
KEEL_EXTERN bool keel_adaptive_try_acquire(keel_adaptive *a);

/*
 * Whether try_acquire would succeed now (in_flight < limit), without taking
 * anything or counting a rejection. false for NULL.
 */
KEEL_EXTERN bool keel_adaptive_has_room(const keel_adaptive *a);

/*
 * Gives back a slot taken by try_acquire and records the operation's
 * latency rtt (any unit, the same for every sample; 0 counts as 1). May move
 * the limit (at the end of a window). Returns 0; UV_EINVAL for NULL a, an
 * unknown outcome, or no slot in flight (nothing changed). Allocates
 * nothing.
 */
KEEL_EXTERN int keel_adaptive_release(keel_adaptive *a, uint64_t rtt,
                                      keel_adaptive_outcome outcome);

/* The current limit (0 for NULL). */
KEEL_EXTERN uint32_t keel_adaptive_limit(const keel_adaptive *a);

typedef struct keel_adaptive_stats {
  uint32_t limit;     /* gauge: current limit */
  uint32_t in_flight; /* gauge: slots taken and not released */
  uint32_t min_limit; /* the configured bounds (copied) */
  uint32_t max_limit;
  uint64_t min_rtt;      /* gauge: lowest window average seen; 0 before the first */
  uint64_t last_rtt;     /* gauge: the last window's average; 0 before the first */
  uint64_t acquired;     /* counter */
  uint64_t rejected;     /* counter: try_acquire answered false */
  uint64_t dropped;      /* counter: releases with KEEL_ADAPTIVE_DROPPED */
  uint64_t windows;      /* counter: limit updates */
  uint64_t increases;    /* counter: windows that raised the limit */
  uint64_t decreases;    /* counter: windows that lowered it */
  uint64_t reserved_[8]; /* ABI room: filled with zero */
} keel_adaptive_stats;

/* Fills *out; does nothing for NULL a or out. */
KEEL_EXTERN void keel_adaptive_get_stats(const keel_adaptive *a, keel_adaptive_stats *out);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_ADAPTIVE_H */
