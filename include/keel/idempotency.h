/*
 * keel/idempotency.h — idempotency keys (seed 002's "Idempotency Key Flow",
 * the IETF Idempotency-Key draft): the first request with a key runs, a
 * concurrent duplicate is told "in progress" (HTTP 409), a later duplicate
 * gets the stored response, and the key reused with a different request is
 * refused (HTTP 422).
 *
 * One object, two stores with the same outcomes:
 *   - Redis (keel_idem_new_redis): one hash per key, every step one script;
 *     the processing entry expires by itself when its owner dies.
 *   - PostgreSQL (keel_idem_new_pg): a unique (scope, key) row; besides the
 *     same begin / complete / abort on the pool, keel_idem_begin_tx() and
 *     keel_idem_complete_tx() run inside the caller's own transaction, so
 *     that the effect and the stored response commit together (or not at
 *     all).
 *
 *     static void on_begin(keel_idem *idem, int status, const keel_idem_reply *r,
 *                          void *req) {
 *       if (status == KEEL_EINPROGRESS)
 *         reply(req, 409, "in progress");
 *       else if (status == KEEL_EMISMATCH)
 *         reply(req, 422, "key reused");
 *       else if (status < 0)
 *         reply(req, 503, keel_strerror(status));
 *       else if (r->completed)                // body: body_len bytes, no NUL
 *         reply_bytes(req, r->response_status, r->body, r->body_len);
 *       else                                  // we own the key: keep the token
 *         do_the_work(req, r->token);         // (a copy), then keel_idem_complete()
 *     }
 *     keel_idem_begin(idem, "POST /bookings", header_key, body_sha256, on_begin, req);
 *
 * Callbacks: never called inside the call that caused them (always a later
 * loop iteration); every accepted operation's callback runs exactly once;
 * keel_idem_close() may be called from inside any of them.
 *
 * Everything is loop-thread only.
 */
#ifndef KEEL_IDEMPOTENCY_H
#define KEEL_IDEMPOTENCY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"
#include "keel/pg.h"
#include "keel/redis.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_idem keel_idem;

/* Longest key and scope, in bytes. */
#define KEEL_IDEM_MAX_KEY 255
/* Longest fingerprint, in bytes. */
#define KEEL_IDEM_MAX_FINGERPRINT 512
/* Default table of the PostgreSQL store (see keel_idem_install()). */
#define KEEL_IDEM_TABLE "keel_idempotency"
/* Default key prefix of the Redis store. */
#define KEEL_IDEM_PREFIX "keel:idem:"

typedef struct keel_idem_opts {
  uint64_t processing_ttl_ms; /* 1..2^40; how long a key stays "processing" without
                                 complete/abort: an owner that dies frees the
                                 key after this; default 60000. Choose it above
                                 your longest processing time: a complete after
                                 it fails with KEEL_ELOST */
  uint64_t completed_ttl_ms;  /* 1..2^40; how long a stored response is kept; default
                                 86400000 (24 h) */
  size_t max_body;            /* largest response body stored; a larger one
                                 is not cached (its status is: duplicates get
                                 body_cached false), counted in
                                 stats.bodies_too_large; default 65536 */
  uint32_t max_pending;       /* operations in flight; KEEL_EFULL beyond;
                                 default 65536 (0 = default) */
  const char *prefix;         /* Redis: key prefix; NULL = KEEL_IDEM_PREFIX;
                                 at most 64 bytes; copied */
  const char *table;          /* PostgreSQL: table; NULL = KEEL_IDEM_TABLE;
                                 "schema.table" allowed; copied */
  uint64_t reserved_[8];      /* ABI room: zero (opts_init does); never set */
} keel_idem_opts;

/* Zeroes *opts and fills the defaults above. NULL: no-op. Thread-safe. */
KEEL_EXTERN void keel_idem_opts_init(keel_idem_opts *opts);

/*
 * A store on a Redis client (keel/redis.h). redis is not owned: it must
 * outlive the store (close the store first). opts may be NULL; copied.
 * Returns 0 and sets *out, UV_EINVAL (NULL loop, redis or out; a TTL of 0
 * or over 2^40 ms, about 34 years; a prefix over 64 bytes), KEEL_ECLOSING
 * (keel_redis_close() was called on redis) or UV_ENOMEM; nothing is created
 * and *out is untouched on failure.
 * Loop thread only.
 */
KEEL_EXTERN int keel_idem_new_redis(uv_loop_t *loop, keel_redis *redis, const keel_idem_opts *opts,
                                    keel_idem **out);

/*
 * A store on a PostgreSQL pool (keel/pg.h), in opts.table (create it with
 * keel_idem_install() or yourself, see docs/idempotency.md). pool is not
 * owned: it must outlive the store (close the store first). opts may be
 * NULL; copied. Returns 0 and sets *out, UV_EINVAL (NULL loop, pool or out;
 * a TTL of 0 or over 2^40 ms; a bad table name) or UV_ENOMEM; *out is
 * untouched on failure.
 * Loop thread only.
 */
KEEL_EXTERN int keel_idem_new_pg(uv_loop_t *loop, keel_pg_pool *pool, const keel_idem_opts *opts,
                                 keel_idem **out);

/* Completion of keel_idem_install(), keel_idem_complete(), keel_idem_abort()
 * and keel_idem_complete_tx(): 0 or an error (see there). */
typedef void (*keel_idem_done_cb)(keel_idem *idem, int status, void *data);

/*
 * PostgreSQL: creates the table if it does not exist (the DDL is in
 * docs/idempotency.md), under an advisory lock, in one transaction. Redis:
 * nothing to create; done gets 0. done (may be NULL) gets 0, KEEL_EPG,
 * KEEL_ECONN, KEEL_EINDOUBT, UV_ETIMEDOUT or UV_ECANCELED on a later loop
 * iteration. Returns 0, UV_EINVAL (NULL idem), UV_ENOMEM, KEEL_EFULL or
 * KEEL_ECLOSING; done is not called then. Loop thread only.
 */
KEEL_EXTERN int keel_idem_install(keel_idem *idem, keel_idem_done_cb done, void *data);

/* The owner's proof: 32 lower-case hex digits (128 bits from the OS's
 * random source) and a NUL. A plain value: copy it. */
typedef struct keel_idem_token {
  char hex[33];
} keel_idem_token;

/*
 * What keel_idem_begin() found, valid during the callback only (copy what
 * you keep). With status 0:
 *   completed false  you own the key: token is your proof for complete and
 *                    abort; taken_over tells that an expired "processing"
 *                    entry of a dead owner was replaced (PostgreSQL only;
 *                    Redis removes expired entries itself);
 *   completed true   the stored response: response_status, and body /
 *                    body_len when body_cached (body NULL and body_len 0
 *                    when the body was over max_body when it was stored).
 * With KEEL_EINPROGRESS, completed is false, the token is empty and ttl_ms
 * is how long the processing entry has left at most (0 when unknown: e.g.
 * held by a PostgreSQL transaction that has not committed), usable as a
 * Retry-After. Everything else is zero.
 */
typedef struct keel_idem_reply {
  bool completed;
  keel_idem_token token;
  bool taken_over;
  int response_status;
  const char *body; /* not NUL-terminated; may hold any bytes */
  size_t body_len;
  bool body_cached;
  uint64_t ttl_ms;
} keel_idem_reply;

/*
 * The outcome of a begin, exactly once, on a later loop iteration:
 *   0                 reply says which: you own the key, or the stored response;
 *   KEEL_EINPROGRESS  the same key and fingerprint are being processed by
 *                     someone else (HTTP 409); try later;
 *   KEEL_EMISMATCH    the key is in use (processing or completed) with
 *                     another fingerprint (HTTP 422);
 *   KEEL_EREDIS, KEEL_EPG (text in keel_idem_last_error()), KEEL_ESERIALIZATION
 *                     (PostgreSQL, inside a REPEATABLE READ or SERIALIZABLE
 *                     transaction: retry the transaction), KEEL_ECONN,
 *                     KEEL_EINDOUBT (sent, reply lost: the key may now be
 *                     yours but you have no token; it frees itself after
 *                     processing_ttl_ms), UV_ETIMEDOUT, UV_ECANCELED (the
 *                     client or pool closed).
 * reply is set with 0 and KEEL_EINPROGRESS, NULL otherwise.
 */
typedef void (*keel_idem_begin_cb)(keel_idem *idem, int status, const keel_idem_reply *reply,
                                   void *data);

/*
 * Takes the key (scope, key) for the request whose fingerprint is given, in
 * one atomic step (one Redis script; one PostgreSQL statement): absent or
 * expired → yours, "processing" for opts.processing_ttl_ms; processing with
 * the same fingerprint → KEEL_EINPROGRESS; any state with another
 * fingerprint → KEEL_EMISMATCH; completed → the stored response.
 *
 * scope        1..255 bytes, NUL-terminated: the endpoint or client the key
 *              belongs to (keys of different scopes never meet).
 * key          1..255 bytes, NUL-terminated (the Idempotency-Key header).
 * fingerprint  0..512 bytes, NUL-terminated, or NULL (= ""): what makes two
 *              requests "the same" (e.g. the hex SHA-256 of method, path and
 *              body). PostgreSQL stores scope, key and fingerprint as text:
 *              they must be valid in the database's encoding.
 * All three are copied. cb required.
 *
 * Returns 0, or UV_EINVAL (NULL idem, scope, key or cb; a length out of
 * range; reason in keel_idem_last_error()), UV_ENOMEM, KEEL_EFULL
 * (max_pending operations in flight) or KEEL_ECLOSING; or an error the
 * client returned (keel_pg_pool_query(), the Redis client's). cb is not
 * called then. Loop thread only.
 */
KEEL_EXTERN int keel_idem_begin(keel_idem *idem, const char *scope, const char *key,
                                const char *fingerprint, keel_idem_begin_cb cb, void *data);

/*
 * Stores the response of the request the token owns and keeps it for
 * opts.completed_ttl_ms; only the owner can (the token is compared in the
 * same step). A body over opts.max_body is not stored (the status is;
 * counted). done gets, on a later loop iteration: 0 stored; KEEL_ELOST the
 * key is no longer this token's (processing_ttl_ms ran out — the entry
 * expired or was taken over — or it was aborted): nothing stored; or the
 * errors of keel_idem_begin_cb (KEEL_EINDOUBT: it may have been stored).
 *
 * body     body_len bytes (any bytes; NULL only with body_len 0); copied.
 * Returns 0, UV_EINVAL (NULL idem, scope, key or token; bad lengths; a token
 * that is not 32 hex digits), UV_ENOMEM, KEEL_EFULL, KEEL_ECLOSING or a
 * client's error; done (may be NULL) is not called then. Loop thread only.
 */
KEEL_EXTERN int keel_idem_complete(keel_idem *idem, const char *scope, const char *key,
                                   const keel_idem_token *token, int response_status,
                                   const void *body, size_t body_len, keel_idem_done_cb done,
                                   void *data);

/*
 * Frees the key the token owns, so that a retry of the request runs again
 * (call it when the work failed without effect). done gets 0 (freed, or
 * already free: expired), KEEL_ELOST (held by another owner now, or
 * completed) or the errors of keel_idem_begin_cb. Returns as
 * keel_idem_complete(). Loop thread only.
 */
KEEL_EXTERN int keel_idem_abort(keel_idem *idem, const char *scope, const char *key,
                                const keel_idem_token *token, keel_idem_done_cb done, void *data);

/*
 * PostgreSQL store only: keel_idem_begin() inside the caller's transaction
 * on conn (the connection a keel_pg_pool_transaction() body got, or your own
 * BEGIN on a keel_pg). The row is written by the transaction, so until it
 * commits no one else sees it: a concurrent begin of the same key gets
 * KEEL_EINPROGRESS at once (keel holds a transaction-scoped advisory lock
 * on the key; nobody waits), and if the transaction rolls back (or its
 * process dies) the key is free at once. Complete it in the same
 * transaction with keel_idem_complete_tx(); the effect and the response
 * then commit together. After KEEL_EINPROGRESS, KEEL_EMISMATCH or a stored
 * response, end the transaction without the effect.
 * In REPEATABLE READ / SERIALIZABLE a key committed after the transaction's
 * snapshot gives KEEL_ESERIALIZATION: retry the transaction.
 * Returns as keel_idem_begin(), and UV_EINVAL also for a NULL conn or a
 * Redis store. Loop thread only.
 */
KEEL_EXTERN int keel_idem_begin_tx(keel_idem *idem, keel_pg *conn, const char *scope,
                                   const char *key, const char *fingerprint, keel_idem_begin_cb cb,
                                   void *data);

/* PostgreSQL store only: keel_idem_complete() on conn, inside the
 * transaction that began the key; it takes effect when that transaction
 * commits. Same arguments, outcomes and errors (UV_EINVAL also for a NULL
 * conn or a Redis store). Loop thread only. */
KEEL_EXTERN int keel_idem_complete_tx(keel_idem *idem, keel_pg *conn, const char *scope,
                                      const char *key, const keel_idem_token *token,
                                      int response_status, const void *body, size_t body_len,
                                      keel_idem_done_cb done, void *data);

/* Counters only grow; in_flight is a gauge. */
typedef struct keel_idem_stats {
  uint64_t begins;           /* begins accepted */
  uint64_t owned;            /* begins that took the key */
  uint64_t taken_over;       /* of owned: an expired processing entry replaced
                                (PostgreSQL only) */
  uint64_t busy;             /* begins answered KEEL_EINPROGRESS */
  uint64_t mismatches;       /* begins answered KEEL_EMISMATCH */
  uint64_t replays;          /* begins answered with the stored response */
  uint64_t completes;        /* responses stored */
  uint64_t bodies_too_large; /* completes whose body was over max_body */
  uint64_t aborts;           /* keys freed by abort */
  uint64_t lost;             /* completes and aborts answered KEEL_ELOST */
  uint64_t errors;           /* operations ended by any other error */
  uint64_t in_flight;        /* gauge: operations whose callback is due */
  uint64_t reserved_[8];     /* ABI room: filled with zero */
} keel_idem_stats;

/* Copies the statistics into *out. NULL idem or out: no-op. Loop thread
 * only. */
KEEL_EXTERN void keel_idem_get_stats(const keel_idem *idem, keel_idem_stats *out);

struct keel_serve;

/*
 * Shows idem on the keel_serve server s under name (keel/serve.h), as kind
 * "idempotency". The registration is dropped from s when idem's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or the object closing). Loop thread only.
 */
KEEL_EXTERN int keel_idem_serve(struct keel_serve *s, keel_idem *idem, const char *name);

/* Text of the last error; "" when none; "idem is NULL" for NULL. Valid until
 * the next call on idem. Loop thread only. */
KEEL_EXTERN const char *keel_idem_last_error(const keel_idem *idem);

/*
 * Closes the store: new calls return KEEL_ECLOSING, operations in flight end
 * with their results (the client or pool must stay open until then), and cb
 * (may be NULL) runs on a later loop iteration after the last of them,
 * never inside this call. NULL-safe; a second call does nothing; callable
 * from inside any callback of the store. Loop thread only.
 */
KEEL_EXTERN void keel_idem_close(keel_idem *idem, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_IDEMPOTENCY_H */
