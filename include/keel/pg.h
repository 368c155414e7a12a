/*
 * keel/pg.h — asynchronous PostgreSQL on a libuv loop.
 *
 * A keel_pg is one libpq connection in non-blocking mode, driven by a
 * uv_poll_t on its socket. Queries queue in order; each result reaches its
 * callback exactly once. With pipeline mode (libpq >= 14) queued statements
 * go out in one write. A lost connection fails the queries in flight with
 * KEEL_ECONN (certainly not applied) or KEEL_EINDOUBT (may have been
 * applied) and reconnects with jittered exponential backoff. A keel_pg_pool
 * spreads queries over N connections and runs transactions on one of them.
 * The listener, the verifier, the integrity helpers and the durable queue are
 * built on this layer.
 *
 *     static void on_rows(keel_pg *c, int status, const keel_pg_result *res,
 *                         void *data) {
 *       if (status < 0) { fprintf(stderr, "%s\n", keel_pg_last_error(c)); return; }
 *       for (int i = 0; i < keel_pg_result_nrows(res); i++)
 *         puts(keel_pg_result_get(res, i, "name"));
 *     }
 *     keel_pg_opts o; keel_pg_opts_init(&o); o.conninfo = "host=... dbname=...";
 *     keel_pg *c; keel_pg_new(loop, &o, &c);
 *     const char *params[] = {"42"};
 *     keel_pg_query(c, "SELECT name FROM users WHERE team_id = $1", 1, params,
 *                   on_rows, NULL);
 */
#ifndef KEEL_PG_H
#define KEEL_PG_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"
#include "keel/retry.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_pg keel_pg;
typedef struct keel_pg_pool keel_pg_pool;
typedef struct keel_pg_result keel_pg_result;
typedef struct keel_pg_tx keel_pg_tx;

/* ---- results ----------------------------------------------------------- */

/*
 * A query's result, valid only during the result callback (copy what you
 * keep). On a SQL error it carries the SQLSTATE and message; on KEEL_ECONN,
 * KEEL_EINDOUBT, KEEL_ESEND, UV_ETIMEDOUT or UV_ECANCELED it has no rows
 * (keel_pg_result_error() gives keel's reason). Every accessor is NULL-safe,
 * returns the "nothing" value stated for out-of-range arguments and never
 * fails otherwise. Call them from the result callback (loop thread).
 */
KEEL_EXTERN int keel_pg_result_nrows(const keel_pg_result *res);
KEEL_EXTERN int keel_pg_result_ncols(const keel_pg_result *res);
/* Column index of `name`, or -1. */
KEEL_EXTERN int keel_pg_result_col(const keel_pg_result *res, const char *name);
/* Column name of index col, or NULL when out of range. */
KEEL_EXTERN const char *keel_pg_result_col_name(const keel_pg_result *res, int col);
/* Text value at (row, col); NULL for SQL NULL or out of range. */
KEEL_EXTERN const char *keel_pg_result_value(const keel_pg_result *res, int row, int col);
/* Text value at (row, column named name); NULL for SQL NULL or no such column. */
KEEL_EXTERN const char *keel_pg_result_get(const keel_pg_result *res, int row, const char *name);
/* Length in bytes of the value at (row, col); 0 for NULL / out of range. */
KEEL_EXTERN int keel_pg_result_length(const keel_pg_result *res, int row, int col);
/* true when (row, col) is SQL NULL or out of range. */
KEEL_EXTERN bool keel_pg_result_is_null(const keel_pg_result *res, int row, int col);
/* Rows affected by INSERT/UPDATE/DELETE (PQcmdTuples), 0 otherwise. */
KEEL_EXTERN uint64_t keel_pg_result_affected(const keel_pg_result *res);
/* The five-character SQLSTATE of an error result ("23505"), or NULL. */
KEEL_EXTERN const char *keel_pg_result_sqlstate(const keel_pg_result *res);
/* The server's primary error message, or NULL. */
KEEL_EXTERN const char *keel_pg_result_error(const keel_pg_result *res);
/* The underlying PGresult (a `PGresult *`), or NULL; owned by keel. */
KEEL_EXTERN void *keel_pg_result_raw(const keel_pg_result *res);

/* ---- one connection ---------------------------------------------------- */

/*
 * Result callback, called exactly once per accepted statement, on a later
 * loop iteration. status:
 *   0               success; a reply that arrived in full is delivered even
 *                   when the session dies before the pipeline's sync point
 *                   (see KEEL_EINDOUBT for the one exception).
 *   KEEL_EPG        the server reported an error (SQLSTATE and message in res
 *                   and in keel_pg_last_error(c)); also an error at the
 *                   statement's commit (a deferred constraint).
 *   KEEL_EINDOUBT   sent, and the session ended before its outcome was
 *                   known: it may or may not have taken effect. A COMMIT (or
 *                   END, PREPARE TRANSACTION) without its reply; a statement
 *                   sent in autocommit (outside BEGIN ... COMMIT) without its
 *                   reply, or with its reply but not its sync (autocommit
 *                   commits at the sync); a statement of a block whose COMMIT
 *                   was sent after it; SQLSTATE 08007 from the server. Never
 *                   retry it blindly: read back, or make it idempotent.
 *   KEEL_ECONN      certainly did not take effect: never sent; or sent inside
 *                   an open transaction block (or as BEGIN / ROLLBACK) whose
 *                   session was lost, so the server rolled it back; or a
 *                   statement of a block whose BEGIN failed or whose session
 *                   was lost before it could run (it never runs on another);
 *                   or (statement mode AUTO) sent by name inside a block
 *                   on a server connection that did not know the name (a
 *                   transaction pooler; SQLSTATE 26000 in res): it did not
 *                   run, the block is aborted (end it with ROLLBACK) and
 *                   can be run again, unnamed.
 *   KEEL_ESEND      libpq refused to send this statement (its message in
 *                   keel_pg_last_error(c)); nothing was sent, the connection
 *                   and the statements behind it go on.
 *   UV_ETIMEDOUT    opts.query_timeout_ms passed and it certainly did not
 *                   take effect (not sent yet, or inside a block: the reset
 *                   rolls it back); a sent statement that may have run gets
 *                   KEEL_EINDOUBT instead.
 *   UV_ECANCELED    keel_pg_close() dropped it (a statement already sent
 *                   when close was called may still have run on the server).
 * res is never NULL. c is NULL only for a pool query that failed before it
 * got a connection (UV_ETIMEDOUT waiting, UV_ECANCELED at close).
 */
typedef void (*keel_pg_result_cb)(keel_pg *c, int status, const keel_pg_result *res, void *data);

/*
 * Called when the connection comes up (up = true, status 0) or goes down
 * (up = false): status KEEL_ECONN (lost, or a connect attempt failed),
 * UV_ETIMEDOUT (a connect attempt took longer than connect_timeout_ms),
 * KEEL_EAUTH (the server refused the credentials: SQLSTATE 28P01 / 28000,
 * or it asked for a password none was given for), KEEL_ENODB (SQLSTATE
 * 3D000: the database does not exist) or UV_ENOMEM. The reason is in
 * keel_pg_last_error(c). After KEEL_EAUTH / KEEL_ENODB the connection stops
 * retrying (unless opts.retry_permanent_errors) and this is its last call
 * until keel_pg_reset(). Never called inside a keel call (keel_pg_new,
 * keel_pg_reset, keel_pg_close): always on a later loop iteration.
 */
typedef void (*keel_pg_state_cb)(keel_pg *c, bool up, int status, void *data);

/* Called for each NOTIFY received on this connection (after LISTEN). The
 * strings are valid during the call only. */
typedef void (*keel_pg_notify_cb)(keel_pg *c, const char *channel, const char *payload,
                                  int sender_pid, void *data);

/*
 * How keel_pg_query_cached() sends its statements (keel_pg_query() always
 * sends unnamed ones, which work everywhere):
 *   KEEL_PG_STATEMENTS_AUTO     (default) named prepared statements, until
 *                               the server says it does not know one of
 *                               them or already has it (SQLSTATE 26000 /
 *                               42P05: a transaction pooler such as PgBouncer
 *                               in `pool_mode = transaction` routed the
 *                               statement to another server connection).
 *                               From then on the connection (and every
 *                               connection of its pool) sends unnamed
 *                               statements only, for the rest of its life.
 *                               The statement that showed it is sent again,
 *                               unnamed, once, when it certainly did not
 *                               run (the error came from Parse/Bind, outside
 *                               a transaction block); inside a block it
 *                               fails with KEEL_ECONN instead (see
 *                               keel_pg_result_cb). Counted in
 *                               keel_pg_stats.statement_retries.
 *   KEEL_PG_STATEMENTS_NAMED    named prepared statements always, no
 *                               detection: for direct connections and
 *                               session-mode poolers only.
 *   KEEL_PG_STATEMENTS_UNNAMED  unnamed statements only, no session state
 *                               assumed (pgx's QueryExecModeExec, Prisma's
 *                               pgbouncer=true): use it behind a transaction
 *                               pooler.
 * A name keel prepares ("keel_<hash of the text>_<nonce>") is unique to the
 * statement's text and to the connection's session (a random 64-bit nonce
 * drawn at every connect): a name never stands for another text, also when
 * processes behind one pooler share a server connection. See
 * docs/poolers.md.
 */
typedef enum keel_pg_statement_mode {
  KEEL_PG_STATEMENTS_AUTO = 0,
  KEEL_PG_STATEMENTS_NAMED,
  KEEL_PG_STATEMENTS_UNNAMED
} keel_pg_statement_mode;

typedef struct keel_pg_opts {
  const char *conninfo;                  /* libpq connection string or URI; required */
  uint32_t connect_timeout_ms;           /* default 5000 (0 = 5000) */
  uint32_t query_timeout_ms;             /* per query, counted from keel_pg_query(); 0 = none
                                            (default). A sent statement that expires resets
                                            the connection (PQcancel would block the loop). */
  uint32_t health_check_interval_ms;     /* idle `SELECT 1` probe with a connect_timeout_ms
                                            deadline; default 10000; 0 = off */
  uint32_t keepalive_idle_s;             /* TCP keepalive idle seconds; default 10 (0 = 10).
                                            Added as libpq keepalives params (probes every 5 s);
                                            keepalive settings in conninfo win */
  keel_backoff reconnect_backoff;        /* default full jitter 100 ms x2, cap 10000 ms */
  bool reconnect;                        /* default true */
  bool pipeline;                         /* default true (when libpq supports it) */
  keel_pg_state_cb on_state;             /* may be NULL */
  keel_pg_notify_cb on_notify;           /* may be NULL */
  void *data;                            /* passed to on_state and on_notify */
  uint32_t max_pending;                  /* statements waiting to be sent (queued while
                                            disconnected, or behind the one in flight without
                                            pipelining): keel_pg_query() returns KEEL_EFULL
                                            beyond; default 100000 (0 = 100000) */
  bool retry_permanent_errors;           /* default false: stop reconnecting after KEEL_EAUTH or
                                            KEEL_ENODB; true: keep retrying with the backoff */
  keel_pg_statement_mode statement_mode; /* default KEEL_PG_STATEMENTS_AUTO; set
                                            KEEL_PG_STATEMENTS_UNNAMED behind a
                                            transaction pooler (docs/poolers.md) */
  uint64_t reserved_[8];                 /* ABI room: zero (opts_init does); never set */
} keel_pg_opts;

/* Zeroes *opts (reserved_ included) and fills the defaults above.
 * NULL-safe. Thread-safe. */
KEEL_EXTERN void keel_pg_opts_init(keel_pg_opts *opts);

/*
 * Creates a connection and starts connecting (non-blocking) on a later loop
 * iteration: no callback runs inside this call, and the first on_state
 * comes after *out is set. Queries may be queued at once; they are sent
 * when the connection is up. opts and its strings are copied.
 * conninfo is checked here (PQconninfoParse: unknown keywords, bad syntax).
 * A host name is resolved with uv_getaddrinfo on libuv's threadpool at
 * every connect attempt (the loop never blocks on DNS) and handed to libpq
 * as hostaddr, keeping host for TLS and SNI; numeric addresses, unix socket
 * directories and a hostaddr you give need no lookup.
 * Returns 0 and sets *out; UV_EINVAL (NULL argument or conninfo, a conninfo
 * libpq cannot parse, bad backoff: keel_pg_new_ex() says which) or
 * UV_ENOMEM. *out is untouched on failure. Loop thread only.
 */
KEEL_EXTERN int keel_pg_new(uv_loop_t *loop, const keel_pg_opts *opts, keel_pg **out);

/* Like keel_pg_new(), and explains a failure: writes the reason
 * (NUL-terminated, truncated to why_cap; libpq's for a bad conninfo) into
 * why_buf, "" on success. why_buf may be NULL. Loop thread only. */
KEEL_EXTERN int keel_pg_new_ex(uv_loop_t *loop, const keel_pg_opts *opts, keel_pg **out,
                               char *why_buf, size_t why_cap);

/*
 * Queues a parameterised statement ($1..$n, text parameters, NULL value =
 * SQL NULL). sql and values are copied; cb (may be NULL) is called exactly
 * once, on a later loop iteration, with the result.
 * Statements between a BEGIN and its COMMIT/ROLLBACK (recognised from their
 * leading keywords, in queue order) run only in the session their BEGIN ran
 * in; after that session is lost they fail with KEEL_ECONN until the block
 * is ended by a COMMIT or ROLLBACK (which fail too: the server rolled the
 * block back).
 * Returns 0; or, with nothing queued, cb never called and the reason in
 * keel_pg_last_error(c) (except for a NULL c):
 *   UV_EINVAL     NULL c or sql, nparams < 0 or > 65535 (the protocol's
 *                 limit), values NULL with nparams > 0;
 *   UV_ENOMEM;
 *   KEEL_EFULL    opts.max_pending statements already wait to be sent;
 *   KEEL_ECONN    disconnected and not reconnecting (opts.reconnect false);
 *   KEEL_EAUTH / KEEL_ENODB  connecting stopped on that permanent error
 *                 (keel_pg_reset() tries again);
 *   KEEL_ECLOSING after keel_pg_close().
 * Loop thread only.
 */
KEEL_EXTERN int keel_pg_query(keel_pg *c, const char *sql, int nparams, const char *const *values,
                              keel_pg_result_cb cb, void *data);

/*
 * Like keel_pg_query(), for a statement run many times: it is prepared once
 * per session (in the same pipelined write as its first execution) and
 * executed by name afterwards, which saves the server parsing and planning
 * it each time. Up to 64 distinct statements are cached per connection;
 * beyond that, without pipeline mode, and once the connection sends
 * unnamed statements (opts.statement_mode), it behaves as keel_pg_query().
 * The name is unique to the text and to the session (keel_pg_statement_mode
 * above): executed by name, it never runs another text. A failing PREPARE
 * is reported as the statement's own error. In statement mode AUTO a name
 * the server connection does not know (26000, a transaction pooler) makes
 * the statement run again unnamed, once, outside a transaction block, and
 * fail with KEEL_ECONN inside one. Returns the errors of keel_pg_query().
 * Loop thread only.
 */
KEEL_EXTERN int keel_pg_query_cached(keel_pg *c, const char *sql, int nparams,
                                     const char *const *values, keel_pg_result_cb cb, void *data);

/* true when connected and usable now; false for NULL. Never fails.
 * Loop thread only. */
KEEL_EXTERN bool keel_pg_is_connected(const keel_pg *c);

/* The backend process id of the current session, 0 when not connected or
 * c is NULL. Through a pooler it is the pooler's cancel key for this
 * client (any non-zero number), not a server process: ask the server
 * (SELECT pg_backend_pid()) inside a transaction for that. Never fails.
 * Loop thread only. */
KEEL_EXTERN int keel_pg_backend_pid(const keel_pg *c);

/* The underlying PGconn (a `PGconn *`, owned by keel, replaced at every
 * reconnect) or NULL between connect attempts or for a NULL c; for escaping
 * functions only: never run blocking calls on it. Loop thread only. */
KEEL_EXTERN void *keel_pg_raw(keel_pg *c);

/* Text of the last error this connection saw ("SQLSTATE 23505: duplicate
 * key...", a connection error, the reason a call was refused); "" when
 * none; "connection is NULL" for NULL. Owned by c, valid until the next
 * keel call on c. Loop thread only. */
KEEL_EXTERN const char *keel_pg_last_error(const keel_pg *c);

/*
 * Forces a reconnect (e.g. after the caller saw the server restart), also
 * out of the stopped state a permanent error (KEEL_EAUTH, KEEL_ENODB) or
 * opts.reconnect = false left. The work is done on a later loop iteration:
 * no callback runs inside this call. Statements in flight are then judged
 * as on a lost connection (replies already in kept, else KEEL_EINDOUBT or
 * KEEL_ECONN); queued ones go out on the new session.
 * Returns 0, UV_EINVAL (NULL c) or KEEL_ECLOSING after keel_pg_close().
 * Loop thread only.
 */
KEEL_EXTERN int keel_pg_reset(keel_pg *c);

typedef struct keel_pg_stats {
  uint64_t queries;           /* counter: statements completed (any status; health probes
                                 not included) */
  uint64_t errors;            /* counter: statements failed with KEEL_EPG */
  uint64_t connects;          /* counter: successful connects */
  uint64_t disconnects;       /* counter: connection losses */
  uint64_t reconnects;        /* counter: reconnect attempts */
  uint64_t in_flight;         /* gauge: statements sent, result not yet in */
  uint64_t queued;            /* gauge: statements waiting to be sent (<= opts.max_pending) */
  bool connected;             /* gauge */
  uint64_t in_doubt;          /* counter: statements that got KEEL_EINDOUBT */
  uint64_t statement_retries; /* counter: statements sent again unnamed after the server did
                                 not know their prepared name (AUTO statement mode) */
  bool unnamed;               /* gauge: keel_pg_query_cached() sends unnamed statements
                                 (statement_mode UNNAMED, or AUTO after detection) */
  uint64_t reserved_[8];      /* ABI room: filled with zero */
} keel_pg_stats;

/* Fills *out (reserved_ with zero). Does nothing when c or out is NULL.
 * Loop thread only. */
KEEL_EXTERN void keel_pg_get_stats(const keel_pg *c, keel_pg_stats *out);

/*
 * Closes the connection: the socket, timers and any host name lookup close,
 * then, on a later loop iteration, queued and in-flight queries get
 * UV_ECANCELED (in-flight ones first, in the order they were queued; one
 * whose reply had arrived in full gets that reply; a statement already sent
 * may still have run on the server), a new keel_pg_query() from those
 * callbacks returns KEEL_ECLOSING, and last cb (may be NULL; its object
 * argument is the freed c, for identity only). No callback runs during this
 * call, and nothing else is called after cb; after it uv_loop_close()
 * succeeds. Never fails. NULL-safe; a second call does nothing; callable
 * from inside any callback of c (c stays valid until the callback
 * returns). Loop thread only.
 */
KEEL_EXTERN void keel_pg_close(keel_pg *c, keel_close_cb cb, void *data);

/* ---- pool ---------------------------------------------------------------- */

/* Default bound on requests waiting for a pool connection (max_waiters). */
#define KEEL_PG_POOL_MAX_WAITERS_DEFAULT 65536u

typedef struct keel_pg_pool_opts {
  keel_pg_opts conn;           /* per-connection options (conn.conninfo required) */
  unsigned size;               /* connections, default 4, >= 1 */
  uint32_t acquire_timeout_ms; /* waiters fail with UV_ETIMEDOUT after this, also
                                  while the server is unreachable; 0 = none
                                  (default 30000) */
  unsigned max_waiters;        /* queries, acquires and transactions waiting for a
                                  connection; KEEL_EFULL beyond; 0 = the default
                                  KEEL_PG_POOL_MAX_WAITERS_DEFAULT (65536) */
  uint32_t pipeline_depth;     /* pool statements (keel_pg_pool_query*; never an
                                  acquire or a transaction) one member may have
                                  in flight: when every member is busy, the next
                                  goes pipelined behind those of the member
                                  running the fewest (never one held by an
                                  acquire or a transaction), up to this many;
                                  0 or 1 (default): one at a time */
  uint32_t reserved32_;        /* ABI room: zero */
  uint64_t reserved_[7];       /* ABI room: zero (opts_init does); never set */
} keel_pg_pool_opts;

/* Zeroes *opts and fills the defaults above. NULL-safe. Thread-safe. */
KEEL_EXTERN void keel_pg_pool_opts_init(keel_pg_pool_opts *opts);

/*
 * Creates a pool of opts->size connections and starts connecting them
 * (non-blocking). Requests may be made at once; they wait until a member is
 * connected. opts (conninfo included) is copied. opts.conn.on_state and
 * on_notify are called for each member connection with opts.conn.data.
 * Returns 0 and sets *out; UV_EINVAL (NULL loop, opts, out or conninfo,
 * size 0, a bad backoff); UV_ENOMEM; or any other error keel_pg_new()
 * returns for a member connection. *out is untouched on failure; members
 * already started are closed (their handles finish closing when the loop
 * runs). Loop thread only.
 */
KEEL_EXTERN int keel_pg_pool_new(uv_loop_t *loop, const keel_pg_pool_opts *opts,
                                 keel_pg_pool **out);

/*
 * Runs one statement on the first member that is connected and free (FIFO
 * waiters); with opts.pipeline_depth > 1 and every member busy, pipelined
 * behind the statements of the connected member running the fewest (its
 * own sync: a failure never aborts its neighbours, but it waits for those
 * ahead of it). sql and values are copied. cb (may be NULL) is called exactly
 * once, on a later loop iteration: its keel_pg is the connection that ran
 * it, with the statuses of keel_pg_result_cb; or NULL when the request
 * failed before getting one: UV_ETIMEDOUT after opts.acquire_timeout_ms
 * (the result's error text and keel_pg_pool_last_error() say why: every
 * member busy, or the server unreachable with the members' last error),
 * UV_ECANCELED at close, or the error keel_pg_query() returned for the
 * member (UV_ENOMEM). A member that is down never gets work.
 * Returns 0; UV_EINVAL (NULL pool or sql, nparams < 0, values NULL with
 * nparams > 0); UV_ENOMEM; KEEL_EFULL (max_waiters already wait);
 * KEEL_ECLOSING after keel_pg_pool_close(). Nothing is queued on error.
 * Loop thread only.
 */
KEEL_EXTERN int keel_pg_pool_query(keel_pg_pool *pool, const char *sql, int nparams,
                                   const char *const *values, keel_pg_result_cb cb, void *data);

/* keel_pg_pool_query() for a statement run many times: prepared once per
 * session of each connection (see keel_pg_query_cached). Same callback,
 * errors and thread rule as keel_pg_pool_query(). */
KEEL_EXTERN int keel_pg_pool_query_cached(keel_pg_pool *pool, const char *sql, int nparams,
                                          const char *const *values, keel_pg_result_cb cb,
                                          void *data);

/* status 0 and a connected member for the caller's exclusive use until
 * keel_pg_pool_release(); or conn NULL with UV_ETIMEDOUT (no member
 * connected and free within opts.acquire_timeout_ms; keel_pg_pool_last_error()
 * says why) or UV_ECANCELED (the pool closed first). */
typedef void (*keel_pg_acquire_cb)(keel_pg_pool *pool, keel_pg *conn, int status, void *data);

/*
 * Waits (FIFO) for a member that is connected and free; cb (required) is
 * called exactly once, on a later loop iteration. The connection may go
 * down while you hold it (its statements then fail as keel_pg_query()
 * says); give it back with keel_pg_pool_release() in any case.
 * Returns 0; UV_EINVAL (NULL pool or cb); UV_ENOMEM; KEEL_EFULL
 * (max_waiters already wait); KEEL_ECLOSING after keel_pg_pool_close().
 * Loop thread only.
 */
KEEL_EXTERN int keel_pg_pool_acquire(keel_pg_pool *pool, keel_pg_acquire_cb cb, void *data);

/*
 * Gives an acquired connection back (queries still queued on it finish
 * first); no callback runs inside this call. Returns 0; UV_EINVAL (NULL
 * pool or conn, or conn is not a member acquired by keel_pg_pool_acquire():
 * a transaction's connection is given back by keel_pg_tx_done() only);
 * KEEL_ECLOSING after keel_pg_pool_close() (the connection closes with the
 * pool). Loop thread only.
 */
KEEL_EXTERN int keel_pg_pool_release(keel_pg_pool *pool, keel_pg *conn);

/* Transactions: BEGIN [ISOLATION LEVEL ...], the user's steps, then COMMIT,
 * or ROLLBACK when the user finishes with an error or a statement fails. */
typedef enum keel_pg_isolation {
  KEEL_PG_READ_COMMITTED = 0,
  KEEL_PG_REPEATABLE_READ,
  KEEL_PG_SERIALIZABLE
} keel_pg_isolation;

/*
 * The user's body: issue statements with keel_pg_query(conn, ...) (they run
 * inside the transaction, in order) and, when done, call
 * keel_pg_tx_done(tx, 0) to COMMIT or keel_pg_tx_done(tx, err) to ROLLBACK.
 */
typedef void (*keel_pg_tx_fn)(keel_pg_tx *tx, keel_pg *conn, void *data);

/*
 * The transaction's outcome, exactly once, on a later loop iteration than
 * any keel call of yours:
 *   0              COMMIT succeeded.
 *   KEEL_EPG       a statement failed (sqlstate: the FIRST failing
 *                  statement's SQLSTATE, e.g. 40001, 40P01, 23505, 42601 —
 *                  never the 25P02 of the statements after it), or COMMIT
 *                  failed (e.g. 40001 at COMMIT); rolled back.
 *   KEEL_EINDOUBT  COMMIT was sent and the connection was lost before its
 *                  answer: it may have committed. Not rolled back, not
 *                  committed as far as keel knows; never retry blindly.
 *   KEEL_ECONN     the connection was lost before COMMIT was sent: rolled
 *                  back by the server; or a statement of the body failed
 *                  with KEEL_ECONN (statement mode AUTO found a transaction
 *                  pooler at it; sqlstate "26000"): rolled back, run it
 *                  again.
 *   the user's error passed to keel_pg_tx_done() (sqlstate as for
 *                  KEEL_EPG when a statement had failed); rolled back.
 *   UV_ETIMEDOUT   no connection within opts.acquire_timeout_ms.
 *   UV_ECANCELED   the pool closed first (body never ran, or ran and was
 *                  ended by the close, or its BEGIN / ROLLBACK / COMMIT
 *                  was dropped by the close).
 *   UV_ENOMEM, KEEL_ESEND, ...  BEGIN or COMMIT could not be queued (what
 *                  keel_pg_query() returned); rolled back.
 * sqlstate is NULL when there is none; valid during the call only.
 */
typedef void (*keel_pg_tx_done_cb)(keel_pg_pool *pool, int status, const char *sqlstate,
                                   void *data);

/*
 * Acquires a connected member, runs BEGIN, calls body, and after
 * keel_pg_tx_done() commits or rolls back, gives the connection back and
 * calls done (required) exactly once. Statements the body queues are bound
 * to the session BEGIN ran in: if the connection is lost meanwhile they
 * fail with KEEL_ECONN (never run in autocommit on the new session) and
 * done gets KEEL_ECONN. Closing the pool while a body runs calls done with
 * UV_ECANCELED; a later keel_pg_tx_done() on it does nothing (allowed
 * until the pool's close callback has run).
 * Returns 0; UV_EINVAL (NULL pool, body or done, bad isolation); UV_ENOMEM;
 * KEEL_EFULL (max_waiters already wait); KEEL_ECLOSING after
 * keel_pg_pool_close(). done is not called on error. Loop thread only.
 */
KEEL_EXTERN int keel_pg_pool_transaction(keel_pg_pool *pool, keel_pg_isolation isolation,
                                         keel_pg_tx_fn body, keel_pg_tx_done_cb done, void *data);

/*
 * Ends the transaction body: status 0 → COMMIT, < 0 → ROLLBACK and done
 * gets status. When a statement of the body failed it rolls back even if
 * status is 0, and done gets that first failure's status (KEEL_EPG, or
 * KEEL_ECONN when a transaction pooler was found at it) and SQLSTATE; also
 * when status is KEEL_EPG (the error of a statement after it), while any
 * other status of yours is what done gets. Call it exactly once per
 * transaction, from inside or after the body; further calls, and calls on
 * a transaction close ended, do nothing. done never runs inside this call.
 * The "operation finished" call, named like keel_job_done(),
 * keel_retry_done() and keel_breaker_done(). Loop thread only.
 */
KEEL_EXTERN void keel_pg_tx_done(keel_pg_tx *tx, int status);

/* Deprecated: the old name of keel_pg_tx_done(), kept (same behaviour, same
 * ABI) for programs written against keel 0.1. */
KEEL_EXTERN void keel_pg_tx_finish(keel_pg_tx *tx, int status);

typedef struct keel_pg_pool_stats {
  uint64_t queries;           /* counter: pool queries completed (any status) */
  uint64_t errors;            /* counter: pool queries failed with KEEL_EPG */
  uint64_t reconnects;        /* counter, summed over connections */
  uint64_t transactions;      /* counter: committed */
  uint64_t rollbacks;         /* counter: transactions that got a connection and
                                 ended without committing (in doubt excluded) */
  uint64_t in_flight;         /* gauge: statements sent, summed over connections */
  uint64_t waiting;           /* gauge: queries/acquires/transactions waiting */
  unsigned connected;         /* gauge: connections up */
  unsigned size;              /* configured size */
  uint64_t in_doubt;          /* counter: transactions whose COMMIT outcome is unknown */
  uint64_t acquire_timeouts;  /* counter: waiters failed with UV_ETIMEDOUT */
  uint64_t statement_retries; /* counter, summed over connections (keel_pg_stats) */
  bool unnamed;               /* gauge: the members send unnamed statements only
                                 (conn.statement_mode UNNAMED, or AUTO after one
                                 member detected a transaction pooler) */
  uint64_t reserved_[8];      /* ABI room: filled with zero */
} keel_pg_pool_stats;

/* Fills *out (every field, reserved_ zeroed). NULL-safe (does nothing).
 * Loop thread only. */
KEEL_EXTERN void keel_pg_pool_get_stats(const keel_pg_pool *pool, keel_pg_pool_stats *out);

/* Text of the last error the pool or any of its connections saw; "" when
 * none; "pool is NULL" for NULL. Valid until the next call on the pool.
 * Loop thread only. */
KEEL_EXTERN const char *keel_pg_pool_last_error(const keel_pg_pool *pool);

/*
 * Closes every connection and frees the pool. No callback runs inside this
 * call. On later loop iterations every request accepted before gets its
 * callback once: waiting queries, acquires and transactions get
 * UV_ECANCELED; queries and transaction statements on the connections get
 * what keel_pg_close() gives them (UV_ECANCELED); a transaction whose body
 * was running gets UV_ECANCELED (a later keel_pg_tx_done() on it does
 * nothing), one whose BEGIN, COMMIT or ROLLBACK was queued or sent gets
 * that statement's outcome (UV_ECANCELED, or KEEL_EINDOUBT for a COMMIT
 * the connection reports in doubt). Then cb (may be NULL; its object
 * argument is the freed pool, for identity only); after it,
 * uv_loop_close() can return 0. Calls made after this one return
 * KEEL_ECLOSING. NULL-safe; a second call does nothing; callable from
 * inside any callback of the pool (query, acquire, body, done, on_state,
 * on_notify). Loop thread only.
 */
KEEL_EXTERN void keel_pg_pool_close(keel_pg_pool *pool, keel_close_cb cb, void *data);

struct keel_serve;

/*
 * Shows c on the keel_serve server s under name (keel/serve.h), as kind
 * "pg". The registration is dropped from s when c's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or c closing). Loop thread only.
 */
KEEL_EXTERN int keel_pg_serve(struct keel_serve *s, keel_pg *c, const char *name);

/*
 * Shows pool on the keel_serve server s under name (keel/serve.h), as kind
 * "pg_pool". The registration is dropped from s when pool's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or pool closing). Loop thread only.
 */
KEEL_EXTERN int keel_pg_pool_serve(struct keel_serve *s, keel_pg_pool *pool, const char *name);

/* ---- identifiers ------------------------------------------------------ */

/*
 * Writes ident as a quoted SQL identifier into buf ("order" → "\"order\"",
 * embedded quotes doubled). With allow_qualified, one '.' splits schema and
 * name ("app.orders" → "\"app\".\"orders\""). Each part must be 1..63 bytes.
 * Returns the length written (excluding the NUL), UV_EINVAL (NULL, empty,
 * too long, more than one '.', or a '.' without allow_qualified) or
 * UV_ENOBUFS when cap is too small. Thread-safe.
 */
KEEL_EXTERN int keel_pg_quote_ident(char *buf, size_t cap, const char *ident, bool allow_qualified);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_PG_H */
