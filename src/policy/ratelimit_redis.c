/* The GCRA limiter shared through Redis: one script on Redis's clock, one
 * key per tenant. Requests come from a free list on the limiter. */
#include "policy/policy_stats.h"
#include "core/stats_hook.h"
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "keel/ratelimit.h"
#include "policy/ratelimit_redis.h"
#include "redis/redis_internal.h"

#define PREFIX_MAX 200
#define TENANT_MAX 300

/* KEYS[1]: the tenant's key. ARGV[1]: emission interval (us), ARGV[2]:
 * burst tolerance = interval * burst (us), ARGV[3]: n. The key holds the
 * theoretical arrival time (us on Redis's clock) and expires when it is in
 * the past, i.e. when the budget is full again. */
static const char gcra_script[] =
    "pcall(redis.replicate_commands)\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local interval = tonumber(ARGV[1])\n"
    "local tau = tonumber(ARGV[2])\n"
    "local n = tonumber(ARGV[3])\n"
    "local tat = tonumber(redis.call('GET', KEYS[1]) or 0)\n"
    "if tat < now then tat = now end\n"
    "local new_tat = tat + n * interval\n"
    "local allow_at = new_tat - tau\n"
    "if now < allow_at then\n"
    "  return {0, allow_at - now, math.floor((tau - (tat - now)) / interval)}\n"
    "end\n"
    "local ttl = math.ceil((new_tat - now) / 1000)\n"
    "if ttl < 1 then ttl = 1 end\n"
    "redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)\n"
    "return {1, 0, math.floor((tau - (new_tat - now)) / interval)}\n";

const char *keel__ratelimit_redis_script(void) {
  return gcra_script;
}

typedef struct req {
  struct req *next;
  keel_ratelimit_redis *rl;
  keel_ratelimit_redis_cb cb;
  void *data;
} req;

struct keel_ratelimit_redis {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  keel_redis *client;
  keel_redis_script script;
  uint64_t burst;
  uint64_t timeout_ms;
  char interval_us[24], tau_us[24];
  char prefix[PREFIX_MAX + 1];
  size_t prefix_len;
  req *free_list;
  keel_ratelimit_redis_stats stats;
  int closing;
  uv_timer_t close_handle; /* never started: carries the close callback */
  keel_close_cb close_cb;
  void *close_data;
};

void keel_ratelimit_redis_opts_init(keel_ratelimit_redis_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->rate = 100;
  opts->period_ms = 1000;
  opts->prefix = "keel:rl:";
}

int keel_ratelimit_redis_new(keel_redis *client, const keel_ratelimit_redis_opts *opts,
                             keel_ratelimit_redis **out) {
  if (client == NULL || opts == NULL || out == NULL) return UV_EINVAL;
  if (keel__redis_closing(client)) return KEEL_ECLOSING;
  keel_ratelimit_opts lo;
  keel_ratelimit_opts_init(&lo);
  lo.rate = opts->rate;
  lo.period_ms = opts->period_ms;
  lo.burst = opts->burst;
  if (keel_ratelimit_validate_opts(&lo, NULL) != 0) return UV_EINVAL;
  uint64_t interval = opts->period_ms * 1000 / opts->rate;
  uint64_t burst = opts->burst != 0 ? opts->burst : opts->rate;
  if (interval == 0) return UV_EINVAL; /* more than one call per microsecond */
  const char *prefix = opts->prefix != NULL ? opts->prefix : "";
  size_t plen = strlen(prefix);
  if (plen > PREFIX_MAX) return UV_EINVAL;
  keel_ratelimit_redis *rl = keel__calloc(1, sizeof *rl);
  if (rl == NULL) return UV_ENOMEM;
  rl->client = client;
  keel_redis_script_init(&rl->script, gcra_script);
  rl->burst = burst;
  rl->timeout_ms = opts->timeout_ms;
  snprintf(rl->interval_us, sizeof rl->interval_us, "%" PRIu64, interval);
  snprintf(rl->tau_us, sizeof rl->tau_us, "%" PRIu64, interval * burst);
  memcpy(rl->prefix, prefix, plen + 1);
  rl->prefix_len = plen;
  uv_timer_init(keel_redis_loop(client), &rl->close_handle); /* cannot fail */
  *out = rl;
  return 0;
}

static void on_closed(uv_handle_t *h) {
  keel_ratelimit_redis *rl = KEEL__CONTAINER_OF(h, keel_ratelimit_redis, close_handle);
  keel_close_cb cb = rl->close_cb;
  void *data = rl->close_data;
  while (rl->free_list != NULL) {
    req *q = rl->free_list;
    rl->free_list = q->next;
    keel__free(q);
  }
  keel__free(rl);
  if (cb != NULL) cb(rl, data);
}

static void maybe_finish_close(keel_ratelimit_redis *rl) {
  if (rl->closing == 1 && rl->stats.in_flight == 0) {
    rl->closing = 2;
    uv_close((uv_handle_t *)&rl->close_handle, on_closed);
  }
}

static void on_reply(keel_redis *r, int status, const struct redisReply *rep, void *data) {
  (void)r;
  req *q = data;
  keel_ratelimit_redis *rl = q->rl;
  keel_ratelimit_redis_cb cb = q->cb;
  void *cb_data = q->data;
  q->next = rl->free_list;
  rl->free_list = q;
  rl->stats.in_flight--;
  uint64_t after = 0, remaining = 0;
  if (status == 0) {
    if (keel_redis_reply_type_of(rep) != KEEL_REDIS_REPLY_ARRAY ||
        keel_redis_reply_elements(rep) != 3) {
      status = KEEL_EPROTO;
    } else {
      long long allowed = keel_redis_reply_integer(keel_redis_reply_element(rep, 0));
      long long a = keel_redis_reply_integer(keel_redis_reply_element(rep, 1));
      long long m = keel_redis_reply_integer(keel_redis_reply_element(rep, 2));
      remaining = m > 0 ? (uint64_t)m : 0;
      if (allowed == 1) {
        rl->stats.allowed++;
      } else {
        rl->stats.rejected++;
        status = KEEL_ERATELIMIT;
        uint64_t us = a > 0 ? (uint64_t)a : 0;
        after = us / 1000 + (us % 1000 != 0);
        if (after == 0) after = 1;
      }
    }
  }
  if (status != 0 && status != KEEL_ERATELIMIT) rl->stats.errors++;
  if (rl->closing) {
    status = UV_ECANCELED;
    after = remaining = 0;
  }
  cb(rl, status, after, remaining, cb_data);
  maybe_finish_close(rl);
}

int keel_ratelimit_redis_take(keel_ratelimit_redis *rl, const char *tenant, uint64_t n,
                              keel_ratelimit_redis_cb cb, void *data) {
  if (rl == NULL || tenant == NULL || cb == NULL) return UV_EINVAL;
  if (rl->closing) return KEEL_ECLOSING;
  if (n == 0 || n > rl->burst) return UV_EINVAL;
  size_t tlen = strlen(tenant);
  if (tlen > TENANT_MAX) return UV_EINVAL;
  char key[PREFIX_MAX + TENANT_MAX + 1];
  memcpy(key, rl->prefix, rl->prefix_len);
  memcpy(key + rl->prefix_len, tenant, tlen);
  char nbuf[24];
  const char *nstr = "1";
  if (n != 1) {
    snprintf(nbuf, sizeof nbuf, "%" PRIu64, n);
    nstr = nbuf;
  }
  req *q = rl->free_list;
  if (q != NULL) {
    rl->free_list = q->next;
  } else {
    q = keel__malloc(sizeof *q);
    if (q == NULL) return UV_ENOMEM;
  }
  q->rl = rl;
  q->cb = cb;
  q->data = data;
  const char *argv[4] = {key, rl->interval_us, rl->tau_us, nstr};
  size_t argvlen[4] = {rl->prefix_len + tlen, strlen(rl->interval_us), strlen(rl->tau_us),
                       strlen(nstr)};
  int rc = keel_redis_eval_timeout(rl->client, rl->timeout_ms, &rl->script, 1, 4, argv, argvlen,
                                   on_reply, q);
  if (rc != 0) {
    q->next = rl->free_list;
    rl->free_list = q;
    return rc;
  }
  rl->stats.in_flight++;
  return 0;
}

void keel_ratelimit_redis_get_stats(const keel_ratelimit_redis *rl,
                                    keel_ratelimit_redis_stats *out) {
  if (rl == NULL || out == NULL) return;
  *out = rl->stats;
  memset(out->reserved_, 0, sizeof out->reserved_);
}

void keel_ratelimit_redis_close(keel_ratelimit_redis *rl, keel_close_cb cb, void *data) {
  if (rl == NULL || rl->closing) return;
  rl->closing = 1;
  keel__stats_hooks_detach(&rl->stats_hooks); /* drops serve registrations */
  rl->close_cb = cb;
  rl->close_data = data;
  maybe_finish_close(rl);
}

keel__stats_hooks *keel__ratelimit_redis_stats_hooks(keel_ratelimit_redis *x) {
  return x->closing ? NULL : &x->stats_hooks; /* no registration once closing */
}
