/* The SQL of the saga log, formatted once per object with its schema name
 * (validated: [a-z_][a-z0-9_]{0,39}, so it needs no quoting). docs/saga.md
 * reproduces these statements. */
#include <stdio.h>

#include "saga_internal.h"

/* Migration: one DO block = one transaction, serialised between processes by
 * a transaction-scoped advisory lock taken first; each version is applied
 * once and recorded. */
static const char MIGRATE[] =
    "DO $keel$ BEGIN\n"
    "PERFORM pg_advisory_xact_lock(%lld);\n"
    "CREATE SCHEMA IF NOT EXISTS %s;\n"
    "CREATE TABLE IF NOT EXISTS %s.saga_migrations (version int PRIMARY KEY,"
    " applied_at timestamptz NOT NULL DEFAULT now());\n"
    "IF NOT EXISTS (SELECT 1 FROM %s.saga_migrations WHERE version = 1) THEN\n"
    "CREATE TABLE %s.saga_instances (\n"
    " id bigint PRIMARY KEY,\n"
    " type text NOT NULL,\n"
    " state text NOT NULL DEFAULT 'running' CHECK (state IN"
    " ('running','compensating','done','compensated','failed')),\n"
    " step int NOT NULL DEFAULT 0,\n"
    " attempt int NOT NULL DEFAULT 0,\n"
    " budget int NOT NULL DEFAULT 0,\n"
    " version bigint NOT NULL DEFAULT 1,\n"
    " data jsonb NOT NULL DEFAULT '{}',\n"
    " deadline timestamptz,\n"
    " attempt_at timestamptz,\n"
    " start_key text,\n"
    " last_error text,\n"
    " created_at timestamptz NOT NULL DEFAULT now(),\n"
    " updated_at timestamptz NOT NULL DEFAULT now(),\n"
    " finished_at timestamptz\n"
    ") WITH (fillfactor = 70);\n"
    "CREATE UNIQUE INDEX saga_instances_start_key ON %s.saga_instances (type, start_key)"
    " WHERE start_key IS NOT NULL;\n"
    "CREATE INDEX saga_instances_open ON %s.saga_instances (type, state)"
    " WHERE state IN ('running','compensating','failed');\n"
    "CREATE TABLE %s.saga_steps (\n"
    " saga_id bigint NOT NULL,\n"
    " step int NOT NULL,\n"
    " phase text NOT NULL CHECK (phase IN ('action','compensation')),\n"
    " attempt int NOT NULL,\n"
    " outcome text NOT NULL,\n"
    " error text,\n"
    " started_at timestamptz NOT NULL DEFAULT now(),\n"
    " finished_at timestamptz,\n"
    " PRIMARY KEY (saga_id, step, phase, attempt)\n"
    ") WITH (fillfactor = 70);\n"
    "INSERT INTO %s.saga_migrations (version) VALUES (1);\n"
    "END IF;\n"
    /* v2: no CHECK constraints on state and phase. PostgreSQL reads a
     * table CHECK's expression back from its stored text, plans and
     * compiles it in every statement that writes the table: about 40,000
     * instructions each, seven per three-step saga (as much as the three
     * participant updates of the benchmark together). The values come only
     * from keel's own statements (fixed names in saga.c), and a state keel
     * does not know is treated as terminal when loaded. */
    "IF NOT EXISTS (SELECT 1 FROM %s.saga_migrations WHERE version = 2) THEN\n"
    "ALTER TABLE %s.saga_instances DROP CONSTRAINT IF EXISTS saga_instances_state_check;\n"
    "ALTER TABLE %s.saga_steps DROP CONSTRAINT IF EXISTS saga_steps_phase_check;\n"
    "INSERT INTO %s.saga_migrations (version) VALUES (2);\n"
    "END IF;\n"
    "END $keel$";

/* $1 id $2 type */
static const char LOAD[] =
    "SELECT state, step, attempt, budget, version, data::text,"
    " CASE WHEN deadline IS NULL THEN -1 ELSE greatest(0, floor(extract(epoch from"
    " (deadline - now())) * 1000))::bigint END AS left_ms, last_error"
    " FROM %s.saga_instances WHERE id = $1 AND type = $2";

/* The guarded advance, one statement (one commit): $1 id $2 version; the
 * finished attempt's row (NULL $3 = none): $3 step $4 phase $5 attempt $6
 * outcome $7 error; the saga's new values: $8 state $9 step $10 attempt $11
 * budget $12 data (NULL = kept) $13 last_error (NULL = kept) $14 terminal
 * $15 a new attempt starts (write-ahead: the saga row says which, attempt_at
 * when). An attempt's row is written once, with its outcome; a crashed
 * attempt gets its row ('unknown') when the next one starts (ON CONFLICT:
 * it may have been written before the crash). No row back = the version
 * moved: another process has the saga. */
#define ADVANCE_CTES                                                                           \
  "WITH old AS (SELECT attempt_at FROM %s.saga_instances WHERE id = $1),"                      \
  " s AS (UPDATE %s.saga_instances SET version = version + 1, state = $8,"                     \
  " step = $9::int, attempt = $10::int, budget = $11::int, data = COALESCE($12::jsonb, data)," \
  " last_error = COALESCE($13, last_error), updated_at = now(),"                               \
  " attempt_at = CASE WHEN $15::bool THEN now() ELSE attempt_at END,"                          \
  " finished_at = CASE WHEN $14::bool THEN now() END"                                          \
  " WHERE id = $1 AND version = $2 RETURNING version),"                                        \
  " o AS (INSERT INTO %s.saga_steps (saga_id, step, phase, attempt, outcome, error,"           \
  " started_at, finished_at) SELECT $1, $3::int, $4, $5::int, $6, $7,"                         \
  " coalesce(old.attempt_at, now()), now() FROM s, old WHERE $3::int IS NOT NULL"              \
  " ON CONFLICT DO NOTHING)"

static const char ADVANCE[] = ADVANCE_CTES " SELECT version FROM s";

/* The advance that ends a saga run by its durable-queue job: ADVANCE, and in
 * the same statement (so the same commit) the job's completion as the queue
 * itself would write it (the saga's queue keeps no done rows: a delete),
 * fenced by the queue's fence: $16 job id $17 its attempt $18 the queue's
 * lease owner, state 'running'; only when the guard passed. The second
 * column says whether the job's row was deleted (the queue is then told
 * through keel__pgqueue_job_done_written() and sends no completion). */
static const char ADVANCE_END[] = ADVANCE_CTES
    ","
    " j AS (DELETE FROM %s.pgqueue_jobs WHERE id = $16::bigint AND attempt = $17::int"
    " AND lease_owner = $18 AND state = 'running' AND EXISTS (SELECT 1 FROM s) RETURNING id)"
    " SELECT version, EXISTS (SELECT 1 FROM j) FROM s";

/* $1 id $2 type $3 data $4 deadline_ms (0 none) $5 start_key $6 queue
 * $7 job max_attempts. One statement, one commit: the saga row with step 0's
 * first attempt recorded as started (the write-ahead record of that
 * attempt: attempt = 1, attempt_at), and its durable-queue job (the queue's
 * own row, as keel_pgqueue_enqueue() writes it; the queue's insert trigger
 * notifies the workers at the commit). Without a deadline the job carries
 * the saga as written (version 1, data), so that its first delivery calls
 * step 0 with no further statement. A start key already there writes
 * nothing (no job either) and returns that saga's id. */
static const char START[] =
    "WITH ins AS (INSERT INTO %s.saga_instances (id, type, data, deadline, start_key, attempt,"
    " attempt_at) VALUES ($1, $2, $3::jsonb, CASE WHEN $4::bigint > 0 THEN now() + $4::bigint *"
    " interval '1 millisecond' END, $5, 1, now())"
    " ON CONFLICT (type, start_key) WHERE start_key IS NOT NULL DO NOTHING RETURNING id, data),"
    " job AS (INSERT INTO %s.pgqueue_jobs (queue, payload, max_attempts, unique_key)"
    " SELECT $6, CASE WHEN $4::bigint > 0 THEN jsonb_build_object('saga', id) ELSE"
    " jsonb_build_object('saga', id, 'v', 1, 'a', 1, 'data', data) END, $7::int, 'saga:' || id "
    "FROM ins)"
    " SELECT id, false AS existed FROM ins UNION ALL"
    " SELECT id, true FROM %s.saga_instances WHERE $5 IS NOT NULL AND type = $2"
    " AND start_key = $5 AND NOT EXISTS (SELECT 1 FROM ins)";

/* START without a start key ($1 id $2 type $3 data $4 deadline_ms $5 queue
 * $6 job max_attempts): no key to collide on, so neither the arbiter nor
 * the lookup of an existing saga (about a fifth of the statement's cost). */
static const char START_NOKEY[] =
    "WITH ins AS (INSERT INTO %s.saga_instances (id, type, data, deadline, attempt, attempt_at)"
    " VALUES ($1, $2, $3::jsonb, CASE WHEN $4::bigint > 0 THEN now() + $4::bigint *"
    " interval '1 millisecond' END, 1, now()) RETURNING id, data),"
    " job AS (INSERT INTO %s.pgqueue_jobs (queue, payload, max_attempts, unique_key)"
    " SELECT $5, CASE WHEN $4::bigint > 0 THEN jsonb_build_object('saga', id) ELSE"
    " jsonb_build_object('saga', id, 'v', 1, 'a', 1, 'data', data) END, $6::int, 'saga:' || id "
    "FROM ins)"
    " SELECT id, false AS existed FROM ins";

/* $1 id $2 type */
static const char REDRIVE[] =
    "UPDATE %s.saga_instances SET state = 'compensating', budget = attempt,"
    " version = version + 1, updated_at = now(), finished_at = NULL"
    " WHERE id = $1 AND type = $2 AND state = 'failed' RETURNING id";

/* $1 type $2 stuck list length */
static const char STATS[] =
    "SELECT (SELECT count(*) FROM %s.saga_instances WHERE type = $1 AND state = 'running'),"
    " (SELECT count(*) FROM %s.saga_instances WHERE type = $1 AND state = 'compensating'),"
    " (SELECT count(*) FROM %s.saga_instances WHERE type = $1 AND state = 'failed'),"
    " (SELECT string_agg(id::text, ',') FROM (SELECT id FROM %s.saga_instances"
    " WHERE type = $1 AND state = 'failed' ORDER BY updated_at, id LIMIT $2::int) f)";

static char *fmt(const char *f, const char *schema, int n) {
  /* every %s is the schema; n of them */
  size_t cap = strlen(f) + (size_t)n * strlen(schema) + 64;
  char *p = keel__malloc(cap);
  if (p == NULL) return NULL;
  int w;
  switch (n) {
    case 1:
      w = snprintf(p, cap, f, schema);
      break;
    case 2:
      w = snprintf(p, cap, f, schema, schema);
      break;
    case 3:
      w = snprintf(p, cap, f, schema, schema, schema);
      break;
    default:
      w = snprintf(p, cap, f, schema, schema, schema, schema);
      break;
  }
  if (w < 0 || (size_t)w >= cap) {
    keel__free(p);
    return NULL;
  }
  return p;
}

int keel__saga_sql_init(keel__saga_sql *sql, const char *schema, long long migrate_key) {
  memset(sql, 0, sizeof *sql);
  size_t cap = sizeof MIGRATE + 12 * strlen(schema) + 32;
  sql->migrate = keel__malloc(cap);
  if (sql->migrate != NULL) {
    int w = snprintf(sql->migrate, cap, MIGRATE, migrate_key, schema, schema, schema, schema,
                     schema, schema, schema, schema, schema, schema, schema, schema);
    if (w < 0 || (size_t)w >= cap) {
      keel__free(sql->migrate);
      sql->migrate = NULL;
    }
  }
  sql->load = fmt(LOAD, schema, 1);
  sql->advance = fmt(ADVANCE, schema, 3);
  sql->advance_end = fmt(ADVANCE_END, schema, 4);
  sql->start = fmt(START, schema, 3);
  sql->start_nokey = fmt(START_NOKEY, schema, 2);
  sql->redrive = fmt(REDRIVE, schema, 1);
  sql->stats = fmt(STATS, schema, 4);
  if (!sql->migrate || !sql->load || !sql->advance || !sql->advance_end || !sql->start ||
      !sql->start_nokey || !sql->redrive || !sql->stats) {
    keel__saga_sql_free(sql);
    return UV_ENOMEM;
  }
  return 0;
}

void keel__saga_sql_free(keel__saga_sql *sql) {
  keel__free(sql->migrate);
  keel__free(sql->load);
  keel__free(sql->advance);
  keel__free(sql->advance_end);
  keel__free(sql->start);
  keel__free(sql->start_nokey);
  keel__free(sql->redrive);
  keel__free(sql->stats);
  memset(sql, 0, sizeof *sql);
}
