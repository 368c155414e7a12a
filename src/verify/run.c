/* The run's state machine, free of I/O: from a view of the verifier's
 * state, the next step. sched.c's pump carries the steps out until this
 * says there is nothing to do. */
#include "verify/verify_internal.h"

keel__vaction keel__vrun_next(const keel__vview *s) {
  if (s->closing) return KEEL__VA_NONE;
  if (s->cancel_req) return KEEL__VA_REPORT_CANCELED;
  if (s->run_requested && !s->running && (!s->lock_inflight || s->lock_cancel))
    return KEEL__VA_TAKE_REQUEST;
  if (!s->running) return KEEL__VA_NONE;
  if (s->has_fix && s->fixes_active < s->fix_concurrency && s->fixes_pending > 0)
    return KEEL__VA_START_FIX;
  if (!s->scanning) return KEEL__VA_NONE; /* checkpoint or largest key on its way */
  if (s->leader_lock && s->leader && s->lock_session_changed) return KEEL__VA_LOSE_LEADER;
  if (s->leader_lock && !s->leader && !s->scan_done) return KEEL__VA_FAIL_NOT_LEADER;
  if (!s->fetch_inflight && !s->scan_done && !s->stopping && s->fixes_pending < s->batch_size)
    return KEEL__VA_FETCH;
  if ((s->scan_done || s->stopping) && !s->fetch_inflight && s->fixes_active == 0 &&
      s->fixes_pending == 0 && s->fixes_waiting == 0)
    return KEEL__VA_END_RUN;
  return KEEL__VA_NONE;
}
