#include "core/util.h"

#include <stdio.h>

#include "core/alloc.h"

int keel__fail(char *errbuf, int err, const char *fmt, ...) {
  if (errbuf != NULL) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(errbuf, KEEL__ERRBUF_SIZE, fmt, args);
    va_end(args);
  }
  return err;
}

typedef struct deferred_call {
  uv_timer_t handle;
  void (*fn)(void *arg);
  void *arg;
} deferred_call;

static void run_deferred(uv_handle_t *handle) {
  deferred_call *call = (deferred_call *)handle;
  void (*fn)(void *arg) = call->fn;
  void *arg = call->arg;
  keel__free(call);
  fn(arg);
}

int keel__call_later(uv_loop_t *loop, void (*fn)(void *arg), void *arg) {
  deferred_call *call = keel__malloc(sizeof *call);
  if (call == NULL) return UV_ENOMEM;
  call->fn = fn;
  call->arg = arg;
  uv_timer_init(loop, &call->handle);
  uv_close((uv_handle_t *)&call->handle, run_deferred);
  return 0;
}

int keel__why(char *buf, size_t cap, int err, const char *text) {
  if (buf != NULL && cap > 0) snprintf(buf, cap, "%s", text != NULL ? text : "");
  return err;
}
