/* Transactions retried as a whole on serialization failures and deadlocks
 * (seed 001's retryDatabaseOperation): the retry runner drives
 * keel_pg_pool_transaction() and the SQLSTATE classifier decides. A COMMIT
 * lost in flight (KEEL_EINDOUBT) is reported, never retried blindly; with
 * an idempotency key the transaction also writes a row keyed by it, which
 * makes the retry safe: the key's row exists exactly when an attempt
 * committed. */
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "integrity/integrity_internal.h"

typedef struct tx_job {
  keel_integrity *ig;
  keel_pg_isolation isolation;
  keel_pg_tx_fn body;
  keel_tx_done_cb done;
  void *data;
  keel_retry *runner;
  keel_retry_classify_fn user_classify;
  void *user_classify_data;
  keel_retry_event_cb user_on_retry;
  char *key;        /* idempotency key (NULL: none) */
  char *key_sql;    /* INSERT INTO <table> (key) VALUES ($1) */
  bool key_exists;  /* this attempt's key insert met the committed row */
  bool in_doubt;    /* an attempt's COMMIT was lost in flight, unresolved */
  bool finished;    /* done has run; freed when pending drops to 0 */
  unsigned pending; /* keel's own statements whose callback is still due */
  char xid[32];     /* the attempt's transaction id ("" unknown) */
} tx_job;

static void tx_job_free(tx_job *job) {
  keel__free(job->key);
  keel__free(job->key_sql);
  keel__free(job);
}

/* keel's statements call back into job, possibly after done (a pool
 * close): job lives until the last of them. Returns true when job is gone
 * or finished. */
static bool statement_back(tx_job *job) {
  job->pending--;
  if (!job->finished) return false;
  if (job->pending == 0) tx_job_free(job);
  return true;
}

static void on_xid(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  tx_job *job = data;
  if (statement_back(job)) return;
  const char *xid = status == 0 ? keel_pg_result_value(res, 0, 0) : NULL;
  if (xid != NULL && strlen(xid) < sizeof job->xid) memcpy(job->xid, xid, strlen(xid) + 1);
}

static void on_key(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  tx_job *job = data;
  if (statement_back(job)) return;
  const char *state = status == KEEL_EPG ? keel_pg_result_sqlstate(res) : NULL;
  if (state != NULL && strcmp(state, "23505") == 0) {
    job->key_exists = true; /* an earlier attempt (or call) committed */
  } else if (status == 0 && job->in_doubt) {
    /* The insert waited for any transaction still holding the key and
     * found none committed: the lost COMMIT did not take effect. */
    job->in_doubt = false;
    job->ig->stats.in_doubt_resolved++;
  }
}

static void run_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  tx_job *job = data;
  job->key_exists = false;
  job->xid[0] = '\0';
  /* The transaction's id, so that a COMMIT lost in flight can be looked
   * up afterwards (pg_xact_status). */
  int xrc = keel_pg_query(conn, KEEL__XID_SQL, 0, NULL, on_xid, job);
  if (xrc != 0) {
    keel_pg_tx_finish(tx, xrc);
    return;
  }
  job->pending++;
  if (job->key != NULL) {
    const char *values[] = {job->key};
    int rc = keel_pg_query_cached(conn, job->key_sql, 1, values, on_key, job);
    if (rc != 0) {
      keel_pg_tx_finish(tx, rc);
      return;
    }
    job->pending++;
  }
  job->body(tx, conn, job->data);
}

static void on_resolved(keel_integrity *ig, int outcome, void *data) {
  tx_job *job = data;
  if (outcome == 0) {
    /* The lost COMMIT did commit. */
    job->in_doubt = false;
    keel_retry_report(job->runner, 0);
    return;
  }
  if (outcome == KEEL_ECONN) {
    /* It did not: as certain as a lost connection before the COMMIT. */
    ig->stats.by_class[KEEL_SQLSTATE_CONNECTION]++;
    keel__fail(ig->last_error, KEEL_ECONN, "transaction: COMMIT lost in flight and not committed");
    keel_retry_report(job->runner, KEEL_ECONN);
    return;
  }
  job->in_doubt = true;
  ig->stats.by_class[KEEL_SQLSTATE_IN_DOUBT]++;
  keel__fail(ig->last_error, KEEL_EINDOUBT, "transaction: COMMIT lost in flight, outcome unknown");
  keel_retry_report(job->runner, KEEL_EINDOUBT);
}

static void on_tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool;
  tx_job *job = data;
  keel_integrity *ig = job->ig;
  if (status == KEEL_EINDOUBT && !(job->key != NULL && job->key_exists) &&
      keel__ig_xact_check(ig, job->xid, on_resolved, job) == 0)
    return; /* on_resolved() reports */
  if (job->key != NULL && job->key_exists) {
    /* The key's row was committed before: by an earlier attempt whose
     * COMMIT was lost in flight, or by an earlier call with the same key.
     * The work is done; this attempt's statements were rolled back. */
    if (job->in_doubt) ig->stats.in_doubt_resolved++;
    job->in_doubt = false;
    ig->stats.already_committed++;
    keel_retry_report(job->runner, 0);
    return;
  }
  if (status != 0) {
    keel__ig_set_sqlstate(ig, sqlstate);
    keel_sqlstate_class cls = status == KEEL_ECONN      ? KEEL_SQLSTATE_CONNECTION
                              : status == KEEL_EINDOUBT ? KEEL_SQLSTATE_IN_DOUBT
                                                        : keel_sqlstate_classify(sqlstate);
    if (cls != KEEL_SQLSTATE_NONE) ig->stats.by_class[cls]++;
    /* The first failed statement (or COMMIT) carries the SQLSTATE. A COMMIT
     * lost in flight stays KEEL_EINDOUBT whatever came with it. */
    if (status != KEEL_EINDOUBT) {
      int mapped = sqlstate != NULL ? keel_sqlstate_error(sqlstate) : 0;
      if (mapped != 0 && (status == KEEL_EPG || mapped != KEEL_EPG)) status = mapped;
    }
    if (status == KEEL_EINDOUBT) job->in_doubt = true;
    keel__fail(ig->last_error, status, "transaction: %s", keel_pg_pool_last_error(ig->pool));
  }
  keel_retry_report(job->runner, status);
}

static void attempt(keel_retry *runner, unsigned n, void *data) {
  tx_job *job = data;
  keel_integrity *ig = job->ig;
  job->runner = runner;
  if (n > 1) ig->stats.retries++;
  if (ig->closing) {
    keel_retry_report(runner, UV_ECANCELED);
    return;
  }
  ig->stats.attempts++;
  int rc = keel_pg_pool_transaction(ig->pool, job->isolation, run_body, on_tx_done, job);
  if (rc != 0) keel_retry_report(runner, rc == KEEL_ECLOSING ? UV_ECANCELED : rc);
}

static int tx_classify(int status, void *data) {
  tx_job *job = data;
  /* Unknown outcome: retried only when the idempotency row tells. */
  if (status == KEEL_EINDOUBT) return job->key != NULL;
  return job->user_classify != NULL ? job->user_classify(status, job->user_classify_data)
                                    : keel_integrity_retryable(status, NULL);
}

static void tx_on_retry(keel_retry *runner, unsigned next, int status, uint64_t delay_ms,
                        void *data) {
  tx_job *job = data;
  job->user_on_retry(runner, next, status, delay_ms, job->data);
}

static void finished(keel_retry *runner, int status, unsigned attempts, void *data) {
  tx_job *job = data;
  keel_integrity *ig = job->ig;
  /* A failure after an unresolved lost COMMIT: that COMMIT may have taken
   * effect, so the outcome is unknown, not this failure. */
  if (status != 0 && job->in_doubt) {
    status = KEEL_EINDOUBT;
    keel__fail(ig->last_error, status, "transaction: a COMMIT was lost in flight");
  }
  if (status == KEEL_EINDOUBT) ig->stats.in_doubt++;
  job->finished = true;
  job->done(ig, status, attempts, job->data);
  keel_retry_close(runner, NULL, NULL);
  if (job->pending == 0) tx_job_free(job);
  keel__ig_end(ig, status);
}

/* 32 hex digits from the system's random source. */
static void make_key(char *out, size_t cap) {
  unsigned char b[16];
  if (uv_random(NULL, NULL, b, sizeof b, 0, NULL) != 0) {
    static uint64_t counter;
    uint64_t t = uv_hrtime(), c = ++counter;
    memcpy(b, &t, 8);
    memcpy(b + 8, &c, 8);
  }
  size_t n = 0;
  for (int i = 0; i < 16 && n + 3 <= cap; i++)
    n += (size_t)snprintf(out + n, cap - n, "%02x", b[i]);
}

static int start_tx(keel_integrity *ig, keel_pg_isolation isolation, const keel_retry_opts *opts,
                    bool idempotent, const char *key, keel_pg_tx_fn body, keel_tx_done_cb done,
                    void *data) {
  if (ig == NULL) return UV_EINVAL;
  if (ig->closing) return keel__fail(ig->last_error, KEEL_ECLOSING, "the context is closing");
  if (body == NULL || done == NULL || isolation < KEEL_PG_READ_COMMITTED ||
      isolation > KEEL_PG_SERIALIZABLE)
    return keel__fail(ig->last_error, UV_EINVAL, "keel_tx_run: body, done and an isolation level");
  if (key != NULL && (key[0] == '\0' || strlen(key) > 200))
    return keel__fail(ig->last_error, UV_EINVAL, "idempotency key: 1..200 bytes");
  keel_retry_opts ro = opts != NULL ? *opts : ig->opts.retry;
  int rc = keel__ig_check_retry(ig, &ro);
  if (rc != 0) return rc;
  tx_job *job = keel__calloc(1, sizeof *job);
  if (job == NULL) return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  job->ig = ig;
  job->isolation = isolation;
  job->body = body;
  job->done = done;
  job->data = data;
  job->user_classify = ro.classify;
  job->user_classify_data = ro.classify_data;
  job->user_on_retry = ro.on_retry;
  bool failed = false;
  if (idempotent) {
    char made[40];
    if (key == NULL) make_key(made, sizeof made);
    job->key = keel__strdup(key != NULL ? key : made);
    keel__sql b = {0};
    keel__sql_add(&b, "INSERT INTO ");
    keel__sql_ident(&b, ig->idempotency_table, true);
    keel__sql_add(&b, " (key) VALUES ($1)");
    job->key_sql = b.text;
    failed = job->key == NULL || b.failed;
  }
  ro.classify = tx_classify;
  ro.classify_data = job;
  if (ro.on_retry != NULL) ro.on_retry = tx_on_retry;
  rc = failed ? keel__fail(ig->last_error, UV_ENOMEM, "out of memory") : keel__ig_begin(ig);
  if (rc == 0) {
    keel_retry *runner;
    rc = keel_retry_start(ig->loop, &ro, attempt, finished, job, &runner);
    if (rc != 0) {
      keel__ig_unbegin(ig);
      keel__fail(ig->last_error, rc, "cannot start the transaction");
    }
  }
  if (rc != 0) tx_job_free(job);
  return rc;
}

int keel_tx_run(keel_integrity *ig, keel_pg_isolation isolation, const keel_retry_opts *opts,
                keel_pg_tx_fn body, keel_tx_done_cb done, void *data) {
  return start_tx(ig, isolation, opts, false, NULL, body, done, data);
}

int keel_tx_run_idempotent(keel_integrity *ig, keel_pg_isolation isolation,
                           const keel_retry_opts *opts, const char *key, keel_pg_tx_fn body,
                           keel_tx_done_cb done, void *data) {
  return start_tx(ig, isolation, opts, true, key, body, done, data);
}

/* ---- the idempotency table ------------------------------------------------- */

typedef struct key_install {
  keel_integrity_done_cb cb;
  void *data;
  char *sql[2];
  keel_pg_tx *tx;
  int step;
} key_install;

static void key_install_step(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  key_install *ki = data;
  (void)res;
  if (status != 0 || ki->step == 2) {
    keel_pg_tx_finish(ki->tx, status);
    return;
  }
  int rc = keel_pg_query(conn, ki->sql[ki->step++], 0, NULL, key_install_step, ki);
  if (rc != 0) keel_pg_tx_finish(ki->tx, rc);
}

static void key_install_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  key_install *ki = data;
  ki->tx = tx;
  ki->step = 0;
  key_install_step(conn, 0, NULL, ki);
}

static void key_install_done(keel_integrity *ig, int status, unsigned attempts, void *data) {
  (void)attempts;
  key_install *ki = data;
  keel_integrity_done_cb cb = ki->cb;
  void *cb_data = ki->data;
  keel__free(ki->sql[0]);
  keel__free(ki->sql[1]);
  keel__free(ki);
  if (cb != NULL) cb(ig, status, cb_data);
}

int keel_tx_idempotency_install(keel_integrity *ig, keel_integrity_done_cb cb, void *data) {
  if (ig == NULL) return UV_EINVAL;
  if (ig->closing) return keel__fail(ig->last_error, KEEL_ECLOSING, "the context is closing");
  key_install *ki = keel__calloc(1, sizeof *ki);
  if (ki == NULL) return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  ki->cb = cb;
  ki->data = data;
  keel__sql a = {0}, b = {0};
  keel__sql_add(&a, "SELECT pg_advisory_xact_lock(hashtext('keel_tx_idempotency_install'))");
  keel__sql_add(&b, "CREATE TABLE IF NOT EXISTS ");
  keel__sql_ident(&b, ig->idempotency_table, true);
  keel__sql_add(&b, " (key text PRIMARY KEY, committed_at timestamptz NOT NULL DEFAULT now())");
  ki->sql[0] = a.text;
  ki->sql[1] = b.text;
  int rc = a.failed || b.failed ? keel__fail(ig->last_error, UV_ENOMEM, "out of memory")
                                : keel_tx_run(ig, KEEL_PG_READ_COMMITTED, NULL, key_install_body,
                                              key_install_done, ki);
  if (rc != 0) {
    keel__free(ki->sql[0]);
    keel__free(ki->sql[1]);
    keel__free(ki);
  }
  return rc;
}
