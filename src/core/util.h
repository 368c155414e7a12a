/* Small internal helpers shared by every module. */
#ifndef KEEL_CORE_UTIL_H
#define KEEL_CORE_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/stats_hook.h"
#include "keel/common.h"

#define KEEL__ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define KEEL__CONTAINER_OF(ptr, type, field) ((type *)((char *)(ptr)-offsetof(type, field)))

/* Size of the last_error buffer every object keeps. */
#define KEEL__ERRBUF_SIZE 256

/* Formats into an object's last_error buffer (always NUL-terminated,
 * truncated when too long). Returns `err` so that callers can write
 * `return keel__fail(buf, UV_EINVAL, "batch_size must be > 0");`. */
int keel__fail(char *errbuf, int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Copies text into a caller's explanation buffer (keel_x_new_ex()); does
 * nothing when buf is NULL or cap is 0. Returns err. */
int keel__why(char *buf, size_t cap, int err, const char *text);

/* Calls fn(arg) on a later loop iteration (through the close of a
 * short-lived handle): for a close_cb that has nothing left to wait for but
 * must still not run inside the close call. Returns 0 or UV_ENOMEM (fn not
 * called). */
int keel__call_later(uv_loop_t *loop, void (*fn)(void *arg), void *arg);

/* Reads the clock: clock->now when set, uv_now(loop) otherwise. */
static inline uint64_t keel__clock_now(const keel_clock *clock, uv_loop_t *loop) {
  if (clock != NULL && clock->now != NULL) return clock->now(clock->data);
  return uv_now(loop);
}

#endif
