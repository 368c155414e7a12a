#include "core/histogram.h"

static unsigned bucket_of(uint64_t v) {
  if (v < KEEL__HIST_SUB) return (unsigned)v;
  unsigned log2 = 63u - (unsigned)__builtin_clzll(v);
  /* The two bits below the leading one pick the sub-bucket. */
  unsigned sub = (unsigned)(v >> (log2 - 2)) & (KEEL__HIST_SUB - 1);
  unsigned idx = (log2 - 1) * KEEL__HIST_SUB + sub;
  return idx < KEEL__HIST_BUCKETS ? idx : KEEL__HIST_BUCKETS - 1;
}

static double bucket_upper(unsigned idx) {
  if (idx < KEEL__HIST_SUB) return (double)idx;
  unsigned log2 = idx / KEEL__HIST_SUB + 1;
  unsigned sub = idx % KEEL__HIST_SUB;
  double base = (double)(1ull << log2);
  return base + (base / KEEL__HIST_SUB) * (sub + 1) - 1;
}

void keel__histogram_record(keel__histogram *h, uint64_t value_ns) {
  h->count++;
  h->sum_ns += value_ns;
  if (value_ns > h->max_ns) h->max_ns = value_ns;
  h->buckets[bucket_of(value_ns)]++;
}

double keel__histogram_quantile(const keel__histogram *h, double quantile) {
  if (h->count == 0) return 0.0;
  uint64_t rank = (uint64_t)(quantile * (double)h->count);
  if (rank >= h->count) rank = h->count - 1;
  uint64_t seen = 0;
  for (unsigned i = 0; i < KEEL__HIST_BUCKETS; i++) {
    seen += h->buckets[i];
    if (seen > rank) {
      double upper = bucket_upper(i);
      return upper < (double)h->max_ns ? upper : (double)h->max_ns;
    }
  }
  return (double)h->max_ns;
}
