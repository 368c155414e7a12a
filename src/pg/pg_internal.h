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
  bool literal;         /* keel's own SQL: may go as one simple query (send_literal) */
  bool named;           /* sent by name (Bind of a prepared statement) */
  bool retried;         /* sent again unnamed after its name was unknown */
  int prepare_slot;     /* internal PREPARE of this cache slot; -1 otherwise */
  PGresult *inherited;  /* a failed PREPARE's error, reported by its EXECUTE */
  /* Transaction control (see classify_statement in conn.c). */
  unsigned char kind; /* KEEL__PG_KIND_* of the statement's first keywords */
  bool chain;         /* COMMIT/ROLLBACK AND CHAIN: the block goes on */
  bool copy;          /* a COPY: nothing is sent behind it until its sync is back */
  bool in_block;      /* sent while an explicit transaction block was open */
  bool begins_block;  /* the BEGIN that opened `block` */
  bool orphan;        /* internal PREPARE whose EXECUTE was never sent */
  bool joined;        /* internal PREPARE sharing its EXECUTE's sync */
  bool commit_after;  /* at a loss: a COMMIT of its block was sent after it */
  uint64_t block;     /* != 0: member of this transaction block (enqueue order) */
  /* sql, the value pointers and the values follow in the same block */
} keel__pg_query;

/* The protocol's limit on parameters of one statement. */
#define KEEL__PG_MAX_PARAMS 65535

/* Statements prepared on the current session (keel_pg_query_cached). */
#define KEEL__PG_PREPARED_MAX 64
typedef struct keel__pg_prepared {
  char *sql;        /* NULL: free slot */
  uint64_t hash;    /* keel__pg_hash(sql): part of the statement's name */
  uint64_t session; /* prepared in this session */
} keel__pg_prepared;

/* What a statement does to the session's transaction block. */
enum {
  KEEL__PG_KIND_OTHER = 0,
  KEEL__PG_KIND_BEGIN,    /* BEGIN, START TRANSACTION */
  KEEL__PG_KIND_COMMIT,   /* COMMIT, END, PREPARE TRANSACTION: may commit */
  KEEL__PG_KIND_ROLLBACK, /* ROLLBACK, ABORT */
};

typedef enum keel__pg_state {
  KEEL__PG_CONNECTING = 0,
  KEEL__PG_CONNECTED,
  KEEL__PG_WAITING, /* disconnected, reconnect timer armed */
  KEEL__PG_STOPPED, /* disconnected, not reconnecting */
  KEEL__PG_CLOSING
} keel__pg_state;

struct keel_pg {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
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
  uint64_t sent_deadlines;  /* sent statements with a deadline */
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
  /* Statement names: keel_<hash of the text>_<nonce>, the nonce drawn at
   * every connect, so that a name never stands for another text on any
   * server connection (a pooler may share them between clients). */
  uint64_t nonce;
  bool unnamed; /* keel_pg_query_cached sends unnamed statements (mode UNNAMED,
                   or AUTO after the server did not know a name) */
  char last_error[KEEL__ERRBUF_SIZE];
  /* Transaction blocks, tracked from the statements' own keywords so that
   * the statements of one block never run on another session. */
  uint64_t block_seq;    /* last block id handed out */
  uint64_t enq_block;    /* block new statements join (0: none) */
  uint64_t failed_block; /* block whose BEGIN failed: a COMMIT/ROLLBACK right after joins it */
  uint64_t blocks_begun; /* highest block whose BEGIN left the pending queue */
  uint64_t live_block;   /* block open on the current session (its BEGIN was sent) */
  bool send_in_block;    /* at send order: an explicit block is open on the session */
  /* Connecting: the parsed conninfo, host names resolved off the loop. */
  PQconninfoOption *params; /* PQconninfoParse of conninfo */
  char *hosts;              /* host list, items NUL-separated; NULL: no lookup needed */
  unsigned nhosts;
  unsigned host_index; /* item being resolved */
  char *ports;         /* port list, items NUL-separated, when it has nhosts items */
  char *out[3];        /* host, hostaddr and port lists being built */
  size_t out_len[3], out_cap[3];
  uint64_t attempt;               /* connect attempts started */
  struct keel__pg_lookup *lookup; /* uv_getaddrinfo in progress (current attempt) */
  int stop_status;                /* why STOPPED: KEEL_ECONN, KEEL_EAUTH, KEEL_ENODB */
  char stop_reason[KEEL__ERRBUF_SIZE];
  bool reset_pending;             /* keel_pg_reset() asked; done by the flush timer */
  bool session_ending;            /* a FATAL/PANIC arrived while idle: the session is over */
  char ending[KEEL__ERRBUF_SIZE]; /* its text */
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

/* true once the connection sends unnamed statements only. */
bool keel__pg_unnamed(const keel_pg *c);
/* Switches c to unnamed statements (the pool: another member detected a
 * transaction pooler); only in statement mode AUTO. */
void keel__pg_set_unnamed(keel_pg *c);
/* 64-bit FNV-1a of a statement's text (part of its prepared name). */
uint64_t keel__pg_hash(const char *sql);
/* keel_pg_query_cached() for SQL keel built (see pg/pg_literal.h). */
/* keel_pg_query_cached() with its own deadline (0 = none) instead of
 * opts.query_timeout_ms: a sent statement past it resets the connection
 * (UV_ETIMEDOUT / KEEL_EINDOUBT, as for the option). For statements that
 * must answer within a bound of their own (a lease's renewal). */
int keel__pg_query_cached_within(keel_pg *c, const char *sql, int nparams,
                                 const char *const *values, keel_pg_result_cb cb, void *data,
                                 uint32_t timeout_ms);

int keel__pg_query_literal(keel_pg *c, const char *sql, int nparams, const char *const *values,
                           keel_pg_result_cb cb, void *data);

#endif
