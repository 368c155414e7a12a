/* A breaker's state shared across processes through Redis. The breaker's
 * hot path is untouched: the outcomes to publish are the growth of its own
 * counters since the last sync, read on a timer and once per loop iteration
 * (a uv_prepare: the batch bound); transitions reach this file through the
 * breaker's share_hook (off the hot path), are decided in one script on the
 * shared hash (docs/breaker.md shows it), which PUBLISHes each one, and
 * every process subscribed to the channel applies it at once. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "circuit/breaker_internal.h"
#include "core/alloc.h"
#include "keel/breaker_shared.h"
#include "redis/redis_internal.h"

static const char sync_src[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local h = redis.call('HMGET', KEYS[1], 'st', 'gen', 'until', 'ws', 'n', 'f', 'hs', 'pt')\n"
    "local st = h[1] or 'c'\n"
    "local gen = tonumber(h[2] or now)\n"
    "local untl = tonumber(h[3] or '0')\n"
    "local ws = tonumber(h[4] or '0')\n"
    "local n = tonumber(h[5] or '0')\n"
    "local f = tonumber(h[6] or '0')\n"
    "local hs = tonumber(h[7] or '0')\n"
    "local pt = tonumber(h[8] or '0')\n"
    "local ok, bad, ev = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "local open_ms, window = tonumber(ARGV[4]), tonumber(ARGV[5])\n"
    "local min_calls, rate = tonumber(ARGV[6]), tonumber(ARGV[7])\n"
    "local base, want = tonumber(ARGV[8]), tonumber(ARGV[9])\n"
    "local quota, round = tonumber(ARGV[10]), tonumber(ARGV[11])\n"
    "local changed = false\n"
    "if st == 'o' and now >= untl then st = 'h'; hs = now; pt = 0 end\n"
    "if st == 'h' and now - hs >= round then hs = now; pt = 0 end\n"
    "if (ev == 1 and st ~= 'o') or (ev == 3 and st == 'h' and base == gen) then\n"
    "  st = 'o'; gen = gen + 1; untl = now + open_ms; changed = true\n"
    "elseif (ev == 2 and st == 'h' and base == gen) or (ev == 4 and st ~= 'c') then\n"
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
    "local take = 0\n"
    "if st == 'h' and want > 0 and pt < quota then\n"
    "  take = math.min(want, quota - pt); pt = pt + take\n"
    "end\n"
    "redis.call('HSET', KEYS[1], 'st', st, 'gen', gen, 'until', untl, 'ws', ws, 'n', n, 'f', f,\n"
    "  'hs', hs, 'pt', pt)\n"
    "redis.call('PEXPIRE', KEYS[1], 86400000)\n"
    "local left, round_left = 0, 0\n"
    "if st == 'o' then left = untl - now end\n"
    "if st == 'h' then round_left = hs + round - now end\n"
    "if changed then\n"
    "  redis.call('PUBLISH', KEYS[1], string.format('%s:%.0f:%.0f', st, gen, left))\n"
    "end\n"
    "return {st, gen, left, take, round_left}\n";

/* Written once (under uv_once: breakers may be shared from several
 * threads, each with its own loop), read-only after. */
static keel_redis_script sync_script;
static uv_once_t script_once = UV_ONCE_INIT;

static void init_script(void) {
  keel_redis_script_init(&sync_script, sync_src);
}

const char *keel__breaker_shared_script(void) {
  return sync_src;
}

/* Events sent to the script (ARGV[3]). */
enum {
  EV_NONE = 0,
  EV_OPENED = 1,   /* tripped from CLOSED */
  EV_CLOSED = 2,   /* HALF_OPEN closed by its probes */
  EV_REOPENED = 3, /* HALF_OPEN opened again by its probes */
  EV_RESET = 4     /* closed by an operator (reset from OPEN, forced open, disabled) */
};

struct keel_breaker_shared {
  uv_loop_t *loop;
  keel_breaker *b;
  keel_redis *r;
  keel_redis_sub *sub; /* NULL once ended */
  keel_breaker_shared_opts opts;
  char *key;
  size_t key_len;
  uv_timer_t timer;
  uv_prepare_t prepare; /* the publish_batch check, once per loop iteration */
  unsigned handles_open;
  bool in_flight, again, closing, applying;
  /* Syncs in a row whose answer was older than the generation known. */
  unsigned syncs_behind;
  int event;           /* local transition to publish (EV_*) */
  uint64_t event_base; /* the shared generation it was based on */
  int event_sent;      /* of the sync in flight */
  uint64_t base_sent;
  uint64_t claim_gen; /* the breaker's generation when the sync in flight was sent */
  uint64_t ok_seen;   /* breaker counters already published */
  uint64_t bad_seen;
  uint64_t ok_sent, bad_sent; /* of the sync in flight */
  keel_breaker_shared_stats stats;
  keel_close_cb close_cb;
  void *close_data;
  char num[11][32];
};

void keel_breaker_shared_opts_init(keel_breaker_shared_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->publish_interval_ms = 5;
  opts->publish_batch = 1000;
  opts->window_ms = 10000;
  opts->minimum_calls = 20;
  opts->failure_rate_threshold = 0.5;
}

static void sync_now(keel_breaker_shared *sh);

/* Probes one breaker needs for a verdict. */
static uint32_t probe_need(const keel_breaker *b) {
  return b->opts.half_open_probes > 0 ? b->opts.half_open_probes : b->opts.half_open_successes;
}

static void on_transition(void *ctx, keel_breaker_state from, keel_breaker_state to) {
  keel_breaker_shared *sh = ctx;
  if (to == KEEL_BREAKER_HALF_OPEN) {
    /* Take probe slots from the shared quota (none until they come). */
    if (sh->b->share_probes) sync_now(sh);
    return;
  }
  if (sh->applying) return; /* decided by the shared state: nothing to publish */
  int ev;
  if (to == KEEL_BREAKER_OPEN)
    ev = from == KEEL_BREAKER_HALF_OPEN ? EV_REOPENED : EV_OPENED;
  else if (to == KEEL_BREAKER_CLOSED)
    ev = from == KEEL_BREAKER_HALF_OPEN ? EV_CLOSED : EV_RESET;
  else
    return;
  sh->event = ev;
  sh->event_base = sh->stats.shared_generation;
  sh->stats.local_transitions++;
  sync_now(sh); /* at once, not at the next tick */
}

static void maybe_finish_close(keel_breaker_shared *sh) {
  if (!sh->closing || sh->handles_open > 0 || sh->in_flight || sh->sub != NULL) return;
  keel_close_cb cb = sh->close_cb;
  void *data = sh->close_data;
  keel__free(sh->key);
  keel__free(sh);
  if (cb != NULL) cb(sh, data);
}

/* Moves the breaker to `to` as the shared state says. */
static void set_remote(keel_breaker_shared *sh, keel_breaker_state to, uint64_t open_ms) {
  keel_breaker *b = sh->b;
  if (b->closing || b->state == to || b->state == KEEL_BREAKER_FORCED_OPEN ||
      b->state == KEEL_BREAKER_DISABLED)
    return;                       /* what keel__breaker_set_state() leaves alone */
  sh->stats.remote_transitions++; /* counted before on_state_change runs */
  sh->applying = true;
  keel__breaker_set_state(b, to, open_ms);
  sh->applying = false;
}

/* Local state follows the shared one. */
static void follow(keel_breaker_shared *sh, char st, uint64_t left) {
  keel_breaker *b = sh->b;
  keel_breaker_state s = b->state;
  if (st == 'o') {
    if (left == 0) return;
    if (s == KEEL_BREAKER_OPEN) /* opened here too: end together */
      b->open_until_ms = keel__breaker_now(b) + left;
    else if (s == KEEL_BREAKER_CLOSED || s == KEEL_BREAKER_HALF_OPEN)
      set_remote(sh, KEEL_BREAKER_OPEN, left);
  } else if (st == 'c') {
    if (s == KEEL_BREAKER_OPEN || s == KEEL_BREAKER_HALF_OPEN)
      set_remote(sh, KEEL_BREAKER_CLOSED, 0);
  } else if (st == 'h') {
    if (s == KEEL_BREAKER_OPEN || s == KEEL_BREAKER_CLOSED)
      set_remote(sh, KEEL_BREAKER_HALF_OPEN, 0);
  }
}

/* A shared state (st, gen, left) learned from a sync's answer
 * (authoritative: the state when the script ran) or from a broadcast
 * (applied only when newer than what this process knows). */
static void apply(keel_breaker_shared *sh, char st, uint64_t gen, uint64_t left,
                  bool authoritative) {
  /* A local transition waiting to be published, or in flight: its own
   * answer tells the outcome; nothing else is followed meanwhile. */
  if (sh->event != EV_NONE || (!authoritative && sh->in_flight && sh->event_sent != EV_NONE)) {
    if (!authoritative) sh->stats.stale_messages++;
    return;
  }
  if (authoritative && gen < sh->stats.shared_generation) {
    /* One such answer can be a reply overtaken by a newer broadcast. Two
     * in a row mean the generation known is not in Redis (a broadcast
     * forged by a client of that Redis, or one from a state lost with a
     * failover): Redis's own state is the truth. */
    if (++sh->syncs_behind < 2) return;
  } else if (gen < sh->stats.shared_generation ||
             (gen == sh->stats.shared_generation && !authoritative)) {
    sh->stats.stale_messages++;
    return;
  }
  if (authoritative) sh->syncs_behind = 0;
  sh->stats.shared_generation = gen;
  follow(sh, st, left);
}

static void go_fallback(keel_breaker_shared *sh) {
  sh->stats.sync_errors++;
  if (!sh->stats.fallback) {
    sh->stats.fallback = true;
    sh->stats.fallbacks++;
  }
  sh->b->share_probes = false; /* the local breaker probes alone */
  /* Unpublished: the outcomes and the event go with the next sync. */
  if (sh->event == EV_NONE) {
    sh->event = sh->event_sent;
    sh->event_base = sh->base_sent;
  }
}

static void on_tick(uv_timer_t *t);

static void arm_timer(keel_breaker_shared *sh, uint64_t first) {
  uv_timer_start(&sh->timer, on_tick, first, sh->opts.publish_interval_ms);
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
  if (status != 0 || st == NULL || keel_redis_reply_elements(rep) != 5) {
    go_fallback(sh);
    return;
  }
  keel_breaker *b = sh->b;
  sh->stats.syncs++;
  sh->stats.fallback = false;
  if (!b->share_probes) {
    /* Joining the shared quota: probes let through alone count as taken. */
    b->share_probes = true;
    if (b->probe_allowance < b->probes_granted) b->probe_allowance = b->probes_granted;
    if (b->state == KEEL_BREAKER_HALF_OPEN) sh->again = true;
  }
  sh->ok_seen += sh->ok_sent;
  sh->bad_seen += sh->bad_sent;
  sh->stats.published_outcomes += sh->ok_sent + sh->bad_sent;
  long long gen = keel_redis_reply_integer(keel_redis_reply_element(rep, 1));
  long long left = keel_redis_reply_integer(keel_redis_reply_element(rep, 2));
  long long take = keel_redis_reply_integer(keel_redis_reply_element(rep, 3));
  long long round_left = keel_redis_reply_integer(keel_redis_reply_element(rep, 4));
  apply(sh, st[0], gen > 0 ? (uint64_t)gen : 0, left > 0 ? (uint64_t)left : 0, true);
  if (take > 0) {
    sh->stats.probes_claimed += (uint64_t)take;
    if (b->state == KEEL_BREAKER_HALF_OPEN && b->generation == sh->claim_gen)
      b->probe_allowance += (uint32_t)take;
  }
  /* Half-open without enough slots: ask again when the round ends. */
  if (st[0] == 'h' && b->state == KEEL_BREAKER_HALF_OPEN && b->probe_allowance < probe_need(b) &&
      round_left > 0 && (uint64_t)round_left < sh->opts.publish_interval_ms)
    arm_timer(sh, (uint64_t)round_left + 1);
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
  sh->base_sent = sh->event_base;
  sh->event = EV_NONE;
  uint32_t need = probe_need(b);
  uint32_t want = 0;
  if (b->state == KEEL_BREAKER_HALF_OPEN && b->share_probes && b->probe_allowance < need)
    want = need - b->probe_allowance;
  sh->claim_gen = b->generation;
  uint32_t quota = sh->opts.probe_quota != 0 ? sh->opts.probe_quota : need;
  snprintf(sh->num[0], sizeof sh->num[0], "%llu", (unsigned long long)sh->ok_sent);
  snprintf(sh->num[1], sizeof sh->num[1], "%llu", (unsigned long long)sh->bad_sent);
  snprintf(sh->num[2], sizeof sh->num[2], "%d", sh->event_sent);
  snprintf(sh->num[3], sizeof sh->num[3], "%llu", (unsigned long long)b->open_duration_ms);
  snprintf(sh->num[4], sizeof sh->num[4], "%llu", (unsigned long long)sh->opts.window_ms);
  snprintf(sh->num[5], sizeof sh->num[5], "%u", sh->opts.minimum_calls);
  snprintf(sh->num[6], sizeof sh->num[6], "%.9f", sh->opts.failure_rate_threshold);
  snprintf(sh->num[7], sizeof sh->num[7], "%llu", (unsigned long long)sh->base_sent);
  snprintf(sh->num[8], sizeof sh->num[8], "%u", want);
  snprintf(sh->num[9], sizeof sh->num[9], "%u", quota);
  snprintf(sh->num[10], sizeof sh->num[10], "%llu",
           (unsigned long long)b->opts.half_open_max_wait_ms);
  const char *argv[12] = {sh->key};
  for (int i = 0; i < 11; i++) argv[i + 1] = sh->num[i];
  uint64_t timeout = (uint64_t)sh->opts.publish_interval_ms * 20u;
  if (timeout < 100) timeout = 100;
  if (timeout > 2000) timeout = 2000;
  int rc = keel_redis_eval_timeout(sh->r, timeout, &sync_script, 1, 12, argv, NULL, on_sync, sh);
  if (rc != 0) {
    go_fallback(sh);
    return;
  }
  sh->in_flight = true;
}

static void on_tick(uv_timer_t *t) {
  sync_now(t->data);
}

/* Once per loop iteration, before it waits for I/O: publish a full batch. */
static void on_prepare(uv_prepare_t *p) {
  keel_breaker_shared *sh = p->data;
  if (sh->in_flight || sh->closing) return;
  keel_breaker *b = sh->b;
  uint64_t waiting =
      (b->stats.calls_succeeded - sh->ok_seen) + (b->stats.calls_failed - sh->bad_seen);
  if (waiting < sh->opts.publish_batch) return;
  sh->stats.batch_syncs++;
  sync_now(sh);
}

static void on_broadcast(keel_redis_sub *sub, keel_redis_sub_event event, int status,
                         const keel_redis_message *msg, void *data) {
  (void)sub;
  (void)status;
  keel_breaker_shared *sh = data;
  switch (event) {
    case KEEL_REDIS_SUB_MESSAGE: {
      sh->stats.messages++;
      if (sh->closing) return;
      /* "<state>:<generation>:<open ms left>" */
      const char *p = msg->payload;
      char *end;
      if (msg->payload_len < 5 || p[1] != ':') return;
      unsigned long long gen = strtoull(p + 2, &end, 10);
      if (*end != ':') return;
      unsigned long long left = strtoull(end + 1, &end, 10);
      apply(sh, p[0], gen, left, false);
      return;
    }
    case KEEL_REDIS_SUB_READY:
      sh->stats.subscribed = true;
      sync_now(sh); /* broadcasts may have been missed: read the state */
      return;
    case KEEL_REDIS_SUB_LOST:
      sh->stats.subscribed = false;
      sync_now(sh); /* Redis itself may be gone: find out now */
      return;
    case KEEL_REDIS_SUB_ENDED:
      sh->stats.subscribed = false;
      sh->sub = NULL;
      maybe_finish_close(sh);
      return;
  }
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
  if (keel__redis_closing(r)) return KEEL_ECLOSING;
  uv_once(&script_once, init_script);
  keel_breaker_shared *sh = keel__calloc(1, sizeof *sh);
  if (sh == NULL) return UV_ENOMEM;
  size_t cap = strlen(prefix) + nlen + 3;
  sh->key = keel__malloc(cap);
  if (sh->key == NULL) {
    keel__free(sh);
    return UV_ENOMEM;
  }
  snprintf(sh->key, cap, "%s{%s}", prefix, opts->name);
  sh->key_len = cap - 1;
  /* The broadcasts come on the channel of the hash's name. */
  int rc = keel_redis_subscribe(r, sh->key, sh->key_len, false, on_broadcast, sh, &sh->sub);
  if (rc != 0) {
    keel__free(sh->key);
    keel__free(sh);
    return rc;
  }
  sh->loop = loop;
  sh->b = b;
  sh->r = r;
  sh->opts = *opts;
  sh->opts.name = NULL;
  sh->opts.prefix = NULL;
  memset(sh->opts.reserved_, 0, sizeof sh->opts.reserved_);
  /* What the breaker counted before sharing began is not published; an
   * OPEN it is in is (the others open with it). */
  sh->ok_seen = b->stats.calls_succeeded;
  sh->bad_seen = b->stats.calls_failed;
  if (b->state == KEEL_BREAKER_OPEN) sh->event = EV_OPENED;
  uv_timer_init(loop, &sh->timer);
  uv_prepare_init(loop, &sh->prepare);
  sh->timer.data = sh;
  sh->prepare.data = sh;
  sh->handles_open = 2;
  uv_timer_start(&sh->timer, on_tick, 0, opts->publish_interval_ms);
  if (opts->publish_batch > 0) uv_prepare_start(&sh->prepare, on_prepare);
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

static void on_handle_closed(uv_handle_t *h) {
  keel_breaker_shared *sh = h->data;
  sh->handles_open--;
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
    sh->b->share_probes = false;
  }
  /* KEEL_ECLOSING: the client is closing and ends the subscription itself. */
  if (sh->sub != NULL) keel_redis_unsubscribe(sh->sub);
  uv_close((uv_handle_t *)&sh->timer, on_handle_closed);
  uv_close((uv_handle_t *)&sh->prepare, on_handle_closed);
}
