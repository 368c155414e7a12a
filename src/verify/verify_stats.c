/* keel_serve adapter of the verification job: kind "verifier". */
#include "keel/serve.h"
#include "verify/verify_internal.h"

static void write_verify(const void *obj, keel_stats_writer *w) {
  keel_verify_stats st;
  keel_verify_get_stats(obj, &st);
  keel_stats_gauge(w, "running", "1 while a run is going.", st.running ? 1 : 0);
  keel_stats_gauge(w, "leader", "1 while this process leads.", st.leader ? 1 : 0);
  keel_stats_counter(w, "runs_started", "Runs started.", st.runs_started);
  keel_stats_counter(w, "runs_completed", "Runs ended with status 0.", st.runs_completed);
  keel_stats_counter(w, "runs_failed", "Runs ended with an error.", st.runs_failed);
  keel_stats_counter(w, "runs_skipped", "Ticks skipped while a run was going.", st.runs_skipped);
  keel_stats_counter(w, "rows_scanned", "Rows scanned.", st.rows_scanned);
  keel_stats_counter(w, "rows_invalid", "Rows the validator rejected.", st.rows_invalid);
  keel_stats_counter(w, "fixes_succeeded", "Rows fixed.", st.fixes_succeeded);
  keel_stats_counter(w, "fixes_failed", "Rows whose fix-up failed for good.", st.fixes_failed);
  keel_stats_counter(w, "problems", "Problems found, all runs.", st.problems_total);
  keel_stats_gauge(w, "problems_last_run", "Problems found by the last finished run.",
                   (double)st.problems_last_run);
  keel_stats_gauge(w, "last_run_duration_seconds", "Duration of the last finished run.",
                   (double)st.last_run_duration_ms / 1000.0);
  keel_stats_gauge(w, "last_run_started_seconds",
                   "Clock time of the last run start (loop clock, 0 = never).",
                   (double)st.last_run_started_ms / 1000.0);
  keel_stats_gauge(w, "next_run_seconds", "Clock time of the next tick (loop clock, 0 = none).",
                   (double)st.next_run_ms / 1000.0);
  for (unsigned i = 0; i < st.ncodes && i < KEEL_VERIFY_TOP_CODES; i++)
    keel_stats_counter_by(w, "problems_by_code", "Rows with this problem code, all runs.", "code",
                          st.top_codes[i].code, st.top_codes[i].total);
  keel_stats_text(w, "last_status", keel_err_name(st.last_status));
  keel_stats_text(w, "last_error", st.last_error);
}

static const keel_stats_source verify_source = {"verifier", write_verify};

int keel_verify_serve(struct keel_serve *s, keel_verify *v, const char *name) {
  if (s == NULL || v == NULL || name == NULL) return UV_EINVAL;
  if (v->closing) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &verify_source, v, name, &v->stats_hooks);
}
