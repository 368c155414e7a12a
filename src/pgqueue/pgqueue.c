/* The durable queue: two keel_pg connections per object (A: migrate,
 * LISTEN, fetch, heartbeat, rescue, stats, cancel; B: completions and
 * enqueues, so a fetch never waits behind a durable commit), a local list
 * of held jobs, one fetch and one completion batch in flight at a time. */
#include "pgqueue/pgqueue_stats.h"
#include "core/stats_hook.h"
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "../core/histogram.h"
#include "../core/util.h"
#include "../pg/pg_internal.h"
#include "pgqueue_hook.h"
#include "pgqueue_internal.h"

enum { J_PREFETCHED = 1, J_RUNNING, J_TIMEDOUT, J_LOST, J_RELEASED };
enum { OP_DONE = 0, OP_RETRY, OP_DEAD, OP_BACK, OP_RELEASE };
static const char *const OP_NAME[] = {"done", "retry", "dead", "back", "release"};

struct keel_pgqueue_job {
  keel_pgqueue *q;
  keel_pgqueue_job *prev, *next;
  int64_t id;
  unsigned attempt, max_attempts;
  int priority;
  int state;
  char *kind;
  char *payload;
  uint64_t timeout_ms;
  bool has_backoff;
  keel_backoff backoff;
  double pickup_ms;
  uint64_t fetched_at, started_at, lease_deadline, timeout_at;
  uint64_t hb_gen;
  bool lost_pending;
  uint64_t tr_notify, tr_sent, tr_fetched; /* keel__pgq_job_trace() */
};

typedef struct fin_entry {
  int64_t id;
  unsigned attempt;
  int op;
  uint64_t delay_ms;
  char *err;
  bool resent;
} fin_entry;

typedef struct fin_list {
  fin_entry *v;
  size_t n, cap;
} fin_list;

typedef struct jlist {
  keel_pgqueue_job *head, *tail;
  size_t n;
} jlist;

typedef struct job_copy {
  char *queue, *kind, *payload, *ukey;
  int priority;
  int64_t delay_ms;
  int max_attempts;
  uint64_t timeout_ms;
  bool has_backoff;
  keel_backoff backoff;
} job_copy;

typedef struct enq_req {
  keel_pgqueue *q;
  struct enq_req *next;
  keel_pg *conn; /* NULL: q's own B */
  keel_pgqueue_enqueue_cb cb;
  void *data;
  size_t n;
  job_copy *jobs;
  keel_pgqueue_enqueued *out;
  size_t *missing;
  size_t nmissing;
  int rounds;
} enq_req;

typedef struct id_req {
  keel_pgqueue *q;
  keel_pgqueue_id_cb cb;
  void *data;
  int64_t id;
} id_req;

struct keel_pgqueue {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  keel_pgqueue_opts o;
  char *conninfo, *schema, *queue, *channel;
  char owner[128];
  keel__pgq_sql sql;
  long long rescue_key;
  keel_pg *ca, *cb; /* cb == ca for enqueue-only objects */
  uv_idle_t kick;
  uv_timer_t t_flush, t_hb, t_poll, t_rescue, t_stats, t_sweep, t_migrate;
  int handles_open;
  int conns_open;
  bool ready, migrating, listening;
  bool more;
  uint64_t wake_seq, fetch_wake; /* wake-ups seen; wake_seq when the fetch in flight was sent */
  bool fetch_inflight, fin_inflight, hb_inflight, rescue_inflight, stats_inflight;
  bool flush_due;
  /* A completion batch rolled back by a transient error waits
   * fin_retry_ms (doubling, at most 1 s) before it goes again. */
  bool fin_paused;
  unsigned fin_retry_ms;
  bool paused, closing, close_flushed;
  bool in_close_step;
  bool close_step_ran; /* close_step2 waits for the deferred close_step */
  unsigned concurrency;
  uint64_t fetch_sent_at;
  unsigned fetch_limit;
  uint64_t tr_notify, tr_fetch_notify, tr_fetch_sent; /* wall clock, ns (keel__pgq_job_trace) */
  uint64_t hb_gen, hb_sent_at;
  jlist pre, run, gone; /* gone: timed out / lost / released handles still held by the user */
  fin_list fin, fin_flight;
  enq_req *waiting_head, *waiting_tail; /* enqueues before the schema is ready */
  size_t ext_pending;                   /* requests on callers' connections */
  keel_close_cb close_cb;
  void *close_data;
  keel_rng rng;
  keel_pgqueue_stats st;
  keel__histogram h_fetch, h_pickup, h_run;
  char err[KEEL__ERRBUF_SIZE];
};

/* ---- small things --------------------------------------------------------- */

static void jl_push(jlist *l, keel_pgqueue_job *j) {
  j->prev = l->tail;
  j->next = NULL;
  if (l->tail)
    l->tail->next = j;
  else
    l->head = j;
  l->tail = j;
  l->n++;
}

static void jl_remove(jlist *l, keel_pgqueue_job *j) {
  if (j->prev)
    j->prev->next = j->next;
  else
    l->head = j->next;
  if (j->next)
    j->next->prev = j->prev;
  else
    l->tail = j->prev;
  j->prev = j->next = NULL;
  l->n--;
}

static jlist *list_of(keel_pgqueue *q, keel_pgqueue_job *j) {
  if (j->state == J_PREFETCHED) return &q->pre;
  if (j->state == J_RUNNING) return &q->run;
  return &q->gone;
}

static void job_free(keel_pgqueue_job *j) {
  keel__free(j);
}

static int fin_push(fin_list *l, int64_t id, unsigned attempt, int op, uint64_t delay,
                    const char *err) {
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    fin_entry *v = keel__realloc(l->v, cap * sizeof *v);
    if (v == NULL) return UV_ENOMEM;
    l->v = v;
    l->cap = cap;
  }
  char *e = NULL;
  if (err != NULL) {
    e = keel__strdup(err);
    if (e == NULL) return UV_ENOMEM;
  }
  l->v[l->n++] = (fin_entry){id, attempt, op, delay, e, false};
  return 0;
}

static void fin_clear(fin_list *l) {
  for (size_t i = 0; i < l->n; i++) keel__free(l->v[i].err);
  l->n = 0;
}

static uint64_t now_ms(keel_pgqueue *q) {
  return uv_now(q->loop);
}

static void on_kick(uv_idle_t *h);

static void kick(keel_pgqueue *q) {
  if (q->closing) return;
  (void)uv_idle_start(&q->kick, on_kick);
}

/* There may be jobs to fetch (a NOTIFY, the poll, a reconnect, resume): a
 * fetch already in flight may have run before them, so its empty answer
 * does not clear this (wake_seq moved on). */
/* Wall-clock ns for keel__pgq_job_trace() (one clock read per NOTIFY and
 * per fetch: the bench compares them with other processes' clocks). */
static uint64_t trace_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void keel__pgq_job_trace(const keel_pgqueue_job *job, uint64_t *notify_ns, uint64_t *sent_ns,
                         uint64_t *fetched_ns) {
  *notify_ns = job->tr_notify;
  *sent_ns = job->tr_sent;
  *fetched_ns = job->tr_fetched;
}

static void wake(keel_pgqueue *q) {
  q->more = true;
  q->wake_seq++;
  kick(q);
}

static int default_classify(int status, void *data) {
  (void)data;
  return !(status == UV_EINVAL || status == UV_ECANCELED || status == KEEL_EABORTED);
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

static bool contains(const int64_t *v, size_t n, int64_t id) {
  return n > 0 && bsearch(&id, v, n, sizeof *v, cmp_i64) != NULL;
}

/* ids of column 0 of res, sorted; caller frees. */
static int64_t *ids_of(const keel_pg_result *res, size_t *n) {
  int rows = keel_pg_result_nrows(res);
  *n = 0;
  if (rows <= 0) return NULL;
  int64_t *v = keel__malloc((size_t)rows * sizeof *v);
  if (v == NULL) return NULL;
  for (int i = 0; i < rows; i++) {
    const char *s = keel_pg_result_value(res, i, 0);
    v[i] = s ? strtoll(s, NULL, 10) : 0;
  }
  qsort(v, (size_t)rows, sizeof *v, cmp_i64);
  *n = (size_t)rows;
  return v;
}

static void set_pg_error(keel_pgqueue *q, const char *what, keel_pg *c, const keel_pg_result *res,
                         int status) {
  const char *msg = res ? keel_pg_result_error(res) : NULL;
  const char *state = res ? keel_pg_result_sqlstate(res) : NULL;
  if (msg == NULL && c != NULL) msg = keel_pg_last_error(c);
  keel__fail(q->err, status, "%s: %s%s%s: %s", what, keel_err_name(status),
             state ? " SQLSTATE " : "", state ? state : "", msg ? msg : "");
}

static void lat(const keel__histogram *h, keel_pgqueue_latency *out) {
  out->mean_ms = h->count ? (double)h->sum_ns / (double)h->count / 1e6 : 0;
  out->p50_ms = keel__histogram_quantile(h, 0.5) / 1e6;
  out->p99_ms = keel__histogram_quantile(h, 0.99) / 1e6;
  out->max_ms = (double)h->max_ns / 1e6;
}

static void lease_lost(keel_pgqueue *q, keel_pgqueue_job *j, int64_t id, unsigned attempt) {
  q->st.lease_lost++;
  if (q->o.on_lease_lost) q->o.on_lease_lost(q, j, id, attempt, q->o.data);
}

/* Moves a running job to the lost state; its callback runs in notify_lost(),
 * after the walk that found it (the callback may end other jobs). */
static void mark_lost(keel_pgqueue *q, jlist *from, keel_pgqueue_job *j) {
  jl_remove(from, j);
  j->state = J_LOST;
  j->lost_pending = true;
  jl_push(&q->gone, j);
}

static void notify_lost(keel_pgqueue *q) {
again:
  for (keel_pgqueue_job *j = q->gone.head; j != NULL && !q->closing; j = j->next)
    if (j->lost_pending) {
      j->lost_pending = false;
      lease_lost(q, j, j->id, j->attempt);
      goto again;
    }
}

/* ---- array parameters ----------------------------------------------------- */

typedef struct arr {
  keel__pgq_buf b;
  bool first;
} arr;

static void arr_open(arr *a) {
  memset(a, 0, sizeof *a);
  keel__pgq_buf_put(&a->b, "{", 1);
  a->first = true;
}
static void arr_sep(arr *a) {
  if (!a->first) keel__pgq_buf_put(&a->b, ",", 1);
  a->first = false;
}
static void arr_text(arr *a, const char *s) {
  arr_sep(a);
  keel__pgq_buf_elem(&a->b, s);
}
static void arr_i64(arr *a, int64_t v) {
  arr_sep(a);
  keel__pgq_buf_fmt(&a->b, "%" PRId64, v);
}
static void arr_null(arr *a) {
  arr_sep(a);
  keel__pgq_buf_str(&a->b, "NULL");
}
static void arr_f64(arr *a, double v) {
  arr_sep(a);
  keel__pgq_buf_fmt(&a->b, "%.17g", v);
}
static int arr_close(arr *a) {
  keel__pgq_buf_put(&a->b, "}", 1);
  return a->b.err;
}

/* ---- completions (connection B) -------------------------------------------- */

static void send_finish(keel_pgqueue *q);
static void close_step2(keel_pgqueue *q);
static void maybe_freed(keel_pgqueue *q);

static void on_flush_timer(uv_timer_t *t);

/* An error that rolled the statement back and may not happen again:
 * SQLSTATE class 40 (serialization failure, deadlock), 55P03 (lock not
 * available), 57014 (statement timeout), class 53 (insufficient
 * resources). */
static bool transient(const keel_pg_result *res) {
  const char *ss = res ? keel_pg_result_sqlstate(res) : NULL;
  if (ss == NULL) return false;
  return strncmp(ss, "40", 2) == 0 || strncmp(ss, "53", 2) == 0 || strcmp(ss, "55P03") == 0 ||
         strcmp(ss, "57014") == 0;
}

static void on_finish(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_pgqueue *q = data;
  q->fin_inflight = false;
  fin_list *fl = &q->fin_flight;
  if (status == 0) {
    size_t n;
    int64_t *ids = ids_of(res, &n);
    bool oom = ids == NULL && keel_pg_result_nrows(res) > 0; /* cannot check: count as written */
    q->st.flushes++;
    for (size_t i = 0; i < fl->n; i++) {
      fin_entry *e = &fl->v[i];
      bool hit = oom || contains(ids, n, e->id);
      if (hit) {
        switch (e->op) {
          case OP_DONE:
            q->st.completed++;
            break;
          case OP_RETRY:
            q->st.failed++, q->st.retried++;
            break;
          case OP_DEAD:
            q->st.failed++, q->st.dead_here++;
            break;
          case OP_BACK:
            q->st.given_back++;
            break;
          default:
            break;
        }
      } else if (!e->resent && e->op <= OP_DEAD) {
        q->st.fenced++;
        lease_lost(q, NULL, e->id, e->attempt);
      }
    }
    keel__free(ids);
    fin_clear(fl);
    q->fin_retry_ms = 0;
  } else if (!q->closing && ((status == KEEL_EPG && transient(res)) || status == KEEL_ECONN ||
                             status == KEEL_EINDOUBT || status == UV_ETIMEDOUT)) {
    /* Sent again. Fenced writes are safe to send again; a zero-row answer
     * to a resent one is then not counted as fenced (it may have applied
     * the first time). */
    for (size_t i = 0; i < fl->n; i++) {
      fin_entry *e = &fl->v[i];
      if (fin_push(&q->fin, e->id, e->attempt, e->op, e->delay_ms, e->err) == 0)
        q->fin.v[q->fin.n - 1].resent = status == KEEL_EINDOUBT || e->resent;
    }
    fin_clear(fl);
    set_pg_error(q, "completion batch", c, res, status);
    if (status == KEEL_EPG) {
      /* Rolled back (serialization failure, deadlock, a lock or statement
       * timeout): certainly not applied, and sent again after a pause
       * rather than dropped (the jobs would have run again at their lease's
       * end). */
      q->st.flush_retries++;
      q->fin_retry_ms = q->fin_retry_ms == 0     ? 10
                        : q->fin_retry_ms >= 500 ? 1000
                                                 : q->fin_retry_ms * 2;
      q->fin_paused = true;
      uv_timer_start(&q->t_flush, on_flush_timer, q->fin_retry_ms, 0);
      return;
    }
  } else {
    set_pg_error(q, "completion batch", c, res, status);
    fin_clear(fl); /* the leases expire and the rescue makes the jobs available */
  }
  if (q->closing) {
    close_step2(q);
    return;
  }
  kick(q);
}

static void send_finish(keel_pgqueue *q) {
  if (q->fin_inflight || q->fin.n == 0) return;
  arr ids, att, ops, del, errs, dids, datts;
  arr_open(&ids), arr_open(&att), arr_open(&ops), arr_open(&del), arr_open(&errs);
  arr_open(&dids), arr_open(&datts);
  for (size_t i = 0; i < q->fin.n; i++) {
    fin_entry *e = &q->fin.v[i];
    if (e->op == OP_DONE) {
      arr_i64(&dids, e->id);
      arr_i64(&datts, e->attempt);
      continue;
    }
    arr_i64(&ids, e->id);
    arr_i64(&att, e->attempt);
    arr_text(&ops, OP_NAME[e->op]);
    arr_i64(&del, (int64_t)e->delay_ms);
    arr_text(&errs, e->err);
  }
  int rc = arr_close(&ids) | arr_close(&att) | arr_close(&ops) | arr_close(&del) |
           arr_close(&errs) | arr_close(&dids) | arr_close(&datts);
  if (rc == 0) {
    const char *params[] = {q->owner, q->o.done_retention_ms > 0 ? "true" : "false",
                            ids.b.p,  att.b.p,
                            ops.b.p,  del.b.p,
                            errs.b.p, dids.b.p,
                            datts.b.p};
    rc = keel__pg_query_cached_within(q->cb, q->sql.finish, 9, params, on_finish, q,
                                      q->o.lease_ms); /* see the heartbeat's */
  }
  keel__pgq_buf_free(&ids.b), keel__pgq_buf_free(&att.b), keel__pgq_buf_free(&ops.b);
  keel__pgq_buf_free(&del.b), keel__pgq_buf_free(&errs.b);
  keel__pgq_buf_free(&dids.b), keel__pgq_buf_free(&datts.b);
  if (rc != 0) {
    keel__fail(q->err, rc, "completion batch not sent: %s", keel_err_name(rc));
    return; /* stays pending; retried at the next kick */
  }
  /* swap */
  fin_list t = q->fin_flight;
  q->fin_flight = q->fin;
  q->fin = t;
  q->fin_inflight = true;
  q->flush_due = false;
  uv_timer_stop(&q->t_flush);
}

/* ---- fetch (connection A) ---------------------------------------------------- */

/* Keeps the fetched jobs in priority order (higher first, stable). */
static void pre_insert(keel_pgqueue *q, keel_pgqueue_job *j) {
  keel_pgqueue_job *after = q->pre.tail;
  while (after != NULL && after->priority < j->priority) after = after->prev;
  if (after == q->pre.tail) {
    jl_push(&q->pre, j);
    return;
  }
  j->prev = after;
  j->next = after ? after->next : q->pre.head;
  if (after)
    after->next = j;
  else
    q->pre.head = j;
  j->next->prev = j;
  q->pre.n++;
}

static void on_fetch(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_pgqueue *q = data;
  q->fetch_inflight = false;
  if (q->closing) {
    if (status == 0)
      for (int i = 0; i < keel_pg_result_nrows(res); i++)
        (void)fin_push(&q->fin, strtoll(keel_pg_result_value(res, i, 0), NULL, 10),
                       (unsigned)strtoul(keel_pg_result_value(res, i, 1), NULL, 10), OP_BACK, 0,
                       NULL);
    close_step2(q);
    return;
  }
  uint64_t now = now_ms(q), tr_now = trace_ns();
  keel__histogram_record(&q->h_fetch, (now - q->fetch_sent_at) * 1000000u);
  if (status != 0) {
    set_pg_error(q, "fetch", c, res, status);
    return; /* poll timer or reconnect tries again; fetched rows (if any) are rescued */
  }
  q->st.fetches++;
  int rows = keel_pg_result_nrows(res);
  /* Fewer rows than asked: drained as of this fetch's snapshot, unless a
   * wake-up arrived after it was sent (then fetch again at once). */
  if ((unsigned)rows < q->fetch_limit && q->wake_seq == q->fetch_wake) q->more = false;
  for (int i = 0; i < rows; i++) {
    const char *kind = keel_pg_result_value(res, i, 4);
    const char *payload = keel_pg_result_value(res, i, 5);
    size_t kl = kind ? strlen(kind) : 0, pl = payload ? strlen(payload) : 0;
    keel_pgqueue_job *j = keel__calloc(1, sizeof *j + kl + pl + 2);
    if (j == NULL) {
      /* cannot hold it: give it back */
      int64_t id = strtoll(keel_pg_result_value(res, i, 0), NULL, 10);
      unsigned att = (unsigned)strtoul(keel_pg_result_value(res, i, 1), NULL, 10);
      (void)fin_push(&q->fin, id, att, OP_BACK, 0, NULL);
      continue;
    }
    j->q = q;
    j->kind = (char *)(j + 1);
    j->payload = j->kind + kl + 1;
    if (kl) memcpy(j->kind, kind, kl);
    if (pl) memcpy(j->payload, payload, pl);
    j->id = strtoll(keel_pg_result_value(res, i, 0), NULL, 10);
    j->attempt = (unsigned)strtoul(keel_pg_result_value(res, i, 1), NULL, 10);
    j->max_attempts = (unsigned)strtoul(keel_pg_result_value(res, i, 2), NULL, 10);
    j->priority = (int)strtol(keel_pg_result_value(res, i, 3), NULL, 10);
    const char *t = keel_pg_result_value(res, i, 6);
    j->timeout_ms = t ? strtoull(t, NULL, 10) : q->o.timeout_ms;
    if (!keel_pg_result_is_null(res, i, 7)) {
      j->has_backoff = true;
      j->backoff.kind = (keel_backoff_kind)strtol(keel_pg_result_value(res, i, 7), NULL, 10);
      j->backoff.base_ms = strtoull(keel_pg_result_value(res, i, 8), NULL, 10);
      j->backoff.factor = strtod(keel_pg_result_value(res, i, 9), NULL);
      j->backoff.max_ms = strtoull(keel_pg_result_value(res, i, 10), NULL, 10);
    }
    const char *pk = keel_pg_result_value(res, i, 11);
    j->pickup_ms = pk ? strtod(pk, NULL) : 0;
    j->state = J_PREFETCHED;
    j->fetched_at = now;
    j->tr_notify = q->tr_fetch_notify;
    j->tr_sent = q->tr_fetch_sent;
    j->tr_fetched = tr_now;
    j->lease_deadline = q->fetch_sent_at + q->o.lease_ms;
    pre_insert(q, j);
    q->st.fetched++;
  }
  kick(q);
}

static void send_fetch(keel_pgqueue *q, unsigned limit) {
  char lim[16], lease[24];
  snprintf(lim, sizeof lim, "%u", limit);
  snprintf(lease, sizeof lease, "%" PRIu32, q->o.lease_ms);
  const char *params[] = {q->owner, q->queue, lim, lease};
  int rc = keel_pg_query_cached(q->ca, q->sql.fetch, 4, params, on_fetch, q);
  if (rc != 0) {
    keel__fail(q->err, rc, "fetch not sent: %s", keel_err_name(rc));
    return;
  }
  q->fetch_inflight = true;
  q->fetch_wake = q->wake_seq;
  q->fetch_sent_at = now_ms(q);
  q->fetch_limit = limit;
  q->tr_fetch_sent = trace_ns();
  q->tr_fetch_notify = q->tr_notify;
}

/* ---- the kick: dispatch, flush, fetch --------------------------------------------- */

static void dispatch(keel_pgqueue *q) {
  while (!q->closing && !q->paused && q->run.n < q->concurrency && q->pre.head != NULL) {
    keel_pgqueue_job *j = q->pre.head;
    jl_remove(&q->pre, j);
    j->state = J_RUNNING;
    j->started_at = now_ms(q);
    j->timeout_at = j->timeout_ms ? j->started_at + j->timeout_ms : 0;
    jl_push(&q->run, j);
    keel__histogram_record(&q->h_pickup, (uint64_t)(j->pickup_ms > 0 ? j->pickup_ms * 1e6 : 0));
    q->o.process(q, j, q->o.data);
  }
}

static void on_kick(uv_idle_t *h) {
  keel_pgqueue *q = h->data;
  uv_idle_stop(&q->kick);
  if (q->closing) return;
  if (q->o.process != NULL) dispatch(q);
  if (q->closing) return;
  if (q->fin.n > 0 && !q->fin_inflight && !q->fin_paused) {
    if (q->fin.n >= q->o.flush_jobs || q->o.flush_ms == 0 || q->flush_due)
      send_finish(q);
    else if (!uv_is_active((uv_handle_t *)&q->t_flush))
      uv_timer_start(&q->t_flush, on_flush_timer, q->o.flush_ms, 0);
  }
  if (q->o.process == NULL || !q->ready || q->fetch_inflight || q->paused || !q->more) return;
  if (!keel_pg_is_connected(q->ca)) return;
  size_t cap = (size_t)q->concurrency + q->o.prefetch;
  size_t held = q->pre.n + q->run.n;
  if (held >= cap) return;
  size_t free_ = cap - held;
  if (free_ * 2 >= cap || (q->pre.n == 0 && q->run.n < q->concurrency))
    send_fetch(q, (unsigned)free_);
}

static void on_flush_timer(uv_timer_t *t) {
  keel_pgqueue *q = t->data;
  q->fin_paused = false;
  q->flush_due = true;
  kick(q);
}

/* ---- heartbeat, sweep, rescue, stats, poll ------------------------------------------- */

static void on_heartbeat(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_pgqueue *q = data;
  q->hb_inflight = false;
  if (q->closing) return;
  if (status != 0) {
    set_pg_error(q, "heartbeat", c, res, status);
    return;
  }
  q->st.heartbeats++;
  size_t n;
  int64_t *ids = ids_of(res, &n);
  if (ids == NULL && n == 0 && keel_pg_result_nrows(res) > 0) return; /* no memory: next time */
  jlist *lists[] = {&q->pre, &q->run};
  for (int l = 0; l < 2; l++) {
    keel_pgqueue_job *j = lists[l]->head;
    while (j != NULL) {
      keel_pgqueue_job *next = j->next;
      if (j->hb_gen == q->hb_gen) {
        if (contains(ids, n, j->id)) {
          j->lease_deadline = q->hb_sent_at + q->o.lease_ms;
        } else {
          if (j->state == J_PREFETCHED) {
            jl_remove(lists[l], j);
            q->st.lease_lost++;
            job_free(j);
          } else {
            mark_lost(q, lists[l], j);
          }
        }
      }
      j = next;
    }
  }
  keel__free(ids);
  notify_lost(q);
  kick(q);
}

static void on_hb_timer(uv_timer_t *t) {
  keel_pgqueue *q = t->data;
  if (q->hb_inflight || (q->pre.n + q->run.n) == 0 || !keel_pg_is_connected(q->ca)) return;
  arr ids, att;
  arr_open(&ids), arr_open(&att);
  q->hb_gen++;
  jlist *lists[] = {&q->pre, &q->run};
  for (int l = 0; l < 2; l++)
    for (keel_pgqueue_job *j = lists[l]->head; j; j = j->next) {
      j->hb_gen = q->hb_gen;
      arr_i64(&ids, j->id);
      arr_i64(&att, j->attempt);
    }
  int rc = arr_close(&ids) | arr_close(&att);
  if (rc == 0) {
    char lease[24];
    snprintf(lease, sizeof lease, "%" PRIu32, q->o.lease_ms);
    const char *params[] = {q->owner, lease, ids.b.p, att.b.p};
    /* Unanswered within half a lease, the session is reset: a server that
     * stopped answering with its socket up would otherwise park this worker
     * for as long as it lasts (its jobs rescued elsewhere). */
    rc = keel__pg_query_cached_within(q->ca, q->sql.heartbeat, 4, params, on_heartbeat, q,
                                      q->o.lease_ms / 2);
  }
  keel__pgq_buf_free(&ids.b), keel__pgq_buf_free(&att.b);
  if (rc == 0) {
    q->hb_inflight = true;
    q->hb_sent_at = now_ms(q);
  }
}

static void fail_job(keel_pgqueue *q, keel_pgqueue_job *j, int status, const char *msg) {
  int op;
  uint64_t delay = 0;
  keel_pgqueue_classify_fn cl = q->o.classify ? q->o.classify : default_classify;
  if (cl(status, q->o.data) && j->attempt < j->max_attempts) {
    op = OP_RETRY;
    delay = keel_backoff_delay(j->has_backoff ? &j->backoff : &q->o.retry_backoff, j->attempt, 0,
                               &q->rng);
  } else {
    op = OP_DEAD;
  }
  char buf[300];
  if (msg == NULL) {
    snprintf(buf, sizeof buf, "%s: %s", keel_err_name(status), keel_strerror(status));
    msg = buf;
  }
  if (fin_push(&q->fin, j->id, j->attempt, op, delay, msg) != 0)
    keel__fail(q->err, UV_ENOMEM, "no memory to record a failure of job %" PRId64, j->id);
}

static void on_sweep(uv_timer_t *t) {
  keel_pgqueue *q = t->data;
  uint64_t now = now_ms(q);
  bool any = false;
  /* timeouts and local lease expiry of running jobs */
  keel_pgqueue_job *j = q->run.head;
  while (j != NULL) {
    keel_pgqueue_job *next = j->next;
    if (j->lease_deadline <= now) {
      mark_lost(q, &q->run, j);
      any = true;
    } else if (j->timeout_at != 0 && j->timeout_at <= now) {
      jl_remove(&q->run, j);
      j->state = J_TIMEDOUT;
      jl_push(&q->gone, j);
      q->st.timed_out++;
      fail_job(q, j, UV_ETIMEDOUT, "UV_ETIMEDOUT: the attempt timed out");
      any = true;
    }
    j = next;
  }
  /* fetched jobs that wait too long go back */
  j = q->pre.head;
  while (j != NULL) {
    keel_pgqueue_job *next = j->next;
    if (j->lease_deadline <= now) {
      jl_remove(&q->pre, j);
      q->st.lease_lost++;
      job_free(j);
      any = true;
    } else if (j->fetched_at + q->o.lease_ms / 2 <= now) {
      jl_remove(&q->pre, j);
      if (fin_push(&q->fin, j->id, j->attempt, OP_BACK, 0, NULL) != 0) q->st.lease_lost++;
      job_free(j);
      any = true;
    }
    j = next;
  }
  if (any) {
    notify_lost(q);
    kick(q);
  }
}

static void on_rescue(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_pgqueue *q = data;
  q->rescue_inflight = false;
  if (status != 0) {
    if (!q->closing) set_pg_error(q, "rescue", c, res, status);
    return;
  }
  const char *n = keel_pg_result_value(res, 0, 1);
  if (n) q->st.rescued += strtoull(n, NULL, 10);
}

static void on_rescue_timer(uv_timer_t *t) {
  keel_pgqueue *q = t->data;
  if (q->rescue_inflight || !q->ready || !keel_pg_is_connected(q->ca)) return;
  char key[24], dead[24], done[24];
  snprintf(key, sizeof key, "%lld", q->rescue_key);
  snprintf(dead, sizeof dead, "%" PRIu64, q->o.dead_retention_ms);
  snprintf(done, sizeof done, "%" PRIu64, q->o.done_retention_ms);
  const char *params[] = {key, dead, done};
  if (keel_pg_query_cached(q->ca, q->sql.rescue, 3, params, on_rescue, q) == 0)
    q->rescue_inflight = true;
}

static void on_stats(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_pgqueue *q = data;
  q->stats_inflight = false;
  if (status != 0) {
    if (!q->closing) set_pg_error(q, "stats", c, res, status);
    return;
  }
  const char *v;
#define U(i, f) \
  if ((v = keel_pg_result_value(res, 0, i)) != NULL) q->st.f = strtoull(v, NULL, 10)
  U(0, available);
  U(1, scheduled);
  U(2, running);
  U(3, dead);
  U(5, dead_tuples);
  U(6, live_tuples);
#undef U
  if ((v = keel_pg_result_value(res, 0, 4)) != NULL) q->st.oldest_available_ms = strtod(v, NULL);
}

static void on_stats_timer(uv_timer_t *t) {
  keel_pgqueue *q = t->data;
  if (q->stats_inflight || !q->ready || !keel_pg_is_connected(q->ca)) return;
  const char *params[] = {q->queue};
  if (keel_pg_query_cached(q->ca, q->sql.stats, 1, params, on_stats, q) == 0)
    q->stats_inflight = true;
}

static void on_poll(uv_timer_t *t) {
  keel_pgqueue *q = t->data;
  wake(q);
}

/* ---- connection events, LISTEN, migration -------------------------------------------- */

static void on_listen(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_pgqueue *q = data;
  if (status != 0 && !q->closing) set_pg_error(q, "LISTEN", c, res, status);
}

static void do_listen(keel_pgqueue *q) {
  keel__pgq_buf b = {0};
  keel__pgq_buf_str(&b, "LISTEN \"");
  keel__pgq_buf_str(&b, q->channel);
  keel__pgq_buf_str(&b, "\"");
  if (b.err == 0) (void)keel_pg_query(q->ca, b.p, 0, NULL, on_listen, q);
  keel__pgq_buf_free(&b);
}

static void issue_enqueue(enq_req *r);
static void finish_enqueue(enq_req *r, int status);
static void on_migrate_timer(uv_timer_t *t);

static void on_migrate(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_pgqueue *q = data;
  q->migrating = false;
  if (q->closing) return;
  if (status != 0) {
    set_pg_error(q, "schema migration", c, res, status);
    /* fail the enqueues that waited for it; try again after poll_ms */
    while (q->waiting_head) {
      enq_req *r = q->waiting_head;
      q->waiting_head = r->next;
      finish_enqueue(r, status);
    }
    q->waiting_tail = NULL;
    if (q->o.on_ready) q->o.on_ready(q, status, q->o.data);
    if (!q->closing) uv_timer_start(&q->t_migrate, on_migrate_timer, q->o.poll_ms, 0);
    return;
  }
  q->ready = true;
  while (q->waiting_head) {
    enq_req *r = q->waiting_head;
    q->waiting_head = r->next;
    issue_enqueue(r);
  }
  q->waiting_tail = NULL;
  if (q->o.on_ready) q->o.on_ready(q, 0, q->o.data);
  wake(q);
}

static void on_migrate_timer(uv_timer_t *t);

static void start_migrate(keel_pgqueue *q) {
  if (q->migrating || q->ready || q->closing) return;
  if (keel_pg_query(q->ca, q->sql.migrate, 0, NULL, on_migrate, q) == 0)
    q->migrating = true;
  else
    uv_timer_start(&q->t_migrate, on_migrate_timer, q->o.poll_ms, 0);
}

static void on_migrate_timer(uv_timer_t *t) {
  start_migrate(t->data);
}

static void on_state_a(keel_pg *c, bool up, int status, void *data) {
  (void)c;
  (void)status;
  keel_pgqueue *q = data;
  if (q->closing) return;
  q->st.connected = up;
  if (!up) return;
  if (!q->ready && !q->o.migrate) {
    q->ready = true;
    while (q->waiting_head) {
      enq_req *r = q->waiting_head;
      q->waiting_head = r->next;
      issue_enqueue(r);
    }
    q->waiting_tail = NULL;
    if (q->o.on_ready) q->o.on_ready(q, 0, q->o.data);
    if (q->closing) return;
  }
  if (q->o.process != NULL) do_listen(q);
  wake(q); /* a gap: notifications may have been missed */
}

static void on_state_b(keel_pg *c, bool up, int status, void *data) {
  (void)c;
  (void)status;
  keel_pgqueue *q = data;
  if (up) kick(q);
}

static void on_notify(keel_pg *c, const char *channel, const char *payload, int pid, void *data) {
  (void)c;
  (void)payload;
  (void)pid;
  keel_pgqueue *q = data;
  if (strcmp(channel, q->channel) == 0) {
    q->tr_notify = trace_ns();
    wake(q);
  }
}

/* ---- new ---------------------------------------------------------------------------------- */

void keel_pgqueue_opts_init(keel_pgqueue_opts *o) {
  if (o == NULL) return;
  memset(o, 0, sizeof *o);
  o->concurrency = 1;
  o->prefetch = KEEL_PGQUEUE_DEFAULT_PREFETCH;
  o->lease_ms = KEEL_PGQUEUE_DEFAULT_LEASE_MS;
  o->poll_ms = KEEL_PGQUEUE_DEFAULT_POLL_MS;
  o->flush_jobs = KEEL_PGQUEUE_DEFAULT_FLUSH_JOBS;
  o->flush_ms = KEEL_PGQUEUE_DEFAULT_FLUSH_MS;
  o->max_attempts = 25;
  keel_backoff_exponential(&o->retry_backoff, 1000, 2.0, 3600000);
  o->dead_retention_ms = 7ull * 24 * 3600 * 1000;
  o->stats_ms = 5000;
  o->max_pending = KEEL_PGQUEUE_DEFAULT_MAX_PENDING;
  o->migrate = true;
}

void keel_pgqueue_job_opts_init(keel_pgqueue_job_opts *o) {
  if (o != NULL) memset(o, 0, sizeof *o);
}

static uint64_t fnv(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

static void q_free(keel_pgqueue *q) {
  keel__pgq_sql_free(&q->sql);
  keel__free(q->conninfo);
  keel__free(q->schema);
  keel__free(q->queue);
  keel__free(q->channel);
  fin_clear(&q->fin);
  fin_clear(&q->fin_flight);
  keel__free(q->fin.v);
  keel__free(q->fin_flight.v);
  jlist *lists[] = {&q->pre, &q->run, &q->gone};
  for (int l = 0; l < 3; l++)
    while (lists[l]->head) {
      keel_pgqueue_job *j = lists[l]->head;
      jl_remove(lists[l], j);
      job_free(j);
    }
  keel__free(q);
}

static void on_handle_closed(uv_handle_t *h);

int keel_pgqueue_new_ex(uv_loop_t *loop, const keel_pgqueue_opts *opts, keel_pgqueue **out,
                        char *why, size_t why_cap) {
  keel__why(why, why_cap, 0, "");
  if (loop == NULL || opts == NULL || out == NULL)
    return keel__why(why, why_cap, UV_EINVAL, "loop, opts and out are required");
  if (opts->conninfo == NULL || opts->conninfo[0] == '\0')
    return keel__why(why, why_cap, UV_EINVAL, "conninfo is required");
  const char *schema = opts->schema ? opts->schema : "keel";
  const char *queue = opts->queue ? opts->queue : "default";
  if (keel__pgq_valid_schema(schema) != 0)
    return keel__why(why, why_cap, UV_EINVAL, "schema must match [a-z_][a-z0-9_]{0,39}");
  if (keel__pgq_valid_queue(queue) != 0)
    return keel__why(why, why_cap, UV_EINVAL, "queue must match [A-Za-z0-9_.:-]{1,48}");
  if (opts->concurrency == 0) return keel__why(why, why_cap, UV_EINVAL, "concurrency must be >= 1");
  if (opts->lease_ms < 200) return keel__why(why, why_cap, UV_EINVAL, "lease_ms must be >= 200");
  if (opts->heartbeat_ms != 0 && opts->heartbeat_ms >= opts->lease_ms)
    return keel__why(why, why_cap, UV_EINVAL, "heartbeat_ms must be < lease_ms");
  if (opts->max_attempts == 0)
    return keel__why(why, why_cap, UV_EINVAL, "max_attempts must be >= 1");
  const char *bw = NULL;
  if (keel_backoff_validate(&opts->retry_backoff, &bw) != 0)
    return keel__why(why, why_cap, UV_EINVAL, bw ? bw : "bad retry_backoff");

  keel_pgqueue *q = keel__calloc(1, sizeof *q);
  if (q == NULL) return keel__why(why, why_cap, UV_ENOMEM, "out of memory");
  q->loop = loop;
  q->o = *opts;
  if (q->o.heartbeat_ms == 0) q->o.heartbeat_ms = q->o.lease_ms / 3;
  if (q->o.rescue_ms == 0) q->o.rescue_ms = q->o.lease_ms / 2;
  if (q->o.poll_ms == 0) q->o.poll_ms = KEEL_PGQUEUE_DEFAULT_POLL_MS;
  if (q->o.flush_jobs == 0) q->o.flush_jobs = 1;
  if (q->o.max_pending == 0) q->o.max_pending = KEEL_PGQUEUE_DEFAULT_MAX_PENDING;
  q->concurrency = opts->concurrency;
  q->conninfo = keel__strdup(opts->conninfo);
  q->schema = keel__strdup(schema);
  q->queue = keel__strdup(queue);
  q->channel = keel__malloc(strlen(queue) + 10);
  uint64_t h = fnv(schema);
  q->rescue_key = (long long)(0x6b65656c70677172ull ^ h); /* "keelpgqr" */
  if (q->conninfo == NULL || q->schema == NULL || q->queue == NULL || q->channel == NULL ||
      keel__pgq_sql_init(&q->sql, schema, (long long)(0x6b65656c7067716dull ^ h)) != 0) {
    q_free(q);
    return keel__why(why, why_cap, UV_ENOMEM, "out of memory");
  }
  snprintf(q->channel, strlen(queue) + 10, "keel_pgq:%s", queue);
  char host[64] = "host";
  size_t hl = sizeof host;
  (void)uv_os_gethostname(host, &hl);
  keel_rng_seed(&q->rng, uv_hrtime() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)q);
  snprintf(q->owner, sizeof q->owner, "%.60s:%d:%016" PRIx64, host, (int)getpid(),
           keel_rng_next(&q->rng));

  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = q->conninfo;
  po.max_pending = q->o.max_pending;
  po.on_state = on_state_a;
  po.on_notify = on_notify;
  po.data = q;
  int rc = keel_pg_new(loop, &po, &q->ca);
  if (rc == 0 && q->o.process != NULL) {
    po.on_state = on_state_b;
    po.on_notify = NULL;
    rc = keel_pg_new(loop, &po, &q->cb);
    if (rc != 0) {
      keel_pg_close(q->ca, NULL, NULL);
      q->ca = NULL;
    }
  } else {
    q->cb = q->ca;
  }
  if (rc != 0) {
    q_free(q);
    return keel__why(
        why, why_cap, rc,
        rc == UV_ENOMEM ? "out of memory" : "could not create the connection (bad conninfo?)");
  }
  uv_idle_init(loop, &q->kick);
  q->kick.data = q;
  uv_timer_t *timers[] = {&q->t_flush, &q->t_hb,    &q->t_poll,   &q->t_rescue,
                          &q->t_stats, &q->t_sweep, &q->t_migrate};
  for (size_t i = 0; i < KEEL__ARRAY_SIZE(timers); i++) {
    uv_timer_init(loop, timers[i]);
    timers[i]->data = q;
  }
  q->handles_open = 1 + (int)KEEL__ARRAY_SIZE(timers);
  q->conns_open = q->cb != q->ca ? 2 : 1;
  if (q->o.migrate) start_migrate(q);
  if (q->o.process != NULL) {
    uv_timer_start(&q->t_hb, on_hb_timer, q->o.heartbeat_ms, q->o.heartbeat_ms);
    uv_timer_start(&q->t_poll, on_poll, q->o.poll_ms, q->o.poll_ms);
    if (q->o.rescue_ms != UINT32_MAX)
      uv_timer_start(&q->t_rescue, on_rescue_timer, q->o.rescue_ms, q->o.rescue_ms);
    uv_timer_start(&q->t_sweep, on_sweep, 20, 20);
  }
  if (q->o.stats_ms != 0) uv_timer_start(&q->t_stats, on_stats_timer, 0, q->o.stats_ms);
  *out = q;
  return 0;
}

int keel_pgqueue_new(uv_loop_t *loop, const keel_pgqueue_opts *opts, keel_pgqueue **out) {
  return keel_pgqueue_new_ex(loop, opts, out, NULL, 0);
}

/* ---- enqueue ---------------------------------------------------------------------------- */

static void enq_free(enq_req *r) {
  for (size_t i = 0; i < r->n; i++) {
    keel__free(r->jobs[i].queue);
    keel__free(r->jobs[i].kind);
    keel__free(r->jobs[i].payload);
    keel__free(r->jobs[i].ukey);
  }
  keel__free(r->jobs);
  keel__free(r->out);
  keel__free(r->missing);
  keel__free(r);
}

static void finish_enqueue(enq_req *r, int status) {
  keel_pgqueue *q = r->q;
  if (r->conn != NULL) q->ext_pending--;
  if (status == 0) q->st.enqueued += r->n; /* upper bound with duplicates; fixed below */
  if (status == 0)
    for (size_t i = 0; i < r->n; i++)
      if (r->out[i].existed) q->st.enqueued--;
  if (r->cb) r->cb(q, status, status == 0 ? r->out : NULL, status == 0 ? r->n : 0, r->data);
  enq_free(r);
  if (q->closing) {
    if (!q->close_flushed)
      close_step2(q);
    else
      maybe_freed(q);
  }
}

static void on_enqueue(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  enq_req *r = data;
  keel_pgqueue *q = r->q;
  if (status != 0) {
    const char *ss = keel_pg_result_sqlstate(res);
    set_pg_error(q, "enqueue", c, res, status);
    if (status == KEEL_EPG && ss && (strncmp(ss, "22", 2) == 0)) status = UV_EINVAL;
    finish_enqueue(r, status);
    return;
  }
  int rows = keel_pg_result_nrows(res);
  size_t idx_n = r->nmissing ? r->nmissing : r->n;
  if ((size_t)rows != idx_n) {
    keel__fail(q->err, KEEL_EPG, "enqueue: %d rows for %zu jobs", rows, idx_n);
    finish_enqueue(r, KEEL_EPG);
    return;
  }
  size_t still = 0;
  for (int i = 0; i < rows; i++) {
    size_t k = r->nmissing ? r->missing[i] : (size_t)i;
    const char *id = keel_pg_result_value(res, i, 1);
    const char *ex = keel_pg_result_value(res, i, 2);
    if (id == NULL) {
      r->missing[still++] = k; /* key taken by a transaction our snapshot does not see */
    } else {
      r->out[k].id = strtoll(id, NULL, 10);
      r->out[k].existed = ex != NULL && ex[0] == 't';
    }
  }
  if (still > 0 && r->rounds < 20) {
    r->nmissing = still;
    r->rounds++;
    issue_enqueue(r);
    return;
  }
  if (still > 0) {
    keel__fail(q->err, KEEL_EPG, "enqueue: the unique key of %zu jobs kept changing", still);
    finish_enqueue(r, KEEL_EPG);
    return;
  }
  finish_enqueue(r, 0);
}

/* Builds the twelve array parameters and sends the statement (all jobs, or
 * only the missing ones of a retry round). */
static int send_enqueue(enq_req *r) {
  keel_pgqueue *q = r->q;
  arr a[12];
  for (int i = 0; i < 12; i++) arr_open(&a[i]);
  size_t cnt = r->nmissing ? r->nmissing : r->n;
  for (size_t x = 0; x < cnt; x++) {
    job_copy *j = &r->jobs[r->nmissing ? r->missing[x] : x];
    arr_text(&a[0], j->queue);
    arr_text(&a[1], j->kind);
    arr_text(&a[2], j->payload);
    arr_i64(&a[3], j->priority);
    arr_i64(&a[4], j->delay_ms);
    arr_i64(&a[5], j->max_attempts);
    arr_text(&a[6], j->ukey);
    if (j->timeout_ms)
      arr_i64(&a[7], (int64_t)j->timeout_ms);
    else
      arr_null(&a[7]);
    if (j->has_backoff) {
      arr_i64(&a[8], (int64_t)j->backoff.kind);
      arr_i64(&a[9], (int64_t)j->backoff.base_ms);
      arr_f64(&a[10], j->backoff.factor);
      arr_i64(&a[11], (int64_t)j->backoff.max_ms);
    } else {
      arr_null(&a[8]), arr_null(&a[9]), arr_null(&a[10]), arr_null(&a[11]);
    }
  }
  int rc = 0;
  const char *params[13];
  for (int i = 0; i < 12; i++) {
    rc |= arr_close(&a[i]);
    params[i] = a[i].b.p;
  }
  /* On our own connection the statement is its own (durable) transaction:
   * the wake-up follows it as a separate, non-durable one (NOTIFY_LATER in
   * sql.c). In the caller's transaction the insert trigger notifies. */
  params[12] = r->conn ? "" : "later";
  if (rc != 0) {
    rc = keel__fail(q->err, UV_ENOMEM, "enqueue: out of memory");
  } else {
    keel_pg *c = r->conn ? r->conn : q->cb;
    rc = keel_pg_query_cached(c, q->sql.enqueue, 13, params, on_enqueue, r);
    if (rc != 0) keel__fail(q->err, rc, "enqueue not sent: %s", keel_pg_last_error(c));
    /* Not sent (no memory, queue full): workers find the jobs by their poll. */
    if (rc == 0 && r->conn == NULL)
      (void)keel_pg_query_cached(c, q->sql.notify_later, 1, params, NULL, NULL);
  }
  for (int i = 0; i < 12; i++) keel__pgq_buf_free(&a[i].b);
  return rc;
}

/* From a callback (never inside a call of the user): reports a refusal. */
static void issue_enqueue(enq_req *r) {
  int rc = send_enqueue(r);
  if (rc != 0) finish_enqueue(r, rc);
}

static int check_job(keel_pgqueue *q, const keel_pgqueue_job_opts *j, size_t i) {
  const char *queue = j->queue ? j->queue : q->queue;
  if (keel__pgq_valid_queue(queue) != 0)
    return keel__fail(q->err, UV_EINVAL, "job %zu: queue name must match [A-Za-z0-9_.:-]{1,48}", i);
  if (j->kind && strlen(j->kind) > KEEL_PGQUEUE_MAX_KIND)
    return keel__fail(q->err, UV_EINVAL, "job %zu: kind longer than %u bytes", i,
                      KEEL_PGQUEUE_MAX_KIND);
  if (j->unique_key && (strlen(j->unique_key) > KEEL_PGQUEUE_MAX_KEY || j->unique_key[0] == 0))
    return keel__fail(q->err, UV_EINVAL, "job %zu: unique_key empty or longer than %u bytes", i,
                      KEEL_PGQUEUE_MAX_KEY);
  if (j->delay_ms < 0) return keel__fail(q->err, UV_EINVAL, "job %zu: negative delay_ms", i);
  if (j->max_attempts < 0)
    return keel__fail(q->err, UV_EINVAL, "job %zu: negative max_attempts", i);
  if (j->timeout_ms > (uint64_t)INT64_MAX)
    return keel__fail(q->err, UV_EINVAL, "job %zu: timeout_ms too large", i);
  if (j->payload && !keel__pgq_valid_json(j->payload))
    return keel__fail(q->err, UV_EINVAL,
                      "job %zu: payload is not valid JSON (or nested more than 256 deep)", i);
  if (j->backoff) {
    const char *why = NULL;
    if (keel_backoff_validate(j->backoff, &why) != 0)
      return keel__fail(q->err, UV_EINVAL, "job %zu: backoff: %s", i, why ? why : "invalid");
    if (j->backoff->base_ms > (uint64_t)INT64_MAX || j->backoff->max_ms > (uint64_t)INT64_MAX)
      return keel__fail(q->err, UV_EINVAL, "job %zu: backoff too large", i);
  }
  return 0;
}

int keel_pgqueue_enqueue(keel_pgqueue *q, keel_pg *conn, const keel_pgqueue_job_opts *jobs,
                         size_t n, keel_pgqueue_enqueue_cb cb, void *data) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->err, KEEL_ECLOSING, "queue is closing");
  if (jobs == NULL || n == 0 || n > KEEL_PGQUEUE_MAX_BATCH)
    return keel__fail(q->err, UV_EINVAL, "jobs must be 1..%u job descriptions",
                      KEEL_PGQUEUE_MAX_BATCH);
  for (size_t i = 0; i < n; i++) {
    int rc = check_job(q, &jobs[i], i);
    if (rc != 0) return rc;
  }
  /* Held back until the schema is ready, an insert on the caller's
   * connection would be sent after whatever the caller queued next (its
   * COMMIT or ROLLBACK), outside its transaction, and on a connection that
   * may be closed or lent to someone else by then. */
  if (conn != NULL && !q->ready)
    return keel__fail(q->err, UV_EAGAIN,
                      "the queue's schema is not ready: enqueue on your connection after "
                      "on_ready reported 0 (or with conn NULL, which waits)");
  enq_req *r = keel__calloc(1, sizeof *r);
  if (r == NULL) return keel__fail(q->err, UV_ENOMEM, "out of memory");
  r->q = q;
  r->conn = conn;
  r->cb = cb;
  r->data = data;
  r->jobs = keel__calloc(n, sizeof *r->jobs);
  r->out = keel__calloc(n, sizeof *r->out);
  r->missing = keel__calloc(n, sizeof *r->missing);
  if (r->jobs == NULL || r->out == NULL || r->missing == NULL) {
    enq_free(r);
    return keel__fail(q->err, UV_ENOMEM, "out of memory");
  }
  r->n = n;
  for (size_t i = 0; i < n; i++) {
    const keel_pgqueue_job_opts *s = &jobs[i];
    job_copy *d = &r->jobs[i];
    d->queue = keel__strdup(s->queue ? s->queue : q->queue);
    d->kind = keel__strdup(s->kind ? s->kind : "");
    d->payload = keel__strdup(s->payload ? s->payload : "{}");
    d->ukey = s->unique_key ? keel__strdup(s->unique_key) : NULL;
    d->priority = s->priority;
    d->delay_ms = s->delay_ms;
    d->max_attempts = s->max_attempts ? s->max_attempts : (int)q->o.max_attempts;
    d->timeout_ms = s->timeout_ms;
    if (s->backoff) d->has_backoff = true, d->backoff = *s->backoff;
    if (!d->queue || !d->kind || !d->payload || (s->unique_key && !d->ukey)) {
      enq_free(r);
      return keel__fail(q->err, UV_ENOMEM, "out of memory");
    }
  }
  if (!q->ready) {
    if (q->waiting_tail)
      q->waiting_tail->next = r;
    else
      q->waiting_head = r;
    q->waiting_tail = r;
    return 0;
  }
  if (conn != NULL) q->ext_pending++;
  int rc = send_enqueue(r);
  if (rc != 0) {
    if (conn != NULL) q->ext_pending--;
    enq_free(r);
    return rc;
  }
  return 0;
}

/* ---- done ---------------------------------------------------------------------------------- */

/* What ending a job in `state` returns; 0 for a running job, whose end the
 * caller records. */
static int end_status(const keel_pgqueue *q, int state) {
  if (state == J_RELEASED || q->closing) return KEEL_ECLOSING;
  if (state == J_TIMEDOUT) return KEEL_ESTALE;
  if (state == J_LOST) return KEEL_ELOST;
  return state == J_RUNNING ? 0 : UV_EINVAL;
}

int keel_pgqueue_job_fail(keel_pgqueue_job *j, int status, const char *message) {
  if (j == NULL) return UV_EINVAL;
  keel_pgqueue *q = j->q;
  jl_remove(list_of(q, j), j);
  int rc = end_status(q, j->state);
  if (rc == 0) {
    keel__histogram_record(&q->h_run, (now_ms(q) - j->started_at) * 1000000u);
    if (status >= 0) {
      if (fin_push(&q->fin, j->id, j->attempt, OP_DONE, 0, NULL) != 0)
        rc = keel__fail(q->err, UV_ENOMEM,
                        "no memory to record completion of job %" PRId64
                        " (its lease will expire and it runs again)",
                        j->id);
    } else {
      fail_job(q, j, status, message);
    }
    kick(q);
  }
  job_free(j);
  return rc;
}

int keel_pgqueue_job_done(keel_pgqueue_job *job, int status) {
  return keel_pgqueue_job_fail(job, status, NULL);
}

/* pgqueue_hook.h: the caller's own statement completed the attempt. */
int keel__pgqueue_job_done_written(keel_pgqueue_job *j, bool written) {
  if (j == NULL) return UV_EINVAL;
  keel_pgqueue *q = j->q;
  jl_remove(list_of(q, j), j);
  int rc = end_status(q, j->state);
  if (rc == KEEL_ELOST && written) q->st.completed++; /* the row was ours after all */
  if (rc == 0) {
    keel__histogram_record(&q->h_run, (now_ms(q) - j->started_at) * 1000000u);
    if (written) {
      q->st.completed++;
    } else { /* as on_finish counts a fenced completion (the caller is keel, not a user) */
      q->st.fenced++;
      lease_lost(q, NULL, j->id, j->attempt);
    }
    kick(q);
  }
  job_free(j);
  return rc;
}

int64_t keel_pgqueue_job_id(const keel_pgqueue_job *j) {
  return j ? j->id : 0;
}
unsigned keel_pgqueue_job_attempt(const keel_pgqueue_job *j) {
  return j ? j->attempt : 0;
}
unsigned keel_pgqueue_job_max_attempts(const keel_pgqueue_job *j) {
  return j ? j->max_attempts : 0;
}
int keel_pgqueue_job_priority(const keel_pgqueue_job *j) {
  return j ? j->priority : 0;
}
const char *keel_pgqueue_job_kind(const keel_pgqueue_job *j) {
  return j ? j->kind : NULL;
}
const char *keel_pgqueue_job_payload(const keel_pgqueue_job *j) {
  return j ? j->payload : NULL;
}
double keel_pgqueue_job_pickup_ms(const keel_pgqueue_job *j) {
  return j ? j->pickup_ms : 0;
}

/* ---- control -------------------------------------------------------------------------------- */

int keel_pgqueue_pause(keel_pgqueue *q) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return KEEL_ECLOSING;
  q->paused = true;
  return 0;
}

int keel_pgqueue_resume(keel_pgqueue *q) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return KEEL_ECLOSING;
  q->paused = false;
  wake(q);
  return 0;
}

int keel_pgqueue_set_concurrency(keel_pgqueue *q, unsigned c) {
  if (q == NULL) return UV_EINVAL;
  if (c == 0) return keel__fail(q->err, UV_EINVAL, "concurrency must be >= 1");
  if (q->closing) return KEEL_ECLOSING;
  q->concurrency = c;
  wake(q);
  return 0;
}

static void on_id(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  id_req *r = data;
  keel_pgqueue *q = r->q;
  const char *prev = NULL;
  if (status == 0) {
    prev = keel_pg_result_value(res, 0, 0);
    if (prev == NULL) status = KEEL_ENOTFOUND;
  } else {
    set_pg_error(q, "cancel/redrive", c, res, status);
  }
  if (r->cb) r->cb(q, status, r->id, prev, r->data);
  keel__free(r);
}

static int by_id(keel_pgqueue *q, const char *sql, int64_t id, unsigned extra,
                 keel_pgqueue_id_cb cb, void *data) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->err, KEEL_ECLOSING, "queue is closing");
  if (id <= 0) return keel__fail(q->err, UV_EINVAL, "id must be > 0");
  id_req *r = keel__calloc(1, sizeof *r);
  if (r == NULL) return keel__fail(q->err, UV_ENOMEM, "out of memory");
  *r = (id_req){q, cb, data, id};
  char ids[24], ex[16];
  snprintf(ids, sizeof ids, "%" PRId64, id);
  snprintf(ex, sizeof ex, "%u", extra);
  const char *params[] = {ids, ex};
  int rc = keel_pg_query(q->ca, sql, extra ? 2 : 1, params, on_id, r);
  if (rc != 0) {
    keel__free(r);
    return keel__fail(q->err, rc, "not sent: %s", keel_pg_last_error(q->ca));
  }
  return 0;
}

int keel_pgqueue_cancel(keel_pgqueue *q, int64_t id, keel_pgqueue_id_cb cb, void *data) {
  return by_id(q, q ? q->sql.cancel : NULL, id, 0, cb, data);
}

int keel_pgqueue_redrive(keel_pgqueue *q, int64_t id, unsigned extra, keel_pgqueue_id_cb cb,
                         void *data) {
  if (q != NULL && extra == 0) return keel__fail(q->err, UV_EINVAL, "extra_attempts must be >= 1");
  return by_id(q, q ? q->sql.redrive : NULL, id, extra, cb, data);
}

/* ---- stats ----------------------------------------------------------------------------------- */

void keel_pgqueue_get_stats(const keel_pgqueue *q, keel_pgqueue_stats *out) {
  if (q == NULL || out == NULL) return;
  *out = q->st;
  out->held = q->pre.n + q->run.n;
  out->running_here = q->run.n;
  out->concurrency = q->concurrency;
  out->paused = q->paused;
  out->connected = keel_pg_is_connected(q->ca);
  lat(&q->h_fetch, &out->fetch);
  lat(&q->h_pickup, &out->pickup);
  lat(&q->h_run, &out->run);
  memset(out->reserved_, 0, sizeof out->reserved_);
}

const char *keel_pgqueue_last_error(const keel_pgqueue *q) {
  return q ? q->err : "queue is NULL";
}

const char *keel_pgqueue_owner(const keel_pgqueue *q) {
  return q ? q->owner : "";
}

/* ---- close ----------------------------------------------------------------------------------- */

static void maybe_freed(keel_pgqueue *q) {
  if (q->handles_open > 0 || q->conns_open > 0 || q->ext_pending > 0) return;
  keel_close_cb cb = q->close_cb;
  void *data = q->close_data;
  q_free(q);
  if (cb) cb(q, data);
}

static void on_handle_closed(uv_handle_t *h) {
  keel_pgqueue *q = h->data;
  q->handles_open--;
  maybe_freed(q);
}

static void on_conn_closed(void *obj, void *data) {
  (void)obj;
  keel_pgqueue *q = data;
  q->conns_open--;
  maybe_freed(q);
}

/* After the final completion batch (or none): close connections and handles. */
static void close_step2(keel_pgqueue *q) {
  if (q->close_flushed || q->in_close_step || !q->close_step_ran) return;
  if (q->fin_inflight || q->fetch_inflight) return; /* their callbacks call us again */
  if (q->fin.n > 0 && keel_pg_is_connected(q->cb)) {
    send_finish(q);
    if (q->fin_inflight) return;
  }
  q->close_flushed = true;
  keel_pg *a = q->ca, *b = q->cb;
  keel_pg_close(a, on_conn_closed, q);
  if (b != a) keel_pg_close(b, on_conn_closed, q);
  uv_handle_t *hs[] = {(uv_handle_t *)&q->kick,     (uv_handle_t *)&q->t_flush,
                       (uv_handle_t *)&q->t_hb,     (uv_handle_t *)&q->t_poll,
                       (uv_handle_t *)&q->t_rescue, (uv_handle_t *)&q->t_stats,
                       (uv_handle_t *)&q->t_sweep,  (uv_handle_t *)&q->t_migrate};
  for (size_t i = 0; i < KEEL__ARRAY_SIZE(hs); i++) uv_close(hs[i], on_handle_closed);
}

static void close_step(void *arg) {
  keel_pgqueue *q = arg;
  q->close_step_ran = true;
  /* enqueues that waited for the schema: cancelled */
  while (q->waiting_head) {
    enq_req *r = q->waiting_head;
    q->waiting_head = r->next;
    q->in_close_step = true;
    finish_enqueue(r, UV_ECANCELED);
    q->in_close_step = false;
  }
  q->waiting_tail = NULL;
  close_step2(q);
}

static void on_close_kick(uv_idle_t *h) {
  uv_idle_stop(h);
  close_step(h->data);
}

void keel_pgqueue_close(keel_pgqueue *q, keel_close_cb cb, void *data) {
  if (q == NULL || q->closing) return;
  q->closing = true;
  keel__stats_hooks_detach(&q->stats_hooks); /* drops serve registrations */
  q->close_cb = cb;
  q->close_data = data;
  uv_idle_stop(&q->kick);
  uv_timer_t *timers[] = {&q->t_flush, &q->t_hb,    &q->t_poll,   &q->t_rescue,
                          &q->t_stats, &q->t_sweep, &q->t_migrate};
  for (size_t i = 0; i < KEEL__ARRAY_SIZE(timers); i++) uv_timer_stop(timers[i]);
  /* give back what we hold */
  while (q->pre.head) {
    keel_pgqueue_job *j = q->pre.head;
    jl_remove(&q->pre, j);
    (void)fin_push(&q->fin, j->id, j->attempt, OP_BACK, 0, NULL);
    job_free(j);
  }
  while (q->run.head) {
    keel_pgqueue_job *j = q->run.head;
    jl_remove(&q->run, j);
    (void)fin_push(&q->fin, j->id, j->attempt, OP_RELEASE, 0, "worker closed");
    j->state = J_RELEASED;
    jl_push(&q->gone, j);
  }
  /* the rest runs on the next loop iteration, from the kick handle (no
   * allocation needed, so close cannot fail) */
  (void)uv_idle_start(&q->kick, on_close_kick);
}

keel__stats_hooks *keel__pgqueue_stats_hooks(keel_pgqueue *x) {
  return x->closing ? NULL : &x->stats_hooks; /* no registration once closing */
}
