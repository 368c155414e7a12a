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
 * Everything is loop-thread only except keel_queue_push_threadsafe().
 */
#ifndef KEEL_QUEUE_H
#define KEEL_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"
#include "keel/retry.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_queue keel_queue;

/* One attempt of a job, handed to the process function. Valid until
 * keel_job_done() is called for it (and, after a timeout, until that late
 * call). */
typedef struct keel_job keel_job;

/*
 * Runs one attempt of a job. payload is the pointer given to push. The
 * attempt ends with keel_job_done(job, status), called exactly once, now or
 * later from the loop thread.
 */
typedef void (*keel_queue_process_fn)(keel_queue *q, keel_job *job, void *payload, void *data);

/* A successful job (status 0). */
typedef void (*keel_queue_complete_cb)(keel_queue *q, keel_job *job, void *payload, void *data);

/*
 * A failed attempt (the seed's onError). final is true when the job will not
 * be retried (retries exhausted, or the classifier said the error is not
 * retryable, or it was cancelled); attempts counts the attempts so far.
 */
typedef void (*keel_queue_error_cb)(keel_queue *q, keel_job *job, void *payload, int status,
                                    unsigned attempts, bool final, void *data);

/*
 * The queue is done with a payload: called exactly once for every job that
 * push accepted, after on_complete / on_error: status 0 (completed), the
 * final failure, or UV_ECANCELED (cancelled, or still queued at close).
 * Free the payload here.
 */
typedef void (*keel_queue_release_fn)(keel_queue *q, void *payload, int status, void *data);

/* Nothing is pending, waiting for a retry or running. */
typedef void (*keel_queue_drain_cb)(keel_queue *q, void *data);

/* Returns nonzero when a failure with this status may be retried. */
typedef int (*keel_queue_classify_fn)(int status, void *data);

typedef struct keel_queue_opts {
  unsigned concurrency;               /* jobs running at once; default 1 (the seed's), >= 1 */
  unsigned max_retries;               /* retries after the first attempt; default 3 */
  keel_backoff retry_backoff;         /* default fixed 1000 ms (the seed's retryDelay) */
  uint64_t timeout_ms;                /* per attempt; 0 = none (default). A timed-out attempt
                                         fails with UV_ETIMEDOUT. */
  size_t max_pending;                 /* pushes beyond this many pending jobs get KEEL_EFULL;
                                         0 = unbounded (default) */
  keel_queue_complete_cb on_complete; /* may be NULL */
  keel_queue_error_cb on_error;       /* may be NULL */
  keel_queue_release_fn release;      /* may be NULL */
  keel_queue_drain_cb on_drain;       /* may be NULL */
  keel_queue_classify_fn classify;    /* NULL: every failure is retryable except
                                         UV_ECANCELED, UV_EINVAL, KEEL_EABORTED */
  void *data;                         /* passed to every callback above */
  uint64_t seed;                      /* jitter seed; 0 = from uv_hrtime() */
  uint32_t rate_interval_ms;          /* jobs/s is measured over this interval; default 1000 */
} keel_queue_opts;

/* Fills opts with the defaults above. */
KEEL_EXTERN void keel_queue_opts_init(keel_queue_opts *opts);

/*
 * Creates a queue. process is required; opts is copied.
 * Returns 0 and sets *out; UV_EINVAL (NULL loop/process/opts/out,
 * concurrency 0, bad backoff: keel_queue_new_ex() says which); UV_ENOMEM.
 * *out is untouched on failure.
 */
KEEL_EXTERN int keel_queue_new(uv_loop_t *loop, keel_queue_process_fn process,
                               const keel_queue_opts *opts, keel_queue **out);

/* Like keel_queue_new(), and explains a failure: writes the reason
 * (NUL-terminated, truncated to why_cap) into why_buf, "" on success.
 * why_buf may be NULL. */
KEEL_EXTERN int keel_queue_new_ex(uv_loop_t *loop, keel_queue_process_fn process,
                                  const keel_queue_opts *opts, keel_queue **out, char *why_buf,
                                  size_t why_cap);

/*
 * Pushes a job with the given priority (any int; higher runs first, equal
 * priorities in push order). Jobs start on a later loop iteration, never
 * inside this call.
 *
 * payload  owned by the caller until opts.release is called for it (never
 *          freed by keel).
 * id_out   may be NULL; receives an id for keel_queue_cancel().
 *
 * Returns 0; KEEL_EFULL when max_pending jobs are already pending (nothing
 * taken); UV_EINVAL for a NULL queue; UV_ENOMEM; UV_ECANCELED while closing.
 * Loop thread only.
 */
KEEL_EXTERN int keel_queue_push(keel_queue *q, void *payload, int priority, uint64_t *id_out);

/* Per-job overrides for keel_queue_push_ex(). */
typedef struct keel_queue_push_opts {
  int priority;
  int max_retries;             /* < 0: the queue's (default) */
  const keel_backoff *backoff; /* NULL: the queue's; copied */
  uint64_t timeout_ms;         /* 0: the queue's; UINT64_MAX: none */
} keel_queue_push_opts;

KEEL_EXTERN void keel_queue_push_opts_init(keel_queue_push_opts *opts);

/* Pushes with per-job retry/timeout overrides. Errors as keel_queue_push(),
 * plus UV_EINVAL for a bad backoff (message in keel_queue_last_error()). */
KEEL_EXTERN int keel_queue_push_ex(keel_queue *q, void *payload, const keel_queue_push_opts *opts,
                                   uint64_t *id_out);

/*
 * Thread-safe push: callable from any thread. The job is handed to the loop
 * through one uv_async_t (many pushes per wake-up) and pushed there.
 * Returns 0 (the job will run, or be released with UV_ECANCELED if the queue
 * closes first), UV_ECANCELED when close has begun (nothing taken), UV_EINVAL
 * or UV_ENOMEM. max_pending is not applied to these pushes. Must not be
 * called after the close callback has run.
 */
KEEL_EXTERN int keel_queue_push_threadsafe(keel_queue *q, void *payload, int priority);

/*
 * Ends the attempt: status 0 for success or a negative error. Returns 0;
 * KEEL_ESTALE when the attempt had already timed out (the call is ignored
 * and the attempt's handle is freed); UV_EINVAL for NULL or a handle that
 * already reported. Loop thread only.
 */
KEEL_EXTERN int keel_job_done(keel_job *job, int status);

/* The job's id, payload, priority and attempt number (1 for the first). */
KEEL_EXTERN uint64_t keel_job_id(const keel_job *job);
KEEL_EXTERN void *keel_job_payload(const keel_job *job);
KEEL_EXTERN int keel_job_priority(const keel_job *job);
KEEL_EXTERN unsigned keel_job_attempt(const keel_job *job);

/*
 * Cancels a job that is pending or waiting for a retry: on_error is called
 * with UV_ECANCELED and final = true, then release, both before this returns.
 * Returns 0; KEEL_ENOTFOUND when the job is running, finished or unknown;
 * UV_EINVAL for NULL.
 */
KEEL_EXTERN int keel_queue_cancel(keel_queue *q, uint64_t id);

/* Stops starting jobs (running ones finish; retries still become pending). */
KEEL_EXTERN int keel_queue_pause(keel_queue *q);
/* Starts jobs again. */
KEEL_EXTERN int keel_queue_resume(keel_queue *q);
/* Changes the concurrency now (more jobs start at once when raised; when
 * lowered, running jobs finish first). Returns 0 or UV_EINVAL for 0. */
KEEL_EXTERN int keel_queue_set_concurrency(keel_queue *q, unsigned concurrency);

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
  uint64_t cancelled;      /* counter */
  bool paused;             /* gauge */
  unsigned concurrency;    /* gauge */
  keel_queue_latency wait; /* push (or retry due) → start */
  keel_queue_latency run;  /* start → done */
  double jobs_per_second;  /* completions over the last full rate interval */
} keel_queue_stats;

/* Fills *out. */
KEEL_EXTERN void keel_queue_get_stats(const keel_queue *q, keel_queue_stats *out);

/* Text of the last error; "" when none. */
KEEL_EXTERN const char *keel_queue_last_error(const keel_queue *q);

/*
 * Closes the queue. NULL-safe. Pending and waiting jobs are released now
 * with UV_ECANCELED (on_error is not called for them). Running attempts
 * (and timed-out ones) must still call keel_job_done(); their jobs are then
 * released with the status they report, without retries. cb (may be NULL)
 * runs on a later loop iteration once every attempt has reported and every
 * handle is closed. Thread-safe pushes racing with close either ran or were
 * released with UV_ECANCELED.
 */
KEEL_EXTERN void keel_queue_close(keel_queue *q, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_QUEUE_H */
