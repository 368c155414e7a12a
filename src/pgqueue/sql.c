/* The SQL keel's durable queue runs, formatted once per object with its
 * schema name (validated: [a-z_][a-z0-9_]{0,39}, so it needs no quoting).
 * docs/pgqueue.md reproduces these statements. */
#include <stdio.h>

#include "pgqueue_internal.h"

/* Migration: one DO block = one transaction, serialised between processes by
 * a transaction-scoped advisory lock taken first; each version is applied
 * once and recorded. */
static const char MIGRATE[] =
    "DO $keel$ BEGIN\n"
    "PERFORM pg_advisory_xact_lock(%lld);\n"
    "CREATE SCHEMA IF NOT EXISTS %s;\n"
    "CREATE TABLE IF NOT EXISTS %s.pgqueue_migrations (version int PRIMARY KEY,"
    " applied_at timestamptz NOT NULL DEFAULT now());\n"
    "IF NOT EXISTS (SELECT 1 FROM %s.pgqueue_migrations WHERE version = 1) THEN\n"
    "CREATE TABLE %s.pgqueue_jobs (\n"
    " id bigserial PRIMARY KEY,\n"
    " queue text NOT NULL,\n"
    " kind text NOT NULL DEFAULT '',\n"
    " payload jsonb NOT NULL DEFAULT '{}',\n"
    " priority int NOT NULL DEFAULT 0,\n"
    " run_at timestamptz NOT NULL DEFAULT now(),\n"
    " state text NOT NULL DEFAULT 'available'"
    " CHECK (state IN ('available','running','done','dead','cancelled')),\n"
    " attempt int NOT NULL DEFAULT 0,\n"
    " max_attempts int NOT NULL DEFAULT 25 CHECK (max_attempts >= 1),\n"
    " lease_owner text,\n"
    " lease_until timestamptz,\n"
    " unique_key text,\n"
    " timeout_ms bigint,\n"
    " backoff_kind smallint, backoff_base_ms bigint, backoff_factor float8,"
    " backoff_cap_ms bigint,\n"
    " last_error text,\n"
    " errors jsonb NOT NULL DEFAULT '[]',\n"
    " created_at timestamptz NOT NULL DEFAULT now(),\n"
    " started_at timestamptz,\n"
    " finished_at timestamptz\n"
    ") WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02,"
    " autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_insert_scale_factor = 0.02,"
    " autovacuum_analyze_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 1);\n"
    "CREATE INDEX pgqueue_jobs_fetch ON %s.pgqueue_jobs (queue, priority DESC, run_at, id)"
    " WHERE state = 'available';\n"
    "CREATE UNIQUE INDEX pgqueue_jobs_unique ON %s.pgqueue_jobs (queue, unique_key)"
    " WHERE unique_key IS NOT NULL AND state IN ('available','running');\n"
    "CREATE INDEX pgqueue_jobs_lease ON %s.pgqueue_jobs (lease_until)"
    " WHERE state = 'running';\n"
    "CREATE INDEX pgqueue_jobs_finished ON %s.pgqueue_jobs (finished_at)"
    " WHERE state IN ('done','dead','cancelled');\n"
    "CREATE FUNCTION %s.pgqueue_notify() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN"
    " PERFORM pg_notify('keel_pgq:' || s.q, '') FROM (SELECT DISTINCT queue AS q FROM"
    " new_rows) s; RETURN NULL; END $f$;\n"
    "CREATE TRIGGER pgqueue_notify AFTER INSERT ON %s.pgqueue_jobs"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION %s.pgqueue_notify();\n"
    "INSERT INTO %s.pgqueue_migrations (version) VALUES (1);\n"
    "END IF;\n"
    /* v2: an enqueue on keel's own connection (autocommit) says so with
     * keel.pgq_notify = 'later' and notifies in a transaction of its own
     * after the durable commit (see NOTIFY_LATER); the trigger then stays
     * quiet. */
    "IF NOT EXISTS (SELECT 1 FROM %s.pgqueue_migrations WHERE version = 2) THEN\n"
    "CREATE OR REPLACE FUNCTION %s.pgqueue_notify() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN"
    " IF current_setting('keel.pgq_notify', true) = 'later' THEN RETURN NULL; END IF;"
    " PERFORM pg_notify('keel_pgq:' || s.q, '') FROM (SELECT DISTINCT queue AS q FROM"
    " new_rows) s; RETURN NULL; END $f$;\n"
    /* v2: the lease index keyed on "lease_until IS NOT NULL" (the same rows:
     * a lease is set exactly while running) instead of "state = 'running'":
     * the planner, which ANALYZE told that running rows are nearly none,
     * used the old one for every lookup that says state = 'running' (the
     * fences of completions and heartbeats) and scanned all running rows
     * once per entry of a batch. The rescue's "lease_until < now()" still
     * uses this one. */
    "DROP INDEX IF EXISTS %s.pgqueue_jobs_lease;\n"
    "CREATE INDEX pgqueue_jobs_lease ON %s.pgqueue_jobs (lease_until)"
    " WHERE lease_until IS NOT NULL;\n"
    "INSERT INTO %s.pgqueue_migrations (version) VALUES (2);\n"
    "END IF;\n"
    "END $keel$";

/* $1 queue[] $2 kind[] $3 payload[] $4 priority[] $5 delay_ms[] $6 max_attempts[]
 * $7 unique_key[] $8 timeout_ms[] $9..$12 backoff kind/base/factor/cap[]
 * $13 'later' on keel's own (autocommit) connection: the insert trigger does
 * not notify, NOTIFY_LATER follows; '' in a caller's transaction. */
static const char ENQUEUE[] =
    "WITH sc AS MATERIALIZED (SELECT set_config('keel.pgq_notify', $13::text, true)),"
    " i AS MATERIALIZED (SELECT nextval('%s.pgqueue_jobs_id_seq') AS id, t.* FROM"
    " unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::int[],"
    " $7::text[], $8::bigint[], $9::smallint[], $10::bigint[], $11::float8[], $12::bigint[])"
    " WITH ORDINALITY AS t(queue, kind, payload, priority, delay_ms, max_attempts,"
    " unique_key, timeout_ms, bk, bb, bf, bc, ord), sc),"
    " ins AS (INSERT INTO %s.pgqueue_jobs (id, queue, kind, payload, priority, run_at,"
    " max_attempts, unique_key, timeout_ms, backoff_kind, backoff_base_ms, backoff_factor,"
    " backoff_cap_ms) SELECT id, queue, kind, payload::jsonb, priority,"
    " now() + delay_ms * interval '1 millisecond', max_attempts, unique_key, timeout_ms,"
    " bk, bb, bf, bc FROM i ORDER BY ord"
    " ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL"
    " AND state IN ('available','running') DO NOTHING RETURNING id)"
    " SELECT i.ord, COALESCE(ins.id, fi.id, ex.id) AS id, ins.id IS NULL AS existed"
    " FROM i LEFT JOIN ins ON ins.id = i.id"
    " LEFT JOIN LATERAL (SELECT i2.id FROM i i2 JOIN ins ins2 ON ins2.id = i2.id"
    " WHERE ins.id IS NULL AND i2.queue = i.queue AND i2.unique_key = i.unique_key"
    " LIMIT 1) fi ON true"
    " LEFT JOIN LATERAL (SELECT j.id FROM %s.pgqueue_jobs j WHERE ins.id IS NULL"
    " AND j.queue = i.queue AND j.unique_key = i.unique_key"
    " AND j.state IN ('available','running') LIMIT 1) ex ON true"
    " ORDER BY i.ord";

/* $1 queue[]: sent right after an ENQUEUE with $13 = 'later' on the same
 * connection (pipelined, its own implicit transaction, so it runs after the
 * enqueue committed). PostgreSQL serialises the commits of all transactions
 * that NOTIFY under one lock held until the commit is flushed; this one's
 * commit need not be durable (it wrote nothing), so the lock is held for
 * microseconds instead of an fsync, and durable enqueues commit in groups. */
static const char NOTIFY_LATER[] =
    "WITH sc AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))"
    " SELECT pg_notify('keel_pgq:' || s.q, '') FROM (SELECT DISTINCT unnest($1::text[]) AS q) s,"
    " sc";

/* $1 owner $2 queue $3 limit $4 lease_ms. The fetch's commit need not be
 * durable: if a crash loses it, the row is available again with its old
 * attempt number and the worker's fenced writes for it change nothing.
 * The UPDATE finds the locked rows through = ANY(ARRAY(subquery)): an
 * InitPlan evaluated once, then one primary-key probe per row. (A join
 * with the CTE lets the planner pick a hash join over a sequential scan of
 * the whole table once ANALYZE saw it large: 200-400 ms per fetch.) */
static const char FETCH[] =
    "WITH sc AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)),"
    " c AS (SELECT id FROM %s.pgqueue_jobs WHERE queue = $2 AND state = 'available'"
    " AND run_at <= now() ORDER BY priority DESC, run_at, id LIMIT $3::int"
    " FOR UPDATE SKIP LOCKED)"
    " UPDATE %s.pgqueue_jobs j SET state = 'running', attempt = j.attempt + 1,"
    " lease_owner = $1, lease_until = now() + $4::bigint * interval '1 millisecond',"
    " started_at = now() FROM sc WHERE j.id = ANY (ARRAY(SELECT id FROM c))"
    " RETURNING j.id, j.attempt, j.max_attempts, j.priority, j.kind, j.payload::text,"
    " j.timeout_ms, j.backoff_kind, j.backoff_base_ms, j.backoff_factor, j.backoff_cap_ms,"
    " extract(epoch from (clock_timestamp() - j.run_at)) * 1000 AS pickup_ms, j.run_at";

/* The rows of a batch that still pass the fence (id, attempt, owner,
 * state = 'running'), locked: one primary-key probe per entry, driven by the
 * entries (a LATERAL subquery with FOR UPDATE is never flattened into a
 * join). The plan does not depend on statistics: with "id = ANY($n) AND key
 * = ANY($m)" or a plain join, a generic plan scanned the partial lease index
 * (which ANALYZE had seen nearly empty) and searched the array or rescanned
 * the unnest() for every row, quadratic in the batch (seconds for 4,096).
 * Locked, the rows cannot change before the write that follows in the same
 * statement, so that write needs no second check. %s: the id and attempt
 * arrays. */
#define FENCED(ids, atts)                                                                    \
  "ARRAY(SELECT x.id FROM unnest(" ids "::bigint[], " atts                                   \
  "::int[]) AS f(id, attempt),"                                                              \
  " LATERAL (SELECT y.id FROM %s.pgqueue_jobs y WHERE y.id = f.id AND y.attempt = f.attempt" \
  " AND y.lease_owner = $1 AND y.state = 'running' FOR UPDATE) x)"

/* $1 owner $2 keep_done $3 id[] $4 attempt[] $5 op[] ('retry','dead', 'back' =
 * give back a fetched job unstarted, 'release' = available now, attempt
 * kept) $6 delay_ms[] $7 error[] for the failures; $8 id[] $9 attempt[] for
 * the successes. Every write is fenced by (id, attempt, owner, state =
 * 'running'); the ids returned are the rows that changed. */
static const char FINISH[] =
    "WITH del AS (DELETE FROM %s.pgqueue_jobs j WHERE NOT $2::bool AND j.id = ANY ("
    FENCED("$8", "$9") ") RETURNING j.id),"
    " dn AS (UPDATE %s.pgqueue_jobs j SET state = 'done', lease_owner = NULL,"
    " lease_until = NULL, finished_at = now() WHERE $2::bool AND j.id = ANY ("
    FENCED("$8", "$9") ") RETURNING j.id),"
    " fl AS (SELECT * FROM unnest($3::bigint[], $4::int[], $5::text[], $6::bigint[],"
    " $7::text[]) AS f(id, attempt, op, delay_ms, err)),"
    " upd AS (UPDATE %s.pgqueue_jobs j SET"
    " state = CASE f.op WHEN 'dead' THEN 'dead' ELSE 'available' END,"
    " attempt = CASE WHEN f.op = 'back' THEN j.attempt - 1 ELSE j.attempt END,"
    " lease_owner = NULL, lease_until = NULL,"
    " run_at = CASE WHEN f.op IN ('retry','release') THEN now() + f.delay_ms * interval"
    " '1 millisecond' ELSE j.run_at END,"
    " finished_at = CASE WHEN f.op = 'dead' THEN now() END,"
    " last_error = COALESCE(f.err, j.last_error),"
    " errors = CASE WHEN f.err IS NULL THEN j.errors ELSE j.errors || jsonb_build_array("
    "jsonb_build_object('attempt', j.attempt, 'at', now(), 'error', f.err)) END"
    " FROM fl f WHERE j.id = ANY (" FENCED("$3", "$4") ") AND j.id = f.id"
    " AND j.attempt = f.attempt RETURNING j.id)"
    " SELECT id FROM del UNION ALL SELECT id FROM dn UNION ALL SELECT id FROM upd";

/* $1 owner $2 lease_ms $3 id[] $4 attempt[]: one statement renews every
 * lease of this owner; the rows not returned are lost. */
static const char HEARTBEAT[] =
    "WITH sc AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))"
    " UPDATE %s.pgqueue_jobs j SET lease_until = now() + $2::bigint * interval"
    " '1 millisecond' FROM sc WHERE j.id = ANY (" FENCED("$3", "$4") ")"
    " RETURNING j.id, j.attempt";

/* $1 lock key $2 dead_retention_ms $3 done_retention_ms. One process at a
 * time (try-lock, transaction scoped: works through transaction poolers);
 * the UPDATE re-checks state and lease so a completion that raced it wins. */
static const char RESCUE[] =
    "WITH lk AS MATERIALIZED (SELECT pg_try_advisory_xact_lock($1::bigint) AS got),"
    " x AS (SELECT j.id FROM %s.pgqueue_jobs j, lk WHERE lk.got AND j.state = 'running'"
    " AND j.lease_until < now() ORDER BY j.lease_until LIMIT 1000 FOR UPDATE OF j SKIP LOCKED),"
    " r AS (UPDATE %s.pgqueue_jobs j SET"
    " state = CASE WHEN j.attempt >= j.max_attempts THEN 'dead' ELSE 'available' END,"
    " lease_owner = NULL, lease_until = NULL, run_at = now(),"
    " finished_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,"
    " last_error = 'lease expired',"
    " errors = j.errors || jsonb_build_array(jsonb_build_object('attempt', j.attempt,"
    " 'at', now(), 'error', 'lease expired (owner ' || j.lease_owner || ')'))"
    " FROM x WHERE j.id = x.id AND j.state = 'running' AND j.lease_until < now()"
    " RETURNING j.id, j.queue, j.state),"
    " n AS MATERIALIZED (SELECT pg_notify('keel_pgq:' || s.queue, '') FROM (SELECT DISTINCT"
    " queue FROM r WHERE state = 'available') s),"
    " d AS (DELETE FROM %s.pgqueue_jobs WHERE id IN (SELECT j.id FROM %s.pgqueue_jobs j, lk"
    " WHERE lk.got AND ((j.state = 'dead' AND j.finished_at < now() - $2::bigint * interval"
    " '1 millisecond') OR (j.state IN ('done','cancelled') AND j.finished_at < now() -"
    " $3::bigint * interval '1 millisecond')) LIMIT 5000) RETURNING id)"
    " SELECT (SELECT got FROM lk), (SELECT count(*) FROM r), (SELECT count(*) FROM n),"
    " (SELECT count(*) FROM d)";

/* $1 queue */
static const char STATS[] =
    "SELECT count(*) FILTER (WHERE state = 'available' AND run_at <= now()),"
    " count(*) FILTER (WHERE state = 'available' AND run_at > now()),"
    " count(*) FILTER (WHERE state = 'running'), count(*) FILTER (WHERE state = 'dead'),"
    " COALESCE(extract(epoch from now() - min(run_at) FILTER (WHERE state = 'available'"
    " AND run_at <= now())) * 1000, 0),"
    " (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid ="
    " '%s.pgqueue_jobs'::regclass),"
    " (SELECT n_live_tup FROM pg_stat_user_tables WHERE relid ="
    " '%s.pgqueue_jobs'::regclass)"
    " FROM %s.pgqueue_jobs WHERE queue = $1 AND state IN ('available','running','dead')";

/* $1 id */
static const char CANCEL[] =
    "WITH o AS (SELECT id, state FROM %s.pgqueue_jobs WHERE id = $1::bigint"
    " AND state IN ('available','running') FOR UPDATE)"
    " UPDATE %s.pgqueue_jobs j SET state = 'cancelled', lease_owner = NULL,"
    " lease_until = NULL, finished_at = now() FROM o WHERE j.id = o.id RETURNING o.state";

/* $1 id $2 extra attempts */
static const char REDRIVE[] =
    "WITH o AS (SELECT id, state FROM %s.pgqueue_jobs WHERE id = $1::bigint"
    " AND state = 'dead' FOR UPDATE)"
    " UPDATE %s.pgqueue_jobs j SET state = 'available', run_at = now(), finished_at = NULL,"
    " max_attempts = j.attempt + $2::int FROM o WHERE j.id = o.id RETURNING o.state";

static char *fmt_n(const char *fmt, const char *schema, int n, long long key) {
  /* every %s is the schema; MIGRATE starts with one %lld */
  size_t cap = strlen(fmt) + (size_t)n * strlen(schema) + 32;
  char *buf = keel__malloc(cap);
  if (buf == NULL) return NULL;
  const char *s = schema;
  int w;
  if (key != 0) {
    w = snprintf(buf, cap, fmt, key, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s);
  } else {
    w = snprintf(buf, cap, fmt, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s);
  }
  if (w < 0 || (size_t)w >= cap) {
    keel__free(buf);
    return NULL;
  }
  return buf;
}

int keel__pgq_sql_init(keel__pgq_sql *sql, const char *schema, long long migrate_key) {
  memset(sql, 0, sizeof *sql);
  sql->migrate = fmt_n(MIGRATE, schema, 17, migrate_key);
  sql->enqueue = fmt_n(ENQUEUE, schema, 3, 0);
  sql->fetch = fmt_n(FETCH, schema, 2, 0);
  sql->finish = fmt_n(FINISH, schema, 6, 0);
  sql->heartbeat = fmt_n(HEARTBEAT, schema, 2, 0);
  sql->rescue = fmt_n(RESCUE, schema, 4, 0);
  sql->stats = fmt_n(STATS, schema, 3, 0);
  sql->cancel = fmt_n(CANCEL, schema, 2, 0);
  sql->redrive = fmt_n(REDRIVE, schema, 2, 0);
  sql->notify_later = keel__strdup(NOTIFY_LATER);
  if (!sql->migrate || !sql->enqueue || !sql->fetch || !sql->finish || !sql->heartbeat ||
      !sql->rescue || !sql->stats || !sql->cancel || !sql->redrive || !sql->notify_later) {
    keel__pgq_sql_free(sql);
    return UV_ENOMEM;
  }
  return 0;
}

void keel__pgq_sql_free(keel__pgq_sql *sql) {
  keel__free(sql->migrate);
  keel__free(sql->enqueue);
  keel__free(sql->fetch);
  keel__free(sql->finish);
  keel__free(sql->heartbeat);
  keel__free(sql->rescue);
  keel__free(sql->stats);
  keel__free(sql->cancel);
  keel__free(sql->redrive);
  keel__free(sql->notify_later);
  memset(sql, 0, sizeof *sql);
}
