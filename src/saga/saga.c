/* Sagas on the durable queue: the orchestrator object, the run of one saga
 * (load, guarded writes, calls, timers) and the verbs. The decisions live
 * in saga_core.c, the SQL in saga_sql.c. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "../core/histogram.h"
#include "../core/util.h"
#include "keel/pg.h"
#include "keel/pgqueue.h"
#include "keel/serve.h"
#include "../pgqueue/pgqueue_hook.h"
#include "saga_internal.h"

#define MAX_KEY 96
/* the job's max_attempts: the queue retries a run that failed on the log
 * (connection lost, ...) practically forever; the saga decides the end */
#define JOB_MAX_ATTEMPTS 1000000

typedef struct run run;
typedef struct req req;

struct keel_saga_call {
  keel_saga *s;
  run *r; /* NULL once detached (timed out, or the saga closing) */
  int64_t id;
  unsigned step;
  bool comp;
  unsigned attempt;
  bool timed_out;
  keel_saga_call *next, *prev; /* s->calls */
  char key[MAX_KEY];
  char *data;
};

typedef struct step_def {
  char name[KEEL_SAGA_MAX_NAME + 1];
  keel_saga_step_fn action;
  keel_saga_step_fn compensation;
  uint64_t timeout_ms;
  keel_backoff backoff;
} step_def;

struct run {
  keel_saga *s;
  run *next, *prev;
  int64_t id;
  keel_pgqueue_job *job; /* NULL for a resume */
  keel_saga_id_cb cb;
  void *cb_data;
  keel__saga_pos pos;
  int64_t version;
  char *data;
  char *last_error;
  bool has_deadline;
  uint64_t deadline_at; /* loop time */
  keel_saga_call *call;
  uv_timer_t timer;
  bool timer_closing;
  bool q_pending; /* a statement of the run is in flight */
  bool dead;      /* closed by the saga's close: free when nothing is pending */
  bool lost;      /* the job's lease was lost */
  bool finished;
  bool optimistic; /* version and data taken from the job: a failed guard loads */
  bool w_job;      /* the write in flight also completes the job (sql.advance_end) */
  bool job_folded; /* that write committed: the job is completed, job_written says if it
                      found the job's row (the queue is told, it sends no completion) */
  bool job_written;
  int status;
  /* the write in flight */
  keel__saga_next nx;
  bool w_outcome;
  bool w_unknown; /* the outcome written is 'unknown' (an attempt found started) */
  bool loaded;    /* pos came from a load: an attempt there may have no row */
  int w_status;
  char *w_data;
  uint64_t t_mark;   /* start of keel's own time for the next step (added latency) */
  uint64_t t_record; /* when the attempt's record was sent */
  uint64_t t_done;   /* when done() came */
};

enum req_kind { REQ_START, REQ_REDRIVE };

struct req {
  keel_saga *s;
  req *next;
  enum req_kind kind;
  keel_saga_start_cb start_cb;
  keel_saga_id_cb id_cb;
  void *data;
  int64_t id;
  bool existed;
  bool found;
  int status;
  char *json;
  char *start_key;
  uint64_t deadline_ms;
  keel_pg_tx *tx;
  bool enq_pending; /* the enqueue's callback is still to come */
  bool tx_ended;    /* the transaction's done callback ran */
};

struct keel_saga {
  uv_loop_t *loop;
  keel_saga_opts o;
  char *conninfo;
  char schema[41];
  char type[KEEL_SAGA_MAX_NAME + 1];
  char queue[KEEL_PGQUEUE_MAX_NAME + 1];
  step_def *steps;
  keel__saga_def_step *defs;
  unsigned nsteps;
  keel__saga_sql sql;
  keel_pg_pool *pool;
  keel_pgqueue *q;
  bool q_ready, ready, migrating, closing, stats_pending;
  req *wait_head, *wait_tail;
  unsigned nwaiting;
  unsigned ninflight_req;
  run *runs;
  unsigned nruns;
  keel_saga_call *calls;
  keel_rng rng;
  uv_timer_t t_migrate, t_stats, t_later;
  unsigned handles_open;
  bool pool_closed, q_closed, cancels_sent;
  keel_close_cb close_cb;
  void *close_data;
  keel__stats_hooks hooks;
  keel__histogram h_step, h_added;
  keel_saga_stats st;
  char err[KEEL__ERRBUF_SIZE];
};

static const char *const STATE_NAME[] = {"running", "compensating", "done", "compensated",
                                         "failed"};

const char *keel_saga_state_name(keel_saga_state st) {
  return (unsigned)st < KEEL__ARRAY_SIZE(STATE_NAME) ? STATE_NAME[st] : "?";
}

static int state_of(const char *t) {
  for (unsigned i = 0; t && i < KEEL__ARRAY_SIZE(STATE_NAME); i++)
    if (strcmp(t, STATE_NAME[i]) == 0) return (int)i;
  return -1;
}

static uint64_t hr(void) {
  return uv_hrtime();
}

static void hook(keel_saga *s, keel_saga_point p, run *r, bool comp, int step, unsigned attempt) {
  if (s->o.test_hook) s->o.test_hook(s, p, r->id, (unsigned)step, comp, attempt, s->o.data);
}

static void hook_id(keel_saga *s, keel_saga_point p, int64_t id, unsigned step, bool comp,
                    unsigned attempt) {
  if (s->o.test_hook) s->o.test_hook(s, p, id, step, comp, attempt, s->o.data);
}

static void maybe_closed(keel_saga *s);

/* ---- opts ---------------------------------------------------------------- */

void keel_saga_step_init(keel_saga_step *st, const char *name, keel_saga_step_fn action,
                         keel_saga_step_fn compensation) {
  if (st == NULL) return;
  memset(st, 0, sizeof *st);
  st->name = name;
  st->action = action;
  st->compensation = compensation;
  st->kind = KEEL_SAGA_COMPENSATABLE;
  st->timeout_ms = KEEL_SAGA_DEFAULT_TIMEOUT_MS;
  st->max_attempts = KEEL_SAGA_DEFAULT_MAX_ATTEMPTS;
  st->comp_attempts = KEEL_SAGA_DEFAULT_COMP_ATTEMPTS;
  keel_backoff_exponential(&st->backoff, 100, 2.0, 10000);
}

void keel_saga_opts_init(keel_saga_opts *o) {
  if (o == NULL) return;
  memset(o, 0, sizeof *o);
  o->orchestrate = true;
  o->concurrency = KEEL_SAGA_DEFAULT_CONCURRENCY;
  o->lease_ms = KEEL_SAGA_DEFAULT_LEASE_MS;
  o->poll_ms = 1000;
  o->pool_size = 0; /* KEEL_SAGA_DEFAULT_POOL_SIZE */
  o->max_pending = KEEL_SAGA_DEFAULT_MAX_PENDING;
  o->stats_ms = KEEL_SAGA_DEFAULT_STATS_MS;
  o->migrate = true;
}

void keel_saga_start_opts_init(keel_saga_start_opts *o) {
  if (o != NULL) memset(o, 0, sizeof *o);
}

static bool valid_name(const char *n) {
  if (n == NULL || *n == '\0' || strlen(n) > KEEL_SAGA_MAX_NAME) return false;
  for (const char *p = n; *p; p++) {
    char c = *p;
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
          c == '.' || c == '-'))
      return false;
  }
  return true;
}

static bool valid_schema(const char *n) {
  if (n == NULL || *n == '\0' || strlen(n) > 40) return false;
  if (!((n[0] >= 'a' && n[0] <= 'z') || n[0] == '_')) return false;
  for (const char *p = n; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_')) return false;
  return true;
}

/* ---- runs ------------------------------------------------------------------ */

static void run_free(run *r) {
  keel_saga *s = r->s;
  if (r->next) r->next->prev = r->prev;
  if (r->prev)
    r->prev->next = r->next;
  else
    s->runs = r->next;
  keel__free(r->data);
  keel__free(r->last_error);
  keel__free(r->w_data);
  keel__free(r);
  s->nruns--;
  s->st.running_here = s->nruns;
  maybe_closed(s);
}

static void on_run_timer_closed(uv_handle_t *h) {
  run *r = h->data;
  if (!r->q_pending)
    run_free(r);
  else
    r->timer_closing = true, r->dead = true;
}

static void run_dispose(run *r) {
  if (r->timer_closing) return;
  r->timer_closing = true;
  uv_close((uv_handle_t *)&r->timer, on_run_timer_closed);
}

static void call_detach(keel_saga_call *c) {
  if (c->r) c->r->call = NULL;
  c->r = NULL;
}

static void call_free(keel_saga_call *c) {
  keel_saga *s = c->s;
  call_detach(c);
  if (c->next) c->next->prev = c->prev;
  if (c->prev)
    c->prev->next = c->next;
  else
    s->calls = c->next;
  keel__free(c->data);
  keel__free(c);
}

/* Ends the run: reports to the job or the resume's caller, then frees. */
static void run_finish(run *r, int status) {
  keel_saga *s = r->s;
  if (r->finished) return;
  r->finished = true;
  r->status = status;
  uv_timer_stop(&r->timer);
  if (r->call) call_detach(r->call);
  if (status == KEEL_ECONFLICT) s->st.conflicts++;
  if (r->job && r->job_folded) {
    keel_pgqueue_job *j = r->job;
    r->job = NULL;
    (void)keel__pgqueue_job_done_written(j, r->job_written);
  } else if (r->job) {
    keel_pgqueue_job *j = r->job;
    r->job = NULL;
    if (s->closing || status == 0 || status == KEEL_ECONFLICT || status == KEEL_ENOTFOUND ||
        status == KEEL_ELOST) /* closing: done() returns KEEL_ECLOSING and gives it back */
      keel_pgqueue_job_done(j, 0);
    else
      keel_pgqueue_job_fail(j, status, s->err);
  }
  if (r->cb) {
    keel_saga_id_cb cb = r->cb;
    r->cb = NULL;
    cb(s, status == KEEL_ELOST ? KEEL_ECONFLICT : status, r->id, r->cb_data);
  }
  run_dispose(r);
}

static void set_err(keel_saga *s, const char *what, keel_pg *c, const keel_pg_result *res,
                    int status) {
  const char *m = keel_pg_result_error(res);
  if (m == NULL && c) m = keel_pg_last_error(c);
  if (m == NULL) m = keel_pg_pool_last_error(s->pool);
  const char *st = keel_pg_result_sqlstate(res);
  keel__fail(s->err, status, "%s: %s%s%s%s", what, keel_strerror(status), m && *m ? ": " : "",
             m ? m : "", st ? "" : "");
}

static void load(run *r);
static void call_now(run *r);
static void write_advance(run *r);

static void on_run_timer(uv_timer_t *t);

static bool overdue(run *r) {
  return r->has_deadline && uv_now(r->s->loop) >= r->deadline_at;
}

/* Acts on a decision: record-and-call, or end, through one guarded write. */
static void act(run *r, keel__saga_next nx, bool with_outcome, int status, char *new_data) {
  if (!with_outcome) r->w_unknown = false;
  r->nx = nx;
  r->w_outcome = with_outcome;
  r->w_status = status;
  keel__free(r->w_data);
  r->w_data = new_data;
  write_advance(r);
}

static void decide(run *r) {
  keel_saga *s = r->s;
  if (r->finished) return;
  if (s->closing || r->lost) {
    run_finish(r, s->closing ? UV_ECANCELED : KEEL_ELOST);
    return;
  }
  keel__saga_next nx = keel__saga_decide(s->defs, s->nsteps, r->pos, overdue(r));
  /* after a load, the attempt the saga row names may have crashed: give it
   * its row (nothing happens when it has one) */
  bool unknown = r->loaded && r->pos.attempt > 0;
  r->loaded = false;
  r->w_unknown = unknown;
  act(r, nx, unknown, 0, NULL);
}

static const char *outcome_name(int status) {
  if (status >= 0) return "succeeded";
  if (status == KEEL_EABORTED) return "refused";
  if (status == UV_ETIMEDOUT) return "timeout";
  return "failed";
}

/* The common start of a log statement's callback: frees a run that died
 * while the statement was out, ends it on close or on a failed statement.
 * Returns the run when the caller goes on with the result, else NULL. */
static run *log_returned(keel_pg *c, int status, const keel_pg_result *res, void *data,
                         const char *what) {
  run *r = data;
  keel_saga *s = r->s;
  r->q_pending = false;
  if (r->dead) {
    run_free(r);
    return NULL;
  }
  if (r->finished) return NULL;
  if (s->closing) {
    run_finish(r, UV_ECANCELED);
    return NULL;
  }
  if (status != 0) {
    set_err(s, what, c, res, status);
    run_finish(r, status);
    return NULL;
  }
  return r;
}

static void on_advance(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  run *r = log_returned(c, status, res, data, "saga log write");
  if (r == NULL) return;
  keel_saga *s = r->s;
  if (keel_pg_result_nrows(res) != 1 && r->optimistic) {
    r->optimistic = false;
    load(r);
    return;
  }
  r->optimistic = false;
  if (keel_pg_result_nrows(res) == 1 && r->w_job) {
    const char *jw = keel_pg_result_value(res, 0, 1);
    r->job_folded = true;
    r->job_written = jw != NULL && jw[0] == 't';
  }
  if (keel_pg_result_nrows(res) != 1) {
    keel__fail(s->err, KEEL_ECONFLICT,
               "saga %" PRId64 ": version %" PRId64 " moved: another process advanced it", r->id,
               r->version);
    run_finish(r, KEEL_ECONFLICT);
    return;
  }
  r->version = strtoll(keel_pg_result_value(res, 0, 0), NULL, 10);
  keel__saga_pos old = r->pos;
  keel__saga_next nx = r->nx;
  uint64_t now = hr();
  if (r->w_outcome && !r->w_unknown) {
    hook(s, KEEL_SAGA_AFTER_COMMIT, r, old.state == KEEL_SAGA_COMPENSATING, old.step, old.attempt);
    if (r->t_record) keel__histogram_record(&s->h_step, now - r->t_record);
  }
  r->pos = nx.pos;
  if (r->w_data) {
    keel__free(r->data);
    r->data = r->w_data;
    r->w_data = NULL;
  }
  if (nx.kind == KEEL__NEXT_END) {
    if (r->w_outcome && !r->w_unknown) keel__histogram_record(&s->h_added, now - r->t_done);
    int st = nx.pos.state;
    if (st == KEEL_SAGA_DONE) s->st.done++;
    if (st == KEEL_SAGA_COMPENSATED) s->st.compensated++;
    if (st == KEEL_SAGA_FAILED) {
      s->st.failed++;
      if (s->o.on_stuck) s->o.on_stuck(s, r->id, (unsigned)nx.pos.step, r->last_error, s->o.data);
    }
    /* not after close began (on_stuck may have called it): after close only
     * cancellations run */
    if (!r->finished && !s->closing && s->o.on_end)
      s->o.on_end(s, r->id, (keel_saga_state)st, s->o.data);
    run_finish(r, 0);
    return;
  }
  if (nx.kind == KEEL__NEXT_WAIT) {
    const step_def *d = &s->steps[old.step];
    unsigned n = old.attempt > old.budget ? old.attempt - old.budget : 1;
    uint64_t delay = keel_backoff_delay(&d->backoff, n, 0, &s->rng);
    if (r->has_deadline && old.state == KEEL_SAGA_RUNNING &&
        (unsigned)old.step < keel__saga_forward_from(s->defs, s->nsteps)) {
      uint64_t nowl = uv_now(s->loop);
      uint64_t left = r->deadline_at > nowl ? r->deadline_at - nowl : 0;
      if (delay > left) delay = left;
    }
    r->t_mark = 0;
    uv_timer_start(&r->timer, on_run_timer, delay, 0);
    return;
  }
  /* KEEL__NEXT_CALL: the attempt is recorded */
  hook(s, KEEL_SAGA_AFTER_RECORD, r, nx.pos.state == KEEL_SAGA_COMPENSATING, nx.pos.step,
       nx.pos.attempt);
  if (r->finished) return;
  call_now(r);
}

static void write_advance(run *r) {
  keel_saga *s = r->s;
  keel__saga_next *nx = &r->nx;
  keel__saga_pos *p = &r->pos;
  char idb[24], verb[24], ostep[16], oatt[16], nstep[16], natt[16], nbud[16];
  const char *oerr = NULL;
  snprintf(idb, sizeof idb, "%" PRId64, r->id);
  snprintf(verb, sizeof verb, "%" PRId64, r->version);
  snprintf(ostep, sizeof ostep, "%d", p->step);
  snprintf(oatt, sizeof oatt, "%u", p->attempt);
  snprintf(nstep, sizeof nstep, "%d", nx->pos.step);
  snprintf(natt, sizeof natt, "%u", nx->pos.attempt);
  snprintf(nbud, sizeof nbud, "%u", nx->pos.budget);
  bool ocomp = p->state == KEEL_SAGA_COMPENSATING;
  bool rec = nx->kind == KEEL__NEXT_CALL;
  bool rcomp = nx->pos.state == KEEL_SAGA_COMPENSATING;
  if (r->w_outcome && r->w_status < 0)
    oerr = r->last_error ? r->last_error : keel_strerror(r->w_status);
  char jidb[24], jatt[16];
  /* the run's last write completes its job in the same statement */
  r->w_job = nx->kind == KEEL__NEXT_END && r->job != NULL;
  if (r->w_job) {
    snprintf(jidb, sizeof jidb, "%" PRId64, keel_pgqueue_job_id(r->job));
    snprintf(jatt, sizeof jatt, "%u", keel_pgqueue_job_attempt(r->job));
  }
  const char *params[18] = {
      idb,
      verb,
      r->w_outcome ? ostep : NULL,
      ocomp ? "compensation" : "action",
      oatt,
      r->w_unknown ? "unknown" : outcome_name(r->w_status),
      oerr,
      STATE_NAME[nx->pos.state],
      nstep,
      natt,
      nbud,
      r->w_data,
      oerr,
      nx->kind == KEEL__NEXT_END ? "true" : "false",
      rec ? "true" : "false",
      r->w_job ? jidb : NULL,
      r->w_job ? jatt : NULL,
      r->w_job ? keel_pgqueue_owner(s->q) : NULL,
  };
  if (r->w_outcome && !r->w_unknown)
    hook(s, KEEL_SAGA_BEFORE_COMMIT, r, ocomp, p->step, p->attempt);
  if (rec) hook(s, KEEL_SAGA_BEFORE_RECORD, r, rcomp, nx->pos.step, nx->pos.attempt);
  r->t_record = rec ? hr() : 0;
  int rc = r->w_job
               ? keel_pg_pool_query_cached(s->pool, s->sql.advance_end, 18, params, on_advance, r)
               : keel_pg_pool_query_cached(s->pool, s->sql.advance, 15, params, on_advance, r);
  if (rc != 0) {
    keel__fail(s->err, rc, "saga log write not sent: %s", keel_pg_pool_last_error(s->pool));
    run_finish(r, rc);
    return;
  }
  r->q_pending = true;
}

static void on_call_timeout(run *r);

static void on_run_timer(uv_timer_t *t) {
  run *r = t->data;
  if (r->finished) return;
  if (r->call) {
    on_call_timeout(r);
    return;
  }
  decide(r);
}

static void call_now(run *r) {
  keel_saga *s = r->s;
  bool comp = r->pos.state == KEEL_SAGA_COMPENSATING;
  const step_def *d = &s->steps[r->pos.step];
  keel_saga_call *c = keel__calloc(1, sizeof *c);
  char *dcopy = c ? keel__strdup(r->data ? r->data : "{}") : NULL;
  if (c == NULL || dcopy == NULL) {
    keel__free(c);
    keel__fail(s->err, UV_ENOMEM, "saga %" PRId64 ": out of memory for a call", r->id);
    run_finish(r, UV_ENOMEM);
    return;
  }
  c->s = s;
  c->r = r;
  c->id = r->id;
  c->step = (unsigned)r->pos.step;
  c->comp = comp;
  c->attempt = r->pos.attempt;
  c->data = dcopy;
  snprintf(c->key, sizeof c->key, "saga:%" PRId64 ":%d:%s", r->id, r->pos.step,
           comp ? "compensation" : "action");
  c->next = s->calls;
  if (s->calls) s->calls->prev = c;
  s->calls = c;
  r->call = c;
  uint64_t timeout = d->timeout_ms;
  bool by_deadline = !comp && r->has_deadline &&
                     (unsigned)r->pos.step < keel__saga_forward_from(s->defs, s->nsteps);
  if (by_deadline) {
    uint64_t nowl = uv_now(s->loop);
    uint64_t left = r->deadline_at > nowl ? r->deadline_at - nowl : 0;
    if (timeout == 0 || left < timeout) timeout = left;
  }
  if (timeout != 0 || by_deadline) uv_timer_start(&r->timer, on_run_timer, timeout, 0);
  if (comp)
    s->st.compensations++;
  else
    s->st.actions++;
  if (r->pos.attempt > 1) s->st.retries++;
  if (r->t_mark) keel__histogram_record(&s->h_added, hr() - r->t_mark);
  hook(s, KEEL_SAGA_BEFORE_CALL, r, comp, r->pos.step, r->pos.attempt);
  keel_saga_step_fn fn = comp ? d->compensation : d->action;
  fn(s, c, s->o.data);
}

/* Calls step 0's first attempt, which the start recorded (the saga row at
 * version 1 says attempt 1 of step 0 started): no statement before the
 * call. Only on the first delivery of the start's job (see on_job and
 * on_load); the outcome's write is guarded by version 1. */
static void first_call(run *r) {
  r->t_record = hr();
  call_now(r);
}

/* An attempt's outcome is in (from done, or its timeout): write it. */
static void outcome(run *r, int status, char *new_data) {
  keel_saga *s = r->s;
  uv_timer_stop(&r->timer);
  r->t_done = hr();
  if (status < 0) {
    keel__free(r->last_error);
    r->last_error = keel__strdup(keel_strerror(status));
    keel__free(new_data);
    new_data = NULL;
  }
  if (s->closing || r->lost) {
    keel__free(new_data);
    run_finish(r, s->closing ? UV_ECANCELED : KEEL_ELOST);
    return;
  }
  keel__saga_next nx = keel__saga_after(s->defs, s->nsteps, r->pos, status, overdue(r));
  r->w_unknown = false;
  r->t_mark = nx.kind == KEEL__NEXT_CALL ? r->t_done : 0;
  act(r, nx, true, status, new_data);
}

static void on_call_timeout(run *r) {
  keel_saga *s = r->s;
  keel_saga_call *c = r->call;
  s->st.timeouts++;
  c->timed_out = true;
  call_detach(c);
  outcome(r, UV_ETIMEDOUT, NULL);
}

int keel_saga_call_done_data(keel_saga_call *c, int status, const char *data_json) {
  if (c == NULL) return UV_EINVAL;
  keel_saga *s = c->s;
  run *r = c->r;
  if (c->timed_out) {
    call_free(c);
    return KEEL_ESTALE;
  }
  if (s->closing || r == NULL) {
    call_free(c);
    return KEEL_ECLOSING;
  }
  hook(s, KEEL_SAGA_AFTER_CALL, r, c->comp, (int)c->step, c->attempt);
  char *nd = NULL;
  if (status >= 0 && data_json != NULL) nd = keel__strdup(data_json);
  call_free(c);
  if (status >= 0 && data_json != NULL && nd == NULL) status = UV_ENOMEM;
  outcome(r, status, nd);
  return 0;
}

int keel_saga_call_done(keel_saga_call *c, int status) {
  return keel_saga_call_done_data(c, status, NULL);
}

int64_t keel_saga_call_saga_id(const keel_saga_call *c) {
  return c ? c->id : 0;
}
unsigned keel_saga_call_step(const keel_saga_call *c) {
  return c ? c->step : 0;
}
const char *keel_saga_call_step_name(const keel_saga_call *c) {
  return c ? c->s->steps[c->step].name : NULL;
}
bool keel_saga_call_is_compensation(const keel_saga_call *c) {
  return c ? c->comp : false;
}
unsigned keel_saga_call_attempt(const keel_saga_call *c) {
  return c ? c->attempt : 0;
}
const char *keel_saga_call_key(const keel_saga_call *c) {
  return c ? c->key : NULL;
}
const char *keel_saga_call_data(const keel_saga_call *c) {
  return c ? c->data : NULL;
}

/* ---- load ------------------------------------------------------------------ */

static void on_load(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  run *r = log_returned(c, status, res, data, "saga load");
  if (r == NULL) return;
  keel_saga *s = r->s;
  if (keel_pg_result_nrows(res) != 1) {
    keel__fail(s->err, KEEL_ENOTFOUND, "saga %" PRId64 " of type %s not found", r->id, s->type);
    run_finish(r, KEEL_ENOTFOUND);
    return;
  }
  int st = state_of(keel_pg_result_value(res, 0, 0));
  r->pos.state = st;
  r->pos.step = (int)strtol(keel_pg_result_value(res, 0, 1), NULL, 10);
  r->pos.attempt = (unsigned)strtoul(keel_pg_result_value(res, 0, 2), NULL, 10);
  r->pos.budget = (unsigned)strtoul(keel_pg_result_value(res, 0, 3), NULL, 10);
  r->version = strtoll(keel_pg_result_value(res, 0, 4), NULL, 10);
  keel__free(r->data);
  r->data = keel__strdup(keel_pg_result_value(res, 0, 5));
  long long left = strtoll(keel_pg_result_value(res, 0, 6), NULL, 10);
  r->has_deadline = left >= 0;
  if (left >= 0) r->deadline_at = uv_now(s->loop) + (uint64_t)left;
  const char *le = keel_pg_result_value(res, 0, 7);
  keel__free(r->last_error);
  r->last_error = le ? keel__strdup(le) : NULL;
  if (r->data == NULL) {
    keel__fail(s->err, UV_ENOMEM, "saga load: out of memory");
    run_finish(r, UV_ENOMEM);
    return;
  }
  if (st < 0 || st >= KEEL_SAGA_DONE) { /* terminal (or unknown): nothing to do */
    run_finish(r, 0);
    return;
  }
  if (r->pos.step >= (int)s->nsteps || (st == KEEL_SAGA_COMPENSATING && r->pos.step < -1)) {
    keel__fail(s->err, KEEL_EPROTO, "saga %" PRId64 ": step %d out of range for type %s", r->id,
               r->pos.step, s->type);
    run_finish(r, KEEL_EPROTO);
    return;
  }
  r->t_mark = hr();
  if (r->job && keel_pgqueue_job_attempt(r->job) == 1 && r->version == 1 &&
      st == KEEL_SAGA_RUNNING && r->pos.step == 0 && r->pos.attempt == 1 && r->pos.budget == 0 &&
      !overdue(r)) {
    /* the start's record, and this is the first delivery of its job */
    first_call(r);
    return;
  }
  r->loaded = true;
  decide(r);
}

static int load_send(run *r) {
  keel_saga *s = r->s;
  char idb[24];
  snprintf(idb, sizeof idb, "%" PRId64, r->id);
  const char *params[2] = {idb, s->type};
  int rc = keel_pg_pool_query_cached(s->pool, s->sql.load, 2, params, on_load, r);
  if (rc != 0) return keel__fail(s->err, rc, "saga load not sent");
  r->q_pending = true;
  return 0;
}

static void load(run *r) {
  int rc = load_send(r);
  if (rc != 0) run_finish(r, rc);
}

static run *run_new(keel_saga *s, int64_t id) {
  run *r = keel__calloc(1, sizeof *r);
  if (r == NULL) return NULL;
  r->s = s;
  r->id = id;
  uv_timer_init(s->loop, &r->timer);
  r->timer.data = r;
  r->next = s->runs;
  if (s->runs) s->runs->prev = r;
  s->runs = r;
  s->nruns++;
  s->st.running_here = s->nruns;
  return r;
}

/* ---- the durable queue side ------------------------------------------------ */

/* A small scanner for the job payload, which PostgreSQL prints from jsonb:
 * {"v": 1, "data": {...}, "saga": 123}. Returns the end of the JSON value
 * starting at p, or NULL when malformed. */
static const char *skip_ws(const char *p) {
  while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
  return p;
}

static const char *skip_value(const char *p) {
  p = skip_ws(p);
  if (*p == '"') {
    for (p++; *p && *p != '"'; p++)
      if (*p == '\\' && p[1]) p++;
    return *p == '"' ? p + 1 : NULL;
  }
  if (*p == '{' || *p == '[') {
    int depth = 0;
    for (; *p; p++) {
      if (*p == '"') {
        p = skip_value(p);
        if (p == NULL) return NULL;
        p--;
      } else if (*p == '{' || *p == '[') {
        depth++;
      } else if (*p == '}' || *p == ']') {
        if (--depth == 0) return p + 1;
      }
    }
    return NULL;
  }
  const char *b = p;
  while (*p && *p != ',' && *p != '}' && *p != ']' && *p != ' ') p++;
  return p > b ? p : NULL;
}

/* Finds top-level key in object text; sets *vb / *ve around its value. */
static bool json_field(const char *p, const char *key, const char **vb, const char **ve) {
  size_t kl = strlen(key);
  p = skip_ws(p);
  if (*p != '{') return false;
  p = skip_ws(p + 1);
  while (*p == '"') {
    const char *ke = skip_value(p);
    if (ke == NULL) return false;
    bool match = (size_t)(ke - p) == kl + 2 && strncmp(p + 1, key, kl) == 0;
    p = skip_ws(ke);
    if (*p != ':') return false;
    const char *b = skip_ws(p + 1);
    const char *e = skip_value(b);
    if (e == NULL) return false;
    if (match) {
      *vb = b, *ve = e;
      return true;
    }
    p = skip_ws(e);
    if (*p != ',') return false;
    p = skip_ws(p + 1);
  }
  return false;
}

static void on_job(keel_pgqueue *q, keel_pgqueue_job *job, void *data) {
  keel_saga *s = data;
  (void)q;
  const char *p = keel_pgqueue_job_payload(job);
  const char *vb, *ve;
  int64_t id = 0;
  if (p && json_field(p, "saga", &vb, &ve)) id = strtoll(vb, NULL, 10);
  if (id <= 0) {
    keel_pgqueue_job_fail(job, UV_EINVAL, "not a saga job");
    return;
  }
  if (s->closing) {
    keel_pgqueue_job_done(job, 0); /* returns KEEL_ECLOSING: given back */
    return;
  }
  run *r = run_new(s, id);
  if (r == NULL) {
    keel_pgqueue_job_fail(job, UV_ENOMEM, "out of memory");
    return;
  }
  r->job = job;
  /* A first delivery of a start's job carries the saga as it was written
   * (version, data). "a": 1 says the start recorded step 0's first attempt
   * (keel since the one-statement start): call it at once, with no
   * statement before; without "a" (a job of an older keel) record step 0
   * first, guarded by that version. If the saga moved meanwhile the guard
   * of that write fails and the run loads it instead. */
  const char *db, *de, *ab, *ae;
  if (keel_pgqueue_job_attempt(job) == 1 && json_field(p, "v", &vb, &ve) &&
      json_field(p, "data", &db, &de)) {
    r->data = keel__strndup(db, (size_t)(de - db));
    if (r->data != NULL) {
      r->version = strtoll(vb, NULL, 10);
      r->pos.state = KEEL_SAGA_RUNNING;
      r->optimistic = true;
      r->t_mark = hr();
      if (json_field(p, "a", &ab, &ae) && strtol(ab, NULL, 10) == 1) {
        r->pos.attempt = 1;
        first_call(r);
      } else {
        decide(r);
      }
      return;
    }
  }
  load(r);
}

static void on_lease_lost(keel_pgqueue *q, keel_pgqueue_job *job, int64_t id, unsigned attempt,
                          void *data) {
  keel_saga *s = data;
  (void)q, (void)id, (void)attempt;
  if (job == NULL) return;
  for (run *r = s->runs; r; r = r->next)
    if (r->job == job) r->lost = true;
}

/* ---- migration, readiness, stats -------------------------------------------- */

static void issue_req(req *rq);
static void req_report(req *rq);

static void on_migrate_timer(uv_timer_t *t);

static void on_migrate(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_saga *s = data;
  s->migrating = false;
  if (s->closing) return;
  if (status != 0) {
    set_err(s, "saga schema migration", c, res, status);
    if (s->o.on_ready) s->o.on_ready(s, status, s->o.data);
    if (!s->closing) uv_timer_start(&s->t_migrate, on_migrate_timer, 1000, 0);
    return;
  }
  s->ready = true;
  s->st.ready = true;
  while (s->wait_head && !s->closing) {
    req *rq = s->wait_head;
    s->wait_head = rq->next;
    if (s->wait_head == NULL) s->wait_tail = NULL;
    s->nwaiting--;
    issue_req(rq);
  }
  if (s->o.on_ready && !s->closing) s->o.on_ready(s, 0, s->o.data);
}

static void start_migrate(keel_saga *s) {
  if (s->migrating || s->ready || s->closing) return;
  if (!s->o.migrate) {
    on_migrate(NULL, 0, NULL, s);
    return;
  }
  s->migrating = true;
  int rc = keel_pg_pool_query(s->pool, s->sql.migrate, 0, NULL, on_migrate, s);
  if (rc != 0) {
    s->migrating = false;
    keel__fail(s->err, rc, "saga schema migration not sent");
    uv_timer_start(&s->t_migrate, on_migrate_timer, 1000, 0);
  }
}

static void on_migrate_timer(uv_timer_t *t) {
  start_migrate(t->data);
}

static void on_q_ready(keel_pgqueue *q, int status, void *data) {
  keel_saga *s = data;
  (void)q;
  if (s->closing) return;
  if (status != 0) {
    keel__fail(s->err, status, "durable queue: %s", keel_pgqueue_last_error(q));
    if (s->o.on_ready) s->o.on_ready(s, status, s->o.data);
    return;
  }
  s->q_ready = true;
  start_migrate(s);
}

static void on_stats(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_saga *s = data;
  (void)c;
  s->stats_pending = false;
  if (s->closing) {
    maybe_closed(s);
    return;
  }
  if (status != 0 || keel_pg_result_nrows(res) != 1) return;
  s->st.running = strtoull(keel_pg_result_value(res, 0, 0), NULL, 10);
  s->st.compensating = strtoull(keel_pg_result_value(res, 0, 1), NULL, 10);
  s->st.failed_now = strtoull(keel_pg_result_value(res, 0, 2), NULL, 10);
  memset(s->st.stuck_ids, 0, sizeof s->st.stuck_ids);
  const char *p = keel_pg_result_value(res, 0, 3);
  for (unsigned i = 0; p && *p && i < KEEL_SAGA_STUCK_LIST; i++) {
    char *end;
    s->st.stuck_ids[i] = strtoll(p, &end, 10);
    p = *end == ',' ? end + 1 : NULL;
  }
}

static void on_stats_timer(uv_timer_t *t) {
  keel_saga *s = t->data;
  if (!s->ready || s->stats_pending || s->closing) return;
  char n[16];
  snprintf(n, sizeof n, "%u", KEEL_SAGA_STUCK_LIST);
  const char *params[2] = {s->type, n};
  if (keel_pg_pool_query_cached(s->pool, s->sql.stats, 2, params, on_stats, s) == 0)
    s->stats_pending = true;
}

/* ---- new ------------------------------------------------------------------ */

static void s_free(keel_saga *s) {
  keel__saga_sql_free(&s->sql);
  keel__free(s->conninfo);
  keel__free(s->steps);
  keel__free(s->defs);
  keel__free(s);
}

static int check_steps(const keel_saga_opts *o, char *why, size_t cap) {
  if (o->steps == NULL || o->nsteps == 0 || o->nsteps > KEEL_SAGA_MAX_STEPS)
    return keel__why(why, cap, UV_EINVAL, "steps must be 1..64 step definitions");
  int phase = 0; /* 0 compensatable, 1 pivot seen, 2 retriable seen */
  for (size_t i = 0; i < o->nsteps; i++) {
    const keel_saga_step *st = &o->steps[i];
    const char *bw;
    if (!valid_name(st->name))
      return keel__why(why, cap, UV_EINVAL, "a step name is not [A-Za-z0-9_.-]{1,40}");
    if (st->action == NULL) return keel__why(why, cap, UV_EINVAL, "a step has no action");
    if (st->kind == KEEL_SAGA_COMPENSATABLE) {
      if (st->compensation == NULL)
        return keel__why(why, cap, UV_EINVAL, "a compensatable step has no compensation");
      if (phase != 0)
        return keel__why(why, cap, UV_EINVAL,
                         "a compensatable step comes after the pivot or a retriable step");
    } else if (st->kind == KEEL_SAGA_PIVOT) {
      if (phase != 0)
        return keel__why(why, cap, UV_EINVAL, "a second pivot, or a pivot after a retriable step");
      phase = 1;
    } else if (st->kind == KEEL_SAGA_RETRIABLE) {
      phase = 2;
    } else {
      return keel__why(why, cap, UV_EINVAL, "unknown step kind");
    }
    if (st->kind != KEEL_SAGA_COMPENSATABLE && st->compensation != NULL)
      return keel__why(why, cap, UV_EINVAL, "only compensatable steps have a compensation");
    if (st->max_attempts == 0 || st->comp_attempts == 0)
      return keel__why(why, cap, UV_EINVAL, "max_attempts and comp_attempts must be >= 1");
    if (keel_backoff_validate(&st->backoff, &bw) != 0) return keel__why(why, cap, UV_EINVAL, bw);
  }
  return 0;
}

static void on_handle_closed(uv_handle_t *h) {
  keel_saga *s = h->data;
  s->handles_open--;
  maybe_closed(s);
}

/* glibc gives the top of a process's heap back to the kernel once more
 * than its trim threshold (128 KB at first) is free there, and each time
 * costs a TLB shootdown on every CPU (an interrupt to each, dear under a
 * hypervisor). Each index scan of a log write allocates about 27 KB
 * (btbeginscan) and frees it at the statement's end, so a backend whose
 * heap happens to sit at that threshold grows and shrinks it at every
 * statement: measured, 1,100 brk calls a second from one log backend, and
 * a quarter fewer sagas per second. Freeing one block larger than glibc's
 * mmap threshold raises both thresholds for the rest of the process
 * (mallopt(3), the dynamic mmap threshold): one 4 MB string, built and
 * dropped at the start of every session. Harmless elsewhere (another
 * allocator, thresholds fixed by the server's environment, a pooler). */
static const char WARM_ALLOCATOR[] = "SELECT length(repeat('x', 4194304))";

static void on_log_conn_state(keel_pg *c, bool up, int status, void *data) {
  keel_saga *s = data;
  (void)status;
  if (up && !s->closing) (void)keel_pg_query(c, WARM_ALLOCATOR, 0, NULL, NULL, NULL);
}

int keel_saga_new_ex(uv_loop_t *loop, const keel_saga_opts *opts, keel_saga **out, char *why,
                     size_t cap) {
  keel__why(why, cap, 0, "");
  if (loop == NULL || opts == NULL || out == NULL)
    return keel__why(why, cap, UV_EINVAL, "loop, opts and out are required");
  if (opts->conninfo == NULL) return keel__why(why, cap, UV_EINVAL, "conninfo is required");
  const char *schema = opts->schema ? opts->schema : "keel";
  if (!valid_schema(schema))
    return keel__why(why, cap, UV_EINVAL, "schema must be [a-z_][a-z0-9_]{0,39}");
  if (!valid_name(opts->type))
    return keel__why(why, cap, UV_EINVAL, "type must be [A-Za-z0-9_.-]{1,40}");
  if (opts->concurrency == 0) return keel__why(why, cap, UV_EINVAL, "concurrency must be >= 1");
  if (opts->lease_ms < 200) return keel__why(why, cap, UV_EINVAL, "lease_ms must be >= 200");
  int rc = check_steps(opts, why, cap);
  if (rc != 0) return rc;
  keel_saga *s = keel__calloc(1, sizeof *s);
  if (s == NULL) return keel__why(why, cap, UV_ENOMEM, "out of memory");
  s->loop = loop;
  s->o = *opts;
  if (s->o.pool_size == 0) s->o.pool_size = KEEL_SAGA_DEFAULT_POOL_SIZE;
  if (s->o.max_pending == 0) s->o.max_pending = KEEL_SAGA_DEFAULT_MAX_PENDING;
  if (s->o.poll_ms == 0) s->o.poll_ms = 1000;
  snprintf(s->schema, sizeof s->schema, "%s", schema);
  snprintf(s->type, sizeof s->type, "%s", opts->type);
  snprintf(s->queue, sizeof s->queue, "saga.%s", opts->type);
  s->o.schema = s->schema;
  s->o.type = s->type;
  s->nsteps = (unsigned)opts->nsteps;
  s->conninfo = keel__strdup(opts->conninfo);
  s->steps = keel__calloc(s->nsteps, sizeof *s->steps);
  s->defs = keel__calloc(s->nsteps, sizeof *s->defs);
  uint64_t h = 1469598103934665603ull;
  for (const char *p = "keel.saga.migrate:"; *p; p++)
    h = (h ^ (unsigned char)*p) * 1099511628211ull;
  for (const char *p = s->schema; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ull;
  if (s->conninfo == NULL || s->steps == NULL || s->defs == NULL ||
      keel__saga_sql_init(&s->sql, s->schema, (long long)(h >> 1)) != 0) {
    s_free(s);
    return keel__why(why, cap, UV_ENOMEM, "out of memory");
  }
  s->o.conninfo = s->conninfo;
  s->o.steps = NULL;
  for (unsigned i = 0; i < s->nsteps; i++) {
    const keel_saga_step *st = &opts->steps[i];
    snprintf(s->steps[i].name, sizeof s->steps[i].name, "%s", st->name);
    s->steps[i].action = st->action;
    s->steps[i].compensation = st->compensation;
    s->steps[i].timeout_ms = st->timeout_ms;
    s->steps[i].backoff = st->backoff;
    s->defs[i].kind = st->kind;
    s->defs[i].max_attempts = st->max_attempts;
    s->defs[i].comp_attempts = st->comp_attempts;
  }
  uint64_t seed = 0;
  if (uv_random(NULL, NULL, &seed, sizeof seed, 0, NULL) != 0) seed = uv_hrtime();
  keel_rng_seed(&s->rng, seed);

  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = s->conninfo;
  po.conn.on_state = on_log_conn_state;
  po.conn.data = s;
  po.size = s->o.pool_size;
  /* Log writes pipelined on few connections: each is one short statement,
   * and a backend that finds the next one already there does not sleep and
   * wake between them (on a server short of CPU, about 15 % more sagas per
   * second than one connection per worker; bench/saga.c). */
  po.pipeline_depth = s->o.concurrency > 8 ? s->o.concurrency : 8;
  rc = keel_pg_pool_new(loop, &po, &s->pool);
  if (rc != 0) {
    s_free(s);
    return keel__why(why, cap, rc,
                     rc == UV_ENOMEM ? "out of memory" : "cannot create the log connection pool");
  }
  keel_pgqueue_opts qo;
  keel_pgqueue_opts_init(&qo);
  qo.conninfo = s->conninfo;
  qo.schema = s->schema;
  qo.queue = s->queue;
  qo.process = s->o.orchestrate ? on_job : NULL;
  qo.concurrency = s->o.concurrency;
  qo.prefetch = s->o.concurrency; /* the next saga waits here, not on a fetch */
  qo.lease_ms = s->o.lease_ms;
  qo.poll_ms = s->o.poll_ms;
  qo.max_attempts = 1000000;
  keel_backoff_exponential(&qo.retry_backoff, 200, 2.0, 10000);
  qo.on_lease_lost = on_lease_lost;
  qo.on_ready = on_q_ready;
  qo.stats_ms = 0;
  qo.migrate = s->o.migrate;
  qo.data = s;
  char qwhy[128];
  rc = keel_pgqueue_new_ex(loop, &qo, &s->q, qwhy, sizeof qwhy);
  if (rc != 0) {
    keel_pg_pool_close(s->pool, NULL, NULL);
    s_free(s);
    return keel__why(why, cap, rc, qwhy[0] ? qwhy : "cannot create the durable queue");
  }
  uv_timer_init(loop, &s->t_migrate);
  uv_timer_init(loop, &s->t_stats);
  uv_timer_init(loop, &s->t_later);
  s->t_migrate.data = s->t_stats.data = s->t_later.data = s;
  s->handles_open = 3;
  if (s->o.stats_ms) uv_timer_start(&s->t_stats, on_stats_timer, s->o.stats_ms, s->o.stats_ms);
  *out = s;
  return 0;
}

int keel_saga_new(uv_loop_t *loop, const keel_saga_opts *opts, keel_saga **out) {
  return keel_saga_new_ex(loop, opts, out, NULL, 0);
}

/* ---- start / redrive -------------------------------------------------------- */

static void req_free(req *rq) {
  keel__free(rq->json);
  keel__free(rq->start_key);
  keel__free(rq);
}

static void req_report(req *rq) {
  keel_saga *s = rq->s;
  if (rq->kind == REQ_START) {
    if (rq->status == 0 && !rq->existed) s->st.started++;
    if (rq->start_cb)
      rq->start_cb(s, rq->status, rq->status == 0 ? rq->id : 0, rq->status == 0 && rq->existed,
                   rq->data);
  } else {
    if (rq->status == 0) s->st.redriven++;
    if (rq->id_cb) rq->id_cb(s, rq->status, rq->id, rq->data);
  }
  req_free(rq);
}

static void req_maybe_report(req *rq) {
  keel_saga *s = rq->s;
  if (rq->enq_pending || !rq->tx_ended) return;
  req_report(rq);
  maybe_closed(s);
}

static void on_req_enqueued(keel_pgqueue *q, int status, const keel_pgqueue_enqueued *jobs,
                            size_t n, void *data) {
  req *rq = data;
  (void)q, (void)jobs, (void)n;
  rq->enq_pending = false;
  if (rq->tx != NULL) {
    keel_pg_tx *tx = rq->tx;
    rq->tx = NULL;
    int st = status;
    if (st == 0 && rq->status != 0) st = rq->status;
    if (st == 0 && rq->kind == REQ_REDRIVE && !rq->found) st = KEEL_ENOTFOUND;
    keel_pg_tx_done(tx, st);
  }
  req_maybe_report(rq);
}

static void on_req_row(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  req *rq = data;
  (void)c;
  if (status != 0) {
    if (rq->status == 0) rq->status = status;
    if (status == KEEL_EPG) {
      const char *ss = keel_pg_result_sqlstate(res);
      if (ss && (strncmp(ss, "22", 2) == 0)) rq->status = UV_EINVAL;
      keel__fail(rq->s->err, rq->status, "saga %s: %s", rq->kind == REQ_START ? "start" : "redrive",
                 keel_pg_result_error(res) ? keel_pg_result_error(res) : "");
    }
    return;
  }
  if (keel_pg_result_nrows(res) >= 1) {
    rq->found = true;
    if (rq->kind == REQ_START) {
      rq->existed = strcmp(keel_pg_result_value(res, 0, 1), "t") == 0;
      rq->id = strtoll(keel_pg_result_value(res, 0, 0), NULL, 10);
    }
  } else if (rq->kind == REQ_START) {
    rq->existed = true; /* the conflicting row committed too late to be read */
    rq->id = 0;
  }
}

/* A re-drive: the guarded UPDATE and a new job, in one transaction. */
static void req_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  req *rq = data;
  keel_saga *s = rq->s;
  rq->tx = tx;
  char idb[24];
  snprintf(idb, sizeof idb, "%" PRId64, rq->id);
  const char *params[2] = {idb, s->type};
  int rc = keel_pg_query_cached(conn, s->sql.redrive, 2, params, on_req_row, rq);
  if (rc != 0) {
    rq->tx = NULL;
    keel_pg_tx_done(tx, rc);
    return;
  }
  char small[48], ukey[64];
  /* the failed run's job may not be marked done yet: a key of its own (two
   * re-drives cannot both pass the state = 'failed' guard) */
  snprintf(ukey, sizeof ukey, "saga:%" PRId64 ":%" PRIx64, rq->id, keel_rng_next(&s->rng));
  snprintf(small, sizeof small, "{\"saga\":%" PRId64 "}", rq->id);
  keel_pgqueue_job_opts j;
  keel_pgqueue_job_opts_init(&j);
  j.payload = small;
  j.unique_key = ukey;
  j.max_attempts = JOB_MAX_ATTEMPTS;
  rc = keel_pgqueue_enqueue(s->q, conn, &j, 1, on_req_enqueued, rq);
  if (rc == 0) rq->enq_pending = true;
  if (rc != 0) {
    rq->tx = NULL;
    keel_pg_tx_done(tx, rc);
  }
}

static void req_tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  req *rq = data;
  keel_saga *s = rq->s;
  (void)pool;
  (void)sqlstate;
  s->ninflight_req--;
  rq->tx = NULL; /* ended (also by close before the enqueue answered) */
  rq->tx_ended = true;
  if (status == 0)
    rq->status = 0;
  else if (!(status == KEEL_EPG && rq->status != 0)) /* keep the statement's own mapping */
    rq->status = status;
  if (rq->status != 0 && rq->status != KEEL_ENOTFOUND && status != KEEL_EPG)
    keel__fail(s->err, rq->status, "saga %s: %s", rq->kind == REQ_START ? "start" : "redrive",
               keel_pg_pool_last_error(s->pool));
  req_maybe_report(rq);
}

/* The start's one statement has answered (docs/saga.md, Starting). */
static void on_start_row(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  req *rq = data;
  keel_saga *s = rq->s;
  s->ninflight_req--;
  on_req_row(c, status, res, rq);
  if (status != 0 && status != KEEL_EPG)
    keel__fail(s->err, rq->status, "saga start: %s", keel_pg_pool_last_error(s->pool));
  if (rq->status == 0 && !rq->existed)
    hook_id(s, KEEL_SAGA_AFTER_RECORD, rq->id, 0, false, 1); /* step 0's first attempt */
  req_report(rq);
  maybe_closed(s);
}

static int send_start(req *rq) {
  keel_saga *s = rq->s;
  char idb[24], dl[24], ma[24];
  snprintf(idb, sizeof idb, "%" PRId64, rq->id);
  snprintf(dl, sizeof dl, "%" PRIu64, rq->deadline_ms);
  snprintf(ma, sizeof ma, "%d", JOB_MAX_ATTEMPTS);
  hook_id(s, KEEL_SAGA_BEFORE_RECORD, rq->id, 0, false, 1);
  int rc;
  if (rq->start_key != NULL) {
    const char *params[7] = {idb, s->type, rq->json, dl, rq->start_key, s->queue, ma};
    rc = keel_pg_pool_query_cached(s->pool, s->sql.start, 7, params, on_start_row, rq);
  } else {
    const char *params[6] = {idb, s->type, rq->json, dl, s->queue, ma};
    rc = keel_pg_pool_query_cached(s->pool, s->sql.start_nokey, 6, params, on_start_row, rq);
  }
  if (rc == 0) s->ninflight_req++;
  return rc;
}

/* A start is one statement; a re-drive is a transaction. */
static int send_req(req *rq) {
  keel_saga *s = rq->s;
  if (rq->kind == REQ_START) return send_start(rq);
  s->ninflight_req++;
  int rc = keel_pg_pool_transaction(s->pool, KEEL_PG_READ_COMMITTED, req_body, req_tx_done, rq);
  if (rc != 0) s->ninflight_req--;
  return rc;
}

static void issue_req(req *rq) {
  keel_saga *s = rq->s;
  int rc = send_req(rq);
  if (rc != 0) {
    /* from a callback (the migration's): report now, never inside a user call */
    rq->status = rc;
    req_report(rq);
    maybe_closed(s);
  }
}

static int submit(keel_saga *s, req *rq) {
  if (!s->ready) {
    if (s->nwaiting >= s->o.max_pending) {
      req_free(rq);
      return keel__fail(s->err, KEEL_EFULL, "max_pending requests already wait for the schema");
    }
    if (s->wait_tail)
      s->wait_tail->next = rq;
    else
      s->wait_head = rq;
    s->wait_tail = rq;
    s->nwaiting++;
    return 0;
  }
  int rc = send_req(rq);
  if (rc != 0) {
    req_free(rq);
    return keel__fail(s->err, rc, "saga request not queued: %s", keel_pg_pool_last_error(s->pool));
  }
  return 0;
}

static int64_t new_id(keel_saga *s) {
  int64_t id;
  do id = (int64_t)(keel_rng_next(&s->rng) >> 1);
  while (id <= 0);
  return id;
}

int keel_saga_start(keel_saga *s, const keel_saga_start_opts *opts, keel_saga_start_cb cb,
                    void *data) {
  if (s == NULL) return UV_EINVAL;
  if (s->closing) return keel__fail(s->err, KEEL_ECLOSING, "saga is closing");
  keel_saga_start_opts def;
  if (opts == NULL) {
    keel_saga_start_opts_init(&def);
    opts = &def;
  }
  if (opts->start_key) {
    size_t n = strlen(opts->start_key);
    if (n == 0 || n > 200) return keel__fail(s->err, UV_EINVAL, "start_key must be 1..200 bytes");
    for (size_t i = 0; i < n; i++)
      if ((unsigned char)opts->start_key[i] < 0x20 || opts->start_key[i] == 0x7f)
        return keel__fail(s->err, UV_EINVAL, "start_key has a control character");
  }
  req *rq = keel__calloc(1, sizeof *rq);
  if (rq == NULL) return keel__fail(s->err, UV_ENOMEM, "out of memory");
  rq->s = s;
  rq->kind = REQ_START;
  rq->start_cb = cb;
  rq->data = data;
  rq->id = new_id(s);
  rq->json = keel__strdup(opts->data ? opts->data : "{}");
  rq->start_key = opts->start_key ? keel__strdup(opts->start_key) : NULL;
  rq->deadline_ms = opts->deadline_ms ? opts->deadline_ms : s->o.deadline_ms;
  if (rq->json == NULL || (opts->start_key && rq->start_key == NULL)) {
    req_free(rq);
    return keel__fail(s->err, UV_ENOMEM, "out of memory");
  }
  return submit(s, rq);
}

int keel_saga_redrive(keel_saga *s, int64_t id, keel_saga_id_cb cb, void *data) {
  if (s == NULL || id <= 0) return UV_EINVAL;
  if (s->closing) return keel__fail(s->err, KEEL_ECLOSING, "saga is closing");
  req *rq = keel__calloc(1, sizeof *rq);
  if (rq == NULL) return keel__fail(s->err, UV_ENOMEM, "out of memory");
  rq->s = s;
  rq->kind = REQ_REDRIVE;
  rq->id_cb = cb;
  rq->data = data;
  rq->id = id;
  return submit(s, rq);
}

int keel_saga_resume(keel_saga *s, int64_t id, keel_saga_id_cb cb, void *data) {
  if (s == NULL || id <= 0) return UV_EINVAL;
  if (s->closing) return keel__fail(s->err, KEEL_ECLOSING, "saga is closing");
  if (s->nruns >= s->o.concurrency)
    return keel__fail(s->err, KEEL_EBUSY, "concurrency sagas already run here");
  run *r = run_new(s, id);
  if (r == NULL) return keel__fail(s->err, UV_ENOMEM, "out of memory");
  int rc = load_send(r);
  if (rc != 0) { /* nothing was called: drop the run quietly */
    r->finished = true;
    run_dispose(r);
    return rc;
  }
  r->cb = cb;
  r->cb_data = data;
  return 0;
}

/* ---- stats, errors, serve ---------------------------------------------------- */

static void lat(const keel__histogram *h, keel_saga_latency *o) {
  o->mean_ms = h->count ? (double)h->sum_ns / (double)h->count / 1e6 : 0;
  o->p50_ms = keel__histogram_quantile(h, 0.5) / 1e6;
  o->p99_ms = keel__histogram_quantile(h, 0.99) / 1e6;
  o->max_ms = (double)h->max_ns / 1e6;
}

void keel_saga_get_stats(const keel_saga *s, keel_saga_stats *out) {
  if (s == NULL || out == NULL) return;
  *out = s->st;
  lat(&s->h_step, &out->step);
  lat(&s->h_added, &out->added);
  memset(out->reserved_, 0, sizeof out->reserved_);
}

const char *keel_saga_last_error(const keel_saga *s) {
  return s ? s->err : "saga is NULL";
}

static void write_saga(const void *obj, keel_stats_writer *w) {
  const keel_saga *s = obj;
  keel_saga_stats st;
  keel_saga_get_stats(s, &st);
  keel_stats_counter(w, "started", "Sagas started through this object.", st.started);
  keel_stats_counter(w, "done", "Sagas brought to done here.", st.done);
  keel_stats_counter(w, "compensated", "Sagas brought to compensated here.", st.compensated);
  keel_stats_counter(w, "failed", "Sagas that became failed here.", st.failed);
  keel_stats_gauge(w, "running", "Sagas of this type running (table).", (double)st.running);
  keel_stats_gauge(w, "compensating", "Sagas of this type compensating (table).",
                   (double)st.compensating);
  keel_stats_gauge(w, "failed_now", "Sagas of this type failed, waiting for a re-drive (table).",
                   (double)st.failed_now);
  keel_stats_gauge(w, "running_here", "Sagas run by this object now.", (double)st.running_here);
  keel_stats_counter(w, "conflicts", "Runs stopped: another process advanced the saga.",
                     st.conflicts);
  keel_stats_counter(w, "timeouts", "Attempts that timed out.", st.timeouts);
  keel__histogram_write(w, "step_seconds", "One attempt, its record to its outcome commit.",
                        &s->h_step);
  char ids[KEEL_SAGA_STUCK_LIST * 21 + 1];
  size_t len = 0;
  ids[0] = '\0';
  for (unsigned i = 0; i < KEEL_SAGA_STUCK_LIST && st.stuck_ids[i]; i++) {
    int n = snprintf(ids + len, sizeof ids - len, "%s%" PRId64, i ? "," : "", st.stuck_ids[i]);
    if (n < 0 || (size_t)n >= sizeof ids - len) break;
    len += (size_t)n;
  }
  keel_stats_text(w, "stuck_ids", ids);
}

static const keel_stats_source saga_source = {"saga", write_saga};

int keel_saga_serve(struct keel_serve *srv, keel_saga *s, const char *name) {
  if (srv == NULL || s == NULL || name == NULL) return UV_EINVAL;
  if (s->closing) return KEEL_ECLOSING;
  return keel__serve_register_hooked(srv, &saga_source, s, name, &s->hooks);
}

/* ---- close ------------------------------------------------------------------- */

static void maybe_closed(keel_saga *s) {
  if (!s->closing || !s->cancels_sent) return;
  if (s->handles_open || !s->pool_closed || !s->q_closed || s->runs || s->ninflight_req ||
      s->stats_pending)
    return;
  while (s->calls) call_free(s->calls);
  keel_close_cb cb = s->close_cb;
  void *cd = s->close_data;
  s_free(s);
  if (cb) cb(s, cd);
}

static void on_pool_closed(void *obj, void *data) {
  keel_saga *s = data;
  (void)obj;
  s->pool_closed = true;
  maybe_closed(s);
}

static void on_q_closed(void *obj, void *data) {
  keel_saga *s = data;
  (void)obj;
  s->q_closed = true;
  /* the pool closes after the queue, so that starts in flight finish */
  keel_pg_pool_close(s->pool, on_pool_closed, s);
}

/* A later iteration after close: cancellations, then the handles. */
static void on_later(uv_timer_t *t) {
  keel_saga *s = t->data;
  while (s->wait_head) {
    req *rq = s->wait_head;
    s->wait_head = rq->next;
    s->nwaiting--;
    rq->status = UV_ECANCELED;
    req_report(rq);
  }
  s->wait_tail = NULL;
  for (run *r = s->runs; r; r = r->next)
    if (!r->finished) run_finish(r, UV_ECANCELED);
  s->cancels_sent = true;
  uv_close((uv_handle_t *)&s->t_migrate, on_handle_closed);
  uv_close((uv_handle_t *)&s->t_stats, on_handle_closed);
  uv_close((uv_handle_t *)&s->t_later, on_handle_closed);
}

void keel_saga_close(keel_saga *s, keel_close_cb cb, void *data) {
  if (s == NULL || s->closing) return;
  s->closing = true;
  s->close_cb = cb;
  s->close_data = data;
  keel__stats_hooks_detach(&s->hooks);
  uv_timer_stop(&s->t_migrate);
  uv_timer_stop(&s->t_stats);
  for (run *r = s->runs; r; r = r->next) {
    uv_timer_stop(&r->timer);
    if (r->call) call_detach(r->call);
  }
  /* the queue first: a job handed back from now on is given back, never
   * completed (done() returns KEEL_ECLOSING) */
  keel_pgqueue_close(s->q, on_q_closed, s);
  uv_timer_start(&s->t_later, on_later, 0, 0);
}
