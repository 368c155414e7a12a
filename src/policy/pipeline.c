/*
 * Pipeline: policies composed around one asynchronous operation.
 *
 * A call is a tree of frames: the root (the call itself), one frame per
 * policy below it, and leaves (attempts of the operation). A policy frame
 * has one child, except hedging (several at once). Frames come from a free
 * list. Results travel upwards with finish(); a policy that abandons a
 * subtree (timeout, hedging winner, close) calls cancel_subtree().
 *
 * Re-entrancy: user code (op, done, fallback, classify, events, cancel
 * callbacks, a breaker's hooks) runs inside the walk. The user's calls into
 * the pipeline never change the tree: execute() and keel_attempt_done() only
 * append to the ready list, close() only sets a flag; the tree work they ask
 * for runs from the idle callback (on_idle), one ready frame at a time, and
 * the close sweep runs between two of them.
 *
 * Nothing of the tree runs inside execute/done/close: a policy that decides
 * at once (rate limited, breaker open, bulkhead full, no memory) parks its
 * frame on the ready list with its result (F_PENDING), so start() never
 * reports to its parent synchronously.
 */
#include "policy/policy_stats.h"
#include "core/stats_hook.h"
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "keel/policy.h"
#include "policy/ratelimit_internal.h"

#define MAX_POLICIES 32
#define MAX_HEDGES 16

enum {
  F_READY = 1u << 0,     /* on the ready list */
  F_DETACHED = 1u << 1,  /* abandoned while on the ready list: free it there */
  F_PENDING = 1u << 2,   /* result waiting in pres (ready list) */
  F_STARTED = 1u << 3,   /* root: taken from the ready list */
  F_REPORTED = 1u << 4,  /* leaf: keel_attempt_done() came */
  F_CANCELLED = 1u << 5, /* leaf: told to stop */
  F_TIMER = 1u << 6,     /* timer allocated (kept across reuse) */
  F_ACQUIRED = 1u << 7,  /* breaker permit held */
  F_BH_ACTIVE = 1u << 8, /* holds a bulkhead slot */
  F_BH_QUEUED = 1u << 9, /* waits in a bulkhead queue */
  F_IN_DL = 1u << 10,    /* on a timeout's deadline list */
  F_BLOCK = 1u << 11,    /* part of a call block (not from the spare list) */
  F_INUSE = 1u << 12,    /* block frame: in use */
  F_ROOTED = 1u << 13    /* root: on the list of active roots */
};

typedef struct res {
  int status;
  int origin;
  uint64_t retry_after;
} res;

typedef struct keel_attempt frame;

struct keel_attempt {
  keel_pipeline *p;
  frame *parent;
  frame *root;
  frame *next; /* ready list or free list */
  frame *kids; /* children (doubly linked through sib_*) */
  frame *sib_next, *sib_prev;
  frame *l_next, *l_prev; /* deadline list, bulkhead queue, active roots */
  int stage;              /* -1 root; 0..n-1 a policy; n a leaf */
  unsigned flags;
  int status; /* leaf: reported status */
  int cancel_reason;
  unsigned count; /* retry/hedging: attempts started; root: leaf attempts */
  unsigned number;
  uint64_t t0;       /* clock time at start (breaker, bulkhead, root) */
  uint64_t deadline; /* timeout / retry deadline (loop time) */
  uint64_t prev_delay;
  res pres; /* F_PENDING: result to deliver; hedging: last failure */
  keel_breaker_permit permit;
  keel_attempt_cancel_fn cancel_fn;
  void *cancel_data;
  keel_pipeline_op_fn op; /* root */
  keel_pipeline_done_cb done;
  void *data;
  uv_timer_t *timer; /* retry / hedging delays; allocated on first use and
                        kept with the frame */
  unsigned refs;     /* root: block frames in use, the root included */
};

typedef struct pstage {
  keel_policy pol;
  uv_timer_t timer;       /* TIMEOUT: the earliest deadline */
  frame *l_head, *l_tail; /* TIMEOUT: deadlines; BULKHEAD: waiting calls */
  uint32_t active, queued;
  bool armed; /* TIMEOUT: timer started */
  keel_rng rng;
} pstage;

typedef struct ts_node {
  struct ts_node *next;
  keel_pipeline_op_fn op;
  keel_pipeline_done_cb done;
  void *data;
} ts_node;

struct keel_pipeline {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  size_t n;
  pstage *st;
  keel_clock clock;
  keel_pipeline_event_cb on_event;
  void *data;
  uint32_t max_calls;
  frame *ready_head, *ready_tail; /* for the next pass of on_idle */
  frame *now_head, *now_tail;     /* reports made inside this pass */
  bool in_drain;
  bool dl_dirty; /* a deadline list became empty in this pass */
  uint64_t now;  /* uv_now() at the start of this pass */
  bool flat;     /* every policy takes the flat path (flat_run()) */
  uint8_t nup;   /* flat: the stages with work on the way up, in order */
  uint8_t up[MAX_POLICIES];
  frame *free_list;   /* spare frames (hedged attempts, a retry's new leaf
                         while the old one still owes its report) */
  frame *free_blocks; /* call blocks: root + one frame per policy + leaf */
  frame *roots;       /* active roots (started, not done) */
  uint64_t in_flight;
  uint64_t ops_out; /* attempts started and not reported */
  keel_pipeline_stats stats;
  uv_idle_t idle;
  uv_async_t async;
  uv_mutex_t mu;
  ts_node *ts_head, *ts_tail;
  uint32_t ts_count;
  bool ts_closed;
  bool closing, swept, handles_closing;
  int handles_open;
  keel_close_cb close_cb;
  void *close_data;
};

static void start(frame *f);
static void finish(frame *f, res r);
static void cancel_subtree(frame *f, int reason);
static void on_idle(uv_idle_t *h);
static void after_callbacks(keel_pipeline *p);

/* ---- policies ------------------------------------------------------------ */

const char *keel_policy_kind_name(keel_policy_kind kind) {
  switch (kind) {
    case KEEL_POLICY_RATELIMIT:
      return "ratelimit";
    case KEEL_POLICY_TIMEOUT:
      return "timeout";
    case KEEL_POLICY_RETRY:
      return "retry";
    case KEEL_POLICY_BREAKER:
      return "breaker";
    case KEEL_POLICY_FALLBACK:
      return "fallback";
    case KEEL_POLICY_HEDGING:
      return "hedging";
    case KEEL_POLICY_BULKHEAD:
      return "bulkhead";
  }
  return "unknown";
}

void keel_policy_ratelimit(keel_policy *pol, keel_ratelimit *rl) {
  if (pol == NULL) return;
  memset(pol, 0, sizeof *pol);
  pol->kind = KEEL_POLICY_RATELIMIT;
  pol->u.ratelimit = rl;
}

void keel_policy_timeout(keel_policy *pol, uint64_t timeout_ms) {
  if (pol == NULL) return;
  memset(pol, 0, sizeof *pol);
  pol->kind = KEEL_POLICY_TIMEOUT;
  pol->u.timeout_ms = timeout_ms;
}

void keel_policy_retry(keel_policy *pol, const keel_retry_opts *opts) {
  if (pol == NULL) return;
  memset(pol, 0, sizeof *pol);
  pol->kind = KEEL_POLICY_RETRY;
  if (opts != NULL) {
    pol->u.retry = *opts;
  } else {
    keel_retry_opts_init(&pol->u.retry);
  }
}

void keel_policy_breaker(keel_policy *pol, keel_breaker *b) {
  if (pol == NULL) return;
  memset(pol, 0, sizeof *pol);
  pol->kind = KEEL_POLICY_BREAKER;
  pol->u.breaker = b;
}

void keel_policy_fallback(keel_policy *pol, keel_fallback_fn fn, void *data) {
  if (pol == NULL) return;
  memset(pol, 0, sizeof *pol);
  pol->kind = KEEL_POLICY_FALLBACK;
  pol->u.fallback.fn = fn;
  pol->u.fallback.data = data;
}

void keel_policy_hedging(keel_policy *pol, uint64_t delay_ms, uint32_t max_attempts) {
  if (pol == NULL) return;
  memset(pol, 0, sizeof *pol);
  pol->kind = KEEL_POLICY_HEDGING;
  pol->u.hedging.delay_ms = delay_ms;
  pol->u.hedging.max_attempts = max_attempts;
}

void keel_policy_bulkhead(keel_policy *pol, uint32_t max_concurrent, uint32_t max_queued) {
  if (pol == NULL) return;
  memset(pol, 0, sizeof *pol);
  pol->kind = KEEL_POLICY_BULKHEAD;
  pol->u.bulkhead.max_concurrent = max_concurrent;
  pol->u.bulkhead.max_queued = max_queued;
}

void keel_pipeline_opts_init(keel_pipeline_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->max_calls = 100000;
}

static const char *check_policy(const keel_policy *pol) {
  switch (pol->kind) {
    case KEEL_POLICY_RATELIMIT:
      return pol->u.ratelimit == NULL ? "ratelimit policy without a limiter" : NULL;
    case KEEL_POLICY_TIMEOUT:
      return pol->u.timeout_ms == 0 ? "timeout_ms must be > 0" : NULL;
    case KEEL_POLICY_RETRY: {
      const char *why = NULL;
      if (pol->u.retry.max_attempts == 0) return "retry max_attempts must be >= 1";
      if (!(pol->u.retry.jitter >= 0 && pol->u.retry.jitter <= 1))
        return "retry jitter must be in [0, 1]";
      if (keel_backoff_validate(&pol->u.retry.backoff, &why) != 0) return why;
      return NULL;
    }
    case KEEL_POLICY_BREAKER:
      return pol->u.breaker == NULL ? "breaker policy without a breaker" : NULL;
    case KEEL_POLICY_FALLBACK:
      return pol->u.fallback.fn == NULL ? "fallback policy without a function" : NULL;
    case KEEL_POLICY_HEDGING:
      return pol->u.hedging.max_attempts == 0 || pol->u.hedging.max_attempts > MAX_HEDGES
                 ? "hedging max_attempts must be in 1..16"
                 : NULL;
    case KEEL_POLICY_BULKHEAD:
      return pol->u.bulkhead.max_concurrent == 0 ? "bulkhead max_concurrent must be >= 1" : NULL;
  }
  return "unknown policy kind";
}

int keel_pipeline_validate_opts(const keel_pipeline_opts *opts, const char **why) {
  const char *w = NULL;
  if (opts == NULL) {
    w = "opts is NULL";
  } else if (opts->npolicies > MAX_POLICIES) {
    w = "more than 32 policies";
  } else if (opts->npolicies > 0 && opts->policies == NULL) {
    w = "policies is NULL";
  } else if (opts->max_calls == 0) {
    w = "max_calls must be >= 1";
  } else {
    for (size_t i = 0; i < opts->npolicies && w == NULL; i++) w = check_policy(&opts->policies[i]);
  }
  if (why != NULL) *why = w;
  return w == NULL ? 0 : UV_EINVAL;
}

/* ---- frames -------------------------------------------------------------- */

/* The loop's time (uv_now), read once per pass of on_idle. */
static inline uint64_t clock_loop(keel_pipeline *p) {
  return p->in_drain ? p->now : uv_now(p->loop);
}

/* The loop's time does not move within one pass of on_idle: read it once. */
static inline uint64_t clock_now(keel_pipeline *p) {
  if (p->in_drain && p->clock.now == NULL) return p->now;
  return keel__clock_now(&p->clock, p->loop);
}

/*
 * Frames. A call takes one block of n + 2 frames (root, one per policy, the
 * leaf), so that the common path touches one piece of memory and one free
 * list. A policy whose block slot below it is still taken (a hedged second
 * attempt; a retry while the cancelled leaf still owes its report) takes a
 * spare frame instead. A block returns to its free list when none of its
 * frames is in use.
 */
static frame *block_get(keel_pipeline *p) {
  frame *b = p->free_blocks;
  if (b != NULL) {
    p->free_blocks = b->next;
  } else {
    b = keel__calloc(p->n + 2, sizeof *b);
    if (b == NULL) return NULL;
    for (size_t i = 0; i < p->n + 2; i++) {
      b[i].p = p;
      b[i].root = b; /* for good: a block frame always belongs to its block */
      b[i].flags = F_BLOCK;
      b[i].stage = (int)i - 1;
    }
  }
  b->flags = (b->flags & F_TIMER) | F_BLOCK | F_INUSE;
  b->refs = 1;
  b->kids = NULL;
  b->count = 0;
  return b;
}

/* A frame for the child (stage) of a call whose root is root. */
static frame *frame_get(keel_pipeline *p, frame *root, int stage) {
  frame *f = root + stage + 1;
  if (!(f->flags & F_INUSE)) {
    f->flags = (f->flags & F_TIMER) | F_BLOCK | F_INUSE;
    root->refs++;
    f->kids = NULL;
    return f;
  } else {
    f = p->free_list;
    if (f != NULL) {
      p->free_list = f->next;
      f->flags &= F_TIMER;
    } else {
      f = keel__malloc(sizeof *f);
      if (f == NULL) return NULL;
      f->flags = 0;
      f->timer = NULL;
      f->p = p;
    }
    f->stage = stage;
    f->root = root;
    f->kids = NULL;
    root->refs++; /* spares hold the block too: they read the root */
  }
  return f;
}

static void frame_put(frame *f) {
  keel_pipeline *p = f->p;
  frame *root = f->root;
  if (f->flags & F_TIMER) uv_timer_stop(f->timer);
  if (f->flags & F_BLOCK) {
    f->flags &= ~F_INUSE;
  } else {
    f->next = p->free_list;
    p->free_list = f;
  }
  if (--root->refs == 0) {
    root->next = p->free_blocks;
    p->free_blocks = root;
  }
}

static void ready_push(keel_pipeline *p, frame *f) {
  f->flags |= F_READY;
  f->next = NULL;
  if (p->ready_tail != NULL) {
    p->ready_tail->next = f;
  } else {
    p->ready_head = f;
    uv_idle_start(&p->idle, on_idle);
  }
  p->ready_tail = f;
}

static inline void kid_link(frame *parent, frame *f) {
  frame *first = parent->kids;
  f->parent = parent;
  f->sib_prev = NULL;
  f->sib_next = first;
  if (first != NULL) first->sib_prev = f;
  parent->kids = f;
}

static inline void kid_unlink(frame *f) {
  frame *parent = f->parent;
  if (parent == NULL) return;
  if (f->sib_prev == NULL && f->sib_next == NULL) { /* the only child */
    parent->kids = NULL;
    f->parent = NULL;
    return;
  }
  if (f->sib_prev != NULL) {
    f->sib_prev->sib_next = f->sib_next;
  } else {
    parent->kids = f->sib_next;
  }
  if (f->sib_next != NULL) f->sib_next->sib_prev = f->sib_prev;
  f->parent = NULL;
}

static void list_append(frame **head, frame **tail, frame *f) {
  f->l_next = NULL;
  f->l_prev = *tail;
  if (*tail != NULL) {
    (*tail)->l_next = f;
  } else {
    *head = f;
  }
  *tail = f;
}

static void list_remove(frame **head, frame **tail, frame *f) {
  if (f->l_prev != NULL) {
    f->l_prev->l_next = f->l_next;
  } else {
    *head = f->l_next;
  }
  if (f->l_next != NULL) {
    f->l_next->l_prev = f->l_prev;
  } else {
    *tail = f->l_prev;
  }
  f->l_next = f->l_prev = NULL;
}

static void emit(keel_pipeline *p, keel_policy_event_kind kind, int idx, frame *root,
                 unsigned attempt, int status, uint64_t delay) {
  if (p->on_event == NULL) return;
  keel_policy_event ev;
  ev.kind = kind;
  ev.policy = idx < 0 ? 0 : (size_t)idx;
  ev.attempt = attempt != 0 ? attempt : root->count;
  ev.status = status;
  ev.delay_ms = delay;
  ev.call_data = root->data;
  p->on_event(p, &ev, p->data);
}

/* Parks f on the ready list with its result: its parent hears of it on the
 * next pass, never inside start(). */
static void defer_result(frame *f, int status, uint64_t retry_after) {
  if (f->flags & F_TIMER) uv_timer_stop(f->timer);
  f->pres.status = status;
  f->pres.origin = f->stage;
  f->pres.retry_after = retry_after;
  f->flags |= F_PENDING;
  ready_push(f->p, f);
}

/* Creates the child of f and links it (not started yet). Returns it, or
 * NULL with *rc = KEEL_ECLOSING (the sweep answers the call) or UV_ENOMEM
 * (nothing created). */
static inline frame *spawn_frame(frame *f, int *rc) {
  keel_pipeline *p = f->p;
  if (p->closing) {
    *rc = KEEL_ECLOSING;
    return NULL;
  }
  frame *c = frame_get(p, f->root, f->stage + 1);
  if (c == NULL) {
    *rc = UV_ENOMEM;
    return NULL;
  }
  kid_link(f, c);
  return c;
}

/* Creates and starts the child of f. Returns 0, KEEL_ECLOSING or UV_ENOMEM
 * (nothing created). */
static int spawn(frame *f) {
  int rc = 0;
  frame *c = spawn_frame(f, &rc);
  if (c == NULL) return rc;
  start(c);
  return 0;
}

/* Arms f's timer. Returns 0 or UV_ENOMEM (the timer could not be
 * allocated). */
static int timer_arm(frame *f, uint64_t ms, uv_timer_cb cb) {
  if (!(f->flags & F_TIMER)) {
    f->timer = keel__malloc(sizeof *f->timer);
    if (f->timer == NULL) return UV_ENOMEM;
    uv_timer_init(f->p->loop, f->timer); /* cannot fail */
    f->flags |= F_TIMER;
  }
  f->timer->data = f;
  uv_timer_start(f->timer, cb, ms, 0);
  return 0;
}

/* ---- per-policy start ------------------------------------------------------ */

static void on_deadline(uv_timer_t *t);

/* A timeout's deadline list became empty: stop its timer, at the end of the
 * pass when inside one (a stream of quick calls then starts and stops it
 * once per pass, not once per call). */
static void deadlines_emptied(keel_pipeline *p, pstage *s) {
  if (p->in_drain) {
    p->dl_dirty = true;
  } else if (s->armed) {
    s->armed = false;
    uv_timer_stop(&s->timer);
  }
}

static void on_retry_timer(uv_timer_t *t);
static void on_hedge_timer(uv_timer_t *t);

static uint32_t bulkhead_limit(pstage *s) {
  uint32_t max = s->pol.u.bulkhead.max_concurrent;
  if (s->pol.u.bulkhead.hook.limit == NULL) return max;
  uint32_t l = s->pol.u.bulkhead.hook.limit(s->pol.u.bulkhead.hook.data);
  return l < 1 ? 1 : l > max ? max : l;
}

/* Whether bulkhead stage s may admit one more call now. */
static bool bulkhead_has_room(pstage *s) {
  if (s->active >= bulkhead_limit(s)) return false;
  return s->pol.u.bulkhead.adaptive == NULL || keel_adaptive_has_room(s->pol.u.bulkhead.adaptive);
}

static void release_own(frame *f, int reason, bool admit);

/* Spawns f's child; when that fails, f gives back what it holds and ends
 * with the error on the next pass. */
static void spawn_or_fail(frame *f) {
  int rc = spawn(f);
  if (rc != 0) {
    release_own(f, rc, false);
    defer_result(f, rc, 0);
  }
}

static void bulkhead_enter(frame *f) {
  keel_pipeline *p = f->p;
  pstage *s = &p->st[f->stage];
  s->active++;
  p->stats.bulkhead_active++;
  if (s->active > p->stats.bulkhead_active_max) p->stats.bulkhead_active_max = s->active;
  f->flags |= F_BH_ACTIVE;
  f->t0 = clock_now(p);
  if (s->pol.u.bulkhead.adaptive != NULL) {
    keel_adaptive_try_acquire(s->pol.u.bulkhead.adaptive); /* has room: checked */
    f->deadline = uv_hrtime();
  }
  spawn_or_fail(f);
}

static void hedge_next(frame *f) {
  keel_pipeline *p = f->p;
  f->count++;
  p->stats.hedges++;
  emit(p, KEEL_EVENT_HEDGE, f->stage, f->root, f->count, 0, 0);
  int rc = spawn(f);
  if (rc != 0) {
    f->count = p->st[f->stage].pol.u.hedging.max_attempts; /* no more */
    if (f->kids == NULL) defer_result(f, rc, 0);
  }
}

/* Rate limit stage f said no (rc) with the time until allowed. */
static void ratelimit_refused(frame *f, int rc, uint64_t after) {
  keel_pipeline *p = f->p;
  if (rc == KEEL_ERATELIMIT) {
    p->stats.ratelimited++;
    emit(p, KEEL_EVENT_RATELIMITED, f->stage, f->root, 0, rc, after);
  }
  defer_result(f, rc, rc == KEEL_ERATELIMIT ? after : 0);
}

/* Breaker stage f could not acquire a permit (rc). */
static void breaker_refused(frame *f, int rc) {
  keel_pipeline *p = f->p;
  if (rc != KEEL_ECLOSING && rc != UV_EINVAL) {
    p->stats.breaker_rejected++;
    emit(p, KEEL_EVENT_BREAKER_REJECTED, f->stage, f->root, 0, rc, 0);
  }
  defer_result(f, rc, 0);
}

/*
 * Starts f. The policies that go on to their child at once when they let
 * the call through (rate limit, timeout, retry, breaker, fallback) do not
 * recurse: the loop walks down to the child (spawn_or_fail() inline), so
 * the common path runs down a whole call in one frame of C.
 */
static void start(frame *f) {
  keel_pipeline *p = f->p;
  for (;;) {
    if ((size_t)f->stage == p->n) { /* a leaf: run the operation */
      frame *root = f->root;
      f->number = ++root->count;
      f->cancel_reason = 0;
      f->cancel_fn = NULL;
      p->stats.attempts++;
      p->ops_out++;
      root->op(f, root->data);
      return;
    }
    pstage *s = &p->st[f->stage];
    switch (s->pol.kind) {
      case KEEL_POLICY_RATELIMIT: {
        uint64_t after = 0;
        int rc = keel__ratelimit_take1(s->pol.u.ratelimit, p->loop, clock_loop(p), &after);
        if (rc != 0) {
          ratelimit_refused(f, rc, after);
          return;
        }
        break;
      }
      case KEEL_POLICY_TIMEOUT:
        f->deadline = uv_now(p->loop) + s->pol.u.timeout_ms;
        list_append(&s->l_head, &s->l_tail, f);
        f->flags |= F_IN_DL;
        if (!s->armed) {
          s->armed = true;
          uv_timer_start(&s->timer, on_deadline, s->pol.u.timeout_ms, 0);
        }
        break;
      case KEEL_POLICY_RETRY:
        f->count = 1;
        f->prev_delay = 0;
        if (s->pol.u.retry.budget != NULL) keel_retry_budget_record_call(s->pol.u.retry.budget);
        f->deadline =
            s->pol.u.retry.deadline_ms != 0 ? uv_now(p->loop) + s->pol.u.retry.deadline_ms : 0;
        break;
      case KEEL_POLICY_BREAKER: {
        int rc = keel_breaker_acquire(s->pol.u.breaker, &f->permit);
        if (rc != 0) {
          breaker_refused(f, rc);
          return;
        }
        f->flags |= F_ACQUIRED;
        f->t0 = clock_now(p);
        break;
      }
      case KEEL_POLICY_FALLBACK:
        break;
      case KEEL_POLICY_HEDGING: {
        uint32_t max = s->pol.u.hedging.max_attempts;
        uint64_t delay = s->pol.u.hedging.delay_ms;
        f->count = 1;
        f->pres.status = 0;
        int rc = spawn(f);
        if (rc != 0) {
          defer_result(f, rc, 0);
          return;
        }
        if (delay == 0) {
          while (f->count < max) hedge_next(f);
        } else if (delay != KEEL_HEDGE_ON_FAILURE && f->count < max) {
          if (timer_arm(f, delay, on_hedge_timer) != 0) f->count = max; /* no more */
        }
        return;
      }
      case KEEL_POLICY_BULKHEAD:
        if (bulkhead_has_room(s)) {
          bulkhead_enter(f);
        } else if (s->queued < s->pol.u.bulkhead.max_queued) {
          s->queued++;
          p->stats.bulkhead_queued++;
          if (s->queued > p->stats.bulkhead_queued_max) p->stats.bulkhead_queued_max = s->queued;
          f->flags |= F_BH_QUEUED;
          list_append(&s->l_head, &s->l_tail, f);
          emit(p, KEEL_EVENT_BULKHEAD_QUEUED, f->stage, f->root, 0, 0, 0);
        } else {
          p->stats.bulkhead_rejected++;
          emit(p, KEEL_EVENT_BULKHEAD_REJECTED, f->stage, f->root, 0, KEEL_EFULL, 0);
          defer_result(f, KEEL_EFULL, 0);
        }
        return;
    }
    /* spawn_or_fail(f): its child starts on the next turn of the loop */
    int rc = 0;
    frame *c = spawn_frame(f, &rc);
    if (c == NULL) {
      release_own(f, rc, false);
      defer_result(f, rc, 0);
      return;
    }
    f = c;
  }
}

/* Lets the next waiting call of bulkhead stage s in, when a slot is free. */
static void bulkhead_admit(keel_pipeline *p, pstage *s) {
  while (!p->closing && s->l_head != NULL && bulkhead_has_room(s)) {
    frame *w = s->l_head;
    list_remove(&s->l_head, &s->l_tail, w);
    w->flags &= ~F_BH_QUEUED;
    s->queued--;
    p->stats.bulkhead_queued--;
    bulkhead_enter(w);
  }
}

static void bulkhead_leave(frame *f, int status, bool cancelled) {
  keel_pipeline *p = f->p;
  pstage *s = &p->st[f->stage];
  f->flags &= ~F_BH_ACTIVE;
  s->active--;
  p->stats.bulkhead_active--;
  if (s->pol.u.bulkhead.adaptive != NULL) {
    keel_adaptive_outcome out = KEEL_ADAPTIVE_SUCCESS;
    if (cancelled) {
      out = KEEL_ADAPTIVE_IGNORE;
    } else if (status == UV_ETIMEDOUT || status == KEEL_EFULL || status == KEEL_ERATELIMIT ||
               status == KEEL_EOPEN) {
      out = KEEL_ADAPTIVE_DROPPED;
    }
    uint64_t us = (uv_hrtime() - f->deadline) / 1000;
    keel_adaptive_release(s->pol.u.bulkhead.adaptive, us, out);
  }
  if (s->pol.u.bulkhead.hook.sample != NULL)
    s->pol.u.bulkhead.hook.sample(s->pol.u.bulkhead.hook.data, clock_now(p) - f->t0, status,
                                  s->active);
}

/* ---- results travelling up ------------------------------------------------ */

static inline void deliver(frame *root, res r) {
  keel_pipeline *p = root->p;
  if (root->flags & F_ROOTED) {
    root->flags &= ~F_ROOTED;
    if (root->l_prev != NULL) {
      root->l_prev->l_next = root->l_next;
    } else {
      p->roots = root->l_next;
    }
    if (root->l_next != NULL) root->l_next->l_prev = root->l_prev;
  }
  keel_pipeline_result out;
  out.status = r.status;
  out.attempts = root->count;
  out.policy = r.origin;
  out.retry_after_ms = r.status == KEEL_ERATELIMIT ? r.retry_after : 0;
  out.duration_ms = clock_now(p) - root->t0;
  p->in_flight--;
  if (r.status >= 0) {
    p->stats.succeeded++;
  } else {
    p->stats.failed++;
  }
  root->done(p, &out, root->data);
  frame_put(root);
}

/* A child of f ended with r (the child is already gone). A policy that
 * passes the result on (finish(f, r)) does so by the next turn of the loop,
 * so the common path runs up a whole call in one frame of C. */
static void child_done(frame *f, res r) {
  keel_pipeline *p = f->p;
  for (;;) {
    if (f->stage < 0) {
      deliver(f, r);
      return;
    }
    pstage *s = &p->st[f->stage];
    switch (s->pol.kind) {
      case KEEL_POLICY_RATELIMIT:
        break;
      case KEEL_POLICY_TIMEOUT:
        list_remove(&s->l_head, &s->l_tail, f);
        f->flags &= ~F_IN_DL;
        if (s->l_head == NULL) deadlines_emptied(p, s);
        break;
      case KEEL_POLICY_RETRY: {
        const keel_retry_opts *o = &s->pol.u.retry;
        if (p->closing || f->count >= o->max_attempts) break;
        if (r.status >= 0) {
          if (o->retry_result == NULL || !o->retry_result(r.status, NULL, o->classify_data)) break;
        } else {
          keel_retry_classify_fn classify =
              o->classify != NULL ? o->classify : keel_retry_default_classify;
          if (!classify(r.status, o->classify_data)) break;
        }
        if (p->closing) break;
        uint64_t delay = keel_backoff_delay(&o->backoff, f->count, f->prev_delay, &s->rng);
        if (o->jitter > 0 && o->jitter <= 1 && delay > 0) {
          uint64_t lo = (uint64_t)((double)delay * (1 - o->jitter));
          uint64_t hi = (uint64_t)((double)delay * (1 + o->jitter));
          delay = keel_rng_between(&s->rng, lo, hi);
        }
        if (r.retry_after > delay) delay = r.retry_after;
        if (o->budget != NULL && !keel_retry_budget_try_retry(o->budget)) break;
        if (f->deadline != 0 && uv_now(p->loop) + delay > f->deadline) break;
        f->prev_delay = delay;
        f->count++;
        p->stats.retries++;
        emit(p, KEEL_EVENT_RETRY, f->stage, f->root, f->count, r.status, delay);
        if (p->closing) break;
        if (delay == 0) {
          if (spawn(f) != 0) break; /* report the last failure */
        } else {
          f->pres = r;
          if (timer_arm(f, delay, on_retry_timer) != 0) break; /* report the failure */
        }
        return;
      }
      case KEEL_POLICY_BREAKER:
        f->flags &= ~F_ACQUIRED;
        keel_breaker_release(&f->permit, r.status, clock_now(p) - f->t0);
        break;
      case KEEL_POLICY_FALLBACK:
        if (r.status < 0) {
          p->stats.fallbacks++;
          emit(p, KEEL_EVENT_FALLBACK, f->stage, f->root, 0, r.status, 0);
          int st = s->pol.u.fallback.fn(p, r.status, f->root->data, s->pol.u.fallback.data);
          if (st != r.status) {
            r.status = st;
            r.origin = f->stage;
            r.retry_after = 0;
          }
        }
        break;
      case KEEL_POLICY_HEDGING:
        if (r.status >= 0) {
          while (f->kids != NULL) cancel_subtree(f->kids, UV_ECANCELED);
          break;
        }
        f->pres = r;
        if (f->count < s->pol.u.hedging.max_attempts && !p->closing) hedge_next(f);
        if (f->kids != NULL || (f->flags & F_PENDING)) return;
        r = f->pres;
        break;
      case KEEL_POLICY_BULKHEAD:
        bulkhead_leave(f, r.status, false);
        finish(f, r);
        bulkhead_admit(p, s);
        return;
    }
    /* finish(f, r) */
    frame *parent = f->parent;
    kid_unlink(f);
    frame_put(f);
    f = parent;
  }
}

/* f ended with r: detach it from its parent, recycle it, tell the parent. */
static void finish(frame *f, res r) {
  frame *parent = f->parent;
  kid_unlink(f);
  frame_put(f);
  child_done(parent, r);
}

/* Gives back what policy frame f holds (deadline entry, breaker permit,
 * bulkhead slot or place in its queue). admit: let the next waiting call
 * into a freed bulkhead slot. */
static void release_own(frame *f, int reason, bool admit) {
  keel_pipeline *p = f->p;
  pstage *s = &p->st[f->stage];
  switch (s->pol.kind) {
    case KEEL_POLICY_TIMEOUT:
      if (f->flags & F_IN_DL) {
        list_remove(&s->l_head, &s->l_tail, f);
        f->flags &= ~F_IN_DL;
        if (s->l_head == NULL) deadlines_emptied(p, s);
      }
      break;
    case KEEL_POLICY_BREAKER:
      if (f->flags & F_ACQUIRED) {
        f->flags &= ~F_ACQUIRED;
        keel_breaker_release(&f->permit, UV_ECANCELED, clock_now(p) - f->t0);
      }
      break;
    case KEEL_POLICY_BULKHEAD:
      if (f->flags & F_BH_QUEUED) {
        list_remove(&s->l_head, &s->l_tail, f);
        f->flags &= ~F_BH_QUEUED;
        s->queued--;
        p->stats.bulkhead_queued--;
      } else if (f->flags & F_BH_ACTIVE) {
        bulkhead_leave(f, reason, true);
        if (admit) bulkhead_admit(p, s);
      }
      break;
    default:
      break;
  }
}

/* The parent gave up on f (timeout, a hedged sibling won, close). */
static void cancel_subtree(frame *f, int reason) {
  keel_pipeline *p = f->p;
  kid_unlink(f);
  while (f->kids != NULL) cancel_subtree(f->kids, reason);
  if ((size_t)f->stage == p->n) { /* a leaf */
    if (!(f->flags & F_REPORTED)) {
      keel_attempt_cancel_fn fn = f->cancel_fn;
      f->flags |= F_CANCELLED;
      f->cancel_reason = reason;
      f->cancel_fn = NULL;
      p->stats.cancels++;
      emit(p, KEEL_EVENT_CANCEL, f->stage, f->root, f->number, reason, 0);
      /* From here the leaf belongs to the operation until it reports; the
       * report parks it on the ready list, where it is freed. */
      if (fn != NULL) fn(f, reason, f->cancel_data);
    } else {
      f->flags |= F_DETACHED; /* reported: on the ready list, freed there */
    }
    return;
  }
  release_own(f, reason, true);
  if (f->flags & F_READY) {
    f->flags |= F_DETACHED;
  } else {
    frame_put(f);
  }
}

/* ---- timers ----------------------------------------------------------------- */

static void on_deadline(uv_timer_t *t) {
  pstage *s = KEEL__CONTAINER_OF(t, pstage, timer);
  keel_pipeline *p = t->data;
  uint64_t now = uv_now(p->loop);
  s->armed = false;
  while (!p->closing && s->l_head != NULL && s->l_head->deadline <= now) {
    frame *f = s->l_head;
    list_remove(&s->l_head, &s->l_tail, f);
    f->flags &= ~F_IN_DL;
    p->stats.timeouts++;
    emit(p, KEEL_EVENT_TIMEOUT, f->stage, f->root, 0, UV_ETIMEDOUT, s->pol.u.timeout_ms);
    while (f->kids != NULL) cancel_subtree(f->kids, UV_ETIMEDOUT);
    if (f->flags & F_PENDING) continue; /* its own result is on its way */
    res r = {UV_ETIMEDOUT, f->stage, 0};
    finish(f, r);
  }
  if (!p->closing && s->l_head != NULL) {
    uint64_t d = s->l_head->deadline;
    s->armed = true;
    uv_timer_start(&s->timer, on_deadline, d > now ? d - now : 0, 0);
  }
  after_callbacks(p);
}

static void on_retry_timer(uv_timer_t *t) {
  frame *f = t->data;
  keel_pipeline *p = f->p;
  if (!p->closing && spawn(f) != 0) finish(f, f->pres);
  after_callbacks(p);
}

static void on_hedge_timer(uv_timer_t *t) {
  frame *f = t->data;
  keel_pipeline *p = f->p;
  uint32_t max = p->st[f->stage].pol.u.hedging.max_attempts;
  if (!p->closing && f->count < max) {
    hedge_next(f);
    if (f->count < max && timer_arm(f, p->st[f->stage].pol.u.hedging.delay_ms, on_hedge_timer) != 0)
      f->count = max;
  }
  after_callbacks(p);
}

/* Puts root on the list of active roots (the close sweep answers those). */
static void roots_add(keel_pipeline *p, frame *root) {
  root->flags |= F_ROOTED;
  root->l_prev = NULL;
  root->l_next = p->roots;
  if (p->roots != NULL) p->roots->l_prev = root;
  p->roots = root;
}

/* ---- the flat path ------------------------------------------------------------
 *
 * A pipeline whose policies all go on to their one child at once when they
 * let a call through (rate limit, timeout, retry, breaker, fallback: p->flat)
 * starts a call here instead of through start(). Nothing walks the tree of
 * a call while its own pass runs it (timers fire between passes, the close
 * sweep runs between two ready frames, cancellation comes from those), so
 * the walk down takes each policy's decision and leaves the tree links and
 * the timeouts' deadline entries out. When the operation reported at once
 * (the common synchronous case: its report is the only one waiting, and no
 * close began), the walk back up runs right away, in the order finish()
 * would; otherwise flat_link() builds exactly the tree start() would have
 * built, and the ordinary machinery takes over from there.
 */

/*
 * Makes the call root of the flat path what start() would have made of it:
 * root on the list of active roots, the frames of stages 0..upto (upto ==
 * p->n: the leaf too) in use and linked below it, their timeouts on their
 * deadline lists (timer armed), their breakers' permits marked as held
 * (the one of stage upto only when last_holds: it was refused).
 */
static void flat_link(keel_pipeline *p, frame *root, size_t upto, bool last_holds) {
  frame *parent = root;
  if (!(root->flags & F_ROOTED)) roots_add(p, root);
  for (size_t j = 0; j <= upto; j++) {
    frame *f = root + j + 1;
    if (j < p->n) {
      f->flags = (f->flags & F_TIMER) | F_BLOCK | F_INUSE;
    } else {
      f->flags |= F_INUSE; /* the leaf: its flags are its own already */
    }
    f->kids = NULL;
    root->refs++;
    kid_link(parent, f);
    if (j < p->n) {
      pstage *s = &p->st[j];
      if (s->pol.kind == KEEL_POLICY_BREAKER && (j < upto || last_holds)) f->flags |= F_ACQUIRED;
      if (s->pol.kind == KEEL_POLICY_TIMEOUT) {
        list_append(&s->l_head, &s->l_tail, f);
        f->flags |= F_IN_DL;
        if (!s->armed) {
          uint64_t now = uv_now(p->loop);
          s->armed = true;
          uv_timer_start(&s->timer, on_deadline, f->deadline > now ? f->deadline - now : 0, 0);
        }
      }
    }
    parent = f;
  }
}

/*
 * Starts the new call root of a flat pipeline (what roots_add() and
 * spawn(root) do). The frames of the policies stay as they are (not marked
 * in use, not linked) unless flat_link() makes them so; the leaf gets its
 * flags before the operation sees it.
 */
static void flat_run(keel_pipeline *p, frame *root) {
  size_t n = p->n;
  pstage *st = p->st;
  for (size_t i = 0; i < n; i++) {
    frame *f = root + i + 1;
    pstage *s = &st[i];
    if (i > 0 && p->closing) { /* spawn_or_fail() of the stage above */
      frame *up = f - 1;
      flat_link(p, root, i - 1, true);
      release_own(up, KEEL_ECLOSING, false);
      defer_result(up, KEEL_ECLOSING, 0);
      return;
    }
    switch (s->pol.kind) {
      case KEEL_POLICY_RATELIMIT: {
        uint64_t after = 0;
        int rc = keel__ratelimit_take1(s->pol.u.ratelimit, p->loop, clock_loop(p), &after);
        if (rc != 0) {
          flat_link(p, root, i, false);
          ratelimit_refused(f, rc, after);
          return;
        }
        break;
      }
      case KEEL_POLICY_TIMEOUT: /* its deadline entry: flat_link() */
        f->deadline = uv_now(p->loop) + s->pol.u.timeout_ms;
        break;
      case KEEL_POLICY_RETRY:
        f->count = 1;
        f->prev_delay = 0;
        if (s->pol.u.retry.budget != NULL) keel_retry_budget_record_call(s->pol.u.retry.budget);
        f->deadline =
            s->pol.u.retry.deadline_ms != 0 ? uv_now(p->loop) + s->pol.u.retry.deadline_ms : 0;
        break;
      case KEEL_POLICY_BREAKER: {
        int rc = keel_breaker_acquire(s->pol.u.breaker, &f->permit);
        if (rc != 0) {
          flat_link(p, root, i, false);
          breaker_refused(f, rc);
          return;
        }
        f->t0 = clock_now(p);
        break;
      }
      default: /* FALLBACK */
        break;
    }
  }
  frame *leaf = root + n + 1;
  if (n > 0 && p->closing) {
    frame *up = leaf - 1;
    flat_link(p, root, n - 1, true);
    release_own(up, KEEL_ECLOSING, false);
    defer_result(up, KEEL_ECLOSING, 0);
    return;
  }
  leaf->flags = (leaf->flags & F_TIMER) | F_BLOCK;
  leaf->number = ++root->count;
  leaf->cancel_reason = 0;
  leaf->cancel_fn = NULL;
  p->stats.attempts++;
  p->ops_out++;
  root->op(leaf, root->data);
  if (p->now_head != leaf || p->now_tail != leaf || p->closing) {
    flat_link(p, root, n, true); /* reported later (or after others), or closing */
    return;
  }
  /* on_idle's next step: process(leaf), i.e. finish(leaf) up to the root */
  p->now_head = p->now_tail = NULL;
  res r = {leaf->status, -1, 0};
  for (size_t k = p->nup; k-- > 0;) { /* the stages with work on the way up */
    size_t i = p->up[k];
    frame *f = root + i + 1;
    pstage *s = &st[i];
    switch (s->pol.kind) {
      case KEEL_POLICY_RETRY: {
        const keel_retry_opts *o = &s->pol.u.retry;
        if (!p->closing && f->count < o->max_attempts &&
            (r.status < 0 || o->retry_result != NULL)) {
          flat_link(p, root, i, true); /* a retry may follow: the ordinary way */
          child_done(f, r);
          return;
        }
        if (f->flags & F_TIMER) uv_timer_stop(f->timer); /* frame_put() */
        break;
      }
      case KEEL_POLICY_BREAKER:
        keel_breaker_release(&f->permit, r.status, clock_now(p) - f->t0);
        break;
      case KEEL_POLICY_FALLBACK:
        if (r.status < 0) {
          flat_link(p, root, i, true);
          child_done(f, r);
          return;
        }
        break;
      default:
        break;
    }
  }
  deliver(root, r); /* (rate limit, timeout: nothing to do on the way up) */
}

/* Whether every policy of p takes the flat path (see flat_run()); fills
 * p->up with the stages that have work when a result passes up. */
static bool flat_plan(keel_pipeline *p) {
  p->nup = 0;
  for (size_t i = 0; i < p->n; i++) {
    switch (p->st[i].pol.kind) {
      case KEEL_POLICY_RATELIMIT:
      case KEEL_POLICY_TIMEOUT:
        break;
      case KEEL_POLICY_RETRY:
      case KEEL_POLICY_BREAKER:
      case KEEL_POLICY_FALLBACK:
        p->up[p->nup++] = (uint8_t)i;
        break;
      default:
        return false;
    }
  }
  return true;
}

/* ---- the ready list ----------------------------------------------------------- */

static void process(frame *f) {
  keel_pipeline *p = f->p;
  if (f->flags & F_DETACHED) {
    frame_put(f);
    return;
  }
  if (f->stage < 0 && !(f->flags & F_STARTED)) { /* a new call */
    f->flags |= F_STARTED;
    if (p->flat && !p->closing) {
      flat_run(p, f); /* puts f on the roots list when the call outlives it */
      return;
    }
    roots_add(p, f);
    if (p->closing) {
      res r = {UV_ECANCELED, -1, 0};
      deliver(f, r);
    } else if (spawn(f) != 0) {
      res r = {UV_ENOMEM, -1, 0};
      deliver(f, r);
    }
    return;
  }
  if (f->flags & F_PENDING) {
    f->flags &= ~F_PENDING;
    int st = f->stage;
    finish(f, f->pres);
    /* a bulkhead slot given back on a failed spawn: admit the next one */
    if (st >= 0 && p->st[st].pol.kind == KEEL_POLICY_BULKHEAD) bulkhead_admit(p, &p->st[st]);
    return;
  }
  /* a leaf that reported */
  res r = {f->status, -1, 0};
  finish(f, r);
}

static void ts_take(keel_pipeline *p);
static void close_handles(keel_pipeline *p);

static void sweep(keel_pipeline *p) {
  p->swept = true;
  ts_take(p);
  while (p->roots != NULL) {
    frame *root = p->roots;
    while (root->kids != NULL) cancel_subtree(root->kids, UV_ECANCELED);
    res r = {UV_ECANCELED, -1, 0};
    deliver(root, r);
  }
}

static void after_callbacks(keel_pipeline *p) {
  if (!p->closing) return;
  if (!p->swept) sweep(p);
  if (!p->handles_closing && p->ready_head == NULL && p->ops_out == 0 && p->roots == NULL &&
      p->in_flight == 0)
    close_handles(p);
}

/* One pass: the calls and reports queued before it, and (trampolined, in
 * the same pass) the reports their operations made synchronously. New calls
 * made from inside wait for the next pass. */
static void on_idle(uv_idle_t *h) {
  keel_pipeline *p = h->data;
  frame *f = p->ready_head;
  p->ready_head = p->ready_tail = NULL;
  p->in_drain = true;
  p->now = uv_now(p->loop);
  while (f != NULL) {
    frame *next = f->next;
    f->flags &= ~F_READY;
    process(f);
    if (p->closing && !p->swept) sweep(p);
    while (p->now_head != NULL) {
      frame *g = p->now_head;
      p->now_head = g->next;
      if (p->now_head == NULL) p->now_tail = NULL;
      g->flags &= ~F_READY;
      process(g);
      if (p->closing && !p->swept) sweep(p);
    }
    f = next;
  }
  p->in_drain = false;
  if (p->dl_dirty) {
    p->dl_dirty = false;
    for (size_t i = 0; i < p->n; i++) {
      pstage *s = &p->st[i];
      if (s->pol.kind == KEEL_POLICY_TIMEOUT && s->l_head == NULL) deadlines_emptied(p, s);
    }
  }
  if (p->ready_head == NULL) uv_idle_stop(&p->idle);
  after_callbacks(p);
}

/* ---- execute -------------------------------------------------------------------- */

int keel_pipeline_execute(keel_pipeline *p, keel_pipeline_op_fn op, keel_pipeline_done_cb done,
                          void *data) {
  if (p == NULL || op == NULL || done == NULL) return UV_EINVAL;
  if (p->closing) return KEEL_ECLOSING;
  if (p->in_flight >= p->max_calls) return KEEL_EFULL;
  frame *f = block_get(p);
  if (f == NULL) return UV_ENOMEM;
  f->parent = NULL;
  f->op = op;
  f->done = done;
  f->data = data;
  f->t0 = clock_now(p);
  p->in_flight++;
  p->stats.calls++;
  ready_push(p, f);
  return 0;
}

int keel_attempt_done(keel_attempt *a, int status) {
  if (a == NULL || (a->flags & F_REPORTED)) return UV_EINVAL;
  keel_pipeline *p = a->p;
  a->flags |= F_REPORTED;
  a->status = status;
  p->ops_out--;
  int rc = 0;
  if (a->flags & F_CANCELLED) {
    a->flags |= F_DETACHED; /* freed on the ready list (and the close sees it) */
    rc = KEEL_ESTALE;
  }
  if (p->in_drain) { /* reported from inside a pass: finish it in this pass */
    a->flags |= F_READY;
    a->next = NULL;
    if (p->now_tail != NULL) {
      p->now_tail->next = a;
    } else {
      p->now_head = a;
    }
    p->now_tail = a;
  } else {
    ready_push(p, a);
  }
  return rc;
}

void keel_attempt_on_cancel(keel_attempt *a, keel_attempt_cancel_fn fn, void *data) {
  if (a == NULL || (a->flags & (F_CANCELLED | F_REPORTED))) return;
  a->cancel_fn = fn;
  a->cancel_data = data;
}

int keel_attempt_cancelled(const keel_attempt *a) {
  if (a == NULL) return UV_EINVAL;
  return (a->flags & F_CANCELLED) ? a->cancel_reason : 0;
}

unsigned keel_attempt_number(const keel_attempt *a) {
  return a == NULL ? 0 : a->number;
}

keel_pipeline *keel_attempt_pipeline(const keel_attempt *a) {
  return a == NULL ? NULL : a->p;
}

/* ---- thread-safe execute ------------------------------------------------------------ */

int keel_pipeline_execute_threadsafe(keel_pipeline *p, keel_pipeline_op_fn op,
                                     keel_pipeline_done_cb done, void *data) {
  if (p == NULL || op == NULL || done == NULL) return UV_EINVAL;
  ts_node *n = keel__malloc(sizeof *n);
  if (n == NULL) return UV_ENOMEM;
  n->next = NULL;
  n->op = op;
  n->done = done;
  n->data = data;
  int rc = 0;
  uv_mutex_lock(&p->mu);
  if (p->ts_closed) {
    rc = KEEL_ECLOSING;
  } else if (p->ts_count >= p->max_calls) {
    rc = KEEL_EFULL;
  } else {
    if (p->ts_tail != NULL) {
      p->ts_tail->next = n;
    } else {
      p->ts_head = n;
    }
    p->ts_tail = n;
    if (p->ts_count++ == 0) uv_async_send(&p->async);
  }
  uv_mutex_unlock(&p->mu);
  if (rc != 0) keel__free(n);
  return rc;
}

static void ts_fail(keel_pipeline *p, ts_node *n, int status) {
  keel_pipeline_result r;
  memset(&r, 0, sizeof r);
  r.status = status;
  r.policy = -1;
  p->stats.failed++;
  n->done(p, &r, n->data);
}

/* Takes every waiting thread-safe push; the loop accepts each (or answers
 * it at once: closing, full, no memory). */
static void ts_take(keel_pipeline *p) {
  uv_mutex_lock(&p->mu);
  ts_node *n = p->ts_head;
  p->ts_head = p->ts_tail = NULL;
  p->ts_count = 0;
  if (p->closing) p->ts_closed = true;
  uv_mutex_unlock(&p->mu);
  while (n != NULL) {
    ts_node *next = n->next;
    int rc = p->closing ? UV_ECANCELED : keel_pipeline_execute(p, n->op, n->done, n->data);
    if (rc != 0) ts_fail(p, n, rc == KEEL_ECLOSING ? UV_ECANCELED : rc);
    keel__free(n);
    n = next;
  }
}

static void on_async(uv_async_t *h) {
  keel_pipeline *p = h->data;
  ts_take(p);
  after_callbacks(p);
}

/* ---- new / stats / close ---------------------------------------------------------------- */

int keel_pipeline_new(uv_loop_t *loop, const keel_pipeline_opts *opts, keel_pipeline **out) {
  if (loop == NULL || out == NULL || keel_pipeline_validate_opts(opts, NULL) != 0) return UV_EINVAL;
  keel_pipeline *p = keel__calloc(1, sizeof *p);
  if (p == NULL) return UV_ENOMEM;
  if (opts->npolicies > 0) {
    p->st = keel__calloc(opts->npolicies, sizeof *p->st);
    if (p->st == NULL) {
      keel__free(p);
      return UV_ENOMEM;
    }
  }
  int rc = uv_mutex_init(&p->mu);
  if (rc != 0) {
    keel__free(p->st);
    keel__free(p);
    return rc;
  }
  rc = uv_async_init(loop, &p->async, on_async);
  if (rc != 0) {
    uv_mutex_destroy(&p->mu);
    keel__free(p->st);
    keel__free(p);
    return rc;
  }
  p->loop = loop;
  p->n = opts->npolicies;
  p->clock = opts->clock;
  p->on_event = opts->on_event;
  p->data = opts->data;
  p->max_calls = opts->max_calls;
  p->async.data = p;
  uv_unref((uv_handle_t *)&p->async);
  uv_idle_init(loop, &p->idle);
  p->idle.data = p;
  p->handles_open = 2;
  for (size_t i = 0; i < p->n; i++) {
    pstage *s = &p->st[i];
    s->pol = opts->policies[i];
    if (s->pol.kind == KEEL_POLICY_TIMEOUT) {
      uv_timer_init(loop, &s->timer);
      s->timer.data = p;
      p->handles_open++;
    } else if (s->pol.kind == KEEL_POLICY_RETRY) {
      keel_rng_seed(&s->rng, s->pol.u.retry.seed != 0 ? s->pol.u.retry.seed
                                                      : uv_hrtime() ^ (uint64_t)(uintptr_t)p);
    }
  }
  p->flat = flat_plan(p);
  *out = p;
  return 0;
}

void keel_pipeline_get_stats(keel_pipeline *p, keel_pipeline_stats *out) {
  if (p == NULL || out == NULL) return;
  *out = p->stats;
  out->in_flight = p->in_flight;
  memset(out->reserved_, 0, sizeof out->reserved_);
}

static void free_all(keel_pipeline *p) {
  keel_close_cb cb = p->close_cb;
  void *data = p->close_data;
  while (p->free_list != NULL) {
    frame *f = p->free_list;
    p->free_list = f->next;
    keel__free(f);
  }
  while (p->free_blocks != NULL) {
    frame *b = p->free_blocks;
    p->free_blocks = b->next;
    keel__free(b);
  }
  uv_mutex_destroy(&p->mu);
  keel__free(p->st);
  keel__free(p);
  if (cb != NULL) cb(p, data);
}

static void on_handle_closed(uv_handle_t *h) {
  keel_pipeline *p = h->data;
  if (--p->handles_open == 0) free_all(p);
}

static void on_frame_timer_closed(uv_handle_t *h) {
  keel_pipeline *p = h->data;
  keel__free(h);
  if (--p->handles_open == 0) free_all(p);
}

static void close_frame_timer(keel_pipeline *p, frame *f) {
  if (f->flags & F_TIMER) {
    p->handles_open++;
    f->flags &= ~F_TIMER;
    f->timer->data = p;
    uv_close((uv_handle_t *)f->timer, on_frame_timer_closed);
  }
}

static void close_handles(keel_pipeline *p) {
  p->handles_closing = true;
  uv_idle_stop(&p->idle);
  for (frame *f = p->free_list; f != NULL; f = f->next) close_frame_timer(p, f);
  for (frame *b = p->free_blocks; b != NULL; b = b->next)
    for (size_t i = 0; i < p->n + 2; i++) close_frame_timer(p, &b[i]);
  for (size_t i = 0; i < p->n; i++) {
    if (p->st[i].pol.kind == KEEL_POLICY_TIMEOUT)
      uv_close((uv_handle_t *)&p->st[i].timer, on_handle_closed);
  }
  uv_close((uv_handle_t *)&p->idle, on_handle_closed);
  uv_close((uv_handle_t *)&p->async, on_handle_closed);
}

void keel_pipeline_close(keel_pipeline *p, keel_close_cb cb, void *data) {
  if (p == NULL || p->closing) return;
  p->closing = true;
  keel__stats_hooks_detach(&p->stats_hooks); /* drops serve registrations */
  p->close_cb = cb;
  p->close_data = data;
  uv_mutex_lock(&p->mu);
  p->ts_closed = true;
  uv_mutex_unlock(&p->mu);
  uv_idle_start(&p->idle, on_idle); /* the sweep runs on the next iteration */
}

keel__stats_hooks *keel__pipeline_stats_hooks(keel_pipeline *x) {
  return x->closing ? NULL : &x->stats_hooks; /* no registration once closing */
}
