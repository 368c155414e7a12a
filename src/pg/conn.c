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
static void disconnect(keel_pg *c, int status, const char *reason);
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
  opts->max_pending = 100000;
}

static uint64_t now_ms(keel_pg *c) {
  return uv_now(c->loop);
}

bool keel__pg_idle(const keel_pg *c) {
  return c->pending_head == NULL && c->sent_head == NULL;
}

/* ---- transaction control ------------------------------------------------ */

static bool is_space(char ch) {
  return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v';
}

static bool is_letter(char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_';
}

/* Reads the next keyword of sql from *at (after blanks and comments), lower
 * case, into word; "" when the next token is not a word. */
static void next_word(const char *sql, size_t *at, char *word, size_t cap) {
  size_t i = *at;
  for (;;) {
    while (is_space(sql[i])) i++;
    if (sql[i] == '-' && sql[i + 1] == '-') {
      while (sql[i] != '\0' && sql[i] != '\n') i++;
      continue;
    }
    if (sql[i] == '/' && sql[i + 1] == '*') {
      i += 2;
      while (sql[i] != '\0' && !(sql[i] == '*' && sql[i + 1] == '/')) i++;
      if (sql[i] != '\0') i += 2;
      continue;
    }
    break;
  }
  size_t n = 0;
  while (is_letter(sql[i])) {
    char ch = sql[i++];
    if (ch >= 'A' && ch <= 'Z') ch = (char)(ch - 'A' + 'a');
    if (n + 1 < cap) word[n++] = ch;
  }
  word[n] = '\0';
  *at = i;
}

/* What the statement does to the session's transaction block, from its
 * leading keywords (one statement per query in the extended protocol);
 * *copy: it is a COPY. */
static unsigned char classify_statement(const char *sql, bool *chain, bool *copy) {
  char words[6][16];
  size_t at = 0;
  int n = 0;
  for (; n < 6; n++) {
    next_word(sql, &at, words[n], sizeof words[n]);
    if (words[n][0] == '\0') break;
  }
  *chain = false;
  *copy = n > 0 && strcmp(words[0], "copy") == 0;
  if (n == 0) return KEEL__PG_KIND_OTHER;
  const char *w = words[0];
  bool second_prepared = n > 1 && strcmp(words[1], "prepared") == 0;
  unsigned char kind = KEEL__PG_KIND_OTHER;
  if (strcmp(w, "begin") == 0)
    kind = KEEL__PG_KIND_BEGIN;
  else if (strcmp(w, "start") == 0 && n > 1 && strcmp(words[1], "transaction") == 0)
    kind = KEEL__PG_KIND_BEGIN;
  else if ((strcmp(w, "commit") == 0 || strcmp(w, "end") == 0) && !second_prepared)
    kind = KEEL__PG_KIND_COMMIT;
  else if (strcmp(w, "prepare") == 0 && n > 1 && strcmp(words[1], "transaction") == 0)
    kind = KEEL__PG_KIND_COMMIT;
  else if ((strcmp(w, "rollback") == 0 || strcmp(w, "abort") == 0) && !second_prepared &&
           !(n > 1 && strcmp(words[1], "to") == 0))
    kind = KEEL__PG_KIND_ROLLBACK;
  if (kind == KEEL__PG_KIND_COMMIT || kind == KEEL__PG_KIND_ROLLBACK)
    for (int i = 1; i + 1 < n; i++)
      if (strcmp(words[i], "and") == 0 && strcmp(words[i + 1], "chain") == 0) *chain = true;
  return kind;
}

/* true when q must not run now: it is bound to a session that is gone, or
 * it belongs to a transaction block whose BEGIN failed or whose session was
 * lost (the server rolled the block back; running it in autocommit on a new
 * session would apply half a transaction). */
static bool unrunnable(const keel_pg *c, const keel__pg_query *q) {
  bool live = c->state == KEEL__PG_CONNECTED;
  if (q->session != 0 && (!live || q->session != c->session)) return true;
  if (q->block != 0 && !q->begins_block && q->block <= c->blocks_begun &&
      !(live && c->live_block == q->block))
    return true;
  return false;
}

static void on_flush_timer(uv_timer_t *timer);

static void schedule_flush(keel_pg *c) {
  if (c->state != KEEL__PG_CLOSING && !uv_is_active((uv_handle_t *)&c->flush_timer))
    uv_timer_start(&c->flush_timer, on_flush_timer, 0, 0);
}

/* ---- delivering results ------------------------------------------------ */

void keel__pg_deliver(keel_pg *c, keel__pg_query *q, int status, PGresult *res, const char *text) {
  if (q->begins_block) {
    /* The BEGIN has left the queue: the block's other statements may now be
     * judged. A failed BEGIN opened no block: the statements queued in it
     * fail, later ones are not bound to it (but a COMMIT/ROLLBACK that
     * follows at once still is: it must not run alone). */
    if (q->block > c->blocks_begun) c->blocks_begun = q->block;
    if (status != 0) {
      if (c->live_block == q->block) c->live_block = 0;
      if (c->enq_block == q->block) {
        c->enq_block = 0;
        c->failed_block = q->block;
      }
      c->stale_possible = true;
      schedule_flush(c);
    }
  }
  if (!q->internal) { /* health checks are not the user's statements */
    c->stats.queries++;
    if (status == KEEL_EPG) c->stats.errors++;
    if (status == KEEL_EINDOUBT) c->stats.in_doubt++;
  }
  if (status != 0) c->error_generation++;
  if ((status == KEEL_EPG || status == KEEL_EINDOUBT) && res != NULL) {
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

/* Fails the unsent statements that must not run (see unrunnable()): they
 * belong to a transaction the server already rolled back, or whose BEGIN
 * failed, and must never run in autocommit on a new session. */
static void fail_stale_bound(keel_pg *c) {
  /* Only a new session, a lost one, a failed BEGIN or a stale enqueue can
   * make a statement stale: walking the queue on every flush would make a
   * long queue quadratic. */
  if (!c->stale_possible) return;
  c->stale_possible = false;
  keel__pg_query **link = &c->pending_head;
  keel__pg_query *prev = NULL;
  keel__pg_query *stale = NULL, *stale_tail = NULL;
  while (*link != NULL) {
    keel__pg_query *q = *link;
    if (unrunnable(c, q)) {
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
                     "not run: its transaction block was rolled back with a lost session, "
                     "or its BEGIN failed");
    stale = next;
  }
  /* Closed meanwhile: the rest are cancelled like every other statement. */
  while (stale != NULL) {
    keel__pg_query *next = stale->next;
    keel__pg_deliver(c, stale, UV_ECANCELED, NULL, "connection closed");
    stale = next;
  }
}

static bool has_sqlstate(const PGresult *res, const char *state) {
  const char *s = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  return s != NULL && strcmp(s, state) == 0;
}

/* 26000 (prepared statement does not exist) or 42P05 (already exists). */
static bool name_unknown(const PGresult *res) {
  return has_sqlstate(res, "26000") || has_sqlstate(res, "42P05");
}

/* The reply of a statement sent by name whose PREPARE failed: the
 * PREPARE's error when the statement itself could not run for want of it
 * (26000, 25P02 in an aborted block, a skipped pipeline), else its own
 * reply (it ran: the name was there, and stands for this text only).
 * *exists: the PREPARE failed with 42P05. */
static PGresult *take_inherited(keel__pg_query *q, PGresult *res, bool *exists) {
  PGresult *prep = q->inherited;
  *exists = false;
  if (prep == NULL) return res;
  q->inherited = NULL;
  *exists = has_sqlstate(prep, "42P05");
  bool use = res == NULL || has_sqlstate(res, "26000") || has_sqlstate(res, "25P02");
#if defined(LIBPQ_HAS_PIPELINING)
  if (res != NULL && PQresultStatus(res) == PGRES_PIPELINE_ABORTED) use = true;
#endif
  if (!use) {
    PQclear(prep);
    return res;
  }
  if (res != NULL) PQclear(res);
  return prep;
}

static bool reply_ok(const PGresult *res) {
  ExecStatusType st = PQresultStatus(res);
  return st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK || st == PGRES_EMPTY_QUERY;
}

/*
 * Delivers a sent statement whose session ended (lost, reset, timed out or
 * closed) before its sync point. A reply that arrived in full is kept: an
 * error, or a success of a statement whose effect the reply itself settles
 * (transaction control; a statement inside a transaction block). An
 * autocommit statement commits only at its sync: with the reply in but not
 * the sync, and with no reply at all, it may or may not have taken effect
 * (`unknown`). A COMMIT without its reply is unknown too. Everything else
 * rolled back with the session: `certain`.
 */
static void deliver_lost(keel_pg *c, keel__pg_query *q, int certain, int unknown, const char *why) {
  PGresult *res = q->result;
  q->result = NULL;
  if (res != NULL && q->inherited != NULL) { /* a failed PREPARE's error may be its reply */
    bool exists;
    res = take_inherited(q, res, &exists);
  }
  if (res != NULL) {
    if (!reply_ok(res)) {
      keel__pg_deliver(c, q, KEEL_EPG, res, NULL);
      return;
    }
    if (q->kind != KEEL__PG_KIND_OTHER || q->in_block) {
      keel__pg_deliver(c, q, 0, res, NULL);
      return;
    }
  }
  if (res != NULL) PQclear(res);
  bool doubt = q->kind == KEEL__PG_KIND_COMMIT || q->commit_after ||
               (q->kind == KEEL__PG_KIND_OTHER && !q->in_block);
  int status = doubt ? unknown : certain;
  char text[KEEL__ERRBUF_SIZE];
  if (status == KEEL_EINDOUBT)
    snprintf(text, sizeof text,
             "%s before the statement's outcome was known: it was sent and may or may not have "
             "taken effect",
             why);
  else
    snprintf(text, sizeof text, "%s", why);
  keel__pg_deliver(c, q, status, NULL, text);
}

/* ---- socket watching ---------------------------------------------------- */

/* Frees the connection once it is closing and its last handle is closed. */
static void free_conn_memory(keel_pg *c);

static void handle_closed(keel_pg *c) {
  c->handles_open--;
  if (c->state != KEEL__PG_CLOSING || c->handles_open != 0) return;
  /* What close left queued is cancelled now, on a later iteration than the
   * close call: in-flight statements first, then unsent ones, as queued. */
  keel__pg_query *sent = c->sent_head;
  c->sent_head = c->sent_tail = NULL;
  c->sent_count = 0;
  c->sent_deadlines = 0;
  while (sent != NULL) { /* a reply already in is still delivered as it is */
    keel__pg_query *next = sent->next;
    deliver_lost(c, sent, UV_ECANCELED, UV_ECANCELED, "connection closed");
    sent = next;
  }
  keel__pg_fail_all(c, &c->pending_head, &c->pending_tail, &c->pending_count, UV_ECANCELED,
                    "connection closed");
  keel_close_cb cb = c->close_cb;
  void *data = c->close_data;
  free_conn_memory(c);
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

/* Marks the statements of a block whose COMMIT was sent after them (the
 * COMMIT's fate is theirs). Blocks are contiguous in send order: one walk
 * over the reversed list, reversed back. */
static keel__pg_query *reverse(keel__pg_query *q) {
  keel__pg_query *prev = NULL;
  while (q != NULL) {
    keel__pg_query *next = q->next;
    q->next = prev;
    prev = q;
    q = next;
  }
  return prev;
}

static void mark_commit_after(keel__pg_query *head) {
  keel__pg_query *tail = reverse(head);
  uint64_t committing = 0;
  for (keel__pg_query *q = tail; q != NULL; q = q->next) {
    if (q->block != 0 && q->block == committing) q->commit_after = true;
    if (q->kind == KEEL__PG_KIND_COMMIT && q->block != 0) committing = q->block;
  }
  reverse(tail);
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
  /* A refused login or a missing database will not fix itself: stop,
   * unless told to keep trying. */
  bool permanent =
      (status == KEEL_EAUTH || status == KEEL_ENODB) && !c->opts.retry_permanent_errors;
  c->state = c->opts.reconnect && !permanent ? KEEL__PG_WAITING : KEEL__PG_STOPPED;
  if (c->state == KEEL__PG_STOPPED) {
    c->stop_status = permanent ? status : KEEL_ECONN;
    snprintf(c->stop_reason, sizeof c->stop_reason, "%s", why);
  }
  c->stale_possible = true;
  c->live_block = 0;
  c->send_in_block = false;
  /* Sent statements: kept, in doubt or failed (deliver_lost()). Unsent ones
   * wait for the next connection, unless there will be none. */
  keel__pg_query *sent = c->sent_head;
  c->sent_head = c->sent_tail = NULL;
  c->sent_count = 0;
  c->sent_deadlines = 0;
  mark_commit_after(sent);
  while (sent != NULL) {
    keel__pg_query *next = sent->next;
    deliver_lost(c, sent, KEEL_ECONN, KEEL_EINDOUBT, why);
    sent = next;
  }
  if (c->state == KEEL__PG_CLOSING) return;
  fail_stale_bound(c);
  if (c->state == KEEL__PG_CLOSING) return;
  if (c->state == KEEL__PG_STOPPED)
    keel__pg_fail_all(c, &c->pending_head, &c->pending_tail, &c->pending_count,
                      c->stop_status == KEEL_ECONN ? KEEL_ECONN : status, why);
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

/* The code of a failed login: libpq keeps no SQLSTATE for it, but with
 * verbose errors (set while connecting) its message carries one. */
static int connect_error_code(PGconn *conn) {
  if (conn == NULL) return KEEL_ECONN;
  if (PQconnectionNeedsPassword(conn)) return KEEL_EAUTH;
  const char *message = PQerrorMessage(conn);
  if (strstr(message, ":  28P01:") != NULL || strstr(message, ":  28000:") != NULL)
    return KEEL_EAUTH;
  if (strstr(message, ":  3D000:") != NULL) return KEEL_ENODB;
  return KEEL_ECONN;
}

/* libpq's message without the verbose LOCATION lines, on one line. */
static void connect_message(PGconn *conn, char *out, size_t cap) {
  const char *m = conn != NULL ? PQerrorMessage(conn) : "";
  size_t n = 0;
  while (*m != '\0' && n + 1 < cap) {
    const char *eol = strchr(m, '\n');
    size_t len = eol != NULL ? (size_t)(eol - m) : strlen(m);
    if (strncmp(m, "LOCATION:", 9) != 0 && len > 0) {
      if (n > 0 && n + 2 < cap) {
        out[n++] = ';';
        out[n++] = ' ';
      }
      size_t room = cap - 1 - n;
      size_t take = len < room ? len : room;
      memcpy(out + n, m, take);
      n += take;
    }
    m += len;
    if (*m == '\n') m++;
  }
  out[n] = '\0';
}

static void fail_connect(keel_pg *c, int status) {
  char why[2 * KEEL__ERRBUF_SIZE], message[KEEL__ERRBUF_SIZE];
  connect_message(c->conn, message, sizeof message);
  if (status == KEEL_ECONN) status = connect_error_code(c->conn);
  if (status == UV_ETIMEDOUT)
    snprintf(why, sizeof why, "connect timed out after %u ms%s%s%s", c->opts.connect_timeout_ms,
             c->lookup != NULL ? " (resolving the host name)" : "", message[0] ? ": " : "",
             message);
  else
    snprintf(why, sizeof why, "connection failed (%s): %s", keel_err_name(status),
             message[0] ? message : keel_strerror(status));
  disconnect(c, status, why);
}

static void on_connect_timeout(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  if (c->state == KEEL__PG_CONNECTING) fail_connect(c, UV_ETIMEDOUT);
}

static void on_health_timer(uv_timer_t *timer);

static void connected(keel_pg *c) {
  uv_timer_stop(&c->connect_timer);
  PQsetErrorVerbosity(c->conn, PQERRORS_DEFAULT);
  c->state = KEEL__PG_CONNECTED;
  c->stats.connects++;
  c->session++;
  /* A fresh name space for prepared statements in every session: a pooled
   * server connection may still hold the names of an earlier one. */
  if (uv_random(NULL, NULL, &c->nonce, sizeof c->nonce, 0, NULL) != 0)
    c->nonce = keel_rng_next(&c->rng) ^ uv_hrtime();
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

/* Server notices are not printed (libpq would write them to stderr). A
 * FATAL or PANIC that arrives while no statement is in flight comes here
 * too: the server is ending the session (57P01 after pg_terminate_backend,
 * an idle-session timeout), so it is lost now, not at the EOF that follows. */
static void on_notice(void *arg, const PGresult *res) {
  keel_pg *c = arg;
  const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
  if (severity == NULL) severity = PQresultErrorField(res, PG_DIAG_SEVERITY);
  if (severity == NULL || (strcmp(severity, "FATAL") != 0 && strcmp(severity, "PANIC") != 0))
    return;
  const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
  const char *message = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
  c->session_ending = true;
  snprintf(c->ending, sizeof c->ending, "connection lost (SQLSTATE %s: %s)",
           state ? state : "?????", message ? message : "session ended by the server");
}

/* Opens the libpq connection: with the conninfo as given, or (resolved)
 * with the host, hostaddr and port lists built by the lookups. */
static void open_connection(keel_pg *c, bool resolved) {
  if (!resolved) {
    c->conn = PQconnectStart(c->conninfo);
  } else {
    size_t n = 0;
    for (PQconninfoOption *o = c->params; o->keyword != NULL; o++) n++;
    const char **keys = keel__calloc(n + 4, sizeof *keys);
    const char **values = keel__calloc(n + 4, sizeof *values);
    if (keys == NULL || values == NULL) {
      keel__free(keys);
      keel__free(values);
      disconnect(c, UV_ENOMEM, "out of memory starting a connection");
      return;
    }
    size_t k = 0;
    for (PQconninfoOption *o = c->params; o->keyword != NULL; o++) {
      if (o->val == NULL || strcmp(o->keyword, "hostaddr") == 0 || strcmp(o->keyword, "host") == 0)
        continue;
      if (c->ports != NULL && strcmp(o->keyword, "port") == 0) continue;
      keys[k] = o->keyword;
      values[k++] = o->val;
    }
    keys[k] = "host"; /* kept for TLS (SNI, certificate name) and messages */
    values[k++] = c->out[0];
    keys[k] = "hostaddr";
    values[k++] = c->out[1];
    if (c->ports != NULL) {
      keys[k] = "port";
      values[k++] = c->out[2];
    }
    c->conn = PQconnectStartParams(keys, values, 0);
    keel__free(keys);
    keel__free(values);
  }
  if (c->conn == NULL) {
    disconnect(c, UV_ENOMEM, "out of memory starting a connection");
    return;
  }
  /* The SQLSTATE of a refused login shows only in verbose messages. */
  PQsetErrorVerbosity(c->conn, PQERRORS_VERBOSE);
  if (PQstatus(c->conn) == CONNECTION_BAD) {
    fail_connect(c, KEEL_ECONN);
    return;
  }
  PQsetnonblocking(c->conn, 1);
  /* libpq prints server notices to stderr by default; a library must not. */
  c->session_ending = false;
  PQsetNoticeReceiver(c->conn, on_notice, c);
  continue_connect(c);
}

/* ---- host name resolution (libuv's threadpool, never the loop) --------- */

typedef struct keel__pg_lookup {
  uv_getaddrinfo_t req;
  keel_pg *c;
  uint64_t attempt;
} keel__pg_lookup;

static bool needs_lookup(const char *host) {
  if (host[0] == '\0' || host[0] == '/' || host[0] == '@') return false;
  unsigned char buf[16];
  return uv_inet_pton(AF_INET, host, buf) != 0 && uv_inet_pton(AF_INET6, host, buf) != 0;
}

static const char *list_item(const char *list, unsigned index) {
  const char *h = list;
  for (unsigned i = 0; i < index; i++) h += strlen(h) + 1;
  return h;
}

/* Appends an item to out list k (0 host, 1 hostaddr, 2 port); `first`:
 * the list's first item (an empty first hostaddr still counts as one). */
static bool out_append(keel_pg *c, int k, const char *item, bool first) {
  size_t len = strlen(item);
  size_t need = c->out_len[k] + len + 2;
  if (need > c->out_cap[k]) {
    size_t cap = need * 2;
    char *grown = keel__realloc(c->out[k], cap);
    if (grown == NULL) return false;
    c->out[k] = grown;
    c->out_cap[k] = cap;
  }
  if (!first) c->out[k][c->out_len[k]++] = ',';
  memcpy(c->out[k] + c->out_len[k], item, len);
  c->out_len[k] += len;
  c->out[k][c->out_len[k]] = '\0';
  return true;
}

/* One host/hostaddr(/port) entry for libpq; addr "" = use the name. */
static bool add_target(keel_pg *c, const char *addr) {
  const char *host = list_item(c->hosts, c->host_index);
  bool first = c->out_len[0] == 0; /* host names are never empty */
  return out_append(c, 0, host, first) && out_append(c, 1, addr, first) &&
         (c->ports == NULL || out_append(c, 2, list_item(c->ports, c->host_index), first));
}

static void resolve_next(keel_pg *c);

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  keel__pg_lookup *lookup = KEEL__CONTAINER_OF(req, keel__pg_lookup, req);
  keel_pg *c = lookup->c;
  bool current = c->lookup == lookup;
  keel__free(lookup);
  if (!current) { /* its attempt timed out, was reset or closed */
    if (res != NULL) uv_freeaddrinfo(res);
    handle_closed(c);
    return;
  }
  c->lookup = NULL;
  c->handles_open--;
  if (c->state != KEEL__PG_CONNECTING) {
    if (res != NULL) uv_freeaddrinfo(res);
    return;
  }
  /* Every address, in the resolver's order, as libpq itself would try
   * them: one host entry per address (at most 8 per name). */
  int added = 0;
  bool oom = false;
  for (struct addrinfo *ai = res; status == 0 && ai != NULL && added < 8 && !oom;
       ai = ai->ai_next) {
    char addr[64] = "";
    if (ai->ai_family == AF_INET6)
      uv_ip6_name((const struct sockaddr_in6 *)ai->ai_addr, addr, sizeof addr);
    else if (ai->ai_family == AF_INET)
      uv_ip4_name((const struct sockaddr_in *)ai->ai_addr, addr, sizeof addr);
    if (addr[0] == '\0') continue;
    if (!add_target(c, addr))
      oom = true;
    else
      added++;
  }
  if (res != NULL) uv_freeaddrinfo(res);
  if (oom) {
    disconnect(c, UV_ENOMEM, "out of memory resolving the host name");
    return;
  }
  if (added == 0) {
    char why[KEEL__ERRBUF_SIZE];
    snprintf(why, sizeof why, "could not resolve host \"%s\": %s",
             list_item(c->hosts, c->host_index), status != 0 ? uv_strerror(status) : "no address");
    disconnect(c, KEEL_ECONN, why);
    return;
  }
  c->host_index++;
  resolve_next(c);
}

static void resolve_next(keel_pg *c) {
  while (c->host_index < c->nhosts) {
    const char *host = list_item(c->hosts, c->host_index);
    if (!needs_lookup(host)) {
      if (!add_target(c, "")) { /* libpq uses the host item itself */
        disconnect(c, UV_ENOMEM, "out of memory resolving the host name");
        return;
      }
      c->host_index++;
      continue;
    }
    keel__pg_lookup *lookup = keel__malloc(sizeof *lookup);
    if (lookup == NULL) {
      disconnect(c, UV_ENOMEM, "out of memory resolving the host name");
      return;
    }
    lookup->c = c;
    lookup->attempt = c->attempt;
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = uv_getaddrinfo(c->loop, &lookup->req, on_resolved, host, NULL, &hints);
    if (rc != 0) {
      keel__free(lookup);
      char why[KEEL__ERRBUF_SIZE];
      snprintf(why, sizeof why, "could not resolve host \"%s\": %s", host, uv_strerror(rc));
      disconnect(c, rc == UV_ENOMEM ? UV_ENOMEM : KEEL_ECONN, why);
      return;
    }
    c->lookup = lookup;
    c->handles_open++;
    return;
  }
  open_connection(c, true);
}

static void start_connect(keel_pg *c) {
  c->state = KEEL__PG_CONNECTING;
  c->attempt++;
  c->lookup = NULL; /* a lookup of an earlier attempt finishes on its own */
  /* The deadline covers the name lookup too. */
  uv_timer_start(&c->connect_timer, on_connect_timeout, c->opts.connect_timeout_ms, 0);
  if (c->hosts == NULL) {
    open_connection(c, false);
    return;
  }
  c->host_index = 0;
  c->out_len[0] = c->out_len[1] = c->out_len[2] = 0;
  resolve_next(c);
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
  if (q->deadline_ms != 0) c->sent_deadlines++;
}

uint64_t keel__pg_hash(const char *sql) {
  uint64_t h = 14695981039346656037ull;
  for (const unsigned char *p = (const unsigned char *)sql; *p; p++)
    h = (h ^ *p) * 1099511628211ull;
  return h;
}

/* The cache slot of sql prepared in this session, or a slot to prepare it
 * in (*fresh = true), or -1 when the cache is full or another text of this
 * session has the same hash (its name would be the same: sent unnamed). */
static int prepared_slot(keel_pg *c, const char *sql, bool *fresh) {
  int free_slot = -1;
  uint64_t hash = keel__pg_hash(sql);
  for (int i = 0; i < KEEL__PG_PREPARED_MAX; i++) {
    keel__pg_prepared *p = &c->prepared[i];
    if (p->sql == NULL || p->session != c->session) {
      if (free_slot < 0) free_slot = i;
      continue;
    }
    if (p->hash == hash) {
      if (strcmp(p->sql, sql) != 0) return -1;
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
  p->hash = hash;
  *fresh = true;
  return free_slot;
}

static void drop_prepared(keel_pg *c, int slot) {
  keel__free(c->prepared[slot].sql);
  c->prepared[slot].sql = NULL;
}

/* What a failed libpq send call means: the session is gone (KEEL_ECONN), or
 * libpq refused this statement and the connection is fine (KEEL_ESEND). */
static int send_failure(keel_pg *c) {
  return PQstatus(c->conn) == CONNECTION_BAD ? KEEL_ECONN : KEEL_ESEND;
}

/* keel's own SQL on a connection that sends unnamed statements (through a
 * transaction pooler every unnamed statement is parsed and planned on every
 * call) with nothing in flight: one simple-protocol Query with the values
 * as quoted literals, instead of Parse/Bind/Describe/Execute/Sync. The
 * server then skips the unnamed statement's plan-cache copies, and the
 * pooler relays one message each way instead of five and six. A literal
 * '...' is typed by its context exactly as a parameter sent without a
 * type is. Pipeline mode is left for it (libpq sends no simple Query in
 * it) and entered again by flush_queries() once it is back. Returns 0,
 * KEEL_ESEND, KEEL_ECONN, or 1 when it cannot go this way (a value with a
 * backslash, which '...' means differently under
 * standard_conforming_strings = off; an encoding error; no memory): then
 * it is sent unnamed as usual.
 * The SQL must be keel's: parameters only as $n, outside '...' and "..."
 * only, no comments, no dollar quoting, no E'...' strings. */
static int send_literal(keel_pg *c, keel__pg_query *q) {
  size_t dollars = 0, widest = 4; /* NULL */
  for (const char *s = q->sql; *s; s++) dollars += *s == '$';
  for (int i = 0; i < q->nparams; i++) {
    const char *v = q->values[i];
    if (v == NULL) continue;
    if (strchr(v, '\\') != NULL) return 1;
    size_t need = 2 * strlen(v) + 3;
    if (need > widest) widest = need;
  }
  size_t cap = strlen(q->sql) + 1 + dollars * widest;
  char small[1024];
  char *buf = cap <= sizeof small ? small : keel__malloc(cap);
  if (buf == NULL) return 1;
  char *o = buf;
  const char *s = q->sql;
  bool ok = true;
  while (*s != '\0' && ok) {
    char ch = *s;
    if (ch == '\'' || ch == '"') {
      /* A quoted run goes verbatim; a doubled quote ends one run and opens
       * the next. */
      *o++ = *s++;
      while (*s != '\0' && *s != ch) *o++ = *s++;
      if (*s != '\0') *o++ = *s++;
      continue;
    }
    if (ch != '$' || s[1] < '0' || s[1] > '9') {
      *o++ = *s++;
      continue;
    }
    long n = 0;
    for (s++; *s >= '0' && *s <= '9' && n <= KEEL__PG_MAX_PARAMS; s++) n = n * 10 + (*s - '0');
    if (n < 1 || n > q->nparams) {
      ok = false;
      break;
    }
    const char *v = q->values[n - 1];
    if (v == NULL) {
      memcpy(o, "NULL", 4);
      o += 4;
      continue;
    }
    int err = 0;
    *o++ = '\'';
    o += PQescapeStringConn(c->conn, o, v, strlen(v), &err);
    *o++ = '\'';
    ok = err == 0;
  }
  *o = '\0';
  int rc = 1;
  if (ok) {
#if defined(LIBPQ_HAS_PIPELINING)
    if (c->pipeline_on && PQexitPipelineMode(c->conn) == 1) c->pipeline_on = false;
#endif
    if (!c->pipeline_on) rc = PQsendQuery(c->conn, buf) ? 0 : send_failure(c);
  }
  if (buf != small) keel__free(buf);
  return rc;
}

/* Sends one statement: by name when it is cached (preparing it first, in
 * the same pipeline, the first time in a session), otherwise with its text.
 * Returns 0, KEEL_ESEND (libpq refused it; nothing of it was queued) or
 * KEEL_ECONN (the connection is unusable). */
static int send_statement(keel_pg *c, keel__pg_query *q) {
  if (q->literal && c->unnamed && c->sent_head == NULL) {
    int rc = send_literal(c, q);
    if (rc != 1) return rc;
  }
#if defined(LIBPQ_HAS_PIPELINING)
  if (q->cached && c->pipeline_on && !c->unnamed) {
    bool fresh = false;
    int slot = prepared_slot(c, q->sql, &fresh);
    if (slot >= 0) {
      /* Unique to the text and to this session: on any server connection
       * (a pooler shares them) the name stands for this text only. */
      char name[48];
      snprintf(name, sizeof name, "keel_%016llx_%016llx",
               (unsigned long long)c->prepared[slot].hash, (unsigned long long)c->nonce);
      keel__pg_query *prepare = NULL;
      if (fresh) {
        prepare = keel__calloc(1, sizeof *prepare);
        if (prepare == NULL) {
          drop_prepared(c, slot);
          return PQsendQueryParams(c->conn, q->sql, q->nparams, NULL, q->values, NULL, NULL, 0)
                     ? 0
                     : send_failure(c);
        }
        prepare->internal = true;
        prepare->prepare_slot = slot;
        /* It heads the sent list before q: q's deadline must apply to it. */
        prepare->deadline_ms = q->deadline_ms;
        if (!PQsendPrepare(c->conn, name, q->sql, q->nparams, NULL)) {
          keel__free(prepare);
          drop_prepared(c, slot);
          return send_failure(c);
        }
        /* No sync between the PREPARE and the statement: one implicit
         * transaction. When the PREPARE fails (42P05: a pooled server
         * connection has the name already; a syntax error) the server skips
         * the statement, so it never runs under a name keel did not just
         * prepare; and a transaction pooler keeps both on one server
         * connection. Its result comes first: it goes into the sent list
         * ahead of q and ends at its own NULL, not at a sync. */
        prepare->joined = true;
        if (c->sent_tail != NULL)
          c->sent_tail->next = prepare;
        else
          c->sent_head = prepare;
        c->sent_tail = prepare;
        c->sent_count++;
        if (prepare->deadline_ms != 0) c->sent_deadlines++;
      }
      if (PQsendQueryPrepared(c->conn, name, q->nparams, q->values, NULL, NULL, 0)) {
        q->named = true;
        return 0;
      }
      /* Its PREPARE went out alone: it gets a sync of its own, and its
       * result must not be handed to the statement that follows. */
      drop_prepared(c, slot);
      if (prepare != NULL) {
        prepare->orphan = true;
        prepare->joined = false;
        if (!PQpipelineSync(c->conn)) return KEEL_ECONN;
      }
      return send_failure(c);
    }
  }
#endif
  return PQsendQueryParams(c->conn, q->sql, q->nparams, NULL, q->values, NULL, NULL, 0)
             ? 0
             : send_failure(c);
}

/* Notes, in send order, whether q runs inside an explicit transaction
 * block: libpq knows exactly when nothing is in flight; statements
 * pipelined behind others are judged by the keywords sent before them. */
static void track_send(keel_pg *c, keel__pg_query *q, PGTransactionStatusType ts) {
  {
    if (ts == PQTRANS_IDLE)
      c->send_in_block = false;
    else if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR)
      c->send_in_block = true;
  }
  q->in_block = c->send_in_block;
  if (q->kind == KEEL__PG_KIND_BEGIN) c->send_in_block = true;
  if ((q->kind == KEEL__PG_KIND_COMMIT || q->kind == KEEL__PG_KIND_ROLLBACK) && !q->chain)
    c->send_in_block = false;
  if (q->begins_block) {
    if (q->block > c->blocks_begun) c->blocks_begun = q->block;
    c->live_block = q->block;
  }
}

static void flush_queries(keel_pg *c) {
  if (c->state != KEEL__PG_CONNECTED) return;
  fail_stale_bound(c);
  if (c->state != KEEL__PG_CONNECTED) return;
  while (c->pending_head != NULL) {
#if defined(LIBPQ_HAS_PIPELINING)
    /* Back to pipeline mode after a simple query (send_literal). */
    if (!c->pipeline_on && c->opts.pipeline && c->sent_head == NULL &&
        PQenterPipelineMode(c->conn) == 1)
      c->pipeline_on = true;
#endif
    /* Without pipelining, one statement at a time. */
    if (!c->pipeline_on && c->sent_head != NULL) break;
    /* Nothing behind a COPY until it is done: PgBouncer (before 1.22.1)
     * loses count of the syncs at a COPY's end and gives the server
     * connection back at its ReadyForQuery, dropping (or handing to another
     * client) the replies of statements pipelined behind it. */
    if (c->sent_tail != NULL && c->sent_tail->copy) break;
    keel__pg_query *q = c->pending_head;
    /* Made stale after the walk above (by a callback): the flush timer
     * fails it. */
    if (unrunnable(c, q)) {
      c->stale_possible = true;
      schedule_flush(c);
      break;
    }
    /* Read before sending: with a statement in flight libpq says ACTIVE. */
    PGTransactionStatusType ts =
        c->sent_head == NULL ? PQtransactionStatus(c->conn) : PQTRANS_UNKNOWN;
    int rc = send_statement(c, q);
    if (rc == KEEL_ESEND) {
      /* libpq refused this statement (the connection is fine): it alone
       * fails, the queue goes on. */
      char why[KEEL__ERRBUF_SIZE];
      snprintf(why, sizeof why, "libpq refused to send the statement: %s", PQerrorMessage(c->conn));
      size_t len = strlen(why);
      while (len > 0 && (why[len - 1] == '\n' || why[len - 1] == ' ')) why[--len] = '\0';
      c->pending_head = q->next;
      if (c->pending_head == NULL) c->pending_tail = NULL;
      c->pending_count--;
      q->next = NULL;
      keel__pg_deliver(c, q, KEEL_ESEND, NULL, why);
      if (c->state != KEEL__PG_CONNECTED) return;
      continue;
    }
    if (rc != 0) {
      disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
      return;
    }
#if defined(LIBPQ_HAS_PIPELINING)
    if (c->pipeline_on && !PQpipelineSync(c->conn)) {
      disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
      return;
    }
#endif
    track_send(c, q, ts);
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
  if (q->deadline_ms != 0) c->sent_deadlines--;
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
      if (c->sent_head != NULL && res != NULL && !q->orphan) {
        c->sent_head->inherited = res;
        res = NULL;
      }
    }
    if (res != NULL) PQclear(res);
    keel__free(q);
    return;
  }
  bool prepare_exists = false;
  res = take_inherited(q, res, &prepare_exists);
  if (q->named && c->opts.statement_mode == KEEL_PG_STATEMENTS_AUTO &&
      (prepare_exists || name_unknown(res))) {
    /* The server did not know the name (26000), or already had it (42P05):
     * a transaction pooler sends statements to changing server
     * connections. Unnamed statements from now on. */
    c->unnamed = true;
    if (name_unknown(res)) {
      if (!q->in_block && q->kind == KEEL__PG_KIND_OTHER && !q->retried &&
          c->state == KEEL__PG_CONNECTED) {
        /* Bind (or Parse) failed: it did not run. Once more, unnamed. */
        PQclear(res);
        q->cached = q->named = false;
        q->retried = true;
        q->next = c->pending_head;
        c->pending_head = q;
        if (c->pending_tail == NULL) c->pending_tail = q;
        c->pending_count++;
        c->stats.statement_retries++;
        schedule_flush(c);
        return;
      }
      if (q->in_block) {
        /* It did not run, but its transaction block is aborted: the
         * block (ROLLBACK it) can be run again; the next one is unnamed. */
        keel__fail(c->last_error, KEEL_ECONN,
                   "transaction pooler detected (SQLSTATE %s: prepared statement not on this "
                   "server connection): the statement did not run, its transaction block is "
                   "aborted; statements are unnamed from now on",
                   PQresultErrorField(res, PG_DIAG_SQLSTATE));
        keel__pg_deliver(c, q, KEEL_ECONN, res, c->last_error);
        return;
      }
    }
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
      default: {
        status = KEEL_EPG;
        /* 08007: the server itself cannot tell whether the transaction
         * committed. */
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        if (state != NULL && strcmp(state, "08007") == 0) status = KEEL_EINDOUBT;
        break;
      }
    }
  }
  keel__pg_deliver(c, q, status, res, text);
}

/* true when res is the server's answer to the statement; false when it
 * only says that the session ended (a FATAL or PANIC error such as 57P01
 * after pg_terminate_backend, an error libpq made up for a lost
 * connection, a pipeline aborted by the loss). */
static bool is_reply(keel_pg *c, const PGresult *res) {
  switch (PQresultStatus(res)) {
    case PGRES_TUPLES_OK:
    case PGRES_COMMAND_OK:
    case PGRES_EMPTY_QUERY:
      return true;
#if defined(LIBPQ_HAS_PIPELINING)
    case PGRES_PIPELINE_ABORTED:
      return PQstatus(c->conn) != CONNECTION_BAD;
#endif
    case PGRES_FATAL_ERROR:
    case PGRES_NONFATAL_ERROR: {
      if (PQresultErrorField(res, PG_DIAG_SQLSTATE) == NULL) return false;
      const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
      if (severity == NULL) severity = PQresultErrorField(res, PG_DIAG_SEVERITY);
      if (severity != NULL && (strcmp(severity, "FATAL") == 0 || strcmp(severity, "PANIC") == 0))
        return false;
      return true;
    }
    default:
      return PQstatus(c->conn) != CONNECTION_BAD;
  }
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
      if (res == NULL) {
        /* A PREPARE sent in its statement's sync ends at its NULL. */
        if (head->internal && head->joined && head->result != NULL) complete_head(c);
        continue;
      }
#if defined(LIBPQ_HAS_PIPELINING)
      if (PQresultStatus(res) == PGRES_PIPELINE_SYNC) {
        PQclear(res);
        bool copy = head->copy;
        complete_head(c);
        /* The statements held back behind a COPY go out now. */
        if (copy && c->pending_head != NULL) schedule_flush(c);
        continue;
      }
#endif
    } else if (res == NULL) {
      /* Without pipelining NULL follows the statement's sync. */
      if (PQstatus(c->conn) == CONNECTION_BAD) break;
      complete_head(c);
      flush_queries(c);
      continue;
    }
    ExecStatusType st = PQresultStatus(res);
    if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT) {
      /* keel has no COPY data API: end a COPY FROM STDIN at once (the
       * server answers with an error, the statement's outcome), and drain
       * and drop the data of a COPY TO STDOUT. Otherwise libpq stays in
       * COPY state and nothing behind the statement could ever run. */
      PQclear(res);
      if (st == PGRES_COPY_IN) {
        int ended = PQputCopyEnd(c->conn, "keel does not support COPY FROM STDIN");
        if (ended < 0) {
          disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
          return false;
        }
        if (ended == 0 || PQflush(c->conn) != 0) {
          /* Not all written yet: the writable event retries. */
          if (watch(c, UV_READABLE | UV_WRITABLE) != 0) {
            disconnect(c, KEEL_ECONN, "cannot watch the socket");
            return false;
          }
          if (ended == 0) break;
        }
        continue;
      }
      char *row = NULL;
      int got;
      while ((got = PQgetCopyData(c->conn, &row, 1)) > 0) PQfreemem(row);
      if (got == -2) {
        disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
        return false;
      }
      if (got == 0) break; /* more data later */
      continue;
    }
    if (!is_reply(c, res)) {
      /* The session ended: what was in flight is judged by
       * deliver_lost(), with the replies already in kept. */
      char why[KEEL__ERRBUF_SIZE];
      const char *message = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
      const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
      if (message == NULL) message = PQresultErrorMessage(res);
      if (message == NULL || message[0] == '\0') message = "connection lost";
      if (state != NULL)
        snprintf(why, sizeof why, "connection lost (SQLSTATE %s: %s)", state, message);
      else
        snprintf(why, sizeof why, "connection lost (%s)", message);
      PQclear(res);
      disconnect(c, KEEL_ECONN, why);
      return false;
    }
    if (head->result == NULL) {
      head->result = res;
    } else if (reply_ok(head->result) && !reply_ok(res)) {
      /* An error after the statement's own reply, before its sync: the
       * implicit transaction failed to commit (a deferred constraint, a
       * serialization failure at commit). That is its outcome. */
      PQclear(head->result);
      head->result = res;
    } else {
      PQclear(res); /* only the first result of a statement is kept */
    }
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
      /* The socket is gone, but replies that arrived before the end are in
       * libpq's buffer: they are delivered, not thrown away. */
      char why[KEEL__ERRBUF_SIZE];
      snprintf(why, sizeof why, "%s", PQerrorMessage(c->conn));
      if (!read_results(c)) return;
      deliver_notifications(c);
      if (c->state == KEEL__PG_CONNECTED) disconnect(c, KEEL_ECONN, why);
      return;
    }
    if (!read_results(c)) return;
    deliver_notifications(c);
    if (c->state == KEEL__PG_CONNECTED && c->session_ending) {
      char why[KEEL__ERRBUF_SIZE];
      snprintf(why, sizeof why, "%s", c->ending);
      disconnect(c, KEEL_ECONN, why);
      return;
    }
    if (c->state == KEEL__PG_CONNECTED && PQstatus(c->conn) == CONNECTION_BAD) {
      disconnect(c, KEEL_ECONN, PQerrorMessage(c->conn));
      return;
    }
  }
  if (c->state == KEEL__PG_CONNECTED) arm_deadline(c);
}

/* ---- deadlines and health checks --------------------------------------- */

/* The first sent statement past its deadline (NULL: none), taken out of
 * the sent list. Not only the head: a statement with a deadline may wait
 * behind one without (a lease's renewal behind a fetch). */
static keel__pg_query *take_late_sent(keel_pg *c, uint64_t now) {
  keel__pg_query *prev = NULL;
  for (keel__pg_query *q = c->sent_head; q != NULL; prev = q, q = q->next) {
    if (q->deadline_ms == 0 || q->deadline_ms > now) continue;
    if (prev == NULL) return pop_sent(c);
    prev->next = q->next;
    if (c->sent_tail == q) c->sent_tail = prev;
    c->sent_count--;
    c->sent_deadlines--;
    return q;
  }
  return NULL;
}

static void on_deadline(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  uint64_t now = now_ms(c);
  /* A sent statement past its deadline means the server (or the path to it)
   * is not answering: reset the connection. */
  keel__pg_query *late = c->sent_deadlines > 0 ? take_late_sent(c, now) : NULL;
  if (late != NULL) {
    /* Reset below: it fails like a lost statement, with UV_ETIMEDOUT where
     * the loss is certain. */
    deliver_lost(c, late, UV_ETIMEDOUT, KEEL_EINDOUBT, "statement timed out");
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
  if (c->sent_deadlines > 0) /* a short list; none without a deadline set */
    for (keel__pg_query *q = c->sent_head; q != NULL; q = q->next)
      if (q->deadline_ms != 0 && (next == 0 || q->deadline_ms < next)) next = q->deadline_ms;
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
                   bool cached, bool literal);

static void on_health_timer(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  if (c->state != KEEL__PG_CONNECTED || !keel__pg_idle(c)) return;
  if (now_ms(c) - c->last_activity_ms < c->opts.health_check_interval_ms) return;
  /* An idle probe with a deadline finds half-open sockets that TCP alone
   * would take minutes to notice. */
  enqueue(c, "SELECT 1", 0, NULL, NULL, NULL, c->opts.connect_timeout_ms, true, false, false);
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

/* Parses the conninfo once: libpq's verdict on it, and the host names that
 * need a lookup before each connect attempt. */
static int parse_conninfo(keel_pg *c, char *why, size_t why_cap) {
  char *err = NULL;
  c->params = PQconninfoParse(c->conninfo, &err);
  if (c->params == NULL) {
    if (err == NULL) return keel__why(why, why_cap, UV_ENOMEM, "out of memory parsing conninfo");
    char text[KEEL__ERRBUF_SIZE];
    snprintf(text, sizeof text, "bad conninfo: %s", err);
    size_t len = strlen(text);
    while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == ' ')) text[--len] = '\0';
    PQfreemem(err);
    return keel__why(why, why_cap, UV_EINVAL, text);
  }
  const char *host = NULL, *hostaddr = NULL, *port = NULL;
  for (PQconninfoOption *o = c->params; o->keyword != NULL; o++) {
    if (strcmp(o->keyword, "host") == 0) host = o->val;
    if (strcmp(o->keyword, "hostaddr") == 0) hostaddr = o->val;
    if (strcmp(o->keyword, "port") == 0) port = o->val;
  }
  if (host == NULL || host[0] == '\0' || (hostaddr != NULL && hostaddr[0] != '\0')) return 0;
  size_t len = strlen(host);
  char *hosts = keel__malloc(len + 1);
  if (hosts == NULL) return keel__why(why, why_cap, UV_ENOMEM, "out of memory");
  memcpy(hosts, host, len + 1);
  unsigned n = 1;
  bool lookup = false;
  for (size_t i = 0; i < len; i++)
    if (hosts[i] == ',') {
      hosts[i] = '\0';
      n++;
    }
  const char *item = hosts;
  for (unsigned i = 0; i < n; i++, item += strlen(item) + 1)
    if (needs_lookup(item)) lookup = true;
  if (!lookup) {
    keel__free(hosts);
    return 0;
  }
  if (port != NULL && strchr(port, ',') != NULL) {
    /* A port per host: expanded with the hosts' addresses. */
    size_t plen = strlen(port);
    unsigned np = 1;
    for (size_t i = 0; i < plen; i++) np += port[i] == ',';
    if (np != n) { /* libpq reports the mismatch itself */
      keel__free(hosts);
      return 0;
    }
    c->ports = keel__malloc(plen + 1);
    if (c->ports == NULL) {
      keel__free(hosts);
      return keel__why(why, why_cap, UV_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i <= plen; i++) c->ports[i] = port[i] == ',' ? '\0' : port[i];
  }
  c->hosts = hosts;
  c->nhosts = n;
  return 0;
}

static void free_conn_memory(keel_pg *c) {
  for (int i = 0; i < KEEL__PG_PREPARED_MAX; i++) keel__free(c->prepared[i].sql);
  if (c->params != NULL) PQconninfoFree(c->params);
  keel__free(c->hosts);
  keel__free(c->ports);
  for (int i = 0; i < 3; i++) keel__free(c->out[i]);
  keel__free(c->conninfo);
  keel__free(c);
}

static void on_start_timer(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  if (c->state == KEEL__PG_WAITING) start_connect(c);
}

int keel_pg_new_ex(uv_loop_t *loop, const keel_pg_opts *opts, keel_pg **out, char *why,
                   size_t why_cap) {
  keel__why(why, why_cap, 0, "");
  if (loop == NULL || opts == NULL || out == NULL)
    return keel__why(why, why_cap, UV_EINVAL, "loop, opts and out are required");
  if (opts->conninfo == NULL) return keel__why(why, why_cap, UV_EINVAL, "conninfo is required");
  if (keel_backoff_validate(&opts->reconnect_backoff, NULL) != 0)
    return keel__why(why, why_cap, UV_EINVAL, "reconnect_backoff is not valid");
  if (opts->statement_mode != KEEL_PG_STATEMENTS_AUTO &&
      opts->statement_mode != KEEL_PG_STATEMENTS_NAMED &&
      opts->statement_mode != KEEL_PG_STATEMENTS_UNNAMED)
    return keel__why(why, why_cap, UV_EINVAL, "statement_mode is not valid");
  keel_pg *c = keel__calloc(1, sizeof *c);
  if (c == NULL) return keel__why(why, why_cap, UV_ENOMEM, "out of memory");
  c->loop = loop;
  c->opts = *opts;
  if (c->opts.connect_timeout_ms == 0) c->opts.connect_timeout_ms = 5000;
  if (c->opts.max_pending == 0) c->opts.max_pending = 100000;
  c->conninfo = conninfo_with_keepalives(opts);
  if (c->conninfo == NULL) {
    keel__free(c);
    return keel__why(why, why_cap, UV_ENOMEM, "out of memory");
  }
  c->opts.conninfo = c->conninfo;
  int rc = parse_conninfo(c, why, why_cap);
  if (rc != 0) {
    free_conn_memory(c);
    return rc;
  }
  c->poll_fd = -1;
  c->unnamed = c->opts.statement_mode == KEEL_PG_STATEMENTS_UNNAMED;
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
  /* The first attempt starts on the next iteration: nothing (no on_state
   * for a failed attempt) may run inside this call or before *out is set. */
  c->state = KEEL__PG_WAITING;
  uv_timer_start(&c->connect_timer, on_start_timer, 0, 0);
  *out = c;
  return 0;
}

int keel_pg_new(uv_loop_t *loop, const keel_pg_opts *opts, keel_pg **out) {
  return keel_pg_new_ex(loop, opts, out, NULL, 0);
}

static void do_reset(keel_pg *c) {
  if (c->state == KEEL__PG_CONNECTED || c->state == KEEL__PG_CONNECTING) {
    disconnect(c, KEEL_ECONN, "connection reset by keel_pg_reset()");
  }
  if (c->state == KEEL__PG_WAITING || c->state == KEEL__PG_STOPPED) {
    uv_timer_stop(&c->connect_timer);
    c->stats.reconnects++;
    start_connect(c);
  }
}

static void on_flush_timer(uv_timer_t *timer) {
  keel_pg *c = timer->data;
  if (c->state == KEEL__PG_CLOSING) return;
  if (c->reset_pending) {
    c->reset_pending = false;
    do_reset(c);
    if (c->state == KEEL__PG_CLOSING) return;
  }
  fail_stale_bound(c);
  flush_queries(c);
}

static int enqueue(keel_pg *c, const char *sql, int nparams, const char *const *values,
                   keel_pg_result_cb cb, void *data, uint64_t timeout_ms, bool internal,
                   bool cached, bool literal) {
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
  q->literal = literal;
  q->prepare_slot = -1;
  q->session = internal ? 0 : c->bound_session;
  if (!internal) {
    /* Transaction blocks in queue order: the statements after a BEGIN, up to
     * its COMMIT/ROLLBACK, run only in the session that BEGIN ran in. */
    q->kind = classify_statement(q->sql, &q->chain, &q->copy);
    bool ends = (q->kind == KEEL__PG_KIND_COMMIT || q->kind == KEEL__PG_KIND_ROLLBACK) && !q->chain;
    if (q->kind == KEEL__PG_KIND_BEGIN && c->enq_block == 0) {
      q->block = c->enq_block = ++c->block_seq;
      q->begins_block = true;
      c->failed_block = 0;
    } else if (c->enq_block != 0) {
      q->block = c->enq_block;
      if (ends) c->enq_block = 0;
    } else if (c->failed_block != 0) {
      /* Right after a failed BEGIN a COMMIT/ROLLBACK still belongs to it
       * (it must fail, not succeed alone); anything else runs on its own. */
      if (ends) q->block = c->failed_block;
      c->failed_block = 0;
    }
  }
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
  bool stale = unrunnable(c, q);
  if (stale) c->stale_possible = true;
  if (c->state == KEEL__PG_CONNECTED || stale) schedule_flush(c);
  arm_deadline(c);
  return 0;
}

/* 0, or why a statement cannot be queued now. */
static int can_enqueue(keel_pg *c) {
  if (c->state == KEEL__PG_STOPPED)
    return keel__fail(c->last_error, c->stop_status != 0 ? c->stop_status : KEEL_ECONN,
                      "not connected and not retrying (keel_pg_reset() tries again): %s",
                      c->stop_reason);
  if (c->pending_count >= c->opts.max_pending)
    return keel__fail(c->last_error, KEEL_EFULL,
                      "%u statements already wait to be sent (opts.max_pending)",
                      c->opts.max_pending);
  return 0;
}

int keel_pg_query(keel_pg *c, const char *sql, int nparams, const char *const *values,
                  keel_pg_result_cb cb, void *data) {
  if (c == NULL) return UV_EINVAL;
  if (sql == NULL || nparams < 0 || nparams > KEEL__PG_MAX_PARAMS ||
      (nparams > 0 && values == NULL))
    return keel__fail(c->last_error, UV_EINVAL,
                      "keel_pg_query: sql required, 0 <= nparams <= 65535, values for nparams");
  if (c->state == KEEL__PG_CLOSING) return KEEL_ECLOSING;
  int rc = can_enqueue(c);
  if (rc != 0) return rc;
  return enqueue(c, sql, nparams, values, cb, data, c->opts.query_timeout_ms, false, false, false);
}

static int query_cached(keel_pg *c, const char *sql, int nparams, const char *const *values,
                        keel_pg_result_cb cb, void *data, bool literal, uint64_t timeout_ms) {
  if (c == NULL) return UV_EINVAL;
  if (sql == NULL || nparams < 0 || nparams > KEEL__PG_MAX_PARAMS ||
      (nparams > 0 && values == NULL))
    return keel__fail(
        c->last_error, UV_EINVAL,
        "keel_pg_query_cached: sql required, 0 <= nparams <= 65535, values for nparams");
  if (c->state == KEEL__PG_CLOSING) return KEEL_ECLOSING;
  int rc = can_enqueue(c);
  if (rc != 0) return rc;
  return enqueue(c, sql, nparams, values, cb, data, timeout_ms, false, true, literal);
}

int keel_pg_query_cached(keel_pg *c, const char *sql, int nparams, const char *const *values,
                         keel_pg_result_cb cb, void *data) {
  return query_cached(c, sql, nparams, values, cb, data, false, c ? c->opts.query_timeout_ms : 0);
}

int keel__pg_query_cached_within(keel_pg *c, const char *sql, int nparams,
                                 const char *const *values, keel_pg_result_cb cb, void *data,
                                 uint32_t timeout_ms) {
  return query_cached(c, sql, nparams, values, cb, data, false, timeout_ms);
}

int keel__pg_query_literal(keel_pg *c, const char *sql, int nparams, const char *const *values,
                           keel_pg_result_cb cb, void *data) {
  return query_cached(c, sql, nparams, values, cb, data, true, c ? c->opts.query_timeout_ms : 0);
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
  if (c == NULL) return UV_EINVAL;
  if (c->state == KEEL__PG_CLOSING) return KEEL_ECLOSING;
  /* Done on the next iteration: the callbacks it causes (statements in
   * flight, on_state) never run inside this call. */
  c->reset_pending = true;
  schedule_flush(c);
  return 0;
}

void keel_pg_get_stats(const keel_pg *c, keel_pg_stats *out) {
  if (c == NULL || out == NULL) return;
  *out = c->stats;
  memset(out->reserved_, 0, sizeof out->reserved_);
  out->in_flight = c->sent_count;
  out->queued = c->pending_count;
  out->connected = c->state == KEEL__PG_CONNECTED;
  out->unnamed = c->unnamed;
}

static void on_timer_closed(uv_handle_t *handle) {
  handle_closed(handle->data);
}

void keel_pg_close(keel_pg *c, keel_close_cb cb, void *data) {
  if (c == NULL || c->state == KEEL__PG_CLOSING) return;
  keel__stats_hooks_detach(&c->stats_hooks);
  c->state = KEEL__PG_CLOSING;
  c->close_cb = cb;
  c->close_data = data;
  drop_poll(c);
  if (c->conn != NULL) {
    PQfinish(c->conn);
    c->conn = NULL;
  }
  if (c->lookup != NULL) {
    /* Its callback still runs (UV_EAI_CANCELED when it had not started);
     * c is freed after it. */
    uv_cancel((uv_req_t *)&c->lookup->req);
    c->lookup = NULL;
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

bool keel__pg_unnamed(const keel_pg *c) {
  return c->unnamed;
}

void keel__pg_set_unnamed(keel_pg *c) {
  if (c->opts.statement_mode == KEEL_PG_STATEMENTS_AUTO) c->unnamed = true;
}
