#include "circuit/window.h"

#include <math.h>

#include "core/alloc.h"
#include "keel/breaker.h"

int keel__window_init(keel__window *w, int kind, uint32_t size, uint64_t window_ms,
                      uint32_t buckets) {
  memset(w, 0, sizeof *w);
  w->kind = kind;
  if (kind == KEEL_BREAKER_WINDOW_COUNT) {
    w->ring = keel__calloc(size, 1);
    if (w->ring == NULL) return UV_ENOMEM;
    w->ring_size = size;
  } else if (kind == KEEL_BREAKER_WINDOW_TIME) {
    w->buckets = keel__calloc(buckets, sizeof *w->buckets);
    if (w->buckets == NULL) return UV_ENOMEM;
    w->bucket_count = buckets;
    w->bucket_width_ms = window_ms / buckets;
  }
  return 0;
}

void keel__window_free(keel__window *w) {
  keel__free(w->ring);
  keel__free(w->buckets);
  w->ring = NULL;
  w->buckets = NULL;
}

void keel__window_clear(keel__window *w) {
  w->calls = w->failures = w->slow = 0;
  if (w->ring != NULL) {
    memset(w->ring, 0, w->ring_size);
    w->ring_next = 0;
  }
  if (w->buckets != NULL) memset(w->buckets, 0, w->bucket_count * sizeof *w->buckets);
  w->last_epoch = 0;
}

/* 0 in the ring means "no call yet"; an outcome is stored with this bit. */
#define RING_USED 4u

static void ring_record(keel__window *w, unsigned outcome) {
  uint8_t *slot = &w->ring[w->ring_next];
  if (*slot & RING_USED) {
    w->calls--;
    w->failures -= (*slot & KEEL__OUTCOME_FAILED) ? 1 : 0;
    w->slow -= (*slot & KEEL__OUTCOME_SLOW) ? 1 : 0;
  }
  *slot = (uint8_t)(outcome | RING_USED);
  w->calls++;
  w->failures += (outcome & KEEL__OUTCOME_FAILED) ? 1 : 0;
  w->slow += (outcome & KEEL__OUTCOME_SLOW) ? 1 : 0;
  if (++w->ring_next == w->ring_size) w->ring_next = 0;
}

static void bucket_drop(keel__window *w, keel__time_bucket *bucket) {
  w->calls -= bucket->calls;
  w->failures -= bucket->failures;
  w->slow -= bucket->slow;
  bucket->calls = bucket->failures = bucket->slow = 0;
}

void keel__window_expire(keel__window *w, uint64_t now_ms) {
  if (w->buckets == NULL) return;
  uint64_t epoch = now_ms / w->bucket_width_ms;
  if (epoch <= w->last_epoch) return;
  /* Every bucket whose epoch fell out of the window is emptied; at most
   * bucket_count of them, however long the breaker sat idle. */
  uint64_t gap = epoch - w->last_epoch;
  if (gap > w->bucket_count) gap = w->bucket_count;
  for (uint64_t e = epoch - gap + 1; e <= epoch; e++) {
    keel__time_bucket *bucket = &w->buckets[e % w->bucket_count];
    bucket_drop(w, bucket);
    bucket->epoch = e;
  }
  w->last_epoch = epoch;
}

void keel__window_record(keel__window *w, unsigned outcome, uint64_t now_ms) {
  if (w->ring != NULL) {
    ring_record(w, outcome);
    return;
  }
  if (w->buckets == NULL) return;
  keel__window_expire(w, now_ms);
  keel__time_bucket *bucket = &w->buckets[w->last_epoch % w->bucket_count];
  bucket->calls++;
  bucket->failures += (outcome & KEEL__OUTCOME_FAILED) ? 1 : 0;
  bucket->slow += (outcome & KEEL__OUTCOME_SLOW) ? 1 : 0;
  w->calls++;
  w->failures += (outcome & KEEL__OUTCOME_FAILED) ? 1 : 0;
  w->slow += (outcome & KEEL__OUTCOME_SLOW) ? 1 : 0;
}

void keel__rate_init(keel__rate *rate, double threshold) {
  static const uint64_t pow10[] = {1,      10,      100,      1000,      10000,
                                   100000, 1000000, 10000000, 100000000, 1000000000};
  rate->value = threshold;
  rate->num = 0;
  rate->den = 0;
  if (!(threshold >= 0.0 && threshold <= 1.0)) return;
  for (unsigned m = 0; m < sizeof pow10 / sizeof pow10[0]; m++) {
    double scale = (double)pow10[m];
    /* threshold * scale is within a few ulps of k: rounding finds k, and
     * k / scale (one correctly rounded division) tells whether it is the
     * decimal the threshold was rounded from. */
    double k = floor(threshold * scale + 0.5);
    if (k / scale == threshold) {
      rate->num = (uint64_t)k;
      rate->den = pow10[m];
      return;
    }
  }
}
