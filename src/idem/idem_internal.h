/* Private to src/idem: the store object, its operations and the two
 * backends (pg.c, redis.c) behind the common front (idem.c). */
#ifndef KEEL_IDEM_INTERNAL_H
#define KEEL_IDEM_INTERNAL_H

#include "core/stats_hook.h"
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/util.h"
#include "keel/idempotency.h"

typedef enum idem_backend { IDEM_PG = 1, IDEM_REDIS } idem_backend;
typedef enum idem_kind { IDEM_BEGIN = 1, IDEM_COMPLETE, IDEM_ABORT, IDEM_INSTALL } idem_kind;

struct keel_idem {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  idem_backend backend;
  keel_pg_pool *pool;
  keel_redis *redis;
  keel_idem_opts opts;
  char *prefix; /* Redis */
  char *sql[4]; /* PostgreSQL: begin, complete, abort, install */
  keel_idem_stats stats;
  bool closing;
  keel_close_cb close_cb;
  void *close_data;
  uv_timer_t close_timer; /* its close ends the store's close */
  uint64_t random_fallback;
  char last_error[KEEL__ERRBUF_SIZE];
};

typedef struct idem_op {
  keel_idem *idem;
  idem_kind kind;
  keel_idem_begin_cb begin_cb;
  keel_idem_done_cb done_cb;
  void *data;
  char *scope, *key, *fp;
  keel_idem_token token;
  keel_pg *conn; /* PostgreSQL, inside the caller's transaction */
  unsigned attempts;
  bool too_large;
  int response_status;
  char *body; /* copy (Redis) or "\x" + hex (PostgreSQL); NULL when not stored */
  size_t body_len;
  char num[3][24]; /* numeric parameters as text */
} idem_op;

/* Ends op: calls its callback (begin: status and reply; others: status),
 * counts, frees op, and finishes a closing store after its last op. */
void keel__idem_begin_done(idem_op *op, int status, const keel_idem_reply *reply);
void keel__idem_done(idem_op *op, int status);

/* Backends: start the operation (0, or an error with op untouched). */
int keel__idem_pg_start(idem_op *op);
int keel__idem_pg_sql(keel_idem *idem, const char *table);
int keel__idem_redis_start(idem_op *op);

/* The Redis store's script sources (0 begin, 1 complete, 2 abort), for the
 * benchmark's bare-hiredis floor. */
const char *keel__idem_redis_source(int i);

/* 32 hex digits of the OS's random source into token. */
void keel__idem_token(keel_idem *idem, keel_idem_token *token);

#endif
