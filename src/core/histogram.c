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

#include "keel/serve.h"

static const double prom_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                     0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,    10};
#define PROM_N (sizeof prom_bounds / sizeof prom_bounds[0])

void keel__histogram_write(struct keel_stats_writer *w, const char *metric, const char *help,
                           const keel__histogram *h) {
  uint64_t counts[PROM_N] = {0};
  unsigned b = 0;
  /* No bucket above the maximum's holds anything. */
  unsigned last = h->count ? bucket_of(h->max_ns) : 0;
  for (unsigned i = 0; i <= last && h->count; i++) {
    if (h->buckets[i] == 0) continue;
    double upper_s = bucket_upper(i) / 1e9;
    while (b < PROM_N && prom_bounds[b] < upper_s) b++;
    if (b == PROM_N) break; /* above the last bound: only in count */
    counts[b] += h->buckets[i];
  }
  keel_stats_histogram(w, metric, help, PROM_N, prom_bounds, counts, (double)h->sum_ns / 1e9,
                       h->count);
}
