/* Internals of the verifier shared between its files and its unit tests. */
#ifndef KEEL_VERIFY_INTERNAL_H
#define KEEL_VERIFY_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/verify.h"

/* ---- SQL text (sql.c): built once at keel_verify_new ------------------- */

typedef struct keel__vsql {
  int nkeys;
  bool bounded;
  char *batch_first; /* params: [bound keys] */
  char *batch_next;  /* params: last keys, [bound keys] */
  char *max_key;     /* params: none; returns the key columns of the largest row */
  char *lock;        /* params: $1 lock key */
  char *ckpt_create; /* NULL without checkpoint */
  char *ckpt_load;   /* params: $1 job; returns nkeys columns */
  char *ckpt_save;   /* params: $1 job, $2.. keys */
  char *ckpt_clear;  /* params: $1 job */
} keel__vsql;

/* Builds every statement from opts (validated). Returns 0, UV_EINVAL with a
 * static reason in *why, or UV_ENOMEM. On failure s is left empty. */
int keel__vsql_build(keel__vsql *s, const keel_verify_opts *opts, const char **why);
void keel__vsql_free(keel__vsql *s);

/* The default advisory lock key for a table name: a 63-bit FNV-1a hash of
 * "keel_verify:" + table. */
int64_t keel__verify_lock_key(const char *table);

/* ---- problem codes (codes.c) ------------------------------------------- */

typedef struct keel__vcodes {
  keel_verify_code_count e[KEEL_VERIFY_MAX_CODES + 1]; /* last one is "(other)" */
  uint64_t run[KEEL_VERIFY_MAX_CODES + 1];             /* counts of the current run */
  unsigned n;                                          /* used entries, other excluded */
  unsigned hint;                                       /* last hit */
  bool other_used;
} keel__vcodes;

void keel__vcodes_init(keel__vcodes *c);
/* Counts one problem `code` in the current run and in the totals. */
void keel__vcodes_add(keel__vcodes *c, const char *code);
/* Ends a run: the current-run counts become last_run, then restart at 0. */
void keel__vcodes_end_run(keel__vcodes *c);
/* Writes the top `cap` codes by total (ties: first seen first) into out;
 * returns how many. */
unsigned keel__vcodes_top(const keel__vcodes *c, keel_verify_code_count *out, unsigned cap);

/* ---- rows --------------------------------------------------------------- */

struct keel_verify_row {
  keel_verify *v; /* for problem counting (NULL for copies) */
  int ncols;
  const char *const *names;  /* ncols names */
  const keel_pg_result *res; /* live row: values from res at idx */
  int idx;
  const char *const *values; /* copied row: ncols values (NULL = SQL NULL) */
  const int *keycols;        /* nkeys column indexes */
  int nkeys;
  bool in_validator;
  unsigned nproblems;
};

/* Column index of name in row, or -1. */
int keel__vrow_find(const keel_verify_row *row, const char *name);

#endif
