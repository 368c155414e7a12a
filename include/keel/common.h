/*
 * keel/common.h — what every keel module shares: error codes, the allocator,
 * the version, the clock type and the close callback.
 *
 * Errors are negative ints. keel's own codes live in -30000..-30999; libuv's
 * UV_E* codes (UV_EINVAL, UV_ENOMEM, UV_ETIMEDOUT, UV_ECANCELED, ...) pass
 * through unchanged, so one switch handles both:
 *
 *     int rc = keel_breaker_acquire(b, &permit);
 *     if (rc == KEEL_EOPEN) serve_fallback();
 *     else if (rc < 0) fprintf(stderr, "%s: %s\n", keel_err_name(rc),
 *                              keel_strerror(rc));
 */
#ifndef KEEL_COMMON_H
#define KEEL_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "keel/version.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(KEEL_BUILDING) && defined(__GNUC__)
#define KEEL_EXTERN __attribute__((visibility("default")))
#else
#define KEEL_EXTERN /* nothing */
#endif

/*
 * The one list of keel's error codes: XX(name, number, message). A code is
 * never renumbered or reused; new codes are appended with the next number.
 *
 * Closing: a call made after keel_x_close() began returns KEEL_ECLOSING;
 * work that was accepted before and is dropped by the close gets
 * UV_ECANCELED in its callback. Lost connections: KEEL_ECONN means the
 * statement certainly did not take effect (never sent, or its transaction
 * rolled back with the session); KEEL_EINDOUBT means it was sent and its
 * outcome is unknown (a COMMIT or an autocommit write lost in flight): no
 * keel helper retries it blindly.
 */
#define KEEL_ERRNO_MAP(XX)                                                               \
  XX(EOPEN, -30001, "circuit breaker is open")                                           \
  XX(EFULL, -30002, "queue is full")                                                     \
  XX(ECONFLICT, -30003, "version conflict: the row was changed by someone else")         \
  XX(ENOTFOUND, -30004, "not found")                                                     \
  XX(EPG, -30005, "PostgreSQL reported an error")                                        \
  XX(EREDIS, -30006, "Redis reported an error")                                          \
  XX(EUNIQUE, -30007, "unique constraint violated")                                      \
  XX(ECONN, -30008, "connection lost or not connected")                                  \
  XX(EPROTO, -30009, "malformed payload or protocol violation")                          \
  XX(EABORTED, -30010, "aborted by the caller's callback")                               \
  XX(ERETRYABLE, -30011, "transient failure: retrying may succeed")                      \
  XX(ENOTLEADER, -30012, "another process holds the leader lock")                        \
  XX(EINPROGRESS, -30013, "an operation with this key is already in progress")           \
  XX(EMISMATCH, -30014, "key reused with a different request")                           \
  XX(ENOTOWNER, -30015, "lock is not held by this owner")                                \
  XX(ECLOSING, -30016, "object is closing")                                              \
  XX(EEXHAUSTED, -30017, "retries exhausted")                                            \
  XX(ESERIALIZATION, -30018, "serialization failure or deadlock: retry the transaction") \
  XX(ESTALE, -30019, "stale handle: the object it referred to is gone")                  \
  XX(EINDOUBT, -30020,                                                                   \
     "outcome unknown: the connection was lost after the statement was sent, it may "    \
     "or may not have taken effect")                                                     \
  XX(EAUTH, -30021, "the server refused the credentials")                                \
  XX(ENODB, -30022, "the database does not exist")                                       \
  XX(ESEND, -30023, "the client library refused to send the statement")                  \
  XX(ELOST, -30024, "lost: the lock or lease expired or is now held by someone else")    \
  XX(EBUSY, -30025, "busy: held by someone else, try again later")                       \
  XX(EPROBES, -30026, "circuit breaker is half-open and all its probes are taken")       \
  XX(ERATELIMIT, -30027, "rate limit exceeded: retry after the reported delay")          \
  XX(ENOTHEARING, -30028,                                                                \
     "the listener does not receive its own notifications (a transaction pooler or a "   \
     "proxy in the way?)")

typedef enum keel_errno {
#define KEEL_ERRNO_ENUM_(name, value, msg) KEEL_##name = (value),
  KEEL_ERRNO_MAP(KEEL_ERRNO_ENUM_)
#undef KEEL_ERRNO_ENUM_
      KEEL_ERRNO_MIN_ = -30999
} keel_errno;

/*
 * Returns a static English description of err: a keel code, a libuv code or
 * 0 ("success"). Unknown codes get "unknown error". Never NULL. Thread-safe.
 */
KEEL_EXTERN const char *keel_strerror(int err);

/*
 * Returns the static name of err ("KEEL_EOPEN", "UV_EINVAL", "OK"); unknown
 * codes get "UNKNOWN". Never NULL. Thread-safe.
 */
KEEL_EXTERN const char *keel_err_name(int err);

/* Returns the run-time version as KEEL_VERSION_HEX (0xMMmmpp). Thread-safe. */
KEEL_EXTERN unsigned keel_version(void);

/* Returns the run-time version as "0.1.0". Thread-safe. */
KEEL_EXTERN const char *keel_version_string(void);

typedef void *(*keel_malloc_fn)(size_t size);
typedef void *(*keel_realloc_fn)(void *ptr, size_t size);
typedef void *(*keel_calloc_fn)(size_t count, size_t size);
typedef void (*keel_free_fn)(void *ptr);

/*
 * Replaces the functions keel allocates with (like uv_replace_allocator).
 * Every allocation of keel's own code goes through them; the libraries keel
 * uses keep their own hooks (uv_replace_allocator; libpq uses malloc).
 * Call it before creating any keel object; memory allocated before must not
 * be freed after a switch.
 *
 * Returns 0, or UV_EINVAL when any function is NULL (nothing changed).
 * Not thread-safe: call it once at start-up.
 */
KEEL_EXTERN int keel_replace_allocator(keel_malloc_fn malloc_fn, keel_realloc_fn realloc_fn,
                                       keel_calloc_fn calloc_fn, keel_free_fn free_fn);

/*
 * Frees memory that a keel function documented as "caller frees with
 * keel_free" handed out. NULL is a no-op.
 */
KEEL_EXTERN void keel_free(void *ptr);

/*
 * A clock in milliseconds. keel objects that measure time take an optional
 * clock; when `now` is NULL they use uv_now() of their loop. Tests inject a
 * clock and advance it instead of sleeping.
 */
typedef uint64_t (*keel_now_fn)(void *clock_data);
typedef struct keel_clock {
  keel_now_fn now; /* NULL: uv_now(loop) */
  void *data;      /* passed to now() */
} keel_clock;

/*
 * Called once an object's close has finished: every libuv handle it owned is
 * closed and its memory is freed. `object` is the (now freed) address, for
 * identification only.
 */
typedef void (*keel_close_cb)(void *object, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_COMMON_H */
