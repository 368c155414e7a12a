/*
 * keel/queue.h — an in-memory priority job processor.
 *
 * Jobs are pushed with a priority (higher runs first, equal priorities run in
 * push order) and handed to your process function, at most `concurrency` at
 * a time. A job ends when you call keel_job_done(job, status) — inside the
 * process function or later. Failed jobs are retried with a backoff policy
 * (waiting on a timer without holding a concurrency slot), then reported as
 * final failures. Per-job timeouts, cancel by id, pause/resume, a bound on
 * pending jobs, a thread-safe push and statistics complete it.
 *
 *     static void process(keel_queue *q, keel_job *job, void *payload, void *data) {
 *       start_work(payload, job);             // later: keel_job_done(job, 0)
 *     }
 *     keel_queue_opts o;
 *     keel_queue_opts_init(&o);               // concurrency 1, 3 retries, 1 s apart
 *     o.concurrency = 2;
 *     keel_queue *q;
 *     keel_queue_new(loop, process, &o, &q);
 *     uint64_t id;
 *     keel_queue_push(q, user, 10, &id);      // priority 10 before priority 0
 *
 * Everything is loop-thread only except keel_queue_push_threadsafe() and
 * the two opts_init functions. Memory is bounded: at most max_pending jobs
 * held besides the running ones (default KEEL_QUEUE_DEFAULT_MAX_PENDING).
 */
#ifndef KEEL_QUEUE_H
#define KEEL_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "keel/adaptive.h"
#include "keel/common.h"
#include "keel/retry.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_queue keel_queue;

/*
 * One attempt of a job, handed to the process function (and to on_complete
 * and on_error for that attempt). The handle is valid from the process call
 * until keel_job_done() returns for it; if the attempt times out first, it
 * stays valid (for keel_job_done() only) until that late call. After
 * keel_job_done() returned, the handle is recycled for later attempts: do
 * not use it again.
 */
typedef struct keel_job keel_job;

/*
 * Runs one attempt of a job. payload is the pointer given to push. The
 * attempt ends with keel_job_done(job, status), called exactly once, now or
 * later from the loop thread. Called from the loop, never inside a keel
 * call of yours; keel_queue_close() may be called from here.
 */
typedef void (*keel_queue_process_fn)(keel_queue *q, keel_job *job, void *payload, void *data);

/* A successful attempt (status 0). Called inside keel_job_done() (that call
 * reports the outcome), before release. */
typedef void (*keel_queue_complete_cb)(keel_queue *q, keel_job *job, void *payload, void *data);

/*
 * A failed attempt (the seed's onError). final is true when the job will not
 * be retried (retries exhausted, the classifier said the error is not
 * retryable, the queue is closing, or it was cancelled); attempts counts the
 * attempts so far.
 *
 * job is the attempt's handle, or NULL when there is no attempt: the job was
 * cancelled (status UV_ECANCELED, final), no memory could be found to start
 * an attempt (status UV_ENOMEM; it counts as an attempt and is retried like
 * any failure), or no memory to put a due retry back in its priority level
 * (status UV_ENOMEM, final).
 *
 * Called inside keel_job_done() for a failure it reports, and from the loop
 * for timeouts, cancellations and the UV_ENOMEM cases; never inside
 * keel_queue_cancel() or keel_queue_close().
 */
typedef void (*keel_queue_error_cb)(keel_queue *q, keel_job *job, void *payload, int status,
                                    unsigned attempts, bool final, void *data);

/*
 * The queue is done with a payload: called exactly once for every job that
 * a push accepted, after on_complete / on_error: status 0 (completed), the
 * final failure, UV_ECANCELED (cancelled, or dropped by close), or
 * UV_ENOMEM (a thread-safe push the loop had no memory to queue). Free the
 * payload here. Never called inside a push, keel_queue_cancel() or
 * keel_queue_close().
 */
typedef void (*keel_queue_release_fn)(keel_queue *q, void *payload, int status, void *data);

/* Nothing is pending, waiting for a retry or running (called from the loop,
 * once per time the queue empties; never while closing): p-queue's "idle"
 * event. */
typedef void (*keel_queue_drain_cb)(keel_queue *q, void *data);

/* No job is pending any more: the last one has started (jobs may still run
 * or wait for a retry). p-queue's "empty" event. Called from the loop, once
 * per time the pending jobs run out; never while closing. Same type as
 * keel_queue_drain_cb. */
typedef keel_queue_drain_cb keel_queue_empty_cb;

/* Returns nonzero when a failure with this status may be retried. */
typedef int (*keel_queue_classify_fn)(int status, void *data);

/* Default of keel_queue_opts.max_pending: 1,048,576 jobs (about 50 MB of
 * job slots). */
#define KEEL_QUEUE_DEFAULT_MAX_PENDING ((size_t)1 << 20)
/* Defaults of the dispatch slice: at most this many attempts started, and
 * for at most this long, per loop iteration. */
#define KEEL_QUEUE_DEFAULT_SLICE_JOBS 4096u
#define KEEL_QUEUE_DEFAULT_SLICE_US 1000u

typedef struct keel_queue_opts {
  unsigned concurrency;               /* jobs running at once; default 1 (the seed's), >= 1 */
  unsigned max_retries;               /* retries after the first attempt; default 3;
                                         < UINT32_MAX */
  keel_backoff retry_backoff;         /* default fixed 1000 ms (the seed's retryDelay) */
  uint64_t timeout_ms;                /* per attempt; 0 = none (default). A timed-out attempt
                                         fails with UV_ETIMEDOUT. */
  size_t max_pending;                 /* bound on the jobs the queue holds that are not
                                         running: pending, waiting for a retry, and cancelled
                                         ones whose slot is not reclaimed yet. Pushes beyond
                                         it get KEEL_EFULL. Default
                                         KEEL_QUEUE_DEFAULT_MAX_PENDING; 0 = unbounded */
  keel_queue_complete_cb on_complete; /* may be NULL */
  keel_queue_error_cb on_error;       /* may be NULL */
  keel_queue_release_fn release;      /* may be NULL */
  keel_queue_drain_cb on_drain;       /* may be NULL */
  keel_queue_classify_fn classify;    /* NULL: every failure is retryable except
                                         UV_ECANCELED, UV_EINVAL, KEEL_EABORTED */
  void *data;                         /* passed to every callback above */
  uint64_t seed;                      /* jitter seed; 0 = from uv_hrtime() */
  uint32_t rate_interval_ms;          /* jobs/s is measured over this interval; default 1000 */
  uint32_t slice_jobs;                /* attempts started per loop iteration at most; then the
                                         loop runs its timers and I/O before the next slice.
                                         Default (and 0) KEEL_QUEUE_DEFAULT_SLICE_JOBS */
  uint32_t slice_us;                  /* and a slice ends once it has run this long (checked
                                         between attempts). Default (and 0)
                                         KEEL_QUEUE_DEFAULT_SLICE_US */
  keel_clock clock;                   /* time of retries and timeouts: default
                                         uv_now(loop). With an injected clock, advance it and
                                         call keel_queue_tick(): due retries and timeouts
                                         happen on the next loop iteration, no sleeping */
  keel_queue_empty_cb on_empty;       /* may be NULL (default) */
  const keel_adaptive_opts *adaptive; /* NULL (default): at most `concurrency` jobs run.
                                         Set: at most the adaptive limit (keel/adaptive.h)
                                         and at most `concurrency` (raise it to let the limit
                                         work); latency samples are the attempts' run times
                                         (on the injected clock when one is set), timeouts
                                         count as drops. Copied by keel_queue_new() */
  uint64_t reserved_[4];              /* ABI room: zero (opts_init does); never set */
} keel_queue_opts;

/* Zeroes *opts, then fills the defaults above. NULL-safe. Any thread. */
KEEL_EXTERN void keel_queue_opts_init(keel_queue_opts *opts);

/*
 * Creates a queue. process is required; opts is copied (nothing is kept of
 * it). No callback runs inside this call.
 *
 * Returns 0 and sets *out; UV_EINVAL for a NULL loop, process, opts or out,
 * concurrency 0, max_retries >= UINT32_MAX, a bad backoff or bad adaptive
 * options (keel_queue_new_ex() says which); UV_ENOMEM; or an error of
 * uv_async_init(). *out is untouched on failure. Loop thread only.
 */
KEEL_EXTERN int keel_queue_new(uv_loop_t *loop, keel_queue_process_fn process,
                               const keel_queue_opts *opts, keel_queue **out);

/* Like keel_queue_new(), and explains a failure: writes the reason
 * (NUL-terminated, truncated to why_cap) into why_buf, "" on success.
 * why_buf may be NULL. Same errors. Loop thread only. */
KEEL_EXTERN int keel_queue_new_ex(uv_loop_t *loop, keel_queue_process_fn process,
                                  const keel_queue_opts *opts, keel_queue **out, char *why_buf,
                                  size_t why_cap);

/*
 * Pushes a job with the given priority (any int; higher runs first, equal
 * priorities in push order). Jobs start on a later loop iteration, never
 * inside this call, and no callback runs inside it.
 *
 * payload  owned by the caller until opts.release is called for it (never
 *          freed by keel); on an error it stays the caller's.
 * id_out   may be NULL; receives an id for keel_queue_cancel(); untouched on
 *          failure.
 *
 * Returns 0; KEEL_EFULL when max_pending jobs are already held (pending,
 * waiting for a retry or cancelled, see keel_queue_opts); KEEL_ECLOSING once
 * keel_queue_close() has begun; UV_EINVAL for a NULL queue; UV_ENOMEM.
 * Nothing is taken on an error. Loop thread only.
 */
KEEL_EXTERN int keel_queue_push(keel_queue *q, void *payload, int priority, uint64_t *id_out);

/* Per-job overrides for keel_queue_push_ex(). */
typedef struct keel_queue_push_opts {
  int priority;
  int max_retries;             /* < 0: the queue's (default) */
  const keel_backoff *backoff; /* NULL: the queue's; copied */
  uint64_t timeout_ms;         /* 0: the queue's; UINT64_MAX: none */
  uint64_t reserved_[8];       /* ABI room: zero (opts_init does); never set */
} keel_queue_push_opts;

/* Zeroes *opts, then sets max_retries = -1 (the queue's). NULL-safe. Any
 * thread. */
KEEL_EXTERN void keel_queue_push_opts_init(keel_queue_push_opts *opts);

/* Pushes with per-job retry/timeout overrides (opts is copied). Errors as
 * keel_queue_push(), plus UV_EINVAL for NULL opts or a bad backoff (message
 * in keel_queue_last_error()). Loop thread only. */
KEEL_EXTERN int keel_queue_push_ex(keel_queue *q, void *payload, const keel_queue_push_opts *opts,
                                   uint64_t *id_out);

/*
 * Thread-safe push: callable from any thread, including while the loop
 * closes the queue. The job is handed to the loop through one uv_async_t
 * (many pushes per wake-up) and pushed there.
 *
 * Returns 0 (the job will run, or be released with UV_ECANCELED if the queue
 * closes first, or with UV_ENOMEM if the loop has no memory to queue it);
 * KEEL_ECLOSING once keel_queue_close() has begun (nothing taken: a pusher
 * should stop pushing to this queue); KEEL_EFULL when max_pending jobs are
 * held or handed over (nothing taken); UV_EINVAL for a NULL queue;
 * UV_ENOMEM.
 *
 * Threads: calls may run concurrently with each other and with the loop,
 * and keep returning KEEL_ECLOSING until the close callback returns. The
 * queue's memory is freed after the close callback returns and once no call
 * is inside this function any more; no call may start after the close
 * callback returned. So pass a close callback and stop (join) the pushing
 * threads there, or stop them before keel_queue_close().
 */
KEEL_EXTERN int keel_queue_push_threadsafe(keel_queue *q, void *payload, int priority);

/*
 * Ends the attempt: status 0 for success or a negative error (a positive
 * status counts as 0). The attempt's on_complete or on_error, and release
 * when the job ends, run inside this call, before it returns.
 *
 * Returns 0; KEEL_ESTALE when the attempt's timeout had passed: either the
 * timeout was already reported (the call only frees the handle), or the
 * deadline passed before the loop could fire it, in which case this call
 * reports the attempt as timed out (UV_ETIMEDOUT, retried per the policy,
 * counted in stats.timed_out), whatever status says; UV_EINVAL for NULL or a
 * handle that is not running (calling it twice for one attempt is a bug:
 * the handle may already serve another attempt). Also allowed after
 * keel_queue_close() began, for attempts still running. Loop thread only.
 */
KEEL_EXTERN int keel_job_done(keel_job *job, int status);

/* The job's id, payload, priority and attempt number (1 for the first).
 * 0 / NULL for a NULL job. Valid while the handle is (see keel_job). Loop
 * thread only. */
KEEL_EXTERN uint64_t keel_job_id(const keel_job *job);
KEEL_EXTERN void *keel_job_payload(const keel_job *job);
KEEL_EXTERN int keel_job_priority(const keel_job *job);
KEEL_EXTERN unsigned keel_job_attempt(const keel_job *job);

/*
 * Cancels a job that is pending or waiting for a retry. Nothing is called
 * inside this call: on a later loop iteration on_error gets (job NULL,
 * UV_ECANCELED, final = true), then release gets UV_ECANCELED. A cancelled
 * pending job keeps its slot (counted against max_pending) until the
 * dispatcher passes it or the queue closes.
 *
 * Returns 0; KEEL_ENOTFOUND when the job is running, finished, already
 * cancelled or unknown; KEEL_ECLOSING once keel_queue_close() has begun;
 * UV_EINVAL for a NULL queue; UV_ENOMEM (nothing cancelled). Loop thread
 * only.
 */
KEEL_EXTERN int keel_queue_cancel(keel_queue *q, uint64_t id);

/*
 * Cancels every job that is pending or waiting for a retry (p-queue's
 * clear(), BullMQ's drain()); running attempts go on. As with
 * keel_queue_cancel(), nothing is called inside this call: on a later loop
 * iteration each cleared job gets on_error (job NULL, UV_ECANCELED, final =
 * true), then release with UV_ECANCELED. Counted in stats.cancelled.
 *
 * count_out  may be NULL; receives the number of jobs cleared; untouched on
 *            failure.
 * Returns 0; KEEL_ECLOSING once close has begun; UV_EINVAL for a NULL
 * queue; UV_ENOMEM (nothing cleared). Loop thread only.
 */
KEEL_EXTERN int keel_queue_clear(keel_queue *q, uint64_t *count_out);

/*
 * Changes the priority of a job (p-queue's setPriority). A pending job
 * moves to the end of its new priority's jobs; a job waiting for a retry
 * gets the new priority when it becomes pending again. The id stays valid.
 * Returns 0; KEEL_ENOTFOUND when the job is running, finished, cancelled or
 * unknown; KEEL_ECLOSING once close has begun; UV_EINVAL for a NULL queue;
 * UV_ENOMEM (priority unchanged). Calls nothing. Loop thread only.
 */
KEEL_EXTERN int keel_queue_set_priority(keel_queue *q, uint64_t id, int priority);

/* Jobs pending with this priority (p-queue's sizeBy({priority})); 0 for a
 * NULL queue. Loop thread only. */
KEEL_EXTERN uint64_t keel_queue_count_priority(const keel_queue *q, int priority);

/* One priority level and its pending jobs. */
typedef struct keel_queue_priority_count {
  int priority;
  uint64_t pending;
} keel_queue_priority_count;

/*
 * Fills out[0..] with the priorities that have pending jobs, highest first,
 * at most cap of them, and returns how many levels there are in all (which
 * may exceed cap: call again with a larger array). A level whose jobs were
 * all cancelled may be listed with pending 0 until the dispatcher passes
 * it. 0 for a NULL queue. out may be NULL when cap is 0. Loop thread only.
 */
KEEL_EXTERN size_t keel_queue_priority_counts(const keel_queue *q, keel_queue_priority_count *out,
                                              size_t cap);

/* What keel_queue_when() waits for. */
typedef enum keel_queue_condition {
  KEEL_QUEUE_EMPTY = 0,   /* nothing pending (p-queue onEmpty) */
  KEEL_QUEUE_IDLE,        /* nothing pending, waiting for a retry or running
                             (p-queue onIdle) */
  KEEL_QUEUE_SIZE_BELOW,  /* fewer than n jobs pending (p-queue onSizeLessThan) */
  KEEL_QUEUE_NONE_RUNNING /* no attempt running (a timed-out one that has not
                             called keel_job_done() counts as running) */
} keel_queue_condition;

/* keel_queue_when()'s callback: status 0 when the condition held, or
 * UV_ECANCELED when the queue closed first. */
typedef void (*keel_queue_when_cb)(keel_queue *q, int status, void *data);

/* Bound on the keel_queue_when() waits of one queue. */
#define KEEL_QUEUE_MAX_WHEN 1024u

/*
 * Calls cb once, on a later loop iteration, as soon as the condition holds
 * (also when it already holds now: on the next iteration), like p-queue's
 * onEmpty() / onIdle() / onSizeLessThan(n) promises. n is used by
 * KEEL_QUEUE_SIZE_BELOW only. The condition is checked after each loop
 * iteration in which the queue did something, in the order the waits were
 * made. keel_queue_close() before that: cb gets UV_ECANCELED on a later
 * iteration, before the close callback. cb may close the queue.
 * Returns 0 (cb will be called exactly once); UV_EINVAL for a NULL queue or
 * cb or an unknown condition; KEEL_EFULL when KEEL_QUEUE_MAX_WHEN waits are
 * already registered; KEEL_ECLOSING once close has begun; UV_ENOMEM. Loop
 * thread only.
 */
KEEL_EXTERN int keel_queue_when(keel_queue *q, keel_queue_condition condition, uint64_t n,
                                keel_queue_when_cb cb, void *data);

/* Stops starting jobs (running ones finish; retries still become pending).
 * Returns 0, UV_EINVAL for NULL, KEEL_ECLOSING once close has begun. Loop
 * thread only. */
KEEL_EXTERN int keel_queue_pause(keel_queue *q);

/*
 * Pauses like keel_queue_pause() and tells when the attempts running at
 * that moment (and any started before the pause took hold) have finished:
 * cb (required) gets 0 on a later loop iteration once no attempt is
 * running — BullMQ's pause() that waits for the active jobs — or
 * UV_ECANCELED when the queue closes first. It is keel_queue_pause() then
 * keel_queue_when(q, KEEL_QUEUE_NONE_RUNNING, 0, cb, data); a resume in
 * between does not cancel cb. Errors as keel_queue_when() (nothing
 * paused on an error). Loop thread only.
 */
KEEL_EXTERN int keel_queue_pause_wait(keel_queue *q, keel_queue_when_cb cb, void *data);
/* Starts jobs again (on a later iteration). Errors as keel_queue_pause().
 * Loop thread only. */
KEEL_EXTERN int keel_queue_resume(keel_queue *q);
/* Changes the concurrency (more jobs start on a later iteration when raised;
 * when lowered, running jobs finish first). Returns 0; UV_EINVAL for a NULL
 * queue or 0 (queue unchanged); KEEL_ECLOSING once close has begun. Loop
 * thread only. */
KEEL_EXTERN int keel_queue_set_concurrency(keel_queue *q, unsigned concurrency);

/*
 * Inside on_error for a failure that will be retried (final false): the
 * delay in ms before the retry (the backoff's draw, jitter included; BullMQ
 * shows it as the job's next delay). 0 elsewhere and for NULL. Loop thread
 * only.
 */
KEEL_EXTERN uint64_t keel_queue_retry_delay_ms(const keel_queue *q);

/*
 * Re-reads the queue's clock (opts.clock) now: retries that became due and
 * attempts whose timeout passed are handled on the next loop iteration
 * (from the queue's timers, never inside this call). For tests that
 * advance an injected clock instead of sleeping; harmless with the default
 * clock. Returns 0, UV_EINVAL for NULL, KEEL_ECLOSING once close has begun.
 * Loop thread only.
 */
KEEL_EXTERN int keel_queue_tick(keel_queue *q);

/* Latency summary from a fixed log-bucket histogram, in microseconds. */
typedef struct keel_queue_latency {
  double mean_us;
  double p50_us;
  double p99_us;
  double max_us;
} keel_queue_latency;

typedef struct keel_queue_stats {
  uint64_t pending;        /* gauge: waiting to start */
  uint64_t waiting;        /* gauge: waiting for a retry */
  uint64_t running;        /* gauge */
  uint64_t pushed;         /* counter */
  uint64_t completed;      /* counter */
  uint64_t failed;         /* counter: final failures */
  uint64_t retried;        /* counter: retries scheduled */
  uint64_t timed_out;      /* counter: attempts that timed out */
  uint64_t cancelled;      /* counter: cancelled, or dropped by close */
  bool paused;             /* gauge */
  unsigned concurrency;    /* gauge */
  keel_queue_latency wait; /* push (or retry due) → start */
  keel_queue_latency run;  /* start → done */
  double jobs_per_second;  /* completions over the last full rate interval */
  uint64_t limit;          /* gauge: jobs allowed to run at once now: concurrency, or
                              the adaptive limit when lower (opts.adaptive) */
  uint64_t reserved_[7];   /* ABI room: filled with zero */
} keel_queue_stats;

/* Fills *out (NULL-safe: does nothing for a NULL q or out). Loop thread
 * only. */
KEEL_EXTERN void keel_queue_get_stats(const keel_queue *q, keel_queue_stats *out);

/* Text of the last error; "" when none; "queue is NULL" for NULL. The
 * string lives as long as the queue. Loop thread only. */
KEEL_EXTERN const char *keel_queue_last_error(const keel_queue *q);

/*
 * Closes the queue. NULL-safe; a second call does nothing. May be called
 * from inside any of the queue's callbacks (process, on_complete, on_error,
 * release, on_drain). No callback runs inside this call.
 *
 * From the call on, pushes, cancel, pause, resume and set_concurrency
 * return KEEL_ECLOSING. On a later loop iteration: cancellations not yet
 * reported get their on_error and release, then every job still pending or
 * waiting for a retry (and every thread-safe push not yet queued) is
 * released with UV_ECANCELED (on_error is not called for them). Running
 * attempts, and timed-out ones, must still call keel_job_done(); their jobs
 * are released with the status they report, without retries. cb (may be
 * NULL) runs last, on a later loop iteration, once every attempt has
 * reported and every handle is closed; q is still valid inside cb (only
 * keel_queue_get_stats, keel_queue_last_error and keel_queue_push_threadsafe,
 * which returns KEEL_ECLOSING, may be used) and freed when it returns.
 * Afterwards uv_loop_close() returns 0. Loop thread only.
 */
KEEL_EXTERN void keel_queue_close(keel_queue *q, keel_close_cb cb, void *data);

struct keel_serve;

/*
 * Shows q on the keel_serve server s under name (keel/serve.h), as kind
 * "queue". The registration is dropped from s when q's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or q closing). Loop thread only.
 */
KEEL_EXTERN int keel_queue_serve(struct keel_serve *s, keel_queue *q, const char *name);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_QUEUE_H */
