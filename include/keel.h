/*
 * keel — resilience patterns for services built on a libuv event loop.
 *
 * This umbrella header includes every public module header. Each module's
 * header documents its functions; docs/ explains concepts and defaults.
 */
#ifndef KEEL_H
#define KEEL_H

#include "keel/version.h"
#include "keel/common.h"
#include "keel/retry.h"
#include "keel/breaker.h"
#include "keel/queue.h"
#include "keel/pg.h"
#include "keel/listen.h"
#include "keel/verify.h"
#include "keel/integrity.h"

#endif /* KEEL_H */
