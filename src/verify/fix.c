/* Fix-ups: copies of invalid rows waiting for a slot, running (at most
 * fix_concurrency, each with fix_timeout_ms) and waiting for a retry (a
 * min-heap on due time, at most fix_max_waiting). */
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "verify/verify_internal.h"

static void fixt_cb(uv_timer_t *t);

void keel__vq_push(keel__vfixq *q, keel_verify_fix *f) {
  f->next = NULL;
  f->prev = q->tail;
  if (q->tail)
    q->tail->next = f;
  else
    q->head = f;
  q->tail = f;
  q->n++;
  f->list = q;
}

void keel__vq_remove(keel_verify_fix *f) {
  keel__vfixq *q = f->list;
  if (q == NULL) return;
  if (f->prev)
    f->prev->next = f->next;
  else
    q->head = f->next;
  if (f->next)
    f->next->prev = f->prev;
  else
    q->tail = f->prev;
  q->n--;
  f->next = f->prev = NULL;
  f->list = NULL;
}

static bool w_before(const keel_verify_fix *a, const keel_verify_fix *b) {
  return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static unsigned max_waiting(const keel_verify *v) {
  return v->o.fix_max_waiting ? v->o.fix_max_waiting : 10000;
}

/* Returns 0, UV_ENOBUFS when fix_max_waiting wait already, or UV_ENOMEM. */
static int w_push(keel_verify *v, keel_verify_fix *f) {
  if (v->wn >= max_waiting(v)) return UV_ENOBUFS;
  if (v->wn == v->wcap) {
    unsigned max = max_waiting(v);
    unsigned cap = v->wcap == 0 ? 16 : v->wcap > max / 2 ? max : v->wcap * 2;
    if (cap > max) cap = max;
    keel_verify_fix **h = keel__realloc(v->wheap, (size_t)cap * sizeof *h);
    if (h == NULL) return UV_ENOMEM;
    v->wheap = h;
    v->wcap = cap;
  }
  f->seq = v->wseq++;
  unsigned i = v->wn++;
  while (i > 0) {
    unsigned parent = (i - 1) / 2;
    if (!w_before(f, v->wheap[parent])) break;
    v->wheap[i] = v->wheap[parent];
    i = parent;
  }
  v->wheap[i] = f;
  return 0;
}

static keel_verify_fix *w_pop(keel_verify *v) {
  if (v->wn == 0) return NULL;
  keel_verify_fix *top = v->wheap[0];
  keel_verify_fix *last = v->wheap[--v->wn];
  unsigned i = 0, n = v->wn;
  for (;;) {
    unsigned c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && w_before(v->wheap[c + 1], v->wheap[c])) c++;
    if (!w_before(v->wheap[c], last)) break;
    v->wheap[i] = v->wheap[c];
    i = c;
  }
  if (n > 0) v->wheap[i] = last;
  return top;
}

/* Copies a row (live or copied) into a new fix item. */
keel_verify_fix *keel__vfix_new(const keel_verify_row *row) {
  size_t strs = 0;
  for (int i = 0; i < row->ncols; i++) {
    const char *val = keel__vrow_val(row, i);
    strs += strlen(row->names[i]) + 1 + (val ? strlen(val) + 1 : 0);
  }
  size_t ptrs = 2 * (size_t)row->ncols * sizeof(char *);
  keel_verify_fix *f = keel__malloc(sizeof *f + ptrs + strs);
  if (f == NULL) return NULL;
  memset(f, 0, sizeof *f);
  const char **names = (const char **)(void *)(f + 1);
  const char **vals = names + row->ncols;
  char *p = (char *)(vals + row->ncols);
  for (int i = 0; i < row->ncols; i++) {
    size_t n = strlen(row->names[i]) + 1;
    memcpy(p, row->names[i], n);
    names[i] = p;
    p += n;
    const char *val = keel__vrow_val(row, i);
    if (val) {
      n = strlen(val) + 1;
      memcpy(p, val, n);
      vals[i] = p;
      p += n;
    } else {
      vals[i] = NULL;
    }
  }
  f->row.ncols = row->ncols;
  f->row.names = names;
  f->row.values = vals;
  f->row.nkeys = row->nkeys;
  for (int k = 0; k < row->nkeys; k++) f->keycols[k] = row->keycols[k];
  f->row.keycols = f->keycols;
  return f;
}

void keel__vfix_start(keel_verify *v) {
  keel_verify_fix *f = v->pending.head;
  keel__vq_remove(f);
  keel__vq_push(&v->active, f);
  f->due = v->o.fix_timeout_ms ? uv_now(v->loop) + v->o.fix_timeout_ms : UINT64_MAX;
  v->st.fixes_attempted++;
  v->o.fix(v, f, &f->row, v->o.data);
}

uint64_t keel__vfix_drop_all(keel_verify *v) {
  uint64_t n = 0;
  for (keel_verify_fix *f; (f = v->pending.head) != NULL; n++) {
    keel__vq_remove(f);
    keel__free(f);
  }
  for (keel_verify_fix *f; (f = w_pop(v)) != NULL; n++) keel__free(f);
  for (keel_verify_fix *f; (f = v->active.head) != NULL; n++) {
    keel__vq_remove(f);
    f->v = NULL;
  }
  return n;
}

static void fix_failed(keel_verify *v, keel_verify_fix *f, int status) {
  char key[64];
  keel_verify_row_key(&f->row, key, sizeof key);
  if (f->attempt <= v->o.fix_max_retries) {
    v->st.fixes_retried++;
    uint64_t d = keel_backoff_delay(&v->o.fix_backoff, f->attempt, f->prev_delay, NULL);
    f->prev_delay = d;
    f->attempt++;
    f->due = uv_now(v->loop) + d;
    f->v = v;
    int rc = w_push(v, f);
    if (rc == 0) {
      keel__vset_error(v, status, "fix-up of row %s failed (%s), retrying", key,
                       keel_err_name(status));
      return;
    }
    v->st.fixes_failed++;
    v->st.fixes_dropped++;
    if (rc == UV_ENOBUFS)
      keel__vset_error(v, status,
                       "fix-up of row %s failed (%s), not retried: %u fix-ups already wait", key,
                       keel_err_name(status), max_waiting(v));
    else
      keel__vset_error(v, rc, "fix-up of row %s failed (%s), not retried: out of memory", key,
                       keel_err_name(status));
    keel__free(f);
  } else {
    v->st.fixes_failed++;
    keel__vset_error(v, status, "fix-up of row %s failed for good (%s)", key,
                     keel_err_name(status));
    keel__free(f);
  }
}

int keel_verify_fix_done(keel_verify_fix *f, int status) {
  if (f == NULL) return UV_EINVAL;
  keel_verify *v = f->v;
  if (v == NULL) {
    keel__free(f);
    return KEEL_ESTALE;
  }
  keel__vq_remove(f);
  if (status == 0) {
    v->st.fixes_succeeded++;
    keel__free(f);
  } else {
    fix_failed(v, f, status);
  }
  keel__vkick(v);
  return 0;
}

unsigned keel_verify_fix_attempt(const keel_verify_fix *f) {
  return f ? f->attempt : 0;
}

uint64_t keel_verify_fix_fence(const keel_verify_fix *f) {
  return f && f->v ? f->fence : 0;
}

int keel_verify_fix_fence_sql(const keel_verify_fix *f, char *buf, size_t cap) {
  if (f == NULL || (buf == NULL && cap > 0)) return UV_EINVAL;
  return keel__vlease_fence_sql(f->v, f->fence, buf, cap);
}

/* Arms the fix-up timer for the earliest retry or attempt deadline: the top
 * of the retry heap, and the head of the active list (attempts start in
 * order and share one timeout, so their deadlines are in list order). */
void keel__varm_fix_timer(keel_verify *v) {
  if (v->closing) return;
  uint64_t min = UINT64_MAX;
  if (v->wn > 0) min = v->wheap[0]->due;
  if (v->o.fix_timeout_ms > 0 && v->active.head && v->active.head->due < min)
    min = v->active.head->due;
  if (min == UINT64_MAX) {
    uv_timer_stop(&v->fixt);
    return;
  }
  uint64_t now = uv_now(v->loop);
  uv_timer_start(&v->fixt, fixt_cb, min > now ? min - now : 0, 0);
}

static void fixt_cb(uv_timer_t *t) {
  keel_verify *v = t->data;
  uint64_t now = uv_now(v->loop);
  while (v->wn > 0 && v->wheap[0]->due <= now) keel__vq_push(&v->pending, w_pop(v));
  if (v->o.fix_timeout_ms > 0) {
    keel_verify_fix *next;
    for (keel_verify_fix *f = v->active.head; f; f = next) {
      next = f->next;
      if (f->due > now) break;
      keel__vq_remove(f);
      v->st.fixes_timed_out++;
      /* The user still holds f: detach it (fix_done frees it) and go on with
       * a copy. */
      f->v = NULL;
      keel_verify_fix *g = keel__vfix_new(&f->row);
      if (g == NULL) {
        v->st.fixes_failed++;
        keel__vset_error(v, UV_ENOMEM, "out of memory retrying a timed-out fix-up");
        continue;
      }
      g->attempt = f->attempt;
      g->prev_delay = f->prev_delay;
      g->fence = f->fence;
      fix_failed(v, g, UV_ETIMEDOUT);
    }
  }
  keel__vpump(v);
}
