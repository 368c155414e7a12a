/* The PostgreSQL store: one row per (scope, key). begin is one statement
 * (a transaction-scoped advisory lock on the key, an INSERT ... ON CONFLICT
 * that takes the key when it is absent or expired, and the row as it is),
 * complete and abort are token-guarded UPDATE / DELETE. The SQL is shown in
 * docs/idempotency.md. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "idem/idem_internal.h"
#include "keel/integrity.h"

enum { SQL_BEGIN, SQL_COMPLETE, SQL_ABORT, SQL_INSTALL };

/* Attempts of a begin whose statement found the key neither free nor
 * visible (a row committed after its snapshot was taken): each attempt is
 * a new statement with a new snapshot. */
#define BEGIN_ATTEMPTS 5

typedef struct sqlbuf {
  char *text;
  size_t len;
  bool failed;
} sqlbuf;

static void add(sqlbuf *b, const char *text) {
  if (b->failed) return;
  size_t n = strlen(text);
  char *t = keel__realloc(b->text, b->len + n + 1);
  if (t == NULL) {
    b->failed = true;
    return;
  }
  memcpy(t + b->len, text, n + 1);
  b->text = t;
  b->len += n;
}

int keel__idem_pg_sql(keel_idem *idem, const char *table) {
  char t[160];
  if (keel_pg_quote_ident(t, sizeof t, table, true) < 0) return UV_EINVAL;
  sqlbuf b[4] = {{0}};
  add(&b[0],
      "WITH lk AS (SELECT pg_try_advisory_xact_lock(hashtextextended("
      "length($1)::text || ':' || $1 || $2, 1801)) AS got), "
      "up AS (INSERT INTO ");
  add(&b[0], t);
  add(&b[0],
      " AS r (scope, key, fingerprint, state, owner, expires_at) "
      "SELECT $1, $2, $3, 'processing', $4, "
      "statement_timestamp() + $5::bigint * interval '1 millisecond' "
      "FROM lk WHERE lk.got "
      "ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint, "
      "state = 'processing', owner = excluded.owner, response_status = NULL, "
      "body = NULL, body_cached = true, expires_at = excluded.expires_at, "
      "created_at = statement_timestamp() "
      "WHERE r.expires_at <= statement_timestamp() "
      "RETURNING r.xmax::text <> '0' AS took_over) "
      "SELECT lk.got, up.took_over, r.fingerprint, r.state, r.owner, "
      "r.response_status, encode(r.body, 'hex') AS body, r.body_cached, "
      "greatest(0, ceil(extract(epoch FROM r.expires_at - statement_timestamp()) "
      "* 1000))::bigint AS ttl_ms "
      "FROM lk LEFT JOIN up ON true LEFT JOIN ");
  add(&b[0], t);
  add(&b[0], " r ON up.took_over IS NULL AND r.scope = $1 AND r.key = $2");

  add(&b[1], "UPDATE ");
  add(&b[1], t);
  add(&b[1],
      " SET state = 'completed', owner = NULL, response_status = $4::integer, "
      "body = $5::bytea, body_cached = $6::boolean, "
      "expires_at = statement_timestamp() + $7::bigint * interval '1 millisecond' "
      "WHERE scope = $1 AND key = $2 AND owner = $3 AND state = 'processing' "
      "AND expires_at > statement_timestamp()");

  add(&b[2], "WITH d AS (DELETE FROM ");
  add(&b[2], t);
  add(&b[2],
      " WHERE scope = $1 AND key = $2 AND owner = $3 AND state = 'processing' "
      "RETURNING 1) SELECT (SELECT count(*) FROM d) AS freed, "
      "(SELECT count(*) FROM ");
  add(&b[2], t);
  add(&b[2],
      " WHERE scope = $1 AND key = $2 AND expires_at > statement_timestamp()) "
      "AS held");

  add(&b[3], "CREATE TABLE IF NOT EXISTS ");
  add(&b[3], t);
  add(&b[3],
      " (scope text NOT NULL, key text NOT NULL, fingerprint text NOT NULL, "
      "state text NOT NULL CHECK (state IN ('processing', 'completed')), "
      "owner text, response_status integer, body bytea, "
      "body_cached boolean NOT NULL DEFAULT true, expires_at timestamptz NOT NULL, "
      "created_at timestamptz NOT NULL DEFAULT statement_timestamp(), "
      "PRIMARY KEY (scope, key))");
  int rc = 0;
  for (int i = 0; i < 4; i++) {
    if (b[i].failed) rc = UV_ENOMEM;
  }
  if (rc != 0) {
    for (int i = 0; i < 4; i++) keel__free(b[i].text);
    return rc;
  }
  for (int i = 0; i < 4; i++) idem->sql[i] = b[i].text;
  return 0;
}

/* The keel error for a failed statement, with its text kept. */
static int failure(keel_idem *idem, int status, const keel_pg_result *res) {
  const char *state = keel_pg_result_sqlstate(res);
  const char *msg = keel_pg_result_error(res);
  if (status == KEEL_EPG && state != NULL) {
    int mapped = keel_sqlstate_error(state);
    if (mapped == KEEL_ESERIALIZATION || mapped == KEEL_ECONN || mapped == KEEL_EINDOUBT)
      status = mapped;
  }
  if (state != NULL)
    keel__fail(idem->last_error, status, "SQLSTATE %s: %s", state, msg != NULL ? msg : "");
  else
    keel__fail(idem->last_error, status, "%s", msg != NULL ? msg : keel_strerror(status));
  return status;
}

static int pg_send(idem_op *op, const char *sql, int n, const char *const *values,
                   keel_pg_result_cb cb) {
  keel_idem *idem = op->idem;
  if (op->conn != NULL) return keel_pg_query_cached(op->conn, sql, n, values, cb, op);
  return keel_pg_pool_query_cached(idem->pool, sql, n, values, cb, op);
}

static int send_begin(idem_op *op);

static unsigned hexval(char c) {
  return c >= 'a'   ? (unsigned)(c - 'a' + 10)
         : c >= 'A' ? (unsigned)(c - 'A' + 10)
                    : (unsigned)(c - '0');
}

static void on_begin(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  idem_op *op = data;
  keel_idem *idem = op->idem;
  if (status != 0) {
    keel__idem_begin_done(op, failure(idem, status, res), NULL);
    return;
  }
  if (keel_pg_result_nrows(res) != 1) {
    keel__fail(idem->last_error, KEEL_EPROTO, "begin: %d rows", keel_pg_result_nrows(res));
    keel__idem_begin_done(op, KEEL_EPROTO, NULL);
    return;
  }
  keel_idem_reply reply;
  memset(&reply, 0, sizeof reply);
  const char *got = keel_pg_result_get(res, 0, "got");
  const char *took = keel_pg_result_get(res, 0, "took_over");
  if (took != NULL) { /* the key is ours */
    reply.token = op->token;
    reply.taken_over = took[0] == 't';
    keel__idem_begin_done(op, 0, &reply);
    return;
  }
  const char *fp = keel_pg_result_get(res, 0, "fingerprint");
  const char *state = keel_pg_result_get(res, 0, "state");
  if (fp == NULL || state == NULL) {
    /* Not taken and not visible: held by a transaction that has not
     * committed (busy), or committed after this statement's snapshot. */
    if (got != NULL && got[0] == 't' && ++op->attempts < BEGIN_ATTEMPTS) {
      int rc = send_begin(op);
      if (rc == 0) return;
      keel__idem_begin_done(op, rc, NULL);
      return;
    }
    keel__idem_begin_done(op, KEEL_EINPROGRESS, &reply);
    return;
  }
  const char *ttl = keel_pg_result_get(res, 0, "ttl_ms");
  if (strcmp(fp, op->fp) != 0) {
    keel__idem_begin_done(op, KEEL_EMISMATCH, &reply);
    return;
  }
  if (strcmp(state, "processing") == 0) {
    reply.ttl_ms = ttl != NULL ? strtoull(ttl, NULL, 10) : 0;
    keel__idem_begin_done(op, KEEL_EINPROGRESS, &reply);
    return;
  }
  reply.completed = true;
  const char *code = keel_pg_result_get(res, 0, "response_status");
  const char *cached = keel_pg_result_get(res, 0, "body_cached");
  const char *hex = keel_pg_result_get(res, 0, "body");
  reply.response_status = code != NULL ? (int)strtol(code, NULL, 10) : 0;
  reply.body_cached = cached != NULL && cached[0] == 't';
  char *body = NULL;
  if (reply.body_cached && hex != NULL) {
    size_t n = strlen(hex) / 2;
    body = keel__malloc(n + 1);
    if (body == NULL) {
      keel__fail(idem->last_error, UV_ENOMEM, "out of memory reading the stored body");
      keel__idem_begin_done(op, UV_ENOMEM, NULL);
      return;
    }
    for (size_t i = 0; i < n; i++)
      body[i] = (char)(hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
    body[n] = '\0';
    reply.body = body;
    reply.body_len = n;
  } else if (reply.body_cached) {
    reply.body = "";
  }
  keel__idem_begin_done(op, 0, &reply);
  keel__free(body);
}

static int send_begin(idem_op *op) {
  keel_idem *idem = op->idem;
  snprintf(op->num[0], sizeof op->num[0], "%llu", (unsigned long long)idem->opts.processing_ttl_ms);
  const char *values[] = {op->scope, op->key, op->fp, op->token.hex, op->num[0]};
  return pg_send(op, idem->sql[SQL_BEGIN], 5, values, on_begin);
}

static void on_complete(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  idem_op *op = data;
  if (status != 0) {
    keel__idem_done(op, failure(op->idem, status, res));
    return;
  }
  if (keel_pg_result_affected(res) != 1) {
    keel__fail(op->idem->last_error, KEEL_ELOST, "complete: the key is no longer this token's");
    keel__idem_done(op, KEEL_ELOST);
    return;
  }
  keel__idem_done(op, 0);
}

static void on_abort(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  idem_op *op = data;
  if (status != 0) {
    keel__idem_done(op, failure(op->idem, status, res));
    return;
  }
  const char *freed = keel_pg_result_get(res, 0, "freed");
  const char *held = keel_pg_result_get(res, 0, "held");
  if ((freed == NULL || strcmp(freed, "0") == 0) && held != NULL && strcmp(held, "0") != 0) {
    keel__fail(op->idem->last_error, KEEL_ELOST, "abort: the key is held by another owner");
    keel__idem_done(op, KEEL_ELOST);
    return;
  }
  keel__idem_done(op, 0);
}

/* ---- install: one transaction under an advisory lock -------------------- */

typedef struct install_tx {
  idem_op *op;
  keel_pg_tx *tx;
  int step;
} install_tx;

static void install_step(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  install_tx *it = data;
  if (status != 0) {
    failure(it->op->idem, status, res);
    keel_pg_tx_finish(it->tx, status);
    return;
  }
  if (it->step == 2) {
    keel_pg_tx_finish(it->tx, 0);
    return;
  }
  const char *sql = it->step == 0 ? "SELECT pg_advisory_xact_lock(hashtext('keel_idem_install'))"
                                  : it->op->idem->sql[SQL_INSTALL];
  it->step++;
  int rc = keel_pg_query(conn, sql, 0, NULL, install_step, it);
  if (rc != 0) keel_pg_tx_finish(it->tx, rc);
}

static void install_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  install_tx *it = data;
  it->tx = tx;
  install_step(conn, 0, NULL, it);
}

static void install_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool;
  (void)sqlstate;
  install_tx *it = data;
  idem_op *op = it->op;
  keel__free(it);
  keel__idem_done(op, status);
}

int keel__idem_pg_start(idem_op *op) {
  keel_idem *idem = op->idem;
  switch (op->kind) {
    case IDEM_BEGIN:
      return send_begin(op);
    case IDEM_COMPLETE: {
      snprintf(op->num[0], sizeof op->num[0], "%d", op->response_status);
      snprintf(op->num[1], sizeof op->num[1], "%llu",
               (unsigned long long)idem->opts.completed_ttl_ms);
      const char *values[] = {op->scope,  op->key,  op->token.hex,
                              op->num[0], op->body, op->too_large ? "false" : "true",
                              op->num[1]};
      return pg_send(op, idem->sql[SQL_COMPLETE], 7, values, on_complete);
    }
    case IDEM_ABORT: {
      const char *values[] = {op->scope, op->key, op->token.hex};
      return pg_send(op, idem->sql[SQL_ABORT], 3, values, on_abort);
    }
    case IDEM_INSTALL: {
      install_tx *it = keel__calloc(1, sizeof *it);
      if (it == NULL) return UV_ENOMEM;
      it->op = op;
      int rc = keel_pg_pool_transaction(idem->pool, KEEL_PG_READ_COMMITTED, install_body,
                                        install_done, it);
      if (rc != 0) keel__free(it);
      return rc;
    }
  }
  return UV_EINVAL;
}
