/* A breaker's state shared across processes through Redis. The breaker's
 * hot path is untouched: the outcomes to publish are the growth of its own
 * counters since the last sync, read on a timer; transitions reach this
 * file through the breaker's share_hook (off the hot path) and are decided
 * in one script on the shared hash (docs/breaker.md shows it). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "circuit/breaker_internal.h"
#include "core/alloc.h"
#include "keel/breaker_shared.h"

static const char sync_src[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local h = redis.call('HMGET', KEYS[1], 'st', 'gen', 'until', 'ws', 'n', 'f')\n"
    "local st = h[1] or 'c'\n"
    "local gen = tonumber(h[2] or '0')\n"
    "local untl = tonumber(h[3] or '0')\n"
    "local ws = tonumber(h[4] or '0')\n"
    "local n = tonumber(h[5] or '0')\n"
    "local f = tonumber(h[6] or '0')\n"
    "local ok, bad, ev = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "local open_ms, window = tonumber(ARGV[4]), tonumber(ARGV[5])\n"
    "local min_calls, rate = tonumber(ARGV[6]), tonumber(ARGV[7])\n"
    "local changed = false\n"
    "if st == 'o' and now >= untl then st = 'h' end\n"
    "if ev == 1 and st ~= 'o' then\n"
    "  st = 'o'; gen = gen + 1; untl = now + open_ms; changed = true\n"
    "elseif ev == 2 and st ~= 'c' then\n"
    "  st = 'c'; gen = gen + 1; changed = true\n"
    "end\n"
    "if changed then ws = now; n = 0; f = 0 end\n"
    "if st == 'c' then\n"
    "  if now - ws >= window then ws = now; n = 0; f = 0 end\n"
    "  n = n + ok + bad; f = f + bad\n"
    "  if min_calls > 0 and n >= min_calls and f >= rate * n then\n"
    "    st = 'o'; gen = gen + 1; untl = now + open_ms; ws = now; n = 0; f = 0; changed = true\n"
    "  end\n"
    "end\n"
    "redis.call('HSET', KEYS[1], 'st', st, 'gen', gen, 'until', untl, 'ws', ws, 'n', n, 'f', f)\n"
    "redis.call('PEXPIRE', KEYS[1], 86400000)\n"
    "local left = 0\n"
    "if st == 'o' then left = untl - now end\n"
    "if changed then redis.call('PUBLISH', KEYS[1], st .. ':' .. gen .. ':' .. left) end\n"
    "return {st, gen, left}\n";

static keel_redis_script sync_script;
static bool script_ready;

struct keel_breaker_shared {
  uv_loop_t *loop;
  keel_breaker *b;
  keel_redis *r;
  keel_breaker_shared_opts opts;
  char *key;
  uv_timer_t timer;
  bool in_flight, again, closing, timer_closed, applying;
  int event;        /* local transition to publish: 0 none, 1 opened, 2 closed */
  int event_sent;   /* the event of the sync in flight */
  uint64_t ok_seen; /* breaker counters already published */
  uint64_t bad_seen;
  uint64_t ok_sent, bad_sent; /* of the sync in flight */
  keel_breaker_shared_stats stats;
  keel_close_cb close_cb;
  void *close_data;
  char num[7][32];
};

void keel_breaker_shared_opts_init(keel_breaker_shared_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->publish_interval_ms = 5;
  opts->window_ms = 10000;
  opts->minimum_calls = 20;
  opts->failure_rate_threshold = 0.5;
}

static void sync_now(keel_breaker_shared *sh);

static void on_transition(void *ctx, keel_breaker_state from, keel_breaker_state to) {
  (void)from;
  keel_breaker_shared *sh = ctx;
  if (sh->applying) return; /* decided by the shared state: nothing to publish */
  if (to == KEEL_BREAKER_OPEN)
    sh->event = 1;
  else if (to == KEEL_BREAKER_CLOSED)
    sh->event = 2;
  else
    return;
  sh->stats.local_transitions++;
  sync_now(sh); /* at once, not at the next tick */
}

static void maybe_finish_close(keel_breaker_shared *sh) {
  if (!sh->closing || !sh->timer_closed || sh->in_flight) return;
  keel_close_cb cb = sh->close_cb;
  void *data = sh->close_data;
  keel__free(sh->key);
  keel__free(sh);
  if (cb != NULL) cb(sh, data);
}

static void apply(keel_breaker_shared *sh, const char *st, uint64_t gen, uint64_t left) {
  /* A smaller generation than seen: the shared hash was lost (a Redis
   * restart without persistence) and started again; follow it. */
  if (gen == sh->stats.shared_generation && gen != 0) return;
  bool first = sh->stats.shared_generation == 0;
  sh->stats.shared_generation = gen;
  keel_breaker *b = sh->b;
  keel_breaker_state to;
  if (st[0] == 'o' && b->state != KEEL_BREAKER_OPEN && left > 0)
    to = KEEL_BREAKER_OPEN;
  else if (st[0] == 'c' && !first &&
           (b->state == KEEL_BREAKER_OPEN || b->state == KEEL_BREAKER_HALF_OPEN))
    to = KEEL_BREAKER_CLOSED;
  else
    return;
  sh->applying = true;
  keel__breaker_set_state(b, to, left);
  sh->applying = false;
  sh->stats.remote_transitions++;
}

static void on_sync(keel_redis *r, int status, const struct redisReply *rep, void *data) {
  (void)r;
  keel_breaker_shared *sh = data;
  sh->in_flight = false;
  if (sh->closing) {
    maybe_finish_close(sh);
    return;
  }
  const struct redisReply *e0 = keel_redis_reply_element(rep, 0);
  const char *st = keel_redis_reply_str(e0, NULL);
  if (status != 0 || st == NULL || keel_redis_reply_elements(rep) != 3) {
    sh->stats.sync_errors++;
    if (!sh->stats.fallback) {
      sh->stats.fallback = true;
      sh->stats.fallbacks++;
    }
    /* Unpublished: the outcomes and the event go with the next sync. */
    if (sh->event == 0) sh->event = sh->event_sent;
    return;
  }
  sh->stats.syncs++;
  sh->stats.fallback = false;
  sh->ok_seen += sh->ok_sent;
  sh->bad_seen += sh->bad_sent;
  sh->stats.published_outcomes += sh->ok_sent + sh->bad_sent;
  long long gen = keel_redis_reply_integer(keel_redis_reply_element(rep, 1));
  long long left = keel_redis_reply_integer(keel_redis_reply_element(rep, 2));
  apply(sh, st, gen > 0 ? (uint64_t)gen : 0, left > 0 ? (uint64_t)left : 0);
  if (sh->again && !sh->closing) {
    sh->again = false;
    sync_now(sh);
  }
}

static void sync_now(keel_breaker_shared *sh) {
  if (sh->closing) return;
  if (sh->in_flight) {
    sh->again = true;
    return;
  }
  keel_breaker *b = sh->b;
  /* The counters only grow; what grew since the last sync is new. */
  sh->ok_sent = b->stats.calls_succeeded - sh->ok_seen;
  sh->bad_sent = b->stats.calls_failed - sh->bad_seen;
  sh->event_sent = sh->event;
  sh->event = 0;
  snprintf(sh->num[0], sizeof sh->num[0], "%llu", (unsigned long long)sh->ok_sent);
  snprintf(sh->num[1], sizeof sh->num[1], "%llu", (unsigned long long)sh->bad_sent);
  snprintf(sh->num[2], sizeof sh->num[2], "%d", sh->event_sent);
  snprintf(sh->num[3], sizeof sh->num[3], "%llu", (unsigned long long)b->open_duration_ms);
  snprintf(sh->num[4], sizeof sh->num[4], "%llu", (unsigned long long)sh->opts.window_ms);
  snprintf(sh->num[5], sizeof sh->num[5], "%u", sh->opts.minimum_calls);
  snprintf(sh->num[6], sizeof sh->num[6], "%.9f", sh->opts.failure_rate_threshold);
  const char *argv[8] = {sh->key};
  for (int i = 0; i < 7; i++) argv[i + 1] = sh->num[i];
  uint64_t timeout = sh->opts.publish_interval_ms * 20u;
  if (timeout < 100) timeout = 100;
  int rc = keel_redis_eval_timeout(sh->r, timeout, &sync_script, 1, 8, argv, NULL, on_sync, sh);
  if (rc != 0) {
    sh->stats.sync_errors++;
    if (!sh->stats.fallback) {
      sh->stats.fallback = true;
      sh->stats.fallbacks++;
    }
    if (sh->event == 0) sh->event = sh->event_sent;
    return;
  }
  sh->in_flight = true;
}

static void on_tick(uv_timer_t *t) {
  sync_now(t->data);
}

int keel_breaker_shared_new(uv_loop_t *loop, keel_breaker *b, keel_redis *r,
                            const keel_breaker_shared_opts *opts, keel_breaker_shared **out) {
  if (loop == NULL || b == NULL || r == NULL || opts == NULL || out == NULL) return UV_EINVAL;
  const char *prefix = opts->prefix != NULL ? opts->prefix : "keel:breaker:";
  size_t nlen = opts->name != NULL ? strlen(opts->name) : 0;
  if (nlen == 0 || nlen > 200 || strlen(prefix) > 64 || opts->publish_interval_ms == 0 ||
      opts->window_ms == 0 || !(opts->failure_rate_threshold > 0.0) ||
      opts->failure_rate_threshold > 1.0 || b->share_hook != NULL || b->closing)
    return UV_EINVAL;
  if (!script_ready) {
    keel_redis_script_init(&sync_script, sync_src);
    script_ready = true;
  }
  keel_breaker_shared *sh = keel__calloc(1, sizeof *sh);
  if (sh == NULL) return UV_ENOMEM;
  size_t cap = strlen(prefix) + nlen + 3;
  sh->key = keel__malloc(cap);
  if (sh->key == NULL) {
    keel__free(sh);
    return UV_ENOMEM;
  }
  snprintf(sh->key, cap, "%s{%s}", prefix, opts->name);
  sh->loop = loop;
  sh->b = b;
  sh->r = r;
  sh->opts = *opts;
  sh->opts.name = NULL;
  sh->opts.prefix = NULL;
  memset(sh->opts.reserved_, 0, sizeof sh->opts.reserved_);
  /* What the breaker counted before sharing began is not published. */
  sh->ok_seen = b->stats.calls_succeeded;
  sh->bad_seen = b->stats.calls_failed;
  uv_timer_init(loop, &sh->timer);
  sh->timer.data = sh;
  uv_timer_start(&sh->timer, on_tick, 0, opts->publish_interval_ms);
  b->share_hook = on_transition;
  b->share_ctx = sh;
  *out = sh;
  return 0;
}

void keel_breaker_shared_get_stats(const keel_breaker_shared *sh, keel_breaker_shared_stats *out) {
  if (sh == NULL || out == NULL) return;
  *out = sh->stats;
  memset(out->reserved_, 0, sizeof out->reserved_);
}

static void on_timer_closed(uv_handle_t *h) {
  keel_breaker_shared *sh = h->data;
  sh->timer_closed = true;
  maybe_finish_close(sh);
}

void keel_breaker_shared_close(keel_breaker_shared *sh, keel_close_cb cb, void *data) {
  if (sh == NULL || sh->closing) return;
  sh->closing = true;
  sh->close_cb = cb;
  sh->close_data = data;
  if (sh->b->share_ctx == sh) {
    sh->b->share_hook = NULL;
    sh->b->share_ctx = NULL;
  }
  uv_close((uv_handle_t *)&sh->timer, on_timer_closed);
}
