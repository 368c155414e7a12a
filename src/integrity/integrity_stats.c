/* keel_serve adapter of the integrity context: kind "integrity". */
#include "integrity/integrity_internal.h"
#include "keel/serve.h"

static void write_integrity(const void *obj, keel_stats_writer *w) {
  keel_integrity_stats st;
  keel_integrity_get_stats(obj, &st);
  keel_stats_counter(w, "operations", "Operations accepted.", st.operations);
  keel_stats_counter(w, "attempts", "Statements and transactions sent, retries included.",
                     st.attempts);
  keel_stats_counter(w, "successes", "Operations that ended with 0.", st.successes);
  keel_stats_counter(w, "conflicts", "Version conflicts of versioned writes.", st.conflicts);
  keel_stats_counter(w, "retries", "Attempts after the first.", st.retries);
  keel_stats_counter(w, "not_found", "KEEL_ENOTFOUND outcomes.", st.not_found);
  keel_stats_counter(w, "slug_inserts", "Rows inserted by keel_slug_insert().", st.slug_inserts);
  keel_stats_counter(w, "slug_collisions", "Unique violations met inserting slugs.",
                     st.slug_collisions);
  keel_stats_counter(w, "in_doubt", "Operations that ended with KEEL_EINDOUBT.", st.in_doubt);
  for (int c = 1; c < KEEL_SQLSTATE_CLASS_COUNT; c++)
    keel_stats_counter_by(w, "errors_by_class", "Errors per SQLSTATE class.", "class",
                          keel_sqlstate_class_name((keel_sqlstate_class)c), st.by_class[c]);
}

static const keel_stats_source integrity_source = {"integrity", write_integrity};

int keel_integrity_serve(struct keel_serve *s, keel_integrity *ig, const char *name) {
  if (s == NULL || ig == NULL || name == NULL) return UV_EINVAL;
  if (ig->closing) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &integrity_source, ig, name, &ig->stats_hooks);
}
