/* Versioned (optimistic) updates and upserts in one statement each, the
 * optimistic retry loop, and the version-column installer. */
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "integrity/integrity_internal.h"

typedef struct occ_call {
  keel_integrity *ig;
  keel_occ_cb cb;
  void *data;
} occ_call;

static const char *version_type(keel_version_kind kind) {
  return kind == KEEL_VERSION_UUID ? "uuid" : "bigint";
}

/* need_values: false for keel_occ_retry, whose values come from mutate. */
static int check_spec(keel_integrity *ig, const keel_occ_spec *s, bool need_values) {
  if (s == NULL || s->table == NULL || s->key_column == NULL || s->key_value == NULL ||
      s->version_column == NULL || s->set_count < 0 ||
      (s->set_count > 0 && (s->set_columns == NULL || (need_values && s->set_values == NULL))) ||
      (s->version_kind != KEEL_VERSION_INTEGER && s->version_kind != KEEL_VERSION_UUID))
    return keel__fail(ig->last_error, UV_EINVAL,
                      "spec needs table, key_column, key_value, version_column and set_count >= 0");
  if (s->set_count > 60) return keel__fail(ig->last_error, UV_EINVAL, "at most 60 set columns");
  return 0;
}

static void add_bump(keel__sql *b, const keel_occ_spec *s, const char *alias) {
  if (s->version_kind == KEEL_VERSION_UUID) {
    keel__sql_add(b, "gen_random_uuid()");
    return;
  }
  if (alias != NULL) keel__sql_addf(b, "%s.", alias);
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, " + 1");
}

static void add_alive(keel__sql *b, const keel_occ_spec *s, const char *alias) {
  if (s->soft_delete_column == NULL || s->include_deleted) return;
  keel__sql_add(b, " AND ");
  if (alias != NULL) keel__sql_addf(b, "%s.", alias);
  keel__sql_ident(b, s->soft_delete_column, false);
  keel__sql_add(b, " IS NULL");
}

/* cur: the current version, read with FOR SHARE so that under READ
 * COMMITTED it is the newest committed one, not the statement's snapshot. */
static void add_current(keel__sql *b, const keel_occ_spec *s, const char *written) {
  keel__sql_add(b, ", cur AS (SELECT ");
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, "::text AS v FROM ");
  keel__sql_ident(b, s->table, true);
  keel__sql_add(b, " WHERE ");
  keel__sql_ident(b, s->key_column, false);
  keel__sql_add(b, " = $1");
  add_alive(b, s, NULL);
  keel__sql_addf(b, " AND NOT EXISTS (SELECT 1 FROM %s) FOR SHARE)", written);
}

static void build_update(keel__sql *b, const keel_occ_spec *s) {
  keel__sql_add(b, "WITH upd AS (UPDATE ");
  keel__sql_ident(b, s->table, true);
  keel__sql_add(b, " SET ");
  for (int i = 0; i < s->set_count; i++) {
    keel__sql_ident(b, s->set_columns[i], false);
    keel__sql_addf(b, " = $%d, ", i + 3);
  }
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, " = ");
  add_bump(b, s, NULL);
  keel__sql_add(b, " WHERE ");
  keel__sql_ident(b, s->key_column, false);
  keel__sql_add(b, " = $1 AND ");
  keel__sql_ident(b, s->version_column, false);
  keel__sql_addf(b, " = $2::%s", version_type(s->version_kind));
  add_alive(b, s, NULL);
  keel__sql_add(b, " RETURNING ");
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, "::text AS v)");
  add_current(b, s, "upd");
  keel__sql_add(b,
                " SELECT 'u' AS o, v, false AS inserted FROM upd"
                " UNION ALL SELECT 'c', v, false FROM cur");
}

static void build_upsert(keel__sql *b, const keel_occ_spec *s) {
  keel__sql_add(b, "WITH ins AS (INSERT INTO ");
  keel__sql_ident(b, s->table, true);
  keel__sql_add(b, " AS t0 (");
  keel__sql_ident(b, s->key_column, false);
  for (int i = 0; i < s->set_count; i++) {
    keel__sql_add(b, ", ");
    keel__sql_ident(b, s->set_columns[i], false);
  }
  keel__sql_add(b, ", ");
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, ") VALUES ($1");
  for (int i = 0; i < s->set_count; i++) keel__sql_addf(b, ", $%d", i + 3);
  keel__sql_add(b, s->version_kind == KEEL_VERSION_UUID ? ", gen_random_uuid())" : ", 1)");
  keel__sql_add(b, " ON CONFLICT (");
  keel__sql_ident(b, s->key_column, false);
  keel__sql_add(b, ") DO UPDATE SET ");
  for (int i = 0; i < s->set_count; i++) {
    keel__sql_ident(b, s->set_columns[i], false);
    keel__sql_add(b, " = EXCLUDED.");
    keel__sql_ident(b, s->set_columns[i], false);
    keel__sql_add(b, ", ");
  }
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, " = ");
  add_bump(b, s, "t0");
  keel__sql_add(b, " WHERE t0.");
  keel__sql_ident(b, s->version_column, false);
  keel__sql_addf(b, " = $2::%s", version_type(s->version_kind));
  add_alive(b, s, "t0");
  keel__sql_add(b, " RETURNING t0.");
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, "::text AS v, (t0.xmax = 0) AS inserted)");
  add_current(b, s, "ins");
  keel__sql_add(b,
                " SELECT 'u' AS o, v, inserted FROM ins"
                " UNION ALL SELECT 'c', v, false FROM cur");
}

static void on_occ_result(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  occ_call *call = data;
  keel_integrity *ig = call->ig;
  const char *version = NULL;
  bool inserted = false;
  if (status == 0) {
    if (keel_pg_result_nrows(res) == 0) {
      status = KEEL_ENOTFOUND;
      ig->stats.not_found++;
    } else {
      const char *outcome = keel_pg_result_value(res, 0, 0);
      version = keel_pg_result_value(res, 0, 1);
      const char *ins = keel_pg_result_value(res, 0, 2);
      inserted = ins != NULL && ins[0] == 't';
      if (outcome != NULL && outcome[0] == 'c') {
        status = KEEL_ECONFLICT;
        ig->stats.conflicts++;
        keel__fail(ig->last_error, KEEL_ECONFLICT, "version conflict: current version is %s",
                   version ? version : "?");
      }
    }
  } else {
    keel__ig_record_error(ig, conn, status, res);
    status = status == KEEL_EPG ? keel_sqlstate_error(keel_pg_result_sqlstate(res)) : status;
  }
  keel_occ_cb cb = call->cb;
  void *cb_data = call->data;
  keel__free(call);
  cb(ig, status, version, inserted, cb_data);
  keel__ig_end(ig);
}

static int run_occ(keel_integrity *ig, const keel_occ_spec *s, keel_occ_cb cb, void *data,
                   bool upsert) {
  if (ig == NULL) return UV_EINVAL;
  int rc = check_spec(ig, s, true);
  if (rc != 0) return rc;
  if (cb == NULL) return keel__fail(ig->last_error, UV_EINVAL, "a callback is required");
  keel__sql b = {0};
  if (upsert)
    build_upsert(&b, s);
  else
    build_update(&b, s);
  if (b.failed) {
    keel__sql_free(&b);
    return keel__fail(ig->last_error, UV_EINVAL, "invalid table or column name");
  }
  const char *values[64];
  values[0] = s->key_value;
  values[1] = s->expected_version;
  for (int i = 0; i < s->set_count; i++) values[i + 2] = s->set_values[i];
  occ_call *call = keel__malloc(sizeof *call);
  if (call == NULL) {
    keel__sql_free(&b);
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  }
  rc = keel__ig_begin(ig);
  if (rc == 0) {
    *call = (occ_call){ig, cb, data};
    rc = keel_pg_pool_query_cached(ig->pool, b.text, s->set_count + 2, values, on_occ_result, call);
    if (rc != 0) {
      keel__fail(ig->last_error, rc, "%s", keel_pg_pool_last_error(ig->pool));
      ig->outstanding--;
    }
  }
  if (rc != 0) keel__free(call);
  keel__sql_free(&b);
  return rc;
}

int keel_occ_update(keel_integrity *ig, const keel_occ_spec *spec, keel_occ_cb cb, void *data) {
  return run_occ(ig, spec, cb, data, false);
}

int keel_occ_upsert(keel_integrity *ig, const keel_occ_spec *spec, keel_occ_cb cb, void *data) {
  return run_occ(ig, spec, cb, data, true);
}

/* ---- optimistic retry ---------------------------------------------------- */

typedef struct occ_retry {
  keel_integrity *ig;
  keel_occ_spec spec; /* strings below are copies */
  char *table, *key_column, *key_value, *version_column, *soft_delete_column;
  char **set_columns;
  keel_occ_mutate_fn mutate;
  keel_occ_retry_cb done;
  void *data;
  keel_retry *runner;
  char *read_sql;
  char version[64];
  bool have_version;
} occ_retry;

static void occ_retry_free(occ_retry *r) {
  keel__free(r->table);
  keel__free(r->key_column);
  keel__free(r->key_value);
  keel__free(r->version_column);
  keel__free(r->soft_delete_column);
  if (r->set_columns != NULL)
    for (int i = 0; i < r->spec.set_count; i++) keel__free(r->set_columns[i]);
  keel__free(r->set_columns);
  keel__free(r->read_sql);
  keel__free(r);
}

static void after_versioned_update(keel_integrity *ig, int status, const char *version,
                                   bool inserted, void *data) {
  (void)ig;
  (void)inserted;
  occ_retry *r = data;
  r->have_version = version != NULL;
  if (version != NULL) snprintf(r->version, sizeof r->version, "%s", version);
  keel_retry_report(r->runner, status);
}

static void after_read(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  occ_retry *r = data;
  keel_integrity *ig = r->ig;
  if (status != 0) {
    keel__ig_record_error(ig, conn, status, res);
    keel_retry_report(r->runner, status);
    return;
  }
  if (keel_pg_result_nrows(res) == 0) {
    ig->stats.not_found++;
    keel_retry_report(r->runner, KEEL_ENOTFOUND);
    return;
  }
  const char *values[64] = {0};
  int rc = r->mutate(ig, res, values, r->data);
  if (rc != 0) {
    keel_retry_report(r->runner, rc < 0 ? rc : KEEL_EABORTED);
    return;
  }
  keel_occ_spec spec = r->spec;
  spec.expected_version = keel_pg_result_get(res, 0, "__keel_version");
  spec.set_values = values;
  rc = keel_occ_update(ig, &spec, after_versioned_update, r);
  if (rc != 0) keel_retry_report(r->runner, rc);
}

static void occ_attempt(keel_retry *runner, unsigned attempt, void *data) {
  occ_retry *r = data;
  r->runner = runner;
  if (attempt > 1) r->ig->stats.retries++;
  const char *values[] = {r->key_value};
  int rc = keel_pg_pool_query(r->ig->pool, r->read_sql, 1, values, after_read, r);
  if (rc != 0) keel_retry_report(runner, rc);
}

static int retry_conflicts(int status, void *data) {
  (void)data;
  return status == KEEL_ECONFLICT || keel_integrity_retryable(status, NULL);
}

static void occ_done(keel_retry *runner, int status, unsigned attempts, void *data) {
  occ_retry *r = data;
  keel_integrity *ig = r->ig;
  r->done(ig, status, r->have_version ? r->version : NULL, attempts, r->data);
  keel_retry_close(runner, NULL, NULL);
  occ_retry_free(r);
  keel__ig_end(ig);
}

static char *dup_or_null(const char *s, bool *failed) {
  if (s == NULL) return NULL;
  char *copy = keel__strdup(s);
  if (copy == NULL) *failed = true;
  return copy;
}

int keel_occ_retry(keel_integrity *ig, const keel_occ_spec *spec, const keel_retry_opts *opts,
                   keel_occ_mutate_fn mutate, keel_occ_retry_cb done, void *data) {
  if (ig == NULL) return UV_EINVAL;
  int rc = check_spec(ig, spec, false);
  if (rc != 0) return rc;
  if (mutate == NULL || done == NULL)
    return keel__fail(ig->last_error, UV_EINVAL, "mutate and done are required");
  occ_retry *r = keel__calloc(1, sizeof *r);
  if (r == NULL) return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  bool failed = false;
  r->ig = ig;
  r->mutate = mutate;
  r->done = done;
  r->data = data;
  r->spec = *spec;
  r->table = dup_or_null(spec->table, &failed);
  r->key_column = dup_or_null(spec->key_column, &failed);
  r->key_value = dup_or_null(spec->key_value, &failed);
  r->version_column = dup_or_null(spec->version_column, &failed);
  r->soft_delete_column = dup_or_null(spec->soft_delete_column, &failed);
  r->set_columns = keel__calloc((size_t)spec->set_count + 1, sizeof(char *));
  if (r->set_columns == NULL) failed = true;
  for (int i = 0; !failed && i < spec->set_count; i++)
    r->set_columns[i] = dup_or_null(spec->set_columns[i], &failed);
  r->spec.table = r->table;
  r->spec.key_column = r->key_column;
  r->spec.key_value = r->key_value;
  r->spec.version_column = r->version_column;
  r->spec.soft_delete_column = r->soft_delete_column;
  r->spec.set_columns = (const char *const *)r->set_columns;
  keel__sql b = {0};
  keel__sql_add(&b, "SELECT *, ");
  keel__sql_ident(&b, spec->version_column, false);
  keel__sql_add(&b, "::text AS __keel_version FROM ");
  keel__sql_ident(&b, spec->table, true);
  keel__sql_add(&b, " WHERE ");
  keel__sql_ident(&b, spec->key_column, false);
  keel__sql_add(&b, " = $1");
  add_alive(&b, spec, NULL);
  if (b.failed || failed) {
    keel__sql_free(&b);
    occ_retry_free(r);
    return keel__fail(ig->last_error, failed ? UV_ENOMEM : UV_EINVAL,
                      failed ? "out of memory" : "invalid table or column name");
  }
  r->read_sql = b.text;
  keel_retry_opts ro = opts != NULL ? *opts : ig->opts.retry;
  ro.classify = retry_conflicts;
  rc = keel__ig_begin(ig);
  if (rc == 0) {
    keel_retry *runner;
    rc = keel_retry_start(ig->loop, &ro, occ_attempt, occ_done, r, &runner);
    if (rc != 0) ig->outstanding--;
  }
  if (rc != 0) {
    occ_retry_free(r);
    return keel__fail(ig->last_error, rc, "cannot start the retry loop");
  }
  return 0;
}

/* ---- version column installer ------------------------------------------------ */

typedef struct install_job {
  keel_integrity *ig;
  keel_integrity_done_cb cb;
  void *data;
  char *statements[4];
  int step;
} install_job;

static void install_next(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  install_job *job = data;
  keel_integrity *ig = job->ig;
  if (status != 0) keel__ig_record_error(ig, conn, status, res);
  if (status == 0 && job->step < 4) {
    int rc = keel_pg_pool_query(ig->pool, job->statements[job->step++], 0, NULL, install_next, job);
    if (rc == 0) return;
    status = rc;
  }
  for (int i = 0; i < 4; i++) keel__free(job->statements[i]);
  keel_integrity_done_cb cb = job->cb;
  void *cb_data = job->data;
  keel__free(job);
  if (cb != NULL) cb(ig, status, cb_data);
  keel__ig_end(ig);
}

int keel_occ_install(keel_integrity *ig, const char *table, const char *column,
                     keel_version_kind kind, keel_integrity_done_cb cb, void *data) {
  if (ig == NULL) return UV_EINVAL;
  char bare_table[64];
  const char *dot = table != NULL ? strchr(table, '.') : NULL;
  snprintf(bare_table, sizeof bare_table, "%s", dot ? dot + 1 : (table ? table : ""));
  char fn_name[64], trigger_name[64];
  snprintf(fn_name, sizeof fn_name, "keel_bump_%.24s_%.24s", bare_table, column ? column : "");
  snprintf(trigger_name, sizeof trigger_name, "keel_version_%.40s", column ? column : "");
  keel__sql s[4] = {{0}};
  keel__sql_add(&s[0], "ALTER TABLE ");
  keel__sql_ident(&s[0], table, true);
  keel__sql_add(&s[0], " ADD COLUMN IF NOT EXISTS ");
  keel__sql_ident(&s[0], column, false);
  keel__sql_add(&s[0], kind == KEEL_VERSION_UUID ? " uuid NOT NULL DEFAULT gen_random_uuid()"
                                                 : " bigint NOT NULL DEFAULT 1");
  /* The trigger bumps only when the UPDATE left the version alone, so a
   * versioned update (which sets it) never bumps twice. */
  keel__sql_add(&s[1], "CREATE OR REPLACE FUNCTION ");
  keel__sql_ident(&s[1], fn_name, false);
  keel__sql_add(&s[1], "() RETURNS trigger LANGUAGE plpgsql AS $keel$ BEGIN IF NEW.");
  keel__sql_ident(&s[1], column, false);
  keel__sql_add(&s[1], " IS NOT DISTINCT FROM OLD.");
  keel__sql_ident(&s[1], column, false);
  keel__sql_add(&s[1], " THEN NEW.");
  keel__sql_ident(&s[1], column, false);
  keel__sql_add(&s[1], " := ");
  if (kind == KEEL_VERSION_UUID) {
    keel__sql_add(&s[1], "gen_random_uuid()");
  } else {
    keel__sql_add(&s[1], "OLD.");
    keel__sql_ident(&s[1], column, false);
    keel__sql_add(&s[1], " + 1");
  }
  keel__sql_add(&s[1], "; END IF; RETURN NEW; END $keel$");
  keel__sql_add(&s[2], "DROP TRIGGER IF EXISTS ");
  keel__sql_ident(&s[2], trigger_name, false);
  keel__sql_add(&s[2], " ON ");
  keel__sql_ident(&s[2], table, true);
  keel__sql_add(&s[3], "CREATE TRIGGER ");
  keel__sql_ident(&s[3], trigger_name, false);
  keel__sql_add(&s[3], " BEFORE UPDATE ON ");
  keel__sql_ident(&s[3], table, true);
  keel__sql_add(&s[3], " FOR EACH ROW EXECUTE FUNCTION ");
  keel__sql_ident(&s[3], fn_name, false);
  keel__sql_add(&s[3], "()");
  bool bad = kind != KEEL_VERSION_INTEGER && kind != KEEL_VERSION_UUID;
  for (int i = 0; i < 4; i++) bad = bad || s[i].failed;
  install_job *job = bad ? NULL : keel__calloc(1, sizeof *job);
  int rc = bad ? UV_EINVAL : job == NULL ? UV_ENOMEM : keel__ig_begin(ig);
  if (rc == 0) {
    *job = (install_job){ig, cb, data, {s[0].text, s[1].text, s[2].text, s[3].text}, 1};
    rc = keel_pg_pool_query(ig->pool, s[0].text, 0, NULL, install_next, job);
    if (rc == 0) return 0;
    ig->outstanding--;
  }
  keel__free(job);
  for (int i = 0; i < 4; i++) keel__sql_free(&s[i]);
  return keel__fail(ig->last_error, rc, "keel_occ_install: invalid table, column or kind");
}
