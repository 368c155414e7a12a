/* What listener_stats.c (the keel_serve adapter) reads of a listener. */
#ifndef KEEL_LISTENER_STATS_H
#define KEEL_LISTENER_STATS_H

#include "core/histogram.h"
#include "core/stats_hook.h"
#include "keel/listen.h"

keel__stats_hooks *keel__listener_stats_hooks(keel_listener *l);
/* Change time → handler latency. */
const keel__histogram *keel__listener_histogram(const keel_listener *l);

#endif
