/* keel_serve adapter of the breaker: kind "breaker". */
#include "circuit/breaker_internal.h"
#include "keel/breaker.h"
#include "keel/serve.h"

static const char *const states[] = {"closed", "open", "half_open", "forced_open", "disabled"};

static void write_breaker(const void *obj, keel_stats_writer *w) {
  keel_breaker_stats st;
  keel_breaker_get_stats((keel_breaker *)obj, &st);
  keel_stats_state(w, "state", "Breaker state (1 for the current one).", states,
                   sizeof states / sizeof states[0], (size_t)st.state);
  keel_stats_counter(w, "calls_permitted", "Calls let through.", st.calls_permitted);
  keel_stats_counter(w, "calls_rejected", "Calls rejected with KEEL_EOPEN.", st.calls_rejected);
  keel_stats_counter(w, "calls_succeeded", "Calls that succeeded.", st.calls_succeeded);
  keel_stats_counter(w, "calls_failed", "Calls that failed (timeouts included).", st.calls_failed);
  keel_stats_counter(w, "calls_slow", "Calls at or above the slow-call duration.", st.calls_slow);
  keel_stats_counter(w, "calls_timed_out", "execute() calls that timed out.", st.calls_timed_out);
  keel_stats_counter(w, "state_changes", "State transitions.", st.state_changes);
  keel_stats_gauge(w, "failure_rate", "Failure rate over the window (-1: not enough calls).",
                   st.failure_rate);
  keel_stats_gauge(w, "consecutive_failures", "Failures in a row.", st.consecutive_failures);
  keel_stats_gauge(w, "probes_in_flight", "Half-open probes not yet released.",
                   st.probes_in_flight);
  keel_stats_gauge(w, "open_duration_seconds", "Length of the current or next open period.",
                   (double)st.open_duration_ms / 1000.0);
  keel_stats_gauge(w, "state_entered_seconds",
                   "Breaker clock time the current state began (loop clock).",
                   (double)st.state_entered_ms / 1000.0);
}

static const keel_stats_source breaker_source = {"breaker", write_breaker};

int keel_breaker_serve(struct keel_serve *s, keel_breaker *b, const char *name) {
  if (s == NULL || b == NULL || name == NULL) return UV_EINVAL;
  if (b->closing) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &breaker_source, b, name, &b->stats_hooks);
}
