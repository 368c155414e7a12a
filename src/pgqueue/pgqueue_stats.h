/* The link between a durable queue and keel_serve (pgqueue_stats.c). */
#ifndef KEEL_PGQUEUE_STATS_H
#define KEEL_PGQUEUE_STATS_H

#include "core/stats_hook.h"
#include "keel/pgqueue.h"

keel__stats_hooks *keel__pgqueue_stats_hooks(keel_pgqueue *q);

#endif
