/* keel_serve adapters of the PostgreSQL connection (kind "pg") and pool
 * (kind "pg_pool"). */
#include "keel/serve.h"
#include "pg/pg_internal.h"
#include "pg/pg_stats.h"

static void write_pg(const void *obj, keel_stats_writer *w) {
  keel_pg_stats st;
  keel_pg_get_stats(obj, &st);
  keel_stats_gauge(w, "connected", "1 while connected.", st.connected ? 1 : 0);
  keel_stats_counter(w, "queries", "Statements completed.", st.queries);
  keel_stats_counter(w, "errors", "Statements failed with KEEL_EPG.", st.errors);
  keel_stats_counter(w, "in_doubt", "Statements that got KEEL_EINDOUBT.", st.in_doubt);
  keel_stats_counter(w, "connects", "Successful connects.", st.connects);
  keel_stats_counter(w, "disconnects", "Connection losses.", st.disconnects);
  keel_stats_counter(w, "reconnects", "Reconnect attempts.", st.reconnects);
  keel_stats_gauge(w, "in_flight", "Statements sent, result not yet in.", (double)st.in_flight);
  keel_stats_gauge(w, "queued", "Statements waiting to be sent.", (double)st.queued);
}

static void write_pool(const void *obj, keel_stats_writer *w) {
  keel_pg_pool_stats st;
  keel_pg_pool_get_stats(obj, &st);
  keel_stats_gauge(w, "size", "Configured connections.", st.size);
  keel_stats_gauge(w, "connected", "Connections up.", st.connected);
  keel_stats_gauge(w, "waiting", "Queries, acquires and transactions waiting.", (double)st.waiting);
  keel_stats_gauge(w, "in_flight", "Statements sent, summed over connections.",
                   (double)st.in_flight);
  keel_stats_counter(w, "queries", "Pool queries completed.", st.queries);
  keel_stats_counter(w, "errors", "Pool queries failed with KEEL_EPG.", st.errors);
  keel_stats_counter(w, "transactions", "Transactions committed.", st.transactions);
  keel_stats_counter(w, "rollbacks", "Transactions ended without committing.", st.rollbacks);
  keel_stats_counter(w, "in_doubt", "Transactions whose COMMIT outcome is unknown.", st.in_doubt);
  keel_stats_counter(w, "acquire_timeouts", "Waiters failed with UV_ETIMEDOUT.",
                     st.acquire_timeouts);
  keel_stats_counter(w, "reconnects", "Reconnect attempts, all connections.", st.reconnects);
}

static const keel_stats_source pg_source = {"pg", write_pg};
static const keel_stats_source pool_source = {"pg_pool", write_pool};

int keel_pg_serve(struct keel_serve *s, keel_pg *c, const char *name) {
  if (s == NULL || c == NULL || name == NULL) return UV_EINVAL;
  if (c->state == KEEL__PG_CLOSING) return KEEL_ECLOSING;
  return keel__serve_register_hooked(s, &pg_source, c, name, &c->stats_hooks);
}

int keel_pg_pool_serve(struct keel_serve *s, keel_pg_pool *p, const char *name) {
  if (s == NULL || p == NULL || name == NULL) return UV_EINVAL;
  return keel__serve_register_hooked(s, &pool_source, p, name, keel__pg_pool_stats_hooks(p));
}
