/* Atomic unique-slug inserts: creators of the same base slug take a
 * transaction-scoped advisory lock, then insert with the first free suffix
 * found by probing the unique index. BEGIN, lock, INSERT and COMMIT are
 * queued together so they travel in one pipelined round trip. */
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "integrity/integrity_internal.h"

#define SLUG_MAX_ATTEMPTS 5

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
  keel__ig_end(ig);
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
  if (status != 0) keel__ig_record_error(ig, conn, status, res);
  int outcome = job->insert_status != 0 ? job->insert_status : status;
  if (outcome == KEEL_EPG) outcome = keel_sqlstate_error(job->insert_sqlstate);
  if (outcome == KEEL_EUNIQUE) ig->stats.slug_collisions++;
  bool retry = (outcome == KEEL_EUNIQUE || keel_integrity_retryable(outcome, NULL)) &&
               job->attempts < SLUG_MAX_ATTEMPTS && !ig->closing;
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
  if (status != 0) {
    finish(job, status);
    return;
  }
  job->conn = conn;
  job->attempts++;
  job->insert_status = 0;
  job->ig->stats.slug_round_trips++; /* the four statements go out in one write */
  const char *lock_params[] = {job->lock_key};
  int rc = keel_pg_query(conn, "BEGIN", 0, NULL, ignore_result, NULL);
  if (rc == 0)
    rc = keel_pg_query(conn, "SELECT pg_advisory_xact_lock(hashtext($1))", 1, lock_params,
                       ignore_result, NULL);
  if (rc == 0)
    rc = keel_pg_query(conn, job->insert_sql, job->nvalues, (const char *const *)job->values,
                       on_insert, job);
  /* After a failed INSERT, COMMIT answers ROLLBACK: either way the
   * transaction and its lock end here. */
  if (rc == 0) rc = keel_pg_query(conn, "COMMIT", 0, NULL, on_commit, job);
  if (rc != 0) {
    keel_pg_pool_release(job->ig->pool, conn);
    finish(job, rc);
  }
}

int keel_slug_insert(keel_integrity *ig, const keel_slug_spec *spec, keel_slug_cb cb, void *data) {
  if (ig == NULL) return UV_EINVAL;
  if (spec == NULL || spec->table == NULL || spec->slug_column == NULL || spec->name == NULL ||
      cb == NULL || spec->count < 0 || (spec->count > 0 && (!spec->columns || !spec->values)) ||
      spec->count > 60)
    return keel__fail(ig->last_error, UV_EINVAL,
                      "slug spec needs table, slug_column, name and a callback");
  size_t max_len = spec->max_len ? spec->max_len : 60;
  if (max_len < 8 || max_len > 100)
    return keel__fail(ig->last_error, UV_EINVAL, "max_len must be within 8..100");
  char base[128];
  int base_len = keel_slugify(spec->name, max_len, base, sizeof base);
  if (base_len < 0) return keel__fail(ig->last_error, base_len, "cannot make a slug");

  /* INSERT ... VALUES ((first free slug), $3, ...): the probe walks base,
   * base-2, base-3, ... through the unique index and stops at the first
   * that is not taken; a base shortened so that the suffix fits. */
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
                ") VALUES ((WITH RECURSIVE probe(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM "
                "probe WHERE n < 100000 AND EXISTS (SELECT 1 FROM ");
  keel__sql_ident(&b, spec->table, true);
  keel__sql_add(&b, " x WHERE x.");
  keel__sql_ident(&b, spec->slug_column, false);
  keel__sql_add(&b,
                " = CASE WHEN n = 1 THEN $1::text ELSE rtrim(left($1::text, $2::int - 1 - "
                "length(n::text)), '-') || '-' || n END)) SELECT CASE WHEN m = 1 THEN $1::text "
                "ELSE rtrim(left($1::text, $2::int - 1 - length(m::text)), '-') || '-' || m END "
                "FROM (SELECT max(n) AS m FROM probe) last)");
  for (int i = 0; i < spec->count; i++) keel__sql_addf(&b, ", $%d", i + 3);
  keel__sql_add(&b, ") RETURNING ");
  keel__sql_ident(&b, spec->slug_column, false);
  keel__sql_add(&b, "::text");
  if (b.failed) {
    keel__sql_free(&b);
    return keel__fail(ig->last_error, UV_EINVAL, "invalid table or column name");
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
    if (rc != 0) ig->outstanding--;
  }
  if (rc != 0) {
    if (job->values == NULL) job->nvalues = 0;
    slug_job_free(job);
    return keel__fail(ig->last_error, rc, "cannot queue the slug insert");
  }
  return 0;
}
