/*
 * keel — resilience patterns for services built on a libuv event loop.
 *
 * This umbrella header includes every public module header. Each module's
 * header documents its functions; docs/ explains concepts and defaults.
 */
#ifndef KEEL_H
#define KEEL_H

/*
 * Strict ISO C (-std=c11). libuv's <uv.h>, which every keel header includes,
 * uses POSIX types (pthread_rwlock_t) that glibc and musl hide in strict ISO
 * mode unless a POSIX feature-test macro is set. So that `cc -std=c11` works
 * with `#include <keel.h>` as the first include, keel.h then defines
 * _POSIX_C_SOURCE 200809L itself (what -std=gnu11 gives by default), for the
 * rest of the file. It does so only on Linux, in strict mode, when the file set
 * none of _POSIX_C_SOURCE, _XOPEN_SOURCE, _GNU_SOURCE, _DEFAULT_SOURCE,
 * _BSD_SOURCE, _SVID_SOURCE and included no C library header yet. Once a C
 * library header was included it is too late; the #error below says what to
 * do. Other builds (-std=gnu11, or any of those macros set) are left alone.
 * The module headers (keel/pg.h, ...) included alone need one of those macros
 * or -std=gnu11, as <uv.h> does.
 */
#if defined(__linux__) && defined(__STRICT_ANSI__) && !defined(_POSIX_C_SOURCE) &&   \
    !defined(_XOPEN_SOURCE) && !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE) && \
    !defined(_BSD_SOURCE) && !defined(_SVID_SOURCE)
#if defined(_FEATURES_H)
#error \
    "keel.h: libuv's <uv.h> needs POSIX; compile with -std=gnu11 or -D_POSIX_C_SOURCE=200809L, or include <keel.h> before any C library header"
#else
#define _POSIX_C_SOURCE 200809L
#endif
#endif

#include "keel/version.h"
#include "keel/common.h"
#include "keel/retry.h"
#include "keel/adaptive.h"
#include "keel/breaker.h"
#include "keel/queue.h"
#include "keel/pg.h"
#include "keel/listen.h"
#include "keel/verify.h"
#include "keel/integrity.h"
#include "keel/idempotency.h"
#include "keel/redis.h"
#include "keel/breaker_shared.h"
#include "keel/ratelimit.h"
#include "keel/policy.h"
#include "keel/pgqueue.h"
#include "keel/saga.h"
#include "keel/serve.h"

#endif /* KEEL_H */
