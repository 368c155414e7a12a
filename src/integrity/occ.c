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
  bool operation; /* a public call: ends the operation after cb */
} occ_call;

static const char *version_type(keel_version_kind kind) {
  return kind == KEEL_VERSION_UUID ? "uuid" : "bigint";
}

#define OCC_MAX_SET 60

/* need_values: false for keel_occ_retry, whose values come from mutate;
 * need_expected: keel_occ_update needs the version the caller read. */
static int check_spec(keel_integrity *ig, const keel_occ_spec *s, bool need_values,
                      bool need_expected) {
  if (s == NULL || s->table == NULL || s->key_column == NULL || s->key_value == NULL ||
      s->version_column == NULL)
    return keel__fail(ig->last_error, UV_EINVAL,
                      "spec needs table, key_column, key_value and version_column");
  if (s->version_kind != KEEL_VERSION_INTEGER && s->version_kind != KEEL_VERSION_UUID)
    return keel__fail(ig->last_error, UV_EINVAL, "unknown version_kind %d", (int)s->version_kind);
  if (need_expected && s->expected_version == NULL)
    return keel__fail(ig->last_error, UV_EINVAL, "spec needs expected_version");
  if (s->set_count < 0 || s->set_count > OCC_MAX_SET)
    return keel__fail(ig->last_error, UV_EINVAL, "set_count must be within 0..%d", OCC_MAX_SET);
  if (s->set_count > 0 && (s->set_columns == NULL || (need_values && s->set_values == NULL)))
    return keel__fail(ig->last_error, UV_EINVAL, "set_columns and set_values are required");
  for (int i = 0; i < s->set_count; i++) {
    const char *c = s->set_columns[i];
    if (c == NULL) return keel__fail(ig->last_error, UV_EINVAL, "set_columns[%d] is NULL", i);
    if (strcmp(c, s->key_column) == 0 || strcmp(c, s->version_column) == 0)
      return keel__fail(ig->last_error, UV_EINVAL,
                        "set_columns[%d] is the key or the version column", i);
    for (int j = 0; j < i; j++)
      if (strcmp(c, s->set_columns[j]) == 0)
        return keel__fail(ig->last_error, UV_EINVAL, "set_columns[%d] repeats a column", i);
  }
  char q[160];
  bool bad = keel_pg_quote_ident(q, sizeof q, s->table, true) < 0 ||
             keel_pg_quote_ident(q, sizeof q, s->key_column, false) < 0 ||
             keel_pg_quote_ident(q, sizeof q, s->version_column, false) < 0 ||
             (s->soft_delete_column != NULL &&
              keel_pg_quote_ident(q, sizeof q, s->soft_delete_column, false) < 0);
  for (int i = 0; !bad && i < s->set_count; i++)
    bad = keel_pg_quote_ident(q, sizeof q, s->set_columns[i], false) < 0;
  if (bad) return keel__fail(ig->last_error, UV_EINVAL, "invalid table or column name");
  if (s->soft_delete_column != NULL && (strcmp(s->soft_delete_column, s->key_column) == 0 ||
                                        strcmp(s->soft_delete_column, s->version_column) == 0))
    return keel__fail(ig->last_error, UV_EINVAL,
                      "soft_delete_column is the key or the version column");
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
      keel__fail(ig->last_error, KEEL_ENOTFOUND, "no such row");
    } else {
      const char *outcome = keel_pg_result_value(res, 0, 0);
      version = keel_pg_result_value(res, 0, 1);
      const char *ins = keel_pg_result_value(res, 0, 2);
      inserted = ins != NULL && ins[0] == 't';
      if (outcome != NULL && outcome[0] == 'c') {
        status = KEEL_ECONFLICT;
        inserted = false;
        ig->stats.conflicts++;
        keel__fail(ig->last_error, KEEL_ECONFLICT, "version conflict: current version is %s",
                   version ? version : "?");
      } else if (inserted) {
        ig->stats.inserted++;
      }
    }
  } else {
    keel__ig_record_error(ig, conn, status, res);
    status = keel_sqlstate_map(status, res);
  }
  occ_call copy = *call;
  keel__free(call);
  copy.cb(ig, status, version, inserted, copy.data);
  if (copy.operation) keel__ig_end(ig, status);
}

/* Builds and sends one versioned write; counts an attempt. */
static int occ_send(keel_integrity *ig, const keel_occ_spec *s, bool upsert, keel_occ_cb cb,
                    void *data, bool operation) {
  keel__sql b = {0};
  if (upsert)
    build_upsert(&b, s);
  else
    build_update(&b, s);
  if (b.failed) {
    keel__sql_free(&b);
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  }
  const char *values[OCC_MAX_SET + 2];
  values[0] = s->key_value;
  values[1] = s->expected_version;
  for (int i = 0; i < s->set_count; i++) values[i + 2] = s->set_values[i];
  occ_call *call = keel__malloc(sizeof *call);
  if (call == NULL) {
    keel__sql_free(&b);
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  }
  *call = (occ_call){ig, cb, data, operation};
  int rc =
      keel_pg_pool_query_cached(ig->pool, b.text, s->set_count + 2, values, on_occ_result, call);
  keel__sql_free(&b);
  if (rc != 0) {
    keel__free(call);
    return keel__fail(ig->last_error, rc, "%s", keel_pg_pool_last_error(ig->pool));
  }
  ig->stats.attempts++;
  return 0;
}

static int run_occ(keel_integrity *ig, const keel_occ_spec *s, keel_occ_cb cb, void *data,
                   bool upsert) {
  if (ig == NULL) return UV_EINVAL;
  int rc = check_spec(ig, s, true, !upsert);
  if (rc != 0) return rc;
  if (cb == NULL) return keel__fail(ig->last_error, UV_EINVAL, "a callback is required");
  rc = keel__ig_begin(ig);
  if (rc != 0) return rc;
  rc = occ_send(ig, s, upsert, cb, data, true);
  if (rc != 0) keel__ig_unbegin(ig);
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
  keel_retry_classify_fn user_classify; /* NULL: keel_integrity_retryable */
  void *user_classify_data;
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
  r->have_version = false;
  if (status != 0) {
    keel__ig_record_error(ig, conn, status, res);
    keel_retry_report(r->runner, keel_sqlstate_map(status, res));
    return;
  }
  if (keel_pg_result_nrows(res) == 0) {
    ig->stats.not_found++;
    keel__fail(ig->last_error, KEEL_ENOTFOUND, "no such row");
    keel_retry_report(r->runner, KEEL_ENOTFOUND);
    return;
  }
  const char *values[OCC_MAX_SET + 1] = {0};
  int rc = r->mutate(ig, res, values, r->data);
  if (rc != 0) {
    ig->stats.aborted++;
    rc = rc < 0 ? rc : KEEL_EABORTED;
    keel__fail(ig->last_error, rc, "the mutate callback stopped the retry loop");
    keel_retry_report(r->runner, rc);
    return;
  }
  keel_occ_spec spec = r->spec;
  spec.expected_version = keel_pg_result_get(res, 0, "__keel_version");
  spec.set_values = values;
  rc = ig->closing ? UV_ECANCELED : occ_send(ig, &spec, false, after_versioned_update, r, false);
  if (rc != 0) keel_retry_report(r->runner, rc);
}

static void occ_attempt(keel_retry *runner, unsigned attempt, void *data) {
  occ_retry *r = data;
  r->runner = runner;
  if (attempt > 1) r->ig->stats.retries++;
  if (r->ig->closing) {
    keel_retry_report(runner, UV_ECANCELED);
    return;
  }
  const char *values[] = {r->key_value};
  int rc = keel_pg_pool_query_cached(r->ig->pool, r->read_sql, 1, values, after_read, r);
  if (rc != 0) keel_retry_report(runner, rc);
}

static int occ_classify(int status, void *data) {
  occ_retry *r = data;
  if (status == KEEL_ECONFLICT) return 1;
  if (status == KEEL_ENOTFOUND || status == KEEL_EABORTED || status == UV_ECANCELED ||
      status == KEEL_ECLOSING)
    return 0;
  return r->user_classify != NULL ? r->user_classify(status, r->user_classify_data)
                                  : keel_integrity_retryable(status, NULL);
}

static void occ_done(keel_retry *runner, int status, unsigned attempts, void *data) {
  occ_retry *r = data;
  keel_integrity *ig = r->ig;
  r->done(ig, status, r->have_version ? r->version : NULL, attempts, r->data);
  keel_retry_close(runner, NULL, NULL);
  occ_retry_free(r);
  keel__ig_end(ig, status);
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
  int rc = check_spec(ig, spec, false, false);
  if (rc != 0) return rc;
  if (mutate == NULL || done == NULL)
    return keel__fail(ig->last_error, UV_EINVAL, "mutate and done are required");
  keel_retry_opts ro = opts != NULL ? *opts : ig->opts.retry;
  rc = keel__ig_check_retry(ig, &ro);
  if (rc != 0) return rc;
  occ_retry *r = keel__calloc(1, sizeof *r);
  if (r == NULL) return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  bool failed = false;
  r->ig = ig;
  r->mutate = mutate;
  r->done = done;
  r->data = data;
  r->spec = *spec;
  r->spec.expected_version = NULL;
  r->spec.set_values = NULL;
  r->user_classify = ro.classify;
  r->user_classify_data = ro.classify_data;
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
  r->read_sql = b.text;
  if (b.failed || failed) {
    occ_retry_free(r);
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  }
  ro.classify = occ_classify;
  ro.classify_data = r;
  rc = keel__ig_begin(ig);
  if (rc == 0) {
    keel_retry *runner;
    rc = keel_retry_start(ig->loop, &ro, occ_attempt, occ_done, r, &runner);
    if (rc != 0) keel__ig_unbegin(ig);
  }
  if (rc != 0) {
    occ_retry_free(r);
    return rc == KEEL_ECLOSING ? rc : keel__fail(ig->last_error, rc, "cannot start the retry loop");
  }
  return 0;
}

/* ---- version column installer ------------------------------------------------ */

#define INSTALL_STEPS 5

typedef struct install_job {
  keel_integrity *ig;
  keel_integrity_done_cb cb;
  void *data;
  keel_pg_tx *tx;
  char *statements[INSTALL_STEPS];
  int step;
} install_job;

static void install_job_free(install_job *job) {
  for (int i = 0; i < INSTALL_STEPS; i++) keel__free(job->statements[i]);
  keel__free(job);
}

static void install_step(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  install_job *job = data;
  if (status != 0) {
    keel__ig_record_error(job->ig, conn, status, res);
    keel_pg_tx_finish(job->tx, keel_sqlstate_map(status, res));
    return;
  }
  if (job->step == INSTALL_STEPS) {
    keel_pg_tx_finish(job->tx, 0);
    return;
  }
  int rc = keel_pg_query(conn, job->statements[job->step++], 0, NULL, install_step, job);
  if (rc != 0) keel_pg_tx_finish(job->tx, rc);
}

static void install_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  install_job *job = data;
  job->tx = tx;
  job->step = 1;
  int rc = keel_pg_query(conn, job->statements[0], 0, NULL, install_step, job);
  if (rc != 0) keel_pg_tx_finish(tx, rc);
}

static void install_done(keel_integrity *ig, int status, unsigned attempts, void *data) {
  (void)attempts;
  install_job *job = data;
  keel_integrity_done_cb cb = job->cb;
  void *cb_data = job->data;
  install_job_free(job);
  if (cb != NULL) cb(ig, status, cb_data);
}

/* FNV-1a: a short, stable tag that keeps generated names distinct. */
static uint32_t name_hash(const char *a, const char *b) {
  uint32_t h = 2166136261u;
  for (const char *p = a; *p; p++) h = (h ^ (unsigned char)*p) * 16777619u;
  h = (h ^ 0xffu) * 16777619u;
  for (const char *p = b; *p; p++) h = (h ^ (unsigned char)*p) * 16777619u;
  return h;
}

int keel_occ_install(keel_integrity *ig, const char *table, const char *column,
                     keel_version_kind kind, keel_integrity_done_cb cb, void *data) {
  if (ig == NULL) return UV_EINVAL;
  char probe[160];
  if (table == NULL || column == NULL ||
      keel_pg_quote_ident(probe, sizeof probe, table, true) < 0 ||
      keel_pg_quote_ident(probe, sizeof probe, column, false) < 0)
    return keel__fail(ig->last_error, UV_EINVAL, "keel_occ_install: invalid table or column");
  if (kind != KEEL_VERSION_INTEGER && kind != KEEL_VERSION_UUID)
    return keel__fail(ig->last_error, UV_EINVAL, "keel_occ_install: unknown kind %d", (int)kind);
  const char *dot = strchr(table, '.');
  const char *bare = dot != NULL ? dot + 1 : table;
  uint32_t h = name_hash(table, column);
  /* The function lives in the table's schema (when one is named). */
  char fn_name[160], trigger_name[64];
  if (dot != NULL)
    snprintf(fn_name, sizeof fn_name, "%.*s.keel_occ_bump_%.24s_%08x", (int)(dot - table), table,
             bare, (unsigned)h);
  else
    snprintf(fn_name, sizeof fn_name, "keel_occ_bump_%.24s_%08x", bare, (unsigned)h);
  snprintf(trigger_name, sizeof trigger_name, "keel_occ_%.32s_%08x", column,
           (unsigned)name_hash(column, ""));
  keel__sql s[INSTALL_STEPS] = {{0}};
  /* Concurrent installers (of any table) take turns: CREATE OR REPLACE
   * FUNCTION and the trigger swap race otherwise. */
  keel__sql_add(&s[0], "SELECT pg_advisory_xact_lock(hashtext('keel_occ_install'))");
  keel__sql_add(&s[1], "ALTER TABLE ");
  keel__sql_ident(&s[1], table, true);
  keel__sql_add(&s[1], " ADD COLUMN IF NOT EXISTS ");
  keel__sql_ident(&s[1], column, false);
  keel__sql_add(&s[1], kind == KEEL_VERSION_UUID ? " uuid NOT NULL DEFAULT gen_random_uuid()"
                                                 : " bigint NOT NULL DEFAULT 1");
  /* The trigger bumps only when the UPDATE left the version alone, so a
   * versioned update (which sets it) never bumps twice. */
  keel__sql_add(&s[2], "CREATE OR REPLACE FUNCTION ");
  keel__sql_ident(&s[2], fn_name, true);
  keel__sql_add(&s[2], "() RETURNS trigger LANGUAGE plpgsql AS $keel$ BEGIN IF NEW.");
  keel__sql_ident(&s[2], column, false);
  keel__sql_add(&s[2], " IS NOT DISTINCT FROM OLD.");
  keel__sql_ident(&s[2], column, false);
  keel__sql_add(&s[2], " THEN NEW.");
  keel__sql_ident(&s[2], column, false);
  keel__sql_add(&s[2], " := ");
  if (kind == KEEL_VERSION_UUID) {
    keel__sql_add(&s[2], "gen_random_uuid()");
  } else {
    keel__sql_add(&s[2], "OLD.");
    keel__sql_ident(&s[2], column, false);
    keel__sql_add(&s[2], " + 1");
  }
  keel__sql_add(&s[2], "; END IF; RETURN NEW; END $keel$");
  keel__sql_add(&s[3], "DROP TRIGGER IF EXISTS ");
  keel__sql_ident(&s[3], trigger_name, false);
  keel__sql_add(&s[3], " ON ");
  keel__sql_ident(&s[3], table, true);
  keel__sql_add(&s[4], "CREATE TRIGGER ");
  keel__sql_ident(&s[4], trigger_name, false);
  keel__sql_add(&s[4], " BEFORE UPDATE ON ");
  keel__sql_ident(&s[4], table, true);
  keel__sql_add(&s[4], " FOR EACH ROW EXECUTE FUNCTION ");
  keel__sql_ident(&s[4], fn_name, true);
  keel__sql_add(&s[4], "()");
  bool failed = false;
  for (int i = 0; i < INSTALL_STEPS; i++) failed = failed || s[i].failed;
  install_job *job = failed ? NULL : keel__calloc(1, sizeof *job);
  if (job == NULL) {
    for (int i = 0; i < INSTALL_STEPS; i++) keel__sql_free(&s[i]);
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  }
  job->ig = ig;
  job->cb = cb;
  job->data = data;
  for (int i = 0; i < INSTALL_STEPS; i++) job->statements[i] = s[i].text;
  int rc = keel_tx_run(ig, KEEL_PG_READ_COMMITTED, NULL, install_body, install_done, job);
  if (rc != 0) install_job_free(job);
  return rc;
}
