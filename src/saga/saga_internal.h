/* Private to src/saga. */
#ifndef KEEL_SAGA_INTERNAL_H
#define KEEL_SAGA_INTERNAL_H

#include <stdbool.h>
#include <string.h>

#include "../core/alloc.h"
#include "keel/saga.h"

typedef struct keel__saga_sql {
  char *migrate;
  char *load;
  char *advance;
  char *advance_end; /* advance + the job's fenced completion */
  char *start;
  char *start_nokey; /* START when the caller gave no start key */
  char *redrive;
  char *stats;
} keel__saga_sql;

int keel__saga_sql_init(keel__saga_sql *sql, const char *schema, long long migrate_key);
void keel__saga_sql_free(keel__saga_sql *sql);

/* The pure decision core (saga_core.c): what comes after an outcome, given
 * the definition. No I/O. */
typedef struct keel__saga_def_step {
  keel_saga_step_kind kind;
  unsigned max_attempts;
  unsigned comp_attempts;
} keel__saga_def_step;

typedef struct keel__saga_pos {
  int state;        /* keel_saga_state */
  int step;         /* current step (compensating: the step being compensated) */
  unsigned attempt; /* attempts started of (step, phase) */
  unsigned budget;  /* attempt count when the current budget began */
} keel__saga_pos;

typedef enum keel__saga_next_kind {
  KEEL__NEXT_CALL = 0, /* record a new attempt (pos.attempt) and call it */
  KEEL__NEXT_WAIT,     /* write the outcome, wait the backoff, then decide again */
  KEEL__NEXT_END       /* terminal state written */
} keel__saga_next_kind;

typedef struct keel__saga_next {
  keel__saga_next_kind kind;
  keel__saga_pos pos;
} keel__saga_next;

/* The first step index that cannot be compensated (pivot or first
 * retriable; nsteps when every step is compensatable). */
unsigned keel__saga_forward_from(const keel__saga_def_step *steps, unsigned n);

/* From a loaded (non-terminal) position: what to do now. overdue: the
 * saga's deadline has passed. */
keel__saga_next keel__saga_decide(const keel__saga_def_step *steps, unsigned n, keel__saga_pos pos,
                                  bool overdue);

/* After the attempt pos.attempt of the current (step, phase) ended with
 * status (0 success, KEEL_EABORTED refused, other < 0 failed/unknown). */
keel__saga_next keel__saga_after(const keel__saga_def_step *steps, unsigned n, keel__saga_pos pos,
                                 int status, bool overdue);

#endif
