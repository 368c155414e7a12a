/* What queue_stats.c (the keel_serve adapter) reads of a queue. */
#ifndef KEEL_QUEUE_STATS_H
#define KEEL_QUEUE_STATS_H

#include <stdbool.h>

#include "core/histogram.h"
#include "core/stats_hook.h"
#include "keel/queue.h"

keel__stats_hooks *keel__queue_stats_hooks(keel_queue *q);
/* The run (start → done) or wait (ready → start) histogram. */
const keel__histogram *keel__queue_histogram(const keel_queue *q, bool run);

#endif
