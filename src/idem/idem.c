/* Idempotency keys: the front every store shares (validation, operations,
 * statistics, close); pg.c and redis.c speak to the two stores. */
#include "idem/idem_stats.h"
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "idem/idem_internal.h"
#include "redis/redis_internal.h"

void keel_idem_opts_init(keel_idem_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->processing_ttl_ms = 60000;
  opts->completed_ttl_ms = 86400000;
  opts->max_body = 65536;
  opts->max_pending = 65536;
}

static keel_idem *store_new(uv_loop_t *loop, const keel_idem_opts *opts, idem_backend backend) {
  keel_idem_opts defaults;
  if (opts == NULL) {
    keel_idem_opts_init(&defaults);
    opts = &defaults;
  }
  if (opts->processing_ttl_ms == 0 || opts->completed_ttl_ms == 0 ||
      opts->processing_ttl_ms > UINT64_C(1) << 40 || opts->completed_ttl_ms > UINT64_C(1) << 40)
    return NULL;
  keel_idem *idem = keel__calloc(1, sizeof *idem);
  if (idem == NULL) return NULL;
  idem->loop = loop;
  idem->backend = backend;
  idem->opts = *opts;
  memset(idem->opts.reserved_, 0, sizeof idem->opts.reserved_);
  idem->opts.prefix = NULL;
  idem->opts.table = NULL;
  if (idem->opts.max_pending == 0) idem->opts.max_pending = 65536;
  return idem;
}

static void store_free(keel_idem *idem) {
  keel__free(idem->prefix);
  for (size_t i = 0; i < KEEL__ARRAY_SIZE(idem->sql); i++) keel__free(idem->sql[i]);
  keel__free(idem);
}

int keel_idem_new_pg(uv_loop_t *loop, keel_pg_pool *pool, const keel_idem_opts *opts,
                     keel_idem **out) {
  if (loop == NULL || pool == NULL || out == NULL) return UV_EINVAL;
  if (opts != NULL &&
      (opts->processing_ttl_ms == 0 || opts->completed_ttl_ms == 0 ||
       opts->processing_ttl_ms > UINT64_C(1) << 40 || opts->completed_ttl_ms > UINT64_C(1) << 40))
    return UV_EINVAL;
  const char *table = opts != NULL && opts->table != NULL ? opts->table : KEEL_IDEM_TABLE;
  char probe[160];
  if (keel_pg_quote_ident(probe, sizeof probe, table, true) < 0) return UV_EINVAL;
  keel_idem *idem = store_new(loop, opts, IDEM_PG);
  if (idem == NULL)
    return opts != NULL && opts->processing_ttl_ms > UINT64_C(1) << 40 ? UV_EINVAL : UV_ENOMEM;
  idem->pool = pool;
  int rc = keel__idem_pg_sql(idem, table);
  if (rc != 0) {
    store_free(idem);
    return rc;
  }
  uv_timer_init(loop, &idem->close_timer);
  idem->close_timer.data = idem;
  *out = idem;
  return 0;
}

/* Used by redis.c. */
int keel__idem_new_redis(uv_loop_t *loop, keel_redis *redis, const keel_idem_opts *opts,
                         keel_idem **out);
int keel__idem_new_redis(uv_loop_t *loop, keel_redis *redis, const keel_idem_opts *opts,
                         keel_idem **out) {
  if (loop == NULL || redis == NULL || out == NULL) return UV_EINVAL;
  if (keel__redis_closing(redis)) return KEEL_ECLOSING;
  if (opts != NULL &&
      (opts->processing_ttl_ms == 0 || opts->completed_ttl_ms == 0 ||
       opts->processing_ttl_ms > UINT64_C(1) << 40 || opts->completed_ttl_ms > UINT64_C(1) << 40))
    return UV_EINVAL;
  const char *prefix = opts != NULL && opts->prefix != NULL ? opts->prefix : KEEL_IDEM_PREFIX;
  if (strlen(prefix) > 64) return UV_EINVAL;
  keel_idem *idem = store_new(loop, opts, IDEM_REDIS);
  if (idem == NULL) return UV_ENOMEM;
  idem->redis = redis;
  idem->prefix = keel__strdup(prefix);
  if (idem->prefix == NULL) {
    store_free(idem);
    return UV_ENOMEM;
  }
  uv_timer_init(loop, &idem->close_timer);
  idem->close_timer.data = idem;
  *out = idem;
  return 0;
}

void keel__idem_token(keel_idem *idem, keel_idem_token *token) {
  unsigned char b[16];
  if (uv_random(NULL, NULL, b, sizeof b, 0, NULL) != 0) {
    uint64_t t = uv_hrtime(), n = ++idem->random_fallback;
    uintptr_t p = (uintptr_t)idem;
    t ^= (uint64_t)p;
    memcpy(b, &t, 8);
    memcpy(b + 8, &n, 8);
  }
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < 16; i++) {
    token->hex[2 * i] = hex[b[i] >> 4];
    token->hex[2 * i + 1] = hex[b[i] & 15];
  }
  token->hex[32] = '\0';
}

static bool token_ok(const keel_idem_token *token) {
  for (int i = 0; i < 32; i++) {
    char c = token->hex[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return token->hex[32] == '\0';
}

static void on_close_timer_closed(uv_handle_t *h) {
  keel_idem *idem = h->data;
  keel_close_cb cb = idem->close_cb;
  void *data = idem->close_data;
  store_free(idem);
  if (cb != NULL) cb(idem, data);
}

static void finish_close(keel_idem *idem) {
  uv_close((uv_handle_t *)&idem->close_timer, on_close_timer_closed);
}

static void op_free(idem_op *op) {
  keel__free(op->scope);
  keel__free(op->key);
  keel__free(op->fp);
  keel__free(op->body);
  keel__free(op);
}

static void op_end(keel_idem *idem) {
  idem->stats.in_flight--;
  if (idem->stats.in_flight == 0 && idem->closing) finish_close(idem);
}

static void count_error(keel_idem *idem, int status) {
  idem->stats.errors++;
  if (idem->last_error[0] == '\0' || status != KEEL_EPG)
    keel__fail(idem->last_error, status, "%s", keel_strerror(status));
}

void keel__idem_begin_done(idem_op *op, int status, const keel_idem_reply *reply) {
  keel_idem *idem = op->idem;
  if (status == 0 && reply != NULL && reply->completed)
    idem->stats.replays++;
  else if (status == 0 && reply != NULL) {
    idem->stats.owned++;
    if (reply->taken_over) idem->stats.taken_over++;
  } else if (status == KEEL_EINPROGRESS)
    idem->stats.busy++;
  else if (status == KEEL_EMISMATCH)
    idem->stats.mismatches++;
  else {
    if (status == 0) status = KEEL_EPROTO;
    count_error(idem, status);
    reply = NULL;
  }
  keel_idem_begin_cb cb = op->begin_cb;
  void *data = op->data;
  op_free(op);
  cb(idem, status, status == 0 || status == KEEL_EINPROGRESS ? reply : NULL, data);
  op_end(idem);
}

void keel__idem_done(idem_op *op, int status) {
  keel_idem *idem = op->idem;
  if (status == 0 && op->kind == IDEM_COMPLETE) {
    idem->stats.completes++;
    if (op->too_large) idem->stats.bodies_too_large++;
  } else if (status == 0 && op->kind == IDEM_ABORT)
    idem->stats.aborts++;
  else if (status == KEEL_ELOST)
    idem->stats.lost++;
  else if (status != 0)
    count_error(idem, status);
  keel_idem_done_cb cb = op->done_cb;
  void *data = op->data;
  op_free(op);
  if (cb != NULL) cb(idem, status, data);
  op_end(idem);
}

static int check_common(keel_idem *idem) {
  if (idem->closing) return keel__fail(idem->last_error, KEEL_ECLOSING, "the store is closing");
  if (idem->stats.in_flight >= idem->opts.max_pending)
    return keel__fail(idem->last_error, KEEL_EFULL, "max_pending (%u) operations in flight",
                      idem->opts.max_pending);
  return 0;
}

static int check_key(keel_idem *idem, const char *scope, const char *key, const char *fp) {
  size_t s = scope != NULL ? strlen(scope) : 0, k = key != NULL ? strlen(key) : 0;
  if (s == 0 || s > KEEL_IDEM_MAX_KEY)
    return keel__fail(idem->last_error, UV_EINVAL, "scope: 1..%d bytes", KEEL_IDEM_MAX_KEY);
  if (k == 0 || k > KEEL_IDEM_MAX_KEY)
    return keel__fail(idem->last_error, UV_EINVAL, "key: 1..%d bytes", KEEL_IDEM_MAX_KEY);
  if (fp != NULL && strlen(fp) > KEEL_IDEM_MAX_FINGERPRINT)
    return keel__fail(idem->last_error, UV_EINVAL, "fingerprint: at most %d bytes",
                      KEEL_IDEM_MAX_FINGERPRINT);
  return 0;
}

static idem_op *op_new(keel_idem *idem, idem_kind kind, const char *scope, const char *key,
                       const char *fp) {
  idem_op *op = keel__calloc(1, sizeof *op);
  if (op == NULL) return NULL;
  op->idem = idem;
  op->kind = kind;
  if (kind == IDEM_INSTALL) return op;
  op->scope = keel__strdup(scope);
  op->key = keel__strdup(key);
  op->fp = keel__strdup(fp != NULL ? fp : "");
  if (op->scope == NULL || op->key == NULL || op->fp == NULL) {
    op_free(op);
    return NULL;
  }
  return op;
}

static int start(idem_op *op) {
  keel_idem *idem = op->idem;
  int rc = idem->backend == IDEM_PG ? keel__idem_pg_start(op) : keel__idem_redis_start(op);
  if (rc != 0) {
    if (idem->last_error[0] == '\0' || rc == UV_ENOMEM)
      keel__fail(idem->last_error, rc, "cannot send: %s", keel_strerror(rc));
    op_free(op);
    return rc;
  }
  idem->stats.in_flight++;
  if (op->kind == IDEM_BEGIN) idem->stats.begins++;
  return 0;
}

static int begin(keel_idem *idem, keel_pg *conn, bool tx, const char *scope, const char *key,
                 const char *fingerprint, keel_idem_begin_cb cb, void *data) {
  if (idem == NULL) return UV_EINVAL;
  if (cb == NULL) return keel__fail(idem->last_error, UV_EINVAL, "cb is required");
  if (tx && (conn == NULL || idem->backend != IDEM_PG))
    return keel__fail(idem->last_error, UV_EINVAL, "begin_tx needs a PostgreSQL store and a conn");
  int rc = check_common(idem);
  if (rc == 0) rc = check_key(idem, scope, key, fingerprint);
  if (rc != 0) return rc;
  idem_op *op = op_new(idem, IDEM_BEGIN, scope, key, fingerprint);
  if (op == NULL) return keel__fail(idem->last_error, UV_ENOMEM, "out of memory");
  op->begin_cb = cb;
  op->data = data;
  op->conn = conn;
  keel__idem_token(idem, &op->token);
  return start(op);
}

int keel_idem_begin(keel_idem *idem, const char *scope, const char *key, const char *fingerprint,
                    keel_idem_begin_cb cb, void *data) {
  return begin(idem, NULL, false, scope, key, fingerprint, cb, data);
}

int keel_idem_begin_tx(keel_idem *idem, keel_pg *conn, const char *scope, const char *key,
                       const char *fingerprint, keel_idem_begin_cb cb, void *data) {
  return begin(idem, conn, true, scope, key, fingerprint, cb, data);
}

static char *hex_body(const void *body, size_t len) {
  static const char hex[] = "0123456789abcdef";
  char *out = keel__malloc(2 * len + 3);
  if (out == NULL) return NULL;
  const unsigned char *b = body;
  out[0] = '\\';
  out[1] = 'x';
  for (size_t i = 0; i < len; i++) {
    out[2 + 2 * i] = hex[b[i] >> 4];
    out[3 + 2 * i] = hex[b[i] & 15];
  }
  out[2 + 2 * len] = '\0';
  return out;
}

static int end_op(keel_idem *idem, keel_pg *conn, bool tx, idem_kind kind, const char *scope,
                  const char *key, const keel_idem_token *token, int response_status,
                  const void *body, size_t body_len, keel_idem_done_cb done, void *data) {
  if (idem == NULL) return UV_EINVAL;
  if (tx && (conn == NULL || idem->backend != IDEM_PG))
    return keel__fail(idem->last_error, UV_EINVAL,
                      "complete_tx needs a PostgreSQL store and a conn");
  int rc = check_common(idem);
  if (rc == 0) rc = check_key(idem, scope, key, NULL);
  if (rc != 0) return rc;
  if (token == NULL || !token_ok(token))
    return keel__fail(idem->last_error, UV_EINVAL, "token: 32 lower-case hex digits");
  if (body == NULL && body_len > 0)
    return keel__fail(idem->last_error, UV_EINVAL, "body NULL with body_len > 0");
  idem_op *op = op_new(idem, kind, scope, key, NULL);
  if (op == NULL) return keel__fail(idem->last_error, UV_ENOMEM, "out of memory");
  op->done_cb = done;
  op->data = data;
  op->conn = conn;
  op->token = *token;
  if (kind == IDEM_COMPLETE) {
    op->response_status = response_status;
    if (body_len > idem->opts.max_body) {
      op->too_large = true;
    } else if (idem->backend == IDEM_PG) {
      op->body = hex_body(body, body_len);
      op->body_len = 2 * body_len + 2;
    } else {
      op->body = keel__malloc(body_len + 1);
      if (op->body != NULL && body_len > 0) memcpy(op->body, body, body_len);
      op->body_len = body_len;
    }
    if (!op->too_large && op->body == NULL) {
      op_free(op);
      return keel__fail(idem->last_error, UV_ENOMEM, "out of memory");
    }
  }
  return start(op);
}

int keel_idem_complete(keel_idem *idem, const char *scope, const char *key,
                       const keel_idem_token *token, int response_status, const void *body,
                       size_t body_len, keel_idem_done_cb done, void *data) {
  return end_op(idem, NULL, false, IDEM_COMPLETE, scope, key, token, response_status, body,
                body_len, done, data);
}

int keel_idem_complete_tx(keel_idem *idem, keel_pg *conn, const char *scope, const char *key,
                          const keel_idem_token *token, int response_status, const void *body,
                          size_t body_len, keel_idem_done_cb done, void *data) {
  return end_op(idem, conn, true, IDEM_COMPLETE, scope, key, token, response_status, body, body_len,
                done, data);
}

int keel_idem_abort(keel_idem *idem, const char *scope, const char *key,
                    const keel_idem_token *token, keel_idem_done_cb done, void *data) {
  return end_op(idem, NULL, false, IDEM_ABORT, scope, key, token, 0, NULL, 0, done, data);
}

int keel_idem_install(keel_idem *idem, keel_idem_done_cb done, void *data) {
  if (idem == NULL) return UV_EINVAL;
  int rc = check_common(idem);
  if (rc != 0) return rc;
  idem_op *op = op_new(idem, IDEM_INSTALL, NULL, NULL, NULL);
  if (op == NULL) return keel__fail(idem->last_error, UV_ENOMEM, "out of memory");
  op->done_cb = done;
  op->data = data;
  return start(op);
}

void keel_idem_get_stats(const keel_idem *idem, keel_idem_stats *out) {
  if (idem == NULL || out == NULL) return;
  *out = idem->stats;
  memset(out->reserved_, 0, sizeof out->reserved_);
}

const char *keel_idem_last_error(const keel_idem *idem) {
  return idem == NULL ? "idem is NULL" : idem->last_error;
}

void keel_idem_close(keel_idem *idem, keel_close_cb cb, void *data) {
  if (idem == NULL || idem->closing) return;
  idem->closing = true;
  keel__stats_hooks_detach(&idem->stats_hooks); /* drops serve registrations */
  idem->close_cb = cb;
  idem->close_data = data;
  if (idem->stats.in_flight == 0) finish_close(idem);
}

keel__stats_hooks *keel__idem_stats_hooks(keel_idem *x) {
  return x->closing ? NULL : &x->stats_hooks; /* no registration once closing */
}
