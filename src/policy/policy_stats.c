/* keel_serve adapters of the policies: kinds "pipeline", "ratelimit" and
 * "ratelimit_redis". */
#include "keel/serve.h"
#include "policy/policy_stats.h"

static void write_pipeline(const void *obj, keel_stats_writer *w) {
  keel_pipeline_stats st;
  keel_pipeline_get_stats((keel_pipeline *)obj, &st);
  keel_stats_counter(w, "calls", "Calls accepted.", st.calls);
  keel_stats_counter(w, "succeeded", "Calls done with a status >= 0.", st.succeeded);
  keel_stats_counter(w, "failed", "Calls done with a status < 0.", st.failed);
  keel_stats_counter(w, "attempts", "Operation attempts started.", st.attempts);
  keel_stats_counter(w, "ratelimited", "KEEL_ERATELIMIT answers.", st.ratelimited);
  keel_stats_counter(w, "timeouts", "Timeouts expired.", st.timeouts);
  keel_stats_counter(w, "retries", "Retries decided.", st.retries);
  keel_stats_counter(w, "breaker_rejected", "KEEL_EOPEN and KEEL_EPROBES answers.",
                     st.breaker_rejected);
  keel_stats_counter(w, "fallbacks", "Fallback calls.", st.fallbacks);
  keel_stats_counter(w, "hedges", "Hedged attempts started after the first.", st.hedges);
  keel_stats_counter(w, "cancels", "Attempts told to stop.", st.cancels);
  keel_stats_counter(w, "bulkhead_rejected", "KEEL_EFULL answers from a bulkhead.",
                     st.bulkhead_rejected);
  keel_stats_gauge(w, "in_flight", "Calls accepted and not yet done.", (double)st.in_flight);
  keel_stats_gauge(w, "bulkhead_active", "Calls inside bulkheads.", (double)st.bulkhead_active);
  keel_stats_gauge(w, "bulkhead_queued", "Calls waiting at bulkheads.", (double)st.bulkhead_queued);
  keel_stats_gauge(w, "bulkhead_active_max", "Highest bulkhead_active of one bulkhead seen.",
                   (double)st.bulkhead_active_max);
  keel_stats_gauge(w, "bulkhead_queued_max", "Highest bulkhead_queued of one bulkhead seen.",
                   (double)st.bulkhead_queued_max);
}

static void write_ratelimit(const void *obj, keel_stats_writer *w) {
  keel_ratelimit_stats st;
  keel_ratelimit_get_stats((keel_ratelimit *)obj, &st);
  keel_stats_counter(w, "allowed", "Calls allowed.", st.allowed);
  keel_stats_counter(w, "rejected", "Takes answered KEEL_ERATELIMIT.", st.rejected);
  keel_stats_gauge(w, "available", "Calls that could go now.", (double)st.available);
}

static void write_ratelimit_redis(const void *obj, keel_stats_writer *w) {
  keel_ratelimit_redis_stats st;
  keel_ratelimit_redis_get_stats(obj, &st);
  keel_stats_counter(w, "allowed", "Takes allowed.", st.allowed);
  keel_stats_counter(w, "rejected", "Takes answered KEEL_ERATELIMIT.", st.rejected);
  keel_stats_counter(w, "errors", "Takes answered with an error.", st.errors);
  keel_stats_gauge(w, "in_flight", "Takes sent and not answered.", (double)st.in_flight);
}

static const keel_stats_source pipeline_source = {"pipeline", write_pipeline};
static const keel_stats_source ratelimit_source = {"ratelimit", write_ratelimit};
static const keel_stats_source ratelimit_redis_source = {"ratelimit_redis", write_ratelimit_redis};

int keel_pipeline_serve(struct keel_serve *s, keel_pipeline *p, const char *name) {
  if (s == NULL || p == NULL || name == NULL) return UV_EINVAL;
  keel__stats_hooks *hooks = keel__pipeline_stats_hooks(p);
  if (hooks == NULL) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &pipeline_source, p, name, hooks);
}

int keel_ratelimit_serve(struct keel_serve *s, keel_ratelimit *rl, const char *name) {
  if (s == NULL || rl == NULL || name == NULL) return UV_EINVAL;
  keel__stats_hooks *hooks = keel__ratelimit_stats_hooks(rl);
  if (hooks == NULL) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &ratelimit_source, rl, name, hooks);
}

int keel_ratelimit_redis_serve(struct keel_serve *s, keel_ratelimit_redis *rl, const char *name) {
  if (s == NULL || rl == NULL || name == NULL) return UV_EINVAL;
  keel__stats_hooks *hooks = keel__ratelimit_redis_stats_hooks(rl);
  if (hooks == NULL) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &ratelimit_redis_source, rl, name, hooks);
}
