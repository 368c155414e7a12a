/* keel_serve adapter of the change listener: kind "listener". */
#include "keel/serve.h"
#include "listen/listener_stats.h"

static void write_listener(const void *obj, keel_stats_writer *w) {
  const keel_listener *l = obj;
  keel_listener_stats st;
  keel_listener_get_stats(l, &st);
  keel_stats_gauge(w, "active", "1 while LISTENing.", st.active ? 1 : 0);
  keel_stats_counter(w, "received", "Notifications received.", st.received);
  keel_stats_counter(w, "delivered", "Changes handed to handlers.", st.delivered);
  keel_stats_counter(w, "filtered", "Changes dropped by filter, table or mask.", st.filtered);
  keel_stats_counter(w, "malformed", "Payloads that are not keel's JSON.", st.malformed);
  keel_stats_counter(w, "fetched", "Oversize rows fetched by key.", st.fetched);
  keel_stats_counter(w, "reconnects", "Reconnects.", st.reconnects);
  keel_stats_counter(w, "gaps", "Gaps reported: changes may have been missed.", st.gaps);
  keel_stats_counter(w, "raw", "Raw channel notifications.", st.raw);
  keel__histogram_write(w, "lag_seconds", "Change time to handler.", keel__listener_histogram(l));
}

static const keel_stats_source listener_source = {"listener", write_listener};

int keel_listener_serve(struct keel_serve *s, keel_listener *l, const char *name) {
  if (s == NULL || l == NULL || name == NULL) return UV_EINVAL;
  return keel__serve_register_hooked(s, &listener_source, l, name, keel__listener_stats_hooks(l));
}
