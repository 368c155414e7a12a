/* keel_serve adapter of the idempotency store: kind "idempotency". */
#include "idem/idem_stats.h"
#include "keel/serve.h"

static void write_idem(const void *obj, keel_stats_writer *w) {
  keel_idem_stats st;
  keel_idem_get_stats(obj, &st);
  keel_stats_counter(w, "begins", "Begins accepted.", st.begins);
  keel_stats_counter(w, "owned", "Begins that took the key.", st.owned);
  keel_stats_counter(w, "taken_over", "Owned begins that replaced an expired entry.",
                     st.taken_over);
  keel_stats_counter(w, "busy", "Begins answered KEEL_EINPROGRESS.", st.busy);
  keel_stats_counter(w, "mismatches", "Begins answered KEEL_EMISMATCH.", st.mismatches);
  keel_stats_counter(w, "replays", "Begins answered with the stored response.", st.replays);
  keel_stats_counter(w, "completes", "Responses stored.", st.completes);
  keel_stats_counter(w, "bodies_too_large", "Completes whose body was over max_body.",
                     st.bodies_too_large);
  keel_stats_counter(w, "aborts", "Keys freed by abort.", st.aborts);
  keel_stats_counter(w, "lost", "Completes and aborts answered KEEL_ELOST.", st.lost);
  keel_stats_counter(w, "errors", "Operations ended by any other error.", st.errors);
  keel_stats_gauge(w, "in_flight", "Operations whose callback is due.", (double)st.in_flight);
}

static const keel_stats_source idem_source = {"idempotency", write_idem};

int keel_idem_serve(struct keel_serve *s, keel_idem *idem, const char *name) {
  if (s == NULL || idem == NULL || name == NULL) return UV_EINVAL;
  keel__stats_hooks *hooks = keel__idem_stats_hooks(idem);
  if (hooks == NULL) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &idem_source, idem, name, hooks);
}
