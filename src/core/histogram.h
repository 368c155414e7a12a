/* A fixed-size log-bucket latency histogram: 4 sub-buckets per power of two
 * of nanoseconds, so any value is placed within 25 % without allocation. */
#ifndef KEEL_CORE_HISTOGRAM_H
#define KEEL_CORE_HISTOGRAM_H

#include <stdint.h>

#define KEEL__HIST_SUB 4
#define KEEL__HIST_BUCKETS (64 * KEEL__HIST_SUB)

typedef struct keel__histogram {
  uint64_t count;
  uint64_t sum_ns;
  uint64_t max_ns;
  uint64_t buckets[KEEL__HIST_BUCKETS];
} keel__histogram;

void keel__histogram_record(keel__histogram *h, uint64_t value_ns);
/* Value (ns) below which `quantile` (0..1) of the records fall; upper bound
 * of the bucket, clamped to the maximum seen. 0 when empty. */
double keel__histogram_quantile(const keel__histogram *h, double quantile);

/* Reports h (nanoseconds) to a keel_serve writer as a histogram in seconds
 * over fixed bounds from 100 us to 10 s (each log bucket goes to the first
 * bound at or above its upper edge). */
struct keel_stats_writer;
void keel__histogram_write(struct keel_stats_writer *w, const char *metric, const char *help,
                           const keel__histogram *h);

#endif
