/*
 * keel/verify.h — a periodic server-side verification job.
 *
 * Every interval_ms the verifier walks a table in keyset order
 * (`WHERE (id) > ($last) ORDER BY id LIMIT batch_size`, never OFFSET),
 * fetching the next batch while the current one is validated. A synchronous
 * validator looks at each row (columns by name, NULL-aware) and names the
 * problems it finds; an asynchronous fix-up repairs invalid rows, at most
 * fix_concurrency at a time, retried with a backoff policy and bounded by a
 * timeout. Two runs never overlap; with leader_lock on, only the process
 * holding the job's lease (a row in a table keel creates, with an expiry by
 * the server's clock and a fencing counter; safe through any pooler) runs
 * the job, or, with KEEL_VERIFY_LEADER_ADVISORY, the process holding a
 * session-level advisory lock (direct or session-pooled connections only);
 * an optional checkpoint
 * table lets a long run resume after a restart. Statistics are kept for
 * dashboards.
 *
 * Every run is bounded (run_timeout_ms) and ends in exactly one
 * on_run_done, on a later loop iteration than the call that caused it.
 * All functions are loop-thread only unless a block says otherwise.
 *
 *     static bool check(keel_verify *v, const keel_verify_row *row, void *data) {
 *       if (keel_verify_row_is_null(row, "status")) keel_verify_row_problem(row, "missing_status");
 *       return true;  // invalid as soon as a problem was named
 *     }
 *     keel_verify_opts o; keel_verify_opts_init(&o);
 *     o.conninfo = "host=... dbname=..."; o.table = "orders"; o.id_columns[0] = "id";
 *     o.validate = check; o.fix = fix_order; o.interval_ms = 3600 * 1000;
 *     keel_verify *v; if (keel_verify_new(loop, &o, &v) != 0) ...;
 *     keel_verify_start(v);
 *     ... keel_verify_get_stats(v, &st); printf("%llu problems\n", st.problems_last_run);
 *     keel_verify_close(v, NULL, NULL);
 */
#ifndef KEEL_VERIFY_H
#define KEEL_VERIFY_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"
#include "keel/pg.h"
#include "keel/retry.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most key columns of a composite key. */
#define KEEL_VERIFY_MAX_KEYS 4
/* Most columns in opts.columns. */
#define KEEL_VERIFY_MAX_COLUMNS 64
/* Entries in keel_verify_stats.top_codes. */
#define KEEL_VERIFY_TOP_CODES 8
/* Longest problem code kept (longer codes are truncated), NUL included. */
#define KEEL_VERIFY_CODE_MAX 48
/* Distinct problem codes counted; more land in the code "(other)". */
#define KEEL_VERIFY_MAX_CODES 128

typedef struct keel_verify keel_verify;

/* How leader_lock elects the one process that runs. */
typedef enum keel_verify_leader_kind {
  /* Default: a lease row in opts.leader_table (name = the job, owner = a
   * random id of this verifier, expires_at by the server's clock, fence +1
   * on every takeover), taken with one INSERT ... ON CONFLICT DO UPDATE
   * statement, renewed every leader_ttl_ms / 3, taken over only once
   * expired. No session state: safe through transaction poolers. */
  KEEL_VERIFY_LEADER_LEASE = 0,
  /* The session-level advisory lock of earlier versions, on a dedicated
   * connection. Meaningless through a transaction pooler. */
  KEEL_VERIFY_LEADER_ADVISORY = 1
} keel_verify_leader_kind;

/* Default table of the leader lease. */
#define KEEL_VERIFY_DEFAULT_LEADER_TABLE "keel_verify_leader"
typedef struct keel_verify_row keel_verify_row;
typedef struct keel_verify_fix keel_verify_fix;

/* ---- rows ------------------------------------------------------------- */

/*
 * Text value of column `name` in row (PostgreSQL text format), or NULL for
 * SQL NULL or when the row has no such column (tell them apart with
 * keel_verify_row_has()). Valid while the row is (the validator call, or
 * until keel_verify_fix_done() for a fix-up's row). Loop thread only.
 */
KEEL_EXTERN const char *keel_verify_row_get(const keel_verify_row *row, const char *name);

/* true when column `name` is SQL NULL or absent (also for NULL arguments).
 * Loop thread only. */
KEEL_EXTERN bool keel_verify_row_is_null(const keel_verify_row *row, const char *name);

/* true when the row has a column called `name`; false for NULL arguments.
 * Loop thread only. */
KEEL_EXTERN bool keel_verify_row_has(const keel_verify_row *row, const char *name);

/* Number of columns (0 for NULL), and name/value by index (NULL when out of
 * range, for SQL NULL or a NULL row). Same lifetime as keel_verify_row_get().
 * Loop thread only. */
KEEL_EXTERN int keel_verify_row_ncols(const keel_verify_row *row);
KEEL_EXTERN const char *keel_verify_row_col_name(const keel_verify_row *row, int col);
KEEL_EXTERN const char *keel_verify_row_value(const keel_verify_row *row, int col);

/*
 * Writes the row's key as text into buf: the id value, or the key values
 * joined by ',' for a composite key (truncated to cap). Returns the length
 * of the full text (like snprintf), or UV_EINVAL for a NULL row or a NULL
 * buf with cap > 0. Loop thread only.
 */
KEEL_EXTERN int keel_verify_row_key(const keel_verify_row *row, char *buf, size_t cap);

/*
 * Inside the validator only: records that this row has the problem `code`
 * (a short code such as "missing_completion_date"; copied; at most
 * KEEL_VERIFY_CODE_MAX - 1 bytes are kept). A row with at least one named
 * problem is invalid whatever the validator returns. The same code named
 * twice for one row counts twice.
 * Returns 0, or UV_EINVAL (NULL or empty code, or called outside the
 * validator: nothing is counted). Loop thread only.
 */
KEEL_EXTERN int keel_verify_row_problem(const keel_verify_row *row, const char *code);

/* ---- callbacks -------------------------------------------------------- */

/*
 * The validator: synchronous, called once per scanned row. Returns true for
 * a valid row, false for an invalid one (naming problems with
 * keel_verify_row_problem() is optional; a row returned false without one
 * counts under the code "invalid"). It may call keel_verify_close(): no
 * further row of the batch is validated.
 */
typedef bool (*keel_verify_validate_fn)(keel_verify *v, const keel_verify_row *row, void *data);

/*
 * The fix-up: asynchronous, called for each invalid row (again for every
 * retry). It owns `fix` until it calls keel_verify_fix_done(fix, status),
 * once, from this call or later; `row` stays valid until then. It may run
 * its own queries (e.g. on a keel_pg_pool) or anything else, and may call
 * keel_verify_close().
 */
typedef void (*keel_verify_fix_fn)(keel_verify *v, keel_verify_fix *fix, const keel_verify_row *row,
                                   void *data);

/*
 * Called once for every run, on a later loop iteration than the call or
 * tick that requested it. status:
 *   0               the whole table was walked (fix-ups included, whatever
 *                   their outcome);
 *   KEEL_EPG        a statement failed (message in last_error);
 *   KEEL_ECONN      the database could not be reached, or the connection
 *                   was lost during the run (also a failed leader lock
 *                   request);
 *   KEEL_EINDOUBT, UV_ETIMEDOUT, UV_ENOBUFS, KEEL_ESEND, KEEL_EAUTH,
 *   KEEL_ENODB      passed on from a statement of the run;
 *   UV_ETIMEDOUT    also when run_timeout_ms passed (runs_timed_out counts
 *                   those);
 *   KEEL_ENOTLEADER the leader lock or lease was lost during the run (a
 *                   lease: not renewed before the local deadline, taken
 *                   over, or the fenced end-of-run statement found it
 *                   gone: the run's results were not committed);
 *   UV_ENOMEM       out of memory;
 *   UV_EINVAL       an id column is missing from the result or NULL;
 *   UV_ECANCELED    keel_verify_stop() (the run ended early) or
 *                   keel_verify_close() (before the close callback).
 * A run request that finds the leader lock held by another process does
 * not call it (runs_not_leader counts those). It may call
 * keel_verify_run_now() or keel_verify_close().
 */
typedef void (*keel_verify_run_cb)(keel_verify *v, int status, void *data);

/* ---- options ---------------------------------------------------------- */

typedef struct keel_verify_opts {
  /* Where to read: a pool (borrowed; must outlive the verifier) or a
   * connection string (the verifier opens its own connection). At least one
   * is required; the pool wins when both are set. With leader_lock and a
   * conninfo the leader's statements go on a second connection of the
   * verifier (so that a long batch cannot delay a renewal); with a pool,
   * the lease's statements go through the pool, while the advisory lock
   * (KEEL_VERIFY_LEADER_ADVISORY) holds one pool connection for the
   * verifier's life (the pool then needs at least 2 connections). */
  keel_pg_pool *pool;
  const char *conninfo;

  const char *table;                            /* required; "name" or "schema.name" */
  const char *id_columns[KEEL_VERIFY_MAX_KEYS]; /* default {"id"}; NULL-terminated;
                                                  unique, orderable (composite ok) */
  const char *const *columns; /* columns to read, NULL-terminated; NULL = all (t.*) */
  const char *where;          /* extra SQL condition (trusted SQL, not an identifier),
                                 ANDed to each batch query; NULL = none */
  uint32_t batch_size;        /* rows per batch, default 1000, 1..1000000 */
  uint64_t interval_ms;       /* time between run starts, default 3600000, > 0 */
  bool run_on_start;          /* first run right at start(), default true */
  bool bound_run;             /* default true: a run stops at the largest key seen
                                 at its start, so rows inserted meanwhile can't
                                 prolong it */

  keel_verify_validate_fn validate; /* required */
  keel_verify_fix_fn fix;           /* may be NULL: invalid rows are only counted */
  unsigned fix_concurrency;         /* fix-ups running at once, default 4, >= 1 */
  unsigned fix_max_retries;         /* retries of a failed fix-up, default 3 */
  keel_backoff fix_backoff;         /* default exponential 100 ms x2, cap 10000 ms */
  uint64_t fix_timeout_ms;          /* per attempt, default 30000; 0 = none */

  bool leader_lock;        /* default false: run only while leader (leader_kind) */
  int64_t leader_lock_key; /* advisory lock key (KEEL_VERIFY_LEADER_ADVISORY only);
                              0 (default) = derived from table */

  const char *checkpoint_table; /* NULL (default) = no checkpoint; created if missing */
  const char *job_name;         /* checkpoint row key; default = table */
  uint32_t checkpoint_every;    /* batches between checkpoint writes, default 10 */

  keel_verify_run_cb on_run_done; /* may be NULL */
  keel_clock clock;               /* durations and times; default uv_now */
  void *data;                     /* passed to validate, fix, on_run_done */

  uint64_t run_timeout_ms;  /* bound on one run, from its start (the leader lock
                               request included) to on_run_done; default 3600000
                               (1 h); 0 = the default. See docs/verify.md */
  unsigned fix_max_waiting; /* fix-ups waiting for a retry, default 10000; 0 = the
                               default. A failed fix-up beyond it is not retried:
                               counted in fixes_failed and fixes_dropped */
  /* Leader election with leader_lock (docs/verify.md, "Leader election"). */
  keel_verify_leader_kind leader_kind; /* default KEEL_VERIFY_LEADER_LEASE */
  const char *leader_table;            /* lease table, "name" or "schema.name"; created if
                                          missing; NULL (default) =
                                          KEEL_VERIFY_DEFAULT_LEADER_TABLE. The lease's
                                          row is named job_name (default: table) */
  uint64_t leader_ttl_ms;              /* lease lifetime from each renewal, by the server's
                                          clock; default 10000, >= 100; 0 = the default.
                                          Renewed every leader_ttl_ms / 3 */
  uint64_t leader_margin_ms;           /* the leader stops considering itself leader at
                                          renewal send time + ttl - margin (its own clock),
                                          before the lease can expire on the server;
                                          default ttl / 5, < ttl / 2; 0 = the default */
  uint64_t reserved_[8];               /* ABI room: zero (opts_init does); never set */
} keel_verify_opts;

/* Zeroes the whole struct (reserved_ included), then fills the defaults
 * above. Thread-safe. */
KEEL_EXTERN void keel_verify_opts_init(keel_verify_opts *opts);

/*
 * Checks opts without creating anything. Returns 0 or UV_EINVAL with a
 * static explanation in *why (when not NULL): missing table, validator or
 * connection; batch_size 0 or too large; interval 0; fix_concurrency 0;
 * an identifier that cannot be quoted (empty, > 63 bytes, qualified where
 * not allowed); too many columns; bad backoff. *why is untouched on
 * success. Thread-safe.
 */
KEEL_EXTERN int keel_verify_validate_opts(const keel_verify_opts *opts, const char **why);

/*
 * Creates a verifier (idle until keel_verify_start() or
 * keel_verify_run_now()). Copies every string of opts (opts itself may go
 * after the call); identifiers are quoted, never pasted. A pool in opts is
 * borrowed. Opens its connection(s) at once when conninfo is used. No
 * callback runs inside this call.
 * Returns 0 and sets *out; UV_EINVAL (NULL loop/opts/out, or invalid opts:
 * keel_verify_validate_opts() gives the reason), UV_ENOMEM, or an error of
 * keel_pg_new() (UV_EINVAL for a conninfo it refuses). *out is untouched on
 * failure (a connection already opened finishes closing on a later loop
 * iteration, so run the loop before uv_loop_close()). Loop thread only.
 */
KEEL_EXTERN int keel_verify_new(uv_loop_t *loop, const keel_verify_opts *opts, keel_verify **out);

/* Like keel_verify_new() (same errors), and explains a failure: writes the
 * reason (NUL-terminated, truncated to why_cap) into why_buf, "" on
 * success. why_buf may be NULL. Loop thread only. */
KEEL_EXTERN int keel_verify_new_ex(uv_loop_t *loop, const keel_verify_opts *opts, keel_verify **out,
                                   char *why_buf, size_t why_cap);

/* ---- verbs ------------------------------------------------------------ */

/*
 * Starts the interval timer (first run on a later loop iteration when
 * run_on_start, else after interval_ms). Runs report through
 * opts.on_run_done; a tick while a run is going is skipped (runs_skipped).
 * Returns 0 (also when already started), UV_EINVAL (NULL) or KEEL_ECLOSING
 * (after keel_verify_close()). Loop thread only.
 */
KEEL_EXTERN int keel_verify_start(keel_verify *v);

/*
 * Stops the timer; a run in progress fetches no further batch, lets its
 * fix-ups finish and ends with UV_ECANCELED (its checkpoint is saved); a
 * run requested but not begun yet ends with UV_ECANCELED too. Either way
 * on_run_done comes on a later loop iteration, never inside this call.
 * With the leader lease, the lease is given up (expired at once) as soon
 * as no run needs it, so that another verifier takes over at its next
 * tick. keel_verify_start() may be called again later. Returns 0, UV_EINVAL
 * (NULL) or KEEL_ECLOSING (after keel_verify_close()). Loop thread only.
 */
KEEL_EXTERN int keel_verify_stop(keel_verify *v);

/*
 * Starts a run on a later loop iteration, whether started or not (with
 * leader_lock, only if the lease or lock is obtained; when not started,
 * the lease is given up again when the run ends). On 0, on_run_done is
 * called exactly once for it (unless another process holds the lease or
 * lock).
 * Returns 0; KEEL_EINPROGRESS when a run is going or about to (counted in
 * runs_skipped, nothing else happens); UV_EINVAL (NULL); KEEL_ECLOSING
 * (after keel_verify_close()). Loop thread only.
 */
KEEL_EXTERN int keel_verify_run_now(keel_verify *v);

/*
 * Reports the outcome of a fix-up: status 0 for fixed, < 0 for failed (it
 * is retried up to fix_max_retries times with fix_backoff while fewer than
 * fix_max_waiting fix-ups wait for a retry, then counted as failed).
 * Exactly once per fix handle; the handle is freed by this call and invalid
 * afterwards, whatever it returns. No callback runs inside this call.
 * Returns 0; KEEL_ESTALE when the attempt no longer counts: it had timed
 * out (fix_timeout_ms), its run ended without it (run_timeout_ms, lost
 * connection) or the verifier was closed (the status is ignored; the
 * verifier may already be freed); UV_EINVAL for NULL. May be called from
 * inside the fix-up callback. Loop thread only.
 */
KEEL_EXTERN int keel_verify_fix_done(keel_verify_fix *fix, int status);

/* The attempt number (1 for the first try) of a fix handle, 0 for NULL.
 * Loop thread only. */
KEEL_EXTERN unsigned keel_verify_fix_attempt(const keel_verify_fix *fix);

/* The fencing token of the lease under which the fix-up's run started; 0
 * for NULL, without leader_lock, with KEEL_VERIFY_LEADER_ADVISORY, or once
 * the handle is detached (timed out, run ended, verifier closed). Loop
 * thread only. */
KEEL_EXTERN uint64_t keel_verify_fix_fence(const keel_verify_fix *fix);

/*
 * Writes into buf a SQL boolean condition that is true only while the
 * lease this fix-up's run started under is still held by this verifier
 * with the same fence and has not expired on the server's clock; put it in
 * the WHERE of the fix-up's write (`UPDATE t SET ... WHERE id = $1 AND
 * <condition>`) so that a fix-up of a leader that lost its lease changes
 * nothing (0 rows). The condition locks the lease row FOR SHARE until the
 * transaction ends, so a takeover waits for the write. Values are
 * literals (escape-string syntax); identifiers are quoted. Without a lease
 * (no leader_lock, or KEEL_VERIFY_LEADER_ADVISORY) it is "true"; for a
 * detached handle "false".
 * Returns the length of the full condition (like snprintf; truncated to
 * cap when longer: 300 bytes plus twice the job name's length are always
 * enough), or UV_EINVAL for a NULL
 * fix, or a NULL buf with cap > 0. Loop thread only.
 */
KEEL_EXTERN int keel_verify_fix_fence_sql(const keel_verify_fix *fix, char *buf, size_t cap);

/* ---- stats -------------------------------------------------------------- */

typedef struct keel_verify_code_count {
  char code[KEEL_VERIFY_CODE_MAX];
  uint64_t total;    /* counter: rows with this problem, all runs */
  uint64_t last_run; /* rows with this problem in the last finished run */
} keel_verify_code_count;

typedef struct keel_verify_stats {
  uint64_t runs_started;         /* counter */
  uint64_t runs_completed;       /* counter: status 0 */
  uint64_t runs_failed;          /* counter: ended with an error */
  uint64_t runs_skipped;         /* counter: tick or run_now while a run was going */
  uint64_t runs_not_leader;      /* counter: ticks skipped because another process leads */
  uint64_t rows_scanned;         /* counter */
  uint64_t rows_valid;           /* counter */
  uint64_t rows_invalid;         /* counter */
  uint64_t fixes_attempted;      /* counter: fix-up calls (retries included) */
  uint64_t fixes_succeeded;      /* counter: rows fixed */
  uint64_t fixes_failed;         /* counter: rows whose fix-up failed for good */
  uint64_t fixes_retried;        /* counter: attempts after a failure */
  uint64_t fixes_timed_out;      /* counter: attempts that timed out */
  uint64_t batches;              /* counter: batch queries that returned */
  uint64_t problems_last_run;    /* problems named in the last finished run (seed's problemCount) */
  uint64_t problems_total;       /* counter */
  uint64_t rows_last_run;        /* rows scanned by the last finished run */
  uint64_t last_run_duration_ms; /* duration of the last finished run */
  double rows_per_s;             /* rate of the last finished run */
  uint64_t last_run_started_ms;  /* clock time of the last run start, 0 = never */
  uint64_t next_run_ms;          /* clock time of the next tick, 0 = not scheduled */
  bool running;                  /* gauge */
  bool leader;                   /* gauge: leads (holds the lease or lock; true without
                                    leader_lock) */
  unsigned fixes_running;        /* gauge */
  unsigned fixes_pending;        /* gauge: fix-ups waiting for a slot or a retry */
  int last_status;               /* status of the last finished run */
  char last_key[128];            /* key of the last row scanned ("" = none) */
  char last_error[256];          /* text of the last error ("" = none) */
  unsigned ncodes;               /* entries used in top_codes */
  keel_verify_code_count top_codes[KEEL_VERIFY_TOP_CODES]; /* by total, descending */
  uint64_t runs_timed_out; /* counter: runs ended by run_timeout_ms (also in runs_failed) */
  uint64_t fixes_dropped;  /* counter: fix-ups given up without a final outcome: not
                              retried because fix_max_waiting were already waiting,
                              or dropped by a run that timed out or lost its
                              connection */
  uint64_t leader_changes; /* counter: times this verifier became the leader (lease:
                              a takeover, each with a new fence) */
  uint64_t leases_lost;    /* counter: leadership lost without giving it up: the lease
                              was not renewed before the local deadline, was taken
                              over, or a fenced write found it gone */
  uint64_t fence;          /* gauge: fencing token of the lease held, 0 = none (and
                              always 0 with KEEL_VERIFY_LEADER_ADVISORY) */
  uint64_t fenced_refused; /* counter: the verifier's fenced writes (checkpoint, end of
                              run) refused because the lease was no longer held */
  uint64_t reserved_[8];   /* ABI room: filled with zero */
} keel_verify_stats;

/* Fills *out (reserved_ with zero). Does nothing when v or out is NULL.
 * Loop thread only. */
KEEL_EXTERN void keel_verify_get_stats(const keel_verify *v, keel_verify_stats *out);

/* Text of the last error ("" when none, or for NULL): a PostgreSQL message,
 * a fix-up failure, a lost lock, why a run timed out ("run timed out after
 * N ms: database unreachable (...)"). Owned by v; valid until the next call
 * into v. Loop thread only. */
KEEL_EXTERN const char *keel_verify_last_error(const keel_verify *v);

/*
 * Stops everything: a run in progress or requested is dropped and reported
 * with on_run_done(UV_ECANCELED) on a later loop iteration, before cb;
 * fix-ups waiting for a slot or a retry are dropped, a leader lease held
 * is given up (with conninfo, the leader connection closes once that
 * statement answers, within leader_ttl_ms; through a pool nobody waits
 * for it), owned connections close, and cb (may be NULL; its object
 * argument is the freed v, for
 * identity only) runs on a later loop iteration once every handle is
 * closed and every query of v has returned; after it uv_loop_close() can
 * succeed. No callback runs inside this call. Afterwards every call on v
 * returns KEEL_ECLOSING (keel_verify_fix_done(): KEEL_ESTALE) until cb.
 * Fix handles still held by fix-ups stay valid: keel_verify_fix_done() on
 * them returns KEEL_ESTALE and frees them (a handle never reported leaks).
 * NULL-safe; a second call does nothing; callable from any callback of v
 * (validator, fix-up, on_run_done). Loop thread only.
 */
KEEL_EXTERN void keel_verify_close(keel_verify *v, keel_close_cb cb, void *data);

struct keel_serve;

/*
 * Shows v on the keel_serve server s under name (keel/serve.h), as kind
 * "verifier". The registration is dropped from s when v's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or v closing). Loop thread only.
 */
KEEL_EXTERN int keel_verify_serve(struct keel_serve *s, keel_verify *v, const char *name);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_VERIFY_H */
