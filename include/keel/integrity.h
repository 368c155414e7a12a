/*
 * keel/integrity.h — the data-integrity patterns of the seeds, on any table
 * of your own: versioned (optimistic) updates that tell "not found" from
 * "conflict" in one round trip, an optimistic retry loop (read, mutate,
 * versioned update, back off, repeat), upserts with a version, a version
 * column installer, atomic unique slugs, a SQLSTATE classifier for the
 * retry runner, and transactions retried as a whole on serialization
 * failures and deadlocks.
 *
 * Everything runs on a keel_pg_pool through a context that keeps the
 * statistics and the last error:
 *
 *     keel_integrity *ig;
 *     keel_integrity_new(loop, pool, NULL, &ig);
 *     const char *cols[] = {"name"}, *vals[] = {"New name"};
 *     keel_occ_spec s = {.table = "business_cards", .key_column = "id",
 *                        .key_value = "42", .version_column = "version",
 *                        .expected_version = "3", .set_columns = cols,
 *                        .set_values = vals, .set_count = 1};
 *     keel_occ_update(ig, &s, on_saved, req);
 *     // on_saved(ig, 0, "4", false, req)              saved, new version 4
 *     // on_saved(ig, KEEL_ECONFLICT, "5", false, req) 409, current version 5
 *     // on_saved(ig, KEEL_ENOTFOUND, NULL, false, req) 404
 *     ...
 *     keel_integrity_close(ig, NULL, NULL);    // before keel_pg_pool_close()
 *
 * Identifiers (tables, columns) are always quoted with keel_pg_quote_ident();
 * values always travel as statement parameters, never in the SQL text.
 * Unless a function says "thread-safe", call it from the loop thread only.
 *
 * Outcomes under faults: a write whose reply arrived is reported as it is;
 * KEEL_ECONN means the write certainly did not take effect (safe to retry);
 * KEEL_EINDOUBT means it was sent and the connection was lost before the
 * reply: it may or may not have taken effect. keel never retries
 * KEEL_EINDOUBT blindly: keel_occ_retry() and keel_tx_run_idempotent() find
 * out where they can, everything else reports it (docs/integrity.md says
 * what to do then).
 *
 * Callbacks: never called inside the call that caused them (always a later
 * loop iteration); every accepted operation's callback runs exactly once;
 * keel_integrity_close() may be called from inside any of them.
 */
#ifndef KEEL_INTEGRITY_H
#define KEEL_INTEGRITY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"
#include "keel/pg.h"
#include "keel/retry.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- SQLSTATE classes (no I/O) -------------------------------------------- */

/* What a SQLSTATE means for whoever decides to retry. */
typedef enum keel_sqlstate_class {
  KEEL_SQLSTATE_NONE = 0,   /* NULL, malformed or "00000": no error */
  KEEL_SQLSTATE_RETRY_TX,   /* 40001 serialization failure, 40P01 deadlock:
                               retry the whole transaction */
  KEEL_SQLSTATE_RETRY,      /* 55P03 lock not available: retry */
  KEEL_SQLSTATE_CONNECTION, /* class 08, 57P01..57P03 (shutdown): retry
                               after the reconnect */
  KEEL_SQLSTATE_UNIQUE,     /* 23505 unique violation: retried only where
                               the caller says so (slugs) */
  KEEL_SQLSTATE_CONSTRAINT, /* other class 23 (check, foreign key, not
                               null, exclusion): not retryable */
  KEEL_SQLSTATE_OTHER,      /* anything else: not retryable */
  KEEL_SQLSTATE_IN_DOUBT,   /* 08007 transaction resolution unknown (and a
                               COMMIT or write lost in flight): never
                               retried blindly */
  KEEL_SQLSTATE_CLASS_COUNT /* number of classes (array size) */
} keel_sqlstate_class;

/*
 * Classifies a SQLSTATE (five characters, e.g. "40001"). Any string is
 * accepted: NULL, a wrong length or "00000" give KEEL_SQLSTATE_NONE.
 * Thread-safe.
 */
KEEL_EXTERN keel_sqlstate_class keel_sqlstate_classify(const char *sqlstate);

/*
 * The keel error for a SQLSTATE: KEEL_ESERIALIZATION (40001, 40P01),
 * KEEL_ERETRYABLE (55P03), KEEL_EINDOUBT (08007), KEEL_ECONN (the rest of
 * class 08, 57P01..57P03), KEEL_EUNIQUE (23505), KEEL_EPG (anything else),
 * 0 for KEEL_SQLSTATE_NONE.
 * Thread-safe.
 */
KEEL_EXTERN int keel_sqlstate_error(const char *sqlstate);

/*
 * Maps the status of a keel_pg result callback to the error worth reporting
 * to a retry runner: KEEL_EPG becomes keel_sqlstate_error() of the
 * result's SQLSTATE (KEEL_EPG when it has none); any other status is
 * returned unchanged. res may be NULL. Use it as
 * `keel_retry_done(r, keel_sqlstate_map(status, res))`. Thread-safe.
 */
KEEL_EXTERN int keel_sqlstate_map(int status, const keel_pg_result *res);

/* Name of a class ("none", "retry_tx", "retry", "connection", "unique",
 * "constraint", "other", "in_doubt"; "unknown" out of range). Static string.
 * Thread-safe. */
KEEL_EXTERN const char *keel_sqlstate_class_name(keel_sqlstate_class cls);

/*
 * A keel_retry_classify_fn (use it as keel_retry_opts.classify): nonzero
 * for KEEL_ESERIALIZATION, KEEL_ERETRYABLE, KEEL_ECONN and UV_ETIMEDOUT;
 * for KEEL_EUNIQUE only when classify_data points to a bool that is true;
 * 0 for everything else (KEEL_EINDOUBT, KEEL_EPG, KEEL_ECONFLICT,
 * KEEL_ENOTFOUND, KEEL_EABORTED, UV_ECANCELED, ...). Report
 * keel_sqlstate_map(status, res) rather than a bare KEEL_EPG so that the
 * SQLSTATE counts. Thread-safe.
 *
 * KEEL_ECONN is retryable because it means the statement certainly did not
 * take effect (never sent, or its transaction rolled back with the
 * session). KEEL_EINDOUBT (a COMMIT or autocommit write lost in flight, or
 * 08007) is not: retrying it could apply the work twice.
 */
KEEL_EXTERN int keel_integrity_retryable(int status, void *classify_data);

/* ---- slugs (no I/O) ---------------------------------------------------------- */

/*
 * Turns a name into a slug: lower-case ASCII letters and digits, one '-'
 * between words (any run of other characters is a word break; none leads or
 * trails), the Latin-1 and Latin Extended-A letters transliterated from
 * UTF-8 ("Crème Brûlée" → "creme-brulee", "Straße" → "strasse", "Œuvre" →
 * "oeuvre", "Łódź" → "lodz"), other scripts and invalid UTF-8 dropped. At
 * most max_len bytes: a name that does not fit is cut at the last word
 * boundary that fits, or inside the first word when it alone is too long.
 * Never empty: "item" (cut to max_len) when nothing is left.
 *
 * name     NUL-terminated, any bytes; not retained.
 * out      receives the NUL-terminated slug; cap must exceed max_len.
 *
 * Returns the slug's length (1..max_len), UV_EINVAL (NULL name or out,
 * max_len 0) or UV_ENOBUFS (cap <= max_len); out is untouched on error.
 * Thread-safe, no allocation.
 */
KEEL_EXTERN int keel_slugify(const char *name, size_t max_len, char *out, size_t cap);

/* ---- the context ------------------------------------------------------------- */

typedef struct keel_integrity keel_integrity;

typedef struct keel_integrity_opts {
  keel_retry_opts retry;         /* default policy of keel_occ_retry() and
                                    keel_tx_run(): 5 attempts, full-jitter
                                    exponential backoff from 20 ms x2, capped at
                                    1000 ms. retry.classify is honoured by
                                    keel_tx_run() (NULL: keel_integrity_retryable)
                                    and by keel_occ_retry() for anything but
                                    KEEL_ECONFLICT, which it always retries. */
  unsigned slug_max_attempts;    /* inserts per keel_slug_insert() when a unique
                                    violation, a serialization failure or a
                                    lost connection (KEEL_ECONN) interferes;
                                    default 5, >= 1 */
  const char *idempotency_table; /* table of keel_tx_run_idempotent()'s rows;
                                    NULL (default): "keel_tx_idempotency";
                                    "schema.table" allowed; copied */
  uint64_t reserved_[8];         /* ABI room: zero (opts_init does); never set */
} keel_integrity_opts;

/* The default idempotency table (see keel_tx_idempotency_install()). */
#define KEEL_TX_IDEMPOTENCY_TABLE "keel_tx_idempotency"

/* Fills opts with the defaults above (zeroing the whole struct first).
 * NULL: no-op. Thread-safe. */
KEEL_EXTERN void keel_integrity_opts_init(keel_integrity_opts *opts);

/*
 * Creates a context on a pool.
 *
 * pool   not owned: it must outlive the context (close the context first;
 *        its operations end before its close callback runs).
 * opts   may be NULL for the defaults; copied.
 *
 * Returns 0 and sets *out, UV_EINVAL (NULL loop, pool or out; retry with
 * max_attempts 0 or a backoff keel_backoff_validate() rejects;
 * slug_max_attempts 0; an invalid idempotency_table) or UV_ENOMEM. *out is
 * untouched on failure. Loop thread only.
 */
KEEL_EXTERN int keel_integrity_new(uv_loop_t *loop, keel_pg_pool *pool,
                                   const keel_integrity_opts *opts, keel_integrity **out);

/* ---- versioned updates -------------------------------------------------------- */

typedef enum keel_version_kind {
  KEEL_VERSION_INTEGER = 0, /* an integer column (bigint, integer),
                               incremented by each write */
  KEEL_VERSION_UUID         /* a uuid column: gen_random_uuid() per write
                               (seed 004) */
} keel_version_kind;

/*
 * Names the row and the change. All strings are borrowed for the duration
 * of the call only (keel copies what it needs).
 */
typedef struct keel_occ_spec {
  const char *table;          /* "table" or "schema.table" (quoted for you) */
  const char *key_column;     /* must identify one row (primary key/unique) */
  const char *key_value;      /* text, cast by PostgreSQL to the key's type */
  const char *version_column; /* integer or uuid column, see version_kind */
  keel_version_kind version_kind;
  const char *expected_version;   /* the version the caller read, as text */
  const char *const *set_columns; /* columns to write (not the key or the
                                     version column, no duplicates) */
  const char *const *set_values;  /* text values; a NULL entry writes SQL NULL */
  int set_count;                  /* 0..60 (0: only the version changes) */
  const char *soft_delete_column; /* optional: rows where it IS NOT NULL count
                                     as absent (KEEL_ENOTFOUND) ... */
  bool include_deleted;           /* ... unless this is true */
} keel_occ_spec;

/*
 * The outcome of keel_occ_update() / keel_occ_upsert():
 *   0               written; version is the new version;
 *   KEEL_ECONFLICT  the row exists with another version; version is the
 *                   current one (the seed's 409 with currentVersion);
 *   KEEL_ENOTFOUND  no such row (or only a soft-deleted one); version NULL;
 *   KEEL_EINDOUBT   sent, connection lost before the reply: the write may
 *                   or may not have happened (read the row to find out);
 *   KEEL_ECONN      the connection was lost before the statement could
 *                   take effect, or during an update's read of the row
 *                   after it wrote nothing (nothing was written);
 *   KEEL_ESERIALIZATION, KEEL_ERETRYABLE, KEEL_EUNIQUE, KEEL_EPG (other SQL
 *   errors, e.g. a check or type error), UV_ETIMEDOUT, UV_ECANCELED (pool
 *   closed): version NULL; the server's text is in
 *   keel_integrity_last_error() and the SQLSTATE in
 *   keel_integrity_last_sqlstate().
 * inserted is true only for an upsert that created the row. version is
 * valid during the call only.
 */
typedef void (*keel_occ_cb)(keel_integrity *ig, int status, const char *version, bool inserted,
                            void *data);

/*
 * Writes spec's columns and a new version to the row whose key is
 * key_value, only if its version is still expected_version: one UPDATE,
 * atomic, one round trip when it writes; when it writes nothing, a read of
 * the row (a second round trip) tells KEEL_ECONFLICT (with the current
 * version) from KEEL_ENOTFOUND, and a row that has the expected version
 * again by then gets the UPDATE once more (at most 3 times; the SQL is in
 * docs/integrity.md). A table with keel_occ_install()'s trigger is bumped
 * once, not twice.
 *
 * cb     required; called exactly once on a later loop iteration.
 * data   passed to cb; owned by the caller.
 *
 * Returns 0, or: UV_EINVAL (NULL ig, spec or cb; missing table, key
 * column, key value, version column or expected version; a bad identifier;
 * set_count outside 0..60; the key or version column among set_columns; a
 * duplicate set column; reason in last_error), UV_ENOMEM, KEEL_ECLOSING
 * (context closing), or the errors of keel_pg_pool_query() (KEEL_EFULL).
 * On error cb is never called. Loop thread only.
 */
KEEL_EXTERN int keel_occ_update(keel_integrity *ig, const keel_occ_spec *spec, keel_occ_cb cb,
                                void *data);

/*
 * Inserts the row when the key is absent (version 1, or a new UUID) and
 * does the versioned update of keel_occ_update() when it is present (seed
 * 001 upsert_personal_info_optimistic), in one statement (INSERT ... ON
 * CONFLICT (key) DO UPDATE ... WHERE version = expected). The key column
 * needs a unique index or primary key. expected_version NULL means "I
 * expect no row": a present row is then KEEL_ECONFLICT with its version.
 * A soft-deleted row still occupies the key: KEEL_ENOTFOUND unless
 * include_deleted. cb's inserted tells which branch ran.
 *
 * Races: of concurrent first upserts of one key exactly one inserts; the
 * others get KEEL_ECONFLICT with the winner's version (keel re-sends the
 * statement, at most 3 times, when the winner's row committed after its
 * snapshot), never KEEL_ENOTFOUND for a row that exists. Errors as
 * keel_occ_update() (expected_version may be NULL). Loop thread only.
 */
KEEL_EXTERN int keel_occ_upsert(keel_integrity *ig, const keel_occ_spec *spec, keel_occ_cb cb,
                                void *data);

/*
 * The user's step of an optimistic retry. row holds the current row (one
 * row, every column: keel_pg_result_get(row, 0, "col")); give each of the
 * spec's set_columns its value and return 0, or return a negative error
 * (e.g. KEEL_EABORTED) to stop: done then gets that error (a positive
 * return stops with KEEL_EABORTED). Two ways to give a value:
 *   keel_occ_set_value(ig, i, text)  copies text at once: a local buffer
 *                                    is fine (use this one);
 *   values_out[i] = text             the pointer is read after mutate
 *                                    returns: only for text that outlives
 *                                    the call (static, owned by data, or a
 *                                    value of row).
 * NULL writes SQL NULL. May run several times: keep it free of side
 * effects. Must not close the context.
 */
typedef int (*keel_occ_mutate_fn)(keel_integrity *ig, const keel_pg_result *row,
                                  const char **values_out, void *data);

/*
 * Inside a keel_occ_mutate_fn only: sets the value of set_columns[index] to
 * a copy of value (NULL: SQL NULL), replacing values_out[index]. value is
 * borrowed for the call. Returns 0, UV_EINVAL (NULL ig, not inside mutate,
 * index outside 0..set_count-1) or UV_ENOMEM (the mutate callback may
 * return it to stop). Loop thread only.
 */
KEEL_EXTERN int keel_occ_set_value(keel_integrity *ig, int index, const char *value);

/*
 * The end of an optimistic retry: status as keel_occ_cb (KEEL_ECONFLICT
 * after the last attempt, with the current version), or the mutate
 * callback's error; version as keel_occ_cb (the new version after 0, the
 * current one with KEEL_ECONFLICT, NULL otherwise, KEEL_EINDOUBT
 * included); attempts counts the attempts started.
 */
typedef void (*keel_occ_retry_cb)(keel_integrity *ig, int status, const char *version,
                                  unsigned attempts, void *data);

/*
 * Read → mutate → versioned update, repeated on KEEL_ECONFLICT with the
 * retry policy (seed 001 retryOptimisticLock, seed 004
 * withOptimisticRetry: maxRetries = max_attempts - 1, retryDelay /
 * backoffMultiplier / maxDelay = the backoff). The read is
 * `SELECT * FROM table WHERE key = $1 [AND soft_delete IS NULL]`. Each
 * attempt is one READ COMMITTED transaction on one pooled connection:
 * its id (pg_current_xact_id()), the read, mutate, the versioned update,
 * then COMMIT (ROLLBACK on a conflict). With KEEL_VERSION_UUID keel
 * chooses the new UUID. KEEL_ENOTFOUND and the mutate callback's errors
 * end the loop at once; other errors are retried when opts->classify says
 * so (NULL: keel_integrity_retryable; a connection lost before the COMMIT
 * is KEEL_ECONN); opts->on_retry gets data, not keel's own state.
 *
 * A COMMIT lost in flight (sent, connection lost before the reply): keel
 * asks pg_xact_status() about the attempt's transaction until the answer
 * is final (every 20 ms, at most about 5 s): committed → done gets 0 (and
 * the new version); aborted → retried like KEEL_ECONN; no answer (the
 * transaction id's reply was lost too, still in progress, closing) → done
 * gets KEEL_EINDOUBT: the write may have happened. KEEL_EINDOUBT is never
 * retried, whatever classify says.
 *
 * spec   copied; expected_version and set_values are ignored (they come
 *        from the read and from mutate).
 * opts   NULL: the context's opts.retry; copied.
 * mutate, done   required; data is passed to both.
 *
 * Returns 0 (done is called exactly once, on a later loop iteration), or
 * UV_EINVAL (as keel_occ_update(), NULL mutate or done, a bad policy),
 * UV_ENOMEM or KEEL_ECLOSING; nothing is called then. Loop thread only.
 */
KEEL_EXTERN int keel_occ_retry(keel_integrity *ig, const keel_occ_spec *spec,
                               const keel_retry_opts *opts, keel_occ_mutate_fn mutate,
                               keel_occ_retry_cb done, void *data);

/* Completion of keel_occ_install(): 0 or the error (see there). */
typedef void (*keel_integrity_done_cb)(keel_integrity *ig, int status, void *data);

/*
 * Prepares a table for versioned updates (seed 001): adds the version
 * column if it is missing (bigint NOT NULL DEFAULT 1, or uuid NOT NULL
 * DEFAULT gen_random_uuid()) and a BEFORE UPDATE trigger that bumps it on
 * every UPDATE that leaves it unchanged, so plain UPDATEs elsewhere bump it
 * too while keel_occ_update(), which sets it, is never bumped twice. Runs
 * as one transaction under an advisory lock (concurrent installers take
 * turns; no window without the trigger), retried on deadlocks. Idempotent.
 * The trigger function keel_occ_bump_<table>_<hash> lives in the table's
 * schema, the trigger is keel_occ_<column>_<hash>: the table (column) name
 * cut to 24 (32) bytes on a UTF-8 character boundary and an 8-digit hash of
 * the full names, so every generated name fits PostgreSQL's 63 bytes for
 * any valid table name, non-ASCII included.
 *
 * table, column   borrowed for the call; "schema.table" allowed.
 * cb              may be NULL; called once on a later loop iteration with 0,
 *                 KEEL_EPG (e.g. no such table; text in last_error),
 *                 KEEL_ECONN, UV_ECANCELED, ...
 *
 * Returns 0, UV_EINVAL (NULL ig, bad identifiers, unknown kind),
 * UV_ENOMEM or KEEL_ECLOSING; cb is not called then. Loop thread only.
 */
KEEL_EXTERN int keel_occ_install(keel_integrity *ig, const char *table, const char *column,
                                 keel_version_kind kind, keel_integrity_done_cb cb, void *data);

/* ---- unique slugs ----------------------------------------------------------------- */

typedef struct keel_slug_spec {
  const char *table;
  const char *slug_column;    /* needs a unique index */
  const char *name;           /* turned into the base slug by keel_slugify() */
  size_t max_len;             /* 8..100; 0 = 60 */
  const char *const *columns; /* the row's other columns (not slug_column) */
  const char *const *values;  /* their text values; NULL writes SQL NULL */
  int count;                  /* 0..60 */
} keel_slug_spec;

/*
 * The end of keel_slug_insert(): 0 and the slug the row got (valid during
 * the call), or an error and NULL: KEEL_EUNIQUE when slug_max_attempts
 * inserts all met a unique violation (only writers outside keel can cause
 * that), KEEL_ECONN (connections lost before the COMMIT in every attempt:
 * nothing was inserted), KEEL_EINDOUBT (the COMMIT was sent and the
 * connection lost before its reply: the row may or may not exist; keel
 * does not retry), KEEL_EPG (e.g. a NOT NULL column missing; text in
 * last_error), UV_ETIMEDOUT, UV_ENOMEM, UV_ECANCELED (closed).
 */
typedef void (*keel_slug_cb)(keel_integrity *ig, int status, const char *slug, void *data);

/*
 * Inserts a row with the first free slug for name: the base slug, then
 * base-2, base-3, ... (the base shortened so that the suffix fits
 * max_len), atomically under concurrency (seeds 000/001
 * create_business_card_atomic). Creators of the same base take turns on a
 * transaction-scoped advisory lock; BEGIN, the lock, the INSERT (which
 * finds the free suffix in O(log k) index probes), COMMIT AND CHAIN and
 * ROLLBACK are pipelined in one write: one round trip per insert, counted
 * in keel_integrity_stats.slug_round_trips. Every statement is bound to
 * the session of its BEGIN (the INSERT checks pg_backend_pid(); COMMIT AND
 * CHAIN fails outside a transaction block), so none takes effect alone on
 * a new session after a lost connection, with or without pipelining.
 * Fifty concurrent creators of one name get fifty distinct slugs and no
 * unique violation. A unique violation caused by another base's suffix or
 * by a writer outside keel, and a lost connection before the COMMIT, are
 * retried (stats.slug_collisions counts the former), up to
 * opts.slug_max_attempts inserts.
 *
 * spec   borrowed for the call (copied). cb required; data passed to it.
 *
 * Returns 0 (cb is called exactly once, on a later loop iteration), or
 * UV_EINVAL (NULL ig, spec, table, slug_column, name or cb; bad
 * identifiers; max_len outside 8..100; count outside 0..60; slug_column
 * among columns), UV_ENOMEM, KEEL_ECLOSING or the errors of
 * keel_pg_pool_acquire(); cb is not called then. Loop thread only.
 */
KEEL_EXTERN int keel_slug_insert(keel_integrity *ig, const keel_slug_spec *spec, keel_slug_cb cb,
                                 void *data);

/* ---- transactions with retry ------------------------------------------------------- */

/* The end of keel_tx_run(): the final status and the attempts made. */
typedef void (*keel_tx_done_cb)(keel_integrity *ig, int status, unsigned attempts, void *data);

/*
 * Runs body inside BEGIN ISOLATION LEVEL <isolation> ... COMMIT on one
 * pooled connection (keel_pg_pool_transaction(): the body issues
 * statements with keel_pg_query(conn, ...) and ends with
 * keel_pg_tx_done(tx, 0) to commit or keel_pg_tx_done(tx, err) to roll
 * back). Any failure rolls back; the whole transaction (body included) is
 * run again when the policy's classifier says so (NULL classify:
 * keel_integrity_retryable: 40001, 40P01, 55P03, KEEL_ECONN), as seed
 * 001's retryDatabaseOperation. The body may therefore run several times:
 * keep it free of side effects outside the database. The classifier sees
 * the first failing statement's SQLSTATE (a 40001 in the second of three
 * pipelined statements is 40001, not the 25P02 of the third).
 *
 * A COMMIT lost in flight: keel pipelines `SELECT pg_current_xact_id()`
 * in front of the body and asks pg_xact_status() about that transaction
 * until the answer is final (every 20 ms, at most about 5 s): committed →
 * done gets 0; aborted → retried like KEEL_ECONN; no answer → done gets
 * KEEL_EINDOUBT (may or may not have committed), never retried whatever
 * the classifier says (keel_tx_run_idempotent() retries even that case
 * safely).
 *
 * opts   NULL: the context's opts.retry; copied. opts->on_retry gets data.
 * body, done   required; data is passed to both.
 *
 * done gets 0 after a COMMIT, KEEL_EINDOUBT, or the last failure mapped by
 * keel_sqlstate_map() (KEEL_ESERIALIZATION, KEEL_ERETRYABLE, KEEL_ECONN,
 * KEEL_EUNIQUE, KEEL_EPG; its SQLSTATE in keel_integrity_last_sqlstate()),
 * the body's own error, UV_ETIMEDOUT or UV_ECANCELED, and the number of
 * attempts.
 *
 * Returns 0 (done is called exactly once, on a later loop iteration), or
 * UV_EINVAL (NULL ig, body or done; bad isolation; a bad policy),
 * UV_ENOMEM or KEEL_ECLOSING; nothing is called then. Loop thread only.
 */
KEEL_EXTERN int keel_tx_run(keel_integrity *ig, keel_pg_isolation isolation,
                            const keel_retry_opts *opts, keel_pg_tx_fn body, keel_tx_done_cb done,
                            void *data);

/*
 * keel_tx_run() made retry-safe by an idempotency row: before the body's
 * statements, in the same transaction, keel inserts `key` into the
 * idempotency table (opts.idempotency_table, created by
 * keel_tx_idempotency_install() or by you: `key text PRIMARY KEY`). The
 * row exists exactly when an attempt committed, so:
 *   - a COMMIT lost in flight that keel_tx_run() cannot settle by the
 *     transaction's id is retried: the next attempt's insert waits
 *     for any transaction still holding the key; if the key is committed,
 *     that attempt rolls back and done gets 0 (the earlier one committed,
 *     counted in stats.already_committed); otherwise it goes on normally;
 *   - a key already committed by an earlier call (same key after a crash
 *     or a lost reply) gives done 0 without applying the body again.
 *
 * key    NULL: keel makes a random one (safe within this call only); or
 *        your own request id (1..200 bytes; borrowed for the call) to be
 *        safe across calls and processes.
 *
 * done gets KEEL_EINDOUBT only when the attempts ran out (or a
 * non-retryable error came) before keel could find out. Other arguments,
 * outcomes and errors as keel_tx_run() (UV_EINVAL also for a bad key).
 * Delete old rows yourself (e.g. `DELETE FROM keel_tx_idempotency WHERE
 * committed_at < now() - interval '7 days'`). Loop thread only.
 */
KEEL_EXTERN int keel_tx_run_idempotent(keel_integrity *ig, keel_pg_isolation isolation,
                                       const keel_retry_opts *opts, const char *key,
                                       keel_pg_tx_fn body, keel_tx_done_cb done, void *data);

/*
 * Creates the idempotency table if it does not exist:
 *   CREATE TABLE IF NOT EXISTS keel_tx_idempotency (
 *     key text PRIMARY KEY, committed_at timestamptz NOT NULL DEFAULT now())
 * (opts.idempotency_table's name), under an advisory lock. cb (may be NULL)
 * gets 0 or the error (KEEL_EPG, KEEL_ECONN, UV_ECANCELED, ...) on a later
 * loop iteration. Returns 0, UV_EINVAL (NULL ig), UV_ENOMEM or
 * KEEL_ECLOSING; cb is not called then. Loop thread only.
 */
KEEL_EXTERN int keel_tx_idempotency_install(keel_integrity *ig, keel_integrity_done_cb cb,
                                            void *data);

/* ---- stats, errors, close ---------------------------------------------------------- */

/* Counters only grow. */
typedef struct keel_integrity_stats {
  uint64_t operations;                          /* calls accepted (update, upsert, retry loop,
                                                   install, slug insert, transaction) */
  uint64_t attempts;                            /* statements / transactions sent, retries
                                                   included (not the read of a versioned
                                                   update that wrote nothing) */
  uint64_t successes;                           /* operations that ended with 0 */
  uint64_t conflicts;                           /* KEEL_ECONFLICT outcomes of versioned writes
                                                   (each one, also those retried) */
  uint64_t retries;                             /* attempts after the first (retry loops,
                                                   transactions, slug inserts) */
  uint64_t not_found;                           /* KEEL_ENOTFOUND outcomes */
  uint64_t aborted;                             /* retry loops stopped by the mutate callback */
  uint64_t inserted;                            /* upserts that created the row */
  uint64_t slug_inserts;                        /* rows inserted by keel_slug_insert() */
  uint64_t slug_collisions;                     /* unique violations met while inserting slugs */
  uint64_t slug_round_trips;                    /* pipelined round trips spent on slug inserts */
  uint64_t by_class[KEEL_SQLSTATE_CLASS_COUNT]; /* errors per SQLSTATE class
                                (lost connections count as CONNECTION, lost
                                in flight as IN_DOUBT) */
  uint64_t in_doubt;                            /* operations that ended with KEEL_EINDOUBT */
  uint64_t in_doubt_resolved;                   /* writes lost in flight whose outcome keel
                                                   found out (then retried or reported) */
  uint64_t already_committed;                   /* idempotent transactions whose key was
                                                   already committed (done got 0) */
  uint64_t reserved_[8];                        /* ABI room: filled with zero */
} keel_integrity_stats;

/* Copies the statistics into *out. NULL ig or out: no-op. Loop thread
 * only. */
KEEL_EXTERN void keel_integrity_get_stats(const keel_integrity *ig, keel_integrity_stats *out);

/* Text of the last error (a rejected spec, "SQLSTATE 40001: could not
 * serialize...", a version conflict); "" when none. Valid until the next
 * call on ig. Loop thread only. */
KEEL_EXTERN const char *keel_integrity_last_error(const keel_integrity *ig);

/* SQLSTATE of the last failure that had one (for a transaction: its first
 * failing statement's), "" when none. Valid until the next call on ig.
 * Loop thread only. */
KEEL_EXTERN const char *keel_integrity_last_sqlstate(const keel_integrity *ig);

/*
 * Closes the context: new calls return KEEL_ECLOSING, operations in flight
 * end (a retry loop or transaction waiting for its next attempt ends with
 * UV_ECANCELED when that attempt is due, a statement in flight with its
 * result), and cb (may be NULL) runs on a later loop iteration after the
 * last of them, never inside this call. Close the context before the pool.
 * NULL-safe; a second call does nothing; callable from inside any callback
 * of the context. Loop thread only.
 */
KEEL_EXTERN void keel_integrity_close(keel_integrity *ig, keel_close_cb cb, void *data);

struct keel_serve;

/*
 * Shows ig on the keel_serve server s under name (keel/serve.h), as kind
 * "integrity". The registration is dropped from s when ig's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or ig closing). Loop thread only.
 */
KEEL_EXTERN int keel_integrity_serve(struct keel_serve *s, keel_integrity *ig, const char *name);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_INTEGRITY_H */
