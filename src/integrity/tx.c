/* Transactions retried as a whole on serialization failures and deadlocks
 * (seed 001's retryDatabaseOperation): the retry runner drives
 * keel_pg_pool_transaction() and the SQLSTATE classifier decides. */
#include "core/alloc.h"
#include "integrity/integrity_internal.h"

typedef struct tx_job {
  keel_integrity *ig;
  keel_pg_isolation isolation;
  keel_pg_tx_fn body;
  keel_tx_done_cb done;
  void *data;
  keel_retry *runner;
} tx_job;

static void run_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  tx_job *job = data;
  job->body(tx, conn, job->data);
}

static void on_tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool;
  tx_job *job = data;
  keel_integrity *ig = job->ig;
  if (status != 0) {
    keel_sqlstate_class cls =
        status == KEEL_ECONN ? KEEL_SQLSTATE_CONNECTION : keel_sqlstate_classify(sqlstate);
    if (cls != KEEL_SQLSTATE_NONE) ig->stats.by_class[cls]++;
    /* The body's failed statement, or COMMIT, carries the SQLSTATE. */
    int mapped = sqlstate != NULL ? keel_sqlstate_error(sqlstate) : 0;
    if (mapped != 0 && (status == KEEL_EPG || mapped != KEEL_EPG)) status = mapped;
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
  if (rc != 0) keel_retry_report(runner, rc);
}

static void finished(keel_retry *runner, int status, unsigned attempts, void *data) {
  tx_job *job = data;
  keel_integrity *ig = job->ig;
  job->done(ig, status, attempts, job->data);
  keel_retry_close(runner, NULL, NULL);
  keel__free(job);
  keel__ig_end(ig, status);
}

int keel_tx_run(keel_integrity *ig, keel_pg_isolation isolation, const keel_retry_opts *opts,
                keel_pg_tx_fn body, keel_tx_done_cb done, void *data) {
  if (ig == NULL) return UV_EINVAL;
  if (body == NULL || done == NULL || isolation < KEEL_PG_READ_COMMITTED ||
      isolation > KEEL_PG_SERIALIZABLE)
    return keel__fail(ig->last_error, UV_EINVAL, "keel_tx_run: body, done and an isolation level");
  keel_retry_opts ro = opts != NULL ? *opts : ig->opts.retry;
  int rc = keel__ig_check_retry(ig, &ro);
  if (rc != 0) return rc;
  if (ro.classify == NULL) {
    ro.classify = keel_integrity_retryable;
    ro.classify_data = NULL;
  }
  tx_job *job = keel__calloc(1, sizeof *job);
  if (job == NULL) return keel__fail(ig->last_error, UV_ENOMEM, "out of memory");
  *job = (tx_job){ig, isolation, body, done, data, NULL};
  rc = keel__ig_begin(ig);
  if (rc == 0) {
    keel_retry *runner;
    rc = keel_retry_start(ig->loop, &ro, attempt, finished, job, &runner);
    if (rc != 0) {
      keel__ig_unbegin(ig);
      keel__fail(ig->last_error, rc, "cannot start the transaction");
    }
  }
  if (rc != 0) keel__free(job);
  return rc;
}
