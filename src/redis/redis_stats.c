/* keel_serve adapter of the Redis client: kind "redis". */
#include "keel/serve.h"
#include "redis/redis_stats.h"

static const char *const states[] = {"connecting", "ready", "down"};

static void write_redis(const void *obj, keel_stats_writer *w) {
  const keel_redis *r = obj;
  keel_redis_stats st;
  keel_redis_get_stats(r, &st);
  keel_redis_state state = keel_redis_get_state(r);
  keel_stats_state(w, "state", "Connection state (1 for the current one).", states,
                   sizeof states / sizeof states[0], (size_t)state < 3 ? (size_t)state : 2);
  keel_stats_counter(w, "commands", "Commands answered (any status).", st.commands);
  keel_stats_counter(w, "errors", "Commands answered with a Redis error.", st.errors);
  keel_stats_counter(w, "timeouts", "Commands that timed out.", st.timeouts);
  keel_stats_counter(w, "in_doubt", "Commands whose outcome is unknown (KEEL_EINDOUBT).",
                     st.in_doubt);
  keel_stats_counter(w, "noscript", "NOSCRIPT replies answered by EVAL and a reload.", st.noscript);
  keel_stats_counter(w, "connects", "Connections that became ready.", st.connects);
  keel_stats_counter(w, "reconnects", "Connect attempts after the first.", st.reconnects);
  keel_stats_counter(w, "disconnects", "Ready connections lost or reset.", st.disconnects);
  keel_stats_gauge(w, "pending", "Commands waiting or in flight.", (double)st.pending);
  keel_stats_gauge(w, "in_flight", "Commands sent, reply not yet in.", (double)st.in_flight);
  keel_stats_counter(w, "timed_replies", "Replies whose latency is timed.", st.latency_count);
  keel_stats_gauge(w, "latency_p50_seconds", "Median send-to-reply time, all timed replies.",
                   st.latency_p50_us / 1e6);
  keel_stats_gauge(w, "latency_p99_seconds", "99th percentile send-to-reply time.",
                   st.latency_p99_us / 1e6);
  keel_stats_gauge(w, "latency_max_seconds", "Longest send-to-reply time.",
                   st.latency_max_us / 1e6);
}

static const keel_stats_source redis_source = {"redis", write_redis};

int keel_redis_serve(struct keel_serve *s, keel_redis *r, const char *name) {
  if (s == NULL || r == NULL || name == NULL) return UV_EINVAL;
  keel__stats_hooks *hooks = keel__redis_stats_hooks(r);
  if (hooks == NULL) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &redis_source, r, name, hooks);
}
