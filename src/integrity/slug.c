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
  char **values; /* $1 base, $2 max length, the other columns, then the token */
  int nvalues;   /* including the token slot */
  char lock_key[512];
  /* The attempt's transaction: the lock statement sets it as a
   * transaction-local setting and the INSERT checks it, so the INSERT
   * never runs outside that transaction (a lost session, a pooler's other
   * server connection). No session state: works through any pooler. */
  char token[40];
  keel_pg *conn;
  int attempts;
  int pending;      /* statements queued whose callback is still due */
  int queue_error;  /* queueing a statement failed (no memory) */
  int first_status; /* the attempt's first failure */
  char first_sqlstate[6];
  int commit_status;
  bool inserted;       /* the INSERT returned its row */
  bool session_lost;   /* a statement ran on a session other than BEGIN's */
  bool needs_rollback; /* queueing failed after BEGIN was queued */
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
  if (status == KEEL_EINDOUBT) ig->stats.in_doubt++;
  job->cb(ig, status, status == 0 ? job->slug : NULL, job->data);
  slug_job_free(job);
  keel__ig_end(ig, status);
}

static void on_acquired(keel_pg_pool *pool, keel_pg *conn, int status, void *data);
static void send_rest(slug_job *job, keel_pg *conn);
static void on_end(keel_pg *conn, int status, const keel_pg_result *res, void *data);
static bool queue(slug_job *job, keel_pg *conn, const char *sql, int n, const char *const *values,
                  keel_pg_result_cb cb, bool cached);

/* Every statement's callback has run: the attempt's outcome is known. */
static void settle(slug_job *job) {
  keel_integrity *ig = job->ig;
  if (job->needs_rollback) {
    /* A half-queued attempt: never hand the connection back inside an open
     * transaction. ROLLBACK now, or drop the session when even that cannot
     * be queued (nothing is in flight on it any more). */
    job->needs_rollback = false;
    int err = job->queue_error;
    job->queue_error = 0;
    bool queued = queue(job, job->conn, "ROLLBACK", 0, NULL, on_end, false);
    job->queue_error = err;
    if (queued) return; /* settle() again after its callback */
    keel_pg_reset(job->conn);
  }
  keel_pg_pool_release(ig->pool, job->conn);
  job->conn = NULL;
  int outcome;
  if (job->queue_error != 0) {
    outcome = job->queue_error; /* rolled back (or the session reset) */
  } else if (job->session_lost) {
    /* A statement ran on a new session: the transaction of BEGIN died with
     * the old one, and nothing ran alone on the new one. */
    outcome = KEEL_ECONN;
    keel__fail(ig->last_error, KEEL_ECONN, "slug insert: the session was lost (rolled back)");
  } else if (job->inserted && job->commit_status == 0) {
    outcome = 0;
  } else if (job->inserted && job->commit_status == KEEL_EINDOUBT) {
    outcome = KEEL_EINDOUBT; /* COMMIT sent, connection lost: unknown */
  } else if (job->first_status != 0) {
    /* The first failure tells why (later statements only say 25P02). */
    outcome = job->first_status;
    if (outcome == KEEL_EPG) {
      int mapped = keel_sqlstate_error(job->first_sqlstate);
      if (mapped != 0) outcome = mapped;
    }
    if (outcome == KEEL_EINDOUBT) outcome = KEEL_ECONN; /* before the COMMIT: rolled back */
  } else {
    outcome = KEEL_ECONN; /* no row and no error: nothing was inserted */
  }
  if (outcome == KEEL_EUNIQUE) ig->stats.slug_collisions++;
  /* Retried: a unique violation (another base's suffix, a writer outside
   * keel), a serialization failure, a lock not available, and a lost
   * connection that certainly rolled the insert back (KEEL_ECONN). Never a
   * COMMIT lost in flight (KEEL_EINDOUBT). */
  bool retry = (outcome == KEEL_EUNIQUE || outcome == KEEL_ESERIALIZATION ||
                outcome == KEEL_ERETRYABLE || outcome == KEEL_ECONN) &&
               job->attempts < (int)ig->opts.slug_max_attempts && !ig->closing;
  if (retry) {
    ig->stats.retries++;
    int rc = keel_pg_pool_acquire(ig->pool, on_acquired, job);
    if (rc == 0) return;
    outcome = rc == KEEL_ECLOSING ? UV_ECANCELED : rc;
  }
  finish(job, outcome);
}

static void stmt_done(slug_job *job) {
  if (--job->pending == 0) settle(job);
}

/* Keeps the first failure of the attempt, with its SQLSTATE. */
static void record(slug_job *job, keel_pg *conn, int status, const keel_pg_result *res) {
  if (status == 0) return;
  const char *state = keel_pg_result_sqlstate(res);
  const char *message = keel_pg_result_error(res);
  if (message != NULL && strstr(message, "keel_slug_session_lost") != NULL)
    job->session_lost = true;
  if (state != NULL && strcmp(state, "25P01") == 0) job->session_lost = true;
  if (job->first_status != 0) return;
  job->first_status = status;
  snprintf(job->first_sqlstate, sizeof job->first_sqlstate, "%s", state != NULL ? state : "");
  keel__ig_record_error(job->ig, conn, status, res);
}

static void on_begin(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  slug_job *job = data;
  record(job, conn, status, res);
  stmt_done(job);
}

static void on_lock(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  record(data, conn, status, res);
  stmt_done(data);
}

static void on_insert(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  slug_job *job = data;
  if (status == 0 && keel_pg_result_nrows(res) > 0) {
    const char *slug = keel_pg_result_value(res, 0, 0);
    snprintf(job->slug, sizeof job->slug, "%s", slug ? slug : "");
    job->inserted = true;
  }
  record(job, conn, status, res);
  stmt_done(job);
}

static void on_commit(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  slug_job *job = data;
  job->commit_status = status;
  record(job, conn, status, res);
  stmt_done(job);
}

static void on_end(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  (void)status;
  (void)res;
  stmt_done(data);
}

/* Queues one statement of the attempt; a failure (no memory) is recorded. */
static bool queue(slug_job *job, keel_pg *conn, const char *sql, int n, const char *const *values,
                  keel_pg_result_cb cb, bool cached) {
  if (job->queue_error != 0) return false;
  int rc = cached ? keel_pg_query_cached(conn, sql, n, values, cb, job)
                  : keel_pg_query(conn, sql, n, values, cb, job);
  if (rc != 0) {
    job->queue_error = rc == KEEL_ECLOSING ? UV_ECANCELED : rc;
    keel__fail(job->ig->last_error, job->queue_error, "cannot queue the slug insert");
    return false;
  }
  job->pending++;
  return true;
}

/* The lock, the INSERT, COMMIT AND CHAIN and ROLLBACK, after BEGIN. Each is
 * bound to the transaction BEGIN opened: the INSERT inserts nothing outside
 * the transaction whose lock statement set the attempt's token, and COMMIT
 * AND CHAIN fails (25P01) outside a transaction block, so none of them
 * takes effect alone on a new session or another server connection. The
 * ROLLBACK ends the chained transaction (a no-op elsewhere). */
static void send_rest(slug_job *job, keel_pg *conn) {
  const char *lock_params[] = {job->lock_key, job->token};
  job->values[job->nvalues - 1] = job->token;
  /* The two-key form: its own lock space, apart from the user's
   * single-key advisory locks. */
  queue(job, conn,
        "SELECT pg_advisory_xact_lock(hashtext('keel_slug'), hashtext($1)), "
        "set_config('keel.slug_tx', $2, true)",
        2, lock_params, on_lock, true);
  bool inserted_queued = queue(job, conn, job->insert_sql, job->nvalues,
                               (const char *const *)job->values, on_insert, true);
  job->values[job->nvalues - 1] = NULL; /* job->token is not owned by values */
  queue(job, conn, "COMMIT AND CHAIN", 0, NULL, on_commit, false);
  if (job->queue_error == 0) {
    queue(job, conn, "ROLLBACK", 0, NULL, on_end, false);
    if (job->queue_error == 0) return;
  }
  /* Queueing failed half-way (no memory): the statements already queued
   * still call back into job, so it lives on until they have (settle()
   * then ends the transaction before the connection goes back). */
  job->needs_rollback = true;
  (void)inserted_queued;
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
  job->pending = 0;
  job->queue_error = 0;
  job->first_status = job->commit_status = 0;
  job->first_sqlstate[0] = '\0';
  job->inserted = job->session_lost = job->needs_rollback = false;
  ig->stats.attempts++;
  ig->stats.slug_round_trips++; /* the statements go out in one write */
  unsigned char b[16];
  keel__ig_random16(ig, b);
  for (int i = 0; i < 16; i++) snprintf(job->token + 2 * i, 3, "%02x", b[i]);
  /* One extra count keeps settle() from running before this returns. */
  job->pending = 1;
  if (queue(job, conn, "BEGIN", 0, NULL, on_begin, false)) send_rest(job, conn);
  job->pending--;
  if (job->pending == 0) settle(job); /* nothing was queued */
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
  keel__sql_addf(&b, ") VALUES ((CASE WHEN current_setting('keel.slug_tx', true) = $%d::text THEN ",
                 spec->count + 3);
  keel__sql_add(&b,
                "(WITH RECURSIVE gallop(n) AS (SELECT 1 UNION ALL SELECT n * 2 "
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
  /* Bound to the transaction of its BEGIN: anywhere else it fails and
   * inserts nothing (and keel knows the transaction is gone). */
  keel__sql_add(&b, " ELSE ('keel_slug_session_lost ' || pg_backend_pid())::int::text END)");
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
  job->nvalues = spec->count + 3;
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
