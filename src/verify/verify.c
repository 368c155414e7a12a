/* The verifier's life cycle: options, new, close, stats, and the statement
 * helpers every part uses. The run itself: sched.c (scheduling, the run's
 * bound), run.c (its state machine, free of I/O), scan.c (keyset batches),
 * fix.c (fix-ups), leader.c (leader lock), checkpoint.c (checkpoints). */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "verify/verify_internal.h"

uint64_t keel__vnow(const keel_verify *v) {
  return keel__clock_now(&v->o.clock, v->loop);
}

void keel__vset_error(keel_verify *v, int err, const char *fmt, ...) {
  char msg[KEEL__ERRBUF_SIZE];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  keel__fail(v->last_error, err, "%s", msg);
}

void keel__vmaybe_free(keel_verify *v) {
  if (!v->closing || v->handles_open > 0 || v->conns_open > 0 || v->queries_out > 0) return;
  if (v->close_cancel_run) { /* the run close dropped: before close_cb */
    v->close_cancel_run = false;
    keel__vreport_run(v, UV_ECANCELED);
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
  keel__free(v->s_lease);
  keel__free(v->wheap);
  keel__free(v);
  if (cb) cb(v, data);
}

/* Sends a statement on the pool or the owned connection; the callback gets
 * v as data and must start with keel__vquery_returned(). */
int keel__vquery(keel_verify *v, const char *sql, int n, const char *const *params,
                 keel_pg_result_cb cb) {
  int rc = v->pool ? keel_pg_pool_query(v->pool, sql, n, params, cb, v)
                   : keel_pg_query(v->conn, sql, n, params, cb, v);
  if (rc == 0) v->queries_out++;
  return rc;
}

/* true when the callback must return at once (closing). */
bool keel__vquery_returned(keel_verify *v) {
  v->queries_out--;
  if (v->closing) {
    keel__vmaybe_free(v);
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

/* keel__vquery() for the run's own statement: one at a time. */
int keel__vrunq(keel_verify *v, const char *sql, int n, const char *const *params,
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
keel_verify *keel__vrunq_back(void *data) {
  vticket *t = data;
  keel_verify *v = t->v;
  uint64_t run = t->run;
  keel__free(t);
  if (keel__vquery_returned(v)) return NULL;
  if (run != v->run_id) return NULL;
  v->runq_out = false;
  return v;
}

uint64_t keel__vrun_timeout(const keel_verify *v) {
  return v->o.run_timeout_ms ? v->o.run_timeout_ms : 3600000;
}

const char *keel__vpg_error(keel_verify *v, keel_pg *c, const keel_pg_result *res) {
  const char *e = res ? keel_pg_result_error(res) : NULL;
  if (e && *e) return e;
  if (c) return keel_pg_last_error(c);
  return v->pool ? keel_pg_pool_last_error(v->pool) : "";
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
  if (o->leader_kind != KEEL_VERIFY_LEADER_LEASE && o->leader_kind != KEEL_VERIFY_LEADER_ADVISORY)
    return (*why = "leader_kind is unknown", UV_EINVAL);
  if (o->leader_table != NULL && keel_pg_quote_ident(tmp, sizeof tmp, o->leader_table, true) < 0)
    return (*why = "leader_table is not a valid identifier", UV_EINVAL);
  {
    uint64_t ttl = o->leader_ttl_ms ? o->leader_ttl_ms : 10000;
    if (ttl < 100) return (*why = "leader_ttl_ms must be >= 100", UV_EINVAL);
    if (o->leader_margin_ms != 0 && o->leader_margin_ms >= ttl / 2)
      return (*why = "leader_margin_ms must be < leader_ttl_ms / 2", UV_EINVAL);
  }
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
  keel__vmaybe_free(v);
}

void keel__von_conn_closed(void *obj, void *data) {
  (void)obj;
  keel_verify *v = data;
  v->conns_open--;
  keel__vmaybe_free(v);
}

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
  keel__vset_error(v, status, "run failed: database unreachable (%s)", keel_pg_last_error(c));
  keel__vabort_run(v, status);
  keel__vkick(v);
}

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
  v->s_lease = dup_or_null(opts->leader_table, &oom);
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
  v->o.leader_table = v->s_lease;
  v->lease = v->o.leader_lock && v->o.leader_kind == KEEL_VERIFY_LEADER_LEASE;
  {
    /* a random owner id per verifier */
    uint64_t r[2] = {0, 0};
    if (uv_random(NULL, NULL, r, sizeof r, 0, NULL) != 0) {
      r[0] = uv_hrtime() ^ (uint64_t)(uintptr_t)v;
      r[1] = (uint64_t)uv_os_getpid() * 0x9e3779b97f4a7c15ULL;
    }
    snprintf(v->owner, sizeof v->owner, "%d-%016" PRIx64 "%016" PRIx64, (int)uv_os_getpid(), r[0],
             r[1]);
  }
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
  v->lock_from_pool = v->o.leader_lock && !v->lease && v->s_conninfo == NULL;
  if (rc == 0 && v->o.leader_lock && v->s_conninfo != NULL) {
    keel_pg_opts po;
    keel_pg_opts_init(&po);
    po.conninfo = v->s_conninfo;
    po.on_state = keel__von_lock_state;
    po.data = v;
    po.pipeline = false;
    /* a lease statement that does not answer within the ttl is worthless */
    if (v->lease) po.query_timeout_ms = (uint32_t)(v->o.leader_ttl_ms ? v->o.leader_ttl_ms : 10000);
    rc = keel_pg_new(loop, &po, &v->lock_conn);
  }
  if (rc < 0) {
    /* Nothing of the loop was touched except owned connections: close them
     * and free the rest when they are gone. */
    v->closing = true;
    if (v->conn) {
      v->conns_open++;
      keel_pg_close(v->conn, keel__von_conn_closed, v);
    }
    if (v->lock_conn) {
      v->conns_open++;
      keel_pg_close(v->lock_conn, keel__von_conn_closed, v);
    }
    if (v->conns_open == 0) keel__vmaybe_free(v);
    return rc;
  }
  v->conns_open = (v->conn ? 1 : 0) + (v->lock_conn ? 1 : 0);
  uv_timer_init(loop, &v->tick);
  uv_timer_init(loop, &v->kick);
  uv_timer_init(loop, &v->fixt);
  uv_timer_init(loop, &v->runt);
  uv_timer_init(loop, &v->renewt);
  uv_timer_init(loop, &v->deadt);
  v->tick.data = v->kick.data = v->fixt.data = v->runt.data = v;
  v->renewt.data = v->deadt.data = v;
  v->handles_open = 6;
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

/* ---- stats and close --------------------------------------------------------- */

void keel_verify_get_stats(const keel_verify *v, keel_verify_stats *out) {
  if (v == NULL || out == NULL) return;
  *out = v->st;
  out->running = v->running;
  out->leader = v->o.leader_lock ? v->leader : true;
  out->fence = v->lease && v->leader ? v->fence : 0;
  out->fixes_running = v->active.n;
  out->fixes_pending = v->pending.n + v->wn;
  out->next_run_ms = 0;
  if (v->started && !v->closing) out->next_run_ms = keel__vnow(v) + uv_timer_get_due_in(&v->tick);
  memcpy(out->last_error, v->last_error,
         sizeof out->last_error < sizeof v->last_error ? sizeof out->last_error
                                                       : sizeof v->last_error);
  out->last_error[sizeof out->last_error - 1] = '\0';
  out->ncodes = keel__vcodes_top(&v->codes, out->top_codes, KEEL_VERIFY_TOP_CODES);
}

const char *keel_verify_last_error(const keel_verify *v) {
  return v ? v->last_error : "";
}

void keel_verify_close(keel_verify *v, keel_close_cb cb, void *data) {
  if (v == NULL || v->closing) return;
  keel__stats_hooks_detach(&v->stats_hooks);
  v->closing = true;
  v->close_cb = cb;
  v->close_data = data;
  /* a run going or requested ends with UV_ECANCELED, before cb */
  v->close_cancel_run =
      v->running || v->run_requested || v->cancel_req || (v->lock_inflight && !v->lock_cancel);
  v->run_requested = v->cancel_req = false;
  v->started = false;
  (void)keel__vfix_drop_all(v); /* the fix-ups still hold the running ones */
  uv_close((uv_handle_t *)&v->tick, on_handle_closed);
  uv_close((uv_handle_t *)&v->kick, on_handle_closed);
  uv_close((uv_handle_t *)&v->fixt, on_handle_closed);
  uv_close((uv_handle_t *)&v->runt, on_handle_closed);
  uv_close((uv_handle_t *)&v->renewt, on_handle_closed);
  uv_close((uv_handle_t *)&v->deadt, on_handle_closed);
  if (v->conn) keel_pg_close(v->conn, keel__von_conn_closed, v);
  if (v->lease) keel__vlease_release(v); /* on the leader connection: closed once it answers */
  if (v->lock_conn && !v->lock_from_pool && !v->releasing)
    keel_pg_close(v->lock_conn, keel__von_conn_closed, v);
  keel__vlock_release(v);
}
