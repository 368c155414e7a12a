/* The integrity context: defaults, statistics, errors, close; and the SQL
 * text builder the operations share. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "integrity/integrity_internal.h"

static void grow(keel__sql *b, size_t extra) {
  if (b->failed || b->len + extra + 1 <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra + 1) cap *= 2;
  char *text = keel__realloc(b->text, cap);
  if (text == NULL) {
    b->failed = true;
    return;
  }
  b->text = text;
  b->cap = cap;
}

void keel__sql_add(keel__sql *b, const char *text) {
  size_t len = strlen(text);
  grow(b, len);
  if (b->failed) return;
  memcpy(b->text + b->len, text, len + 1);
  b->len += len;
}

void keel__sql_addf(keel__sql *b, const char *fmt, ...) {
  char buf[256];
  va_list args;
  va_start(args, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  if (n < 0 || (size_t)n >= sizeof buf) {
    b->failed = true;
    return;
  }
  keel__sql_add(b, buf);
}

void keel__sql_ident(keel__sql *b, const char *ident, bool allow_qualified) {
  char quoted[160];
  if (ident == NULL || keel_pg_quote_ident(quoted, sizeof quoted, ident, allow_qualified) < 0) {
    b->failed = true;
    return;
  }
  keel__sql_add(b, quoted);
}

void keel__sql_free(keel__sql *b) {
  keel__free(b->text);
  memset(b, 0, sizeof *b);
}

void keel_integrity_opts_init(keel_integrity_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  keel_retry_opts_init(&opts->retry);
  keel_backoff_full_jitter(&opts->retry.backoff, 20, 2.0, 1000);
  opts->retry.max_attempts = 5;
  opts->slug_max_attempts = 5;
}

int keel__ig_check_retry(keel_integrity *ig, const keel_retry_opts *ro) {
  const char *why = NULL;
  if (ro->max_attempts == 0)
    return keel__fail(ig->last_error, UV_EINVAL, "retry policy: max_attempts must be >= 1");
  if (keel_backoff_validate(&ro->backoff, &why) != 0)
    return keel__fail(ig->last_error, UV_EINVAL, "retry policy: %s", why ? why : "bad backoff");
  return 0;
}

int keel_integrity_new(uv_loop_t *loop, keel_pg_pool *pool, const keel_integrity_opts *opts,
                       keel_integrity **out) {
  if (loop == NULL || pool == NULL || out == NULL) return UV_EINVAL;
  keel_integrity_opts defaults;
  if (opts == NULL) {
    keel_integrity_opts_init(&defaults);
    opts = &defaults;
  }
  if (opts->retry.max_attempts == 0 || keel_backoff_validate(&opts->retry.backoff, NULL) != 0 ||
      opts->slug_max_attempts == 0)
    return UV_EINVAL;
  keel_integrity *ig = keel__calloc(1, sizeof *ig);
  if (ig == NULL) return UV_ENOMEM;
  ig->loop = loop;
  ig->pool = pool;
  ig->opts = *opts;
  memset(ig->opts.reserved_, 0, sizeof ig->opts.reserved_);
  ig->opts.idempotency_table = NULL;
  const char *table = opts->idempotency_table ? opts->idempotency_table : KEEL_TX_IDEMPOTENCY_TABLE;
  char probe[160];
  if (keel_pg_quote_ident(probe, sizeof probe, table, true) < 0) {
    keel__free(ig);
    return UV_EINVAL;
  }
  ig->idempotency_table = keel__strdup(table);
  if (ig->idempotency_table == NULL) {
    keel__free(ig);
    return UV_ENOMEM;
  }
  uv_timer_init(loop, &ig->close_timer);
  ig->close_timer.data = ig;
  *out = ig;
  return 0;
}

int keel__ig_begin(keel_integrity *ig) {
  if (ig->closing) return keel__fail(ig->last_error, KEEL_ECLOSING, "the context is closing");
  ig->outstanding++;
  ig->stats.operations++;
  return 0;
}

void keel__ig_unbegin(keel_integrity *ig) {
  ig->outstanding--;
  ig->stats.operations--;
}

static void on_close_timer_closed(uv_handle_t *h) {
  keel_integrity *ig = h->data;
  keel_close_cb cb = ig->close_cb;
  void *data = ig->close_data;
  keel__occ_shapes_free(ig);
  keel__free(ig->idempotency_table);
  keel__free(ig);
  if (cb != NULL) cb(ig, data);
}

/* The close callback runs from the handle's close: always on a later loop
 * iteration than keel_integrity_close(), and with no allocation. */
static void free_context(keel_integrity *ig) {
  uv_close((uv_handle_t *)&ig->close_timer, on_close_timer_closed);
}

void keel__ig_end(keel_integrity *ig, int status) {
  if (status == 0) ig->stats.successes++;
  if (--ig->outstanding == 0 && ig->closing) free_context(ig);
}

void keel__ig_record_error(keel_integrity *ig, keel_pg *conn, int status,
                           const keel_pg_result *res) {
  if (status == 0) return;
  const char *sqlstate = res != NULL ? keel_pg_result_sqlstate(res) : NULL;
  keel__ig_set_sqlstate(ig, sqlstate);
  keel_sqlstate_class cls = status == KEEL_ECONN      ? KEEL_SQLSTATE_CONNECTION
                            : status == KEEL_EINDOUBT ? KEEL_SQLSTATE_IN_DOUBT
                                                      : keel_sqlstate_classify(sqlstate);
  if (cls != KEEL_SQLSTATE_NONE) ig->stats.by_class[cls]++;
  const char *message = res != NULL ? keel_pg_result_error(res) : NULL;
  if (status == KEEL_EPG && sqlstate != NULL && message != NULL)
    keel__fail(ig->last_error, status, "SQLSTATE %s: %s", sqlstate, message);
  else if (conn != NULL && (status == KEEL_ECONN || status == KEEL_EINDOUBT))
    keel__fail(ig->last_error, status, "%s", keel_pg_last_error(conn));
  else
    keel__fail(ig->last_error, status, "%s", keel_strerror(status));
}

void keel__ig_set_sqlstate(keel_integrity *ig, const char *sqlstate) {
  if (sqlstate != NULL && strlen(sqlstate) == 5)
    memcpy(ig->last_sqlstate, sqlstate, 6);
  else
    ig->last_sqlstate[0] = '\0';
}

void keel_integrity_get_stats(const keel_integrity *ig, keel_integrity_stats *out) {
  if (ig == NULL || out == NULL) return;
  *out = ig->stats;
  memset(out->reserved_, 0, sizeof out->reserved_);
}

const char *keel_integrity_last_sqlstate(const keel_integrity *ig) {
  return ig == NULL ? "" : ig->last_sqlstate;
}

const char *keel_integrity_last_error(const keel_integrity *ig) {
  return ig == NULL ? "context is NULL" : ig->last_error;
}

void keel_integrity_close(keel_integrity *ig, keel_close_cb cb, void *data) {
  if (ig == NULL || ig->closing) return;
  keel__stats_hooks_detach(&ig->stats_hooks);
  ig->closing = true;
  ig->close_cb = cb;
  ig->close_data = data;
  if (ig->outstanding > 0) return; /* freed when the last operation ends */
  free_context(ig);
}

void keel__ig_random16(keel_integrity *ig, unsigned char out[16]) {
  if (uv_random(NULL, NULL, out, 16, 0, NULL) == 0) return;
  uint64_t t = uv_hrtime(), n = ++ig->random_fallback;
  memcpy(out, &t, 8);
  memcpy(out + 8, &n, 8);
}
