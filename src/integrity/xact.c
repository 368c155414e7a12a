/* Finding out what became of a transaction whose COMMIT was lost in flight:
 * keel learns the transaction's id (pg_current_xact_id(), pipelined with
 * its first statement) and, after the loss, asks pg_xact_status() until
 * the answer is final: committed, aborted (a backend that died or was cut
 * off aborts its transaction on the way out), or unknown. */
#include <string.h>

#include "core/alloc.h"
#include "integrity/integrity_internal.h"

#define XACT_POLL_MS 20
#define XACT_POLLS 250 /* about 5 s */

typedef struct xact_check {
  keel_integrity *ig;
  char xid[32];
  unsigned polls;
  int outcome;
  uv_timer_t timer;
  keel__xact_cb cb;
  void *data;
} xact_check;

static void on_check_closed(uv_handle_t *h) {
  xact_check *x = h->data;
  keel__xact_cb cb = x->cb;
  void *data = x->data;
  keel_integrity *ig = x->ig;
  int outcome = x->outcome;
  keel__free(x);
  if (outcome != KEEL_EINDOUBT) ig->stats.in_doubt_resolved++;
  cb(ig, outcome, data);
}

static void finish_check(xact_check *x, int outcome) {
  x->outcome = outcome;
  uv_close((uv_handle_t *)&x->timer, on_check_closed);
}

static void poll_later(xact_check *x);

static void on_status(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  xact_check *x = data;
  const char *v =
      status == 0 && keel_pg_result_nrows(res) > 0 ? keel_pg_result_value(res, 0, 0) : NULL;
  if (v != NULL && strcmp(v, "committed") == 0) {
    finish_check(x, 0);
  } else if (v != NULL && strcmp(v, "aborted") == 0) {
    finish_check(x, KEEL_ECONN); /* certainly not committed */
  } else if (status == 0 && v == NULL) {
    finish_check(x, KEEL_EINDOUBT); /* too old to tell */
  } else {
    poll_later(x); /* in progress, or the check itself failed: ask again */
  }
}

static void on_timer(uv_timer_t *t) {
  xact_check *x = t->data;
  const char *values[] = {x->xid};
  int rc = x->ig->closing ? KEEL_ECLOSING
                          : keel_pg_pool_query(x->ig->pool, "SELECT pg_xact_status($1::xid8)", 1,
                                               values, on_status, x);
  if (rc != 0) finish_check(x, KEEL_EINDOUBT);
}

static void poll_later(xact_check *x) {
  if (x->polls++ >= XACT_POLLS || x->ig->closing ||
      uv_timer_start(&x->timer, on_timer, x->polls == 1 ? 0 : XACT_POLL_MS, 0) != 0)
    finish_check(x, KEEL_EINDOUBT);
}

int keel__ig_xact_check(keel_integrity *ig, const char *xid, keel__xact_cb cb, void *data) {
  if (xid == NULL || xid[0] == '\0' || strlen(xid) >= 32) return KEEL_EINDOUBT;
  xact_check *x = keel__calloc(1, sizeof *x);
  if (x == NULL) return UV_ENOMEM;
  x->ig = ig;
  memcpy(x->xid, xid, strlen(xid) + 1);
  x->cb = cb;
  x->data = data;
  uv_timer_init(ig->loop, &x->timer);
  x->timer.data = x;
  poll_later(x);
  return 0;
}
