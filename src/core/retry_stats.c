/* keel_serve adapter of the retry runner: kind "retry". */
#include "core/retry_stats.h"
#include "keel/serve.h"

static void write_retry(const void *obj, keel_stats_writer *w) {
  unsigned attempts;
  int last_status;
  bool done;
  uint64_t last_delay_ms;
  keel__retry_peek(obj, &attempts, &last_status, &done, &last_delay_ms);
  keel_stats_counter(w, "attempts", "Attempts started.", attempts);
  keel_stats_gauge(w, "done", "1 once the outcome is delivered.", done ? 1 : 0);
  keel_stats_gauge(w, "last_delay_seconds", "The last backoff delay.",
                   (double)last_delay_ms / 1000.0);
  keel_stats_text(w, "last_status", last_status ? keel_err_name(last_status) : "");
}

static const keel_stats_source retry_source = {"retry", write_retry};

int keel_retry_serve(struct keel_serve *s, keel_retry *r, const char *name) {
  if (s == NULL || r == NULL || name == NULL) return UV_EINVAL;
  return keel__serve_register_hooked(s, &retry_source, r, name, keel__retry_stats_hooks(r));
}
