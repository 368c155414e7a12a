/* What pg_stats.c (the keel_serve adapters) reads of a pool. */
#ifndef KEEL_PG_STATS_H
#define KEEL_PG_STATS_H

#include "core/stats_hook.h"
#include "keel/pg.h"

keel__stats_hooks *keel__pg_pool_stats_hooks(keel_pg_pool *p);

#endif
