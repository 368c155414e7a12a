/* Internals of the verifier shared between its files and its unit tests. */
#ifndef KEEL_VERIFY_INTERNAL_H
#define KEEL_VERIFY_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/util.h"
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
  /* the lease (leader_lock with KEEL_VERIFY_LEADER_LEASE), else NULL */
  char *lease_create;  /* params: none */
  char *lease_acquire; /* params: $1 name, $2 owner, $3 ttl ms; returns fence (no row:
                          held by someone else) */
  char *lease_release; /* params: $1 name, $2 owner, $3 fence */
  char *lease_check;   /* params: $1 name, $2 owner, $3 fence; returns held */
  /* with a lease, ckpt_save and ckpt_clear are fenced: their params go on
   * with name, owner, fence, and they return one boolean, held */
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

/* ---- the verifier object, shared by the files of src/verify ------------- */

typedef struct keel__vfixq {
  keel_verify_fix *head, *tail;
  unsigned n;
} keel__vfixq;

struct keel_verify_fix {
  keel_verify *v; /* NULL once detached (timed out, or verifier closed) */
  keel_verify_fix *next, *prev;
  keel__vfixq *list;
  unsigned attempt;
  uint64_t due; /* loop time: deadline (running) or retry time (waiting) */
  uint64_t seq; /* order of equal due times in the retry heap */
  uint64_t prev_delay;
  uint64_t fence; /* the run's fence (0 without a lease) */
  keel_verify_row row;
  int keycols[KEEL_VERIFY_MAX_KEYS];
  /* followed by names[ncols], values[ncols] and the strings */
};

enum keel__vphase {
  KEEL__VPH_IDLE = 0,
  KEEL__VPH_CKPT_CREATE,
  KEEL__VPH_CKPT_LOAD,
  KEEL__VPH_BOUND,
  KEEL__VPH_SCAN
};

struct keel_verify {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  keel_verify_opts o;
  char *s_table, *s_where, *s_conninfo, *s_job, *s_ckpt, *s_lease;
  char *s_keys[KEEL_VERIFY_MAX_KEYS];
  char **s_cols;
  int ncols_opt;
  int nkeys;
  keel__vsql sql;
  keel_pg_pool *pool;
  keel_pg *conn;      /* owned, when no pool */
  keel_pg *lock_conn; /* with leader_lock: owned, or held from the pool */
  bool lock_from_pool, lock_acquiring, lock_cancel;
  int lock_pid; /* backend holding our lock, to notice a new session */
  /* the lease (v->lease): lock_conn is owned (conninfo) or NULL (pool) */
  bool lease, lease_ready, lease_creating, renew_inflight, releasing;
  char owner[48];
  char fence_text[24]; /* v->fence as text, for statements */
  uint64_t fence;      /* held, 0 = none */
  uint64_t run_fence;  /* the fence of the run going (0 = none) */
  char run_fence_text[24];
  uint64_t lease_deadline; /* uv_now() after which this verifier no longer leads */
  uv_timer_t renewt, deadt;
  int conns_open;
  uv_timer_t tick, kick, fixt, runt;
  int handles_open;
  unsigned queries_out;
  bool closing;
  keel_close_cb close_cb;
  void *close_data;

  bool started, stopping, run_requested, lock_inflight, leader, in_pump, ckpt_ready;
  bool ready;            /* keel_verify_new() has returned it */
  bool cancel_req;       /* stop dropped a requested run: report UV_ECANCELED */
  bool close_cancel_run; /* close dropped a run: UV_ECANCELED before close_cb */
  bool runq_out;         /* the run's statement (checkpoint, bound, batch) is out */
  uint64_t run_id;       /* bumped when a run ends: tells a late statement */
  /* the run */
  bool running, fetch_inflight, scan_done, have_last, have_bound;
  enum keel__vphase phase;
  int run_status;
  char *last[KEEL_VERIFY_MAX_KEYS];
  char *bound[KEEL_VERIFY_MAX_KEYS];
  uint64_t run_start, run_rows, run_problems;
  unsigned since_ckpt;
  char **colnames;
  int ncolnames;
  int keycols[KEEL_VERIFY_MAX_KEYS];
  keel__vfixq pending, active;
  /* fix-ups waiting for a retry: a min-heap on (due, seq) */
  keel_verify_fix **wheap;
  unsigned wn, wcap;
  uint64_t wseq;

  keel__vcodes codes;
  keel_verify_stats st;
  char last_error[KEEL__ERRBUF_SIZE];
};

/* ---- verify.c: statements, errors, life cycle -------------------------- */

uint64_t keel__vnow(const keel_verify *v);
void keel__vset_error(keel_verify *v, int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* Frees v once closing and nothing of it is left (calls the close cb). */
void keel__vmaybe_free(keel_verify *v);
/* Sends a statement on the pool or the owned connection; the callback gets
 * v as data and must start with keel__vquery_returned(). */
int keel__vquery(keel_verify *v, const char *sql, int n, const char *const *params,
                 keel_pg_result_cb cb);
/* true when the callback must return at once (closing). */
bool keel__vquery_returned(keel_verify *v);
/* keel__vquery() for the run's own statement (one at a time); its
 * callback starts with keel__vrunq_back(data), which returns v or NULL when
 * the callback must return (closing, or the statement's run is over). */
int keel__vrunq(keel_verify *v, const char *sql, int n, const char *const *params,
                keel_pg_result_cb cb);
keel_verify *keel__vrunq_back(void *data);
uint64_t keel__vrun_timeout(const keel_verify *v);
const char *keel__vpg_error(keel_verify *v, keel_pg *c, const keel_pg_result *res);

/* ---- run.c: the run's state machine, free of I/O ------------------------ */

typedef struct keel__vview {
  bool closing, cancel_req, run_requested, running, lock_inflight, lock_cancel;
  bool has_fix;  /* opts.fix set */
  bool scanning; /* the run reached its batches (phase SCAN) */
  bool leader_lock, leader, lock_session_changed;
  bool scan_done, stopping, fetch_inflight;
  unsigned fixes_active;  /* running */
  unsigned fixes_pending; /* waiting for a slot */
  unsigned fixes_waiting; /* waiting for a retry */
  unsigned fix_concurrency;
  uint32_t batch_size;
} keel__vview;

typedef enum keel__vaction {
  KEEL__VA_NONE = 0,        /* nothing can move now */
  KEEL__VA_REPORT_CANCELED, /* stop dropped a requested run: report UV_ECANCELED */
  KEEL__VA_TAKE_REQUEST,    /* a requested run begins (or asks for the lock) */
  KEEL__VA_START_FIX,       /* the first fix-up waiting for a slot starts */
  KEEL__VA_LOSE_LEADER,     /* the lock's session is gone: no longer leader */
  KEEL__VA_FAIL_NOT_LEADER, /* not leader any more: the run fails */
  KEEL__VA_FETCH,           /* fetch the next batch */
  KEEL__VA_END_RUN          /* scan and fix-ups done: end the run */
} keel__vaction;

keel__vaction keel__vrun_next(const keel__vview *s);

/* ---- sched.c: scheduling, start and end of a run, its bound ------------- */

void keel__vkick(keel_verify *v); /* a pump on a later loop iteration */
void keel__vpump(keel_verify *v); /* carries out run.c's steps */
void keel__vbegin_run(keel_verify *v);
void keel__vfail_run(keel_verify *v, int status); /* the scan stops; the run ends later */
void keel__vend_run(keel_verify *v);
void keel__vreport_run(keel_verify *v, int status); /* stats and on_run_done */
void keel__vabort_run(keel_verify *v, int status);  /* ends the run now */

/* ---- scan.c: keyset batches ---------------------------------------------- */

void keel__vclear_keys(char **keys);
int keel__vcopy_keys(char **dst, const keel_pg_result *res, int row, const int *cols, int nkeys);
void keel__vupdate_last_key(keel_verify *v);
void keel__vafter_checkpoint(keel_verify *v); /* the largest key, then the batches */
void keel__vfetch(keel_verify *v);

/* ---- fix.c: fix-ups ------------------------------------------------------ */

void keel__vq_push(keel__vfixq *q, keel_verify_fix *f);
void keel__vq_remove(keel_verify_fix *f);
keel_verify_fix *keel__vfix_new(const keel_verify_row *row);
void keel__vfix_start(keel_verify *v);
/* Drops every fix-up: waiting ones are freed, running ones detached (their
 * keel_verify_fix_done() returns KEEL_ESTALE). Returns how many. */
uint64_t keel__vfix_drop_all(keel_verify *v);
void keel__varm_fix_timer(keel_verify *v);

/* ---- leader.c: leader lock ----------------------------------------------- */

void keel__von_lock_state(keel_pg *c, bool up, int status, void *data);
void keel__vlock_request(keel_verify *v);
void keel__vlock_release(keel_verify *v); /* at close, for a pooled lock session */

/* ---- lease.c: the leader lease --------------------------------------------- */

void keel__vlease_request(keel_verify *v); /* for a run: acquire or renew, then begin */
/* Gives the lease up (expires it now) when held and no run needs it; at
 * close too. */
void keel__vlease_release(keel_verify *v);
/* The lease is gone: leader false, timers stopped, a run going aborted with
 * KEEL_ENOTLEADER. `why` goes to last_error. */
void keel__vlease_lost(keel_verify *v, const char *why);
int keel__vlease_fence_sql(const keel_verify *v, uint64_t fence, char *buf, size_t cap);
/* Appends name, owner and the run's fence to p (at *n) for a fenced
 * statement; run_fence_text holds the fence's text. */
void keel__vlease_params(keel_verify *v, const char **p, int *n, char *fence_text, size_t cap);
/* verify.c: the close callback of an owned connection */
void keel__von_conn_closed(void *obj, void *data);

/* ---- checkpoint.c -------------------------------------------------------- */

void keel__vckpt_begin(keel_verify *v);      /* create/load, then keel__vafter_checkpoint */
void keel__vckpt_batch_done(keel_verify *v); /* every checkpoint_every batches */
bool keel__vckpt_end(keel_verify *v);        /* true when the end-of-run write was sent */
void keel__vckpt_save_nowait(keel_verify *v);

/* ---- row.c ---------------------------------------------------------------- */

const char *keel__vrow_val(const keel_verify_row *row, int i);

#endif
