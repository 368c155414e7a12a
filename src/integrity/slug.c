/* Atomic unique-slug inserts: creators of the same base slug take a
 * transaction-scoped advisory lock, then insert with the first free suffix
 * found by probing the unique index. BEGIN, lock, INSERT and COMMIT are
 * queued together so they travel in one pipelined round trip. */
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "integrity/integrity_internal.h"

typedef struct slug_job {
  keel_integrity *ig;
  keel_slug_cb cb;
  void *data;
  char *insert_sql;
  char **values; /* $1 base, $2 max length, then the other columns */
  int nvalues;
  char lock_key[512];
  keel_pg *conn;
  int attempts;
  int insert_status;
  char insert_sqlstate[6];
  char slug[128];
} slug_job;

static void slug_job_free(slug_job *job) {
  for (int i = 0; i < job->nvalues; i++) keel__free(job->values[i]);
  keel__free(job->values);
  keel__free(job->insert_sql);
  keel__free(job);
}

static void finish(slug_job *job, int status) {
  keel_integrity *ig = job->ig;
  if (status == 0) ig->stats.slug_inserts++;
  job->cb(ig, status, status == 0 ? job->slug : NULL, job->data);
  slug_job_free(job);
  keel__ig_end(ig, status);
}

static void on_acquired(keel_pg_pool *pool, keel_pg *conn, int status, void *data);

static void ignore_result(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)status;
  (void)res;
  (void)data;
}

static void on_insert(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  slug_job *job = data;
  job->insert_status = status;
  job->insert_sqlstate[0] = '\0';
  if (status == 0) {
    const char *slug = keel_pg_result_value(res, 0, 0);
    snprintf(job->slug, sizeof job->slug, "%s", slug ? slug : "");
  } else {
    const char *state = keel_pg_result_sqlstate(res);
    if (state != NULL) snprintf(job->insert_sqlstate, sizeof job->insert_sqlstate, "%s", state);
    keel__ig_record_error(job->ig, conn, status, res);
  }
}

static void on_commit(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  slug_job *job = data;
  keel_integrity *ig = job->ig;
  keel_pg_pool_release(ig->pool, conn);
  job->conn = NULL;
  if (status != 0 && job->insert_status == 0) keel__ig_record_error(ig, conn, status, res);
  int outcome = job->insert_status != 0 ? job->insert_status : status;
  if (outcome == KEEL_EPG) {
    int mapped = keel_sqlstate_error(job->insert_sqlstate);
    if (mapped != 0) outcome = mapped;
  }
  if (outcome == KEEL_EUNIQUE) ig->stats.slug_collisions++;
  /* A unique violation (another base's suffix, a writer outside keel) or a
   * serialization failure rolled the insert back: try again. A lost
   * connection is not retried: the pipelined COMMIT may have run. */
  bool retry =
      (outcome == KEEL_EUNIQUE || outcome == KEEL_ESERIALIZATION || outcome == KEEL_ERETRYABLE) &&
      job->attempts < (int)ig->opts.slug_max_attempts && !ig->closing;
  if (retry) {
    ig->stats.retries++;
    int rc = keel_pg_pool_acquire(ig->pool, on_acquired, job);
    if (rc == 0) return;
    outcome = rc;
  }
  finish(job, outcome);
}

static void on_acquired(keel_pg_pool *pool, keel_pg *conn, int status, void *data) {
  (void)pool;
  slug_job *job = data;
  keel_integrity *ig = job->ig;
  if (status != 0) {
    finish(job, status);
    return;
  }
  job->conn = conn;
  job->attempts++;
  job->insert_status = 0;
  ig->stats.attempts++;
  ig->stats.slug_round_trips++; /* the four statements go out in one write */
  const char *lock_params[] = {job->lock_key};
  int queued = 0;
  int rc = keel_pg_query(conn, "BEGIN", 0, NULL, ignore_result, NULL);
  if (rc == 0) {
    queued++;
    /* The two-key form: its own lock space, apart from the user's
     * single-key advisory locks. */
    rc = keel_pg_query_cached(conn,
                              "SELECT pg_advisory_xact_lock(hashtext('keel_slug'), hashtext($1))",
                              1, lock_params, ignore_result, NULL);
  }
  if (rc == 0)
    rc = keel_pg_query_cached(conn, job->insert_sql, job->nvalues, (const char *const *)job->values,
                              on_insert, job);
  /* After a failed INSERT, COMMIT answers ROLLBACK: either way the
   * transaction and its lock end here. */
  if (rc == 0) rc = keel_pg_query(conn, "COMMIT", 0, NULL, on_commit, job);
  if (rc == 0) return;
  /* Queueing failed half-way (no memory): never hand back a connection
   * inside an open transaction. */
  if (queued > 0 && keel_pg_query(conn, "ROLLBACK", 0, NULL, ignore_result, NULL) != 0)
    keel_pg_reset(conn);
  job->conn = NULL;
  keel_pg_pool_release(ig->pool, conn);
  keel__fail(ig->last_error, rc, "cannot queue the slug insert");
  finish(job, rc);
}

/* The slug for suffix number `n` (an SQL expression): the base for 1,
 * otherwise the base shortened to fit "-n" within $2 bytes. */
static void add_candidate(keel__sql *b, const char *n) {
  keel__sql_addf(b,
                 "(CASE WHEN %s = 1 THEN $1::text ELSE rtrim(left($1::text, $2::int - 1 - "
                 "length((%s)::text)), '-') || '-' || (%s) END)",
                 n, n, n);
}

/* EXISTS: the candidate for suffix `n` is taken. */
static void add_taken(keel__sql *b, const keel_slug_spec *spec, const char *n) {
  keel__sql_add(b, "EXISTS (SELECT 1 FROM ");
  keel__sql_ident(b, spec->table, true);
  keel__sql_add(b, " x WHERE x.");
  keel__sql_ident(b, spec->slug_column, false);
  keel__sql_add(b, " = ");
  add_candidate(b, n);
  keel__sql_add(b, ")");
}

int keel_slug_insert(keel_integrity *ig, const keel_slug_spec *spec, keel_slug_cb cb, void *data) {
  if (ig == NULL) return UV_EINVAL;
  if (spec == NULL || spec->table == NULL || spec->slug_column == NULL || spec->name == NULL ||
      cb == NULL)
    return keel__fail(ig->last_error, UV_EINVAL,
                      "slug spec needs table, slug_column, name and a callback");
  if (spec->count < 0 || spec->count > 60 || (spec->count > 0 && (!spec->columns || !spec->values)))
    return keel__fail(ig->last_error, UV_EINVAL,
                      "count must be within 0..60, with columns and values");
  size_t max_len = spec->max_len ? spec->max_len : 60;
  if (max_len < 8 || max_len > 100)
    return keel__fail(ig->last_error, UV_EINVAL, "max_len must be within 8..100");
  char q[160];
  bool bad = keel_pg_quote_ident(q, sizeof q, spec->table, true) < 0 ||
             keel_pg_quote_ident(q, sizeof q, spec->slug_column, false) < 0;
  for (int i = 0; !bad && i < spec->count; i++)
    bad = spec->columns[i] == NULL ||
          keel_pg_quote_ident(q, sizeof q, spec->columns[i], false) < 0 ||
          strcmp(spec->columns[i], spec->slug_column) == 0;
  if (bad)
    return keel__fail(ig->last_error, UV_EINVAL,
                      "invalid table or column name (or the slug column among the columns)");
  char base[128];
  int base_len = keel_slugify(spec->name, max_len, base, sizeof base);
  if (base_len < 0) return keel__fail(ig->last_error, base_len, "cannot make a slug");

  /* INSERT ... VALUES ((free slug), $3, ...). The free suffix is found in
   * O(log k) index probes for k taken ones: gallop over 1, 2, 4, ... to the
   * first free power of two, then bisect between the last taken and it. */
  keel__sql b = {0};
  keel__sql_add(&b, "INSERT INTO ");
  keel__sql_ident(&b, spec->table, true);
  keel__sql_add(&b, " (");
  keel__sql_ident(&b, spec->slug_column, false);
  for (int i = 0; i < spec->count; i++) {
    keel__sql_add(&b, ", ");
    keel__sql_ident(&b, spec->columns[i], false);
  }
  keel__sql_add(&b,
                ") VALUES ((WITH RECURSIVE gallop(n) AS (SELECT 1 UNION ALL SELECT n * 2 "
                "FROM gallop WHERE n < 1048576 AND ");
  add_taken(&b, spec, "n");
  keel__sql_add(&b,
                "), top AS (SELECT max(n) AS n FROM gallop), bisect(lo, hi) AS (SELECT n / 2, "
                "n FROM top UNION ALL SELECT CASE WHEN ");
  add_taken(&b, spec, "(lo + hi) / 2");
  keel__sql_add(&b, " THEN (lo + hi) / 2 ELSE lo END, CASE WHEN ");
  add_taken(&b, spec, "(lo + hi) / 2");
  keel__sql_add(&b, " THEN hi ELSE (lo + hi) / 2 END FROM bisect WHERE hi - lo > 1) SELECT ");
  add_candidate(&b, "min(hi)");
  keel__sql_add(&b, " FROM bisect)");
  for (int i = 0; i < spec->count; i++) keel__sql_addf(&b, ", $%d", i + 3);
  keel__sql_add(&b, ") RETURNING ");
  keel__sql_ident(&b, spec->slug_column, false);
  keel__sql_add(&b, "::text");
  if (b.failed) {
    keel__sql_free(&b);
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  }
  slug_job *job = keel__calloc(1, sizeof *job);
  if (job == NULL) {
    keel__sql_free(&b);
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  }
  job->ig = ig;
  job->cb = cb;
  job->data = data;
  job->insert_sql = b.text;
  job->nvalues = spec->count + 2;
  job->values = keel__calloc((size_t)job->nvalues, sizeof(char *));
  bool failed = job->values == NULL;
  char max_text[16];
  snprintf(max_text, sizeof max_text, "%zu", max_len);
  if (!failed) {
    job->values[0] = keel__strdup(base);
    job->values[1] = keel__strdup(max_text);
    failed = job->values[0] == NULL || job->values[1] == NULL;
    for (int i = 0; !failed && i < spec->count; i++) {
      if (spec->values[i] == NULL) continue;
      job->values[i + 2] = keel__strdup(spec->values[i]);
      failed = job->values[i + 2] == NULL;
    }
  }
  snprintf(job->lock_key, sizeof job->lock_key, "keel_slug:%s:%s", spec->table, base);
  int rc = failed ? UV_ENOMEM : keel__ig_begin(ig);
  if (rc == 0) {
    rc = keel_pg_pool_acquire(ig->pool, on_acquired, job);
    if (rc != 0) keel__ig_unbegin(ig);
  }
  if (rc != 0) {
    if (job->values == NULL) job->nvalues = 0;
    slug_job_free(job);
    return rc == KEEL_ECLOSING ? rc
                               : keel__fail(ig->last_error, rc, "cannot queue the slug insert");
  }
  return 0;
}
