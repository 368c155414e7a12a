/* The job queue's scheduler core, without I/O: a chunked slab of job slots
 * (ids encode slot + generation, so cancel needs no hash map), one FIFO (a
 * ring of slot indices) per distinct priority level with the levels in a
 * sorted array (push and pop
 * O(1) for the few levels real workloads use, stable within a level), and
 * a min-heap of jobs waiting for a retry, ordered by due time. */
#ifndef KEEL_QUEUE_SCHED_H
#define KEEL_QUEUE_SCHED_H

#include <stdbool.h>
#include <stdint.h>

#include "keel/retry.h"

#define KEEL__NIL UINT32_MAX
#define KEEL__SLAB_CHUNK_BITS 12
#define KEEL__SLAB_CHUNK (1u << KEEL__SLAB_CHUNK_BITS)

typedef enum keel__job_state {
  KEEL__JOB_FREE = 0,
  KEEL__JOB_PENDING,
  KEEL__JOB_CANCELLED, /* still linked in its level's FIFO; skipped by pop */
  KEEL__JOB_WAITING,   /* in the retry heap */
  KEEL__JOB_RUNNING
} keel__job_state;

/* Per-job overrides, allocated only for keel_queue_push_ex() with options. */
typedef struct keel__job_overrides {
  keel_backoff backoff;
  bool has_backoff;
  int max_retries; /* < 0: the queue's */
  uint64_t timeout_ms;
} keel__job_overrides;

/* 40 bytes: the slab is most of the queue's memory per job, and the first
 * write into it most of the cost of a burst of pushes. */
typedef struct keel__job_slot {
  void *payload;
  union {
    uint64_t ready_ns; /* PENDING: when it became pending (wait time) */
    uint64_t due_ms;   /* WAITING: when the retry is due */
  } at;
  int32_t priority;
  uint32_t generation;
  union {
    uint32_t next;     /* FREE: free-list link */
    uint32_t heap_pos; /* WAITING: index in the retry heap */
  } link;
  uint32_t last_delay_ms; /* previous retry delay (decorrelated jitter) */
  uint32_t attempts;      /* attempts started; max_retries < UINT32_MAX keeps it exact */
  uint8_t state;
  uint8_t has_overrides; /* its overrides are in the chunk's side table */
} keel__job_slot;

/* One priority level: a ring of slot indices in push order. Reading the
 * indices in order lets pop prefetch the slots a few jobs ahead (a list
 * linked through the slots would miss the cache on every pop). */
typedef struct keel__level {
  int32_t priority;
  uint32_t head, count, mask; /* ring capacity mask + 1, a power of two; 0 when none */
  uint32_t cancelled;         /* cancelled slots among count (still linked) */
  uint32_t *ring;
} keel__level;

typedef struct keel__sched {
  keel__job_slot **chunks;
  /* per chunk, NULL until a job of the chunk has overrides: a table of
   * KEEL__SLAB_CHUNK pointers, so plain jobs carry no pointer for them */
  keel__job_overrides ***overrides;
  uint32_t chunk_count;
  uint32_t slot_count; /* slots ever created */
  uint32_t free_head;
  /* levels sorted by ascending priority (highest last); empty ones removed.
   * Entries from level_count to level_cap keep their rings for reuse. */
  keel__level *levels;
  uint32_t level_count, level_cap;
  uint64_t pending;   /* live pending jobs (cancelled ones excluded) */
  uint64_t cancelled; /* cancelled jobs still linked in a FIFO (slot not yet reclaimed) */
  /* retry heap of slot indices; its capacity always covers every slot, so
   * keel__sched_wait() never allocates */
  uint32_t *heap;
  uint32_t heap_count, heap_cap;
} keel__sched;

static inline keel__job_slot *keel__slot(const keel__sched *s, uint32_t index) {
  return &s->chunks[index >> KEEL__SLAB_CHUNK_BITS][index & (KEEL__SLAB_CHUNK - 1)];
}

static inline uint64_t keel__job_id(uint32_t index, uint32_t generation) {
  return ((uint64_t)generation << 32) | ((uint64_t)index + 1);
}

void keel__sched_init(keel__sched *s);
void keel__sched_free(keel__sched *s);
/* Takes a free slot (state FREE, generation bumped); KEEL__NIL when out of
 * memory (a new chunk of slots and the retry heap's room for it are
 * allocated together, or neither). */
uint32_t keel__sched_alloc(keel__sched *s);
/* Attaches per-job overrides to a slot (the slot owns them from then on;
 * NULL detaches without freeing). 0, or UV_ENOMEM (nothing attached). */
int keel__sched_set_overrides(keel__sched *s, uint32_t index, keel__job_overrides *ov);
/* The slot's overrides, NULL when none. */
static inline keel__job_overrides *keel__sched_overrides(const keel__sched *s, uint32_t index) {
  if (!keel__slot(s, index)->has_overrides) return NULL;
  return s->overrides[index >> KEEL__SLAB_CHUNK_BITS][index & (KEEL__SLAB_CHUNK - 1)];
}
/* Returns a slot to the free list (its overrides are freed). */
void keel__sched_release(keel__sched *s, uint32_t index);
/* Finds the slot of an id; KEEL__NIL when unknown or stale. */
uint32_t keel__sched_lookup(const keel__sched *s, uint64_t id);
/* Appends a slot to its priority's FIFO (state PENDING). 0 or UV_ENOMEM
 * (a new level or a larger ring was needed). */
int keel__sched_enqueue(keel__sched *s, uint32_t index);
/* Removes and returns the first live pending slot, freeing cancelled ones
 * met on the way; KEEL__NIL when none. */
uint32_t keel__sched_pop(keel__sched *s);
/* Marks a pending slot cancelled (it is freed when pop meets it). */
void keel__sched_cancel_pending(keel__sched *s, uint32_t index);
/* Moves a pending slot to the FIFO of `priority` (at its end). 0, or
 * UV_ENOMEM (nothing changed). */
int keel__sched_reprioritize(keel__sched *s, uint32_t index, int32_t priority);
/* Live pending jobs of one priority. */
uint64_t keel__sched_count_priority(const keel__sched *s, int32_t priority);
/* Retry heap. keel__sched_wait cannot fail (room was reserved with the slot). */
void keel__sched_wait(keel__sched *s, uint32_t index, uint64_t due_ms);
void keel__sched_unwait(keel__sched *s, uint32_t index);
/* The slot with the earliest due time, KEEL__NIL when none. */
uint32_t keel__sched_next_due(const keel__sched *s);

#endif
