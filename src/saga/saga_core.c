/* The saga's decisions, free of I/O: from a position in the log and an
 * outcome to the next position. Unit-tested in tests/unit/saga. */
#include "saga_internal.h"

unsigned keel__saga_forward_from(const keel__saga_def_step *steps, unsigned n) {
  for (unsigned i = 0; i < n; i++)
    if (steps[i].kind != KEEL_SAGA_COMPENSATABLE) return i;
  return n;
}

static keel__saga_next compensate_from(int k) {
  keel__saga_next x;
  memset(&x, 0, sizeof x);
  if (k < 0) {
    x.kind = KEEL__NEXT_END;
    x.pos.state = KEEL_SAGA_COMPENSATED;
    x.pos.step = -1;
    return x;
  }
  x.kind = KEEL__NEXT_CALL;
  x.pos.state = KEEL_SAGA_COMPENSATING;
  x.pos.step = k;
  x.pos.attempt = 1;
  x.pos.budget = 0;
  return x;
}

static keel__saga_next again(keel__saga_pos pos, keel__saga_next_kind kind) {
  keel__saga_next x;
  x.kind = kind;
  x.pos = pos;
  if (kind == KEEL__NEXT_CALL) x.pos.attempt++;
  return x;
}

keel__saga_next keel__saga_decide(const keel__saga_def_step *steps, unsigned n, keel__saga_pos pos,
                                  bool overdue) {
  unsigned f = keel__saga_forward_from(steps, n);
  if (pos.state == KEEL_SAGA_RUNNING) {
    int i = pos.step;
    if (i < 0 || (unsigned)i >= n) { /* cannot happen: a torn row; finish it as done */
      keel__saga_next x = again(pos, KEEL__NEXT_END);
      x.pos.state = KEEL_SAGA_DONE;
      return x;
    }
    if (overdue && (unsigned)i < f) return compensate_from(pos.attempt > 0 ? i : i - 1);
    if (steps[i].kind == KEEL_SAGA_COMPENSATABLE &&
        pos.attempt - pos.budget >= steps[i].max_attempts)
      return compensate_from(i);
    return again(pos, KEEL__NEXT_CALL);
  }
  /* compensating */
  int j = pos.step;
  if (j < 0) return compensate_from(-1);
  if (pos.attempt - pos.budget >= steps[j].comp_attempts) {
    keel__saga_next x = again(pos, KEEL__NEXT_END);
    x.pos.state = KEEL_SAGA_FAILED;
    return x;
  }
  return again(pos, KEEL__NEXT_CALL);
}

keel__saga_next keel__saga_after(const keel__saga_def_step *steps, unsigned n, keel__saga_pos pos,
                                 int status, bool overdue) {
  if (pos.state == KEEL_SAGA_RUNNING) {
    int i = pos.step;
    keel_saga_step_kind k = steps[i].kind;
    if (status >= 0) {
      keel__saga_next x;
      memset(&x, 0, sizeof x);
      x.pos.state = KEEL_SAGA_RUNNING;
      if ((unsigned)i + 1 >= n) {
        x.kind = KEEL__NEXT_END;
        x.pos.state = KEEL_SAGA_DONE;
        x.pos.step = (int)n;
        return x;
      }
      x.kind = KEEL__NEXT_CALL;
      x.pos.step = i + 1;
      x.pos.attempt = 1;
      return x;
    }
    if (k == KEEL_SAGA_COMPENSATABLE) {
      /* A refusal on the first attempt applied nothing; after an earlier
       * attempt whose outcome is unknown, compensate this step too (its
       * compensation treats "nothing to undo" as success). */
      if (status == KEEL_EABORTED) return compensate_from(pos.attempt <= 1 ? i - 1 : i);
      if (overdue || pos.attempt - pos.budget >= steps[i].max_attempts) return compensate_from(i);
      return again(pos, KEEL__NEXT_WAIT);
    }
    if (k == KEEL_SAGA_PIVOT && status == KEEL_EABORTED) return compensate_from(i - 1);
    return again(pos, KEEL__NEXT_WAIT); /* pivot unknown, retriable: forward only */
  }
  int j = pos.step;
  if (status >= 0) return compensate_from(j - 1);
  if (pos.attempt - pos.budget >= steps[j].comp_attempts) {
    keel__saga_next x = again(pos, KEEL__NEXT_END);
    x.pos.state = KEEL_SAGA_FAILED;
    return x;
  }
  return again(pos, KEEL__NEXT_WAIT);
}
