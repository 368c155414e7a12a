/*
 * keel/saga.h — sagas: multi-step operations across services, each step
 * with an action and a compensation, persisted step by step in PostgreSQL
 * and resumed by another process after a crash.
 *
 * A keel_saga object holds one saga type: its ordered steps (compensatable
 * steps, at most one pivot, then retriable steps), and orchestrates the
 * sagas of that type. Every saga instance is a row of <schema>.saga_instances
 * (state, current step, version, data as jsonb, deadline) with one row per
 * step attempt in <schema>.saga_steps. A step attempt is recorded as
 * started before its callback runs (write-ahead); its outcome is committed
 * together with the saga's advance (and the next step's "started" record)
 * in one statement guarded by the saga's version: a writer that lost the
 * saga to another process changes nothing and gets KEEL_ECONFLICT.
 * Execution rides on the durable queue (keel/pgqueue.h): starting a saga
 * writes its row (with step 0's first attempt recorded as started) and one
 * job (unique key "saga:<id>") in one statement; the
 * worker that leases it drives the saga; a crashed orchestrator is an
 * expired lease, and the process that takes the job next resumes from the
 * log. Each action and compensation gets a stable idempotency key
 * ("saga:<id>:<step>:action" / ":compensation") to hand to the
 * participant: an attempt whose outcome is unknown is re-sent with the
 * same key, never guessed. docs/saga.md has the states, the SQL and what a
 * participant must do.
 *
 *     static void book(keel_saga *s, keel_saga_call *c, void *data) {
 *       book_item(keel_saga_call_key(c), keel_saga_call_data(c), c);
 *     }   // ... the reply calls keel_saga_call_done(c, 0) or (c, KEEL_EABORTED)
 *     keel_saga_step steps[3];
 *     keel_saga_step_init(&steps[0], "book_item", book, release);
 *     keel_saga_step_init(&steps[1], "charge_wallet", charge, NULL); // the pivot
 *     keel_saga_step_init(&steps[2], "reserve_slot", reserve, NULL);
 *     steps[1].kind = KEEL_SAGA_PIVOT; steps[2].kind = KEEL_SAGA_RETRIABLE;
 *     keel_saga_opts o; keel_saga_opts_init(&o);
 *     o.conninfo = "host=... dbname=app"; o.type = "order";
 *     o.steps = steps; o.nsteps = 3;
 *     keel_saga *s; keel_saga_new(loop, &o, &s);
 *     keel_saga_start_opts so; keel_saga_start_opts_init(&so);
 *     so.data = "{\"item\":7,\"wallet\":3,\"amount\":40}";
 *     keel_saga_start(s, &so, on_started, NULL);
 *
 * Everything is loop-thread only except the opts_init functions.
 * Memory is bounded: at most opts.concurrency sagas run here at once, and
 * at most opts.max_pending starts / re-drives wait for the schema.
 */
#ifndef KEEL_SAGA_H
#define KEEL_SAGA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"
#include "keel/retry.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_saga keel_saga;
/* One attempt of an action or a compensation, handed to a step callback. */
typedef struct keel_saga_call keel_saga_call;

/* The schema version this build installs (table <schema>.saga_migrations). */
#define KEEL_SAGA_SCHEMA_VERSION 1
/* Most steps in one saga type. */
#define KEEL_SAGA_MAX_STEPS 64u
/* Longest saga type and step name (bytes): [A-Za-z0-9_.-]. */
#define KEEL_SAGA_MAX_NAME 40u
/* Defaults. */
#define KEEL_SAGA_DEFAULT_CONCURRENCY 8u
#define KEEL_SAGA_DEFAULT_MAX_ATTEMPTS 3u
#define KEEL_SAGA_DEFAULT_COMP_ATTEMPTS 5u
#define KEEL_SAGA_DEFAULT_TIMEOUT_MS 30000u
#define KEEL_SAGA_DEFAULT_LEASE_MS 30000u
#define KEEL_SAGA_DEFAULT_MAX_PENDING 10000u
#define KEEL_SAGA_DEFAULT_POOL_SIZE 2u
#define KEEL_SAGA_DEFAULT_STATS_MS 5000u
/* Failed sagas listed in keel_saga_stats.stuck_ids. */
#define KEEL_SAGA_STUCK_LIST 16u

/* The states of a saga instance (column state). */
typedef enum keel_saga_state {
  KEEL_SAGA_RUNNING = 0,  /* actions go forward */
  KEEL_SAGA_COMPENSATING, /* compensations run in reverse order */
  KEEL_SAGA_DONE,         /* every action succeeded (terminal) */
  KEEL_SAGA_COMPENSATED,  /* every compensation needed succeeded (terminal) */
  KEEL_SAGA_FAILED        /* a compensation ran out of attempts: an operator's turn;
                             keel_saga_redrive() resumes compensating */
} keel_saga_state;

/* Name of a state ("running", ...), as stored in the table; "?" otherwise. */
KEEL_EXTERN const char *keel_saga_state_name(keel_saga_state state);

/*
 * Step kinds, in this order within a saga (checked by keel_saga_new()):
 * compensatable steps, then at most one pivot, then retriable steps.
 *   COMPENSATABLE  has a compensation; a failed action is retried up to
 *                  max_attempts, then the saga compensates.
 *   PIVOT          the point of no return: once it succeeded the saga only
 *                  goes forward. Retried with the same key while its
 *                  outcome is unknown; KEEL_EABORTED (a certain refusal)
 *                  compensates the steps before it. No compensation.
 *   RETRIABLE      after the pivot: retried with backoff until it succeeds
 *                  (or an operator steps in). No compensation.
 */
typedef enum keel_saga_step_kind {
  KEEL_SAGA_COMPENSATABLE = 0,
  KEEL_SAGA_PIVOT,
  KEEL_SAGA_RETRIABLE
} keel_saga_step_kind;

/*
 * An action or a compensation. End the attempt with keel_saga_call_done()
 * exactly once, now or later from the loop thread. Called from the loop,
 * never inside a keel call of yours; keel_saga_close() may be called from
 * here.
 */
typedef void (*keel_saga_step_fn)(keel_saga *s, keel_saga_call *call, void *data);

typedef struct keel_saga_step {
  const char *name;               /* required, [A-Za-z0-9_.-]{1,40}; copied */
  keel_saga_step_kind kind;       /* default COMPENSATABLE */
  keel_saga_step_fn action;       /* required */
  keel_saga_step_fn compensation; /* required for COMPENSATABLE, NULL otherwise */
  uint64_t timeout_ms;            /* per attempt of the action or compensation; an
                                     attempt that takes longer has an unknown outcome
                                     (retried with the same key); default 30000;
                                     0 = none */
  unsigned max_attempts;          /* COMPENSATABLE: action attempts before the saga
                                     compensates; default 3, >= 1 */
  unsigned comp_attempts;         /* compensation attempts before the saga is failed
                                     (per re-drive); default 5, >= 1 */
  keel_backoff backoff;           /* between attempts of the action or compensation;
                                     default exponential 100 ms x2, cap 10 s */
  uint64_t reserved_[8];          /* ABI room: zero (step_init does); never set */
} keel_saga_step;

/* Zeroes *step, then sets name, action, compensation and the defaults
 * above. NULL-safe. Any thread. */
KEEL_EXTERN void keel_saga_step_init(keel_saga_step *step, const char *name,
                                     keel_saga_step_fn action, keel_saga_step_fn compensation);

/* Reports a saga that reached a terminal state in this process (done,
 * compensated or failed) after a step of it ran here. Called from the loop;
 * may be NULL. Not called once keel_saga_close() began (also when on_stuck,
 * which runs first for a failed saga, called it). */
typedef void (*keel_saga_end_cb)(keel_saga *s, int64_t id, keel_saga_state state, void *data);

/* A saga became failed (its compensation ran out of attempts): called once
 * per failure, by the one process whose guarded write made it failed;
 * last_error is the last compensation error (valid during the call). Called
 * from the loop. */
typedef void (*keel_saga_stuck_cb)(keel_saga *s, int64_t id, unsigned step, const char *last_error,
                                   void *data);

/* The schema (the durable queue's, then the saga log's) could not be
 * installed (status < 0, reason in keel_saga_last_error(); retried: called
 * again after each failed attempt), or it is installed (status 0: called
 * once, and never again after that). From the loop. */
typedef void (*keel_saga_ready_cb)(keel_saga *s, int status, void *data);

/*
 * Persistence points, for tests that kill the orchestrator (opts.test_hook):
 * before / after the write-ahead "started" record, before / after the
 * participant call, before / after the outcome commit. The outcome commit of
 * a step also records the next attempt as started, so BEFORE_COMMIT of one
 * attempt is followed by BEFORE_RECORD of the next, at the same moment.
 * Step 0's first attempt is recorded by the start's statement: its
 * BEFORE_RECORD / AFTER_RECORD (step 0, attempt 1) fire in the process that
 * calls keel_saga_start(), around that statement (AFTER_RECORD only when
 * the saga was written, not for an existing start key).
 */
typedef enum keel_saga_point {
  KEEL_SAGA_BEFORE_RECORD = 0,
  KEEL_SAGA_AFTER_RECORD,
  KEEL_SAGA_BEFORE_CALL,
  KEEL_SAGA_AFTER_CALL,
  KEEL_SAGA_BEFORE_COMMIT,
  KEEL_SAGA_AFTER_COMMIT
} keel_saga_point;

/* A test hook: called at each persistence point, on the loop thread, inside
 * keel's own processing (it may _exit() the process; it must not call
 * keel). */
typedef void (*keel_saga_hook_fn)(keel_saga *s, keel_saga_point point, int64_t id, unsigned step,
                                  bool compensation, unsigned attempt, void *data);

typedef struct keel_saga_opts {
  const char *conninfo;        /* required */
  const char *schema;          /* default "keel"; [a-z_][a-z0-9_]{0,39}; the log tables
                                  live beside the durable queue's jobs table */
  const char *type;            /* required: the saga type, [A-Za-z0-9_.-]{1,40}; its
                                  jobs go to durable queue "saga.<type>" */
  const keel_saga_step *steps; /* required; copied */
  size_t nsteps;               /* 1..KEEL_SAGA_MAX_STEPS */
  bool orchestrate;            /* run sagas of this type here (default true); false:
                                  only start, re-drive and read stats */
  unsigned concurrency;        /* sagas run here at once; default 8 */
  uint32_t lease_ms;           /* durable-queue lease of a running saga; default 30000,
                                  >= 200. A crashed orchestrator's sagas resume elsewhere
                                  within about 1.5 x lease_ms */
  uint32_t poll_ms;            /* durable-queue polling backstop; default 1000 */
  unsigned pool_size;          /* log connections; 0 (default): 2. Log writes are
                                  pipelined on them (each its own transaction):
                                  fewer server backends to wake. A server whose
                                  commits wait long for the disk wants more: one
                                  connection commits its writes one after another */
  uint64_t deadline_ms;        /* default saga deadline from its start (start opts may
                                  set another); 0 = none (default) */
  uint32_t max_pending;        /* starts / re-drives waiting for the schema; default 10000 */
  uint32_t stats_ms;           /* table gauges refreshed this often; default 5000; 0 = never */
  bool migrate;                /* install / upgrade the log schema; default true */
  keel_saga_end_cb on_end;     /* may be NULL */
  keel_saga_stuck_cb on_stuck; /* may be NULL */
  keel_saga_ready_cb on_ready; /* may be NULL */
  keel_saga_hook_fn test_hook; /* NULL (default) in production */
  void *data;                  /* passed to every callback */
  uint64_t reserved_[8];       /* ABI room: zero (opts_init does); never set */
} keel_saga_opts;

/* Zeroes *opts, then fills the defaults above. NULL-safe. Any thread. */
KEEL_EXTERN void keel_saga_opts_init(keel_saga_opts *opts);

/*
 * Creates the saga type's orchestrator: a log connection pool, a durable
 * queue (its schema migrated first), then the log schema (opts.migrate),
 * all on later loop iterations; on_ready tells when starts are written.
 * opts, its strings and the steps are copied.
 * Returns 0 and sets *out; UV_EINVAL for a NULL loop, opts or out, a missing
 * conninfo, a bad schema, type or step name, no steps or too many, a step
 * without action, a COMPENSATABLE step without compensation or another
 * kind with one, kinds out of order (two pivots, a compensatable step after
 * the pivot or a retriable one), max_attempts or comp_attempts 0, a bad
 * backoff, concurrency 0, lease_ms < 200 (keel_saga_new_ex() says which);
 * UV_ENOMEM; or an error of keel_pg_pool_new() / keel_pgqueue_new(). *out
 * is untouched on failure. Loop thread only.
 */
KEEL_EXTERN int keel_saga_new(uv_loop_t *loop, const keel_saga_opts *opts, keel_saga **out);

/* Like keel_saga_new(), and writes the reason of a failure into why_buf
 * (NUL-terminated, truncated to why_cap; "" on success; may be NULL). */
KEEL_EXTERN int keel_saga_new_ex(uv_loop_t *loop, const keel_saga_opts *opts, keel_saga **out,
                                 char *why_buf, size_t why_cap);

/* ---- starting, re-driving ------------------------------------------------ */

typedef struct keel_saga_start_opts {
  const char *data;      /* the saga's data, JSON text; NULL = "{}"; copied */
  uint64_t deadline_ms;  /* from now; 0 = opts.deadline_ms. An overdue saga that has
                            not reached its pivot compensates (a pivot in flight is
                            never cut: see docs/saga.md) */
  const char *start_key; /* NULL: none. A second start with the same key (per type)
                            writes nothing and reports the first saga's id with
                            existed = true. [ -~]{1,200}; copied */
  uint64_t reserved_[8]; /* ABI room: zero (opts_init does); never set */
} keel_saga_start_opts;

/* Zeroes *opts. NULL-safe. Any thread. */
KEEL_EXTERN void keel_saga_start_opts_init(keel_saga_start_opts *opts);

/*
 * The outcome of a start: status 0 with the saga's id (existed: a saga with
 * the start key was there; then nothing was written and id is its id, or 0
 * when it committed too late to be read back); or an error with id 0:
 * UV_EINVAL (data is not JSON: nothing written), KEEL_EPG (reason in
 * keel_saga_last_error()), KEEL_EINDOUBT (the statement was lost in flight:
 * start again with the same start_key), KEEL_ECONN, UV_ETIMEDOUT,
 * UV_ECANCELED (closed first).
 */
typedef void (*keel_saga_start_cb)(keel_saga *s, int status, int64_t id, bool existed, void *data);

/*
 * Starts a saga: inserts its row (state running, step 0, its first attempt
 * recorded as started) and its durable-queue job in one statement (one
 * commit); a worker (this process or another) runs it.
 * Before the schema is ready, the start waits (opts.max_pending).
 * opts may be NULL (defaults). cb may be NULL; called once on a later loop
 * iteration. Returns 0; UV_EINVAL (NULL s, a start_key too long or with
 * control characters); UV_ENOMEM; KEEL_EFULL (max_pending starts and
 * re-drives already wait); KEEL_ECLOSING once close began. Loop thread only.
 */
KEEL_EXTERN int keel_saga_start(keel_saga *s, const keel_saga_start_opts *opts,
                                keel_saga_start_cb cb, void *data);

/* The outcome of a re-drive or a resume: status 0; KEEL_ENOTFOUND (no saga
 * with that id in a state the verb applies to); KEEL_ECONFLICT (resume:
 * another process advanced the saga first; this one stopped); KEEL_EPG,
 * KEEL_EINDOUBT, KEEL_ECONN, UV_ETIMEDOUT; UV_ECANCELED (closed first). */
typedef void (*keel_saga_id_cb)(keel_saga *s, int status, int64_t id, void *data);

/*
 * Re-drives a failed saga (an operator's call, e.g. after fixing a
 * participant): in one transaction it becomes compensating again at the
 * step that was stuck, with a fresh budget of comp_attempts, and a job is
 * enqueued. cb may be NULL. Returns 0; UV_EINVAL (NULL s, id <= 0);
 * UV_ENOMEM; KEEL_EFULL; KEEL_ECLOSING. Loop thread only.
 */
KEEL_EXTERN int keel_saga_redrive(keel_saga *s, int64_t id, keel_saga_id_cb cb, void *data);

/*
 * Runs saga id in this process now, outside the durable queue (an
 * operator's tool, and how tests show the version guard): status 0 once it
 * is terminal (done, compensated or failed), KEEL_ENOTFOUND when there is
 * no such saga of this type, KEEL_ECONFLICT when another process advanced
 * it in between (this run stopped without calling anything further).
 * Works with opts.orchestrate false too; uses the steps' callbacks. The run
 * counts against opts.concurrency. cb may be NULL. Returns 0; UV_EINVAL (NULL s, id <=
 * 0); UV_ENOMEM; KEEL_EBUSY (opts.concurrency sagas already run here);
 * KEEL_ECLOSING. Loop thread only.
 */
KEEL_EXTERN int keel_saga_resume(keel_saga *s, int64_t id, keel_saga_id_cb cb, void *data);

/* ---- inside a step callback ----------------------------------------------- */

/*
 * Ends the attempt. status:
 *   0              the action / compensation took effect (for a
 *                  compensation also "there was nothing to undo").
 *   KEEL_EABORTED  (an action) the participant refused for certain and
 *                  applied nothing (insufficient funds): no retry; before
 *                  the pivot the saga compensates.
 *   other < 0      failed or unknown (KEEL_EINDOUBT, a timeout, ...):
 *                  retried with the same key after the step's backoff
 *                  while attempts remain.
 * data_json (keel_saga_call_done_data) replaces the saga's data when the
 * attempt succeeded (e.g. to keep a participant's reference for a later
 * step); it must be JSON (else the write fails and the attempt's outcome is
 * treated as unknown). Copied.
 * No callback runs inside this call; the handle is freed on return.
 * Returns 0; KEEL_ESTALE when the attempt had timed out first (its outcome
 * was recorded as unknown; the handle is freed); KEEL_ECLOSING after close
 * began (nothing written; freed); UV_EINVAL for NULL. Loop thread only.
 */
KEEL_EXTERN int keel_saga_call_done(keel_saga_call *call, int status);
KEEL_EXTERN int keel_saga_call_done_data(keel_saga_call *call, int status, const char *data_json);

/* Accessors, valid until done. 0 / NULL / false for NULL. Strings are owned
 * by the handle. Loop thread only. */
KEEL_EXTERN int64_t keel_saga_call_saga_id(const keel_saga_call *call);
KEEL_EXTERN unsigned keel_saga_call_step(const keel_saga_call *call); /* 0-based */
KEEL_EXTERN const char *keel_saga_call_step_name(const keel_saga_call *call);
KEEL_EXTERN bool keel_saga_call_is_compensation(const keel_saga_call *call);
/* 1 = first attempt of this action / compensation (crashed attempts count). */
KEEL_EXTERN unsigned keel_saga_call_attempt(const keel_saga_call *call);
/* The stable idempotency key: "saga:<id>:<step>:action" or
 * "saga:<id>:<step>:compensation" — the same for every attempt, in every
 * process. Pass it to the participant. */
KEEL_EXTERN const char *keel_saga_call_key(const keel_saga_call *call);
/* The saga's data (JSON text) as of this attempt. */
KEEL_EXTERN const char *keel_saga_call_data(const keel_saga_call *call);

/* ---- stats ---------------------------------------------------------------- */

typedef struct keel_saga_latency {
  double mean_ms;
  double p50_ms;
  double p99_ms;
  double max_ms;
} keel_saga_latency;

typedef struct keel_saga_stats {
  /* table gauges of this type, as of the last refresh (opts.stats_ms) */
  uint64_t running;
  uint64_t compensating;
  uint64_t failed_now;                     /* sagas in state failed */
  int64_t stuck_ids[KEEL_SAGA_STUCK_LIST]; /* the oldest failed sagas' ids (0-filled) */
  /* this object (counters unless marked) */
  uint64_t started;        /* sagas started through this object */
  uint64_t done;           /* sagas this object brought to done */
  uint64_t compensated;    /* ... to compensated */
  uint64_t failed;         /* ... to failed */
  uint64_t redriven;       /* re-drives written */
  uint64_t actions;        /* action attempts called */
  uint64_t compensations;  /* compensation attempts called */
  uint64_t retries;        /* attempts that were retries */
  uint64_t timeouts;       /* attempts that timed out */
  uint64_t conflicts;      /* runs stopped because another process advanced the saga */
  uint64_t running_here;   /* gauge: sagas being run by this object */
  bool ready;              /* gauge: schema installed */
  keel_saga_latency step;  /* one attempt: its record to its outcome commit */
  keel_saga_latency added; /* per step, keel's own time: from the previous outcome
                              (or the run's start) to the callback, plus from done to
                              the outcome commit — the log's cost */
  uint64_t reserved_[8];   /* ABI room: filled with zero */
} keel_saga_stats;

/* Fills *out (NULL-safe). Loop thread only. */
KEEL_EXTERN void keel_saga_get_stats(const keel_saga *s, keel_saga_stats *out);

/* Text of the last error; "" when none; "saga is NULL" for NULL. Valid until
 * the next call on s. Loop thread only. */
KEEL_EXTERN const char *keel_saga_last_error(const keel_saga *s);

struct keel_serve;

/*
 * Shows s on the keel_serve server srv under name (keel/serve.h), as kind
 * "saga". The registration is dropped when s's close begins; closing srv
 * first is safe too. Returns 0, UV_EINVAL (NULL argument, bad name),
 * KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or KEEL_ECLOSING.
 * Loop thread only.
 */
KEEL_EXTERN int keel_saga_serve(struct keel_serve *srv, keel_saga *s, const char *name);

/*
 * Closes the orchestrator: stops taking sagas, gives back the leases of the
 * sagas running here (another process resumes them from the log), closes
 * the pool and the queue. Starts, re-drives and resumes accepted before get
 * their callbacks (their outcome, or UV_ECANCELED) before cb (may be NULL),
 * on a later iteration; after cb, uv_loop_close() succeeds. A step callback
 * still running must call done before cb runs (it then returns
 * KEEL_ECLOSING) or not at all: the handles are freed with s. NULL-safe; a
 * second call does nothing; callable from any callback of s. Loop thread
 * only.
 */
KEEL_EXTERN void keel_saga_close(keel_saga *s, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_SAGA_H */
