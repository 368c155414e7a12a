/* The verifier: run state machine, keyset batches with prefetch, fix-up
 * slots with retries and timeouts, leader lock, checkpoint, stats. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "verify/verify_internal.h"

typedef struct fixq {
  keel_verify_fix *head, *tail;
  unsigned n;
} fixq;

struct keel_verify_fix {
  keel_verify *v; /* NULL once detached (timed out, or verifier closed) */
  keel_verify_fix *next, *prev;
  fixq *list;
  unsigned attempt;
  uint64_t due; /* loop time: deadline (running) or retry time (waiting) */
  uint64_t seq; /* order of equal due times in the retry heap */
  uint64_t prev_delay;
  keel_verify_row row;
  int keycols[KEEL_VERIFY_MAX_KEYS];
  /* followed by names[ncols], values[ncols] and the strings */
};

enum phase { PH_IDLE = 0, PH_CKPT_CREATE, PH_CKPT_LOAD, PH_BOUND, PH_SCAN };

struct keel_verify {
  uv_loop_t *loop;
  keel_verify_opts o;
  char *s_table, *s_where, *s_conninfo, *s_job, *s_ckpt;
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
  enum phase phase;
  int run_status;
  char *last[KEEL_VERIFY_MAX_KEYS];
  char *bound[KEEL_VERIFY_MAX_KEYS];
  uint64_t run_start, run_rows, run_problems;
  unsigned since_ckpt;
  char **colnames;
  int ncolnames;
  int keycols[KEEL_VERIFY_MAX_KEYS];
  fixq pending, active;
  /* fix-ups waiting for a retry: a min-heap on (due, seq) */
  keel_verify_fix **wheap;
  unsigned wn, wcap;
  uint64_t wseq;

  keel__vcodes codes;
  keel_verify_stats st;
  char last_error[KEEL__ERRBUF_SIZE];
};

/* ---- small helpers ---------------------------------------------------- */

static void q_push(fixq *q, keel_verify_fix *f) {
  f->next = NULL;
  f->prev = q->tail;
  if (q->tail)
    q->tail->next = f;
  else
    q->head = f;
  q->tail = f;
  q->n++;
  f->list = q;
}

static void q_remove(keel_verify_fix *f) {
  fixq *q = f->list;
  if (q == NULL) return;
  if (f->prev)
    f->prev->next = f->next;
  else
    q->head = f->next;
  if (f->next)
    f->next->prev = f->prev;
  else
    q->tail = f->prev;
  q->n--;
  f->next = f->prev = NULL;
  f->list = NULL;
}

/* ---- the retry heap: fix-ups waiting for a retry, earliest first ---------- */

static bool w_before(const keel_verify_fix *a, const keel_verify_fix *b) {
  return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static unsigned max_waiting(const keel_verify *v) {
  return v->o.fix_max_waiting ? v->o.fix_max_waiting : 10000;
}

/* Returns 0, UV_ENOBUFS when fix_max_waiting wait already, or UV_ENOMEM. */
static int w_push(keel_verify *v, keel_verify_fix *f) {
  if (v->wn >= max_waiting(v)) return UV_ENOBUFS;
  if (v->wn == v->wcap) {
    unsigned cap = v->wcap ? v->wcap * 2 : 16;
    if (cap > max_waiting(v)) cap = max_waiting(v);
    keel_verify_fix **h = keel__realloc(v->wheap, (size_t)cap * sizeof *h);
    if (h == NULL) return UV_ENOMEM;
    v->wheap = h;
    v->wcap = cap;
  }
  f->seq = v->wseq++;
  unsigned i = v->wn++;
  while (i > 0) {
    unsigned parent = (i - 1) / 2;
    if (!w_before(f, v->wheap[parent])) break;
    v->wheap[i] = v->wheap[parent];
    i = parent;
  }
  v->wheap[i] = f;
  return 0;
}

static keel_verify_fix *w_pop(keel_verify *v) {
  if (v->wn == 0) return NULL;
  keel_verify_fix *top = v->wheap[0];
  keel_verify_fix *last = v->wheap[--v->wn];
  unsigned i = 0, n = v->wn;
  for (;;) {
    unsigned c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && w_before(v->wheap[c + 1], v->wheap[c])) c++;
    if (!w_before(v->wheap[c], last)) break;
    v->wheap[i] = v->wheap[c];
    i = c;
  }
  if (n > 0) v->wheap[i] = last;
  return top;
}

static uint64_t now_ms(const keel_verify *v) {
  return keel__clock_now(&v->o.clock, v->loop);
}

static void set_error(keel_verify *v, int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static void set_error(keel_verify *v, int err, const char *fmt, ...) {
  char msg[KEEL__ERRBUF_SIZE];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  keel__fail(v->last_error, err, "%s", msg);
}

static void pump(keel_verify *v);
static void kick_cb(uv_timer_t *t);
static void ckpt_cb(keel_pg *c, int status, const keel_pg_result *res, void *data);
static void send_lock_query(keel_verify *v);
static void batch_cb(keel_pg *c, int status, const keel_pg_result *res, void *data);

static void kick(keel_verify *v) {
  if (!v->closing && v->ready) uv_timer_start(&v->kick, kick_cb, 0, 0);
}

static void report_run(keel_verify *v, int status);

static void maybe_free(keel_verify *v) {
  if (!v->closing || v->handles_open > 0 || v->conns_open > 0 || v->queries_out > 0) return;
  if (v->close_cancel_run) { /* the run close dropped: before close_cb */
    v->close_cancel_run = false;
    report_run(v, UV_ECANCELED);
  }
  keel_close_cb cb = v->close_cb;
  void *data = v->close_data;
  keel__vsql_free(&v->sql);
  for (int k = 0; k < KEEL_VERIFY_MAX_KEYS; k++) {
    keel__free(v->last[k]);
    keel__free(v->bound[k]);
    keel__free(v->s_keys[k]);
  }
  if (v->colnames) {
    for (int i = 0; i < v->ncolnames; i++) keel__free(v->colnames[i]);
    keel__free(v->colnames);
  }
  if (v->s_cols) {
    for (int i = 0; i < v->ncols_opt; i++) keel__free(v->s_cols[i]);
    keel__free(v->s_cols);
  }
  keel__free(v->s_table);
  keel__free(v->s_where);
  keel__free(v->s_conninfo);
  keel__free(v->s_job);
  keel__free(v->s_ckpt);
  keel__free(v->wheap);
  keel__free(v);
  if (cb) cb(v, data);
}

/* Sends a statement on the pool or the owned connection; the callback gets
 * v as data and must start with query_returned(). */
static int vquery(keel_verify *v, const char *sql, int n, const char *const *params,
                  keel_pg_result_cb cb) {
  int rc = v->pool ? keel_pg_pool_query(v->pool, sql, n, params, cb, v)
                   : keel_pg_query(v->conn, sql, n, params, cb, v);
  if (rc == 0) v->queries_out++;
  return rc;
}

/* true when the callback must return at once (closing). */
static bool query_returned(keel_verify *v) {
  v->queries_out--;
  if (v->closing) {
    maybe_free(v);
    return true;
  }
  return false;
}

/* The run's own statements (checkpoint load, largest key, batch,
 * end-of-run checkpoint) carry the run they belong to: one that comes back
 * after its run ended (timed out, connection lost) is dropped. */
typedef struct vticket {
  keel_verify *v;
  uint64_t run;
} vticket;

/* vquery() for the run's own statement: one at a time. */
static int runq(keel_verify *v, const char *sql, int n, const char *const *params,
                keel_pg_result_cb cb) {
  vticket *t = keel__malloc(sizeof *t);
  if (t == NULL) return UV_ENOMEM;
  t->v = v;
  t->run = v->run_id;
  int rc = v->pool ? keel_pg_pool_query(v->pool, sql, n, params, cb, t)
                   : keel_pg_query(v->conn, sql, n, params, cb, t);
  if (rc < 0) {
    keel__free(t);
    return rc;
  }
  v->queries_out++;
  v->runq_out = true;
  return 0;
}

/* In the run statement's callback: frees the ticket; returns v, or NULL
 * when the callback must return at once (closing, or its run is over). */
static keel_verify *runq_back(void *data) {
  vticket *t = data;
  keel_verify *v = t->v;
  uint64_t run = t->run;
  keel__free(t);
  if (query_returned(v)) return NULL;
  if (run != v->run_id) return NULL;
  v->runq_out = false;
  return v;
}

static uint64_t run_timeout(const keel_verify *v) {
  return v->o.run_timeout_ms ? v->o.run_timeout_ms : 3600000;
}

static const char *pg_error_text(keel_verify *v, keel_pg *c, const keel_pg_result *res) {
  const char *e = res ? keel_pg_result_error(res) : NULL;
  if (e && *e) return e;
  if (c) return keel_pg_last_error(c);
  return v->pool ? keel_pg_pool_last_error(v->pool) : "";
}

/* ---- rows ----------------------------------------------------------------- */

int keel__vrow_find(const keel_verify_row *row, const char *name) {
  for (int i = 0; i < row->ncols; i++) {
    const char *n = row->names[i];
    if (n[0] == name[0] && strcmp(n, name) == 0) return i;
  }
  return -1;
}

static const char *row_val(const keel_verify_row *row, int i) {
  if (row->res) return keel_pg_result_value(row->res, row->idx, i);
  return row->values[i];
}

const char *keel_verify_row_get(const keel_verify_row *row, const char *name) {
  if (row == NULL || name == NULL) return NULL;
  int i = keel__vrow_find(row, name);
  return i < 0 ? NULL : row_val(row, i);
}

bool keel_verify_row_is_null(const keel_verify_row *row, const char *name) {
  return keel_verify_row_get(row, name) == NULL;
}

bool keel_verify_row_has(const keel_verify_row *row, const char *name) {
  return row != NULL && name != NULL && keel__vrow_find(row, name) >= 0;
}

int keel_verify_row_ncols(const keel_verify_row *row) {
  return row ? row->ncols : 0;
}

const char *keel_verify_row_col_name(const keel_verify_row *row, int col) {
  if (row == NULL || col < 0 || col >= row->ncols) return NULL;
  return row->names[col];
}

const char *keel_verify_row_value(const keel_verify_row *row, int col) {
  if (row == NULL || col < 0 || col >= row->ncols) return NULL;
  return row_val(row, col);
}

int keel_verify_row_key(const keel_verify_row *row, char *buf, size_t cap) {
  if (row == NULL || (buf == NULL && cap > 0)) return UV_EINVAL;
  size_t len = 0;
  for (int k = 0; k < row->nkeys; k++) {
    const char *s = row_val(row, row->keycols[k]);
    if (s == NULL) s = "";
    for (const char *p = k ? "," : ""; *p; p++, len++)
      if (len + 1 < cap) buf[len] = *p;
    for (const char *p = s; *p; p++, len++)
      if (len + 1 < cap) buf[len] = *p;
  }
  if (cap > 0) buf[len < cap ? len : cap - 1] = '\0';
  return len > INT32_MAX ? INT32_MAX : (int)len;
}

int keel_verify_row_problem(const keel_verify_row *row, const char *code) {
  if (row == NULL || code == NULL || code[0] == '\0' || !row->in_validator || row->v == NULL)
    return UV_EINVAL;
  keel_verify_row *r = (keel_verify_row *)(uintptr_t)row;
  r->nproblems++;
  keel__vcodes_add(&row->v->codes, code);
  row->v->st.problems_total++;
  row->v->run_problems++;
  return 0;
}

/* Copies a row (live or copied) into a new fix item. */
static keel_verify_fix *fix_new(const keel_verify_row *row) {
  size_t strs = 0;
  for (int i = 0; i < row->ncols; i++) {
    const char *val = row_val(row, i);
    strs += strlen(row->names[i]) + 1 + (val ? strlen(val) + 1 : 0);
  }
  size_t ptrs = 2 * (size_t)row->ncols * sizeof(char *);
  keel_verify_fix *f = keel__malloc(sizeof *f + ptrs + strs);
  if (f == NULL) return NULL;
  memset(f, 0, sizeof *f);
  const char **names = (const char **)(void *)(f + 1);
  const char **vals = names + row->ncols;
  char *p = (char *)(vals + row->ncols);
  for (int i = 0; i < row->ncols; i++) {
    size_t n = strlen(row->names[i]) + 1;
    memcpy(p, row->names[i], n);
    names[i] = p;
    p += n;
    const char *val = row_val(row, i);
    if (val) {
      n = strlen(val) + 1;
      memcpy(p, val, n);
      vals[i] = p;
      p += n;
    } else {
      vals[i] = NULL;
    }
  }
  f->row.ncols = row->ncols;
  f->row.names = names;
  f->row.values = vals;
  f->row.nkeys = row->nkeys;
  for (int k = 0; k < row->nkeys; k++) f->keycols[k] = row->keycols[k];
  f->row.keycols = f->keycols;
  return f;
}

/* ---- options ---------------------------------------------------------- */

void keel_verify_opts_init(keel_verify_opts *o) {
  if (o == NULL) return;
  memset(o, 0, sizeof *o);
  o->id_columns[0] = "id";
  o->batch_size = 1000;
  o->interval_ms = 3600 * 1000;
  o->run_on_start = true;
  o->bound_run = true;
  o->fix_concurrency = 4;
  o->fix_max_retries = 3;
  keel_backoff_exponential(&o->fix_backoff, 100, 2.0, 10000);
  o->fix_timeout_ms = 30000;
  o->checkpoint_every = 10;
  o->run_timeout_ms = 3600000;
  o->fix_max_waiting = 10000;
}

int keel_verify_validate_opts(const keel_verify_opts *o, const char **why) {
  static const char *dummy;
  if (why == NULL) why = &dummy;
  char tmp[140];
  if (o == NULL) return (*why = "opts is NULL", UV_EINVAL);
  if (o->pool == NULL && (o->conninfo == NULL || o->conninfo[0] == '\0'))
    return (*why = "a pool or a conninfo is required", UV_EINVAL);
  if (o->table == NULL || o->table[0] == '\0') return (*why = "table is required", UV_EINVAL);
  if (keel_pg_quote_ident(tmp, sizeof tmp, o->table, true) < 0)
    return (*why = "table is not a valid identifier (1..63 bytes, at most one '.')", UV_EINVAL);
  if (o->id_columns[0] == NULL) return (*why = "id_columns is empty", UV_EINVAL);
  for (int k = 0; k < KEEL_VERIFY_MAX_KEYS && o->id_columns[k] != NULL; k++) {
    if (keel_pg_quote_ident(tmp, sizeof tmp, o->id_columns[k], false) < 0)
      return (*why = "an id column is not a valid identifier", UV_EINVAL);
    for (int j = 0; j < k; j++)
      if (strcmp(o->id_columns[j], o->id_columns[k]) == 0)
        return (*why = "an id column is listed twice", UV_EINVAL);
  }
  if (o->columns != NULL) {
    int n = 0;
    for (; o->columns[n] != NULL; n++) {
      if (n >= KEEL_VERIFY_MAX_COLUMNS) return (*why = "too many columns", UV_EINVAL);
      if (keel_pg_quote_ident(tmp, sizeof tmp, o->columns[n], false) < 0)
        return (*why = "a column name is not a valid identifier", UV_EINVAL);
    }
    if (n == 0) return (*why = "columns is empty (use NULL for all columns)", UV_EINVAL);
  }
  if (o->batch_size == 0 || o->batch_size > 1000000)
    return (*why = "batch_size must be 1..1000000", UV_EINVAL);
  if (o->interval_ms == 0) return (*why = "interval_ms must be > 0", UV_EINVAL);
  if (o->validate == NULL) return (*why = "validate is required", UV_EINVAL);
  if (o->fix_concurrency == 0) return (*why = "fix_concurrency must be >= 1", UV_EINVAL);
  const char *bw = NULL;
  if (keel_backoff_validate(&o->fix_backoff, &bw) < 0)
    return (*why = bw ? bw : "fix_backoff is invalid", UV_EINVAL);
  if (o->checkpoint_table != NULL) {
    if (keel_pg_quote_ident(tmp, sizeof tmp, o->checkpoint_table, true) < 0)
      return (*why = "checkpoint_table is not a valid identifier", UV_EINVAL);
    if (o->checkpoint_every == 0) return (*why = "checkpoint_every must be >= 1", UV_EINVAL);
    if (o->job_name != NULL && o->job_name[0] == '\0')
      return (*why = "job_name is empty", UV_EINVAL);
  }
  return 0;
}

/* ---- life cycle ---------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h) {
  keel_verify *v = h->data;
  v->handles_open--;
  maybe_free(v);
}

static void on_conn_closed(void *obj, void *data) {
  (void)obj;
  keel_verify *v = data;
  v->conns_open--;
  maybe_free(v);
}

static void on_lock_state(keel_pg *c, bool up, int status, void *data) {
  keel_verify *v = data;
  if (up || v->closing) return;
  if (v->leader) set_error(v, status, "leader lock connection lost: %s", keel_pg_last_error(c));
  v->leader = false;
  if (v->lock_inflight && !v->lock_cancel && !v->running) {
    /* waiting for the lock: the run ends now (the lock query is dropped when
     * it comes back) */
    v->lock_cancel = true;
    status = status == KEEL_EAUTH || status == KEEL_ENODB ? status : KEEL_ECONN;
    set_error(v, status, "leader lock: database unreachable (%s)", keel_pg_last_error(c));
    report_run(v, status);
  }
  kick(v);
}

static void abort_run(keel_verify *v, int status);

/* The status a run ends with when its connection goes down: the permanent
 * causes keep their code, every other loss is KEEL_ECONN. */
static int down_status(int status) {
  return status == KEEL_EAUTH || status == KEEL_ENODB ? status : KEEL_ECONN;
}

/* The owned connection: its loss (or a failed connect attempt) ends the run
 * in progress at once. */
static void on_conn_state(keel_pg *c, bool up, int status, void *data) {
  keel_verify *v = data;
  if (up || v->closing || !v->running) return;
  status = down_status(status);
  set_error(v, status, "run failed: database unreachable (%s)", keel_pg_last_error(c));
  abort_run(v, status);
  kick(v);
}

static void tick_cb(uv_timer_t *t);
static void fixt_cb(uv_timer_t *t);
static void runt_cb(uv_timer_t *t);

static char *dup_or_null(const char *s, bool *oom) {
  if (s == NULL) return NULL;
  char *d = keel__strdup(s);
  if (d == NULL) *oom = true;
  return d;
}

int keel_verify_new(uv_loop_t *loop, const keel_verify_opts *opts, keel_verify **out) {
  if (loop == NULL || opts == NULL || out == NULL) return UV_EINVAL;
  int rc = keel_verify_validate_opts(opts, NULL);
  if (rc < 0) return rc;
  keel_verify *v = keel__calloc(1, sizeof *v);
  if (v == NULL) return UV_ENOMEM;
  v->loop = loop;
  v->o = *opts;
  bool oom = false;
  v->s_table = dup_or_null(opts->table, &oom);
  v->s_where = dup_or_null(opts->where, &oom);
  v->s_conninfo = dup_or_null(opts->conninfo, &oom);
  v->s_ckpt = dup_or_null(opts->checkpoint_table, &oom);
  v->s_job = dup_or_null(opts->job_name ? opts->job_name : opts->table, &oom);
  for (int k = 0; k < KEEL_VERIFY_MAX_KEYS && opts->id_columns[k] != NULL; k++) {
    v->s_keys[k] = dup_or_null(opts->id_columns[k], &oom);
    v->nkeys++;
  }
  if (opts->columns != NULL) {
    int n = 0;
    while (opts->columns[n] != NULL) n++;
    v->s_cols = keel__calloc((size_t)n + 1, sizeof(char *));
    if (v->s_cols == NULL)
      oom = true;
    else
      v->ncols_opt = n;
    for (int i = 0; v->s_cols && i < n; i++) v->s_cols[i] = dup_or_null(opts->columns[i], &oom);
  }
  v->o.table = v->s_table;
  v->o.where = v->s_where;
  v->o.conninfo = v->s_conninfo;
  v->o.checkpoint_table = v->s_ckpt;
  v->o.job_name = v->s_job;
  for (int k = 0; k < KEEL_VERIFY_MAX_KEYS; k++) v->o.id_columns[k] = v->s_keys[k];
  v->o.columns = (const char *const *)v->s_cols;
  if (v->o.leader_lock_key == 0) v->o.leader_lock_key = keel__verify_lock_key(v->s_table);
  if (!oom)
    rc = keel__vsql_build(&v->sql, &v->o, NULL);
  else
    rc = UV_ENOMEM;
  keel__vcodes_init(&v->codes);
  v->leader = !v->o.leader_lock;
  v->st.leader = v->leader;
  v->pool = opts->pool;
  if (rc == 0 && v->pool == NULL) {
    keel_pg_opts po;
    keel_pg_opts_init(&po);
    po.conninfo = v->s_conninfo;
    po.on_state = on_conn_state;
    po.data = v;
    rc = keel_pg_new(loop, &po, &v->conn);
  }
  v->lock_from_pool = v->o.leader_lock && v->s_conninfo == NULL;
  if (rc == 0 && v->o.leader_lock && !v->lock_from_pool) {
    keel_pg_opts po;
    keel_pg_opts_init(&po);
    po.conninfo = v->s_conninfo;
    po.on_state = on_lock_state;
    po.data = v;
    po.pipeline = false;
    rc = keel_pg_new(loop, &po, &v->lock_conn);
  }
  if (rc < 0) {
    /* Nothing of the loop was touched except owned connections: close them
     * and free the rest when they are gone. */
    v->closing = true;
    if (v->conn) {
      v->conns_open++;
      keel_pg_close(v->conn, on_conn_closed, v);
    }
    if (v->lock_conn) {
      v->conns_open++;
      keel_pg_close(v->lock_conn, on_conn_closed, v);
    }
    if (v->conns_open == 0) maybe_free(v);
    return rc;
  }
  v->conns_open = (v->conn ? 1 : 0) + (v->lock_conn ? 1 : 0);
  uv_timer_init(loop, &v->tick);
  uv_timer_init(loop, &v->kick);
  uv_timer_init(loop, &v->fixt);
  uv_timer_init(loop, &v->runt);
  v->tick.data = v->kick.data = v->fixt.data = v->runt.data = v;
  v->handles_open = 4;
  v->ready = true;
  *out = v;
  return 0;
}

int keel_verify_new_ex(uv_loop_t *loop, const keel_verify_opts *opts, keel_verify **out,
                       char *why_buf, size_t why_cap) {
  if (loop == NULL || out == NULL)
    return keel__why(why_buf, why_cap, UV_EINVAL, "loop and out are required");
  const char *why = NULL;
  int rc = keel_verify_validate_opts(opts, &why);
  if (rc < 0) return keel__why(why_buf, why_cap, rc, why);
  rc = keel_verify_new(loop, opts, out);
  if (rc == UV_ENOMEM) return keel__why(why_buf, why_cap, rc, "out of memory");
  return keel__why(why_buf, why_cap, rc, rc == 0 ? "" : keel_strerror(rc));
}

int keel_verify_start(keel_verify *v) {
  if (v == NULL) return UV_EINVAL;
  if (v->closing) return KEEL_ECLOSING;
  if (v->started) return 0;
  v->started = true;
  uv_timer_start(&v->tick, tick_cb, v->o.run_on_start ? 0 : v->o.interval_ms, v->o.interval_ms);
  return 0;
}

int keel_verify_stop(keel_verify *v) {
  if (v == NULL) return UV_EINVAL;
  if (v->closing) return KEEL_ECLOSING;
  v->started = false;
  uv_timer_stop(&v->tick);
  if (v->run_requested) { /* requested, not begun: ends with UV_ECANCELED */
    v->run_requested = false;
    v->cancel_req = true;
    kick(v);
  }
  if (v->lock_inflight && !v->lock_cancel && !v->running) {
    v->lock_cancel = true;
    v->cancel_req = true;
    kick(v);
  }
  if (v->running) {
    v->stopping = true;
    kick(v);
  }
  return 0;
}

static int request_run(keel_verify *v) {
  if (v->running || v->run_requested || (v->lock_inflight && !v->lock_cancel)) {
    v->st.runs_skipped++;
    return KEEL_EINPROGRESS;
  }
  v->run_requested = true;
  kick(v);
  return 0;
}

int keel_verify_run_now(keel_verify *v) {
  if (v == NULL) return UV_EINVAL;
  if (v->closing) return KEEL_ECLOSING;
  return request_run(v);
}

static void tick_cb(uv_timer_t *t) {
  keel_verify *v = t->data;
  if (v->started) (void)request_run(v);
}

static void kick_cb(uv_timer_t *t) {
  pump(t->data);
}

/* ---- the run ------------------------------------------------------------- */

static void clear_keys(char **keys) {
  for (int k = 0; k < KEEL_VERIFY_MAX_KEYS; k++) {
    keel__free(keys[k]);
    keys[k] = NULL;
  }
}

static void update_last_key_text(keel_verify *v) {
  size_t len = 0;
  char *b = v->st.last_key;
  b[0] = '\0';
  for (int k = 0; k < v->nkeys && v->last[k]; k++) {
    int n = snprintf(b + len, sizeof v->st.last_key - len, "%s%s", k ? "," : "", v->last[k]);
    if (n < 0 || (size_t)n >= sizeof v->st.last_key - len) break;
    len += (size_t)n;
  }
}

static void report_run(keel_verify *v, int status) {
  uint64_t now = now_ms(v);
  if (!v->running) { /* ended before it began (leader lock, stop, close) */
    v->st.runs_started++;
    v->run_start = now;
    v->st.last_run_started_ms = now;
    v->run_rows = v->run_problems = 0;
  }
  uv_timer_stop(&v->runt);
  v->run_id++; /* statements of this run still out are dropped when they return */
  v->runq_out = false;
  uint64_t dur = now >= v->run_start ? now - v->run_start : 0;
  v->running = false;
  v->phase = PH_IDLE;
  v->stopping = false;
  v->st.last_run_duration_ms = dur;
  v->st.rows_last_run = v->run_rows;
  v->st.rows_per_s =
      dur > 0 ? (double)v->run_rows * 1000.0 / (double)dur : (double)v->run_rows * 1000.0;
  v->st.problems_last_run = v->run_problems;
  v->st.last_status = status;
  keel__vcodes_end_run(&v->codes);
  if (status == 0)
    v->st.runs_completed++;
  else
    v->st.runs_failed++;
  if (v->o.on_run_done) v->o.on_run_done(v, status, v->o.data);
}

static void ckpt_end_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = runq_back(data);
  if (v == NULL) return;
  if (status < 0) set_error(v, status, "checkpoint: %s", pg_error_text(v, c, res));
  report_run(v, v->run_status);
  kick(v);
}

/* Ends the run: the checkpoint is cleared (completed) or saved (failed,
 * stopped) first, so that the next run sees it; then the run is reported. */
static void end_run(keel_verify *v) {
  if (v->run_status == 0 && v->stopping) v->run_status = UV_ECANCELED;
  v->phase = PH_IDLE;
  if (v->sql.ckpt_clear != NULL && v->ckpt_ready) {
    const char *p[1 + KEEL_VERIFY_MAX_KEYS] = {v->s_job};
    int rc = 1;
    if (v->run_status == 0) {
      rc = runq(v, v->sql.ckpt_clear, 1, p, ckpt_end_cb);
    } else if (v->have_last) {
      for (int k = 0; k < v->nkeys; k++) p[1 + k] = v->last[k];
      rc = runq(v, v->sql.ckpt_save, 1 + v->nkeys, p, ckpt_end_cb);
    }
    if (rc == 0) return;
  }
  report_run(v, v->run_status);
}

static void fail_run(keel_verify *v, int status) {
  if (v->run_status == 0) v->run_status = status;
  v->scan_done = true;
  v->phase = PH_SCAN;
}

static void ckpt_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = data;
  if (query_returned(v)) return;
  if (status < 0) set_error(v, status, "checkpoint: %s", pg_error_text(v, c, res));
}

static void fetch(keel_verify *v) {
  const char *p[2 * KEEL_VERIFY_MAX_KEYS];
  int n = 0;
  if (v->have_last)
    for (int k = 0; k < v->nkeys; k++) p[n++] = v->last[k];
  if (v->sql.bounded)
    for (int k = 0; k < v->nkeys; k++) p[n++] = v->bound[k];
  int rc = runq(v, v->have_last ? v->sql.batch_next : v->sql.batch_first, n, p, batch_cb);
  if (rc < 0) {
    set_error(v, rc, "batch query: %s", keel_strerror(rc));
    fail_run(v, rc);
    kick(v);
    return;
  }
  v->fetch_inflight = true;
}

static int copy_keys(char **dst, const keel_pg_result *res, int row, const int *cols, int nkeys) {
  char *tmp[KEEL_VERIFY_MAX_KEYS] = {NULL};
  for (int k = 0; k < nkeys; k++) {
    const char *s = keel_pg_result_value(res, row, cols[k]);
    if (s == NULL) {
      clear_keys(tmp);
      return UV_EINVAL;
    }
    tmp[k] = keel__strdup(s);
    if (tmp[k] == NULL) {
      clear_keys(tmp);
      return UV_ENOMEM;
    }
  }
  clear_keys(dst);
  for (int k = 0; k < nkeys; k++) dst[k] = tmp[k];
  return 0;
}

static void bound_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = runq_back(data);
  if (v == NULL) return;
  if (status < 0) {
    set_error(v, status, "largest key: %s", pg_error_text(v, c, res));
    fail_run(v, status);
  } else if (keel_pg_result_nrows(res) == 0) {
    v->scan_done = true; /* empty table */
  } else {
    int cols[KEEL_VERIFY_MAX_KEYS];
    for (int k = 0; k < v->nkeys; k++) cols[k] = k;
    int rc = copy_keys(v->bound, res, 0, cols, v->nkeys);
    if (rc < 0) {
      set_error(v, rc, "largest key: %s",
                rc == UV_EINVAL ? "an id column is NULL" : "out of memory");
      fail_run(v, rc);
    }
    v->have_bound = true;
  }
  v->phase = PH_SCAN;
  pump(v);
}

static void after_checkpoint(keel_verify *v) {
  if (v->sql.bounded) {
    v->phase = PH_BOUND;
    int rc = runq(v, v->sql.max_key, 0, NULL, bound_cb);
    if (rc < 0) {
      set_error(v, rc, "largest key: %s", keel_strerror(rc));
      fail_run(v, rc);
    }
  } else {
    v->phase = PH_SCAN;
  }
  pump(v);
}

static void ckpt_load_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = runq_back(data);
  if (v == NULL) return;
  if (status < 0) {
    set_error(v, status, "checkpoint load: %s", pg_error_text(v, c, res));
    fail_run(v, status);
    pump(v);
    return;
  }
  if (keel_pg_result_nrows(res) == 1) {
    int cols[KEEL_VERIFY_MAX_KEYS];
    for (int k = 0; k < v->nkeys; k++) cols[k] = k;
    if (copy_keys(v->last, res, 0, cols, v->nkeys) == 0) {
      v->have_last = true;
      update_last_key_text(v);
    }
  }
  after_checkpoint(v);
}

static void load_checkpoint(keel_verify *v) {
  v->phase = PH_CKPT_LOAD;
  const char *p[1] = {v->s_job};
  int rc = runq(v, v->sql.ckpt_load, 1, p, ckpt_load_cb);
  if (rc < 0) {
    set_error(v, rc, "checkpoint load: %s", keel_strerror(rc));
    fail_run(v, rc);
  }
}

static void ckpt_create_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = runq_back(data);
  if (v == NULL) return;
  const char *ss = res ? keel_pg_result_sqlstate(res) : NULL;
  /* concurrent CREATE TABLE IF NOT EXISTS may race: already there is fine */
  if (status < 0 && !(ss && (strcmp(ss, "23505") == 0 || strcmp(ss, "42P07") == 0))) {
    set_error(v, status, "checkpoint table: %s", pg_error_text(v, c, res));
    fail_run(v, status);
    pump(v);
    return;
  }
  v->ckpt_ready = true;
  load_checkpoint(v);
  pump(v);
}

static void begin_run(keel_verify *v) {
  v->running = true;
  v->st.runs_started++;
  v->run_start = now_ms(v);
  v->st.last_run_started_ms = v->run_start;
  v->run_rows = v->run_problems = 0;
  v->run_status = 0;
  v->since_ckpt = 0;
  v->fetch_inflight = v->scan_done = v->have_last = v->have_bound = false;
  v->stopping = false;
  clear_keys(v->last);
  clear_keys(v->bound);
  if (v->colnames) {
    for (int i = 0; i < v->ncolnames; i++) keel__free(v->colnames[i]);
    keel__free(v->colnames);
    v->colnames = NULL;
    v->ncolnames = 0;
  }
  if (v->sql.ckpt_create != NULL) {
    if (!v->ckpt_ready) {
      v->phase = PH_CKPT_CREATE;
      int rc = runq(v, v->sql.ckpt_create, 0, NULL, ckpt_create_cb);
      if (rc < 0) {
        set_error(v, rc, "checkpoint table: %s", keel_strerror(rc));
        fail_run(v, rc);
      }
    } else {
      load_checkpoint(v);
    }
  } else {
    after_checkpoint(v);
  }
}

static void lock_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = data;
  v->lock_inflight = false;
  if (query_returned(v)) return;
  if (status < 0) {
    v->leader = false;
    if (v->lock_cancel) { /* the run already ended (stop, timeout, lost connection) */
      v->lock_cancel = false;
      kick(v);
      return;
    }
    set_error(v, status, "leader lock: %s", pg_error_text(v, c, res));
    report_run(v, status);
    kick(v);
    return;
  }
  const char *val = keel_pg_result_value(res, 0, 0);
  v->leader = val != NULL && val[0] == 't';
  v->lock_pid = v->leader ? keel_pg_backend_pid(v->lock_conn) : 0;
  if (v->lock_cancel) { /* the run already ended meanwhile */
    v->lock_cancel = false;
    kick(v);
    return;
  }
  if (!v->leader) {
    uv_timer_stop(&v->runt);
    v->st.runs_not_leader++;
    return;
  }
  begin_run(v);
  pump(v);
}

static int build_colnames(keel_verify *v, const keel_pg_result *res) {
  int n = keel_pg_result_ncols(res);
  v->colnames = keel__calloc(n > 0 ? (size_t)n : 1, sizeof(char *));
  if (v->colnames == NULL) return UV_ENOMEM;
  for (int i = 0; i < n; i++) {
    const char *name = keel_pg_result_col_name(res, i);
    v->colnames[i] = keel__strdup(name ? name : "");
    if (v->colnames[i] == NULL) {
      for (int j = 0; j < i; j++) keel__free(v->colnames[j]);
      keel__free(v->colnames);
      v->colnames = NULL;
      return UV_ENOMEM;
    }
  }
  v->ncolnames = n;
  keel_verify_row r = {.ncols = n, .names = (const char *const *)v->colnames};
  for (int k = 0; k < v->nkeys; k++) {
    v->keycols[k] = keel__vrow_find(&r, v->s_keys[k]);
    if (v->keycols[k] < 0) return UV_EINVAL;
  }
  return 0;
}

static void batch_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = runq_back(data);
  if (v == NULL) return;
  v->fetch_inflight = false;
  if (!v->running) return;
  if (status < 0) {
    set_error(v, status, "batch query: %s", pg_error_text(v, c, res));
    fail_run(v, status);
    pump(v);
    return;
  }
  v->st.batches++;
  int nrows = keel_pg_result_nrows(res);
  if (v->colnames == NULL) {
    int rc = build_colnames(v, res);
    if (rc < 0) {
      set_error(v, rc, "%s",
                rc == UV_ENOMEM ? "out of memory" : "an id column is missing from the result");
      fail_run(v, rc);
      pump(v);
      return;
    }
  }
  if (nrows > 0) {
    int rc = copy_keys(v->last, res, nrows - 1, v->keycols, v->nkeys);
    if (rc < 0) {
      set_error(v, rc, "%s",
                rc == UV_EINVAL ? "an id column is NULL: ids must be NOT NULL" : "out of memory");
      fail_run(v, rc);
      pump(v);
      return;
    }
    v->have_last = true;
    update_last_key_text(v);
  }
  if ((uint32_t)nrows < v->o.batch_size) v->scan_done = true;
  /* Prefetch: the next batch travels while this one is validated. */
  else if (!v->stopping && v->pending.n < v->o.batch_size && v->leader && v->run_status == 0 &&
           !v->closing)
    fetch(v);

  keel_verify_row row = {.v = v,
                         .ncols = v->ncolnames,
                         .names = (const char *const *)v->colnames,
                         .res = res,
                         .keycols = v->keycols,
                         .nkeys = v->nkeys,
                         .in_validator = true};
  keel_verify_validate_fn validate = v->o.validate;
  void *udata = v->o.data;
  for (int i = 0; i < nrows; i++) {
    row.idx = i;
    row.nproblems = 0;
    bool ok = validate(v, &row, udata);
    if (v->closing) return;
    v->st.rows_scanned++;
    v->run_rows++;
    if (ok && row.nproblems == 0) {
      v->st.rows_valid++;
      continue;
    }
    v->st.rows_invalid++;
    if (row.nproblems == 0) {
      keel__vcodes_add(&v->codes, "invalid");
      v->st.problems_total++;
      v->run_problems++;
    }
    if (v->o.fix == NULL) continue;
    row.in_validator = false;
    keel_verify_fix *f = fix_new(&row);
    row.in_validator = true;
    if (f == NULL) {
      v->st.fixes_failed++;
      set_error(v, UV_ENOMEM, "out of memory copying an invalid row for its fix-up");
      continue;
    }
    f->v = v;
    f->attempt = 1;
    q_push(&v->pending, f);
  }
  if (v->sql.ckpt_save != NULL && v->have_last && ++v->since_ckpt >= v->o.checkpoint_every) {
    v->since_ckpt = 0;
    const char *p[1 + KEEL_VERIFY_MAX_KEYS] = {v->s_job};
    for (int k = 0; k < v->nkeys; k++) p[1 + k] = v->last[k];
    (void)vquery(v, v->sql.ckpt_save, 1 + v->nkeys, p, ckpt_cb);
  }
  pump(v);
}

/* ---- fix-ups ------------------------------------------------------------ */

static void fix_failed(keel_verify *v, keel_verify_fix *f, int status) {
  char key[64];
  keel_verify_row_key(&f->row, key, sizeof key);
  if (f->attempt <= v->o.fix_max_retries) {
    v->st.fixes_retried++;
    uint64_t d = keel_backoff_delay(&v->o.fix_backoff, f->attempt, f->prev_delay, NULL);
    f->prev_delay = d;
    f->attempt++;
    f->due = uv_now(v->loop) + d;
    f->v = v;
    int rc = w_push(v, f);
    if (rc == 0) {
      set_error(v, status, "fix-up of row %s failed (%s), retrying", key, keel_err_name(status));
      return;
    }
    v->st.fixes_failed++;
    v->st.fixes_dropped++;
    if (rc == UV_ENOBUFS)
      set_error(v, status, "fix-up of row %s failed (%s), not retried: %u fix-ups already wait",
                key, keel_err_name(status), max_waiting(v));
    else
      set_error(v, rc, "fix-up of row %s failed (%s), not retried: out of memory", key,
                keel_err_name(status));
    keel__free(f);
  } else {
    v->st.fixes_failed++;
    set_error(v, status, "fix-up of row %s failed for good (%s)", key, keel_err_name(status));
    keel__free(f);
  }
}

int keel_verify_fix_done(keel_verify_fix *f, int status) {
  if (f == NULL) return UV_EINVAL;
  keel_verify *v = f->v;
  if (v == NULL) {
    keel__free(f);
    return KEEL_ESTALE;
  }
  q_remove(f);
  if (status == 0) {
    v->st.fixes_succeeded++;
    keel__free(f);
  } else {
    fix_failed(v, f, status);
  }
  kick(v);
  return 0;
}

unsigned keel_verify_fix_attempt(const keel_verify_fix *f) {
  return f ? f->attempt : 0;
}

/* Arms the fix-up timer for the earliest retry or attempt deadline: the top
 * of the retry heap, and the head of the active list (attempts start in
 * order and share one timeout, so their deadlines are in list order). */
static void arm_fix_timer(keel_verify *v) {
  if (v->closing) return;
  uint64_t min = UINT64_MAX;
  if (v->wn > 0) min = v->wheap[0]->due;
  if (v->o.fix_timeout_ms > 0 && v->active.head && v->active.head->due < min)
    min = v->active.head->due;
  if (min == UINT64_MAX) {
    uv_timer_stop(&v->fixt);
    return;
  }
  uint64_t now = uv_now(v->loop);
  uv_timer_start(&v->fixt, fixt_cb, min > now ? min - now : 0, 0);
}

static void fixt_cb(uv_timer_t *t) {
  keel_verify *v = t->data;
  uint64_t now = uv_now(v->loop);
  while (v->wn > 0 && v->wheap[0]->due <= now) q_push(&v->pending, w_pop(v));
  if (v->o.fix_timeout_ms > 0) {
    keel_verify_fix *next;
    for (keel_verify_fix *f = v->active.head; f; f = next) {
      next = f->next;
      if (f->due > now) break;
      q_remove(f);
      v->st.fixes_timed_out++;
      /* The user still holds f: detach it (fix_done frees it) and go on with
       * a copy. */
      f->v = NULL;
      keel_verify_fix *g = fix_new(&f->row);
      if (g == NULL) {
        v->st.fixes_failed++;
        set_error(v, UV_ENOMEM, "out of memory retrying a timed-out fix-up");
        continue;
      }
      g->attempt = f->attempt;
      g->prev_delay = f->prev_delay;
      fix_failed(v, g, UV_ETIMEDOUT);
    }
  }
  pump(v);
}

/* ---- leader lock ---------------------------------------------------------- */

static void lock_acquired(keel_pg_pool *pool, keel_pg *conn, int status, void *data) {
  keel_verify *v = data;
  v->lock_acquiring = false;
  v->lock_inflight = false;
  v->queries_out--;
  if (v->closing) {
    if (status == 0) keel_pg_pool_release(pool, conn);
    maybe_free(v);
    return;
  }
  if (v->lock_cancel) { /* the run already ended meanwhile */
    v->lock_cancel = false;
    if (status == 0) v->lock_conn = conn;
    kick(v);
    return;
  }
  if (status < 0) {
    set_error(v, status, "leader lock: no pool connection (%s)", keel_err_name(status));
    report_run(v, status);
    kick(v);
    return;
  }
  v->lock_conn = conn;
  send_lock_query(v);
}

/* Asks for the advisory lock on the dedicated connection (taking one from
 * the pool first when there is no conninfo). */
static void send_lock_query(keel_verify *v) {
  if (v->lock_conn == NULL) {
    if (v->lock_acquiring) return;
    int rc = keel_pg_pool_acquire(v->pool, lock_acquired, v);
    if (rc < 0) {
      set_error(v, rc, "leader lock: %s", keel_strerror(rc));
      report_run(v, rc);
      return;
    }
    v->queries_out++;
    v->lock_acquiring = true;
    v->lock_inflight = true;
    return;
  }
  char key[32];
  snprintf(key, sizeof key, "%" PRId64, v->o.leader_lock_key);
  const char *p[1] = {key};
  int rc = keel_pg_query(v->lock_conn, v->sql.lock, 1, p, lock_cb, v);
  if (rc == 0) {
    v->queries_out++;
    v->lock_inflight = true;
  } else {
    set_error(v, rc, "leader lock: %s", keel_strerror(rc));
    report_run(v, rc);
  }
}

/* ---- the run's bound ------------------------------------------------------ */

/* Ends the run now (timed out, connection lost): its statement still out is
 * dropped when it comes back (its ticket names an older run), fix-ups waiting are
 * dropped and running ones detached (their keel_verify_fix_done() returns
 * KEEL_ESTALE), the checkpoint is saved without waiting for it. */
static void abort_run(keel_verify *v, int status) {
  if (!v->running) return;
  v->fetch_inflight = false;
  uint64_t dropped = 0;
  for (keel_verify_fix *f; (f = v->pending.head) != NULL; dropped++) {
    q_remove(f);
    keel__free(f);
  }
  for (keel_verify_fix *f; (f = w_pop(v)) != NULL; dropped++) keel__free(f);
  for (keel_verify_fix *f; (f = v->active.head) != NULL; dropped++) {
    q_remove(f);
    f->v = NULL;
  }
  v->st.fixes_dropped += dropped;
  if (v->sql.ckpt_save != NULL && v->ckpt_ready && v->have_last) {
    const char *p[1 + KEEL_VERIFY_MAX_KEYS] = {v->s_job};
    for (int k = 0; k < v->nkeys; k++) p[1 + k] = v->last[k];
    (void)vquery(v, v->sql.ckpt_save, 1 + v->nkeys, p, ckpt_cb);
  }
  v->run_status = status;
  report_run(v, status);
}

/* ": database unreachable (why)" when the connection c (NULL: the pool) is
 * down, else what the run waits for. */
static void wait_text(keel_verify *v, keel_pg *c, char *buf, size_t cap) {
  bool down = false;
  const char *err = "";
  if (c != NULL) {
    down = !keel_pg_is_connected(c);
    err = keel_pg_last_error(c);
  } else if (v->pool != NULL) {
    keel_pg_pool_stats ps;
    keel_pg_pool_get_stats(v->pool, &ps);
    down = ps.connected == 0;
    err = keel_pg_pool_last_error(v->pool);
  }
  if (down) {
    snprintf(buf, cap, ": database unreachable (%s)", err && *err ? err : "not connected");
  } else if (!v->running) {
    snprintf(buf, cap, " waiting for the leader lock");
  } else if (v->runq_out) {
    snprintf(buf, cap, " waiting for the database's answer (%s)",
             v->phase == PH_CKPT_CREATE || v->phase == PH_CKPT_LOAD ? "checkpoint"
             : v->phase == PH_BOUND                                 ? "largest key"
             : v->fetch_inflight                                    ? "batch"
                                                                    : "end-of-run checkpoint");
  } else if (v->active.n > 0 || v->pending.n > 0 || v->wn > 0) {
    snprintf(buf, cap, " with %u fix-ups running and %u waiting", v->active.n,
             v->pending.n + v->wn);
  } else {
    buf[0] = '\0';
  }
}

static void runt_cb(uv_timer_t *t) {
  keel_verify *v = t->data;
  if (v->closing) return;
  char why[KEEL__ERRBUF_SIZE];
  unsigned long long ms = (unsigned long long)run_timeout(v);
  if (!v->running) {
    if (!v->lock_inflight || v->lock_cancel) return;
    wait_text(v, v->lock_conn, why, sizeof why);
    v->lock_cancel = true;
    set_error(v, UV_ETIMEDOUT, "run timed out after %llu ms%s", ms, why);
    v->st.runs_timed_out++;
    report_run(v, UV_ETIMEDOUT);
  } else {
    wait_text(v, v->conn, why, sizeof why);
    set_error(v, UV_ETIMEDOUT, "run timed out after %llu ms%s", ms, why);
    v->st.runs_timed_out++;
    abort_run(v, UV_ETIMEDOUT);
  }
  pump(v);
}

/* ---- the pump: whatever can move, moves ------------------------------------ */

static void pump(keel_verify *v) {
  if (v->in_pump || v->closing) return;
  v->in_pump = true;
  for (;;) {
    if (v->closing) break;
    if (v->cancel_req) { /* stop dropped a requested run */
      v->cancel_req = false;
      set_error(v, UV_ECANCELED, "run cancelled by keel_verify_stop() before it began");
      report_run(v, UV_ECANCELED);
      continue;
    }
    if (v->run_requested && !v->running && (!v->lock_inflight || v->lock_cancel)) {
      v->run_requested = false;
      uv_timer_start(&v->runt, runt_cb, run_timeout(v), 0);
      if (v->o.leader_lock) {
        if (v->lock_inflight) /* a dropped run's request is still out: this run takes it over */
          v->lock_cancel = false;
        else
          send_lock_query(v);
      } else {
        begin_run(v);
      }
      continue;
    }
    if (!v->running) break;
    if (v->o.fix != NULL && v->active.n < v->o.fix_concurrency && v->pending.n > 0) {
      keel_verify_fix *f = v->pending.head;
      q_remove(f);
      q_push(&v->active, f);
      f->due = v->o.fix_timeout_ms ? uv_now(v->loop) + v->o.fix_timeout_ms : UINT64_MAX;
      v->st.fixes_attempted++;
      v->o.fix(v, f, &f->row, v->o.data);
      continue;
    }
    if (v->phase != PH_SCAN) break;
    if (v->o.leader_lock && v->leader && keel_pg_backend_pid(v->lock_conn) != v->lock_pid) {
      v->leader = false; /* the session that held the lock is gone */
      set_error(v, KEEL_ENOTLEADER, "leader lock connection lost");
    }
    if (v->o.leader_lock && !v->leader && !v->scan_done) {
      set_error(v, KEEL_ENOTLEADER, "lost the leader lock during the run");
      fail_run(v, KEEL_ENOTLEADER);
    }
    if (!v->fetch_inflight && !v->scan_done && !v->stopping && v->pending.n < v->o.batch_size) {
      fetch(v);
      if (v->fetch_inflight) break;
      continue;
    }
    if ((v->scan_done || v->stopping) && !v->fetch_inflight && v->active.n == 0 &&
        v->pending.n == 0 && v->wn == 0) {
      end_run(v);
      continue;
    }
    break;
  }
  v->in_pump = false;
  arm_fix_timer(v);
}

/* ---- stats and close --------------------------------------------------------- */

void keel_verify_get_stats(const keel_verify *v, keel_verify_stats *out) {
  if (v == NULL || out == NULL) return;
  *out = v->st;
  out->running = v->running;
  out->leader = v->o.leader_lock ? v->leader : true;
  out->fixes_running = v->active.n;
  out->fixes_pending = v->pending.n + v->wn;
  out->next_run_ms = 0;
  if (v->started && !v->closing) out->next_run_ms = now_ms(v) + uv_timer_get_due_in(&v->tick);
  memcpy(out->last_error, v->last_error,
         sizeof out->last_error < sizeof v->last_error ? sizeof out->last_error
                                                       : sizeof v->last_error);
  out->last_error[sizeof out->last_error - 1] = '\0';
  out->ncodes = keel__vcodes_top(&v->codes, out->top_codes, KEEL_VERIFY_TOP_CODES);
}

const char *keel_verify_last_error(const keel_verify *v) {
  return v ? v->last_error : "";
}

static void free_list(fixq *q) {
  while (q->head) {
    keel_verify_fix *f = q->head;
    q_remove(f);
    keel__free(f);
  }
}

void keel_verify_close(keel_verify *v, keel_close_cb cb, void *data) {
  if (v == NULL || v->closing) return;
  v->closing = true;
  v->close_cb = cb;
  v->close_data = data;
  /* a run going or requested ends with UV_ECANCELED, before cb */
  v->close_cancel_run =
      v->running || v->run_requested || v->cancel_req || (v->lock_inflight && !v->lock_cancel);
  v->run_requested = v->cancel_req = false;
  v->started = false;
  free_list(&v->pending);
  for (keel_verify_fix *f; (f = w_pop(v)) != NULL;) keel__free(f);
  while (v->active.head) {
    keel_verify_fix *f = v->active.head;
    q_remove(f);
    f->v = NULL; /* the fix-up still holds it */
  }
  uv_close((uv_handle_t *)&v->tick, on_handle_closed);
  uv_close((uv_handle_t *)&v->kick, on_handle_closed);
  uv_close((uv_handle_t *)&v->fixt, on_handle_closed);
  uv_close((uv_handle_t *)&v->runt, on_handle_closed);
  if (v->conn) keel_pg_close(v->conn, on_conn_closed, v);
  if (v->lock_conn && !v->lock_from_pool) keel_pg_close(v->lock_conn, on_conn_closed, v);
  if (v->lock_conn && v->lock_from_pool) {
    /* the pooled session must not keep our lock: unlock, then give it back
     * (statements queued on it finish first) */
    char key[32];
    snprintf(key, sizeof key, "%" PRId64, v->o.leader_lock_key);
    const char *p[1] = {key};
    if (v->leader || v->lock_inflight)
      (void)keel_pg_query(v->lock_conn, "SELECT pg_catalog.pg_advisory_unlock($1::bigint)", 1, p,
                          NULL, NULL);
    keel_pg_pool_release(v->pool, v->lock_conn);
    v->lock_conn = NULL;
  }
}
