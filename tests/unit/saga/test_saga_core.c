/* The saga's decisions without I/O (src/saga/saga_core.c): what follows an
 * outcome, for each step kind, budget and deadline. */
#include <criterion/criterion.h>

#include "saga/saga_internal.h"

/* book (C, 3 attempts), charge (pivot), reserve (retriable) */
static const keel__saga_def_step SEED[3] = {
    {KEEL_SAGA_COMPENSATABLE, 3, 5}, {KEEL_SAGA_PIVOT, 3, 5}, {KEEL_SAGA_RETRIABLE, 3, 5}};

static keel__saga_pos pos(int state, int step, unsigned attempt, unsigned budget) {
  keel__saga_pos p = {state, step, attempt, budget};
  return p;
}

Test(saga_core, success_moves_forward_and_records_the_next) {
  keel__saga_next x = keel__saga_after(SEED, 3, pos(KEEL_SAGA_RUNNING, 0, 1, 0), 0, false);
  cr_assert_eq(x.kind, KEEL__NEXT_CALL);
  cr_assert_eq(x.pos.step, 1);
  cr_assert_eq(x.pos.attempt, 1);
  x = keel__saga_after(SEED, 3, pos(KEEL_SAGA_RUNNING, 2, 4, 0), 0, false);
  cr_assert_eq(x.kind, KEEL__NEXT_END);
  cr_assert_eq(x.pos.state, KEEL_SAGA_DONE);
}

Test(saga_core, refusal_before_the_pivot_compensates_the_steps_before) {
  /* insufficient funds at the pivot: release the item (step 0) */
  keel__saga_next x =
      keel__saga_after(SEED, 3, pos(KEEL_SAGA_RUNNING, 1, 1, 0), KEEL_EABORTED, false);
  cr_assert_eq(x.kind, KEEL__NEXT_CALL);
  cr_assert_eq(x.pos.state, KEEL_SAGA_COMPENSATING);
  cr_assert_eq(x.pos.step, 0);
  /* a refusal of step 0 on its first attempt: nothing to compensate */
  x = keel__saga_after(SEED, 3, pos(KEEL_SAGA_RUNNING, 0, 1, 0), KEEL_EABORTED, false);
  cr_assert_eq(x.kind, KEEL__NEXT_END);
  cr_assert_eq(x.pos.state, KEEL_SAGA_COMPENSATED);
  /* ... after an unknown attempt: compensate step 0 too */
  x = keel__saga_after(SEED, 3, pos(KEEL_SAGA_RUNNING, 0, 2, 0), KEEL_EABORTED, false);
  cr_assert_eq(x.pos.state, KEEL_SAGA_COMPENSATING);
  cr_assert_eq(x.pos.step, 0);
}

Test(saga_core, unknown_outcomes_retry_then_compensate) {
  keel__saga_next x =
      keel__saga_after(SEED, 3, pos(KEEL_SAGA_RUNNING, 0, 1, 0), KEEL_EINDOUBT, false);
  cr_assert_eq(x.kind, KEEL__NEXT_WAIT);
  x = keel__saga_after(SEED, 3, pos(KEEL_SAGA_RUNNING, 0, 3, 0), KEEL_EINDOUBT, false);
  cr_assert_eq(x.pos.state, KEEL_SAGA_COMPENSATING);
  cr_assert_eq(x.pos.step, 0, "the step whose outcome is unknown is compensated");
  /* the pivot and retriable steps never give up on an unknown outcome */
  x = keel__saga_after(SEED, 3, pos(KEEL_SAGA_RUNNING, 1, 99, 0), KEEL_EINDOUBT, true);
  cr_assert_eq(x.kind, KEEL__NEXT_WAIT);
  x = keel__saga_after(SEED, 3, pos(KEEL_SAGA_RUNNING, 2, 99, 0), KEEL_EABORTED, true);
  cr_assert_eq(x.kind, KEEL__NEXT_WAIT);
}

Test(saga_core, compensation_budget_failed_and_redrive) {
  keel__saga_next x =
      keel__saga_after(SEED, 3, pos(KEEL_SAGA_COMPENSATING, 0, 4, 0), KEEL_ECONN, false);
  cr_assert_eq(x.kind, KEEL__NEXT_WAIT);
  x = keel__saga_after(SEED, 3, pos(KEEL_SAGA_COMPENSATING, 0, 5, 0), KEEL_ECONN, false);
  cr_assert_eq(x.kind, KEEL__NEXT_END);
  cr_assert_eq(x.pos.state, KEEL_SAGA_FAILED);
  /* a re-drive sets budget = attempt: a fresh budget */
  x = keel__saga_decide(SEED, 3, pos(KEEL_SAGA_COMPENSATING, 0, 5, 5), false);
  cr_assert_eq(x.kind, KEEL__NEXT_CALL);
  cr_assert_eq(x.pos.attempt, 6);
  x = keel__saga_after(SEED, 3, pos(KEEL_SAGA_COMPENSATING, 0, 6, 5), 0, false);
  cr_assert_eq(x.pos.state, KEEL_SAGA_COMPENSATED);
}

Test(saga_core, deadline_before_the_pivot_only) {
  keel__saga_next x = keel__saga_decide(SEED, 3, pos(KEEL_SAGA_RUNNING, 0, 0, 0), true);
  cr_assert_eq(x.kind, KEEL__NEXT_END, "nothing started: compensated at once");
  cr_assert_eq(x.pos.state, KEEL_SAGA_COMPENSATED);
  x = keel__saga_decide(SEED, 3, pos(KEEL_SAGA_RUNNING, 0, 1, 0), true);
  cr_assert_eq(x.pos.state, KEEL_SAGA_COMPENSATING);
  cr_assert_eq(x.pos.step, 0);
  x = keel__saga_decide(SEED, 3, pos(KEEL_SAGA_RUNNING, 2, 1, 0), true);
  cr_assert_eq(x.pos.state, KEEL_SAGA_RUNNING, "after the pivot a deadline changes nothing");
  cr_assert_eq(keel__saga_forward_from(SEED, 3), 1);
}
