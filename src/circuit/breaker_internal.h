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
  bool has_result;  /* reported in time: done(result) is queued */
  int result;
  bool finished; /* done was called (or is being called) */
  bool in_use;   /* taken from the free list, not yet given back */
  keel_breaker_call *next_active, *prev_active;
};

struct keel_breaker {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  keel_breaker_opts opts;
  keel_breaker_state state;
  uint64_t generation; /* bumped on every state change; permits carry it */
  uint64_t state_entered_ms;
  uint64_t open_until_ms;
  uint64_t open_duration_ms;
  uint32_t consecutive_failures;
  uint32_t probes_in_flight;
  uint32_t probe_successes; /* with half_open_probes: probes reported */
  uint32_t probes_granted;  /* probes let through in this HALF_OPEN period */
  uint32_t probe_failures;
  uint32_t probe_slow;
  keel__window window;
  keel__rate failure_rate; /* opts.failure_rate_threshold, exact */
  keel__rate slow_rate;    /* opts.slow_call_rate_threshold, exact */
  keel_breaker_stats stats;
  char last_error[KEEL__ERRBUF_SIZE];

  /* execute() */
  uv_timer_t start_timer; /* starts queued ops on the next iteration */
  /* Deliver reported results in the check phase of the same iteration (the
   * idle handle only keeps poll from blocking meanwhile). */
  uv_check_t done_check;
  uv_idle_t done_idle;
  keel_breaker_call *free_calls;
  keel_breaker_call *active_calls; /* in_use calls; handed to the close pump */
  keel_breaker_call *start_queue_head, *start_queue_tail;
  keel_breaker_call *done_queue_head, *done_queue_tail; /* linked by next_free */
  unsigned calls_allocated;
  unsigned handles_open;
  bool closing;
  bool calls_detached; /* the close pump took active_calls: no more unlinking */
  keel_close_cb close_cb;
  void *close_data;
  /* Shared state (shared.c): told of every transition; NULL when unshared. */
  void (*share_hook)(void *ctx, keel_breaker_state from, keel_breaker_state to);
  void *share_ctx;
  /* Shared half-open probe quota (shared.c): when share_probes is set,
   * HALF_OPEN lets at most probe_allowance probes through (the slots this
   * process took from the shared quota; 0 again at every transition). */
  bool share_probes;
  uint32_t probe_allowance;
};

/* Shared state (shared.c): moves the breaker to `to` as another process
 * decided (OPEN for open_ms), calling on_state_change and share_hook as any
 * transition does. */
void keel__breaker_set_state(keel_breaker *b, keel_breaker_state to, uint64_t open_ms);

uint64_t keel__breaker_now(keel_breaker *b);
/* The shared breaker's sync script (shared.c), for the docs check. */
const char *keel__breaker_shared_script(void);
/* Frees the breaker once closing and nothing is outstanding. */
void keel__breaker_maybe_free(keel_breaker *b);
/* Called by close (no user callback): stops every call's timeout, drops the
 * queue of operations not started and closes the free list's timers. */
void keel__breaker_stop_calls(keel_breaker *b);
/* The start timer's callback after close, on a later loop iteration: every
 * execute() call without a result gets done(UV_ECANCELED), then the start
 * timer is closed. */
void keel__breaker_on_close_pump(uv_timer_t *timer);
/* The pump's last step: closes the start timer. */
void keel__breaker_close_start_timer(keel_breaker *b);
/* Called by close: closes the check and idle handles of the done queue. */
void keel__breaker_close_done_handles(keel_breaker *b);

#endif
