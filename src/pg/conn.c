/* One PostgreSQL connection on libuv: non-blocking connect with
 * PQconnectStart/PQconnectPoll, a uv_poll_t on the socket (recreated when
 * libpq changes sockets), queued statements sent in pipeline mode (one sync
 * per statement, so a failure never aborts its neighbours), NOTIFY delivery,
 * deadlines and health checks, and reconnect with jittered backoff. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "pg/pg_internal.h"

static void on_poll(uv_poll_t *poll, int status, int events);
static void start_connect(keel_pg *c);
static void flush_queries(keel_pg *c);
static void arm_deadline(keel_pg *c);

void keel_pg_opts_init(keel_pg_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->connect_timeout_ms = 5000;
  opts->health_check_interval_ms = 10000;
  opts->keepalive_idle_s = 10;
  keel_backoff_full_jitter(&opts->reconnect_backoff, 100, 2.0, 10000);
  opts->reconnect = true;
  opts->pipeline = true;
}

static uint64_t now_ms(keel_pg *c) {
  return uv_now(c->loop);
}

bool keel__pg_idle(const keel_pg *c) {
  return c->pending_head == NULL && c->sent_head == NULL;
}

/* ---- delivering results ------------------------------------------------ */

void keel__pg_deliver(keel_pg *c, keel__pg_query *q, int status, PGresult *res, const char *text) {
  if (!q->internal) { /* health checks are not the user's statements */
    c->stats.queries++;
    if (status == KEEL_EPG) c->stats.errors++;
  }
  if (status != 0) c->error_generation++;
  if (status == KEEL_EPG && res != NULL) {
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *message = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    keel__fail(c->last_error, status, "SQLSTATE %s: %s", state ? state : "?????",
               message ? message : "error");
  } else if (status != 0 && text != NULL) {
    keel__fail(c->last_error, status, "%s", text);
  }
  keel__pg_note_failure(c, q, status, res);
  if (q->cb != NULL && !q->internal) {
    keel_pg_result result = {res, text};
    c->callback_depth++;
    q->cb(c, status, &result, q->data);
    c->callback_depth--;
  }
  /* A failed PREPARE's error not handed on (connection lost or closed). */
  if (q->inherited != NULL && q->inherited != res) PQclear(q->inherited);
  if (res != NULL) PQclear(res);
  keel__free(q);
}

void keel__pg_fail_all(keel_pg *c, keel__pg_query **head, keel__pg_query **tail, uint64_t *count,
                       int status, const char *text) {
  keel__pg_query *q = *head;
  *head = *tail = NULL;
  *count = 0;
  while (q != NULL) {
    keel__pg_query *next = q->next;
    PGresult *collected = q->result;
    q->result = NULL;
    if (collected != NULL) PQclear(collected);
    keel__pg_deliver(c, q, status, NULL, text);
    q = next;
  }
}

/* Fails the unsent statements bound to a session that is gone: they belong
 * to a transaction the server already rolled back, and must never run in
 * autocommit on a new session. */
static void fail_stale_bound(keel_pg *c) {
  /* Only a new session, a lost one or a stale enqueue can make a statement
   * stale: walking the queue on every flush would make a long queue
   * quadratic. */
  if (!c->stale_possible) return;
  c->stale_possible = false;
  bool live = c->state == KEEL__PG_CONNECTED;
  keel__pg_query **link = &c->pending_head;
  keel__pg_query *prev = NULL;
  keel__pg_query *stale = NULL, *stale_tail = NULL;
  while (*link != NULL) {
    keel__pg_query *q = *link;
    if (q->session != 0 && (!live || q->session != c->session)) {
      *link = q->next;
      c->pending_count--;
      q->next = NULL;
      if (stale_tail != NULL)
        stale_tail->next = q;
      else
        stale = q;
      stale_tail = q;
      continue;
    }
    prev = q;
    link = &q->next;
  }
  c->pending_tail = prev;
  while (stale != NULL && c->state != KEEL__PG_CLOSING) {
    keel__pg_query *next = stale->next;
    keel__pg_deliver(c, stale, KEEL_ECONN, NULL,
                     "connection lost during the transaction (rolled back by the server)");
    stale = next;
  }
  /* Closed meanwhile: the rest are cancelled like every other statement. */
  while (stale != NULL) {
    keel__pg_query *next = stale->next;
    keel__pg_deliver(c, stale, UV_ECANCELED, NULL, "connection closed");
    stale = next;
  }
}

/* ---- socket watching ---------------------------------------------------- */

/* Frees the connection once it is closing and its last handle is closed. */
static void handle_closed(keel_pg *c) {
  c->handles_open--;
  if (c->state != KEEL__PG_CLOSING || c->handles_open != 0) return;
  /* What close left queued is cancelled now, on a later iteration than the
   * close call: in-flight statements first, then unsent ones, as queued. */
  keel__pg_fail_all(c, &c->sent_head, &c->sent_tail, &c->sent_count, UV_ECANCELED,
                    "connection closed");
  keel__pg_fail_all(c, &c->pending_head, &c->pending_tail, &c->pending_count, UV_ECANCELED,
                    "connection closed");
  keel_close_cb cb = c->close_cb;
  void *data = c->close_data;
  for (int i = 0; i < KEEL__PG_PREPARED_MAX; i++) keel__free(c->prepared[i].sql);
  keel__free(c->conninfo);
  keel__free(c);
  if (cb != NULL) cb(c, data);
}

static void free_poll(uv_handle_t *handle) {
  keel_pg *c = handle->data;
  keel__free(handle);
  handle_closed(c);
}

static void drop_poll(keel_pg *c) {
  if (c->poll == NULL) return;
  /* Stop watching before libpq closes the socket. */
  uv_poll_stop(c->poll);
  uv_close((uv_handle_t *)c->poll, free_poll);
  c->poll = NULL;
  c->poll_fd = -1;
  c->poll_events = 0;
}

static int watch(keel_pg *c, int events) {
  int fd = PQsocket(c->conn);
  if (fd < 0) return KEEL_ECONN;
  if (c->poll != NULL && c->poll_fd != fd) drop_poll(c);
  if (c->poll == NULL) {
    uv_poll_t *poll = keel__malloc(sizeof *poll);
    if (poll == NULL) return UV_ENOMEM;
    int rc = uv_poll_init_socket(c->loop, poll, fd);
    if (rc != 0) {
      keel__free(poll);
      return rc;
    }
    poll->data = c;
    c->handles_open++;
    c->poll = poll;
    c->poll_fd = fd;
    c->poll_events = 0;
  }
  /* While connecting, libpq may close its socket and open another one that
   * gets the same descriptor number (next address of a host): re-register
   * at every step so the new socket is really watched. */
  if (c->state == KEEL__PG_CONNECTING && c->poll_events != 0) {
    uv_poll_stop(c->poll);
    c->poll_events = 0;
  }
  if (events != c->poll_events) {
    int rc = uv_poll_start(c->poll, events, on_poll);
    if (rc != 0) return rc;
    c->poll_events = events;
  }
  return 0;
}

/* ---- connection life cycle ---------------------------------------------- */

static void notify_state(keel_pg *c, bool up, int status) {
  if (c->opts.on_state == NULL) return;
  c->callback_depth++;
  c->opts.on_state(c, up, status, c->opts.data);
  c->callback_depth--;
}

static void on_reconnect_timer(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  if (c->state != KEEL__PG_WAITING) return;
  c->stats.reconnects++;
  start_connect(c);
}

/* Tears the connection down; the queries it had sent fail with status. */
static void disconnect(keel_pg *c, int status, const char *reason) {
  /* reason may point into the PGconn that is about to be freed. */
  char why[KEEL__ERRBUF_SIZE];
  snprintf(why, sizeof why, "%s", reason != NULL ? reason : "connection lost");
  size_t len = strlen(why);
  while (len > 0 && (why[len - 1] == '\n' || why[len - 1] == ' ')) why[--len] = '\0';
  bool was_up = c->state == KEEL__PG_CONNECTED;
  drop_poll(c);
  if (c->conn != NULL) {
    PQfinish(c->conn);
    c->conn = NULL;
  }
  c->pipeline_on = false;
  uv_timer_stop(&c->connect_timer);
  uv_timer_stop(&c->health_timer);
  keel__fail(c->last_error, status, "%s", why);
  if (was_up) c->stats.disconnects++;
  c->state = c->opts.reconnect ? KEEL__PG_WAITING : KEEL__PG_STOPPED;
  c->stale_possible = true;
  /* Sent statements may or may not have run: they fail. Unsent ones wait for
   * the next connection, unless there will be none. */
  keel__pg_fail_all(c, &c->sent_head, &c->sent_tail, &c->sent_count, status, why);
  if (c->state == KEEL__PG_CLOSING) return;
  fail_stale_bound(c);
  if (c->state == KEEL__PG_CLOSING) return;
  if (!c->opts.reconnect)
    keel__pg_fail_all(c, &c->pending_head, &c->pending_tail, &c->pending_count, status, why);
  if (c->state == KEEL__PG_CLOSING) return;
  notify_state(c, false, status);
  if (c->state != KEEL__PG_WAITING) return;
  c->reconnect_attempt++;
  uint64_t delay = keel_backoff_delay(&c->opts.reconnect_backoff, c->reconnect_attempt,
                                      c->last_backoff_ms, &c->rng);
  c->last_backoff_ms = delay;
  uv_timer_start(&c->connect_timer, on_reconnect_timer, delay, 0);
  arm_deadline(c);
}

static void fail_connect(keel_pg *c, int status) {
  char why[KEEL__ERRBUF_SIZE];
  const char *message = c->conn != NULL ? PQerrorMessage(c->conn) : "connection failed";
  snprintf(why, sizeof why, "connection failed: %s", message);
  disconnect(c, status, why);
}

static void on_connect_timeout(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  if (c->state == KEEL__PG_CONNECTING) fail_connect(c, UV_ETIMEDOUT);
}

static void on_health_timer(uv_timer_t *timer);

static void connected(keel_pg *c) {
  uv_timer_stop(&c->connect_timer);
  c->state = KEEL__PG_CONNECTED;
  c->stats.connects++;
  c->session++;
  c->stale_possible = true;
  c->reconnect_attempt = 0;
  c->last_backoff_ms = 0;
  c->last_activity_ms = now_ms(c);
  c->pipeline_on = false;
#if defined(LIBPQ_HAS_PIPELINING)
  if (c->opts.pipeline && PQenterPipelineMode(c->conn) == 1) c->pipeline_on = true;
#endif
  if (c->opts.health_check_interval_ms > 0)
    uv_timer_start(&c->health_timer, on_health_timer, c->opts.health_check_interval_ms,
                   c->opts.health_check_interval_ms);
  notify_state(c, true, 0);
  if (c->state != KEEL__PG_CONNECTED) return;
  flush_queries(c);
}

/* Drives PQconnectPoll until the connection is up or has failed. */
static void continue_connect(keel_pg *c) {
  PostgresPollingStatusType polling = PQconnectPoll(c->conn);
  switch (polling) {
    case PGRES_POLLING_OK: {
      int rc = watch(c, UV_READABLE);
      if (rc != 0) {
        fail_connect(c, rc);
        return;
      }
      connected(c);
      return;
    }
    case PGRES_POLLING_READING:
    case PGRES_POLLING_WRITING: {
      int rc = watch(c, polling == PGRES_POLLING_READING ? UV_READABLE : UV_WRITABLE);
      if (rc != 0) fail_connect(c, rc);
      return;
    }
    default:
      fail_connect(c, KEEL_ECONN);
      return;
  }
}

static void ignore_notice(void *arg, const char *message) {
  (void)arg;
  (void)message;
}

static void start_connect(keel_pg *c) {
  c->state = KEEL__PG_CONNECTING;
  c->conn = PQconnectStart(c->conninfo);
  if (c->conn == NULL) {
    disconnect(c, UV_ENOMEM, "out of memory starting a connection");
    return;
  }
  if (PQstatus(c->conn) == CONNECTION_BAD) {
    fail_connect(c, KEEL_ECONN);
    return;
  }
  PQsetnonblocking(c->conn, 1);
  /* libpq prints server notices to stderr by default; a library must not. */
  PQsetNoticeProcessor(c->conn, ignore_notice, NULL);
  uv_timer_start(&c->connect_timer, on_connect_timeout, c->opts.connect_timeout_ms, 0);
  continue_connect(c);
}

/* ---- sending and receiving -------------------------------------------- */

static void move_to_sent(keel_pg *c, keel__pg_query *q) {
  c->pending_head = q->next;
  if (c->pending_head == NULL) c->pending_tail = NULL;
  c->pending_count--;
  q->next = NULL;
  if (c->sent_tail != NULL)
    c->sent_tail->next = q;
  else
    c->sent_head = q;
  c->sent_tail = q;
  c->sent_count++;
}

/* The cache slot of sql prepared in this session, or a slot to prepare it
 * in (*fresh = true), or -1 when the cache is full. */
static int prepared_slot(keel_pg *c, const char *sql, bool *fresh) {
  int free_slot = -1;
  for (int i = 0; i < KEEL__PG_PREPARED_MAX; i++) {
    keel__pg_prepared *p = &c->prepared[i];
    if (p->sql == NULL || p->session != c->session) {
      if (free_slot < 0) free_slot = i;
      continue;
    }
    if (strcmp(p->sql, sql) == 0) {
      *fresh = false;
      return i;
    }
  }
  if (free_slot < 0) return -1;
  keel__pg_prepared *p = &c->prepared[free_slot];
  keel__free(p->sql);
  p->sql = keel__strdup(sql);
  if (p->sql == NULL) return -1;
  p->session = c->session;
  *fresh = true;
  return free_slot;
}

static void drop_prepared(keel_pg *c, int slot) {
  keel__free(c->prepared[slot].sql);
  c->prepared[slot].sql = NULL;
}

/* Sends one statement: by name when it is cached (preparing it first, in
 * the same pipeline, the first time in a session), otherwise with its text. */
static bool send_statement(keel_pg *c, keel__pg_query *q) {
#if defined(LIBPQ_HAS_PIPELINING)
  if (q->cached && c->pipeline_on) {
    bool fresh = false;
    int slot = prepared_slot(c, q->sql, &fresh);
    if (slot >= 0) {
      char name[24];
      snprintf(name, sizeof name, "keel_s%d", slot);
      if (fresh) {
        keel__pg_query *prepare = keel__calloc(1, sizeof *prepare);
        if (prepare == NULL) {
          drop_prepared(c, slot);
          return PQsendQueryParams(c->conn, q->sql, q->nparams, NULL, q->values, NULL, NULL, 0);
        }
        prepare->internal = true;
        prepare->prepare_slot = slot;
        /* It heads the sent list before q: q's deadline must apply to it. */
        prepare->deadline_ms = q->deadline_ms;
        if (!PQsendPrepare(c->conn, name, q->sql, q->nparams, NULL) || !PQpipelineSync(c->conn)) {
          keel__free(prepare);
          return false;
        }
        /* Its result comes first: it goes into the sent list ahead of q. */
        if (c->sent_tail != NULL)
          c->sent_tail->next = prepare;
        else
          c->sent_head = prepare;
        c->sent_tail = prepare;
        c->sent_count++;
      }
      return PQsendQueryPrepared(c->conn, name, q->nparams, q->values, NULL, NULL, 0);
    }
  }
#endif
  return PQsendQueryParams(c->conn, q->sql, q->nparams, NULL, q->values, NULL, NULL, 0);
}

static void flush_queries(keel_pg *c) {
  if (c->state != KEEL__PG_CONNECTED) return;
  fail_stale_bound(c);
  if (c->state != KEEL__PG_CONNECTED) return;
  while (c->pending_head != NULL) {
    /* Without pipelining, one statement at a time. */
    if (!c->pipeline_on && c->sent_head != NULL) break;
    keel__pg_query *q = c->pending_head;
    /* Queued by a callback of fail_stale_bound(): the flush timer fails it. */
    if (q->session != 0 && q->session != c->session) break;
    if (!send_statement(c, q)) {
      disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
      return;
    }
#if defined(LIBPQ_HAS_PIPELINING)
    if (c->pipeline_on && !PQpipelineSync(c->conn)) {
      disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
      return;
    }
#endif
    move_to_sent(c, q);
  }
  int flushed = PQflush(c->conn);
  if (flushed < 0) {
    disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
    return;
  }
  int rc = watch(c, UV_READABLE | (flushed == 1 ? UV_WRITABLE : 0));
  if (rc != 0) {
    disconnect(c, rc, "cannot watch the socket");
    return;
  }
  /* A silent server sends no event: the deadline must not wait for one. */
  arm_deadline(c);
}

static keel__pg_query *pop_sent(keel_pg *c) {
  keel__pg_query *q = c->sent_head;
  c->sent_head = q->next;
  if (c->sent_head == NULL) c->sent_tail = NULL;
  c->sent_count--;
  return q;
}

static void complete_head(keel_pg *c) {
  keel__pg_query *q = pop_sent(c);
  PGresult *res = q->result;
  q->result = NULL;
  if (q->prepare_slot >= 0 && q->internal) {
    /* An internal PREPARE: on failure, forget the slot and let the EXECUTE
     * that follows report the PREPARE's error (its own would only say that
     * the statement does not exist). */
    if (res == NULL || PQresultStatus(res) != PGRES_COMMAND_OK) {
      drop_prepared(c, q->prepare_slot);
      if (c->sent_head != NULL && res != NULL) {
        c->sent_head->inherited = res;
        res = NULL;
      }
    }
    if (res != NULL) PQclear(res);
    keel__free(q);
    return;
  }
  if (q->inherited != NULL) {
    if (res != NULL) PQclear(res);
    res = q->inherited;
    q->inherited = NULL;
  }
  int status = 0;
  const char *text = NULL;
  if (res == NULL) {
    status = KEEL_EPG;
    text = "no result";
  } else {
    switch (PQresultStatus(res)) {
      case PGRES_TUPLES_OK:
      case PGRES_COMMAND_OK:
      case PGRES_EMPTY_QUERY:
        break;
#if defined(LIBPQ_HAS_PIPELINING)
      case PGRES_PIPELINE_ABORTED:
        status = KEEL_EPG;
        text = "statement skipped: an earlier statement of its pipeline failed";
        break;
#endif
      default:
        status = KEEL_EPG;
        break;
    }
    /* The server ended the session (e.g. 57P01 after pg_terminate_backend):
     * report the loss, not a SQL error. */
    if (status == KEEL_EPG && PQstatus(c->conn) == CONNECTION_BAD) {
      status = KEEL_ECONN;
      text = "connection lost";
    }
  }
  keel__pg_deliver(c, q, status, res, text);
}

static void deliver_notifications(keel_pg *c) {
  PGnotify *notify;
  while (c->conn != NULL && (notify = PQnotifies(c->conn)) != NULL) {
    if (c->opts.on_notify != NULL && c->state != KEEL__PG_CLOSING) {
      c->callback_depth++;
      c->opts.on_notify(c, notify->relname, notify->extra, notify->be_pid, c->opts.data);
      c->callback_depth--;
    }
    PQfreemem(notify);
  }
}

/* Reads every result that is complete. Returns false when the connection
 * went away (or was closed) meanwhile. */
static bool read_results(keel_pg *c) {
  int nulls_in_a_row = 0;
  while (c->state == KEEL__PG_CONNECTED && c->sent_head != NULL && !PQisBusy(c->conn)) {
    PGresult *res = PQgetResult(c->conn);
    /* Notifications parsed before this result go first, in arrival order. */
    deliver_notifications(c);
    if (c->state != KEEL__PG_CONNECTED) {
      if (res != NULL) PQclear(res);
      break;
    }
    keel__pg_query *head = c->sent_head;
    nulls_in_a_row = res == NULL ? nulls_in_a_row + 1 : 0;
    if (c->pipeline_on) {
      /* NULL ends one statement's results; its sync result follows. Two in a
       * row means nothing more is buffered. */
      if (res == NULL && nulls_in_a_row > 1) break;
      if (res == NULL) continue;
#if defined(LIBPQ_HAS_PIPELINING)
      if (PQresultStatus(res) == PGRES_PIPELINE_SYNC) {
        PQclear(res);
        complete_head(c);
        continue;
      }
#endif
    } else if (res == NULL) {
      complete_head(c);
      flush_queries(c);
      continue;
    }
    if (head->result == NULL)
      head->result = res;
    else
      PQclear(res); /* only the first result of a statement is kept */
  }
  return c->state == KEEL__PG_CONNECTED;
}

static void on_poll(uv_poll_t *poll, int status, int events) {
  keel_pg *c = poll->data;
  if (c->poll != poll) return;
  if (c->state == KEEL__PG_CONNECTING) {
    continue_connect(c);
    return;
  }
  if (c->state != KEEL__PG_CONNECTED) return;
  if (status < 0) {
    disconnect(c, KEEL_ECONN, uv_strerror(status));
    return;
  }
  c->last_activity_ms = now_ms(c);
  if (events & UV_WRITABLE) {
    int flushed = PQflush(c->conn);
    if (flushed < 0) {
      disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
      return;
    }
    if (watch(c, UV_READABLE | (flushed == 1 ? UV_WRITABLE : 0)) != 0) {
      disconnect(c, KEEL_ECONN, "cannot watch the socket");
      return;
    }
  }
  if (events & UV_READABLE) {
    if (!PQconsumeInput(c->conn)) {
      disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
      return;
    }
    if (!read_results(c)) return;
    deliver_notifications(c);
    if (c->state == KEEL__PG_CONNECTED && PQstatus(c->conn) == CONNECTION_BAD) {
      disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
      return;
    }
  }
  if (c->state == KEEL__PG_CONNECTED) arm_deadline(c);
}

/* ---- deadlines and health checks --------------------------------------- */

static void on_deadline(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  uint64_t now = now_ms(c);
  /* A sent statement past its deadline means the server (or the path to it)
   * is not answering: reset the connection. */
  if (c->sent_head != NULL && c->sent_head->deadline_ms != 0 && c->sent_head->deadline_ms <= now) {
    keel__pg_query *late = pop_sent(c);
    if (late->result != NULL) PQclear(late->result);
    late->result = NULL;
    keel__pg_deliver(c, late, UV_ETIMEDOUT, NULL, "statement timed out");
    if (c->state == KEEL__PG_CLOSING) return;
    if (c->state == KEEL__PG_CONNECTED)
      disconnect(c, KEEL_ECONN, "connection reset after a timeout");
    if (c->state == KEEL__PG_CLOSING) return;
  }
  /* Unsent statements waiting for a connection also expire. */
  while (c->pending_head != NULL && c->pending_head->deadline_ms != 0 &&
         c->pending_head->deadline_ms <= now && c->state != KEEL__PG_CONNECTED) {
    keel__pg_query *q = c->pending_head;
    c->pending_head = q->next;
    if (c->pending_head == NULL) c->pending_tail = NULL;
    c->pending_count--;
    keel__pg_deliver(c, q, UV_ETIMEDOUT, NULL, "statement timed out waiting for a connection");
    if (c->state == KEEL__PG_CLOSING) return;
  }
  arm_deadline(c);
}

static void arm_deadline(keel_pg *c) {
  if (c->state == KEEL__PG_CLOSING) return;
  uint64_t next = 0;
  if (c->sent_head != NULL && c->sent_head->deadline_ms != 0) next = c->sent_head->deadline_ms;
  if (c->state != KEEL__PG_CONNECTED && c->pending_head != NULL &&
      c->pending_head->deadline_ms != 0 && (next == 0 || c->pending_head->deadline_ms < next))
    next = c->pending_head->deadline_ms;
  if (next == 0) {
    uv_timer_stop(&c->deadline_timer);
    return;
  }
  uint64_t now = now_ms(c);
  uv_timer_start(&c->deadline_timer, on_deadline, next > now ? next - now : 0, 0);
}

static int enqueue(keel_pg *c, const char *sql, int nparams, const char *const *values,
                   keel_pg_result_cb cb, void *data, uint64_t timeout_ms, bool internal,
                   bool cached);

static void on_health_timer(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  if (c->state != KEEL__PG_CONNECTED || !keel__pg_idle(c)) return;
  if (now_ms(c) - c->last_activity_ms < c->opts.health_check_interval_ms) return;
  /* An idle probe with a deadline finds half-open sockets that TCP alone
   * would take minutes to notice. */
  enqueue(c, "SELECT 1", 0, NULL, NULL, NULL, c->opts.connect_timeout_ms, true, false);
}

/* ---- public API --------------------------------------------------------- */

static char *conninfo_with_keepalives(const keel_pg_opts *opts) {
  const char *user = opts->conninfo;
  unsigned idle = opts->keepalive_idle_s ? opts->keepalive_idle_s : 10;
  char extra[128];
  bool uri = strncmp(user, "postgres://", 11) == 0 || strncmp(user, "postgresql://", 13) == 0;
  if (uri) {
    /* In a URI the parameters go after '?'; the user's own keepalive
     * settings win, so ours are added only when there are none. */
    if (strstr(user, "keepalives") != NULL) return keel__strdup(user);
    snprintf(extra, sizeof extra, "%ckeepalives=1&keepalives_idle=%u&keepalives_interval=5",
             strchr(user, '?') != NULL ? '&' : '?', idle);
  } else {
    /* Keywords given later win in libpq: ours go first. */
    snprintf(extra, sizeof extra, "keepalives=1 keepalives_idle=%u keepalives_interval=5 ", idle);
  }
  size_t len = strlen(extra) + strlen(user) + 1;
  char *out = keel__malloc(len);
  if (out == NULL) return NULL;
  if (uri)
    snprintf(out, len, "%s%s", user, extra);
  else
    snprintf(out, len, "%s%s", extra, user);
  return out;
}

int keel_pg_new(uv_loop_t *loop, const keel_pg_opts *opts, keel_pg **out) {
  if (loop == NULL || opts == NULL || out == NULL || opts->conninfo == NULL) return UV_EINVAL;
  if (keel_backoff_validate(&opts->reconnect_backoff, NULL) != 0) return UV_EINVAL;
  keel_pg *c = keel__calloc(1, sizeof *c);
  if (c == NULL) return UV_ENOMEM;
  c->loop = loop;
  c->opts = *opts;
  if (c->opts.connect_timeout_ms == 0) c->opts.connect_timeout_ms = 5000;
  c->conninfo = conninfo_with_keepalives(opts);
  if (c->conninfo == NULL) {
    keel__free(c);
    return UV_ENOMEM;
  }
  c->opts.conninfo = c->conninfo;
  c->poll_fd = -1;
  keel_rng_seed(&c->rng, uv_hrtime() ^ (uint64_t)(uintptr_t)c);
  uv_timer_init(loop, &c->connect_timer);
  uv_timer_init(loop, &c->health_timer);
  uv_timer_init(loop, &c->deadline_timer);
  uv_timer_init(loop, &c->flush_timer);
  c->connect_timer.data = c->health_timer.data = c->deadline_timer.data = c;
  c->flush_timer.data = c;
  /* An idle connection must not keep the loop running by its health check. */
  uv_unref((uv_handle_t *)&c->health_timer);
  c->handles_open = 4;
  start_connect(c);
  *out = c;
  return 0;
}

static void on_flush_timer(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  fail_stale_bound(c);
  flush_queries(c);
}

static int enqueue(keel_pg *c, const char *sql, int nparams, const char *const *values,
                   keel_pg_result_cb cb, void *data, uint64_t timeout_ms, bool internal,
                   bool cached) {
  /* One block: the query, the value pointers, then the SQL and values. */
  size_t sql_len = strlen(sql) + 1;
  size_t size = sizeof(keel__pg_query) + (size_t)nparams * sizeof(char *) + sql_len;
  for (int i = 0; i < nparams; i++)
    if (values[i] != NULL) size += strlen(values[i]) + 1;
  keel__pg_query *q = keel__malloc(size);
  if (q == NULL) return keel__fail(c->last_error, UV_ENOMEM, "out of memory");
  memset(q, 0, sizeof *q);
  char **value_ptrs = (char **)(q + 1);
  char *text = (char *)(value_ptrs + nparams);
  memcpy(text, sql, sql_len);
  q->sql = text;
  text += sql_len;
  for (int i = 0; i < nparams; i++) {
    if (values[i] == NULL) {
      value_ptrs[i] = NULL;
      continue;
    }
    size_t len = strlen(values[i]) + 1;
    memcpy(text, values[i], len);
    value_ptrs[i] = text;
    text += len;
  }
  q->values = (const char *const *)value_ptrs;
  q->nparams = nparams;
  q->cb = cb;
  q->data = data;
  q->internal = internal;
  q->cached = cached;
  q->prepare_slot = -1;
  q->session = internal ? 0 : c->bound_session;
  q->deadline_ms = timeout_ms != 0 ? now_ms(c) + timeout_ms : 0;
  if (c->pending_tail != NULL)
    c->pending_tail->next = q;
  else
    c->pending_head = q;
  c->pending_tail = q;
  c->pending_count++;
  /* Statements queued during one loop iteration go out together on the next
   * (one write in pipeline mode), and no callback ever runs inside
   * keel_pg_query(). */
  bool stale = q->session != 0 && (c->state != KEEL__PG_CONNECTED || q->session != c->session);
  if (stale) c->stale_possible = true;
  if ((c->state == KEEL__PG_CONNECTED || stale) && !uv_is_active((uv_handle_t *)&c->flush_timer))
    uv_timer_start(&c->flush_timer, on_flush_timer, 0, 0);
  arm_deadline(c);
  return 0;
}

int keel_pg_query(keel_pg *c, const char *sql, int nparams, const char *const *values,
                  keel_pg_result_cb cb, void *data) {
  if (c == NULL) return UV_EINVAL;
  if (sql == NULL || nparams < 0 || (nparams > 0 && values == NULL))
    return keel__fail(c->last_error, UV_EINVAL, "keel_pg_query: sql required, nparams >= 0");
  if (c->state == KEEL__PG_CLOSING) return KEEL_ECLOSING;
  if (c->state == KEEL__PG_STOPPED)
    return keel__fail(c->last_error, KEEL_ECONN, "not connected and reconnect is off");
  return enqueue(c, sql, nparams, values, cb, data, c->opts.query_timeout_ms, false, false);
}

int keel_pg_query_cached(keel_pg *c, const char *sql, int nparams, const char *const *values,
                         keel_pg_result_cb cb, void *data) {
  if (c == NULL) return UV_EINVAL;
  if (sql == NULL || nparams < 0 || (nparams > 0 && values == NULL))
    return keel__fail(c->last_error, UV_EINVAL, "keel_pg_query_cached: sql required");
  if (c->state == KEEL__PG_CLOSING) return KEEL_ECLOSING;
  if (c->state == KEEL__PG_STOPPED)
    return keel__fail(c->last_error, KEEL_ECONN, "not connected and reconnect is off");
  return enqueue(c, sql, nparams, values, cb, data, c->opts.query_timeout_ms, false, true);
}

bool keel_pg_is_connected(const keel_pg *c) {
  return c != NULL && c->state == KEEL__PG_CONNECTED;
}

int keel_pg_backend_pid(const keel_pg *c) {
  return c != NULL && c->state == KEEL__PG_CONNECTED ? PQbackendPID(c->conn) : 0;
}

void *keel_pg_raw(keel_pg *c) {
  return c == NULL ? NULL : c->conn;
}

const char *keel_pg_last_error(const keel_pg *c) {
  return c == NULL ? "connection is NULL" : c->last_error;
}

int keel_pg_reset(keel_pg *c) {
  if (c == NULL || c->state == KEEL__PG_CLOSING) return UV_EINVAL;
  if (c->state == KEEL__PG_CONNECTED || c->state == KEEL__PG_CONNECTING) {
    disconnect(c, KEEL_ECONN, "connection reset by keel_pg_reset()");
  }
  if (c->state == KEEL__PG_WAITING || c->state == KEEL__PG_STOPPED) {
    uv_timer_stop(&c->connect_timer);
    c->stats.reconnects++;
    start_connect(c);
  }
  return 0;
}

void keel_pg_get_stats(const keel_pg *c, keel_pg_stats *out) {
  if (c == NULL || out == NULL) return;
  *out = c->stats;
  out->in_flight = c->sent_count;
  out->queued = c->pending_count;
  out->connected = c->state == KEEL__PG_CONNECTED;
}

static void on_timer_closed(uv_handle_t *handle) {
  handle_closed(handle->data);
}

void keel_pg_close(keel_pg *c, keel_close_cb cb, void *data) {
  if (c == NULL || c->state == KEEL__PG_CLOSING) return;
  c->state = KEEL__PG_CLOSING;
  c->close_cb = cb;
  c->close_data = data;
  drop_poll(c);
  if (c->conn != NULL) {
    PQfinish(c->conn);
    c->conn = NULL;
  }
  /* Queued statements stay where they are (nothing sends them now) and are
   * cancelled once the handles have closed: see handle_closed(). */
  uv_close((uv_handle_t *)&c->connect_timer, on_timer_closed);
  uv_close((uv_handle_t *)&c->health_timer, on_timer_closed);
  uv_close((uv_handle_t *)&c->deadline_timer, on_timer_closed);
  uv_close((uv_handle_t *)&c->flush_timer, on_timer_closed);
}

/* ---- for the pool ------------------------------------------------------- */

uint64_t keel__pg_session(const keel_pg *c) {
  return c->session;
}

void keel__pg_bind(keel_pg *c, bool on) {
  c->bound_session = on ? c->session : 0;
  c->bound_status = 0;
  c->bound_sqlstate[0] = '\0';
  c->bound_error[0] = '\0';
}

int keel__pg_bound_failure(const keel_pg *c, const char **sqlstate, const char **text) {
  *sqlstate = c->bound_sqlstate;
  *text = c->bound_error;
  return c->bound_status;
}

void keel__pg_note_failure(keel_pg *c, const keel__pg_query *q, int status, const PGresult *res) {
  if (status == 0 || q->internal || c->bound_status != 0 || c->bound_session == 0 ||
      q->session != c->bound_session)
    return;
  c->bound_status = status;
  const char *state = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  snprintf(c->bound_sqlstate, sizeof c->bound_sqlstate, "%s", state != NULL ? state : "");
  snprintf(c->bound_error, sizeof c->bound_error, "%s", c->last_error);
}
