/*
 * Distributed locks with fencing tokens, a watchdog, and Redlock over N
 * servers. One code path serves both: a single-server lock is a Redlock
 * with n = 1, quorum 1 and no clock drift.
 *
 * Each attempt ("round") draws a fresh 128-bit token from the OS and sends
 * the acquire script to every server; a server's grant that arrives after
 * its round was decided (or for a lock that ended) is released at once in
 * the background, so a late grant never leaves a key behind. Every command
 * of a lock is an `op` holding the lock: the lock's memory lives until its
 * last op is answered, its timer is closed and its user was told.
 */
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "keel/redis.h"
#include "redis/redis_internal.h"

#define MAX_SERVERS 16u
#define MAX_NAME 1024u

/* KEYS[1] lock, KEYS[2] fence counter; ARGV[1] token, ARGV[2] ttl ms.
 * {1, fence} when taken, {0, pttl} when held by someone else. */
static const char ACQUIRE_SRC[] =
    "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then\n"
    "  return {1, redis.call('INCR', KEYS[2])}\n"
    "end\n"
    "return {0, redis.call('PTTL', KEYS[1])}\n";
/* KEYS[1] lock; ARGV[1] token. 1 deleted, 0 gone (expired), -1 another
 * token holds it. */
static const char RELEASE_SRC[] =
    "local v = redis.call('GET', KEYS[1])\n"
    "if v == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end\n"
    "if v == false then return 0 end\n"
    "return -1\n";
/* KEYS[1] lock; ARGV[1] token, ARGV[2] ttl ms. 1 extended, 0 gone, -1
 * another token holds it. */
static const char EXTEND_SRC[] =
    "local v = redis.call('GET', KEYS[1])\n"
    "if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end\n"
    "if v == false then return 0 end\n"
    "return -1\n";

const char *keel__redis_lock_script(int which) {
  return which == 0 ? ACQUIRE_SRC : which == 1 ? RELEASE_SRC : EXTEND_SRC;
}

static keel_redis_script acquire_script, release_script, extend_script;
static uv_once_t scripts_once = UV_ONCE_INIT;

static void init_scripts(void) {
  keel_redis_script_init(&acquire_script, ACQUIRE_SRC);
  keel_redis_script_init(&release_script, RELEASE_SRC);
  keel_redis_script_init(&extend_script, EXTEND_SRC);
}

enum phase {
  PH_ACQUIRING = 0, /* a round in flight */
  PH_RETRY_WAIT,    /* between rounds (timer) */
  PH_HELD,          /* granted */
  PH_RELEASING,     /* release sent */
  PH_ENDED          /* user told the final outcome */
};

/* T_EXPIRY: a watchdog renewal is in flight; fires at the validity end. */
enum timer_use { T_NONE = 0, T_RETRY, T_DECIDE, T_WATCHDOG, T_CANCEL, T_EXPIRY };

enum op_kind { OP_ACQUIRE = 0, OP_RELEASE, OP_EXTEND, OP_BG_RELEASE };

/* A group of parallel ops (one per server) whose answers are counted. */
typedef struct tally {
  unsigned answered, ok, busy;
  int first_err;
  uint64_t fence_max;
  unsigned gone, taken; /* release / extend: 0 and -1 answers */
  uint64_t started;     /* loop ms when sent */
  bool decided;
} tally;

struct keel_redis_lock {
  keel__rlink link; /* first: the home client's list of locks */
  keel_redis *home; /* servers[0]; NULL once its close completed */
  uv_loop_t *loop;
  unsigned n;
  keel_redis *servers[MAX_SERVERS];
  bool redlock;
  keel_redis_lock_opts opts;
  char *key; /* <prefix>{<name>} */
  size_t keylen;
  char *fkey; /* <prefix>{<name>}:fence */
  size_t fkeylen;
  char token[33];
  uint64_t fence;
  uint64_t valid_until;
  uint64_t renewals;
  uint64_t acquire_started;
  uint64_t prev_delay;
  unsigned tries;
  keel_rng rng;
  enum phase phase;
  unsigned round;
  unsigned won_round; /* the round that was granted (0: none) */
  tally acq;
  tally rel;
  tally ext;
  unsigned ext_seq; /* extend generation */
  bool ext_busy;
  bool ext_is_watchdog;
  uint64_t ext_ttl;
  uv_timer_t timer; /* initialised when first needed */
  enum timer_use timer_use;
  bool timer_open;    /* initialised and not closing */
  bool timer_closed;  /* no timer open: never initialised, or closed */
  bool timer_closing; /* no timer may be started any more */
  bool lost_reported;
  bool cancelled;
  bool taken_by_other;
  bool orphan;        /* home closed: free at the last op */
  bool in_op;         /* inside on_op_reply: freed (if due) when it returns */
  int pending_status; /* for T_DECIDE / T_CANCEL deliveries */
  unsigned outstanding;
  keel_redis_lock_cb acq_cb;
  void *acq_data;
  keel_redis_lock_done_cb rel_cb;
  void *rel_data;
  keel_redis_lock_done_cb ext_cb;
  void *ext_data;
};

typedef struct op {
  keel_redis_lock *lock;
  unsigned idx;
  unsigned round; /* acquire: the round; extend: ext_seq */
  enum op_kind kind;
  char token[33]; /* acquire: the round's token (for a late grant) */
} op;

static void lock_timer_cb(uv_timer_t *t);
static void decide_acquire(keel_redis_lock *l);

/* ---- life cycle ------------------------------------------------------------- */

static void lock_free(keel_redis_lock *l) {
  keel__rlist_remove(&l->link);
  keel__free(l); /* key and fkey live in the same block */
}

static void maybe_free(keel_redis_lock *l) {
  if (!l->in_op && l->phase == PH_ENDED && l->outstanding == 0 && l->timer_closed) lock_free(l);
}

static void timer_closed_cb(uv_handle_t *h) {
  keel_redis_lock *l = h->data;
  keel_redis *home = l->home;
  l->timer_closed = true;
  maybe_free(l);
  if (home != NULL) keel__redis_handle_closed(home); /* last: may free home */
}

static void close_timer(keel_redis_lock *l) {
  if (l->timer_closing) return;
  l->timer_closing = true;
  l->timer_use = T_NONE;
  if (!l->timer_open) return; /* never initialised: timer_closed already */
  l->timer_open = false;
  l->timer_closed = false;
  uv_close((uv_handle_t *)&l->timer, timer_closed_cb);
}

/* The user has been told the final outcome (or the lock is dropped). */
static void end_lock(keel_redis_lock *l) {
  l->phase = PH_ENDED;
  if (!l->timer_closing) close_timer(l);
  maybe_free(l);
}

void keel__redis_lock_client_closing(struct keel_redis_lock *l) {
  close_timer(l);
}

void keel__redis_lock_client_closed(struct keel_redis_lock *l) {
  /* Commands of the home client were answered (UV_ECANCELED) before. */
  l->home = NULL;
  if (l->phase == PH_RETRY_WAIT || (l->phase == PH_ACQUIRING && !l->acq.decided)) {
    l->phase = PH_ENDED;
    if (l->acq_cb != NULL) l->acq_cb(l, UV_ECANCELED, l->acq_data);
  } else if (l->phase == PH_RELEASING) {
    l->phase = PH_ENDED;
    if (l->rel_cb != NULL) l->rel_cb(l, UV_ECANCELED, l->rel_data);
  }
  l->phase = PH_ENDED;
  l->orphan = true;
  maybe_free(l);
}

/* ---- sending ---------------------------------------------------------------- */

static void on_op_reply(keel_redis *r, int status, const struct redisReply *rep, void *data);

static uint64_t server_timeout(const keel_redis_lock *l, unsigned i) {
  if (l->opts.server_timeout_ms != 0) return l->opts.server_timeout_ms;
  uint64_t t = keel__redis_command_timeout(l->servers[i]);
  if (l->redlock) {
    uint64_t cap = l->opts.ttl_ms / 10;
    if (cap < 5) cap = 5;
    if (t > cap) t = cap;
  }
  return t;
}

/* Sends script s to server i for op kind; returns 0 or the send error. */
static int send_op(keel_redis_lock *l, unsigned i, enum op_kind kind, unsigned round,
                   const char *token, uint64_t ttl) {
  const keel_redis_script *s = kind == OP_ACQUIRE  ? &acquire_script
                               : kind == OP_EXTEND ? &extend_script
                                                   : &release_script;
  op *o = keel__malloc(sizeof *o);
  if (o == NULL) return UV_ENOMEM;
  o->lock = l;
  o->idx = i;
  o->round = round;
  o->kind = kind;
  memcpy(o->token, token, 33);
  char ttlbuf[24];
  int tl = snprintf(ttlbuf, sizeof ttlbuf, "%llu", (unsigned long long)ttl);
  const char *argv[4];
  size_t lens[4];
  int argc, nkeys;
  if (kind == OP_ACQUIRE) {
    argv[0] = l->key;
    lens[0] = l->keylen;
    argv[1] = l->fkey;
    lens[1] = l->fkeylen;
    argv[2] = token;
    lens[2] = 32;
    argv[3] = ttlbuf;
    lens[3] = (size_t)tl;
    argc = 4;
    nkeys = 2;
  } else {
    argv[0] = l->key;
    lens[0] = l->keylen;
    argv[1] = token;
    lens[1] = 32;
    argv[2] = ttlbuf;
    lens[2] = (size_t)tl;
    argc = kind == OP_EXTEND ? 3 : 2;
    nkeys = 1;
  }
  int rc = keel_redis_eval_timeout(l->servers[i], server_timeout(l, i), s, nkeys, argc, argv, lens,
                                   on_op_reply, o);
  if (rc != 0) {
    keel__free(o);
    return rc;
  }
  l->outstanding++;
  return 0;
}

/* Best effort: deletes our key on server i if it still holds token. */
static void bg_release(keel_redis_lock *l, unsigned i, const char *token) {
  if (keel__redis_closing(l->servers[i])) return;
  (void)send_op(l, i, OP_BG_RELEASE, 0, token, 0);
}

/* Tokens come from the OS's random source, read 4 KB at a time (one
 * getrandom per 256 tokens); per thread, as loops may run in several. */
static _Thread_local unsigned char rand_buf[4096];
static _Thread_local size_t rand_pos = sizeof rand_buf;

static int os_random16(unsigned char out[16]) {
  if (rand_pos + 16 > sizeof rand_buf) {
    if (uv_random(NULL, NULL, rand_buf, sizeof rand_buf, 0, NULL) != 0) return -1;
    rand_pos = 0;
  }
  memcpy(out, rand_buf + rand_pos, 16);
  memset(rand_buf + rand_pos, 0, 16); /* a token is never handed out twice */
  rand_pos += 16;
  return 0;
}

static void new_token(keel_redis_lock *l) {
  unsigned char raw[16];
  if (os_random16(raw) != 0) {
    /* the OS source failed (never seen on Linux): keel's generator */
    uint64_t a = keel_rng_next(&l->rng), b = keel_rng_next(&l->rng);
    memcpy(raw, &a, 8);
    memcpy(raw + 8, &b, 8);
  }
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < 16; i++) {
    l->token[2 * i] = hex[raw[i] >> 4];
    l->token[2 * i + 1] = hex[raw[i] & 15];
  }
  l->token[32] = '\0';
}

static void start_timer(keel_redis_lock *l, enum timer_use use, uint64_t ms) {
  if (l->timer_closing || l->home == NULL) return;
  if (!l->timer_open) {
    uv_timer_init(l->loop, &l->timer);
    l->timer.data = l;
    l->timer_open = true;
    l->timer_closed = false;
    keel__redis_handle_opened(l->home); /* the home's close waits for it */
  }
  l->timer_use = use;
  uv_timer_start(&l->timer, lock_timer_cb, ms, 0);
}

static unsigned quorum(const keel_redis_lock *l) {
  return l->n / 2 + 1;
}

static uint64_t drift(const keel_redis_lock *l, uint64_t ttl) {
  return l->redlock ? ttl / 100 + 2 : 0;
}

/* Starts a round. Returns 0, or (first round only, nothing sent) the error
 * of a single server that refused the command at once. */
static int start_round(keel_redis_lock *l, bool first) {
  l->round++;
  l->tries++;
  memset(&l->acq, 0, sizeof l->acq);
  l->acq.started = uv_now(l->loop);
  l->phase = PH_ACQUIRING;
  new_token(l);
  for (unsigned i = 0; i < l->n; i++) {
    int rc = send_op(l, i, OP_ACQUIRE, l->round, l->token, l->opts.ttl_ms);
    if (rc != 0) {
      if (first && l->n == 1) return rc;
      l->acq.answered++;
      if (l->acq.first_err == 0) l->acq.first_err = rc;
    }
  }
  if (l->acq.answered == l->n) start_timer(l, T_DECIDE, 0); /* decide on a later iteration */
  return 0;
}

/* ---- acquire ------------------------------------------------------------------ */

static void give_acquire(keel_redis_lock *l, int status) {
  if (status != 0) {
    l->phase = PH_ENDED;
    if (l->acq_cb != NULL) l->acq_cb(l, status, l->acq_data);
    end_lock(l);
    return;
  }
  l->phase = PH_HELD;
  if (l->opts.watchdog) start_timer(l, T_WATCHDOG, l->opts.ttl_ms / 3);
  if (l->acq_cb != NULL) l->acq_cb(l, 0, l->acq_data);
}

static void decide_acquire(keel_redis_lock *l) {
  tally *t = &l->acq;
  if (t->decided) return;
  unsigned q = quorum(l);
  uint64_t now = uv_now(l->loop);
  uint64_t elapsed = now - t->started;
  uint64_t d = drift(l, l->opts.ttl_ms);
  if (t->ok >= q) {
    if (elapsed + d < l->opts.ttl_ms) {
      t->decided = true;
      l->won_round = l->round;
      l->fence = t->fence_max;
      l->valid_until = t->started + l->opts.ttl_ms - d;
      give_acquire(l, 0);
      return;
    }
    /* granted too slowly: no validity left; fail the round */
  } else if (t->answered < l->n && t->answered - t->ok <= l->n - q) {
    return; /* a quorum is still possible: wait for the others */
  }
  t->decided = true;
  /* Failed round: release what was granted (late grants too, on arrival). */
  for (unsigned i = 0; i < l->n; i++) bg_release(l, i, l->token);
  int status = t->busy > 0 || t->first_err == 0 || t->ok >= q ? KEEL_EBUSY : t->first_err;
  bool closing = false;
  for (unsigned i = 0; i < l->n; i++) closing = closing || keel__redis_closing(l->servers[i]);
  if (l->cancelled || closing) {
    give_acquire(l, UV_ECANCELED);
    return;
  }
  if (l->opts.wait_ms > 0) {
    uint64_t delay = keel_backoff_delay(&l->opts.retry_backoff, l->tries, l->prev_delay, &l->rng);
    l->prev_delay = delay;
    if (now + delay < l->acquire_started + l->opts.wait_ms) {
      l->phase = PH_RETRY_WAIT;
      l->pending_status = status;
      start_timer(l, T_RETRY, delay);
      return;
    }
  }
  give_acquire(l, status);
}

static void acquire_answer(keel_redis_lock *l, op *o, int status, const struct redisReply *rep) {
  bool current = o->round == l->round && l->phase == PH_ACQUIRING && !l->acq.decided;
  bool granted = status == 0 && keel_redis_reply_elements(rep) == 2 &&
                 keel_redis_reply_integer(keel_redis_reply_element(rep, 0)) == 1;
  if (!current) {
    /* A late answer of the round that won is part of the lock (the release
     * goes to every server, after it on the same connection); of any other
     * round, a grant (or an outcome in doubt) must not stay behind. */
    if (o->round != l->won_round && (granted || status == UV_ETIMEDOUT || status == KEEL_EINDOUBT))
      bg_release(l, o->idx, o->token);
    return;
  }
  tally *t = &l->acq;
  t->answered++;
  if (granted) {
    t->ok++;
    uint64_t f = (uint64_t)keel_redis_reply_integer(keel_redis_reply_element(rep, 1));
    if (f > t->fence_max) t->fence_max = f;
  } else if (status == 0) {
    t->busy++;
  } else {
    if (status == UV_ETIMEDOUT || status == KEEL_EINDOUBT) bg_release(l, o->idx, o->token);
    if (t->first_err == 0) t->first_err = status;
  }
  decide_acquire(l);
}

/* ---- release / extend --------------------------------------------------------- */

static void release_answer(keel_redis_lock *l, int status, const struct redisReply *rep) {
  tally *t = &l->rel;
  t->answered++;
  if (status == 0) {
    long long v = keel_redis_reply_integer(rep);
    if (v == 1)
      t->ok++;
    else if (v == 0)
      t->gone++;
    else
      t->taken++;
  } else if (t->first_err == 0) {
    t->first_err = status;
  }
  if (t->answered < l->n || l->phase != PH_RELEASING) return;
  int st;
  if (t->ok >= quorum(l))
    st = 0;
  else if (t->gone + t->taken > l->n - quorum(l) || t->first_err == 0)
    st = KEEL_ELOST;
  else
    st = t->first_err;
  l->taken_by_other = t->taken > 0;
  l->phase = PH_ENDED;
  if (l->rel_cb != NULL) l->rel_cb(l, st, l->rel_data);
  l->taken_by_other = false;
  end_lock(l);
}

static void report_lost(keel_redis_lock *l, int status) {
  if (l->lost_reported) return;
  l->lost_reported = true;
  if ((l->timer_use == T_WATCHDOG || l->timer_use == T_EXPIRY) && l->timer_open) {
    uv_timer_stop(&l->timer);
    l->timer_use = T_NONE;
  }
  if (l->opts.on_lost != NULL) l->opts.on_lost(l, status, l->opts.lost_data);
}

static void extend_answer(keel_redis_lock *l, op *o, int status, const struct redisReply *rep) {
  if (o->round != l->ext_seq || !l->ext_busy) {
    /* A renewal abandoned at the validity end (on_lost told) that still
     * got through must not keep the key for another ttl. */
    if (l->lost_reported && status == 0 && keel_redis_reply_integer(rep) == 1)
      bg_release(l, o->idx, o->token);
    return;
  }
  tally *t = &l->ext;
  t->answered++;
  if (status == 0) {
    long long v = keel_redis_reply_integer(rep);
    if (v == 1)
      t->ok++;
    else if (v == 0)
      t->gone++;
    else
      t->taken++;
  } else if (t->first_err == 0) {
    t->first_err = status;
  }
  if (t->answered < l->n) return;
  l->ext_busy = false;
  uint64_t now = uv_now(l->loop);
  uint64_t d = drift(l, l->ext_ttl);
  int st;
  if (t->ok >= quorum(l) && now - t->started + d < l->ext_ttl) {
    st = 0;
    l->valid_until = t->started + l->ext_ttl - d;
  } else if (t->ok < quorum(l) && (t->gone + t->taken > l->n - quorum(l) || t->first_err == 0)) {
    st = KEEL_ELOST;
  } else {
    st = t->first_err != 0 ? t->first_err : KEEL_ELOST;
  }
  if (l->ext_is_watchdog) {
    if (l->phase != PH_HELD) return; /* released meanwhile */
    if (st != 0) {
      report_lost(l, st);
      return;
    }
    l->renewals++;
    if (!l->lost_reported && (l->opts.max_renewals == 0 || l->renewals < l->opts.max_renewals))
      start_timer(l, T_WATCHDOG, l->opts.ttl_ms / 3);
    return;
  }
  /* A user extend may have superseded a watchdog renewal (whose answer is
   * then ignored): keep the watchdog going. */
  if (st == 0 && l->opts.watchdog && !l->lost_reported && l->phase == PH_HELD &&
      l->timer_use != T_WATCHDOG &&
      (l->opts.max_renewals == 0 || l->renewals < l->opts.max_renewals))
    start_timer(l, T_WATCHDOG, l->opts.ttl_ms / 3);
  keel_redis_lock_done_cb cb = l->ext_cb;
  l->ext_cb = NULL;
  if (cb != NULL) cb(l, st, l->ext_data);
}

static int start_extend(keel_redis_lock *l, uint64_t ttl, bool watchdog) {
  l->ext_seq++;
  memset(&l->ext, 0, sizeof l->ext);
  l->ext.started = uv_now(l->loop);
  l->ext_ttl = ttl;
  l->ext_is_watchdog = watchdog;
  l->ext_busy = true;
  unsigned sent = 0;
  int first = 0;
  for (unsigned i = 0; i < l->n; i++) {
    int rc = send_op(l, i, OP_EXTEND, l->ext_seq, l->token, ttl);
    if (rc == 0)
      sent++;
    else {
      l->ext.answered++;
      if (l->ext.first_err == 0) l->ext.first_err = rc;
      if (first == 0) first = rc;
    }
  }
  if (sent == 0) {
    l->ext_busy = false;
    return first;
  }
  return 0;
}

static void on_op_reply(keel_redis *r, int status, const struct redisReply *rep, void *data) {
  (void)r;
  op *o = data;
  keel_redis_lock *l = o->lock;
  l->outstanding--;
  l->in_op = true;
  if (l->phase != PH_ENDED || o->kind == OP_ACQUIRE) {
    switch (o->kind) {
      case OP_ACQUIRE:
        acquire_answer(l, o, status, rep);
        break;
      case OP_RELEASE:
        release_answer(l, status, rep);
        break;
      case OP_EXTEND:
        extend_answer(l, o, status, rep);
        break;
      case OP_BG_RELEASE:
        break;
    }
  }
  keel__free(o);
  l->in_op = false;
  maybe_free(l);
}

static void lock_timer_cb(uv_timer_t *t) {
  keel_redis_lock *l = t->data;
  enum timer_use use = l->timer_use;
  l->timer_use = T_NONE;
  switch (use) {
    case T_DECIDE:
      decide_acquire(l);
      break;
    case T_CANCEL:
      give_acquire(l, UV_ECANCELED);
      break;
    case T_RETRY:
      if (l->phase != PH_RETRY_WAIT) break;
      (void)start_round(l, false);
      break;
    case T_WATCHDOG: {
      if (l->phase != PH_HELD || l->lost_reported) break;
      if (l->ext_busy) { /* a user extend is running: look again later */
        start_timer(l, T_WATCHDOG, l->opts.ttl_ms / 3);
        break;
      }
      int rc = start_extend(l, l->opts.ttl_ms, true);
      if (rc != 0) {
        report_lost(l, rc);
        break;
      }
      /* The renewal may wait up to the command timeout (longer than the
       * ttl): on_lost must come no later than the validity end. */
      uint64_t now = uv_now(l->loop);
      start_timer(l, T_EXPIRY, l->valid_until > now ? l->valid_until - now : 0);
      break;
    }
    case T_EXPIRY:
      if (l->phase != PH_HELD || l->lost_reported || !l->ext_busy || !l->ext_is_watchdog) break;
      /* the renewal did not answer in time: abandon it (a late answer is
       * ignored, a late success released) and report */
      l->ext_seq++;
      l->ext_busy = false;
      report_lost(l, UV_ETIMEDOUT);
      break;
    case T_NONE:
      break;
  }
}

/* ---- public -------------------------------------------------------------------- */

KEEL_EXTERN void keel_redis_lock_opts_init(keel_redis_lock_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->ttl_ms = 10000;
  keel_backoff_full_jitter(&opts->retry_backoff, 10, 2.0, 200);
}

static int lock_new(keel_redis *const *servers, unsigned n, bool redlock, const char *name,
                    const keel_redis_lock_opts *opts, keel_redis_lock_cb cb, void *data,
                    keel_redis_lock **out) {
  if (servers == NULL || n == 0 || n > MAX_SERVERS || name == NULL || cb == NULL || out == NULL)
    return UV_EINVAL;
  for (unsigned i = 0; i < n; i++) {
    if (servers[i] == NULL) return UV_EINVAL;
    if (keel_redis_loop(servers[i]) != keel_redis_loop(servers[0])) return UV_EINVAL;
  }
  keel_redis_lock_opts o;
  if (opts != NULL)
    o = *opts;
  else
    keel_redis_lock_opts_init(&o);
  size_t nlen = strlen(name);
  if (nlen == 0 || nlen > MAX_NAME || o.ttl_ms < 10) return UV_EINVAL;
  if (keel_backoff_validate(&o.retry_backoff, NULL) != 0) return UV_EINVAL;
  for (unsigned i = 0; i < n; i++) {
    if (keel__redis_closing(servers[i])) return KEEL_ECLOSING;
  }
  uv_once(&scripts_once, init_scripts);
  const char *prefix = o.prefix != NULL ? o.prefix : "keel:lock:";
  size_t plen = strlen(prefix);
  size_t keylen = plen + nlen + 2, fkeylen = keylen + 6;
  keel_redis_lock *l = keel__calloc(1, sizeof *l + keylen + 1 + fkeylen + 1);
  if (l == NULL) return UV_ENOMEM;
  l->opts = o;
  l->opts.prefix = NULL; /* used for the key only */
  l->key = (char *)(l + 1);
  l->keylen = keylen;
  l->fkey = l->key + keylen + 1;
  l->fkeylen = fkeylen;
  memcpy(l->key, prefix, plen);
  l->key[plen] = '{';
  memcpy(l->key + plen + 1, name, nlen);
  l->key[plen + 1 + nlen] = '}';
  l->key[keylen] = '\0';
  memcpy(l->fkey, l->key, keylen);
  memcpy(l->fkey + keylen, ":fence", 7);
  l->n = n;
  memcpy(l->servers, servers, n * sizeof servers[0]);
  l->home = servers[0];
  l->loop = keel_redis_loop(servers[0]);
  l->redlock = redlock;
  l->acq_cb = cb;
  l->acq_data = data;
  l->timer_closed = true;
  keel__rlist_init(&l->link);
  keel_rng_seed(&l->rng, uv_hrtime() ^ (uint64_t)(uintptr_t)l);
  l->acquire_started = uv_now(l->loop);
  int rc = start_round(l, true);
  if (rc != 0) { /* nothing sent, no timer: undo without any callback */
    keel__free(l);
    return rc;
  }
  keel__redis_lock_register(l->home, &l->link);
  *out = l;
  return 0;
}

KEEL_EXTERN int keel_redis_lock_acquire(keel_redis *r, const char *name,
                                        const keel_redis_lock_opts *opts, keel_redis_lock_cb cb,
                                        void *data, keel_redis_lock **out) {
  if (r == NULL) return UV_EINVAL;
  keel_redis *servers[1] = {r};
  return lock_new(servers, 1, false, name, opts, cb, data, out);
}

KEEL_EXTERN int keel_redis_redlock_acquire(keel_redis *const *servers, unsigned n, const char *name,
                                           const keel_redis_lock_opts *opts, keel_redis_lock_cb cb,
                                           void *data, keel_redis_lock **out) {
  return lock_new(servers, n, true, name, opts, cb, data, out);
}

static bool any_closing(const keel_redis_lock *l) {
  for (unsigned i = 0; i < l->n; i++)
    if (keel__redis_closing(l->servers[i])) return true;
  return false;
}

KEEL_EXTERN int keel_redis_lock_release(keel_redis_lock *l, keel_redis_lock_done_cb cb,
                                        void *data) {
  if (l == NULL || l->phase != PH_HELD) return UV_EINVAL;
  if (l->ext_busy && !l->ext_is_watchdog) return UV_EINVAL; /* extend in progress */
  if (l->home == NULL || keel__redis_closing(l->home)) return KEEL_ECLOSING;
  memset(&l->rel, 0, sizeof l->rel);
  unsigned sent = 0;
  int first = 0;
  for (unsigned i = 0; i < l->n; i++) {
    int rc = send_op(l, i, OP_RELEASE, 0, l->token, 0);
    if (rc == 0) {
      sent++;
    } else {
      l->rel.answered++;
      if (l->rel.first_err == 0) l->rel.first_err = rc;
      if (first == 0) first = rc;
    }
  }
  if (sent == 0) return first; /* nothing done: still held */
  if ((l->timer_use == T_WATCHDOG || l->timer_use == T_EXPIRY) && l->timer_open) {
    uv_timer_stop(&l->timer);
    l->timer_use = T_NONE;
  }
  l->rel_cb = cb;
  l->rel_data = data;
  l->phase = PH_RELEASING;
  return 0;
}

KEEL_EXTERN int keel_redis_lock_extend(keel_redis_lock *l, uint64_t ttl_ms,
                                       keel_redis_lock_done_cb cb, void *data) {
  if (l == NULL || l->phase != PH_HELD) return UV_EINVAL;
  if (l->ext_busy && !l->ext_is_watchdog) return UV_EINVAL; /* a watchdog renewal is superseded */
  if (ttl_ms != 0 && ttl_ms < 10) return UV_EINVAL;
  if (any_closing(l) && (l->home == NULL || keel__redis_closing(l->home))) return KEEL_ECLOSING;
  int rc = start_extend(l, ttl_ms != 0 ? ttl_ms : l->opts.ttl_ms, false);
  if (rc != 0) {
    /* nothing sent; a superseded watchdog renewal must not stop the watchdog */
    if (l->opts.watchdog && !l->lost_reported && l->timer_use != T_WATCHDOG)
      start_timer(l, T_WATCHDOG, 0);
    return rc;
  }
  l->ext_cb = cb;
  l->ext_data = data;
  return 0;
}

KEEL_EXTERN int keel_redis_lock_cancel(keel_redis_lock *l) {
  if (l == NULL) return UV_EINVAL;
  /* close began: the acquire gets UV_ECANCELED from the close */
  if (l->home == NULL || keel__redis_closing(l->home)) return KEEL_ECLOSING;
  if (l->cancelled) return UV_EINVAL;
  if (l->phase != PH_ACQUIRING && l->phase != PH_RETRY_WAIT) return UV_EINVAL;
  if (l->phase == PH_ACQUIRING && l->acq.decided) return UV_EINVAL;
  l->cancelled = true;
  /* the round in flight is abandoned: its grants are released on arrival */
  l->acq.decided = true;
  for (unsigned i = 0; i < l->n; i++) bg_release(l, i, l->token);
  l->phase = PH_RETRY_WAIT;
  if (l->timer_open) uv_timer_stop(&l->timer);
  start_timer(l, T_CANCEL, 0);
  return 0;
}

KEEL_EXTERN uint64_t keel_redis_lock_fence(const keel_redis_lock *l) {
  return l != NULL ? l->fence : 0;
}

KEEL_EXTERN const char *keel_redis_lock_token(const keel_redis_lock *l) {
  return l != NULL ? l->token : "";
}

KEEL_EXTERN uint64_t keel_redis_lock_valid_until(const keel_redis_lock *l) {
  return l != NULL ? l->valid_until : 0;
}

KEEL_EXTERN uint64_t keel_redis_lock_renewals(const keel_redis_lock *l) {
  return l != NULL ? l->renewals : 0;
}

KEEL_EXTERN bool keel_redis_lock_taken_by_other(const keel_redis_lock *l) {
  return l != NULL && l->taken_by_other;
}
