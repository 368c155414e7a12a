/* The link between an idempotency store and keel_serve (idem_stats.c). */
#ifndef KEEL_IDEM_STATS_H
#define KEEL_IDEM_STATS_H

#include "core/stats_hook.h"
#include "keel/idempotency.h"

keel__stats_hooks *keel__idem_stats_hooks(keel_idem *idem);

#endif
