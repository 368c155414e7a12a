/* Private to src/pg: the connection object, shared by the connection state
 * machine (conn.c), results (result.c) and the pool (pool.c). */
#ifndef KEEL_PG_INTERNAL_H
#define KEEL_PG_INTERNAL_H

#include <libpq-fe.h>
#include <stdbool.h>

#include "core/util.h"
#include "keel/pg.h"

struct keel_pg_result {
  PGresult *res;
  const char *error_text; /* for results without a PGresult (ECONN, cancel) */
};

typedef struct keel__pg_query {
  struct keel__pg_query *next;
  const char *sql;
  const char *const *values;
  int nparams;
  keel_pg_result_cb cb;
  void *data;
  uint64_t deadline_ms; /* 0: none */
  PGresult *result;     /* first result collected while in flight */
  bool internal;        /* health check: no user callback */
  uint64_t session;     /* != 0: may run only in this session (transactions) */
  bool cached;          /* prepare once per session, then execute by name */
  int prepare_slot;     /* internal PREPARE of this cache slot; -1 otherwise */
  PGresult *inherited;  /* a failed PREPARE's error, reported by its EXECUTE */
  /* sql, the value pointers and the values follow in the same block */
} keel__pg_query;

/* Statements prepared on the current session (keel_pg_query_cached). */
#define KEEL__PG_PREPARED_MAX 64
typedef struct keel__pg_prepared {
  char *sql;        /* NULL: free slot */
  uint64_t session; /* prepared in this session */
} keel__pg_prepared;

typedef enum keel__pg_state {
  KEEL__PG_CONNECTING = 0,
  KEEL__PG_CONNECTED,
  KEEL__PG_WAITING, /* disconnected, reconnect timer armed */
  KEEL__PG_STOPPED, /* disconnected, not reconnecting */
  KEEL__PG_CLOSING
} keel__pg_state;

struct keel_pg {
  uv_loop_t *loop;
  keel_pg_opts opts;
  char *conninfo;
  PGconn *conn;
  uv_poll_t *poll; /* one per socket; recreated when the socket changes */
  int poll_fd;
  int poll_events;
  keel__pg_state state;
  bool pipeline_on;
  keel__pg_query *pending_head, *pending_tail; /* not sent yet */
  keel__pg_query *sent_head, *sent_tail;       /* sent, in order */
  uint64_t pending_count, sent_count;
  uv_timer_t connect_timer; /* connect timeout, then reconnect backoff */
  uv_timer_t health_timer;
  uv_timer_t deadline_timer;
  uv_timer_t flush_timer; /* sends what was queued during this iteration */
  unsigned handles_open;
  unsigned reconnect_attempt;
  uint64_t last_backoff_ms;
  uint64_t last_activity_ms;
  keel_rng rng;
  keel_pg_stats stats;
  unsigned callback_depth;
  keel_close_cb close_cb;
  void *close_data;
  uint64_t error_generation; /* bumped on every failed statement */
  uint64_t session;          /* bumped on every successful connect */
  uint64_t bound_session;    /* != 0: new statements are bound to it (a transaction) */
  bool stale_possible;       /* a bound statement may have outlived its session */
  /* The first failure among statements bound to bound_session (what a
   * transaction reports): status 0 while none; cleared by keel__pg_bind(). */
  int bound_status;
  char bound_sqlstate[6];
  char bound_error[KEEL__ERRBUF_SIZE];
  keel__pg_prepared prepared[KEEL__PG_PREPARED_MAX];
  char last_error[KEEL__ERRBUF_SIZE];
};

/* Fails every query with status; used on disconnect and close. */
void keel__pg_fail_all(keel_pg *c, keel__pg_query **head, keel__pg_query **tail, uint64_t *count,
                       int status, const char *text);
/* Calls a query's callback with a result wrapper and frees the query. */
void keel__pg_deliver(keel_pg *c, keel__pg_query *q, int status, PGresult *res, const char *text);
/* true when the connection has nothing queued or in flight. */
bool keel__pg_idle(const keel_pg *c);

/* ---- for the pool (pool.c), which never writes these fields itself ---- */

/* The current session: bumped on every successful connect (0 before the
 * first one). */
uint64_t keel__pg_session(const keel_pg *c);
/* on: statements queued from now on are bound to the current session (a
 * transaction) and the first failure among them is recorded; off: unbound.
 * Either forgets the recorded failure. */
void keel__pg_bind(keel_pg *c, bool on);
/* The first failure of a bound statement since keel__pg_bind(c, true): its
 * status (0: none), SQLSTATE ("" when it has none) and error text. */
int keel__pg_bound_failure(const keel_pg *c, const char **sqlstate, const char **text);
/* Records q's failure when it is the first of the current binding; called
 * by keel__pg_deliver() once last_error describes it. */
void keel__pg_note_failure(keel_pg *c, const keel__pg_query *q, int status, const PGresult *res);

#endif
