/* The link between a Redis client and keel_serve (redis_stats.c). */
#ifndef KEEL_REDIS_STATS_H
#define KEEL_REDIS_STATS_H

#include "core/stats_hook.h"
#include "keel/redis.h"

keel__stats_hooks *keel__redis_stats_hooks(keel_redis *r);

#endif
