/*
 * keel/pgqueue.h — a durable job queue in PostgreSQL, shared by many
 * processes on many machines.
 *
 * Jobs live in one table (<schema>.pgqueue_jobs, installed and migrated by
 * keel). Any process enqueues (alone, in a batch of one statement, or inside
 * its own transaction so the job commits with the business write); worker
 * processes fetch with FOR UPDATE SKIP LOCKED, hold each job under a lease
 * that one heartbeat statement renews for all of the process's jobs, and
 * end it with keel_pgqueue_job_done(job, status), batched into few commits.
 * Every terminal write is fenced by (id, attempt, owner, state = running):
 * a worker whose lease expired changes nothing. Expired leases are rescued
 * by one process at a time. The guarantee is at-least-once: handlers must be
 * idempotent (docs/pgqueue.md says how).
 *
 *     static void work(keel_pgqueue *q, keel_pgqueue_job *job, void *data) {
 *       send_mail(keel_pgqueue_job_payload(job));
 *       keel_pgqueue_job_done(job, 0);        // or later, from the loop
 *     }
 *     keel_pgqueue_opts o;
 *     keel_pgqueue_opts_init(&o);
 *     o.conninfo = "host=... dbname=app";
 *     o.queue = "mail";
 *     o.process = work;                       // NULL: enqueue only
 *     o.concurrency = 16;
 *     keel_pgqueue *q;
 *     keel_pgqueue_new(loop, &o, &q);
 *     keel_pgqueue_job_opts j; keel_pgqueue_job_opts_init(&j);
 *     j.payload = "{\"to\":\"a@example.com\"}";
 *     keel_pgqueue_enqueue(q, NULL, &j, 1, on_enqueued, NULL);
 *
 * Everything is loop-thread only except the two opts_init functions.
 * Memory is bounded: at most concurrency + prefetch jobs are held, and at
 * most max_pending statements wait on the queue's connection.
 */
#ifndef KEEL_PGQUEUE_H
#define KEEL_PGQUEUE_H

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

typedef struct keel_pgqueue keel_pgqueue;

/*
 * One attempt of a job, handed to the process function. Valid from the
 * process call until keel_pgqueue_job_done() returned for it (also when the
 * attempt timed out or its lease was lost first: done must still be called,
 * once), or until the queue's close callback, whichever is first.
 */
typedef struct keel_pgqueue_job keel_pgqueue_job;

/* The schema version this build installs (table keel_pgqueue_migrations). */
#define KEEL_PGQUEUE_SCHEMA_VERSION 1

/*
 * Runs one attempt. End it with keel_pgqueue_job_done(job, status), exactly
 * once, now or later from the loop thread. Called from the loop, never
 * inside a keel call of yours; keel_pgqueue_close() may be called from
 * here.
 */
typedef void (*keel_pgqueue_process_fn)(keel_pgqueue *q, keel_pgqueue_job *job, void *data);

/*
 * This process no longer holds the job's lease: a heartbeat found the row
 * rescued, cancelled or taken by another worker, the lease ran out locally
 * while the server could not be reached, or a completion was fenced off.
 * Stop the work if you can; done() for it writes nothing. job is NULL when
 * the handle is already gone (a fenced completion). Called from the loop.
 */
typedef void (*keel_pgqueue_lease_lost_cb)(keel_pgqueue *q, keel_pgqueue_job *job, int64_t id,
                                           unsigned attempt, void *data);

/* Returns nonzero when a failed attempt with this status may be retried. */
typedef int (*keel_pgqueue_classify_fn)(int status, void *data);

/* The schema could not be installed (status < 0, reason in
 * keel_pgqueue_last_error(); retried every poll interval: called again
 * after each failed attempt), or it is installed (status 0: called once,
 * and never again after that). From the loop. */
typedef void (*keel_pgqueue_ready_cb)(keel_pgqueue *q, int status, void *data);

/* Defaults. */
#define KEEL_PGQUEUE_DEFAULT_LEASE_MS 30000u
#define KEEL_PGQUEUE_DEFAULT_POLL_MS 1000u
#define KEEL_PGQUEUE_DEFAULT_PREFETCH 16u
#define KEEL_PGQUEUE_DEFAULT_FLUSH_JOBS 256u
#define KEEL_PGQUEUE_DEFAULT_FLUSH_MS 2u
#define KEEL_PGQUEUE_DEFAULT_MAX_PENDING 10000u
/* Longest queue name, kind and unique key (bytes). */
#define KEEL_PGQUEUE_MAX_NAME 48u
#define KEEL_PGQUEUE_MAX_KIND 200u
#define KEEL_PGQUEUE_MAX_KEY 500u
/* Most jobs in one keel_pgqueue_enqueue() call. */
#define KEEL_PGQUEUE_MAX_BATCH 10000u

typedef struct keel_pgqueue_opts {
  const char *conninfo;                     /* required: the queue opens its own connection */
  const char *schema;                       /* default "keel"; [a-z_][a-z0-9_]{0,39} */
  const char *queue;                        /* the queue this object works and enqueues to by
                                               default; [A-Za-z0-9_.:-]{1,48}; default "default" */
  keel_pgqueue_process_fn process;          /* NULL: this object only enqueues */
  unsigned concurrency;                     /* jobs running at once; default 1, >= 1 */
  unsigned prefetch;                        /* extra jobs fetched beyond free slots, given back
                                               when they wait longer than lease_ms / 2;
                                               default 16 */
  uint32_t lease_ms;                        /* default 30000, >= 200 */
  uint32_t heartbeat_ms;                    /* default lease_ms / 3 (0) */
  uint32_t poll_ms;                         /* polling backstop (LISTEN wakes earlier); default
                                               1000 */
  uint32_t rescue_ms;                       /* expired-lease rescue and retention sweep;
                                               default lease_ms / 2 (0); UINT32_MAX = never */
  unsigned flush_jobs;                      /* completions flushed when this many wait; default
                                               256 */
  uint32_t flush_ms;                        /* ... or after this long; default 2; 0 = at once */
  unsigned max_attempts;                    /* default per job; default 25 */
  keel_backoff retry_backoff;               /* default exponential 1000 ms x2, cap 1 h */
  uint64_t timeout_ms;                      /* per attempt; 0 = none (default) */
  keel_pgqueue_classify_fn classify;        /* NULL: every failure is retried except UV_EINVAL,
                                               UV_ECANCELED and KEEL_EABORTED */
  keel_pgqueue_lease_lost_cb on_lease_lost; /* may be NULL */
  keel_pgqueue_ready_cb on_ready;           /* may be NULL */
  uint64_t done_retention_ms;               /* done and cancelled rows kept this long; 0 (default)
                                               deletes a done row at completion */
  uint64_t dead_retention_ms;               /* dead rows kept this long; default 7 days */
  uint32_t stats_ms;                        /* table gauges refreshed this often; default 5000;
                                               0 = never */
  uint32_t max_pending;                     /* statements waiting on the connection; default
                                               10000 */
  bool migrate;                             /* install/upgrade the schema at start; default true */
  void *data;                               /* passed to every callback */
  uint64_t reserved_[8];                    /* ABI room: zero (opts_init does); never set */
} keel_pgqueue_opts;

/* Zeroes *opts, then fills the defaults above. NULL-safe. Any thread. */
KEEL_EXTERN void keel_pgqueue_opts_init(keel_pgqueue_opts *opts);

/*
 * Creates the queue and starts connecting, migrating (opts.migrate), then
 * LISTENing and fetching (when opts.process is set), all on later loop
 * iterations. opts and its strings are copied.
 * Returns 0 and sets *out; UV_EINVAL for a NULL loop, opts or out, a
 * missing conninfo, a bad schema or queue name, concurrency 0, lease_ms <
 * 200, heartbeat_ms >= lease_ms, or a bad backoff (keel_pgqueue_new_ex()
 * says which); UV_ENOMEM; or an error of keel_pg_new(). *out is untouched on
 * failure. Loop thread only.
 */
KEEL_EXTERN int keel_pgqueue_new(uv_loop_t *loop, const keel_pgqueue_opts *opts,
                                 keel_pgqueue **out);

/* Like keel_pgqueue_new(), and writes the reason of a failure into why_buf
 * (NUL-terminated, truncated to why_cap; "" on success; may be NULL). */
KEEL_EXTERN int keel_pgqueue_new_ex(uv_loop_t *loop, const keel_pgqueue_opts *opts,
                                    keel_pgqueue **out, char *why_buf, size_t why_cap);

/* ---- enqueue ------------------------------------------------------------- */

typedef struct keel_pgqueue_job_opts {
  const char *queue;           /* NULL: the queue's opts.queue */
  const char *kind;            /* free text for handlers; NULL = "" */
  const char *payload;         /* JSON text; NULL = "{}". Checked twice: by keel's own
                                  JSON syntax check (keel_pgqueue_enqueue() returns
                                  UV_EINVAL, no callback), then by the server as jsonb
                                  (a refusal there: the callback gets UV_EINVAL);
                                  either way nothing of the batch is written */
  int priority;                /* higher first */
  int64_t delay_ms;            /* run no earlier than now + delay_ms; >= 0 */
  int max_attempts;            /* 0: the queue's; >= 1 otherwise */
  const char *unique_key;      /* NULL: none. While a job with this key is available or
                                  running in its queue, enqueueing another returns that
                                  job's id with existed = true */
  uint64_t timeout_ms;         /* 0: the worker's opts.timeout_ms */
  const keel_backoff *backoff; /* NULL: the worker's; copied (kind, base, factor, cap) */
  uint64_t reserved_[8];       /* ABI room: zero (opts_init does); never set */
} keel_pgqueue_job_opts;

/* Zeroes *opts. NULL-safe. Any thread. */
KEEL_EXTERN void keel_pgqueue_job_opts_init(keel_pgqueue_job_opts *opts);

/* One enqueued job: its id, and whether a job with its unique key existed
 * (then id is that job's and nothing was inserted for this entry). */
typedef struct keel_pgqueue_enqueued {
  int64_t id;
  bool existed;
} keel_pgqueue_enqueued;

/*
 * The outcome of an enqueue: status 0 and n entries in input order; or an
 * error with jobs NULL: KEEL_EPG (SQLSTATE in keel_pgqueue_last_error()),
 * UV_EINVAL (a value the server refused, SQLSTATE class 22, e.g. a payload
 * that passed keel's syntax check but not jsonb's: nothing written),
 * KEEL_EINDOUBT (autocommit insert lost in flight: read back before
 * enqueueing again, or use a unique key), KEEL_ECONN, UV_ECANCELED (the
 * queue or the connection closed first). Inside a caller's transaction a
 * status 0 means "written in the transaction": it commits with it.
 */
typedef void (*keel_pgqueue_enqueue_cb)(keel_pgqueue *q, int status,
                                        const keel_pgqueue_enqueued *jobs, size_t n, void *data);

/*
 * Inserts n jobs (1..KEEL_PGQUEUE_MAX_BATCH) in one statement, and NOTIFYs
 * each queue concerned once (constant payload, so PostgreSQL folds repeats
 * within a transaction) once the jobs are committed: in your transaction
 * (conn given) from the insert trigger, at your commit; on the queue's own
 * connection from a separate non-durable transaction pipelined right after
 * the insert's durable commit (docs/pgqueue.md, Wake-ups).
 *
 * conn     NULL: the queue's own connection (autocommit). Otherwise a
 *          keel_pg of yours, e.g. the connection of a keel_pg_pool
 *          transaction body, or one inside your own BEGIN: the jobs then
 *          commit or roll back with your transaction.
 * jobs     n job descriptions; copied.
 * cb       may be NULL; called once on a later loop iteration.
 *
 * Before the schema is ready (on_ready not yet called with 0), an enqueue
 * with conn NULL waits for it; one on your connection is refused with
 * UV_EAGAIN (it could not be sent inside your transaction in time).
 *
 * Returns 0; UV_EINVAL with nothing written and the reason in
 * keel_pgqueue_last_error() (NULL q or jobs, n out of range, a queue name
 * outside [A-Za-z0-9_.:-]{1,48}, kind or unique key too long, negative
 * delay_ms, max_attempts < 0, a bad backoff); UV_EAGAIN (conn given before
 * the schema is ready: nothing sent); UV_ENOMEM; KEEL_ECLOSING once close
 * began; or what keel_pg_query() returned (KEEL_EFULL, ...). Loop thread
 * only.
 */
KEEL_EXTERN int keel_pgqueue_enqueue(keel_pgqueue *q, keel_pg *conn,
                                     const keel_pgqueue_job_opts *jobs, size_t n,
                                     keel_pgqueue_enqueue_cb cb, void *data);

/* ---- work ---------------------------------------------------------------- */

/*
 * Ends the attempt: status >= 0 is success (the row becomes done, or is
 * deleted when done_retention_ms is 0); < 0 a failure: retried after the
 * job's backoff when the classifier allows it and attempts remain, else
 * dead. The write is batched (opts.flush_jobs / flush_ms) and fenced.
 * No callback runs inside this call. The handle is freed on return.
 * Returns 0 (written or queued); KEEL_ESTALE when the attempt had timed out
 * (its failure was already recorded; the handle is freed); KEEL_ELOST when
 * the lease was lost (nothing written; freed); KEEL_ECLOSING after close
 * began (the job was given back; freed); UV_EINVAL for NULL. Loop thread
 * only.
 */
KEEL_EXTERN int keel_pgqueue_job_done(keel_pgqueue_job *job, int status);

/* Like keel_pgqueue_job_done(), with an error text kept in the row's
 * last_error and error history (NULL: keel_strerror(status)). Copied. */
KEEL_EXTERN int keel_pgqueue_job_fail(keel_pgqueue_job *job, int status, const char *message);

/* Accessors, valid while the handle is. 0 / NULL for NULL. The strings are
 * owned by the handle. Loop thread only. */
KEEL_EXTERN int64_t keel_pgqueue_job_id(const keel_pgqueue_job *job);
KEEL_EXTERN unsigned keel_pgqueue_job_attempt(const keel_pgqueue_job *job); /* 1 = first */
KEEL_EXTERN unsigned keel_pgqueue_job_max_attempts(const keel_pgqueue_job *job);
KEEL_EXTERN int keel_pgqueue_job_priority(const keel_pgqueue_job *job);
KEEL_EXTERN const char *keel_pgqueue_job_kind(const keel_pgqueue_job *job);
KEEL_EXTERN const char *keel_pgqueue_job_payload(const keel_pgqueue_job *job); /* JSON */
/* Enqueue (or due) time to start, in ms, measured by the server's clock. */
KEEL_EXTERN double keel_pgqueue_job_pickup_ms(const keel_pgqueue_job *job);

/* Stops starting jobs (running ones go on; fetched ones wait, then are given
 * back). Returns 0, UV_EINVAL (NULL), KEEL_ECLOSING. Loop thread only. */
KEEL_EXTERN int keel_pgqueue_pause(keel_pgqueue *q);
/* Starts jobs again (on a later iteration). Errors as pause. */
KEEL_EXTERN int keel_pgqueue_resume(keel_pgqueue *q);
/* Changes the concurrency; more jobs are fetched on a later iteration when
 * raised; when lowered, running jobs finish first. Returns 0; UV_EINVAL for
 * NULL or 0 (unchanged); KEEL_ECLOSING. Loop thread only. */
KEEL_EXTERN int keel_pgqueue_set_concurrency(keel_pgqueue *q, unsigned concurrency);

/* ---- by id ------------------------------------------------------------- */

/*
 * Outcome of cancel / redrive: status 0 and the state the row had before
 * ("available", "running", "dead"); KEEL_ENOTFOUND when no row with the id
 * is in a state the verb applies to (prev_state NULL); or the statement's
 * error (KEEL_EPG, KEEL_EINDOUBT, KEEL_ECONN, UV_ECANCELED).
 */
typedef void (*keel_pgqueue_id_cb)(keel_pgqueue *q, int status, int64_t id, const char *prev_state,
                                   void *data);

/*
 * Cancels job id if it is available (also delayed or waiting for a retry)
 * or running: the row becomes cancelled; a running attempt's completion
 * will be fenced off (its worker sees on_lease_lost at its next heartbeat).
 * cb may be NULL. Returns 0; UV_EINVAL (NULL q, id <= 0); UV_ENOMEM;
 * KEEL_ECLOSING; or what keel_pg_query() returned. Loop thread only.
 */
KEEL_EXTERN int keel_pgqueue_cancel(keel_pgqueue *q, int64_t id, keel_pgqueue_id_cb cb, void *data);

/*
 * Re-drives dead job id: it becomes available now with extra_attempts
 * more attempts (>= 1) and its error history kept. Errors as cancel, plus
 * UV_EINVAL for extra_attempts 0. Loop thread only.
 */
KEEL_EXTERN int keel_pgqueue_redrive(keel_pgqueue *q, int64_t id, unsigned extra_attempts,
                                     keel_pgqueue_id_cb cb, void *data);

/* ---- stats --------------------------------------------------------------- */

typedef struct keel_pgqueue_latency {
  double mean_ms;
  double p50_ms;
  double p99_ms;
  double max_ms;
} keel_pgqueue_latency;

typedef struct keel_pgqueue_stats {
  /* table gauges of opts.queue, as of the last refresh (opts.stats_ms) */
  uint64_t available; /* due now */
  uint64_t scheduled; /* available, run_at in the future */
  uint64_t running;   /* running (any worker) */
  uint64_t dead;
  double oldest_available_ms; /* age of the oldest due job; 0 when none */
  uint64_t dead_tuples;       /* pg_stat_user_tables.n_dead_tup of the jobs table */
  uint64_t live_tuples;       /* pg_stat_user_tables.n_live_tup */
  /* this object */
  uint64_t held;               /* gauge: jobs fetched and not finished here */
  uint64_t running_here;       /* gauge: of those, started */
  unsigned concurrency;        /* gauge */
  bool paused;                 /* gauge */
  bool connected;              /* gauge */
  uint64_t enqueued;           /* counter: jobs inserted through this object */
  uint64_t fetches;            /* counter: fetch statements */
  uint64_t fetched;            /* counter: jobs fetched */
  uint64_t completed;          /* counter: successes written */
  uint64_t failed;             /* counter: failures written (retry or dead) */
  uint64_t retried;            /* counter: of those, to be retried */
  uint64_t dead_here;          /* counter: of those, dead */
  uint64_t timed_out;          /* counter: attempts that timed out */
  uint64_t lease_lost;         /* counter: jobs whose lease this object lost */
  uint64_t fenced;             /* counter: completions that changed nothing */
  uint64_t given_back;         /* counter: prefetched jobs given back */
  uint64_t rescued;            /* counter: expired leases this object rescued */
  uint64_t heartbeats;         /* counter */
  uint64_t flushes;            /* counter: completion batches written */
  uint64_t flush_retries;      /* counter: completion batches sent again after
                                  a transient error rolled them back */
  keel_pgqueue_latency fetch;  /* fetch statement round trip */
  keel_pgqueue_latency pickup; /* enqueue (or run_at) → start, server clock */
  keel_pgqueue_latency run;    /* start → done */
  uint64_t reserved_[7];       /* ABI room: filled with zero */
} keel_pgqueue_stats;

/* Fills *out (NULL-safe: nothing for NULL q or out). Loop thread only. */
KEEL_EXTERN void keel_pgqueue_get_stats(const keel_pgqueue *q, keel_pgqueue_stats *out);

struct keel_serve;

/*
 * Shows q on the keel_serve server s under name (keel/serve.h), as kind
 * "pgqueue". The registration is dropped from s when q's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or the object closing). Loop thread only.
 */
KEEL_EXTERN int keel_pgqueue_serve(struct keel_serve *s, keel_pgqueue *q, const char *name);

/* Text of the last error; "" when none; "queue is NULL" for NULL. Valid
 * until the next call on q. Loop thread only. */
KEEL_EXTERN const char *keel_pgqueue_last_error(const keel_pgqueue *q);

/* This object's lease owner id (unique per object), e.g. for logs. */
KEEL_EXTERN const char *keel_pgqueue_owner(const keel_pgqueue *q);

/*
 * Closes the queue: stops fetching, gives back fetched jobs not started and
 * the leases of running ones (they become available again: at-least-once),
 * writes pending completions, closes the connection. Enqueues, cancels and
 * redrives accepted before get their callbacks (their outcome if the
 * connection answered, else UV_ECANCELED), then cb (may be NULL) on a later
 * iteration; after it uv_loop_close() succeeds. done() on a running job
 * after close began returns KEEL_ECLOSING. For a clean hand-off, pause and
 * wait for stats.running_here == 0 first. NULL-safe; a second call does
 * nothing; callable from any callback of q. Loop thread only.
 */
KEEL_EXTERN void keel_pgqueue_close(keel_pgqueue *q, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_PGQUEUE_H */
