/* The link between pipelines, rate limiters and keel_serve
 * (policy_stats.c). */
#ifndef KEEL_POLICY_STATS_H
#define KEEL_POLICY_STATS_H

#include "core/stats_hook.h"
#include "keel/policy.h"
#include "keel/ratelimit.h"

keel__stats_hooks *keel__pipeline_stats_hooks(keel_pipeline *p);
keel__stats_hooks *keel__ratelimit_stats_hooks(keel_ratelimit *rl);
keel__stats_hooks *keel__ratelimit_redis_stats_hooks(keel_ratelimit_redis *rl);

#endif
