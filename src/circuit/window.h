/* Sliding windows of call outcomes for the breaker's rate conditions: a ring
 * of the last N outcomes, or time buckets. Both update in O(1) (amortised for
 * time: expiring buckets is bounded by their count) and allocate only at
 * creation. */
#ifndef KEEL_CIRCUIT_WINDOW_H
#define KEEL_CIRCUIT_WINDOW_H

#include <stdbool.h>
#include <stdint.h>

#define KEEL__OUTCOME_FAILED 1u
#define KEEL__OUTCOME_SLOW 2u

typedef struct keel__time_bucket {
  uint64_t epoch; /* now / bucket width when the bucket was last reset */
  uint32_t calls;
  uint32_t failures;
  uint32_t slow;
} keel__time_bucket;

typedef struct keel__window {
  int kind; /* keel_breaker_window */
  uint32_t calls;
  uint32_t failures;
  uint32_t slow;
  /* count window */
  uint8_t *ring;
  uint32_t ring_size;
  uint32_t ring_next;
  /* time window */
  keel__time_bucket *buckets;
  uint32_t bucket_count;
  uint64_t bucket_width_ms;
  uint64_t last_epoch;
} keel__window;

/* Allocates the window's storage; returns 0 or UV_ENOMEM. */
int keel__window_init(keel__window *w, int kind, uint32_t size, uint64_t window_ms,
                      uint32_t buckets);
void keel__window_free(keel__window *w);
void keel__window_clear(keel__window *w);
/* Records one outcome (KEEL__OUTCOME_* bits) at time now_ms. */
void keel__window_record(keel__window *w, unsigned outcome, uint64_t now_ms);
/* Drops time buckets older than the window (before reading the totals). */
void keel__window_expire(keel__window *w, uint64_t now_ms);

#endif
