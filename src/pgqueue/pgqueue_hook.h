/* Private hooks of the durable queue for other keel modules (not installed,
 * not part of the API). */
#ifndef KEEL_PGQUEUE_HOOK_H
#define KEEL_PGQUEUE_HOOK_H

#include <stdbool.h>

#include "keel/pgqueue.h"

/*
 * For src/saga: the caller completed the job's attempt itself, in a
 * statement of its own that deleted the job's row with the queue's fence
 * (id, attempt, lease_owner = keel_pgqueue_owner(q), state = 'running';
 * the queue must have done_retention_ms 0, so a success is a delete).
 * `written` says whether that delete found the row. The queue sends no
 * completion for it: the handle leaves the queue's lists (no more
 * heartbeats; the slot is free) and is freed. written counts as completed;
 * not written as a fenced completion (stats.fenced, on_lease_lost with a
 * NULL job), as keel_pgqueue_job_done() would have.
 *
 * Returns 0; KEEL_ESTALE (the attempt had timed out: its failure is already
 * queued), KEEL_ELOST (the lease was seen lost first: nothing more
 * happens), KEEL_ECLOSING (close began: the job is given back by close,
 * which changes nothing if the row is gone); UV_EINVAL for NULL. The handle
 * is freed in every case. No callback runs inside this call. Loop thread
 * only.
 */
int keel__pgqueue_job_done_written(keel_pgqueue_job *job, bool written);

#endif
