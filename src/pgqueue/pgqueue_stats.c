/* keel_serve adapter of the durable queue: kind "pgqueue". */
#include "keel/serve.h"
#include "pgqueue/pgqueue_stats.h"

static void write_pgqueue(const void *obj, keel_stats_writer *w) {
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(obj, &st);
  keel_stats_gauge(w, "available", "Jobs due now (table, last refresh).", (double)st.available);
  keel_stats_gauge(w, "scheduled", "Jobs due later (table, last refresh).", (double)st.scheduled);
  keel_stats_gauge(w, "running", "Jobs running on any worker (table, last refresh).",
                   (double)st.running);
  keel_stats_gauge(w, "dead", "Dead jobs (table, last refresh).", (double)st.dead);
  keel_stats_gauge(w, "oldest_available_seconds", "Age of the oldest due job; 0 when none.",
                   st.oldest_available_ms / 1000.0);
  keel_stats_gauge(w, "dead_tuples", "Dead tuples of the jobs table.", (double)st.dead_tuples);
  keel_stats_gauge(w, "live_tuples", "Live tuples of the jobs table.", (double)st.live_tuples);
  keel_stats_gauge(w, "held", "Jobs fetched here and not finished.", (double)st.held);
  keel_stats_gauge(w, "running_here", "Jobs started here and not finished.",
                   (double)st.running_here);
  keel_stats_gauge(w, "concurrency", "Configured concurrency.", st.concurrency);
  keel_stats_gauge(w, "paused", "1 while paused.", st.paused ? 1 : 0);
  keel_stats_gauge(w, "connected", "1 while connected.", st.connected ? 1 : 0);
  keel_stats_counter(w, "enqueued", "Jobs inserted through this object.", st.enqueued);
  keel_stats_counter(w, "fetches", "Fetch statements.", st.fetches);
  keel_stats_counter(w, "fetched", "Jobs fetched.", st.fetched);
  keel_stats_counter(w, "completed", "Successes written.", st.completed);
  keel_stats_counter(w, "failed", "Failures written (retry or dead).", st.failed);
  keel_stats_counter(w, "retried", "Failures to be retried.", st.retried);
  keel_stats_counter(w, "dead_here", "Failures that made the job dead.", st.dead_here);
  keel_stats_counter(w, "timed_out", "Attempts that timed out.", st.timed_out);
  keel_stats_counter(w, "lease_lost", "Jobs whose lease this object lost.", st.lease_lost);
  keel_stats_counter(w, "fenced", "Completions that changed nothing (lease gone).", st.fenced);
  keel_stats_counter(w, "given_back", "Prefetched jobs given back.", st.given_back);
  keel_stats_counter(w, "rescued", "Expired leases rescued.", st.rescued);
  keel_stats_counter(w, "heartbeats", "Lease heartbeats written.", st.heartbeats);
  keel_stats_counter(w, "flushes", "Completion batches written.", st.flushes);
  keel_stats_counter(w, "flush_retries",
                     "Completion batches sent again after a transient error rolled them back.",
                     st.flush_retries);
  const struct {
    const char *p50, *p99, *max, *what;
    const keel_pgqueue_latency *l;
  } lat[] = {
      {"fetch_p50_seconds", "fetch_p99_seconds", "fetch_max_seconds", "Fetch statement round trip",
       &st.fetch},
      {"pickup_p50_seconds", "pickup_p99_seconds", "pickup_max_seconds",
       "Enqueue (or run_at) to start, server clock", &st.pickup},
      {"run_p50_seconds", "run_p99_seconds", "run_max_seconds", "Start to done", &st.run},
  };
  for (size_t i = 0; i < sizeof lat / sizeof lat[0]; i++) {
    keel_stats_gauge(w, lat[i].p50, lat[i].what, lat[i].l->p50_ms / 1000.0);
    keel_stats_gauge(w, lat[i].p99, lat[i].what, lat[i].l->p99_ms / 1000.0);
    keel_stats_gauge(w, lat[i].max, lat[i].what, lat[i].l->max_ms / 1000.0);
  }
}

static const keel_stats_source pgqueue_source = {"pgqueue", write_pgqueue};

int keel_pgqueue_serve(struct keel_serve *s, keel_pgqueue *q, const char *name) {
  if (s == NULL || q == NULL || name == NULL) return UV_EINVAL;
  keel__stats_hooks *hooks = keel__pgqueue_stats_hooks(q);
  if (hooks == NULL) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &pgqueue_source, q, name, hooks);
}
