/* A pool of connections: one holder, or pool statements (one at a time, or
 * up to pipeline_depth pipelined when every member is busy), per
 * connection; FIFO waiters (bounded) with a timeout, work only for
 * connected members, and transactions on one connection. */
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "pg/pg_stats.h"
#include "pg/pg_internal.h"
#include "pg/pg_literal.h"

typedef enum waiter_kind { WAIT_QUERY, WAIT_ACQUIRE } waiter_kind;

typedef struct waiter {
  struct waiter *next;
  waiter_kind kind;
  uint64_t deadline_ms;
  keel_pg_acquire_cb acquire_cb;
  keel_pg_result_cb result_cb;
  void *data;
  int nparams;
  char *sql;
  char **values;
  bool cached;      /* WAIT_QUERY: keel_pg_query_cached */
  bool literal;     /* and keel's own SQL (keel__pg_query_literal) */
  struct member *m; /* WAIT_QUERY sent: the member it runs on */
} waiter;

typedef struct member {
  keel_pg *conn;
  keel_pg_pool *pool;
  bool busy;        /* held (acquired, a transaction) or running pool queries */
  bool in_tx;       /* held by keel_pg_pool_transaction(), not releasable by hand */
  unsigned queries; /* pool queries sent on it and not answered yet */
} member;

struct keel_pg_pool {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  keel_pg_pool_opts opts;
  char *conninfo;
  member *members;
  unsigned size;
  unsigned max_waiters; /* opts.max_waiters, or the default for 0 */
  waiter *wait_head, *wait_tail;
  uint64_t waiting;
  uv_timer_t wait_timer;
  uv_timer_t dispatch_timer; /* hands out members, delivers ended transactions */
  unsigned open_things;      /* members + timers still open */
  bool closing;
  keel_close_cb close_cb;
  void *close_data;
  keel_pg_tx *txs;                     /* transactions holding a connection */
  keel_pg_tx *ended_head, *ended_tail; /* ended inside a user call; done not run yet */
  keel_pg_tx *cancelled;               /* ended by close while their body ran */
  bool cancels_delivered;              /* close's UV_ECANCELED callbacks have run */
  bool unnamed;                        /* every member sends unnamed statements */
  unsigned depth;                      /* pool queries pipelined per member, >= 1 */
  keel_pg_pool_stats stats;
  char last_error[KEEL__ERRBUF_SIZE];
  char conn_error[KEEL__ERRBUF_SIZE]; /* why a member last went down */
};

/* Where a transaction is; decides who ends it when the pool closes. */
typedef enum tx_state {
  TX_BEGIN,    /* BEGIN queued or sent: on_begin() ends it at close */
  TX_BODY,     /* the body runs: close ends it (cancelled list) */
  TX_ENDING,   /* COMMIT or ROLLBACK queued or sent: their callback ends it */
  TX_ENDED,    /* on the ended list: the dispatch timer (or close) calls done */
  TX_CANCELLED /* ended by close; freed with the pool */
} tx_state;

struct keel_pg_tx {
  keel_pg_pool *pool;
  tx_state state;
  member *m;
  keel_pg_isolation isolation;
  keel_pg_tx_fn body;
  keel_pg_tx_done_cb done;
  void *data;
  uint64_t session; /* the connection's session BEGIN ran in */
  keel_pg_tx *prev, *next;
  int status;          /* outcome reported when a ROLLBACK ends it */
  char sqlstate[6];    /* the first failed statement's SQLSTATE, "" when none */
  bool reset_session;  /* ended without ROLLBACK on a live session: reset it */
  bool retry_rollback; /* ROLLBACK could not be queued: try again when ending */
};

static void dispatch(keel_pg_pool *p);

void keel_pg_pool_opts_init(keel_pg_pool_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  keel_pg_opts_init(&opts->conn);
  opts->size = 4;
  opts->acquire_timeout_ms = 30000;
  opts->max_waiters = KEEL_PG_POOL_MAX_WAITERS_DEFAULT;
}

static member *member_of(keel_pg_pool *p, keel_pg *conn) {
  for (unsigned i = 0; i < p->size; i++)
    if (p->members[i].conn == conn) return &p->members[i];
  return NULL;
}

static void tx_link(keel_pg_pool *p, keel_pg_tx *tx) {
  tx->prev = NULL;
  tx->next = p->txs;
  if (p->txs != NULL) p->txs->prev = tx;
  p->txs = tx;
}

static void tx_unlink(keel_pg_pool *p, keel_pg_tx *tx) {
  if (tx->prev != NULL)
    tx->prev->next = tx->next;
  else if (p->txs == tx)
    p->txs = tx->next;
  if (tx->next != NULL) tx->next->prev = tx->prev;
  tx->prev = tx->next = NULL;
}

static void maybe_free_pool(keel_pg_pool *p) {
  if (!p->closing || p->open_things != 0) return;
  keel_close_cb cb = p->close_cb;
  void *data = p->close_data;
  while (p->cancelled != NULL) {
    keel_pg_tx *next = p->cancelled->next;
    keel__free(p->cancelled);
    p->cancelled = next;
  }
  keel__free(p->members);
  keel__free(p->conninfo);
  keel__free(p);
  if (cb != NULL) cb(p, data);
}

static void on_dispatch_timer(uv_timer_t *timer);

static void schedule_dispatch(keel_pg_pool *p) {
  /* Before keel_pg_pool_new() has set the timers up (a member reporting
   * its state from inside keel_pg_new()) there is nothing to dispatch. */
  if (p->open_things == 0) return;
  if (!p->closing && !uv_is_active((uv_handle_t *)&p->dispatch_timer))
    uv_timer_start(&p->dispatch_timer, on_dispatch_timer, 0, 0);
}

/* ---- waiters ------------------------------------------------------------- */

static void on_wait_timer(uv_timer_t *timer);

static void arm_wait_timer(keel_pg_pool *p) {
  if (p->closing) return;
  if (p->wait_head == NULL || p->wait_head->deadline_ms == 0) {
    uv_timer_stop(&p->wait_timer);
    return;
  }
  uint64_t now = uv_now(p->loop);
  uint64_t due = p->wait_head->deadline_ms;
  uv_timer_start(&p->wait_timer, on_wait_timer, due > now ? due - now : 0, 0);
}

static waiter *pop_waiter(keel_pg_pool *p) {
  waiter *w = p->wait_head;
  if (w == NULL) return NULL;
  p->wait_head = w->next;
  if (p->wait_head == NULL) p->wait_tail = NULL;
  p->waiting--;
  return w;
}

/* Calls a waiter's callback with status (conn NULL) and frees it. */
static void fail_waiter(keel_pg_pool *p, waiter *w, int status, const char *text) {
  keel_pg_acquire_cb acquire_cb = w->acquire_cb;
  keel_pg_result_cb result_cb = w->result_cb;
  void *data = w->data;
  bool acquire = w->kind == WAIT_ACQUIRE;
  keel__free(w);
  if (acquire) {
    acquire_cb(p, NULL, status, data);
  } else if (result_cb != NULL) {
    keel_pg_result result = {NULL, text};
    result_cb(NULL, status, &result, data);
  }
}

static unsigned connected_members(const keel_pg_pool *p) {
  unsigned n = 0;
  for (unsigned i = 0; i < p->size; i++)
    if (keel_pg_is_connected(p->members[i].conn)) n++;
  return n;
}

static void on_wait_timer(uv_timer_t *timer) {
  keel_pg_pool *p = timer->data;
  uint64_t now = uv_now(p->loop);
  /* Deadlines grow with arrival order, so expired waiters are at the head. */
  while (p->wait_head != NULL && p->wait_head->deadline_ms != 0 &&
         p->wait_head->deadline_ms <= now) {
    waiter *w = pop_waiter(p);
    p->stats.acquire_timeouts++;
    /* Say why: nothing connected (and the members' last error), or busy. */
    if (connected_members(p) == 0)
      keel__fail(p->last_error, UV_ETIMEDOUT,
                 "no connection available within %u ms: server unreachable (last error: %s)",
                 p->opts.acquire_timeout_ms, p->conn_error[0] ? p->conn_error : "none yet");
    else
      keel__fail(p->last_error, UV_ETIMEDOUT,
                 "no connection available within %u ms: all %u connected members busy",
                 p->opts.acquire_timeout_ms, connected_members(p));
    char text[KEEL__ERRBUF_SIZE];
    snprintf(text, sizeof text, "%s", p->last_error);
    fail_waiter(p, w, UV_ETIMEDOUT, text);
    if (p->closing) return;
  }
  arm_wait_timer(p);
}

/* Relays a pool query's result; its member is free when none is left. */
static void on_member_result(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  waiter *w = data;
  member *m = w->m;
  keel_pg_pool *p = m->pool;
  keel_pg_result_cb cb = w->result_cb;
  void *cb_data = w->data;
  keel__free(w);
  if (--m->queries == 0) m->busy = false;
  p->stats.queries++;
  if (status == KEEL_EPG) p->stats.errors++;
  if (status != 0) snprintf(p->last_error, sizeof p->last_error, "%s", keel_pg_last_error(c));
  if (cb != NULL) cb(c, status, res, cb_data);
  schedule_dispatch(p);
}

/* One member met a transaction pooler (statement mode AUTO): every member
 * sends unnamed statements from now on, before it meets it too. */
static void sync_statement_mode(keel_pg_pool *p) {
  if (p->unnamed) return;
  bool any = false;
  for (unsigned i = 0; i < p->size && !any; i++) any = keel__pg_unnamed(p->members[i].conn);
  if (!any) return;
  p->unnamed = true;
  for (unsigned i = 0; i < p->size; i++) keel__pg_set_unnamed(p->members[i].conn);
}

/* Hands members that are connected and free to waiters, in FIFO order. A
 * member that is down gets nothing: waiters wait for one that is up (or
 * for their deadline), never on a connection that is not there. */
static void dispatch(keel_pg_pool *p) {
  sync_statement_mode(p);
  while (p->wait_head != NULL && !p->closing) {
    member *free_member = NULL;
    for (unsigned i = 0; i < p->size && free_member == NULL; i++) {
      member *m = &p->members[i];
      if (!m->busy && keel_pg_is_connected(m->conn)) free_member = m;
    }
    /* None free: a query may queue behind others on the member running
     * the fewest (never on one held by a holder or a transaction). */
    if (free_member == NULL && p->depth > 1 && p->wait_head->kind == WAIT_QUERY) {
      for (unsigned i = 0; i < p->size; i++) {
        member *m = &p->members[i];
        if (m->queries == 0 || m->queries >= p->depth || !keel_pg_is_connected(m->conn)) continue;
        if (free_member == NULL || m->queries < free_member->queries) free_member = m;
      }
    }
    if (free_member == NULL) break;
    waiter *w = pop_waiter(p);
    free_member->busy = true;
    if (w->kind == WAIT_ACQUIRE) {
      keel_pg_acquire_cb cb = w->acquire_cb;
      void *data = w->data;
      keel__free(w);
      cb(p, free_member->conn, 0, data);
      continue;
    }
    w->m = free_member;
    free_member->queries++;
    int rc = (w->literal  ? keel__pg_query_literal
              : w->cached ? keel_pg_query_cached
                          : keel_pg_query)(free_member->conn, w->sql, w->nparams,
                                           (const char *const *)w->values, on_member_result, w);
    if (rc != 0) {
      if (--free_member->queries == 0) free_member->busy = false;
      snprintf(p->last_error, sizeof p->last_error, "%s", keel_pg_last_error(free_member->conn));
      fail_waiter(p, w, rc, keel_pg_last_error(free_member->conn));
      continue;
    }
  }
  arm_wait_timer(p);
}

static void on_member_state(keel_pg *c, bool up, int status, void *data) {
  keel_pg_pool *p = data;
  if (up) {
    schedule_dispatch(p);
  } else {
    snprintf(p->conn_error, sizeof p->conn_error, "%s", keel_pg_last_error(c));
    snprintf(p->last_error, sizeof p->last_error, "%s", p->conn_error);
  }
  if (p->opts.conn.on_state != NULL) p->opts.conn.on_state(c, up, status, p->opts.conn.data);
}

static void on_member_notify(keel_pg *c, const char *channel, const char *payload, int sender_pid,
                             void *data) {
  keel_pg_pool *p = data;
  p->opts.conn.on_notify(c, channel, payload, sender_pid, p->opts.conn.data);
}

int keel_pg_pool_new(uv_loop_t *loop, const keel_pg_pool_opts *opts, keel_pg_pool **out) {
  if (loop == NULL || opts == NULL || out == NULL || opts->conn.conninfo == NULL || opts->size == 0)
    return UV_EINVAL;
  if (keel_backoff_validate(&opts->conn.reconnect_backoff, NULL) != 0) return UV_EINVAL;
  keel_pg_pool *p = keel__calloc(1, sizeof *p);
  if (p == NULL) return UV_ENOMEM;
  p->loop = loop;
  p->opts = *opts;
  p->conninfo = keel__strdup(opts->conn.conninfo);
  p->members = keel__calloc(opts->size, sizeof *p->members);
  if (p->conninfo == NULL || p->members == NULL) {
    keel__free(p->conninfo);
    keel__free(p->members);
    keel__free(p);
    return UV_ENOMEM;
  }
  p->opts.conn.conninfo = p->conninfo;
  p->size = opts->size;
  p->depth = opts->pipeline_depth > 1 ? opts->pipeline_depth : 1;
  p->max_waiters = opts->max_waiters != 0 ? opts->max_waiters : KEEL_PG_POOL_MAX_WAITERS_DEFAULT;
  keel_pg_opts conn_opts = p->opts.conn;
  conn_opts.on_state = on_member_state;
  conn_opts.on_notify = p->opts.conn.on_notify != NULL ? on_member_notify : NULL;
  conn_opts.data = p;
  for (unsigned i = 0; i < p->size; i++) {
    p->members[i].pool = p;
    int rc = keel_pg_new(loop, &conn_opts, &p->members[i].conn);
    if (rc != 0) {
      /* Close what was opened (nothing calls back into p: no close
       * callback, and a closing connection reports no state). */
      for (unsigned j = 0; j < i; j++) keel_pg_close(p->members[j].conn, NULL, NULL);
      keel__free(p->members);
      keel__free(p->conninfo);
      keel__free(p);
      return rc;
    }
  }
  uv_timer_init(loop, &p->wait_timer);
  uv_timer_init(loop, &p->dispatch_timer);
  p->wait_timer.data = p->dispatch_timer.data = p;
  p->open_things = p->size + 2;
  p->stats.size = p->size;
  *out = p;
  return 0;
}

static int add_waiter(keel_pg_pool *p, waiter *w) {
  if (p->waiting >= p->max_waiters) {
    keel__free(w);
    return keel__fail(p->last_error, KEEL_EFULL, "%u requests already wait for a connection",
                      p->max_waiters);
  }
  w->deadline_ms = p->opts.acquire_timeout_ms ? uv_now(p->loop) + p->opts.acquire_timeout_ms : 0;
  if (p->wait_tail != NULL)
    p->wait_tail->next = w;
  else
    p->wait_head = w;
  p->wait_tail = w;
  p->waiting++;
  schedule_dispatch(p);
  return 0;
}

static int pool_query(keel_pg_pool *p, const char *sql, int nparams, const char *const *values,
                      keel_pg_result_cb cb, void *data, bool cached, bool literal) {
  if (p == NULL) return UV_EINVAL;
  if (p->closing) return KEEL_ECLOSING;
  if (sql == NULL || nparams < 0 || (nparams > 0 && values == NULL))
    return keel__fail(p->last_error, UV_EINVAL, "keel_pg_pool_query: sql required, nparams >= 0");
  size_t size = sizeof(waiter) + (size_t)nparams * sizeof(char *) + strlen(sql) + 1;
  for (int i = 0; i < nparams; i++)
    if (values[i] != NULL) size += strlen(values[i]) + 1;
  waiter *w = keel__calloc(1, size);
  if (w == NULL) return keel__fail(p->last_error, UV_ENOMEM, "out of memory");
  w->kind = WAIT_QUERY;
  w->result_cb = cb;
  w->data = data;
  w->nparams = nparams;
  w->values = (char **)(w + 1);
  char *text = (char *)(w->values + nparams);
  for (int i = 0; i < nparams; i++) {
    if (values[i] == NULL) continue;
    size_t len = strlen(values[i]) + 1;
    memcpy(text, values[i], len);
    w->values[i] = text;
    text += len;
  }
  memcpy(text, sql, strlen(sql) + 1);
  w->sql = text;
  w->cached = cached;
  w->literal = literal;
  return add_waiter(p, w);
}

int keel_pg_pool_query(keel_pg_pool *p, const char *sql, int nparams, const char *const *values,
                       keel_pg_result_cb cb, void *data) {
  return pool_query(p, sql, nparams, values, cb, data, false, false);
}

int keel_pg_pool_query_cached(keel_pg_pool *p, const char *sql, int nparams,
                              const char *const *values, keel_pg_result_cb cb, void *data) {
  return pool_query(p, sql, nparams, values, cb, data, true, false);
}

int keel__pg_pool_query_literal(keel_pg_pool *p, const char *sql, int nparams,
                                const char *const *values, keel_pg_result_cb cb, void *data) {
  return pool_query(p, sql, nparams, values, cb, data, true, true);
}

int keel_pg_pool_acquire(keel_pg_pool *p, keel_pg_acquire_cb cb, void *data) {
  if (p == NULL) return UV_EINVAL;
  if (p->closing) return KEEL_ECLOSING;
  if (cb == NULL) return keel__fail(p->last_error, UV_EINVAL, "acquire callback is required");
  waiter *w = keel__calloc(1, sizeof *w);
  if (w == NULL) return keel__fail(p->last_error, UV_ENOMEM, "out of memory");
  w->kind = WAIT_ACQUIRE;
  w->acquire_cb = cb;
  w->data = data;
  return add_waiter(p, w);
}

int keel_pg_pool_release(keel_pg_pool *p, keel_pg *conn) {
  if (p == NULL || conn == NULL) return UV_EINVAL;
  if (p->closing) return KEEL_ECLOSING;
  member *m = member_of(p, conn);
  if (m == NULL || !m->busy || m->queries > 0 || m->in_tx)
    return keel__fail(p->last_error, UV_EINVAL, "connection is not acquired from this pool");
  m->busy = false;
  schedule_dispatch(p);
  return 0;
}

/* ---- transactions -------------------------------------------------------- */

/* Gives the transaction's connection back and calls done; frees tx. */
static void tx_complete(keel_pg_tx *tx, int status, const char *sqlstate) {
  keel_pg_pool *p = tx->pool;
  member *m = tx->m;
  if (m != NULL) { /* it had a connection: count its outcome */
    if (status == 0)
      p->stats.transactions++;
    else if (status == KEEL_EINDOUBT)
      p->stats.in_doubt++;
    else
      p->stats.rollbacks++;
    if (!p->closing) keel__pg_bind(m->conn, false);
    m->busy = false;
    m->in_tx = false;
  }
  schedule_dispatch(p);
  keel_pg_tx_done_cb done = tx->done;
  void *data = tx->data;
  char state[6];
  snprintf(state, sizeof state, "%s", sqlstate != NULL ? sqlstate : "");
  keel__free(tx);
  done(p, status, state[0] ? state : NULL, data);
}

/* Ends a transaction from a connection callback (a later iteration than
 * any keel call of the user's). */
static void tx_end(keel_pg_tx *tx, int status, const char *sqlstate) {
  tx_unlink(tx->pool, tx);
  tx_complete(tx, status, sqlstate);
}

/* Ends a transaction from inside keel_pg_tx_finish(): done runs on a later
 * iteration (the dispatch timer, or close). tx->status and tx->sqlstate
 * hold the outcome; the connection stays held until then. */
static void tx_end_later(keel_pg_tx *tx) {
  keel_pg_pool *p = tx->pool;
  tx_unlink(p, tx);
  tx->state = TX_ENDED;
  tx->next = NULL;
  if (p->ended_tail != NULL)
    p->ended_tail->next = tx;
  else
    p->ended_head = tx;
  p->ended_tail = tx;
  schedule_dispatch(p);
}

static keel_pg_tx *pop_ended(keel_pg_pool *p) {
  keel_pg_tx *tx = p->ended_head;
  if (tx == NULL) return NULL;
  p->ended_head = tx->next;
  if (p->ended_head == NULL) p->ended_tail = NULL;
  tx->next = NULL;
  return tx;
}

static void finish_ended(keel_pg_pool *p, keel_pg_tx *tx) {
  /* Neither COMMIT nor ROLLBACK could be queued on a live session: end the
   * session (the server rolls the transaction back) before the connection
   * serves anyone else. */
  if (!p->closing) {
    if (tx->reset_session) keel_pg_reset(tx->m->conn);
    /* Try once more to end the block (bound to the transaction's session,
     * so it never runs on a new one); its outcome does not matter. */
    if (tx->retry_rollback) keel_pg_query(tx->m->conn, "ROLLBACK", 0, NULL, NULL, NULL);
  }
  tx_complete(tx, tx->status, tx->sqlstate);
}

static void on_dispatch_timer(uv_timer_t *timer) {
  keel_pg_pool *p = timer->data;
  keel_pg_tx *tx;
  while (!p->closing && (tx = pop_ended(p)) != NULL) finish_ended(p, tx);
  dispatch(p);
}

static void on_commit(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_pg_tx *tx = data;
  keel_pg_pool *p = tx->pool;
  char sqlstate[6] = "";
  const char *state = keel_pg_result_sqlstate(res);
  if (state != NULL) snprintf(sqlstate, sizeof sqlstate, "%s", state);
  if (status == 0 && res != NULL && res->res != NULL &&
      strcmp(PQcmdStatus(res->res), "ROLLBACK") == 0) {
    /* COMMIT of a transaction in which a statement failed rolls back. */
    status = KEEL_EPG;
    const char *first, *text;
    int first_status = keel__pg_bound_failure(c, &first, &text);
    /* A statement that certainly did not run (a transaction pooler was
     * detected at it): the whole transaction can run again. */
    if (first_status == KEEL_ECONN) status = KEEL_ECONN;
    if (first_status != 0 && first[0] != '\0') {
      snprintf(sqlstate, sizeof sqlstate, "%s", first);
      snprintf(p->last_error, sizeof p->last_error, "%s", text);
    } else {
      snprintf(sqlstate, sizeof sqlstate, "25P02");
      keel__fail(p->last_error, KEEL_EPG, "transaction rolled back: a statement failed");
    }
  } else if (status == KEEL_EINDOUBT) {
    /* Sent, connection lost before the answer: it may have committed. */
    keel__fail(p->last_error, KEEL_EINDOUBT, "COMMIT outcome unknown: %s", keel_pg_last_error(c));
  } else if (status != 0) {
    snprintf(p->last_error, sizeof p->last_error, "%s", keel_pg_last_error(c));
  }
  tx_end(tx, status, sqlstate);
}

static void on_rollback(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  keel_pg_tx *tx = data;
  /* Dropped by close: cancelled like all work close drops. */
  tx_end(tx, status == UV_ECANCELED ? UV_ECANCELED : tx->status, tx->sqlstate);
}

static void on_begin(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_pg_tx *tx = data;
  keel_pg_pool *p = tx->pool;
  if (status == 0 && p->closing) status = UV_ECANCELED; /* never starts a body then */
  /* A lost BEGIN started nothing that could commit. */
  if (status == KEEL_EINDOUBT) status = KEEL_ECONN;
  if (status != 0) {
    snprintf(p->last_error, sizeof p->last_error, "%s", keel_pg_last_error(c));
    tx_end(tx, status, keel_pg_result_sqlstate(res));
    return;
  }
  /* Statements of the body (and COMMIT/ROLLBACK) may run only in this
   * session: after a reconnect they fail with KEEL_ECONN instead of running
   * in autocommit on the new session. The first of them to fail is what
   * the transaction reports. */
  tx->session = keel__pg_session(c);
  keel__pg_bind(c, true);
  tx->state = TX_BODY;
  tx->body(tx, c, tx->data);
}

static void on_tx_acquired(keel_pg_pool *p, keel_pg *conn, int status, void *data) {
  keel_pg_tx *tx = data;
  if (status != 0) {
    tx_complete(tx, status, NULL); /* never had a connection */
    return;
  }
  tx->m = member_of(p, conn);
  tx->m->in_tx = true;
  tx->state = TX_BEGIN;
  tx_link(p, tx);
  static const char *const begins[] = {"BEGIN ISOLATION LEVEL READ COMMITTED",
                                       "BEGIN ISOLATION LEVEL REPEATABLE READ",
                                       "BEGIN ISOLATION LEVEL SERIALIZABLE"};
  int rc = keel_pg_query(conn, begins[tx->isolation], 0, NULL, on_begin, tx);
  if (rc != 0) {
    snprintf(p->last_error, sizeof p->last_error, "%s", keel_pg_last_error(conn));
    tx_end(tx, rc, NULL); /* inside the dispatch timer: a later iteration */
  }
}

int keel_pg_pool_transaction(keel_pg_pool *p, keel_pg_isolation isolation, keel_pg_tx_fn body,
                             keel_pg_tx_done_cb done, void *data) {
  if (p == NULL) return UV_EINVAL;
  if (p->closing) return KEEL_ECLOSING;
  if (body == NULL || done == NULL || isolation < KEEL_PG_READ_COMMITTED ||
      isolation > KEEL_PG_SERIALIZABLE)
    return keel__fail(p->last_error, UV_EINVAL, "transaction: body, done and a valid isolation");
  keel_pg_tx *tx = keel__calloc(1, sizeof *tx);
  if (tx == NULL) return keel__fail(p->last_error, UV_ENOMEM, "out of memory");
  tx->pool = p;
  tx->isolation = isolation;
  tx->body = body;
  tx->done = done;
  tx->data = data;
  int rc = keel_pg_pool_acquire(p, on_tx_acquired, tx);
  if (rc != 0) keel__free(tx);
  return rc;
}

void keel_pg_tx_done(keel_pg_tx *tx, int status) {
  keel_pg_tx_finish(tx, status);
}

void keel_pg_tx_finish(keel_pg_tx *tx, int status) {
  /* Ended already (finished before, or cancelled by close): nothing. */
  if (tx == NULL || tx->state != TX_BODY) return;
  tx->state = TX_ENDING;
  keel_pg_pool *p = tx->pool;
  keel_pg *conn = tx->m->conn;
  const char *first_state, *first_text;
  int first = keel__pg_bound_failure(conn, &first_state, &first_text);
  /* The session BEGIN ran in is gone: the server rolled back with it. */
  bool live = keel_pg_is_connected(conn) && keel__pg_session(conn) == tx->session;
  if (first != 0) {
    /* A statement of the body failed: the first one's SQLSTATE tells the
     * caller (and any classifier) what happened; the ones after it only
     * say that the transaction was aborted (25P02). */
    /* The caller's KEEL_EPG is a follow-on error (25P02) of that first
     * failure: the first one's status tells, e.g. KEEL_ECONN when a
     * transaction pooler was found at it (run the transaction again). */
    tx->status = status != 0 && status != KEEL_EPG ? status : first;
    snprintf(tx->sqlstate, sizeof tx->sqlstate, "%s", first_state);
    snprintf(p->last_error, sizeof p->last_error, "%s", first_text);
  } else if (status != 0) {
    tx->status = status;
  } else if (!live) {
    tx->status = KEEL_ECONN;
    keel__fail(p->last_error, KEEL_ECONN,
               "connection lost during the transaction (rolled back by the server)");
  } else {
    int rc = keel_pg_query(conn, "COMMIT", 0, NULL, on_commit, tx);
    if (rc == 0) return;
    /* Not queued: certainly not committed; roll back instead. */
    tx->status = rc == KEEL_ECLOSING ? UV_ECANCELED : rc;
    keel__fail(p->last_error, tx->status, "cannot queue COMMIT: %s", keel_pg_last_error(conn));
  }
  /* ROLLBACK even when the session is gone (it then fails at once, bound
   * to that session): it ends the transaction block the connection tracks
   * from the statements it queues. */
  int rc = keel_pg_query(conn, "ROLLBACK", 0, NULL, on_rollback, tx);
  if (rc != 0) {
    tx->reset_session = live && rc != KEEL_ECLOSING;
    tx->retry_rollback = rc != KEEL_ECLOSING;
    tx_end_later(tx);
  }
}

/* ---- stats and close ------------------------------------------------------ */

void keel_pg_pool_get_stats(const keel_pg_pool *p, keel_pg_pool_stats *out) {
  if (p == NULL || out == NULL) return;
  *out = p->stats;
  memset(out->reserved_, 0, sizeof out->reserved_);
  out->connected = 0;
  out->in_flight = 0;
  out->reconnects = 0;
  out->statement_retries = 0;
  out->unnamed = p->size > 0;
  for (unsigned i = 0; i < p->size; i++) {
    keel_pg_stats s;
    keel_pg_get_stats(p->members[i].conn, &s);
    out->connected += s.connected ? 1 : 0;
    out->in_flight += s.in_flight;
    out->reconnects += s.reconnects;
    out->statement_retries += s.statement_retries;
    out->unnamed = out->unnamed && s.unnamed;
  }
  out->waiting = p->waiting;
  out->size = p->size;
}

const char *keel_pg_pool_last_error(const keel_pg_pool *p) {
  return p == NULL ? "pool is NULL" : p->last_error;
}

static void on_member_closed(void *object, void *data) {
  (void)object;
  keel_pg_pool *p = data;
  p->open_things--;
  maybe_free_pool(p);
}

/* Runs the callbacks a close owes: transactions that had ended already,
 * waiters, then transactions whose body was still running. Called once the
 * first timer has closed, so never from inside keel_pg_pool_close(). */
static void deliver_cancels(keel_pg_pool *p) {
  if (p->cancels_delivered) return;
  p->cancels_delivered = true;
  keel_pg_tx *tx;
  while ((tx = pop_ended(p)) != NULL) finish_ended(p, tx);
  waiter *w;
  while ((w = pop_waiter(p)) != NULL) fail_waiter(p, w, UV_ECANCELED, "pool closed");
  for (tx = p->cancelled; tx != NULL; tx = tx->next) tx->done(p, UV_ECANCELED, NULL, tx->data);
}

static void on_pool_timer_closed(uv_handle_t *handle) {
  keel_pg_pool *p = handle->data;
  deliver_cancels(p);
  p->open_things--;
  maybe_free_pool(p);
}

void keel_pg_pool_close(keel_pg_pool *p, keel_close_cb cb, void *data) {
  if (p == NULL || p->closing) return;
  keel__stats_hooks_detach(&p->stats_hooks);
  p->closing = true;
  p->close_cb = cb;
  p->close_data = data;
  for (unsigned i = 0; i < p->size; i++) keel_pg_close(p->members[i].conn, on_member_closed, p);
  /* Transactions whose body still runs end now (a later keel_pg_tx_finish()
   * on them does nothing); their done callbacks and the waiters' run once
   * the timers have closed. A transaction whose BEGIN, COMMIT or ROLLBACK
   * is queued or sent is ended by that statement's callback instead, when
   * the closing connection cancels it: exactly one of the two calls done. */
  keel_pg_tx *tx = p->txs;
  while (tx != NULL) {
    keel_pg_tx *next = tx->next;
    if (tx->state == TX_BODY) {
      tx_unlink(p, tx);
      p->stats.rollbacks++;
      tx->state = TX_CANCELLED;
      tx->next = p->cancelled;
      p->cancelled = tx;
    }
    tx = next;
  }
  uv_close((uv_handle_t *)&p->wait_timer, on_pool_timer_closed);
  uv_close((uv_handle_t *)&p->dispatch_timer, on_pool_timer_closed);
}

keel__stats_hooks *keel__pg_pool_stats_hooks(keel_pg_pool *p) {
  return p->closing ? NULL : &p->stats_hooks; /* no registration once closing */
}
