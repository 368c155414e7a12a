/* What retry_stats.c (the keel_serve adapter) reads of a retry runner. */
#ifndef KEEL_CORE_RETRY_STATS_H
#define KEEL_CORE_RETRY_STATS_H

#include <stdbool.h>
#include <stdint.h>

#include "core/stats_hook.h"
#include "keel/retry.h"

keel__stats_hooks *keel__retry_stats_hooks(keel_retry *r);
void keel__retry_peek(const keel_retry *r, unsigned *attempts, int *last_status, bool *done,
                      uint64_t *last_delay_ms);

#endif
