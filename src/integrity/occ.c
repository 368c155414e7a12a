/* Versioned (optimistic) updates (one plain UPDATE; a read only when it
 * wrote nothing) and upserts (one statement), the optimistic retry loop,
 * and the version-column installer. */
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "integrity/integrity_internal.h"
#include "pg/pg_literal.h"

/* The statement texts of one spec shape (everything but the values): built
 * once and shared by the calls of that shape (refcounted: the context's
 * cache holds one reference, each call in flight one). */
typedef struct occ_shape {
  unsigned refs;
  bool upsert;
  bool include_deleted;
  keel_version_kind kind;
  int set_count;
  const char *table, *key_column, *version_column, *soft_delete_column; /* copies */
  const char **set_columns;                                             /* copies */
  char *sql;                                                            /* owned: the write */
  char *check_sql; /* owned: an update's read of the row when it wrote nothing */
  /* the column pointers and the names follow in the same block */
} occ_shape;

typedef struct occ_call {
  keel_integrity *ig;
  keel_occ_cb cb;
  void *data;
  bool operation; /* a public call: ends the operation after cb */
  bool upsert;
  int reruns;            /* statements re-sent (see OCC_RERUNS) */
  occ_shape *shape;      /* a reference: the texts, kept for a re-send and the read */
  const char *sql;       /* shape->sql */
  const char *check_sql; /* shape->check_sql */
  char **values;         /* copies of the parameters, in the call's own block */
  int nvalues;
} occ_call;

/* An upsert whose statement returned no row at all met a row inserted by a
 * concurrent first writer after its snapshot; an update that wrote nothing
 * but whose row then has the expected version met a row that came back
 * (re-inserted, undeleted) after it ran: the write is re-sent (a new
 * statement sees the row) at most this often. */
#define OCC_RERUNS 3

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
  if (s->soft_delete_column != NULL && (strcmp(s->soft_delete_column, s->key_column) == 0 ||
                                        strcmp(s->soft_delete_column, s->version_column) == 0))
    return keel__fail(ig->last_error, UV_EINVAL,
                      "soft_delete_column is the key or the version column");
  return 0;
}

/* The names can be quoted (check_spec() first). A cached shape's names
 * passed this when it was built. */
static int check_idents(keel_integrity *ig, const keel_occ_spec *s) {
  char q[160];
  bool bad = keel_pg_quote_ident(q, sizeof q, s->table, true) < 0 ||
             keel_pg_quote_ident(q, sizeof q, s->key_column, false) < 0 ||
             keel_pg_quote_ident(q, sizeof q, s->version_column, false) < 0 ||
             (s->soft_delete_column != NULL &&
              keel_pg_quote_ident(q, sizeof q, s->soft_delete_column, false) < 0);
  for (int i = 0; !bad && i < s->set_count; i++)
    bad = keel_pg_quote_ident(q, sizeof q, s->set_columns[i], false) < 0;
  if (bad) return keel__fail(ig->last_error, UV_EINVAL, "invalid table or column name");
  return 0;
}

/* The new version: the column + 1, a server-made UUID, or (new_param > 0) a
 * UUID keel chose, so that keel can tell afterwards whether it landed. */
static void add_bump(keel__sql *b, const keel_occ_spec *s, const char *alias, int new_param) {
  if (s->version_kind == KEEL_VERSION_UUID) {
    if (new_param > 0)
      keel__sql_addf(b, "$%d::uuid", new_param);
    else
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

/* Whether the row counts as present, as a boolean column: true, or
 * "not soft-deleted". */
static void add_alive_value(keel__sql *b, const keel_occ_spec *s) {
  if (s->soft_delete_column == NULL || s->include_deleted) {
    keel__sql_add(b, "true");
  } else {
    keel__sql_ident(b, s->soft_delete_column, false);
    keel__sql_add(b, " IS NULL");
  }
}

/* cur: the current version, read with FOR SHARE so that under READ
 * COMMITTED it is the newest committed one, not the statement's snapshot.
 * `alive` is false for a soft-deleted row (reported as not found). */
static void add_current(keel__sql *b, const keel_occ_spec *s, const char *written) {
  keel__sql_add(b, ", cur AS (SELECT ");
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, "::text AS v, ");
  add_alive_value(b, s);
  keel__sql_add(b, " AS alive FROM ");
  keel__sql_ident(b, s->table, true);
  keel__sql_add(b, " WHERE ");
  keel__sql_ident(b, s->key_column, false);
  keel__sql_addf(b, " = $1 AND NOT EXISTS (SELECT 1 FROM %s) FOR SHARE)", written);
}

static void build_update(keel__sql *b, const keel_occ_spec *s, int new_param) {
  keel__sql_add(b, "WITH upd AS (UPDATE ");
  keel__sql_ident(b, s->table, true);
  keel__sql_add(b, " SET ");
  for (int i = 0; i < s->set_count; i++) {
    keel__sql_ident(b, s->set_columns[i], false);
    keel__sql_addf(b, " = $%d, ", i + 3);
  }
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, " = ");
  add_bump(b, s, NULL, new_param);
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
                " UNION ALL SELECT CASE WHEN alive THEN 'c' ELSE 'd' END, v, false FROM cur");
}

/* keel_occ_update's write: a plain single-row UPDATE, as cheap to parse and
 * plan as the caller's own (an unnamed statement through a transaction
 * pooler is parsed and planned on every call). A row back is success;
 * none sends build_check()'s read to tell a conflict from a missing row. */
static void build_lean_update(keel__sql *b, const keel_occ_spec *s) {
  keel__sql_add(b, "UPDATE ");
  keel__sql_ident(b, s->table, true);
  keel__sql_add(b, " SET ");
  for (int i = 0; i < s->set_count; i++) {
    keel__sql_ident(b, s->set_columns[i], false);
    keel__sql_addf(b, " = $%d, ", i + 3);
  }
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, " = ");
  add_bump(b, s, NULL, 0);
  keel__sql_add(b, " WHERE ");
  keel__sql_ident(b, s->key_column, false);
  keel__sql_add(b, " = $1 AND ");
  keel__sql_ident(b, s->version_column, false);
  /* No casts: $2 takes the column's type, and the column's text output is
   * the version's text. Each cast costs the server a coercion lookup on
   * every parse (about a tenth of this statement's server cost). */
  keel__sql_add(b, " = $2");
  add_alive(b, s, NULL);
  keel__sql_add(b, " RETURNING ");
  keel__sql_ident(b, s->version_column, false);
}

/* The row as it is now, after an update that wrote nothing: its version,
 * whether it is alive, and whether the version is the expected one. A new
 * statement: under READ COMMITTED it sees the newest committed version. */
static void build_check(keel__sql *b, const keel_occ_spec *s) {
  keel__sql_add(b, "SELECT ");
  keel__sql_ident(b, s->version_column, false);
  keel__sql_add(b, "::text, ");
  add_alive_value(b, s);
  keel__sql_add(b, ", ");
  keel__sql_ident(b, s->version_column, false);
  keel__sql_addf(b, " = $2::%s FROM ", version_type(s->version_kind));
  keel__sql_ident(b, s->table, true);
  keel__sql_add(b, " WHERE ");
  keel__sql_ident(b, s->key_column, false);
  keel__sql_add(b, " = $1");
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
  add_bump(b, s, "t0", 0);
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
                " UNION ALL SELECT CASE WHEN alive THEN 'c' ELSE 'd' END, v, false FROM cur");
}

static void shape_release(occ_shape *sh) {
  if (sh == NULL || --sh->refs > 0) return;
  keel__free(sh->sql);
  keel__free(sh->check_sql);
  keel__free(sh);
}

void keel__occ_shapes_free(keel_integrity *ig) {
  for (int i = 0; i < KEEL__OCC_SHAPES; i++) {
    shape_release(ig->occ_shapes[i]);
    ig->occ_shapes[i] = NULL;
  }
}

static bool same_name(const char *a, const char *b) {
  return a == NULL ? b == NULL : b != NULL && strcmp(a, b) == 0;
}

static bool shape_matches(const occ_shape *sh, const keel_occ_spec *s, bool upsert) {
  if (sh->upsert != upsert || sh->kind != s->version_kind || sh->set_count != s->set_count ||
      !same_name(sh->soft_delete_column, s->soft_delete_column) ||
      (s->soft_delete_column != NULL && sh->include_deleted != s->include_deleted) ||
      strcmp(sh->table, s->table) != 0 || strcmp(sh->key_column, s->key_column) != 0 ||
      strcmp(sh->version_column, s->version_column) != 0)
    return false;
  for (int i = 0; i < s->set_count; i++)
    if (strcmp(sh->set_columns[i], s->set_columns[i]) != 0) return false;
  return true;
}

static char *copy_name(char **at, const char *name) {
  size_t len = strlen(name) + 1;
  char *copy = memcpy(*at, name, len);
  *at += len;
  return copy;
}

/* The texts for s (already checked by check_spec and check_idents), with
 * one reference for the caller; NULL when out of memory. */
static occ_shape *shape_build(const keel_occ_spec *s, bool upsert) {
  size_t size = sizeof(occ_shape) + (size_t)s->set_count * sizeof(char *) + strlen(s->table) +
                strlen(s->key_column) + strlen(s->version_column) + 3 +
                (s->soft_delete_column != NULL ? strlen(s->soft_delete_column) + 1 : 0);
  for (int i = 0; i < s->set_count; i++) size += strlen(s->set_columns[i]) + 1;
  occ_shape *sh = keel__calloc(1, size);
  if (sh == NULL) return NULL;
  keel__sql b = {0}, check = {0};
  if (upsert) {
    build_upsert(&b, s);
  } else {
    build_lean_update(&b, s);
    build_check(&check, s);
  }
  if (b.failed || check.failed) {
    keel__sql_free(&b);
    keel__sql_free(&check);
    keel__free(sh);
    return NULL;
  }
  sh->refs = 1;
  sh->upsert = upsert;
  sh->include_deleted = s->include_deleted;
  sh->kind = s->version_kind;
  sh->set_count = s->set_count;
  sh->set_columns = (const char **)(sh + 1);
  char *at = (char *)(sh->set_columns + s->set_count);
  sh->table = copy_name(&at, s->table);
  sh->key_column = copy_name(&at, s->key_column);
  sh->version_column = copy_name(&at, s->version_column);
  if (s->soft_delete_column != NULL) sh->soft_delete_column = copy_name(&at, s->soft_delete_column);
  for (int i = 0; i < s->set_count; i++) sh->set_columns[i] = copy_name(&at, s->set_columns[i]);
  sh->sql = b.text;
  sh->check_sql = check.text;
  return sh;
}

/* The shape of s with a reference for the caller: from the context's
 * cache, or built (names checked) and cached. 0, UV_EINVAL or UV_ENOMEM. */
static int shape_get(keel_integrity *ig, const keel_occ_spec *s, bool upsert, occ_shape **out) {
  for (int i = 0; i < KEEL__OCC_SHAPES; i++) {
    occ_shape *sh = ig->occ_shapes[i];
    if (sh != NULL && shape_matches(sh, s, upsert)) {
      sh->refs++;
      *out = sh;
      return 0;
    }
  }
  int rc = check_idents(ig, s);
  if (rc != 0) return rc;
  occ_shape *sh = shape_build(s, upsert);
  if (sh == NULL) return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  unsigned slot = ig->occ_shape_next++ % KEEL__OCC_SHAPES;
  shape_release(ig->occ_shapes[slot]);
  ig->occ_shapes[slot] = sh;
  sh->refs++;
  *out = sh;
  return 0;
}

static void occ_call_free(occ_call *call) {
  shape_release(call->shape);
  keel__free(call);
}

/* Reads the outcome of a versioned write (update, upsert or the retry
 * loop's update): the status, and *version / *inserted valid while res is.
 * Returns 1 when an upsert saw no row at all (a concurrent first insert
 * committed after its snapshot: send it again). */
static int occ_outcome(keel_integrity *ig, keel_pg *conn, int *status, const keel_pg_result *res,
                       const char **version, bool *inserted, bool upsert) {
  *version = NULL;
  *inserted = false;
  if (*status != 0) {
    keel__ig_record_error(ig, conn, *status, res);
    *status = keel_sqlstate_map(*status, res);
    return 0;
  }
  if (keel_pg_result_nrows(res) == 0) {
    if (upsert) return 1;
    *status = KEEL_ENOTFOUND;
    ig->stats.not_found++;
    keel__fail(ig->last_error, KEEL_ENOTFOUND, "no such row");
    return 0;
  }
  const char *outcome = keel_pg_result_value(res, 0, 0);
  const char *v = keel_pg_result_value(res, 0, 1);
  const char *ins = keel_pg_result_value(res, 0, 2);
  if (outcome != NULL && outcome[0] == 'd') {
    *status = KEEL_ENOTFOUND;
    ig->stats.not_found++;
    keel__fail(ig->last_error, KEEL_ENOTFOUND, "no such row (soft-deleted)");
    return 0;
  }
  *version = v;
  if (outcome != NULL && outcome[0] == 'c') {
    *status = KEEL_ECONFLICT;
    ig->stats.conflicts++;
    keel__fail(ig->last_error, KEEL_ECONFLICT, "version conflict: current version is %s",
               v ? v : "?");
    return 0;
  }
  *inserted = ins != NULL && ins[0] == 't';
  if (*inserted) ig->stats.inserted++;
  return 0;
}

/* Ends the operation: frees call, then cb (version and inserted valid
 * while the result they point into is). */
static void occ_finish(occ_call *call, int status, const char *version, bool inserted) {
  keel_integrity *ig = call->ig;
  keel_occ_cb cb = call->cb;
  void *cb_data = call->data;
  bool operation = call->operation;
  occ_call_free(call);
  if (status == KEEL_EINDOUBT) ig->stats.in_doubt++;
  cb(ig, status, version, inserted, cb_data);
  if (operation) keel__ig_end(ig, status);
}

static void on_occ_result(keel_pg *conn, int status, const keel_pg_result *res, void *data);

/* The write: an update through a transaction pooler goes as one simple
 * query (keel__pg_pool_query_literal); an upsert as a cached statement. */
static int send_write(occ_call *call) {
  return (call->upsert ? keel_pg_pool_query_cached : keel__pg_pool_query_literal)(
      call->ig->pool, call->sql, call->nvalues, (const char *const *)call->values, on_occ_result,
      call);
}

/* Sends the write again (see OCC_RERUNS): 0, UV_EAGAIN when it may not
 * (reruns used up, context closing), or the pool's error. */
static int occ_resend(occ_call *call) {
  keel_integrity *ig = call->ig;
  if (call->reruns >= OCC_RERUNS || ig->closing) return UV_EAGAIN;
  call->reruns++;
  int rc = send_write(call);
  if (rc == 0) ig->stats.attempts++;
  return rc;
}

/* The read after an update that wrote nothing: the row is absent or
 * soft-deleted (not found), or has another version (a conflict, with it). */
static void on_occ_check(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  occ_call *call = data;
  keel_integrity *ig = call->ig;
  if (status != 0) {
    keel__ig_record_error(ig, conn, status, res);
    status = keel_sqlstate_map(status, res);
    if (status == KEEL_EINDOUBT || status == KEEL_ECONN) {
      /* Only the read was lost: the update certainly wrote nothing. */
      status = KEEL_ECONN;
      keel__fail(ig->last_error, KEEL_ECONN,
                 "versioned update wrote nothing; the read of the row that says why was lost: %s",
                 keel_pg_last_error(conn));
    }
    occ_finish(call, status, NULL, false);
    return;
  }
  const char *version = keel_pg_result_nrows(res) > 0 ? keel_pg_result_value(res, 0, 0) : NULL;
  const char *alive = version != NULL ? keel_pg_result_value(res, 0, 1) : NULL;
  const char *same = version != NULL ? keel_pg_result_value(res, 0, 2) : NULL;
  if (version == NULL || alive == NULL || alive[0] != 't') {
    ig->stats.not_found++;
    keel__fail(ig->last_error, KEEL_ENOTFOUND,
               version == NULL ? "no such row" : "no such row (soft-deleted)");
    occ_finish(call, KEEL_ENOTFOUND, NULL, false);
    return;
  }
  if (same != NULL && same[0] == 't') {
    /* The row has the expected version now: it came back (inserted again,
     * undeleted) after the update ran. The update sent again decides. */
    int rc = occ_resend(call);
    if (rc == 0) return;
    if (rc != UV_EAGAIN) {
      status = rc == KEEL_ECLOSING ? UV_ECANCELED : rc;
      keel__fail(ig->last_error, status, "versioned update: cannot send it again: %s",
                 keel_pg_pool_last_error(ig->pool));
      occ_finish(call, status, NULL, false);
      return;
    }
  }
  ig->stats.conflicts++;
  keel__fail(ig->last_error, KEEL_ECONFLICT, "version conflict: current version is %s", version);
  occ_finish(call, KEEL_ECONFLICT, version, false);
}

/* An update's reply: the new version, or nothing written (then the read
 * tells why). */
static void on_update_result(keel_pg *conn, int status, const keel_pg_result *res, occ_call *call) {
  keel_integrity *ig = call->ig;
  if (status != 0) {
    const char *version;
    bool inserted;
    occ_outcome(ig, conn, &status, res, &version, &inserted, false);
    occ_finish(call, status, NULL, false);
    return;
  }
  if (keel_pg_result_nrows(res) > 0) {
    occ_finish(call, 0, keel_pg_result_value(res, 0, 0), false);
    return;
  }
  int rc = keel_pg_pool_query_cached(ig->pool, call->check_sql, 2,
                                     (const char *const *)call->values, on_occ_check, call);
  if (rc == 0) return;
  status = rc == KEEL_ECLOSING ? UV_ECANCELED : rc;
  keel__fail(ig->last_error, status,
             "versioned update wrote nothing; cannot read the row that says why: %s",
             keel_pg_pool_last_error(ig->pool));
  occ_finish(call, status, NULL, false);
}

static void on_occ_result(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  occ_call *call = data;
  if (!call->upsert) {
    on_update_result(conn, status, res, call);
    return;
  }
  keel_integrity *ig = call->ig;
  const char *version = NULL;
  bool inserted = false;
  if (occ_outcome(ig, conn, &status, res, &version, &inserted, true)) {
    /* The row a concurrent writer inserted is invisible to this statement's
     * snapshot; the same upsert sent again sees it (conflict with its
     * version, or the update when the version matches). */
    int rc = occ_resend(call);
    if (rc == 0) return;
    status = rc == UV_EAGAIN ? KEEL_ECONFLICT : rc;
    if (status == KEEL_ECONFLICT) ig->stats.conflicts++;
    keel__fail(ig->last_error, status, "upsert: the row changed under every attempt");
  }
  occ_finish(call, status, version, inserted);
}

/* Sends one versioned write of shape sh through the pool; counts an
 * attempt. The call (with its copies of the values, one block) takes over
 * the caller's reference to sh, also on failure. */
static int occ_send(keel_integrity *ig, const keel_occ_spec *s, occ_shape *sh, keel_occ_cb cb,
                    void *data) {
  const char *values[OCC_MAX_SET + 2];
  values[0] = s->key_value;
  values[1] = s->expected_version;
  for (int i = 0; i < s->set_count; i++) values[i + 2] = s->set_values[i];
  int n = s->set_count + 2;
  size_t size = sizeof(occ_call) + (size_t)n * sizeof(char *);
  for (int i = 0; i < n; i++)
    if (values[i] != NULL) size += strlen(values[i]) + 1;
  occ_call *call = keel__calloc(1, size);
  if (call == NULL) {
    shape_release(sh);
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  }
  /* The texts and values are kept for the read and for a re-send. */
  *call = (occ_call){.ig = ig,
                     .cb = cb,
                     .data = data,
                     .operation = true,
                     .upsert = sh->upsert,
                     .shape = sh,
                     .sql = sh->sql,
                     .check_sql = sh->check_sql,
                     .nvalues = n};
  call->values = (char **)(call + 1);
  char *text = (char *)(call->values + n);
  for (int i = 0; i < n; i++) {
    if (values[i] == NULL) continue;
    size_t len = strlen(values[i]) + 1;
    call->values[i] = memcpy(text, values[i], len);
    text += len;
  }
  int rc = send_write(call);
  if (rc != 0) {
    occ_call_free(call);
    return rc == KEEL_ECLOSING
               ? rc
               : keel__fail(ig->last_error, rc, "%s", keel_pg_pool_last_error(ig->pool));
  }
  ig->stats.attempts++;
  return 0;
}

static int run_occ(keel_integrity *ig, const keel_occ_spec *s, keel_occ_cb cb, void *data,
                   bool upsert) {
  if (ig == NULL) return UV_EINVAL;
  if (ig->closing) return keel__fail(ig->last_error, KEEL_ECLOSING, "the context is closing");
  int rc = check_spec(ig, s, true, !upsert);
  if (rc != 0) return rc;
  if (cb == NULL) return keel__fail(ig->last_error, UV_EINVAL, "a callback is required");
  occ_shape *sh = NULL;
  rc = shape_get(ig, s, upsert, &sh);
  if (rc != 0) return rc;
  rc = keel__ig_begin(ig);
  if (rc != 0) {
    shape_release(sh);
    return rc;
  }
  rc = occ_send(ig, s, sh, cb, data);
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
  char *vals[OCC_MAX_SET]; /* values set with keel_occ_set_value() */
  bool is_set[OCC_MAX_SET];
  keel_occ_mutate_fn mutate;
  keel_occ_retry_cb done;
  void *data;
  keel_retry_classify_fn user_classify; /* NULL: keel_integrity_retryable */
  void *user_classify_data;
  keel_retry_event_cb user_on_retry;
  keel_retry *runner;
  keel_pg_tx *tx; /* the current attempt's transaction */
  char *read_sql;
  char *update_sql;
  char version[64];
  bool have_version;
  char mine[40];    /* UUID versions: the new version keel chose */
  char xid[32];     /* the attempt's transaction id ("" unknown) */
  int outcome;      /* keel's verdict on the attempt (0: none) */
  unsigned pending; /* keel's statements whose callback is still due */
  bool finished;    /* done has run */
  bool freeable;    /* and the context is done with r */
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
  for (int i = 0; i < OCC_MAX_SET; i++) keel__free(r->vals[i]);
  keel__free(r->read_sql);
  keel__free(r->update_sql);
  keel__free(r);
}

int keel_occ_set_value(keel_integrity *ig, int index, const char *value) {
  if (ig == NULL) return UV_EINVAL;
  occ_retry *r = ig->mutating;
  if (r == NULL || index < 0 || index >= r->spec.set_count)
    return keel__fail(ig->last_error, UV_EINVAL,
                      "keel_occ_set_value: only inside mutate, index within set_count");
  char *copy = NULL;
  if (value != NULL && (copy = keel__strdup(value)) == NULL)
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  keel__free(r->vals[index]);
  r->vals[index] = copy;
  r->is_set[index] = true;
  return 0;
}

/* keel's statements call back into r, possibly after the attempt ended (a
 * pool close): r lives until the last of them. True when r is finished. */
static bool statement_back(occ_retry *r) {
  r->pending--;
  if (!r->finished) return false;
  if (r->pending == 0 && r->freeable) occ_retry_free(r);
  return true;
}

/* A random (version 4) UUID for the new version of a UUID-versioned row. */
static void make_uuid(keel_integrity *ig, char *out, size_t cap) {
  unsigned char b[16];
  keel__ig_random16(ig, b);
  b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
  b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
  snprintf(out, cap, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
           b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
           b[15]);
}

static void after_update(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  occ_retry *r = data;
  if (statement_back(r)) return;
  const char *version = NULL;
  bool inserted = false;
  occ_outcome(r->ig, conn, &status, res, &version, &inserted, false);
  r->have_version = version != NULL;
  if (version != NULL) snprintf(r->version, sizeof r->version, "%s", version);
  r->outcome = status;
  /* Written: COMMIT. Anything else (a conflict included): ROLLBACK. */
  keel_pg_tx_finish(r->tx, status);
}

static void on_xid(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  occ_retry *r = data;
  if (statement_back(r)) return;
  const char *xid = status == 0 ? keel_pg_result_value(res, 0, 0) : NULL;
  if (xid != NULL && strlen(xid) < sizeof r->xid) memcpy(r->xid, xid, strlen(xid) + 1);
}

static void after_read(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  occ_retry *r = data;
  if (statement_back(r)) return;
  keel_integrity *ig = r->ig;
  r->have_version = false;
  if (status != 0) {
    keel__ig_record_error(ig, conn, status, res);
    r->outcome = keel_sqlstate_map(status, res);
    keel_pg_tx_finish(r->tx, r->outcome);
    return;
  }
  if (keel_pg_result_nrows(res) == 0) {
    ig->stats.not_found++;
    keel__fail(ig->last_error, KEEL_ENOTFOUND, "no such row");
    r->outcome = KEEL_ENOTFOUND;
    keel_pg_tx_finish(r->tx, KEEL_ENOTFOUND);
    return;
  }
  const char *values[OCC_MAX_SET + 4] = {0};
  for (int i = 0; i < OCC_MAX_SET; i++) {
    keel__free(r->vals[i]);
    r->vals[i] = NULL;
    r->is_set[i] = false;
  }
  ig->mutating = r;
  int rc = r->mutate(ig, res, values + 2, r->data);
  ig->mutating = NULL;
  if (rc != 0) {
    ig->stats.aborted++;
    rc = rc < 0 ? rc : KEEL_EABORTED;
    keel__fail(ig->last_error, rc, "the mutate callback stopped the retry loop");
    r->outcome = rc;
    keel_pg_tx_finish(r->tx, rc);
    return;
  }
  for (int i = 0; i < r->spec.set_count; i++)
    if (r->is_set[i]) values[i + 2] = r->vals[i];
  int n = r->spec.set_count + 2;
  values[0] = r->key_value;
  values[1] = keel_pg_result_get(res, 0, "__keel_version");
  if (r->spec.version_kind == KEEL_VERSION_UUID) {
    make_uuid(ig, r->mine, sizeof r->mine);
    values[n] = r->mine;
    n++;
  }
  rc = ig->closing ? UV_ECANCELED
                   : keel_pg_query_cached(conn, r->update_sql, n, values, after_update, r);
  if (rc != 0) {
    r->outcome = rc;
    keel_pg_tx_finish(r->tx, rc);
    return;
  }
  r->pending++;
  ig->stats.attempts++;
}

/* One attempt is one transaction: its id, the read, then (after mutate) the
 * versioned update and COMMIT, on one session; a COMMIT lost in flight is
 * then looked up by the transaction's id. */
static void occ_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  occ_retry *r = data;
  r->tx = tx;
  r->xid[0] = '\0';
  r->outcome = 0;
  const char *values[] = {r->key_value};
  int rc = r->ig->closing ? UV_ECANCELED : keel_pg_query(conn, KEEL__XID_SQL, 0, NULL, on_xid, r);
  if (rc == 0) {
    r->pending++;
    rc = keel_pg_query_cached(conn, r->read_sql, 1, values, after_read, r);
    if (rc == 0) r->pending++;
  }
  if (rc != 0) {
    r->outcome = rc;
    keel_pg_tx_finish(tx, rc);
  }
}

static void on_commit_resolved(keel_integrity *ig, int outcome, void *data) {
  occ_retry *r = data;
  if (outcome == KEEL_ECONN)
    keel__fail(ig->last_error, KEEL_ECONN,
               "versioned update: COMMIT lost in flight and not committed");
  else if (outcome == KEEL_EINDOUBT)
    keel__fail(ig->last_error, KEEL_EINDOUBT,
               "versioned update: COMMIT lost in flight, outcome unknown");
  keel_retry_report(r->runner, outcome);
}

static void occ_tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool;
  occ_retry *r = data;
  keel_integrity *ig = r->ig;
  if (status == 0) {
    keel_retry_report(r->runner, 0);
    return;
  }
  if (status == KEEL_EINDOUBT) {
    /* The update was written and its COMMIT lost: ask what became of it. */
    if (keel__ig_xact_check(ig, r->xid, on_commit_resolved, r) == 0) return;
    keel__fail(ig->last_error, KEEL_EINDOUBT,
               "versioned update: COMMIT lost in flight, outcome unknown");
    keel_retry_report(r->runner, KEEL_EINDOUBT);
    return;
  }
  /* Our own verdict (conflict, not found, mutate's error) when we gave one;
   * otherwise the transaction's (its first failing statement). */
  if (r->outcome != 0 && status == r->outcome) {
    keel_retry_report(r->runner, status);
    return;
  }
  keel__ig_set_sqlstate(ig, sqlstate);
  int mapped = sqlstate != NULL ? keel_sqlstate_error(sqlstate) : 0;
  if (mapped != 0 && (status == KEEL_EPG || mapped != KEEL_EPG)) status = mapped;
  if (status == KEEL_ECONN) ig->stats.by_class[KEEL_SQLSTATE_CONNECTION]++;
  keel_retry_report(r->runner, status);
}

static void occ_attempt(keel_retry *runner, unsigned attempt, void *data) {
  occ_retry *r = data;
  r->runner = runner;
  if (attempt > 1) r->ig->stats.retries++;
  if (r->ig->closing) {
    keel_retry_report(runner, UV_ECANCELED);
    return;
  }
  int rc = keel_pg_pool_transaction(r->ig->pool, KEEL_PG_READ_COMMITTED, occ_body, occ_tx_done, r);
  if (rc != 0) keel_retry_report(runner, rc == KEEL_ECLOSING ? UV_ECANCELED : rc);
}

static int occ_classify(int status, void *data) {
  occ_retry *r = data;
  if (status == KEEL_ECONFLICT) return 1;
  if (status == KEEL_ENOTFOUND || status == KEEL_EABORTED || status == UV_ECANCELED ||
      status == KEEL_ECLOSING || status == KEEL_EINDOUBT)
    return 0;
  return r->user_classify != NULL ? r->user_classify(status, r->user_classify_data)
                                  : keel_integrity_retryable(status, NULL);
}

static void occ_on_retry(keel_retry *runner, unsigned next, int status, uint64_t delay_ms,
                         void *data) {
  occ_retry *r = data;
  r->user_on_retry(runner, next, status, delay_ms, r->data);
}

static void occ_done(keel_retry *runner, int status, unsigned attempts, void *data) {
  occ_retry *r = data;
  keel_integrity *ig = r->ig;
  if (status == KEEL_EINDOUBT) ig->stats.in_doubt++;
  r->finished = true;
  r->done(ig, status,
          status == 0 || status == KEEL_ECONFLICT ? (r->have_version ? r->version : NULL) : NULL,
          attempts, r->data);
  keel_retry_close(runner, NULL, NULL);
  r->freeable = true;
  if (r->pending == 0) occ_retry_free(r);
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
  if (ig->closing) return keel__fail(ig->last_error, KEEL_ECLOSING, "the context is closing");
  int rc = check_spec(ig, spec, false, false);
  if (rc == 0) rc = check_idents(ig, spec);
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
  r->user_on_retry = ro.on_retry;
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
  keel__sql u = {.failed = failed};
  int n = spec->set_count + 2;
  if (!failed) build_update(&u, &r->spec, spec->version_kind == KEEL_VERSION_UUID ? n + 1 : 0);
  r->update_sql = u.text;
  if (b.failed || u.failed || failed) {
    occ_retry_free(r);
    return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  }
  ro.classify = occ_classify;
  ro.classify_data = r;
  if (ro.on_retry != NULL) ro.on_retry = occ_on_retry;
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

/* PostgreSQL keeps at most 63 bytes of an identifier. */
#define PG_NAME_MAX 63

size_t keel__utf8_prefix(const char *s, size_t len, size_t max) {
  if (len <= max) return len;
  size_t n = max;
  /* Back up over continuation bytes (10xxxxxx) to a character's start. */
  while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80) n--;
  return n;
}

int keel__ig_name(char *out, size_t cap, const char *prefix, const char *part, size_t max_part,
                  uint32_t hash) {
  size_t fixed = strlen(prefix) + 9; /* "_" and eight hex digits */
  if (fixed > PG_NAME_MAX || cap <= PG_NAME_MAX) return UV_EINVAL;
  if (max_part > PG_NAME_MAX - fixed) max_part = PG_NAME_MAX - fixed;
  size_t keep = keel__utf8_prefix(part, strlen(part), max_part);
  int n = snprintf(out, cap, "%s%.*s_%08x", prefix, (int)keep, part, (unsigned)hash);
  return n > 0 && (size_t)n <= PG_NAME_MAX ? 0 : UV_EINVAL;
}

int keel_occ_install(keel_integrity *ig, const char *table, const char *column,
                     keel_version_kind kind, keel_integrity_done_cb cb, void *data) {
  if (ig == NULL) return UV_EINVAL;
  if (ig->closing) return keel__fail(ig->last_error, KEEL_ECLOSING, "the context is closing");
  char probe[160];
  if (table == NULL || column == NULL ||
      keel_pg_quote_ident(probe, sizeof probe, table, true) < 0 ||
      keel_pg_quote_ident(probe, sizeof probe, column, false) < 0)
    return keel__fail(ig->last_error, UV_EINVAL, "keel_occ_install: invalid table or column");
  if (kind != KEEL_VERSION_INTEGER && kind != KEEL_VERSION_UUID)
    return keel__fail(ig->last_error, UV_EINVAL, "keel_occ_install: unknown kind %d", (int)kind);
  const char *dot = strchr(table, '.');
  const char *bare = dot != NULL ? dot + 1 : table;
  /* Names of at most 63 bytes: a readable prefix of the table (24 bytes)
   * or column (32 bytes) cut on a UTF-8 character boundary, then a hash of
   * the full names (the same names earlier releases gave ASCII tables). */
  char fn_bare[PG_NAME_MAX + 1], trigger_name[PG_NAME_MAX + 1], fn_name[2 * PG_NAME_MAX + 2];
  if (keel__ig_name(fn_bare, sizeof fn_bare, "keel_occ_bump_", bare, 24,
                    name_hash(table, column)) != 0 ||
      keel__ig_name(trigger_name, sizeof trigger_name, "keel_occ_", column, 32,
                    name_hash(column, "")) != 0)
    return keel__fail(ig->last_error, UV_EINVAL, "keel_occ_install: cannot name the trigger");
  /* The function lives in the table's schema (when one is named). */
  if (dot != NULL)
    snprintf(fn_name, sizeof fn_name, "%.*s.%s", (int)(dot - table), table, fn_bare);
  else
    snprintf(fn_name, sizeof fn_name, "%s", fn_bare);
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
