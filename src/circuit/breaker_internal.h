/* The breaker object, shared by the state machine (breaker.c) and the
 * asynchronous execute() adapter (execute.c). */
#ifndef KEEL_CIRCUIT_BREAKER_INTERNAL_H
#define KEEL_CIRCUIT_BREAKER_INTERNAL_H

#include <stdbool.h>

#include "circuit/window.h"
#include "core/util.h"
#include "keel/breaker.h"

struct keel_breaker_call {
  keel_breaker *breaker;
  keel_breaker_call *next_free;
  uv_timer_t timer;
  keel_breaker_permit permit;
  keel_breaker_op_fn op;
  keel_breaker_done_cb done;
  void *data;
  uint64_t started_ms;
  uint64_t timeout_ms;
  bool timer_ready; /* uv_timer_init done (kept across reuse) */
  bool op_started;  /* op was called */
  bool op_reported; /* keel_breaker_call_done() came */
  bool finished;    /* done was called */
  bool in_use;
  keel_breaker_call *next_active, *prev_active;
};

struct keel_breaker {
  uv_loop_t *loop;
  keel_breaker_opts opts;
  keel_breaker_state state;
  uint64_t generation; /* bumped on every state change; permits carry it */
  uint64_t state_entered_ms;
  uint64_t open_until_ms;
  uint64_t open_duration_ms;
  uint32_t consecutive_failures;
  uint32_t probes_in_flight;
  uint32_t probe_successes;
  keel__window window;
  keel_breaker_stats stats;
  char last_error[KEEL__ERRBUF_SIZE];

  /* execute() */
  uv_timer_t start_timer; /* starts queued ops on the next iteration */
  keel_breaker_call *free_calls;
  keel_breaker_call *active_calls;
  keel_breaker_call *start_queue_head, *start_queue_tail;
  unsigned calls_allocated;
  unsigned handles_open;
  bool closing;
  keel_close_cb close_cb;
  void *close_data;
};

uint64_t keel__breaker_now(keel_breaker *b);
/* Frees the breaker once closing and nothing is outstanding. */
void keel__breaker_maybe_free(keel_breaker *b);
/* Called by close: cancels every execute() call. */
void keel__breaker_cancel_calls(keel_breaker *b);
/* Frees the execute() free list (close). */
void keel__breaker_close_call_handles(keel_breaker *b);

#endif
