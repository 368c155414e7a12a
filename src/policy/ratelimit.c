/* Local rate limiter: GCRA and a stepwise token bucket on the loop's cached
 * time. State is a few integers; a decision reads the clock once. */
#include "policy/policy_stats.h"
#include "keel/ratelimit.h"

#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "policy/ratelimit_internal.h"

#define LIMIT_2_32 (UINT64_C(1) << 32)

void keel_ratelimit_opts_init(keel_ratelimit_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->kind = KEEL_RATELIMIT_GCRA;
  opts->rate = 100;
  opts->period_ms = 1000;
}

int keel_ratelimit_validate_opts(const keel_ratelimit_opts *opts, const char **why) {
  const char *w = NULL;
  if (opts == NULL) {
    w = "opts is NULL";
  } else if (opts->kind != KEEL_RATELIMIT_GCRA && opts->kind != KEEL_RATELIMIT_TOKEN_BUCKET) {
    w = "unknown kind";
  } else if (opts->rate == 0) {
    w = "rate must be > 0";
  } else if (opts->period_ms == 0 || opts->period_ms > LIMIT_2_32) {
    w = "period_ms must be in 1..2^32";
  } else if (opts->burst > LIMIT_2_32) {
    w = "burst must be at most 2^32";
  } else {
    uint64_t burst = opts->burst != 0 ? opts->burst : opts->rate;
    uint64_t t = opts->period_ms * NS_PER_MS / opts->rate;
    if (opts->kind == KEEL_RATELIMIT_GCRA && t == 0) {
      w = "rate / period_ms too high: at most one call per nanosecond";
    } else if (opts->kind == KEEL_RATELIMIT_GCRA && burst > (UINT64_C(1) << 62) / t) {
      w = "burst * period_ms / rate too large";
    } else if (opts->kind == KEEL_RATELIMIT_GCRA && opts->burst == 0 && opts->rate > LIMIT_2_32) {
      w = "burst (= rate by default) must be at most 2^32";
    }
  }
  if (why != NULL) *why = w;
  return w == NULL ? 0 : UV_EINVAL;
}

int keel_ratelimit_new(uv_loop_t *loop, const keel_ratelimit_opts *opts, keel_ratelimit **out) {
  if (loop == NULL || out == NULL || keel_ratelimit_validate_opts(opts, NULL) != 0)
    return UV_EINVAL;
  keel_ratelimit *rl = keel__calloc(1, sizeof *rl);
  if (rl == NULL) return UV_ENOMEM;
  rl->kind = opts->kind;
  rl->loop = loop;
  rl->clock = opts->clock;
  rl->rate = opts->rate;
  rl->period_ms = opts->period_ms;
  rl->burst = opts->burst != 0 ? opts->burst : opts->rate;
  rl->t_ns = opts->period_ms * NS_PER_MS / opts->rate;
  rl->tau_ns = rl->t_ns * rl->burst;
  uv_timer_init(loop, &rl->close_handle); /* cannot fail */
  keel_ratelimit_reset(rl);
  *out = rl;
  return 0;
}

static void refill(keel_ratelimit *rl, uint64_t now_ms) {
  if (now_ms - rl->last_ms < rl->period_ms) return;
  uint64_t k = (now_ms - rl->last_ms) / rl->period_ms;
  rl->last_ms += k * rl->period_ms;
  if (k >= rl->burst / rl->rate + 1) {
    rl->tokens = rl->burst;
  } else {
    uint64_t t = rl->tokens + k * rl->rate;
    rl->tokens = t > rl->burst ? rl->burst : t;
  }
}

int keel_ratelimit_take_at(keel_ratelimit *rl, uint64_t now_ms, uint64_t n,
                           uint64_t *retry_after_ms) {
  if (rl == NULL) return UV_EINVAL;
  return keel__ratelimit_take_at(rl, now_ms, n, retry_after_ms);
}

int keel__ratelimit_take_bucket(keel_ratelimit *rl, uint64_t now_ms, uint64_t n,
                                uint64_t *retry_after_ms) {
  refill(rl, now_ms);
  if (rl->tokens >= n) {
    rl->tokens -= n;
    rl->allowed += n;
    return 0;
  }
  rl->rejected++;
  if (retry_after_ms != NULL) {
    uint64_t need = n - rl->tokens;
    uint64_t periods = need / rl->rate + (need % rl->rate != 0);
    uint64_t at = rl->last_ms + periods * rl->period_ms;
    *retry_after_ms = at > now_ms ? at - now_ms : 1;
  }
  return KEEL_ERATELIMIT;
}

int keel_ratelimit_take(keel_ratelimit *rl, uint64_t n, uint64_t *retry_after_ms) {
  if (rl == NULL) return UV_EINVAL;
  return keel_ratelimit_take_at(rl, keel__clock_now(&rl->clock, rl->loop), n, retry_after_ms);
}

int keel_ratelimit_reset(keel_ratelimit *rl) {
  if (rl == NULL) return UV_EINVAL;
  if (rl->closing) return KEEL_ECLOSING;
  uint64_t now = keel__clock_now(&rl->clock, rl->loop);
  if (now < rl->latest_ms) now = rl->latest_ms;
  rl->latest_ms = now;
  rl->tat_ns = 0;
  rl->tokens = rl->burst;
  rl->last_ms = now;
  return 0;
}

void keel_ratelimit_get_stats(keel_ratelimit *rl, keel_ratelimit_stats *out) {
  if (rl == NULL || out == NULL) return;
  memset(out, 0, sizeof *out);
  out->allowed = rl->allowed;
  out->rejected = rl->rejected;
  uint64_t now_ms = keel__clock_now(&rl->clock, rl->loop);
  if (now_ms < rl->latest_ms) now_ms = rl->latest_ms;
  if (rl->kind == KEEL_RATELIMIT_GCRA) {
    uint64_t now = now_ms * NS_PER_MS;
    uint64_t used = rl->tat_ns > now ? rl->tat_ns - now : 0;
    out->available = used >= rl->tau_ns ? 0 : (rl->tau_ns - used) / rl->t_ns;
  } else {
    if (!rl->closing) {
      rl->latest_ms = now_ms;
      refill(rl, now_ms);
    }
    out->available = rl->tokens;
  }
}

static void on_closed(uv_handle_t *h) {
  keel_ratelimit *rl = KEEL__CONTAINER_OF(h, keel_ratelimit, close_handle);
  keel_close_cb cb = rl->close_cb;
  void *data = rl->close_data;
  keel__free(rl);
  if (cb != NULL) cb(rl, data);
}

void keel_ratelimit_close(keel_ratelimit *rl, keel_close_cb cb, void *data) {
  if (rl == NULL || rl->closing) return;
  rl->closing = 1;
  keel__stats_hooks_detach(&rl->stats_hooks); /* drops serve registrations */
  rl->close_cb = cb;
  rl->close_data = data;
  uv_close((uv_handle_t *)&rl->close_handle, on_closed);
}

keel__stats_hooks *keel__ratelimit_stats_hooks(keel_ratelimit *x) {
  return x->closing ? NULL : &x->stats_hooks; /* no registration once closing */
}
