/* Internal: the local limiter's state and its decision, inlined by the
 * pipeline (same module). */
#ifndef KEEL_POLICY_RATELIMIT_INTERNAL_H
#define KEEL_POLICY_RATELIMIT_INTERNAL_H

#include "core/stats_hook.h"
#include "core/util.h"
#include "keel/ratelimit.h"

#define NS_PER_MS UINT64_C(1000000)

struct keel_ratelimit {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  /* hot */
  keel_ratelimit_kind kind;
  int closing;
  uv_loop_t *loop;
  keel_clock clock;
  uint64_t tat_ns;    /* GCRA: theoretical arrival time */
  uint64_t tau_ns;    /* GCRA: emission interval * burst */
  uint64_t t_ns;      /* GCRA: emission interval */
  uint64_t tokens;    /* bucket: tokens left */
  uint64_t last_ms;   /* bucket: start of the current refill period */
  uint64_t latest_ms; /* the latest time seen (a clock going back is held) */
  uint64_t rate, period_ms, burst;
  uint64_t allowed, rejected;
  uv_timer_t close_handle; /* never started: carries the close callback */
  keel_close_cb close_cb;
  void *close_data;
};

/* The token bucket's decision (out of line: it divides). */
int keel__ratelimit_take_bucket(keel_ratelimit *rl, uint64_t now_ms, uint64_t n,
                                uint64_t *retry_after_ms);

/* keel_ratelimit_take_at() for a non-NULL rl. */
static inline int keel__ratelimit_take_at(keel_ratelimit *rl, uint64_t now_ms, uint64_t n,
                                          uint64_t *retry_after_ms) {
  if (rl->closing) return KEEL_ECLOSING;
  if (n == 0 || n > rl->burst) return UV_EINVAL;
  if (now_ms < rl->latest_ms) now_ms = rl->latest_ms;
  rl->latest_ms = now_ms;
  if (rl->kind != KEEL_RATELIMIT_GCRA)
    return keel__ratelimit_take_bucket(rl, now_ms, n, retry_after_ms);
  uint64_t now = now_ms * NS_PER_MS;
  uint64_t tat = rl->tat_ns > now ? rl->tat_ns : now;
  uint64_t new_tat = tat + n * rl->t_ns;
  if (new_tat - now <= rl->tau_ns) {
    rl->tat_ns = new_tat;
    rl->allowed += n;
    return 0;
  }
  rl->rejected++;
  if (retry_after_ms != NULL) {
    uint64_t ns = new_tat - rl->tau_ns - now;
    uint64_t ms = ns / NS_PER_MS + (ns % NS_PER_MS != 0);
    *retry_after_ms = ms == 0 ? 1 : ms;
  }
  return KEEL_ERATELIMIT;
}

/* One call at loop time now_ms unless the limiter has a clock of its own
 * or another loop. */
static inline int keel__ratelimit_take1(keel_ratelimit *rl, uv_loop_t *loop, uint64_t now_ms,
                                        uint64_t *retry_after_ms) {
  if (rl->clock.now != NULL || rl->loop != loop) now_ms = keel__clock_now(&rl->clock, rl->loop);
  return keel__ratelimit_take_at(rl, now_ms, 1, retry_after_ms);
}

#endif
