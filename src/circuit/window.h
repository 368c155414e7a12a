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

/*
 * A rate threshold compared exactly. The double a user writes as 0.55 is
 * not 55/100 (it is 0.55000000000000004441...), and 0.55 * 100 rounds to
 * 55.00000000000001, so "failures >= threshold * calls" misses equality.
 * keel__rate_init() recovers the decimal the double came from: the shortest
 * k / 10^m (m <= 9) whose correctly rounded double is the threshold. Two
 * different decimals of at most 9 digits are at least 1e-9 apart, far more
 * than a double's spacing below 1 (< 1.2e-16), so that decimal is unique,
 * and the comparison part * 10^m >= k * calls is done in integers: exact for
 * every threshold written with up to 9 decimals and any count below 2^32
 * (both products stay below 2^32 * 10^9 < 2^64). A threshold that is no such
 * decimal (1.0 / 3, 0.1 * 3) is compared as the exact quotient part / calls
 * against the double itself.
 */
typedef struct keel__rate {
  uint64_t num; /* k */
  uint64_t den; /* 10^m; 0: no short decimal, compare with `value` */
  double value;
} keel__rate;

void keel__rate_init(keel__rate *rate, double threshold);

/* Whether part / calls >= the threshold (calls > 0). */
static inline bool keel__rate_reached(const keel__rate *rate, uint32_t part, uint32_t calls) {
  if (rate->den != 0) return (uint64_t)part * rate->den >= rate->num * (uint64_t)calls;
  return (double)part / (double)calls >= rate->value;
}

#endif
