/*
 * keel/integrity.h — the data-integrity patterns of the seeds, on any table:
 * versioned (optimistic) updates, an optimistic retry loop, upserts with a
 * version, atomic unique slugs, a SQLSTATE classifier and transactions that
 * are retried on serialization failures and deadlocks.
 *
 *     keel_integrity *ig;
 *     keel_integrity_new(loop, pool, NULL, &ig);
 *     const char *cols[] = {"name"}, *vals[] = {"New name"};
 *     keel_occ_spec s = {.table = "business_cards", .key_column = "id",
 *                        .key_value = "42", .version_column = "version",
 *                        .expected_version = "3", .set_columns = cols,
 *                        .set_values = vals, .set_count = 1};
 *     keel_occ_update(ig, &s, on_updated, NULL);
 *     // on_updated(ig, 0, "4", ...) or (ig, KEEL_ECONFLICT, "5", ...) or
 *     // (ig, KEEL_ENOTFOUND, NULL, ...)
 *
 * Identifiers are always quoted, values always sent as parameters.
 * Loop thread only.
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

/* ---- SQLSTATE classes ------------------------------------------------- */

typedef enum keel_sqlstate_class {
  KEEL_SQLSTATE_NONE = 0,   /* NULL or "00000" */
  KEEL_SQLSTATE_RETRY_TX,   /* 40001 serialization failure, 40P01 deadlock */
  KEEL_SQLSTATE_RETRY,      /* 55P03 lock not available */
  KEEL_SQLSTATE_CONNECTION, /* class 08, 57P01..57P03: retry after reconnect */
  KEEL_SQLSTATE_UNIQUE,     /* 23505 */
  KEEL_SQLSTATE_CONSTRAINT, /* other class 23: check, foreign key, not null */
  KEEL_SQLSTATE_OTHER       /* anything else: not retryable */
} keel_sqlstate_class;

/* Classifies a five-character SQLSTATE. Thread-safe. */
KEEL_EXTERN keel_sqlstate_class keel_sqlstate_classify(const char *sqlstate);

/* The keel error for a SQLSTATE: KEEL_ESERIALIZATION (40001, 40P01),
 * KEEL_ERETRYABLE (55P03), KEEL_ECONN (08, 57P0x), KEEL_EUNIQUE (23505),
 * KEEL_EPG (anything else), 0 for NULL / "00000". Thread-safe. */
KEEL_EXTERN int keel_sqlstate_error(const char *sqlstate);

/* Name of a class ("retry_tx", "unique", ...). */
KEEL_EXTERN const char *keel_sqlstate_class_name(keel_sqlstate_class cls);

/*
 * A keel_retry_classify_fn: retries KEEL_ESERIALIZATION, KEEL_ERETRYABLE,
 * KEEL_ECONN and UV_ETIMEDOUT; KEEL_EUNIQUE only when classify_data points
 * to a true bool. Use it as keel_retry_opts.classify.
 */
KEEL_EXTERN int keel_integrity_retryable(int status, void *classify_data);

/* ---- slugs (no I/O) ------------------------------------------------------ */

/*
 * Turns a name into a slug: lower-case ASCII letters and digits, '-' between
 * words, common Latin accents transliterated from UTF-8 ("Crème Brûlée" →
 * "creme-brulee", "Straße" → "strasse"), at most max_len bytes (cut at a word
 * boundary when possible), never empty ("item" when nothing is left).
 * Writes a NUL-terminated slug into out. Returns its length, UV_EINVAL
 * (NULL, max_len 0) or UV_ENOBUFS (cap <= max_len). Thread-safe.
 */
KEEL_EXTERN int keel_slugify(const char *name, size_t max_len, char *out, size_t cap);

/* ---- the context ---------------------------------------------------------- */

typedef struct keel_integrity keel_integrity;

typedef struct keel_integrity_opts {
  keel_retry_opts retry; /* default for optimistic and transaction retries:
                            5 attempts, exponential 20 ms x2 with full jitter,
                            cap 1000 ms */
} keel_integrity_opts;

KEEL_EXTERN void keel_integrity_opts_init(keel_integrity_opts *opts);

/*
 * Creates a context on a pool (not owned; close the context before the
 * pool). opts may be NULL for the defaults. Returns 0, UV_EINVAL, UV_ENOMEM.
 */
KEEL_EXTERN int keel_integrity_new(uv_loop_t *loop, keel_pg_pool *pool,
                                   const keel_integrity_opts *opts, keel_integrity **out);

/* ---- versioned updates ------------------------------------------------------ */

typedef enum keel_version_kind {
  KEEL_VERSION_INTEGER = 0, /* bigint, incremented */
  KEEL_VERSION_UUID         /* uuid, a new gen_random_uuid() per write */
} keel_version_kind;

typedef struct keel_occ_spec {
  const char *table; /* "table" or "schema.table" */
  const char *key_column;
  const char *key_value; /* text, cast by PostgreSQL to the column's type */
  const char *version_column;
  keel_version_kind version_kind;
  const char *expected_version; /* the version the caller read */
  const char *const *set_columns;
  const char *const *set_values;  /* NULL entries set SQL NULL */
  int set_count;                  /* >= 0 (0: only the version changes) */
  const char *soft_delete_column; /* rows where it IS NOT NULL count as absent */
  bool include_deleted;           /* ... unless this is true */
} keel_occ_spec;

/*
 * The outcome: 0 and the new version; KEEL_ECONFLICT and the current version
 * (the seed's 409 with currentVersion); KEEL_ENOTFOUND and NULL; KEEL_EPG /
 * KEEL_ECONN / ... with NULL (details in keel_integrity_last_error). For an
 * upsert, inserted tells whether the row was created. version is valid
 * during the call.
 */
typedef void (*keel_occ_cb)(keel_integrity *ig, int status, const char *version, bool inserted,
                            void *data);

/* One statement, one round trip. Returns 0 or UV_EINVAL (bad identifiers,
 * missing fields; reason in last_error) / UV_ENOMEM / KEEL_ECLOSING. */
KEEL_EXTERN int keel_occ_update(keel_integrity *ig, const keel_occ_spec *spec, keel_occ_cb cb,
                                void *data);

/*
 * Insert when the key is absent (version 1 or a new UUID; expected_version
 * is then ignored), versioned update when present (expected_version NULL
 * means "expected absent": a present row is a conflict). The key column
 * needs a unique index. One statement.
 */
KEEL_EXTERN int keel_occ_upsert(keel_integrity *ig, const keel_occ_spec *spec, keel_occ_cb cb,
                                void *data);

/*
 * The user's step of an optimistic retry: row is the current row (read by
 * key; column access through keel_pg_result_get(row, 0, "col")). Fill
 * values_out[i] for each of the spec's set_columns (strings are copied before
 * this returns) and return 0, or return an error (e.g. KEEL_EABORTED) to
 * stop: done then gets that error.
 */
typedef int (*keel_occ_mutate_fn)(keel_integrity *ig, const keel_pg_result *row,
                                  const char **values_out, void *data);

/* The end of an optimistic retry: the last outcome and attempts made. */
typedef void (*keel_occ_retry_cb)(keel_integrity *ig, int status, const char *version,
                                  unsigned attempts, void *data);

/*
 * Read → mutate → versioned update, repeated on KEEL_ECONFLICT per opts
 * (NULL: the context's retry options), with a final KEEL_ECONFLICT after the
 * last attempt (seed 001 retryOptimisticLock, seed 004 withOptimisticRetry).
 * spec.expected_version and spec.set_values are ignored (read and mutated).
 */
KEEL_EXTERN int keel_occ_retry(keel_integrity *ig, const keel_occ_spec *spec,
                               const keel_retry_opts *opts, keel_occ_mutate_fn mutate,
                               keel_occ_retry_cb done, void *data);

/*
 * Adds the version column if missing (bigint NOT NULL DEFAULT 1, or uuid
 * DEFAULT gen_random_uuid()) and a BEFORE UPDATE trigger that bumps it on
 * every UPDATE that does not set it itself (so keel_occ_update never bumps
 * twice). Idempotent. cb gets 0 or the error.
 */
typedef void (*keel_integrity_done_cb)(keel_integrity *ig, int status, void *data);
KEEL_EXTERN int keel_occ_install(keel_integrity *ig, const char *table, const char *column,
                                 keel_version_kind kind, keel_integrity_done_cb cb, void *data);

/* ---- unique slugs ------------------------------------------------------------ */

typedef struct keel_slug_spec {
  const char *table;
  const char *slug_column;    /* needs a unique index */
  const char *name;           /* turned into the base slug with keel_slugify */
  size_t max_len;             /* default (0): 60 */
  const char *const *columns; /* the other columns of the row */
  const char *const *values;
  int count;
} keel_slug_spec;

/* 0 and the slug inserted, or an error with NULL. Round trips counted in
 * keel_integrity_stats.slug_round_trips. */
typedef void (*keel_slug_cb)(keel_integrity *ig, int status, const char *slug, void *data);

/*
 * Inserts the row with the first free slug: base, base-2, base-3, ...
 * Creators of the same base are serialised by a transaction-scoped advisory
 * lock and the statements are pipelined: one round trip per insert, no
 * unique violation reaches the caller (one from a writer outside keel is
 * retried, counted as a collision).
 */
KEEL_EXTERN int keel_slug_insert(keel_integrity *ig, const keel_slug_spec *spec, keel_slug_cb cb,
                                 void *data);

/* ---- transactions with retry -------------------------------------------- */

/*
 * Runs body inside BEGIN ... COMMIT at `isolation` on one connection
 * (keel_pg_pool_transaction), retrying the whole transaction on 40001 and
 * 40P01 (and connection loss) per opts (NULL: the context's). done gets 0,
 * or the final error mapped with keel_sqlstate_error(), and the attempts.
 */
typedef void (*keel_tx_done_cb)(keel_integrity *ig, int status, unsigned attempts, void *data);
KEEL_EXTERN int keel_tx_run(keel_integrity *ig, keel_pg_isolation isolation,
                            const keel_retry_opts *opts, keel_pg_tx_fn body, keel_tx_done_cb done,
                            void *data);

/* ---- stats, errors, close ------------------------------------------------------ */

typedef struct keel_integrity_stats {
  uint64_t attempts;  /* statements / transactions attempted */
  uint64_t conflicts; /* KEEL_ECONFLICT outcomes */
  uint64_t retries;   /* retries scheduled */
  uint64_t not_found;
  uint64_t slug_inserts;
  uint64_t slug_collisions;  /* unique violations met while inserting slugs */
  uint64_t slug_round_trips; /* network round trips spent on slug inserts */
  uint64_t by_class[7];      /* errors per keel_sqlstate_class */
} keel_integrity_stats;

KEEL_EXTERN void keel_integrity_get_stats(const keel_integrity *ig, keel_integrity_stats *out);
KEEL_EXTERN const char *keel_integrity_last_error(const keel_integrity *ig);

/* Closes the context; operations in flight finish with UV_ECANCELED or
 * their result first. cb runs on a later loop iteration. */
KEEL_EXTERN void keel_integrity_close(keel_integrity *ig, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_INTEGRITY_H */
