/* keel_serve adapter of the priority job processor: kind "queue". */
#include "keel/serve.h"
#include "queue/queue_stats.h"

static void write_queue(const void *obj, keel_stats_writer *w) {
  const keel_queue *q = obj;
  keel_queue_stats st;
  keel_queue_get_stats(q, &st);
  keel_stats_gauge(w, "pending", "Jobs waiting to start.", (double)st.pending);
  keel_stats_gauge(w, "waiting_retry", "Jobs waiting for a retry.", (double)st.waiting);
  keel_stats_gauge(w, "running", "Jobs running.", (double)st.running);
  keel_stats_gauge(w, "concurrency", "Configured concurrency.", st.concurrency);
  keel_stats_gauge(w, "paused", "1 while paused.", st.paused ? 1 : 0);
  keel_stats_counter(w, "pushed", "Jobs pushed.", st.pushed);
  keel_stats_counter(w, "completed", "Jobs completed.", st.completed);
  keel_stats_counter(w, "failed", "Jobs failed for good.", st.failed);
  keel_stats_counter(w, "retried", "Retries scheduled.", st.retried);
  keel_stats_counter(w, "timed_out", "Attempts that timed out.", st.timed_out);
  keel_stats_counter(w, "cancelled", "Jobs cancelled or dropped by close.", st.cancelled);
  keel_stats_gauge(w, "throughput_jobs_per_second", "Completions per second, last interval.",
                   st.jobs_per_second);
  keel__histogram_write(w, "wait_seconds", "Time from ready to start.",
                        keel__queue_histogram(q, false));
  keel__histogram_write(w, "run_seconds", "Time from start to done.",
                        keel__queue_histogram(q, true));
}

static const keel_stats_source queue_source = {"queue", write_queue};

int keel_queue_serve(struct keel_serve *s, keel_queue *q, const char *name) {
  if (s == NULL || q == NULL || name == NULL) return UV_EINVAL;
  return keel__serve_register_hooked(s, &queue_source, q, name, keel__queue_stats_hooks(q));
}
