/* keel_breaker_execute(): the libuv adapter around the state machine. Calls
 * come from a free list with their timeout timer already initialised, so a
 * steady stream of calls allocates nothing. One zero-delay timer (the start
 * timer) starts every operation, never inside keel_breaker_execute(); a
 * check handle delivers every reported result, never inside
 * keel_breaker_done(); after close, the start timer runs once more as
 * the close pump (done(UV_ECANCELED) for what was dropped). */
#include "circuit/breaker_internal.h"
#include "core/alloc.h"

int keel__breaker_release_timeout(keel_breaker_permit *permit, uint64_t duration_ms);
int keel__breaker_acquire_code(keel_breaker *b, keel_breaker_permit *permit);

static void on_call_timer_closed(uv_handle_t *handle) {
  keel_breaker_call *call = handle->data;
  keel_breaker *b = call->breaker;
  keel__free(call);
  b->calls_allocated--;
  keel__breaker_maybe_free(b);
}

static void active_remove(keel_breaker *b, keel_breaker_call *call) {
  if (b->calls_detached) return; /* the close pump walks the list it took */
  if (call->prev_active != NULL)
    call->prev_active->next_active = call->next_active;
  else
    b->active_calls = call->next_active;
  if (call->next_active != NULL) call->next_active->prev_active = call->prev_active;
  call->next_active = call->prev_active = NULL;
}

/* Gives the call's memory back: to the free list, or to its timer's close
 * when the breaker is closing (freed in the close callback, never now, so a
 * list walk around user code stays valid). Once per use. */
static void give_back(keel_breaker *b, keel_breaker_call *call) {
  call->in_use = false;
  uv_timer_stop(&call->timer);
  if (b->closing) {
    uv_close((uv_handle_t *)&call->timer, on_call_timer_closed);
    return;
  }
  call->next_free = b->free_calls;
  b->free_calls = call;
}

/* The call has finished and its operation has reported (or never started). */
static void recycle(keel_breaker_call *call) {
  keel_breaker *b = call->breaker;
  if (!call->in_use) return;
  active_remove(b, call);
  give_back(b, call);
}

/* done may do anything with the breaker, close it included; so may the
 * fallback (done still comes, with the fallback's answer). */
static void finish(keel_breaker_call *call, int status) {
  call->finished = true;
  keel_breaker *b = call->breaker;
  if (b->opts.fallback != NULL && status < 0 && status != UV_ECANCELED &&
      (status == KEEL_EOPEN || status == KEEL_EPROBES || b->opts.fallback_on_failure))
    status = b->opts.fallback(b, status, call->data);
  call->done(b, status, call->data);
}

static void on_call_timeout(uv_timer_t *timer) {
  keel_breaker_call *call = timer->data;
  keel_breaker *b = call->breaker;
  if (call->finished || b->closing) return;
  keel__breaker_release_timeout(&call->permit, keel__breaker_now(b) - call->started_ms);
  finish(call, UV_ETIMEDOUT);
  /* The memory stays until the operation reports. */
}

static void queue_append(keel_breaker_call **head, keel_breaker_call **tail,
                         keel_breaker_call *call) {
  call->next_free = NULL;
  if (*tail != NULL)
    (*tail)->next_free = call;
  else
    *head = call;
  *tail = call;
}

static void on_start(uv_timer_t *timer);

static void on_done_idle(uv_idle_t *idle) {
  (void)idle; /* only there so that poll does not block before the check */
}

static void arm_start_timer(keel_breaker *b) {
  if (!uv_is_active((uv_handle_t *)&b->start_timer))
    uv_timer_start(&b->start_timer, on_start, 0, 0);
}

/* Results reported since the last check phase. They were reported before
 * any close, so they are delivered even if a done below closes the breaker
 * (the close pump, a later iteration, finds them finished). */
static void on_done_check(uv_check_t *check) {
  keel_breaker *b = check->data;
  keel_breaker_call *call = b->done_queue_head;
  b->done_queue_head = b->done_queue_tail = NULL;
  if (!b->closing) {
    uv_check_stop(&b->done_check);
    uv_idle_stop(&b->done_idle);
  }
  while (call != NULL) {
    keel_breaker_call *next = call->next_free;
    call->next_free = NULL;
    call->has_result = false;
    finish(call, call->result);
    recycle(call);
    call = next;
  }
}

/* libuv runs idle handles before poll and check handles after it: with the
 * idle handle on, poll does not block, and the check handle delivers in the
 * same loop iteration as the report (a timer would cost one more). */
static void arm_done_check(keel_breaker *b) {
  if (uv_is_active((uv_handle_t *)&b->done_check)) return;
  uv_check_start(&b->done_check, on_done_check);
  uv_idle_start(&b->done_idle, on_done_idle);
}

static void on_start(uv_timer_t *timer) {
  keel_breaker *b = timer->data;
  keel_breaker_call *call = b->start_queue_head;
  b->start_queue_head = b->start_queue_tail = NULL;
  while (call != NULL) {
    keel_breaker_call *next = call->next_free;
    call->next_free = NULL;
    if (b->closing) {
      /* Closed from inside an earlier op or done: the close pump cancels
       * the rest. */
    } else if (call->permit.generation == 0) {
      finish(call, call->result); /* the rejection */
      recycle(call);
    } else {
      call->started_ms = keel__breaker_now(b);
      if (call->timeout_ms > 0) uv_timer_start(&call->timer, on_call_timeout, call->timeout_ms, 0);
      call->op_started = true;
      call->op(call, call->data);
    }
    call = next;
  }
}

static keel_breaker_call *take_call(keel_breaker *b) {
  keel_breaker_call *call = b->free_calls;
  if (call != NULL) {
    b->free_calls = call->next_free;
    return call;
  }
  call = keel__calloc(1, sizeof *call);
  if (call == NULL) return NULL;
  if (uv_timer_init(b->loop, &call->timer) != 0) {
    keel__free(call);
    return NULL;
  }
  call->timer.data = call;
  call->breaker = b;
  b->calls_allocated++;
  return call;
}

int keel_breaker_execute(keel_breaker *b, keel_breaker_op_fn op, uint64_t timeout_ms,
                         keel_breaker_done_cb done, void *data) {
  if (b == NULL) return UV_EINVAL;
  if (b->closing) return KEEL_ECLOSING;
  if (op == NULL || done == NULL)
    return keel__fail(b->last_error, UV_EINVAL, "keel_breaker_execute: op and done are required");
  keel_breaker_call *call = take_call(b);
  if (call == NULL) return keel__fail(b->last_error, UV_ENOMEM, "out of memory");
  call->op = op;
  call->done = done;
  call->data = data;
  call->timeout_ms = timeout_ms;
  call->op_started = call->op_reported = call->finished = call->has_result = false;
  call->in_use = true;
  call->next_free = NULL;
  int arc = keel__breaker_acquire_code(b, &call->permit);
  if (arc != 0) {
    call->permit.generation = 0;
    call->result = arc;
  }
  if (b->closing) {
    /* on_state_change or on_rejected closed the breaker inside acquire:
     * the call was never accepted. */
    give_back(b, call);
    return KEEL_ECLOSING;
  }
  call->prev_active = NULL;
  call->next_active = b->active_calls;
  if (b->active_calls != NULL) b->active_calls->prev_active = call;
  b->active_calls = call;
  queue_append(&b->start_queue_head, &b->start_queue_tail, call);
  arm_start_timer(b);
  return 0;
}

int keel_breaker_call_done(keel_breaker_call *call, int status) {
  return keel_breaker_done(call, status);
}

int keel_breaker_done(keel_breaker_call *call, int status) {
  if (call == NULL || !call->in_use || !call->op_started || call->op_reported) return UV_EINVAL;
  call->op_reported = true;
  keel_breaker *b = call->breaker;
  if (call->finished || b->closing) {
    /* Timed out, or cancelled by close (the close pump delivers
     * UV_ECANCELED if it has not yet, then gives the memory back). */
    if (call->finished) recycle(call);
    return KEEL_ESTALE;
  }
  uv_timer_stop(&call->timer);
  call->has_result = true;
  call->result = status;
  /* Recorded now (on_state_change may run, and may close); done comes from
   * the check handle, or from the close pump if the breaker closed. */
  keel_breaker_release(&call->permit, status, keel__breaker_now(b) - call->started_ms);
  if (!b->closing) {
    queue_append(&b->done_queue_head, &b->done_queue_tail, call);
    arm_done_check(b);
  }
  return 0;
}

void keel__breaker_stop_calls(keel_breaker *b) {
  for (keel_breaker_call *call = b->active_calls; call != NULL; call = call->next_active)
    uv_timer_stop(&call->timer);
  b->start_queue_head = b->start_queue_tail = NULL;
  b->done_queue_head = b->done_queue_tail = NULL; /* the pump delivers them */
  keel_breaker_call *call = b->free_calls;
  b->free_calls = NULL;
  while (call != NULL) {
    keel_breaker_call *next = call->next_free;
    uv_close((uv_handle_t *)&call->timer, on_call_timer_closed);
    call = next;
  }
}

void keel__breaker_on_close_pump(uv_timer_t *timer) {
  keel_breaker *b = timer->data;
  keel_breaker_call *call = b->active_calls;
  b->active_calls = NULL;
  b->calls_detached = true;
  /* The list is newest first: walk it from the oldest, so that done calls
   * come in the order the calls were accepted. User code below may report
   * other calls of this list: they are given back without unlinking, and
   * freed only in a later close callback. */
  while (call != NULL && call->next_active != NULL) call = call->next_active;
  while (call != NULL) {
    keel_breaker_call *next = call->prev_active;
    /* A result reported before the close stands; the rest is dropped. */
    if (!call->finished) finish(call, call->has_result ? call->result : UV_ECANCELED);
    /* Calls whose operation never started, or has reported, are done; the
     * others wait for their operation's report. */
    if (!call->op_started || call->op_reported) recycle(call);
    call = next;
  }
  keel__breaker_close_start_timer(b);
}
