/*
 * keel/breaker_shared.h — a breaker's state shared across processes through
 * Redis (like gobreaker v2's distributed breaker): every process guarding
 * the same dependency opens together and closes together.
 *
 * The breaker itself stays local: acquire/release in the CLOSED state
 * touch no Redis, take no lock and allocate nothing. The outcomes counted
 * since the last sync (read from the breaker's statistics) are sent in one
 * script every publish_interval_ms, and as soon as publish_batch of them
 * wait (checked once per loop iteration). The script adds them to a shared
 * window, decides a transition atomically (the shared failure rate
 * reached, or a process whose breaker opened or closed on its own), and
 * PUBLISHes each transition on the channel <prefix>{<name>} as
 * "<state>:<generation>:<open ms left>" (state c, o). Every process
 * subscribes to that channel (keel_redis_subscribe() on the same client)
 * and applies a broadcast at once, if its generation is newer than the
 * state it knows: an old message never overrides a newer state. Two sync
 * answers in a row older than the state it knows (a forged broadcast, a
 * state lost in a failover) bring it back to Redis's state. A local
 * transition is sent at once, not at the next tick.
 *
 * HALF_OPEN probes are shared too: a process whose breaker is half-open
 * takes probe slots from one shared count in the script (probe_quota per
 * round, for all processes together) and lets through only the probes it
 * took; the first probe verdict (closed, or opened again) is broadcast and
 * every process follows it.
 *
 *     keel_breaker_shared_opts so;
 *     keel_breaker_shared_opts_init(&so);
 *     so.name = "payments-api";
 *     keel_breaker_shared *sh;
 *     keel_breaker_shared_new(loop, breaker, redis, &so, &sh);
 *     ...
 *     keel_breaker_shared_close(sh, NULL, NULL);   // before the breaker
 *
 * When Redis cannot be reached (an error or timeout of a sync; a lost
 * subscription triggers a sync at once), the process goes on with its local
 * breaker alone, probes included (stats.fallback is true, and
 * stats.fallbacks counts the times it happened), and joins the shared state
 * again at the first sync that succeeds.
 *
 * Everything is loop-thread only. No callback of its own: the breaker's
 * on_state_change reports the transitions applied from the shared state.
 */
#ifndef KEEL_BREAKER_SHARED_H
#define KEEL_BREAKER_SHARED_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "keel/breaker.h"
#include "keel/common.h"
#include "keel/redis.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_breaker_shared keel_breaker_shared;

typedef struct keel_breaker_shared_opts {
  const char *name;              /* required, 1..200 bytes: the dependency; processes
                                    with the same name (and prefix) share; copied */
  const char *prefix;            /* key prefix; NULL = "keel:breaker:"; <= 64 bytes;
                                    the state is the hash <prefix>{<name>} */
  uint32_t publish_interval_ms;  /* sync period; default 5 */
  uint32_t publish_batch;        /* also sync as soon as this many outcomes wait,
                                    checked once per loop iteration (before the
                                    loop waits for I/O); default 1000; 0 = on the
                                    interval only */
  uint64_t window_ms;            /* shared window of outcomes; default 10000 */
  uint32_t minimum_calls;        /* shared trip only from this many calls in the
                                    window; default 20; 0 = only local trips are
                                    shared */
  double failure_rate_threshold; /* shared trip when failures/calls >= this;
                                    (0, 1]; default 0.5 */
  uint32_t probe_quota;          /* HALF_OPEN probes all processes together may
                                    send per round (a round lasts the breaker's
                                    half_open_max_wait_ms; slots not judged by then
                                    are given out again); 0 (default) = what one
                                    breaker needs: its half_open_probes, else its
                                    half_open_successes */
  uint64_t reserved_[8];         /* ABI room: zero (opts_init does); never set */
} keel_breaker_shared_opts;

/* Zeroes *opts and fills the defaults above. NULL: no-op. Thread-safe. */
KEEL_EXTERN void keel_breaker_shared_opts_init(keel_breaker_shared_opts *opts);

/*
 * Shares breaker b's state through r. b and r are not owned and must
 * outlive the shared object (close it first). A breaker is shared by at
 * most one object. Subscribes to the channel <prefix>{<name>} on r (one
 * subscription of r, see keel_redis_subscribe()); the first sync runs on
 * a later loop iteration. A breaker already OPEN when sharing begins
 * publishes its open. Returns 0 and sets *out; UV_EINVAL (NULL argument, a
 * missing or too long name or prefix, a zero interval or window, a rate
 * outside (0, 1], b already shared or closing), KEEL_ECLOSING
 * (keel_redis_close() was called on r), UV_ENOMEM, or
 * keel_redis_subscribe()'s UV_ENOBUFS, KEEL_ECONN; nothing is created and
 * *out is untouched on failure. Loop thread only.
 */
KEEL_EXTERN int keel_breaker_shared_new(uv_loop_t *loop, keel_breaker *b, keel_redis *r,
                                        const keel_breaker_shared_opts *opts,
                                        keel_breaker_shared **out);

typedef struct keel_breaker_shared_stats {
  uint64_t syncs;              /* counter: syncs answered by Redis */
  uint64_t sync_errors;        /* counter: syncs that failed (error, timeout, down) */
  uint64_t published_outcomes; /* counter: outcomes sent to the shared window */
  uint64_t local_transitions;  /* counter: transitions of this breaker published */
  uint64_t remote_transitions; /* counter: transitions applied from the shared state */
  uint64_t fallbacks;          /* counter: times Redis was lost (fallback began) */
  bool fallback;               /* gauge: true while the breaker runs alone */
  uint64_t shared_generation;  /* gauge: the shared state's generation last seen
                                  (a new shared hash starts at Redis's time in ms) */
  uint64_t batch_syncs;        /* counter: syncs started because publish_batch
                                  outcomes waited */
  uint64_t messages;           /* counter: broadcasts received */
  uint64_t stale_messages;     /* counter: broadcasts not applied: not newer than the
                                  state known, or a local transition in flight */
  uint64_t probes_claimed;     /* counter: HALF_OPEN probe slots taken from the shared
                                  quota by this process */
  bool subscribed;             /* gauge: the broadcast subscription is confirmed */
  uint64_t reserved_[8];       /* ABI room: filled with zero */
} keel_breaker_shared_stats;

/* Copies the statistics. NULL sh or out: no-op. Loop thread only. */
KEEL_EXTERN void keel_breaker_shared_get_stats(const keel_breaker_shared *sh,
                                               keel_breaker_shared_stats *out);

/*
 * Stops sharing: the breaker goes on alone (a local transition not yet
 * published is not published any more). cb (may be NULL) runs on a
 * later loop iteration once the timers are closed, the sync in flight (if
 * any) answered and the subscription ended. NULL-safe; a second call does
 * nothing. Loop thread only.
 */
KEEL_EXTERN void keel_breaker_shared_close(keel_breaker_shared *sh, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_BREAKER_SHARED_H */
